//! Learning-rate schedules.
//!
//! A schedule gives, for each optimizer update, the factor by which the base learning
//! rate is multiplied. The warm-up schedules reproduce Hugging Face transformers'
//! `get_constant_schedule`, `get_constant_schedule_with_warmup`,
//! `get_linear_schedule_with_warmup` and `get_cosine_schedule_with_warmup` (the
//! `lr_lambda` they hand to PyTorch's `LambdaLR`), so a run configured like a
//! transformers `Trainer` run sees the same learning rate at every step. The slanted
//! triangular schedule is ULMFiT's (Howard & Ruder, 2018, "Universal Language Model
//! Fine-tuning for Text Classification", eq. 3).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Default `cut_frac` of the slanted triangular schedule: the share of the steps spent
/// increasing the learning rate (ULMFiT's value).
pub const DEFAULT_STLR_CUT_FRAC: f64 = 0.1;

/// Default `ratio` of the slanted triangular schedule: how much smaller the lowest
/// learning rate is than the peak (ULMFiT's value).
pub const DEFAULT_STLR_RATIO: f64 = 32.0;

/// The shape of a learning-rate schedule. See [`LrSchedule::factor`] for the formulas.
///
/// Serialised, displayed and parsed in snake case: `constant`, `constant_with_warmup`,
/// `linear`, `cosine`, `slanted_triangular`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    /// The base learning rate at every step; warm-up is ignored.
    Constant,
    /// Linear warm-up from 0, then the base learning rate.
    ConstantWithWarmup,
    /// Linear warm-up from 0, then linear decay to 0 at the last step.
    Linear,
    /// Linear warm-up from 0, then half a cosine wave down to 0 at the last step.
    Cosine,
    /// ULMFiT's slanted triangular schedule: a short linear increase, then a long linear
    /// decrease; has its own warm-up, so `warmup_steps` is ignored.
    SlantedTriangular,
}

impl SchedulerKind {
    /// Every kind, in declaration order.
    pub const ALL: [SchedulerKind; 5] = [
        SchedulerKind::Constant,
        SchedulerKind::ConstantWithWarmup,
        SchedulerKind::Linear,
        SchedulerKind::Cosine,
        SchedulerKind::SlantedTriangular,
    ];

    /// The snake-case name of the kind, as serialised and as accepted by
    /// [`FromStr`].
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Constant => "constant",
            SchedulerKind::ConstantWithWarmup => "constant_with_warmup",
            SchedulerKind::Linear => "linear",
            SchedulerKind::Cosine => "cosine",
            SchedulerKind::SlantedTriangular => "slanted_triangular",
        }
    }
}

impl fmt::Display for SchedulerKind {
    /// Writes [`SchedulerKind::name`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Error of parsing a [`SchedulerKind`] from a string that names none; its message lists
/// the valid names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownSchedulerKind(pub String);

impl fmt::Display for UnknownSchedulerKind {
    /// Writes `unknown learning-rate scheduler "<name>"; expected one of: constant, …`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.name()).collect();
        write!(
            f,
            "unknown learning-rate scheduler {:?}; expected one of: {}",
            self.0,
            names.join(", ")
        )
    }
}

impl std::error::Error for UnknownSchedulerKind {}

impl FromStr for SchedulerKind {
    type Err = UnknownSchedulerKind;

    /// Parses a snake-case name (see [`SchedulerKind::name`]). Case is ignored, `-` is
    /// read as `_`, and `stlr` is accepted for `slanted_triangular`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s.trim().to_ascii_lowercase().replace('-', "_");
        if norm == "stlr" {
            return Ok(SchedulerKind::SlantedTriangular);
        }
        SchedulerKind::ALL
            .into_iter()
            .find(|k| k.name() == norm)
            .ok_or_else(|| UnknownSchedulerKind(s.to_string()))
    }
}

