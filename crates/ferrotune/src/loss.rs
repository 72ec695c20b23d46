//! Loss functions, with their formulas.
//!
//! Every loss is composed from differentiable `candle_core` operations only (no fused
//! kernels without a backward pass), so `loss.backward()` yields exact gradients. All
//! losses use PyTorch's definitions with `reduction="mean"`. Half-precision inputs are
//! computed in `f32`; `f32` and `f64` inputs are computed in their own precision.
//!
//! Notation: `zᵢ` is row `i` of the logits `(N, C)`, `yᵢ` its target, `σ` the logistic
//! sigmoid, `sp(x) = log(1 + eˣ)` the softplus, and `log softmax(zᵢ)[c]` the log-probability
//! of class `c`.
//!
//! Non-smooth points follow PyTorch: `d|x|/dx = sign(x)` with `sign(0) = 0`, and the
//! piecewise losses switch branch at `|d| < β` (resp. `|d| < δ`).

use std::fmt;
use std::str::FromStr;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kernels::fused::log_softmax_last;
use crate::kernels::par::{par_for, with_f32, Out, PAR_MIN};

/// Which loss a run trains with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// Softmax cross-entropy over class ids ([`cross_entropy_with`]); optional label
    /// smoothing and class weights.
    CrossEntropy,
    /// Sigmoid binary cross-entropy over multi-label 0/1 targets
    /// ([`binary_cross_entropy_with_logits`]); optional `pos_weight`.
    BinaryCrossEntropy,
    /// Focal loss: softmax focal loss for class ids ([`focal_multiclass`]), sigmoid focal
    /// loss for multi-label targets ([`focal_binary`]).
    Focal,
    /// Mean squared error for regression ([`mse`]).
    Mse,
    /// Smooth L1 loss for regression ([`smooth_l1`]).
    SmoothL1,
    /// Huber loss for regression ([`huber`]).
    Huber,
}

impl LossKind {
    /// Every kind, in declaration order.
    pub const ALL: [LossKind; 6] = [
        LossKind::CrossEntropy,
        LossKind::BinaryCrossEntropy,
        LossKind::Focal,
        LossKind::Mse,
        LossKind::SmoothL1,
        LossKind::Huber,
    ];

    /// The snake-case name of the kind, as serialised and as accepted by [`FromStr`].
    pub fn name(self) -> &'static str {
        match self {
            LossKind::CrossEntropy => "cross_entropy",
            LossKind::BinaryCrossEntropy => "binary_cross_entropy",
            LossKind::Focal => "focal",
            LossKind::Mse => "mse",
            LossKind::SmoothL1 => "smooth_l1",
            LossKind::Huber => "huber",
        }
    }
}

impl fmt::Display for LossKind {
    /// Writes [`LossKind::name`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Error of parsing a [`LossKind`] from a string that names none; its message lists the
/// valid names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownLossKind(pub String);

impl fmt::Display for UnknownLossKind {
    /// Writes `unknown loss "<name>"; expected one of: cross_entropy, …`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = LossKind::ALL.iter().map(|k| k.name()).collect();
        write!(
            f,
            "unknown loss {:?}; expected one of: {}",
            self.0,
            names.join(", ")
        )
    }
}

impl std::error::Error for UnknownLossKind {}

impl From<UnknownLossKind> for Error {
    /// An [`Error::Config`] with the same message.
    fn from(e: UnknownLossKind) -> Self {
        Error::Config(e.to_string())
    }
}

impl FromStr for LossKind {
    type Err = UnknownLossKind;

    /// Parses a snake-case name (see [`LossKind::name`]). Case is ignored, `-` is read as
    /// `_`, and `ce` / `bce` are accepted for `cross_entropy` / `binary_cross_entropy`.
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let norm = s.trim().to_ascii_lowercase().replace('-', "_");
        match norm.as_str() {
            "ce" => return Ok(LossKind::CrossEntropy),
            "bce" => return Ok(LossKind::BinaryCrossEntropy),
            _ => {}
        }
        LossKind::ALL
            .into_iter()
            .find(|k| k.name() == norm)
            .ok_or_else(|| UnknownLossKind(s.to_string()))
    }
}

/// Targets by task type.
#[derive(Debug, Clone)]
pub enum Targets {
    /// Single-label classification: `(N,)` u32 class ids.
    Classes(Tensor),
    /// Multi-label classification: `(N, C)` float, 1 where label `c` applies, else 0.
    Multi(Tensor),
    /// Regression: `(N, C)` float target values.
    Values(Tensor),
    /// Causal LM: `(batch, seq)` i64 token labels, -100 where not counted; the logits are
    /// `(batch·seq, vocab)` ([`lm_loss`]).
    Tokens(Tensor),
    /// Two class targets blended (timm's mixup and CutMix): the loss is
    /// `λ·loss(a) + (1 − λ)·loss(b)`, which for cross-entropy (label smoothing included)
    /// and binary cross-entropy is the loss against the blended soft targets.
    Mixed {
        /// The batch's own targets.
        a: Box<Targets>,
        /// The targets of the examples mixed in.
        b: Box<Targets>,
        /// The weight `λ` of `a`.
        lam: f64,
    },
}

impl Targets {
    fn describe(&self) -> &'static str {
        match self {
            Targets::Classes(_) => "single-label class-id",
            Targets::Multi(_) => "multi-label 0/1",
            Targets::Values(_) => "real-valued regression",
            Targets::Tokens(_) => "causal-LM token",
            Targets::Mixed { a, .. } => a.describe(),
        }
    }

    fn fitting_kinds(&self) -> &'static str {
        match self {
            Targets::Classes(_) => "cross_entropy or focal",
            Targets::Multi(_) => "binary_cross_entropy or focal",
            Targets::Values(_) => "mse, smooth_l1 or huber",
            Targets::Tokens(_) => "cross_entropy",
            Targets::Mixed { a, .. } => a.fitting_kinds(),
        }
    }
}

/// The loss of a run and its options. Options that do not apply to [`LossConfig::kind`]
/// must stay at their defaults (see [`LossConfig::validate`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LossConfig {
    /// Which loss.
    pub kind: LossKind,
    /// Label smoothing `ε ∈ [0, 1]` for [`LossKind::CrossEntropy`].
    pub label_smoothing: f64,
    /// One weight per class: class weights of [`LossKind::CrossEntropy`], per-class `α` of
    /// [`LossKind::Focal`] with class-id targets.
    pub class_weights: Option<Vec<f64>>,
    /// One weight per label for positive examples, [`LossKind::BinaryCrossEntropy`] only.
    pub pos_weight: Option<Vec<f64>>,
    /// Focusing parameter `γ ≥ 0` of [`LossKind::Focal`].
    pub focal_gamma: f64,
    /// Balance `α ∈ [0, 1]` of [`LossKind::Focal`] with multi-label targets (weight `α` for
    /// positives, `1-α` for negatives); `None` weighs both 1.
    pub focal_alpha: Option<f64>,
    /// Threshold `β ≥ 0` of [`LossKind::SmoothL1`] (`0` gives the L1 loss).
    pub smooth_l1_beta: f64,
    /// Threshold `δ > 0` of [`LossKind::Huber`].
    pub huber_delta: f64,
}

impl Default for LossConfig {
    /// Plain cross-entropy; `focal_gamma` 2, `smooth_l1_beta` 1, `huber_delta` 1.
    fn default() -> Self {
        LossConfig {
            kind: LossKind::CrossEntropy,
            label_smoothing: 0.0,
            class_weights: None,
            pos_weight: None,
            focal_gamma: 2.0,
            focal_alpha: None,
            smooth_l1_beta: 1.0,
            huber_delta: 1.0,
        }
    }
}

fn config_err(msg: impl fmt::Display) -> Error {
    Error::Config(format!("loss: {msg}"))
}

impl LossConfig {
    /// Checks the option ranges (`label_smoothing ∈ [0, 1]`, `focal_gamma ≥ 0`,
    /// `focal_alpha ∈ [0, 1]`, `smooth_l1_beta ≥ 0`, `huber_delta > 0`, weights finite and
    /// non-negative) and that every option set away from its default applies to `kind`.
    /// Weight-vector lengths are checked against the logits in [`compute`].
    pub fn validate(&self) -> Result<()> {
        let kind = self.kind;
        let finite_in = |key: &str, v: f64, lo: f64, hi: f64| -> Result<()> {
            if v.is_finite() && v >= lo && v <= hi {
                Ok(())
            } else {
                Err(config_err(format!(
                    "`{key}` must be in [{lo}, {hi}], got {v}"
                )))
            }
        };
        finite_in("label_smoothing", self.label_smoothing, 0.0, 1.0)?;
        for (key, v) in [
            ("focal_gamma", self.focal_gamma),
            ("smooth_l1_beta", self.smooth_l1_beta),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(config_err(format!("`{key}` must be non-negative, got {v}")));
            }
        }
        if !(self.huber_delta.is_finite() && self.huber_delta > 0.0) {
            return Err(config_err(format!(
                "`huber_delta` must be positive, got {}",
                self.huber_delta
            )));
        }
        if let Some(a) = self.focal_alpha {
            finite_in("focal_alpha", a, 0.0, 1.0)?;
        }
        for (key, w) in [
            ("class_weights", &self.class_weights),
            ("pos_weight", &self.pos_weight),
        ] {
            if let Some(w) = w {
                if let Some(bad) = w.iter().find(|x| !(x.is_finite() && **x >= 0.0)) {
                    return Err(config_err(format!(
                        "`{key}` must be finite and non-negative, got {bad}"
                    )));
                }
            }
        }
        let misplaced = |key: &str, applies_to: &str| {
            config_err(format!(
                "`{key}` applies only to loss {applies_to}, but the loss is `{kind}`"
            ))
        };
        if self.label_smoothing != 0.0 && kind != LossKind::CrossEntropy {
            return Err(misplaced("label_smoothing", "`cross_entropy`"));
        }
        if self.class_weights.is_some() && !matches!(kind, LossKind::CrossEntropy | LossKind::Focal)
        {
            return Err(misplaced("class_weights", "`cross_entropy` or `focal`"));
        }
        if self.pos_weight.is_some() && kind != LossKind::BinaryCrossEntropy {
            return Err(misplaced("pos_weight", "`binary_cross_entropy`"));
        }
        if self.focal_alpha.is_some() && kind != LossKind::Focal {
            return Err(misplaced("focal_alpha", "`focal`"));
        }
        Ok(())
    }
}

/// The loss `cfg` of `logits` against `targets`, a scalar tensor.
///
/// | kind | targets | loss |
/// |---|---|---|
/// | `cross_entropy` | [`Targets::Classes`] | [`cross_entropy_with`]`(label_smoothing, class_weights)` |
/// | `binary_cross_entropy` | [`Targets::Multi`] | [`binary_cross_entropy_with_logits`]`(pos_weight)` |
/// | `focal` | [`Targets::Classes`] | [`focal_multiclass`]`(focal_gamma, α = class_weights)` |
/// | `focal` | [`Targets::Multi`] | [`focal_binary`]`(focal_gamma, focal_alpha)` |
/// | `mse` | [`Targets::Values`] | [`mse`] |
/// | `smooth_l1` | [`Targets::Values`] | [`smooth_l1`]`(smooth_l1_beta)` |
/// | `huber` | [`Targets::Values`] | [`huber`]`(huber_delta)` |
///
/// Any other pairing, an invalid option (see [`LossConfig::validate`]), `focal_alpha`
/// with class-id targets (use `class_weights` for a per-class `α`), or a weight vector
/// whose length is not the number of classes is an [`Error::Config`] naming `loss`.
pub fn compute(cfg: &LossConfig, logits: &Tensor, targets: &Targets) -> Result<Tensor> {
    cfg.validate()?;
    let to_f32 = |w: &Option<Vec<f64>>| {
        w.as_ref()
            .map(|w| w.iter().map(|&x| x as f32).collect::<Vec<f32>>())
    };
    let class_weights = to_f32(&cfg.class_weights);
    let pos_weight = to_f32(&cfg.pos_weight);
    match (cfg.kind, targets) {
        (LossKind::CrossEntropy, Targets::Tokens(t)) => lm_loss(logits, t),
        (_, Targets::Mixed { a, b, lam }) => {
            if matches!(**a, Targets::Values(_)) {
                return Err(config_err("mixed targets apply to classification only"));
            }
            let la = compute(cfg, logits, a)?;
            let lb = compute(cfg, logits, b)?;
            Ok((la.affine(*lam, 0.0)? + lb.affine(1.0 - *lam, 0.0)?)?)
        }
        (LossKind::CrossEntropy, Targets::Classes(t)) => {
            cross_entropy_with(logits, t, cfg.label_smoothing, class_weights.as_deref())
        }
        (LossKind::BinaryCrossEntropy, Targets::Multi(t)) => {
            binary_cross_entropy_with_logits(logits, t, pos_weight.as_deref())
        }
        (LossKind::Focal, Targets::Classes(t)) => {
            if cfg.focal_alpha.is_some() {
                return Err(config_err(
                    "`focal_alpha` applies only to multi-label targets; \
                     for class ids give a per-class alpha as `class_weights`",
                ));
            }
            focal_multiclass(logits, t, cfg.focal_gamma, class_weights.as_deref())
        }
        (LossKind::Focal, Targets::Multi(t)) => {
            if cfg.class_weights.is_some() {
                return Err(config_err(
                    "`class_weights` does not apply to focal loss on multi-label targets; \
                     use `focal_alpha`",
                ));
            }
            focal_binary(logits, t, cfg.focal_gamma, cfg.focal_alpha)
        }
        (LossKind::Mse, Targets::Values(t)) => mse(logits, t),
        (LossKind::SmoothL1, Targets::Values(t)) => smooth_l1(logits, t, cfg.smooth_l1_beta),
        (LossKind::Huber, Targets::Values(t)) => huber(logits, t, cfg.huber_delta),
        (kind, t) => Err(config_err(format!(
            "`{kind}` does not fit {} targets; for these use {}",
            t.describe(),
            t.fitting_kinds()
        ))),
    }
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// `x` itself for f32/f64, else `x` converted to f32 (differentiably).
fn upcast(x: &Tensor) -> Result<Tensor> {
    Ok(match x.dtype() {
        DType::F32 | DType::F64 => x.clone(),
        _ => x.to_dtype(DType::F32)?,
    })
}

/// A detached 0/1 mask in `like`'s dtype from a comparison result.
fn mask(cmp: Tensor, like: &Tensor) -> Result<Tensor> {
    Ok(cmp.to_dtype(like.dtype())?.detach())
}

/// `sign(x)` as a constant (detached) tensor, with `sign(0) = 0`.
fn sign(x: &Tensor) -> Result<Tensor> {
    let pos = mask(x.gt(0.0)?, x)?;
    let neg = mask(x.lt(0.0)?, x)?;
    Ok((pos - neg)?)
}

/// `|x|` with gradient `sign(x)` (0 at 0, as in PyTorch).
fn abs(x: &Tensor) -> Result<Tensor> {
    Ok((x * sign(x)?)?)
}

/// `sp(x) = log(1 + eˣ)`, stably: `max(x, 0) + log(1 + e^{-|x|})`, the branch chosen by a
/// constant mask so that the gradient is exactly `σ(x)` everywhere (also at `x = 0`).
fn softplus(x: &Tensor) -> Result<Tensor> {
    let nonneg = mask(x.ge(0.0)?, x)?;
    let s = nonneg.affine(2.0, -1.0)?; // +1 for x ≥ 0, -1 for x < 0
    let relu = (x * &nonneg)?;
    let mag = (x * s)?;
    Ok((relu + mag.neg()?.exp()?.affine(1.0, 1.0)?.log()?)?)
}

/// `q^γ` for `q ≥ 0`, without NaN gradients at `q = 0`: `1` for `γ = 0`, exact products for
/// `γ ∈ {1, 2}`, else `exp(γ · log(max(q, 1e-30)))` (the clamp is a `where`, so no gradient
/// flows into the clamped entries).
fn pow_gamma(q: &Tensor, gamma: f64) -> Result<Tensor> {
    if gamma == 0.0 {
        return Ok(q.ones_like()?.detach());
    }
    if gamma == 1.0 {
        return Ok(q.clone());
    }
    if gamma == 2.0 {
        return Ok(q.sqr()?);
    }
    const TINY: f64 = 1e-30;
    let keep = q.gt(TINY)?;
    let floor = q.ones_like()?.affine(TINY, 0.0)?.detach();
    let q = keep.where_cond(q, &floor)?;
    Ok(q.log()?.affine(gamma, 0.0)?.exp()?)
}

/// A `(len,)` tensor of per-class weights in `like`'s dtype and device; its length must be
/// the size of `like`'s last dimension.
fn weight_vec(w: &[f32], key: &str, like: &Tensor) -> Result<Tensor> {
    let c = like.dim(D::Minus1)?;
    if w.len() != c {
        return Err(config_err(format!(
            "`{key}` has {} entries but the model has {c} outputs",
            w.len()
        )));
    }
    Ok(Tensor::from_slice(w, c, like.device())?.to_dtype(like.dtype())?)
}

/// `(N, C)` one-hot of class ids `targets` `(N,)`, in `like`'s dtype.
fn one_hot(targets: &Tensor, like: &Tensor) -> Result<Tensor> {
    let c = like.dim(D::Minus1)?;
    let classes = Tensor::arange(0u32, c as u32, like.device())?.unsqueeze(0)?;
    let oh = classes.broadcast_eq(&targets.unsqueeze(1)?)?;
    mask(oh, like)
}

// ---------------------------------------------------------------------------------------
// Classification
// ---------------------------------------------------------------------------------------

/// Mean cross-entropy of `logits` `(N, C)` against class ids `targets` `(N,)` (u32):
///
/// `L = -(1/N) Σᵢ log softmax(zᵢ)[yᵢ]`
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    cross_entropy_with(logits, targets, 0.0, None)
}