/// A learning-rate schedule: the kind plus the step counts it is laid over.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// The shape of the schedule.
    pub kind: SchedulerKind,
    /// Number of warm-up updates `W` (ignored by `Constant` and `SlantedTriangular`).
    pub warmup_steps: usize,
    /// Total number of optimizer updates `T` of the run.
    pub total_steps: usize,
    /// Slanted triangular only: the share of the `T` steps spent increasing the learning
    /// rate (`cut_frac`, default [`DEFAULT_STLR_CUT_FRAC`]).
    #[serde(default = "default_stlr_cut_frac")]
    pub stlr_cut_frac: f64,
    /// Slanted triangular only: peak learning rate over lowest (`ratio`, default
    /// [`DEFAULT_STLR_RATIO`]).
    #[serde(default = "default_stlr_ratio")]
    pub stlr_ratio: f64,
}

/// Serde default of [`LrSchedule::stlr_cut_frac`].
fn default_stlr_cut_frac() -> f64 {
    DEFAULT_STLR_CUT_FRAC
}

/// Serde default of [`LrSchedule::stlr_ratio`].
fn default_stlr_ratio() -> f64 {
    DEFAULT_STLR_RATIO
}

/// Linear warm-up factor `step / max(1, W)`, as transformers computes it.
fn warmup_factor(step: usize, warmup: usize) -> f64 {
    step as f64 / warmup.max(1) as f64
}

impl LrSchedule {
    /// A schedule of `kind` over `total_steps` updates with `warmup_steps` warm-up
    /// updates and the default slanted triangular parameters
    /// ([`DEFAULT_STLR_CUT_FRAC`], [`DEFAULT_STLR_RATIO`]).
    pub fn new(kind: SchedulerKind, warmup_steps: usize, total_steps: usize) -> Self {
        LrSchedule {
            kind,
            warmup_steps,
            total_steps,
            stlr_cut_frac: DEFAULT_STLR_CUT_FRAC,
            stlr_ratio: DEFAULT_STLR_RATIO,
        }
    }

    /// The multiplier of the base learning rate for optimizer update number `step`
    /// (0-based: the first update uses `step = 0`).
    ///
    /// With `W = warmup_steps`, `T = total_steps` and `t = step`:
    ///
    /// * `Constant`: `1`.
    /// * `ConstantWithWarmup`: `t / max(1, W)` while `t < W`, then `1`.
    /// * `Linear`: `t / max(1, W)` while `t < W`, then
    ///   `max(0, (T − t) / max(1, T − W))` (so `0` from step `T` on).
    /// * `Cosine`: `t / max(1, W)` while `t < W`, then with
    ///   `progress = (t − W) / max(1, T − W)`:
    ///   `max(0, 0.5·(1 + cos(π · 2 · 0.5 · progress)))` — transformers'
    ///   `num_cycles = 0.5`. As in transformers, `progress` is not clamped, so past step
    ///   `T` the factor rises again along the cosine.
    /// * `SlantedTriangular` (ULMFiT), with `cut_frac = stlr_cut_frac`,
    ///   `ratio = stlr_ratio` and `cut = ⌊T · cut_frac⌋`:
    ///   `p = t / cut` while `t < cut`, else
    ///   `p = 1 − (t − cut) / (cut · (1 / cut_frac − 1))`; the factor is
    ///   `(1 + p · (ratio − 1)) / ratio`, rising from `1/ratio` to `1` at `t = cut` and
    ///   falling back to `1/ratio`. Two guards keep it finite and positive where the
    ///   paper's formula is not: `p` is clamped at `0` (the rounding down of `cut` can
    ///   otherwise push `p` below zero before step `T`, and would beyond `T`), and when
    ///   `cut · (1 / cut_frac − 1)` is not a positive number (`cut = 0` for short runs,
    ///   `cut_frac` outside `(0, 1)`) the decay is laid over `max(1, T − cut)` steps
    ///   instead. A `ratio` that is not a positive finite number is read as `1` (a
    ///   constant factor of `1`). `warmup_steps` is ignored.
    ///
    /// All differences `T − t` and `T − W` are taken as signed numbers, as in Python, so
    /// no combination of inputs panics or underflows.
    pub fn factor(&self, step: usize) -> f64 {
        let (t, w, total) = (step, self.warmup_steps, self.total_steps);
        match self.kind {
            SchedulerKind::Constant => 1.0,
            SchedulerKind::ConstantWithWarmup => {
                if t < w {
                    warmup_factor(t, w)
                } else {
                    1.0
                }
            }
            SchedulerKind::Linear => {
                if t < w {
                    warmup_factor(t, w)
                } else {
                    let remaining = total as f64 - t as f64;
                    let span = (total as f64 - w as f64).max(1.0);
                    (remaining / span).max(0.0)
                }
            }
            SchedulerKind::Cosine => {
                if t < w {
                    warmup_factor(t, w)
                } else {
                    // t >= w here, so the numerator is non-negative.
                    let progress = (t - w) as f64 / (total as f64 - w as f64).max(1.0);
                    let num_cycles = 0.5;
                    (0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos()))
                        .max(0.0)
                }
            }
            SchedulerKind::SlantedTriangular => self.stlr_factor(t),
        }
    }

    /// ULMFiT's slanted triangular factor; see [`LrSchedule::factor`].
    fn stlr_factor(&self, t: usize) -> f64 {
        let total = self.total_steps as f64;
        let cut_frac = self.stlr_cut_frac;
        let ratio = if self.stlr_ratio.is_finite() && self.stlr_ratio > 0.0 {
            self.stlr_ratio
        } else {
            1.0
        };
        // `as usize` saturates: NaN and negative products give 0.
        let cut = (total * cut_frac).floor() as usize;
        let p = if t < cut {
            t as f64 / cut as f64
        } else {
            let mut decay_len = cut as f64 * (1.0 / cut_frac - 1.0);
            if !(decay_len.is_finite() && decay_len > 0.0) {
                decay_len = (total - cut as f64).max(1.0);
            }
            (1.0 - (t - cut) as f64 / decay_len).max(0.0)
        };
        (1.0 + p * (ratio - 1.0)) / ratio
    }
}