/// Cross-entropy with label smoothing `ε` and class weights `w` (length `C`), exactly as
/// `torch.nn.functional.cross_entropy(logits, targets, weight=w, label_smoothing=ε)`.
///
/// With `ℓᵢc = log softmax(zᵢ)[c]`:
///
/// - no weights: `L = (1-ε) · (1/N) Σᵢ -ℓᵢ,yᵢ + (ε/C) · (1/N) Σᵢ Σ_c -ℓᵢc`
/// - weights: `L = (1-ε) · Σᵢ -w_yᵢ ℓᵢ,yᵢ / Σᵢ w_yᵢ + (ε/C) · Σᵢ Σ_c -w_c ℓᵢc / Σᵢ w_yᵢ`
///
/// (the smoothing term is normalised by `Σᵢ w_yᵢ`, as PyTorch does). `ε` must lie in
/// `[0, 1]` and `class_weights` must have `C` entries, else [`Error::Config`].
pub fn cross_entropy_with(
    logits: &Tensor,
    targets: &Tensor,
    label_smoothing: f64,
    class_weights: Option<&[f32]>,
) -> Result<Tensor> {
    let eps = label_smoothing;
    if !(0.0..=1.0).contains(&eps) {
        return Err(config_err(format!(
            "`label_smoothing` must be in [0, 1], got {eps}"
        )));
    }
    let logits = upcast(logits)?;
    let c = logits.dim(D::Minus1)? as f64;
    let targets = targets.to_dtype(DType::U32)?;
    let logp = log_softmax_last(&logits)?;
    let nll = logp
        .gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)?
        .neg()?; // (N,)
    match class_weights {
        None => {
            let nll = nll.mean_all()?;
            if eps == 0.0 {
                return Ok(nll);
            }
            let smooth = logp.sum(D::Minus1)?.neg()?.mean_all()?;
            Ok((nll.affine(1.0 - eps, 0.0)? + smooth.affine(eps / c, 0.0)?)?)
        }
        Some(w) => {
            let w = weight_vec(w, "class_weights", &logits)?; // (C,)
            let w_y = w.index_select(&targets, 0)?; // (N,)
            let denom = w_y.sum_all()?;
            let nll = ((nll * &w_y)?.sum_all()? / &denom)?;
            if eps == 0.0 {
                return Ok(nll);
            }
            let smooth = (logp.broadcast_mul(&w.unsqueeze(0)?)?.sum_all()?.neg()? / &denom)?;
            Ok((nll.affine(1.0 - eps, 0.0)? + smooth.affine(eps / c, 0.0)?)?)
        }
    }
}

/// Binary cross-entropy on logits, as
/// `torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, pos_weight=p)`:
///
/// `L = mean over i, c of [ p_c · y_ic · sp(-z_ic) + (1 - y_ic) · sp(z_ic) ]`
///
/// (`sp(-z) = -log σ(z)`, `sp(z) = -log(1 - σ(z))`; `p_c = 1` without `pos_weight`). The
/// softplus is evaluated as `max(x, 0) + log(1 + e^{-|x|})`, finite for any `|z|` (e.g. 100).
/// `logits` and `targets` have the same shape `(N, C)`; `pos_weight` has `C` entries.
pub fn binary_cross_entropy_with_logits(
    logits: &Tensor,
    targets: &Tensor,
    pos_weight: Option<&[f32]>,
) -> Result<Tensor> {
    let x = upcast(logits)?;
    let y = targets.to_dtype(x.dtype())?;
    let pos = (&y * softplus(&x.neg()?)?)?;
    let pos = match pos_weight {
        None => pos,
        Some(p) => pos.broadcast_mul(&weight_vec(p, "pos_weight", &x)?)?,
    };
    let neg = (y.affine(-1.0, 1.0)? * softplus(&x)?)?;
    Ok((pos + neg)?.mean_all()?)
}

/// Softmax focal loss over class ids `targets` `(N,)` (u32):
///
/// `FL = (1/N) Σᵢ -α_yᵢ (1 - p_i)^γ log p_i`, with `p_i = softmax(zᵢ)[yᵢ]`
///
/// and `α_c = alpha[c]` (`1` when `alpha` is `None`). The mean is a plain mean over `N`
/// (unlike weighted cross-entropy, it is not divided by `Σ α_yᵢ`); `γ = 0` without `alpha`
/// is exactly [`cross_entropy`]. `1 - p_i` is computed as `Σ_{c≠yᵢ} softmax(zᵢ)[c]` (no
/// cancellation when `p_i → 1`) and the power as in `q^γ = exp(γ log max(q, 1e-30))` for
/// non-integer `γ`, so the gradient stays finite when `p_i = 1` and `γ < 1`.
pub fn focal_multiclass(
    logits: &Tensor,
    targets: &Tensor,
    gamma: f64,
    alpha: Option<&[f32]>,
) -> Result<Tensor> {
    if !(gamma.is_finite() && gamma >= 0.0) {
        return Err(config_err(format!(
            "`focal_gamma` must be non-negative, got {gamma}"
        )));
    }
    let logits = upcast(logits)?;
    let targets = targets.to_dtype(DType::U32)?;
    let logp_all = log_softmax_last(&logits)?;
    let logp = logp_all
        .gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)?; // (N,)
    let others = one_hot(&targets, &logits)?.affine(-1.0, 1.0)?;
    let q = (logp_all.exp()? * others)?.sum(D::Minus1)?; // 1 - p, (N,)
    let fl = (pow_gamma(&q, gamma)? * logp)?.neg()?;
    let fl = match alpha {
        None => fl,
        Some(a) => {
            let a = weight_vec(a, "class_weights", &logits)?;
            (fl * a.index_select(&targets, 0)?)?
        }
    };
    Ok(fl.mean_all()?)
}

/// Sigmoid focal loss over multi-label targets `(N, C)` (0/1), as
/// `torchvision.ops.sigmoid_focal_loss(logits, targets, alpha, gamma, reduction="mean")`:
///
/// `FL = mean over i, c of [ α_t · BCE(z, y) · (1 - p_t)^γ ]`, with `p = σ(z)`,
/// `p_t = p·y + (1-p)(1-y)`, `α_t = α·y + (1-α)(1-y)` (`α_t = 1` when `alpha` is `None`)
///
/// and `BCE(z, y) = y·sp(-z) + (1-y)·sp(z)`. `p` and `1-p` are taken as `e^{-sp(-z)}` and
/// `e^{-sp(z)}`, and `1 - p_t` as `p(1-y) + (1-p)y`, so nothing overflows or cancels.
pub fn focal_binary(
    logits: &Tensor,
    targets: &Tensor,
    gamma: f64,
    alpha: Option<f64>,
) -> Result<Tensor> {
    if !(gamma.is_finite() && gamma >= 0.0) {
        return Err(config_err(format!(
            "`focal_gamma` must be non-negative, got {gamma}"
        )));
    }
    let x = upcast(logits)?;
    let y = targets.to_dtype(x.dtype())?;
    let one_minus_y = y.affine(-1.0, 1.0)?;
    let sp_neg = softplus(&x.neg()?)?; // -log p
    let sp_pos = softplus(&x)?; // -log(1 - p)
    let bce = ((&y * &sp_neg)? + (&one_minus_y * &sp_pos)?)?;
    let p = sp_neg.neg()?.exp()?;
    let one_minus_p = sp_pos.neg()?.exp()?;
    let one_minus_pt = ((p * &one_minus_y)? + (one_minus_p * &y)?)?;
    let fl = (bce * pow_gamma(&one_minus_pt, gamma)?)?;
    let fl = match alpha {
        None => fl,
        Some(a) => {
            if !(0.0..=1.0).contains(&a) {
                return Err(config_err(format!(
                    "`focal_alpha` must be in [0, 1], got {a}"
                )));
            }
            (fl * y.affine(2.0 * a - 1.0, 1.0 - a)?)?
        }
    };
    Ok(fl.mean_all()?)
}

// ---------------------------------------------------------------------------------------
// Regression
// ---------------------------------------------------------------------------------------

/// Mean squared error, as `torch.nn.functional.mse_loss`:
///
/// `L = mean over elements of (pred - target)²`
pub fn mse(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    let pred = upcast(pred)?;
    let d = (&pred - target.to_dtype(pred.dtype())?)?;
    Ok(d.sqr()?.mean_all()?)
}

/// Smooth L1 loss, as `torch.nn.functional.smooth_l1_loss(pred, target, beta=β)`; with
/// `d = pred - target`:
///
/// `ℓ(d) = 0.5 d² / β` if `|d| < β`, else `|d| - 0.5 β`;  `L = mean ℓ(d)`
///
/// `β = 0` gives the L1 loss `mean |d|`; `β < 0` is an [`Error::Config`].
pub fn smooth_l1(pred: &Tensor, target: &Tensor, beta: f64) -> Result<Tensor> {
    if !(beta.is_finite() && beta >= 0.0) {
        return Err(config_err(format!(
            "`smooth_l1_beta` must be non-negative, got {beta}"
        )));
    }
    let pred = upcast(pred)?;
    let d = (&pred - target.to_dtype(pred.dtype())?)?;
    let a = abs(&d)?;
    if beta == 0.0 {
        return Ok(a.mean_all()?);
    }
    let quad = d.sqr()?.affine(0.5 / beta, 0.0)?;
    let lin = a.affine(1.0, -0.5 * beta)?;
    let inner = a.detach().lt(beta)?;
    Ok(inner.where_cond(&quad, &lin)?.mean_all()?)
}

/// Huber loss, as `torch.nn.functional.huber_loss(pred, target, delta=δ)`; with
/// `d = pred - target`:
///
/// `ℓ(d) = 0.5 d²` if `|d| < δ`, else `δ (|d| - 0.5 δ)`;  `L = mean ℓ(d)`
///
/// (`huber(δ) = δ · smooth_l1(β = δ)`). `δ ≤ 0` is an [`Error::Config`].
pub fn huber(pred: &Tensor, target: &Tensor, delta: f64) -> Result<Tensor> {
    if !(delta.is_finite() && delta > 0.0) {
        return Err(config_err(format!(
            "`huber_delta` must be positive, got {delta}"
        )));
    }
    let pred = upcast(pred)?;
    let d = (&pred - target.to_dtype(pred.dtype())?)?;
    let a = abs(&d)?;
    let quad = d.sqr()?.affine(0.5, 0.0)?;
    let lin = a.affine(delta, -0.5 * delta * delta)?;
    let inner = a.detach().lt(delta)?;
    Ok(inner.where_cond(&quad, &lin)?.mean_all()?)
}

// ---------------------------------------------------------------------------------------
// Weight penalties
// ---------------------------------------------------------------------------------------

fn penalty(weights: &[Tensor], f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let Some(first) = weights.first() else {
        return Ok(Tensor::new(0f32, &candle_core::Device::Cpu)?);
    };
    let dtype = upcast(first)?.dtype();
    let mut total: Option<Tensor> = None;
    for w in weights {
        let s = f(&w.to_dtype(dtype)?)?.sum_all()?;
        total = Some(match total {
            None => s,
            Some(t) => (t + s)?,
        });
    }
    Ok(total.expect("weights is non-empty"))
}

/// L1 penalty `Σ_tensors Σ_elements |w|`, a scalar; its gradient is `sign(w)` (0 at 0).
/// Computed in the first tensor's dtype (f32 for half precision); an empty slice gives a
/// CPU f32 zero.
pub fn l1_penalty(weights: &[Tensor]) -> Result<Tensor> {
    penalty(weights, abs)
}

/// L2 penalty `Σ_tensors Σ_elements w²`, a scalar; its gradient is `2w`. Computed in the
/// first tensor's dtype (f32 for half precision); an empty slice gives a CPU f32 zero.
pub fn l2_penalty(weights: &[Tensor]) -> Result<Tensor> {
    penalty(weights, |w| Ok(w.sqr()?))
}

/// The label of a position the causal-LM loss does not count (transformers' `-100`).
pub const IGNORE_INDEX: i64 = -100;

// The causal language model's next-token loss (`Targets::Tokens`): a fused token-level
// cross-entropy that never materialises the log-probabilities.

/// The next-token targets of labels `(batch, seq)`: row `b·seq + t` gets label
/// `(b, t + 1)`, the last position of each sequence [`IGNORE_INDEX`].
pub fn shifted_targets(labels: &Tensor) -> Result<Vec<i64>> {
    let (b, s) = labels.dims2()?;
    let l = labels.flatten_all()?.to_vec1::<i64>()?;
    let mut t = vec![IGNORE_INDEX; b * s];
    for r in 0..b {
        t[r * s..r * s + s - 1].copy_from_slice(&l[r * s + 1..r * s + s]);
    }
    Ok(t)
}

/// The negative log-likelihood of class `t` under logits `z`: `logsumexp(z) − z[t]`.
#[inline]
pub fn row_nll(z: &[f32], t: usize) -> f32 {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = z.iter().map(|&v| (v - max).exp()).sum();
    sum.ln() + max - z[t]
}

/// Checks that every counted target is a class of `vocab`.
pub fn check_targets(targets: &[i64], vocab: usize) -> Result<usize> {
    let mut n = 0;
    for &t in targets {
        if t == IGNORE_INDEX {
            continue;
        }
        if t < 0 || t as usize >= vocab {
            return Err(Error::Msg(format!(
                "token id {t} is outside the model's vocabulary of {vocab}: the tokenizer \
                 and the model do not match"
            )));
        }
        n += 1;
    }
    Ok(n)
}

/// The causal-LM loss of `logits` `(batch·seq, vocab)` against `labels` `(batch, seq)`
/// (i64, [`IGNORE_INDEX`] where not counted): the mean over counted positions of the
/// cross-entropy of row `b·seq + t` against label `(b, t + 1)`. Differentiable in
/// `logits`, fused (see the module documentation). No counted token gives 0.
pub fn lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let targets = shifted_targets(labels)?;
    let (rows, vocab) = logits.dims2()?;
    if rows != targets.len() {
        return Err(Error::Msg(format!(
            "internal: {rows} rows of logits for {} labels",
            targets.len()
        )));
    }
    let count = check_targets(&targets, vocab)?;
    if count == 0 {
        return Ok(logits.sum_all()?.affine(0.0, 0.0)?);
    }
    let logits = logits.to_dtype(candle_core::DType::F32)?.contiguous()?;
    if !logits.device().is_cpu() {
        return lm_loss_composed(&logits, labels);
    }
    Ok(logits.apply_op1(TokenNll { targets, count })?)
}

/// [`lm_loss`] of the language-model head `h · wᵀ` (`h` the final hidden rows `(batch·seq,
/// hidden)`, `w` the head `(vocab, hidden)`) without its logits: the head and the loss run
/// as one operation over the counted rows only ([`crate::kernels::lm_head`]), so neither
/// the `(tokens, vocab)` logits nor their gradient exist, and a frozen `w` costs no GEMM.
/// Differentiable in `h` and `w`.
pub fn lm_head_loss(h: &Tensor, w: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let targets = shifted_targets(labels)?;
    let rows = h.dim(0)?;
    if rows != targets.len() {
        return Err(Error::Msg(format!(
            "internal: {rows} hidden rows for {} labels",
            targets.len()
        )));
    }
    let count = check_targets(&targets, w.dim(0)?)?;
    if count == 0 || !crate::kernels::par::fusable(&[h, w]) {
        return lm_loss(&h.matmul(&w.t()?)?, labels);
    }
    let counted = targets
        .iter()
        .enumerate()
        .filter(|&(_, &t)| t != IGNORE_INDEX)
        .map(|(r, &t)| (r, t as u32))
        .collect();
    crate::kernels::lm_head::nll(h, w, counted)
}