/// Number of warm-up steps for a warm-up given as a share of the run:
/// `⌈total_steps · ratio⌉`, as transformers computes it
/// (`math.ceil(num_training_steps * warmup_ratio)`), including its floating-point
/// rounding (e.g. `warmup_from_ratio(100, 0.07)` is 8, since `100 · 0.07` is
/// `7.000000000000001` in binary floating point). A negative or NaN `ratio` gives `0`.
pub fn warmup_from_ratio(total_steps: usize, ratio: f64) -> usize {
    // `as usize` saturates: NaN and negative values give 0.
    (total_steps as f64 * ratio).ceil() as usize
}

#[cfg(test)]
mod tests {
    //! Expected values are worked out by hand from the formulas of transformers'
    //! `lr_lambda`s and ULMFiT's eq. 3, as the comments show; the non-obvious cosine
    //! values were checked by evaluating those lambdas with Python's `math`.

    use super::*;

    const TOL: f64 = 1e-12;

    fn sched(kind: SchedulerKind, warmup: usize, total: usize) -> LrSchedule {
        LrSchedule::new(kind, warmup, total)
    }

    /// Asserts `schedule.factor(step)` for each `(step, expected)` pair.
    fn check(schedule: LrSchedule, cases: &[(usize, f64)]) {
        for &(step, expected) in cases {
            let got = schedule.factor(step);
            assert!(
                (got - expected).abs() <= TOL,
                "{schedule:?} at step {step}: got {got:?}, expected {expected:?}"
            );
        }
    }

    #[test]
    fn constant_ignores_warmup() {
        check(
            sched(SchedulerKind::Constant, 10, 100),
            &[(0, 1.0), (5, 1.0), (100, 1.0), (10_000, 1.0)],
        );
    }

    #[test]
    fn constant_with_warmup() {
        // 0/4, 1/4, 3/4, then 1 from step W = 4 on, also past T.
        check(
            sched(SchedulerKind::ConstantWithWarmup, 4, 20),
            &[
                (0, 0.0),
                (1, 0.25),
                (3, 0.75),
                (4, 1.0),
                (20, 1.0),
                (500, 1.0),
            ],
        );
        // W = 0: no warm-up at all.
        check(
            sched(SchedulerKind::ConstantWithWarmup, 0, 20),
            &[(0, 1.0), (7, 1.0)],
        );
    }