/// The reference composition of [`lm_loss`] from candle's differentiable operations
/// (log-softmax, gather, mask), for tests and non-CPU devices.
pub fn lm_loss_composed(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let targets = shifted_targets(labels)?;
    let count = check_targets(&targets, logits.dim(1)?)?;
    if count == 0 {
        return Ok(logits.sum_all()?.affine(0.0, 0.0)?);
    }
    let dev = logits.device();
    let idx: Vec<u32> = targets.iter().map(|&t| t.max(0) as u32).collect();
    let mask: Vec<f32> = targets
        .iter()
        .map(|&t| if t == IGNORE_INDEX { 0.0 } else { 1.0 })
        .collect();
    let n = targets.len();
    let lp = crate::kernels::fused::log_softmax_last(logits)?;
    let picked = lp
        .gather(&Tensor::from_vec(idx, (n, 1), dev)?, 1)?
        .squeeze(1)?;
    let m = Tensor::from_vec(mask, n, dev)?;
    Ok((picked.mul(&m)?.sum_all()?.neg()? / count as f64)?)
}

/// The fused token cross-entropy (see [`lm_loss`]).
struct TokenNll {
    targets: Vec<i64>,
    count: usize,
}

/// Rows per parallel part.
const NLL_ROWS: usize = 16;