    #[test]
    fn linear_warmup_then_decay() {
        // W = 10, T = 100: t/10 while t < 10, then (100 - t) / 90.
        check(
            sched(SchedulerKind::Linear, 10, 100),
            &[
                (0, 0.0),
                (5, 0.5),
                (9, 0.9),
                (10, 1.0), // 90 / 90
                (55, 0.5), // 45 / 90
                (91, 0.1), // 9 / 90
                (99, 1.0 / 90.0),
                (100, 0.0), // 0 / 90
                (150, 0.0), // max(0, -50 / 90)
            ],
        );
    }

    #[test]
    fn linear_edge_cases() {
        // W = 0, T = 4: (4 - t) / 4; the first update already uses the full rate.
        check(
            sched(SchedulerKind::Linear, 0, 4),
            &[(0, 1.0), (1, 0.75), (2, 0.5), (3, 0.25), (4, 0.0), (9, 0.0)],
        );
        // T == W = 5: warm-up t/5, then max(0, (5 - t) / max(1, 0)) = 0 from t = 5.
        check(
            sched(SchedulerKind::Linear, 5, 5),
            &[(0, 0.0), (4, 0.8), (5, 0.0), (6, 0.0)],
        );
        // W > T (W = 10, T = 5): warm-up t/10 until 10, then max(0, (5 - t) / max(1, -5)).
        check(
            sched(SchedulerKind::Linear, 10, 5),
            &[(3, 0.3), (9, 0.9), (10, 0.0), (11, 0.0)],
        );
        // T = 0, W = 0: max(0, (0 - t) / 1) = 0 everywhere.
        check(sched(SchedulerKind::Linear, 0, 0), &[(0, 0.0), (3, 0.0)]);
    }

    #[test]
    fn cosine_warmup_then_half_wave() {
        // W = 10, T = 110: progress = (t - 10) / 100, factor = 0.5·(1 + cos(π·progress)).
        check(
            sched(SchedulerKind::Cosine, 10, 110),
            &[
                (0, 0.0),
                (5, 0.5),
                (10, 1.0),                 // progress 0
                (35, 0.8535533905932737),  // progress 1/4: 0.5·(1 + √2/2)
                (60, 0.5),                 // progress 1/2
                (85, 0.14644660940672627), // progress 3/4: 0.5·(1 − √2/2)
                (110, 0.0),                // progress 1
                // Past T, transformers' lambda rises again: progress 3/2 gives 0.5.
                (160, 0.5),
            ],
        );
    }

    #[test]
    fn cosine_edge_cases() {
        // W = 0, T = 4: progress t/4.
        check(
            sched(SchedulerKind::Cosine, 0, 4),
            &[(0, 1.0), (2, 0.5), (4, 0.0)],
        );
        // T == W = 5: progress = (t - 5) / max(1, 0) = t - 5, so 1 at t = 5 and 0 at
        // t = 6, exactly as transformers' lambda gives.
        check(
            sched(SchedulerKind::Cosine, 5, 5),
            &[(0, 0.0), (4, 0.8), (5, 1.0), (6, 0.0)],
        );
    }

    #[test]
    fn slanted_triangular_ulmfit_defaults() {
        // T = 1000, cut_frac 0.1, ratio 32: cut = 100, decay over 100·(10 − 1) = 900.
        let s = sched(SchedulerKind::SlantedTriangular, 999, 1000);
        check(
            s,
            &[
                (0, 1.0 / 32.0),                    // p = 0
                (50, 0.515625),                     // p = 0.5: (1 + 15.5) / 32
                (100, 1.0),                         // p = 1
                (550, 0.515625),                    // p = 1 − 450/900 = 0.5
                (999, (1.0 + 31.0 / 900.0) / 32.0), // p = 1/900
                (1000, 1.0 / 32.0),                 // p = 0
                (5000, 1.0 / 32.0),                 // p clamped at 0
            ],
        );
        // warmup_steps is ignored.
        assert_eq!(
            s.factor(50),
            sched(SchedulerKind::SlantedTriangular, 0, 1000).factor(50)
        );
    }

    #[test]
    fn slanted_triangular_custom_parameters() {
        // T = 10, cut_frac 0.5, ratio 4: cut = 5, decay over 5·(2 − 1) = 5.
        let s = LrSchedule {
            stlr_cut_frac: 0.5,
            stlr_ratio: 4.0,
            ..sched(SchedulerKind::SlantedTriangular, 0, 10)
        };
        // t = 2: p = 0.4, (1 + 0.4·3)/4 = 0.55; t = 7: p = 1 − 2/5 = 0.6, (1 + 1.8)/4 = 0.7.
        check(s, &[(0, 0.25), (2, 0.55), (5, 1.0), (7, 0.7), (10, 0.25)]);
        // ratio 1 is a constant schedule; a non-positive ratio is read as 1.
        for ratio in [1.0, 0.0, -3.0, f64::NAN] {
            let flat = LrSchedule {
                stlr_ratio: ratio,
                ..s
            };
            check(flat, &[(0, 1.0), (3, 1.0), (8, 1.0)]);
        }
    }

    #[test]
    fn slanted_triangular_short_runs_stay_finite_and_positive() {
        // T = 15: cut = ⌊1.5⌋ = 1, decay over 9 steps, so the paper's p reaches 0 at
        // t = 10 and would go negative after; the clamp keeps the floor 1/32.
        check(
            sched(SchedulerKind::SlantedTriangular, 0, 15),
            &[
                (0, 1.0 / 32.0),
                (1, 1.0),
                (10, 1.0 / 32.0),
                (14, 1.0 / 32.0),
            ],
        );
        // T = 5: cut = ⌊0.5⌋ = 0; decay laid over max(1, 5 − 0) = 5 steps.
        // t = 1: p = 0.8, (1 + 0.8·31)/32 = 0.80625.
        check(
            sched(SchedulerKind::SlantedTriangular, 0, 5),
            &[(0, 1.0), (1, 0.80625), (5, 1.0 / 32.0)],
        );
        // Degenerate parameters never give NaN, infinities or negative factors.
        for (total, cut_frac) in [
            (0, 0.1),
            (1, 0.1),
            (10, 0.0),
            (10, 1.0),
            (10, 2.0),
            (10, f64::NAN),
            (10, -0.5),
        ] {
            let s = LrSchedule {
                stlr_cut_frac: cut_frac,
                ..sched(SchedulerKind::SlantedTriangular, 0, total)
            };
            for step in 0..30 {
                let f = s.factor(step);
                assert!(f.is_finite() && f > 0.0, "{s:?} at {step}: {f}");
            }
        }
    }

    #[test]
    fn warmup_from_ratio_rounds_up_like_transformers() {
        assert_eq!(warmup_from_ratio(1000, 0.1), 100);
        assert_eq!(warmup_from_ratio(3, 0.5), 2); // ⌈1.5⌉
        assert_eq!(warmup_from_ratio(100, 0.07), 8); // 100·0.07 = 7.000000000000001
        assert_eq!(warmup_from_ratio(0, 0.5), 0);
        assert_eq!(warmup_from_ratio(10, 0.0), 0);
        assert_eq!(warmup_from_ratio(10, -1.0), 0);
        assert_eq!(warmup_from_ratio(10, f64::NAN), 0);
    }

    #[test]
    fn scheduler_kind_parses_and_prints_snake_case() {
        for kind in SchedulerKind::ALL {
            assert_eq!(kind.to_string().parse::<SchedulerKind>(), Ok(kind));
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.name()));
            assert_eq!(serde_json::from_str::<SchedulerKind>(&json).unwrap(), kind);
        }
        assert_eq!(
            "Constant-With-Warmup".parse(),
            Ok(SchedulerKind::ConstantWithWarmup)
        );
        assert_eq!("stlr".parse(), Ok(SchedulerKind::SlantedTriangular));
        let err = "cosine_restarts".parse::<SchedulerKind>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown learning-rate scheduler \"cosine_restarts\"; expected one of: \
             constant, constant_with_warmup, linear, cosine, slanted_triangular"
        );
    }

    #[test]
    fn lr_schedule_deserialises_with_stlr_defaults() {
        let s: LrSchedule =
            serde_json::from_str(r#"{"kind":"linear","warmup_steps":3,"total_steps":30}"#).unwrap();
        assert_eq!(s, LrSchedule::new(SchedulerKind::Linear, 3, 30));
        assert_eq!(s.stlr_cut_frac, DEFAULT_STLR_CUT_FRAC);
        assert_eq!(s.stlr_ratio, DEFAULT_STLR_RATIO);
    }
}