impl CustomOp1 for TokenNll {
    fn name(&self) -> &'static str {
        "ferrotune-token-nll"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let z = crate::kernels::par::f32_data(s, l)?;
        let v = l.dims()[1];
        let n = self.targets.len();
        let mut per = vec![0f32; n];
        let o = Out::new(&mut per);
        par_for(n.div_ceil(NLL_ROWS), n * v >= PAR_MIN, |i| {
            // Safety: part i is written by this task only.
            let part = unsafe { o.part(i * NLL_ROWS, NLL_ROWS) };
            for (k, slot) in part.iter_mut().enumerate() {
                let r = i * NLL_ROWS + k;
                let t = self.targets[r];
                *slot = if t == IGNORE_INDEX {
                    0.0
                } else {
                    row_nll(&z[r * v..(r + 1) * v], t as usize)
                };
            }
        });
        let total: f64 = per.iter().map(|&x| x as f64).sum();
        Ok((
            CpuStorage::F32(vec![(total / self.count as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = grad.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()? / self.count as f32;
        let (n, v) = x.dims2()?;
        let dx = with_f32(x, |z| {
            let mut dx = vec![0f32; n * v];
            let o = Out::new(&mut dx);
            par_for(n.div_ceil(NLL_ROWS), n * v >= PAR_MIN, |i| {
                // Safety: rows of part i are written by this task only.
                let part = unsafe { o.part(i * NLL_ROWS * v, NLL_ROWS * v) };
                for (k, d) in part.chunks_mut(v).enumerate() {
                    let r = i * NLL_ROWS + k;
                    let t = self.targets[r];
                    if t == IGNORE_INDEX {
                        continue; // already 0
                    }
                    let zr = &z[r * v..(r + 1) * v];
                    let max = zr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for (d, &zv) in d.iter_mut().zip(zr) {
                        let e = (zv - max).exp();
                        *d = e;
                        sum += e;
                    }
                    let scale = g / sum;
                    d.iter_mut().for_each(|d| *d *= scale);
                    d[t as usize] -= g;
                }
            });
            dx
        })?;
        Ok(Some(Tensor::from_vec(dx, (n, v), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn cross_entropy_value_and_gradient() {
        // Reference: torch.nn.functional.cross_entropy on the same numbers.
        // z = [[1, 2, 3], [1, -1, 0]], y = [2, 0]
        let z = Var::from_vec(vec![1f32, 2., 3., 1., -1., 0.], (2, 3), &Device::Cpu).unwrap();
        let y = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
        let l = cross_entropy(z.as_tensor(), &y).unwrap();
        let v = l.to_scalar::<f32>().unwrap();
        // log-sum-exp(1,2,3) = 3.40760596; lse(1,-1,0) = 1.40760596
        let expect = ((3.407_605_964_4 - 3.0) + (1.407_605_964_4 - 1.0)) / 2.0;
        assert!((v as f64 - expect).abs() < 1e-6, "{v} vs {expect}");
        let g = l.backward().unwrap();
        let g = g.get(z.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        // d/dz = (softmax(z) - onehot(y)) / N
        let sm0 = [0.090_030_57, 0.244_728_47, 0.665_240_96];
        let sm1 = [0.665_240_96, 0.090_030_57, 0.244_728_47];
        let want = [
            [sm0[0] / 2., sm0[1] / 2., (sm0[2] - 1.) / 2.],
            [(sm1[0] - 1.) / 2., sm1[1] / 2., sm1[2] / 2.],
        ];
        for r in 0..2 {
            for c in 0..3 {
                assert!((g[r][c] as f64 - want[r][c]).abs() < 1e-6);
            }
        }
    }
    // Inputs shared with `loss_reference.py` (keep them identical).
    const Z: [[f64; 3]; 5] = [
        [1.0, 2.0, 3.0],
        [1.0, -1.0, 0.0],
        [30.0, -30.0, 0.5],
        [-20.0, 25.0, 0.0],
        [0.5, 0.5, -0.25],
    ];
    const Y: [u32; 5] = [2, 0, 1, 1, 0];
    const CLASS_W: [f32; 3] = [0.25, 1.0, 2.5];
    const X: [[f64; 3]; 5] = [
        [0.5, -1.0, 2.0],
        [100.0, -100.0, 0.0],
        [-30.0, 30.0, 0.25],
        [1.5, -0.75, -2.0],
        [0.0, 3.0, -3.0],
    ];
    const YM: [[f64; 3]; 5] = [
        [1.0, 0.0, 1.0],
        [0.0, 1.0, 1.0],
        [1.0, 1.0, 0.0],
        [0.0, 0.0, 1.0],
        [1.0, 0.0, 0.0],
    ];
    const POS_W: [f32; 3] = [3.0, 0.5, 1.0];
    const P: [[f64; 2]; 4] = [[0.1, 2.0], [-1.5, 0.3], [3.0, -0.7], [0.0, 1.2]];
    const T: [[f64; 2]; 4] = [[0.0, 0.0], [0.0, 0.3], [0.5, 0.2], [-0.6, -1.0]];

    /// `(case, loss, d loss / d input flattened row-major)`. These numbers come from
    /// `crates/ferrotune/src/train/loss_reference.py` (PyTorch, float64); regenerate them
    /// with `/root/.cache/ferrotune/torch-venv/bin/python
    /// crates/ferrotune/src/train/loss_reference.py`.
    #[rustfmt::skip]
    const REFERENCE: &[(&str, f64, &[f64])] = &[
        ("ce_plain", 12.344077547871748, &[0.018006114634076087, 0.04894569421095953, -0.06695180884503564, -0.06695180884503564, 0.018006114634076087, 0.04894569421095953, 0.19999999999996915, -0.2, 3.0856224063833046e-14, 5.72503716101926e-21, -2.777600371928202e-12, 2.7775887729542303e-12, -0.11910584626771142, 0.08089415373228859, 0.03821169253542285]),
        ("ce_smooth", 12.252410881205083, &[0.011339447967409419, 0.04227902754429286, -0.053618475511702304, -0.05361847551170232, 0.011339447967409417, 0.04227902754429285, 0.19333333333330244, -0.18666666666666665, -0.00666666666663581, -0.006666666666666666, 0.013333333330555707, -0.006666666663889077, -0.10577251293437809, 0.07422748706562189, 0.031545025868756175]),
        ("ce_weighted", 12.269442070970015, &[0.04501528658519022, 0.12236423552739882, -0.1673795221125891, -0.01673795221125891, 0.004501528658519022, 0.012236423552739883, 0.19999999999996915, -0.2, 3.0856224063833046e-14, 5.72503716101926e-21, -2.777600371928202e-12, 2.7775887729542303e-12, -0.029776461566927856, 0.020223538433072147, 0.009552923133855713]),
        ("ce_weighted_smooth", 12.521340890690317, &[0.041097855589264036, 0.10957935708436221, -0.1506772126736263, -9.979976242914171e-05, -0.00036452654474003644, 0.0004643263071691667, 0.2033333333333017, -0.18666666666666665, -0.01666666666663504, -0.0016666666666666666, 0.0183333333304863, -0.01666666666381964, -0.018353712860365662, 0.021646287139634332, -0.003292574279268671]),
        ("bce_plain", 16.029259164135222, &[-0.02516937791987636, 0.017929428091333008, -0.00794686146814118, 0.06666666666666667, -0.06666666666666667, -0.03333333333333333, -0.06666666666666042, -6.232051911562545e-15, 0.03747843339238654, 0.054504965079576244, 0.021388086721640467, -0.058719805198525495, -0.03333333333333333, 0.06350494178816223, 0.003161724878504452]),
        ("bce_pos_weight", 16.851555719433904, &[-0.07550813375962907, 0.017929428091333008, -0.00794686146814118, 0.06666666666666667, -0.03333333333333333, -0.03333333333333333, -0.19999999999998128, -3.1160259557812727e-15, 0.03747843339238654, 0.054504965079576244, 0.021388086721640467, -0.058719805198525495, -0.1, 0.06350494178816223, 0.003161724878504452]),
        ("focal_g0", 12.34407754787175, &[0.018006114634076087, 0.04894569421095953, -0.06695180884503564, -0.06695180884503564, 0.018006114634076087, 0.04894569421095953, 0.19999999999996915, -0.2, 3.0856224063833046e-14, 5.72503716101926e-21, -2.777600371928202e-12, 2.7775887729542303e-12, -0.11910584626771142, 0.08089415373228859, 0.03821169253542285]),
        ("focal_g0_alpha", 12.269442070970015, &[0.04501528658519022, 0.12236423552739882, -0.1673795221125891, -0.01673795221125891, 0.004501528658519022, 0.012236423552739883, 0.19999999999996915, -0.2, 3.0856224063833046e-14, 5.72503716101926e-21, -2.777600371928202e-12, 2.7775887729542303e-12, -0.029776461566927856, 0.020223538433072147, 0.009552923133855713]),
        ("focal_g05", 12.23403947224746, &[0.014637372340156933, 0.03978850324863765, -0.05442587558879461, -0.05442587558879461, 0.014637372340156933, 0.03978850324863765, 0.19999999999996915, -0.2, 3.0856224063833046e-14, 3.200290866462674e-26, -1.5526762274120453e-17, 1.552669743595536e-17, -0.12016808405607736, 0.0816156030116059, 0.03855248104447146]),
        ("focal_g2", 12.082476156834478, &[0.005286731849339716, 0.014370827117995835, -0.01965755896733556, -0.01965755896733556, 0.005286731849339716, 0.014370827117995835, 0.19999999999996915, -0.2, 3.0856224063833046e-14, 3.312677032773661e-42, -1.6072023114470012e-33, 1.607195599935163e-33, -0.09417961322975758, 0.06396478720222838, 0.030214826027529198]),
        ("focal_g2_alpha", 12.04117404874419, &[0.013216829623349287, 0.03592706779498958, -0.04914389741833889, -0.00491438974183389, 0.001321682962334929, 0.0035927067794989586, 0.19999999999996915, -0.2, 3.0856224063833046e-14, 3.312677032773661e-42, -1.6072023114470012e-33, 1.607195599935163e-33, -0.023544903307439396, 0.015991196800557095, 0.0075537065068822995]),
        ("focal_bin_g2_a025", 7.412459040031589, &[-0.0022989499558485733, 0.0026290564988780303, -8.118233658987964e-05, 0.05, -0.016666666666666666, -0.004971446585666438, -0.016666666666755564, -4.087262207108356e-41, 0.020312170650101366, 0.04807123437351801, 0.004355483101439433, -0.01794522884080803, -0.004971446585666438, 0.05633749403174441, 1.574359232441405e-05]),
        ("focal_bin_g05_noalpha", 15.922452538402906, &[-0.021509102190406186, 0.013256954786641236, -0.004030351120643587, 0.06666666666666667, -0.06666666666666667, -0.03173904390178948, -0.06666666666675088, -2.8591126876258343e-21, 0.03713853324510374, 0.05863816559022603, 0.0170753465767809, -0.06304052007485282, -0.03173904390178948, 0.06668448932303261, 0.001024520201713423]),
        ("mse", 2.315, &[0.025, 0.5, -0.375, 0.0, 0.625, -0.22499999999999998, 0.15, 0.55]),
        ("smooth_l1_b1", 0.84875, &[0.0125, 0.125, -0.125, 0.0, 0.125, -0.11249999999999999, 0.075, 0.125]),
        ("smooth_l1_b05", 1.02625, &[0.025, 0.125, -0.125, 0.0, 0.125, -0.125, 0.125, 0.125]),
        ("smooth_l1_b0", 1.225, &[0.125, 0.125, -0.125, 0.0, 0.125, -0.125, 0.125, 0.125]),
        ("huber_d1", 0.84875, &[0.0125, 0.125, -0.125, 0.0, 0.125, -0.11249999999999999, 0.075, 0.125]),
        ("huber_d2", 1.139375, &[0.0125, 0.25, -0.1875, 0.0, 0.25, -0.11249999999999999, 0.075, 0.25]),
        ("l1_penalty", 6.75, &[1.0, -1.0, 0.0, 1.0, -1.0, 1.0, 0.0]),
        ("l2_penalty", 14.3125, &[1.0, -2.0, 0.0, 4.0, -0.5, 6.0, 0.0]),
    ];

    fn reference(name: &str) -> (f64, &'static [f64]) {
        let (_, l, g) = REFERENCE
            .iter()
            .find(|(n, _, _)| *n == name)
            .unwrap_or_else(|| panic!("no reference case {name}"));
        (*l, g)
    }

    fn tensor<const R: usize, const C: usize>(rows: &[[f64; C]; R], dtype: DType) -> Tensor {
        let flat: Vec<f64> = rows.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (R, C), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn classes() -> Tensor {
        Tensor::new(&Y, &Device::Cpu).unwrap()
    }

    fn to_f64_vec(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    }

    /// Evaluates `f` at `input` (as a `Var`) in f32 and in f64 and compares the loss and
    /// its gradient with reference case `name`: within 1e-5 in f32, 1e-9 in f64.
    fn check<const R: usize, const C: usize>(
        name: &str,
        input: &[[f64; C]; R],
        f: impl Fn(&Tensor) -> Result<Tensor>,
    ) {
        let (want_loss, want_grad) = reference(name);
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-9)] {
            let v = Var::from_tensor(&tensor(input, dtype)).unwrap();
            let loss = f(v.as_tensor()).unwrap();
            assert_eq!(loss.dims(), &[] as &[usize], "{name}: loss is not a scalar");
            assert_eq!(loss.dtype(), dtype, "{name}");
            let got = to_f64_vec(&loss)[0];
            assert!(
                (got - want_loss).abs() < tol,
                "{name} ({dtype:?}): loss {got} vs torch {want_loss}"
            );
            let grads = loss.backward().unwrap();
            let g = to_f64_vec(grads.get(v.as_tensor()).expect("no gradient"));
            assert_eq!(g.len(), want_grad.len(), "{name}");
            for (i, (a, b)) in g.iter().zip(want_grad).enumerate() {
                assert!(
                    (a - b).abs() < tol,
                    "{name} ({dtype:?}): grad[{i}] {a} vs torch {b}"
                );
            }
        }
    }

    #[test]
    fn cross_entropy_plain_matches_torch() {
        check("ce_plain", &Z, |z| cross_entropy(z, &classes()));
        check("ce_plain", &Z, |z| {
            cross_entropy_with(z, &classes(), 0.0, None)
        });
    }

    #[test]
    fn cross_entropy_label_smoothing_matches_torch() {
        check("ce_smooth", &Z, |z| {
            cross_entropy_with(z, &classes(), 0.1, None)
        });
    }

    #[test]
    fn cross_entropy_class_weights_matches_torch() {
        check("ce_weighted", &Z, |z| {
            cross_entropy_with(z, &classes(), 0.0, Some(&CLASS_W))
        });
    }

    #[test]
    fn cross_entropy_weights_and_smoothing_matches_torch() {
        check("ce_weighted_smooth", &Z, |z| {
            cross_entropy_with(z, &classes(), 0.1, Some(&CLASS_W))
        });
    }

    #[test]
    fn bce_with_logits_matches_torch() {
        check("bce_plain", &X, |x| {
            binary_cross_entropy_with_logits(x, &tensor(&YM, DType::F32), None)
        });
    }

    #[test]
    fn bce_with_logits_pos_weight_matches_torch() {
        check("bce_pos_weight", &X, |x| {
            binary_cross_entropy_with_logits(x, &tensor(&YM, DType::F32), Some(&POS_W))
        });
    }

    #[test]
    fn bce_with_logits_is_finite_at_large_logits() {
        // Naive log(sigmoid) would give log(0) = -inf here, in f32 and f64.
        let x = Var::from_vec(vec![100f32, -100., 100., -100.], (1, 4), &Device::Cpu).unwrap();
        let y = Tensor::new(&[[1f32, 0., 0., 1.]], &Device::Cpu).unwrap();
        let l = binary_cross_entropy_with_logits(x.as_tensor(), &y, None).unwrap();
        let v = l.to_scalar::<f32>().unwrap();
        assert!((v - 50.0).abs() < 1e-5, "{v}");
        let g = l.backward().unwrap();
        let g = g.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        // d/dz = (σ(z) - y) / 4
        let want = [0.0, 0.0, 0.25, -0.25];
        for (a, b) in g[0].iter().zip(want) {
            assert!((a - b).abs() < 1e-7, "{g:?}");
        }
    }

    #[test]
    fn focal_multiclass_gamma0_equals_cross_entropy() {
        check("ce_plain", &Z, |z| {
            focal_multiclass(z, &classes(), 0.0, None)
        });
        check("focal_g0", &Z, |z| {
            focal_multiclass(z, &classes(), 0.0, None)
        });
    }

    #[test]
    fn focal_multiclass_matches_torch() {
        check("focal_g0_alpha", &Z, |z| {
            focal_multiclass(z, &classes(), 0.0, Some(&CLASS_W))
        });
        check("focal_g05", &Z, |z| {
            focal_multiclass(z, &classes(), 0.5, None)
        });
        check("focal_g2", &Z, |z| {
            focal_multiclass(z, &classes(), 2.0, None)
        });
        check("focal_g2_alpha", &Z, |z| {
            focal_multiclass(z, &classes(), 2.0, Some(&CLASS_W))
        });
    }

    #[test]
    fn focal_multiclass_gradient_has_no_nan_when_p_is_one() {
        // In f32, softmax([200, -200, 0])[0] is exactly 1, so 1 - p = 0: the gradient of
        // (1 - p)^γ at 0 is infinite for γ < 1 and must not turn into NaN.
        for gamma in [0.0, 0.25, 0.5, 1.0, 1.5, 2.0] {
            let z =
                Var::from_vec(vec![200f32, -200., 0., 2., 1., 0.], (2, 3), &Device::Cpu).unwrap();
            let y = Tensor::new(&[0u32, 0], &Device::Cpu).unwrap();
            let l = focal_multiclass(z.as_tensor(), &y, gamma, None).unwrap();
            assert!(l.to_scalar::<f32>().unwrap().is_finite(), "γ = {gamma}");
            let g = l.backward().unwrap();
            let g = g.get(z.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
            assert!(
                g.iter().flatten().all(|v| v.is_finite()),
                "γ = {gamma}: {g:?}"
            );
            // The saturated row contributes (almost) nothing.
            assert!(g[0].iter().all(|v| v.abs() < 1e-6), "γ = {gamma}: {g:?}");
        }
    }

    #[test]
    fn focal_binary_gradient_has_no_nan_when_saturated() {
        // In f32, σ(±200) is exactly 1 or 0, so 1 - p_t = 0 for the matching targets.
        for gamma in [0.0, 0.25, 0.5, 1.0, 2.0] {
            for alpha in [None, Some(0.25)] {
                let x =
                    Var::from_vec(vec![200f32, -200., 200., -200.], (2, 2), &Device::Cpu).unwrap();
                let y = Tensor::new(&[[1f32, 0.], [0., 1.]], &Device::Cpu).unwrap();
                let l = focal_binary(x.as_tensor(), &y, gamma, alpha).unwrap();
                assert!(l.to_scalar::<f32>().unwrap().is_finite(), "γ = {gamma}");
                let g = l.backward().unwrap();
                let g = g.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
                assert!(
                    g.iter().flatten().all(|v| v.is_finite()),
                    "γ = {gamma}: {g:?}"
                );
                // The correctly classified row contributes nothing.
                assert!(g[0].iter().all(|v| v.abs() < 1e-6), "γ = {gamma}: {g:?}");
            }
        }
    }

    #[test]
    fn focal_binary_matches_torchvision() {
        check("focal_bin_g2_a025", &X, |x| {
            focal_binary(x, &tensor(&YM, DType::F32), 2.0, Some(0.25))
        });
        check("focal_bin_g05_noalpha", &X, |x| {
            focal_binary(x, &tensor(&YM, DType::F32), 0.5, None)
        });
    }

    #[test]
    fn focal_binary_gamma0_without_alpha_equals_bce() {
        check("bce_plain", &X, |x| {
            focal_binary(x, &tensor(&YM, DType::F32), 0.0, None)
        });
    }

    #[test]
    fn mse_matches_torch() {
        check("mse", &P, |p| mse(p, &tensor(&T, p.dtype())));
    }

    #[test]
    fn smooth_l1_matches_torch() {
        let t = |p: &Tensor| tensor(&T, p.dtype());
        check("smooth_l1_b1", &P, |p| smooth_l1(p, &t(p), 1.0));
        check("smooth_l1_b05", &P, |p| smooth_l1(p, &t(p), 0.5));
        check("smooth_l1_b0", &P, |p| smooth_l1(p, &t(p), 0.0));
    }

    #[test]
    fn huber_matches_torch() {
        let t = |p: &Tensor| tensor(&T, p.dtype());
        check("huber_d1", &P, |p| huber(p, &t(p), 1.0));
        check("huber_d2", &P, |p| huber(p, &t(p), 2.0));
    }

    fn check_penalty(name: &str, f: fn(&[Tensor]) -> Result<Tensor>) {
        let (want_loss, want_grad) = reference(name);
        let dev = &Device::Cpu;
        let w1 = Var::from_vec(vec![0.5f32, -1.0, 0.0, 2.0], (2, 2), dev).unwrap();
        let w2 = Var::from_vec(vec![-0.25f32, 3.0, 0.0], 3, dev).unwrap();
        let l = f(&[w1.as_tensor().clone(), w2.as_tensor().clone()]).unwrap();
        let v = l.to_scalar::<f32>().unwrap() as f64;
        assert!((v - want_loss).abs() < 1e-5, "{name}: {v} vs {want_loss}");
        let g = l.backward().unwrap();
        let mut got = to_f64_vec(g.get(w1.as_tensor()).unwrap());
        got.extend(to_f64_vec(g.get(w2.as_tensor()).unwrap()));
        for (a, b) in got.iter().zip(want_grad) {
            assert!((a - b).abs() < 1e-6, "{name}: {got:?} vs {want_grad:?}");
        }
    }

    #[test]
    fn l1_penalty_value_and_sign_gradient() {
        check_penalty("l1_penalty", l1_penalty);
    }

    #[test]
    fn l2_penalty_value_and_2w_gradient() {
        check_penalty("l2_penalty", l2_penalty);
    }

    #[test]
    fn penalties_of_no_weights_are_zero() {
        assert_eq!(l1_penalty(&[]).unwrap().to_scalar::<f32>().unwrap(), 0.0);
        assert_eq!(l2_penalty(&[]).unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn compute_dispatches_each_kind() {
        let cw = Some(CLASS_W.iter().map(|&w| w as f64).collect::<Vec<_>>());
        let pw = Some(POS_W.iter().map(|&w| w as f64).collect::<Vec<_>>());
        let base = LossConfig::default();
        let cases: Vec<(&str, LossConfig, Targets, [[f64; 3]; 5])> = vec![
            ("ce_plain", base.clone(), Targets::Classes(classes()), Z),
            (
                "ce_weighted_smooth",
                LossConfig {
                    label_smoothing: 0.1,
                    class_weights: cw.clone(),
                    ..base.clone()
                },
                Targets::Classes(classes()),
                Z,
            ),
            (
                "bce_pos_weight",
                LossConfig {
                    kind: LossKind::BinaryCrossEntropy,
                    pos_weight: pw,
                    ..base.clone()
                },
                Targets::Multi(tensor(&YM, DType::F32)),
                X,
            ),
            (
                "focal_g2_alpha",
                LossConfig {
                    kind: LossKind::Focal,
                    class_weights: cw,
                    ..base.clone()
                },
                Targets::Classes(classes()),
                Z,
            ),
            (
                "focal_bin_g2_a025",
                LossConfig {
                    kind: LossKind::Focal,
                    focal_alpha: Some(0.25),
                    ..base.clone()
                },
                Targets::Multi(tensor(&YM, DType::F32)),
                X,
            ),
        ];
        for (name, cfg, targets, input) in cases {
            check(name, &input, |z| compute(&cfg, z, &targets));
        }
        let regression = [
            ("mse", LossKind::Mse, 1.0, 1.0),
            ("smooth_l1_b05", LossKind::SmoothL1, 0.5, 1.0),
            ("huber_d2", LossKind::Huber, 1.0, 2.0),
        ];
        for (name, kind, beta, delta) in regression {
            let cfg = LossConfig {
                kind,
                smooth_l1_beta: beta,
                huber_delta: delta,
                ..base.clone()
            };
            check(name, &P, |p| {
                compute(&cfg, p, &Targets::Values(tensor(&T, p.dtype())))
            });
        }
    }

    /// Mixed class targets (mixup, CutMix) give the cross-entropy against timm's blended
    /// soft targets, label smoothing included: `−Σ_c q_c log softmax(z)_c` with
    /// `q = λ·smooth(y) + (1 − λ)·smooth(y')`.
    #[test]
    fn mixed_targets_are_the_soft_target_cross_entropy() {
        let z = tensor(&Z, DType::F64);
        let y = classes();
        let y2 = y.flip(&[0]).unwrap();
        let (lam, eps) = (0.3, 0.1);
        let cfg = LossConfig {
            label_smoothing: eps,
            ..LossConfig::default()
        };
        let mixed = Targets::Mixed {
            a: Box::new(Targets::Classes(y.clone())),
            b: Box::new(Targets::Classes(y2.clone())),
            lam,
        };
        let got = compute(&cfg, &z, &mixed)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let (ya, yb) = (y.to_vec1::<u32>().unwrap(), y2.to_vec1::<u32>().unwrap());
        let mut want = 0.0;
        for (i, row) in Z.iter().enumerate() {
            let m = row.iter().cloned().fold(f64::MIN, f64::max);
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            for (c, v) in row.iter().enumerate() {
                let soft = |t: u32| (1.0 - eps) * f64::from(t == c as u32) + eps / 3.0;
                let q = lam * soft(ya[i]) + (1.0 - lam) * soft(yb[i]);
                want -= q * (v - lse);
            }
        }
        want /= Z.len() as f64;
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        let values = Targets::Mixed {
            a: Box::new(Targets::Values(z.clone())),
            b: Box::new(Targets::Values(z.clone())),
            lam,
        };
        assert!(compute(&LossConfig::default(), &z, &values).is_err());
    }

    fn config_error(cfg: &LossConfig, logits: &Tensor, targets: &Targets) -> String {
        match compute(cfg, logits, targets) {
            Err(Error::Config(msg)) => msg,
            other => panic!("expected a config error for {cfg:?}, got {other:?}"),
        }
    }

    #[test]
    fn compute_rejects_mismatched_targets() {
        let z = tensor(&Z, DType::F32);
        let classes = Targets::Classes(classes());
        let multi = Targets::Multi(tensor(&YM, DType::F32));
        let values = Targets::Values(tensor(&Z, DType::F32));
        let bad = [
            (LossKind::Mse, &classes),
            (LossKind::SmoothL1, &classes),
            (LossKind::Huber, &multi),
            (LossKind::CrossEntropy, &multi),
            (LossKind::CrossEntropy, &values),
            (LossKind::BinaryCrossEntropy, &classes),
            (LossKind::BinaryCrossEntropy, &values),
            (LossKind::Focal, &values),
        ];
        for (kind, targets) in bad {
            let cfg = LossConfig {
                kind,
                ..LossConfig::default()
            };
            let msg = config_error(&cfg, &z, targets);
            assert!(msg.starts_with("loss: "), "{msg}");
            assert!(msg.contains(kind.name()), "{msg}");
            let full = Error::Config(msg).to_string();
            assert!(full.contains("loss"), "{full}");
        }
    }

    #[test]
    fn compute_rejects_bad_options() {
        let z = tensor(&Z, DType::F32);
        let classes = Targets::Classes(classes());
        let multi = Targets::Multi(tensor(&YM, DType::F32));
        let base = LossConfig::default();
        let focal = LossConfig {
            kind: LossKind::Focal,
            ..base.clone()
        };
        let cases: Vec<(LossConfig, &Targets, &str)> = vec![
            (
                LossConfig {
                    label_smoothing: 1.5,
                    ..base.clone()
                },
                &classes,
                "label_smoothing",
            ),
            (
                LossConfig {
                    class_weights: Some(vec![1.0, 2.0]),
                    ..base.clone()
                },
                &classes,
                "class_weights",
            ),
            (
                LossConfig {
                    class_weights: Some(vec![1.0, -2.0, 1.0]),
                    ..base.clone()
                },
                &classes,
                "class_weights",
            ),
            (
                LossConfig {
                    kind: LossKind::BinaryCrossEntropy,
                    pos_weight: Some(vec![1.0; 4]),
                    ..base.clone()
                },
                &multi,
                "pos_weight",
            ),
            (
                LossConfig {
                    pos_weight: Some(vec![1.0; 3]),
                    ..base.clone()
                },
                &classes,
                "pos_weight",
            ),
            (
                LossConfig {
                    kind: LossKind::Mse,
                    label_smoothing: 0.1,
                    ..base.clone()
                },
                &classes,
                "label_smoothing",
            ),
            (
                LossConfig {
                    focal_gamma: -1.0,
                    ..focal.clone()
                },
                &classes,
                "focal_gamma",
            ),
            (
                LossConfig {
                    focal_alpha: Some(0.25),
                    ..focal.clone()
                },
                &classes,
                "focal_alpha",
            ),
            (
                LossConfig {
                    focal_alpha: Some(1.5),
                    ..focal.clone()
                },
                &multi,
                "focal_alpha",
            ),
            (
                LossConfig {
                    class_weights: Some(vec![1.0; 3]),
                    ..focal.clone()
                },
                &multi,
                "class_weights",
            ),
            (
                LossConfig {
                    kind: LossKind::Huber,
                    huber_delta: 0.0,
                    ..base.clone()
                },
                &classes,
                "huber_delta",
            ),
            (
                LossConfig {
                    kind: LossKind::SmoothL1,
                    smooth_l1_beta: -0.5,
                    ..base.clone()
                },
                &classes,
                "smooth_l1_beta",
            ),
        ];
        for (cfg, targets, key) in cases {
            let msg = config_error(&cfg, &z, targets);
            assert!(
                msg.starts_with("loss: ") && msg.contains(key),
                "{key}: {msg}"
            );
        }
        assert!(base.validate().is_ok());
    }

    #[test]
    fn loss_kind_names_round_trip() {
        for kind in LossKind::ALL {
            assert_eq!(kind.name().parse::<LossKind>().unwrap(), kind);
            assert_eq!(kind.to_string(), kind.name());
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.name()));
            assert_eq!(serde_json::from_str::<LossKind>(&json).unwrap(), kind);
        }
        assert_eq!("CE".parse::<LossKind>().unwrap(), LossKind::CrossEntropy);
        assert_eq!(
            "bce".parse::<LossKind>().unwrap(),
            LossKind::BinaryCrossEntropy
        );
        assert_eq!("Smooth-L1".parse::<LossKind>().unwrap(), LossKind::SmoothL1);
    }

    #[test]
    fn loss_kind_unknown_name_lists_valid_names() {
        let err = "hinge".parse::<LossKind>().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("\"hinge\""), "{msg}");
        for kind in LossKind::ALL {
            assert!(msg.contains(kind.name()), "{msg}");
        }
        let e: Error = err.into();
        assert!(matches!(e, Error::Config(_)));
    }

    #[test]
    fn loss_config_default() {
        let d = LossConfig::default();
        assert_eq!(
            d,
            LossConfig {
                kind: LossKind::CrossEntropy,
                label_smoothing: 0.0,
                class_weights: None,
                pos_weight: None,
                focal_gamma: 2.0,
                focal_alpha: None,
                smooth_l1_beta: 1.0,
                huber_delta: 1.0,
            }
        );
    }

    #[test]
    fn half_precision_logits_are_computed_in_f32() {
        let z = tensor(&Z, DType::BF16);
        let l = cross_entropy(&z, &classes()).unwrap();
        assert_eq!(l.dtype(), DType::F32);
        // bf16 rounds the logits; the loss only needs to be close.
        let (want, _) = reference("ce_plain");
        assert!((l.to_scalar::<f32>().unwrap() as f64 - want).abs() < 0.1);
    }
}
