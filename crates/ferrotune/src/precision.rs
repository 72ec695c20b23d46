//! Number formats a run or an inference can use, and which one runs on this machine.
//!
//! - `f32`: everything in 32-bit floats (training and inference, every CPU and GPU).
//! - `int8`: inference only; linear layers through int8 weights (per output channel) and
//!   int8 activations (per row, dynamic), [`crate::kernels::int8`]. On the fly from an f32
//!   model, or from a directory written by `ferrotune quantize` (int8 weights only).
//! - `bf16`: bf16 products with f32 sums (layer norms, softmax, loss, master weights and
//!   optimizer state stay f32), for training (mixed precision) and inference. It pays only
//!   on CPUs with a bf16 dot product (`avx512_bf16`, `amx_bf16`); elsewhere it would run
//!   slower than f32, so asking for it there is an error. Kernels: [`crate::kernels::bf16`].
//! - `auto` (the default): training in bf16 mixed precision where bf16 pays (an AMX CPU,
//!   [`bf16_pays`]), else f32; inference in int8 for a quantized model, else f32 (bf16 and
//!   int8 inference are faster but approximate, so they are asked for, not picked: the
//!   predictions of a model stay the same on every CPU unless asked otherwise). The reason
//!   goes in the run's first line and log.
//!
//! The choice is made at run time from the CPU's flags, never at build time.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The `config.json` key of a quantized model (written by [`crate::quantize`]).
pub const QUANTIZATION_CONFIG: &str = "quantization_config";

/// A requested number format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// The best this machine and model allow (see the module documentation).
    #[default]
    Auto,
    /// 32-bit floats.
    F32,
    /// bf16 mixed precision.
    Bf16,
    /// int8 linear layers (inference).
    Int8,
}

impl Precision {
    /// The name as written in recipes and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Auto => "auto",
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Int8 => "int8",
        }
    }

    /// Parses a name ([`Precision::name`]).
    pub fn parse(s: &str) -> Option<Precision> {
        [
            Precision::Auto,
            Precision::F32,
            Precision::Bf16,
            Precision::Int8,
        ]
        .into_iter()
        .find(|p| p.name() == s)
    }
}

/// True when `FERROTUNE_EMULATE_BF16=1`: bf16 is allowed on a CPU without a bf16 dot
/// product and runs the emulated kernel (the same arithmetic, many times slower than f32) —
/// for checking bf16's accuracy anywhere, and for the tests.
pub fn bf16_emulation_allowed() -> bool {
    std::env::var("FERROTUNE_EMULATE_BF16").is_ok_and(|v| v == "1")
}

/// True when bf16 may run: the CPU has a bf16 dot product, or emulation is allowed.
fn bf16_runs() -> bool {
    bf16_dot_product() || bf16_emulation_allowed()
}

/// True when this CPU has a bf16 dot-product instruction (`avx512_bf16`; AMX CPUs have it
/// too), checked at run time.
pub fn bf16_dot_product() -> bool {
    crate::kernels::bf16::Kernel::Avx512Bf16.available()
}

/// True when bf16 pays on this CPU: its fastest bf16 kernel is AMX's (`tdpbf16ps`),
/// measured faster than f32 (docs/PRECISION.md). `vdpbf16ps` alone (Zen 4) runs about the
/// f32 GEMM's rate here, so `auto` keeps f32 there.
pub fn bf16_pays() -> bool {
    crate::kernels::bf16::Kernel::best() == crate::kernels::bf16::Kernel::Amx
}

/// The CPU features that decide the kernels, as `/proc/cpuinfo` names them (for messages
/// and logs): e.g. `"avx2 fma"` or `"avx2 fma avx512f avx512_vnni avx512_bf16"`.
pub fn cpu_features() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let mut f = Vec::new();
        macro_rules! has {
            ($feat:tt, $name:expr) => {
                if std::is_x86_feature_detected!($feat) {
                    f.push($name);
                }
            };
        }
        has!("avx2", "avx2");
        has!("fma", "fma");
        has!("avx512f", "avx512f");
        has!("avx512vnni", "avx512_vnni");
        has!("avxvnni", "avx_vnni");
        has!("avx512bf16", "avx512_bf16");
        if crate::kernels::bf16::Kernel::Amx.available() {
            f.push("amx_bf16");
        }
        if f.is_empty() {
            "none of avx2/fma/avx512".into()
        } else {
            f.join(" ")
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.to_string()
    }
}

/// Why `bf16` cannot run here (an error message): the CPU lacks a bf16 dot product.
fn bf16_refusal() -> String {
    {
        format!(
            "precision bf16: this CPU has no bf16 dot product (avx512_bf16 or amx_bf16; it has {}), \
             so bf16 would run slower than f32; use f32 or auto (FERROTUNE_EMULATE_BF16=1 runs \
             it emulated, slowly, to check its accuracy)",
            cpu_features()
        )
    }
}

/// bf16 where it may run ([`bf16_runs`]), with the kernel named; else why not.
fn bf16_choice() -> Result<(Precision, String)> {
    if !bf16_runs() {
        return Err(Error::Config(bf16_refusal()));
    }
    Ok((
        Precision::Bf16,
        format!(
            "bf16 (as asked; {} kernel)",
            crate::kernels::bf16::Kernel::best().name()
        ),
    ))
}

/// What a training run uses for `requested`, and why; an error for what cannot run here.
pub fn for_training(requested: Precision) -> Result<(Precision, String)> {
    match requested {
        Precision::F32 => Ok((Precision::F32, "f32 (as asked)".into())),
        Precision::Auto if bf16_pays() => Ok((
            Precision::Bf16,
            format!(
                "bf16 mixed precision (auto: this CPU has AMX, where a bf16 training step \
                 measured 1.3-2.5x faster than f32; precision = \"f32\" for full precision; \
                 it has {})",
                cpu_features()
            ),
        )),
        Precision::Auto => Ok((
            Precision::F32,
            if bf16_dot_product() {
                format!(
                    "f32 (auto: this CPU has avx512_bf16 but no AMX, and bf16 was not \
                     measured faster than f32 there; ask for it with precision = \"bf16\"; \
                     it has {})",
                    cpu_features()
                )
            } else {
                format!(
                    "f32 (auto: this CPU has no bf16 dot product; it has {})",
                    cpu_features()
                )
            },
        )),
        Precision::Int8 => Err(Error::Config(
            "precision int8 is for inference (predict, eval, serve), not training; use f32 or auto"
                .into(),
        )),
        Precision::Bf16 => bf16_choice(),
    }
}

/// What inference uses for `requested` on a model that is `quantized` (int8 weights
/// only), on a CPU (`cpu`) or not, and why; an error for what cannot run.
pub fn for_inference(
    requested: Precision,
    quantized: bool,
    cpu: bool,
) -> Result<(Precision, String)> {
    match requested {
        Precision::Int8 if !cpu => Err(Error::Config(
            "precision int8: the int8 kernels run on the CPU only, and this model runs on a GPU"
                .into(),
        )),
        Precision::Int8 => Ok((Precision::Int8, "int8 (as asked)".into())),
        Precision::Auto if quantized => Ok((
            Precision::Int8,
            "int8 (auto: the model is quantized)".into(),
        )),
        Precision::F32 | Precision::Bf16 if quantized => Err(Error::Config(format!(
            "precision {}: this model is quantized (int8 weights only) and runs in int8 only; \
             use the f32 model it was quantized from",
            requested.name()
        ))),
        Precision::Auto | Precision::F32 => Ok((
            Precision::F32,
            if requested == Precision::F32 {
                "f32 (as asked)".into()
            } else if bf16_pays() {
                "f32 (auto: bf16 and int8 are faster here but approximate, ask for one with \
                 --precision bf16 or int8)"
                    .into()
            } else {
                "f32 (auto: int8 is faster but approximate, ask for it with --precision int8)"
                    .into()
            },
        )),
        Precision::Bf16 => bf16_choice(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in [
            Precision::Auto,
            Precision::F32,
            Precision::Bf16,
            Precision::Int8,
        ] {
            assert_eq!(Precision::parse(p.name()), Some(p));
        }
        assert_eq!(Precision::parse("fp16"), None);
    }

    #[test]
    fn inference_choices() {
        let pick = |r, q, cpu| for_inference(r, q, cpu).map(|(p, _)| p);
        assert_eq!(pick(Precision::Auto, false, true).unwrap(), Precision::F32);
        assert_eq!(pick(Precision::Auto, true, true).unwrap(), Precision::Int8);
        assert_eq!(pick(Precision::Int8, false, true).unwrap(), Precision::Int8);
        let e = pick(Precision::Int8, false, false).unwrap_err().to_string();
        assert!(e.contains("CPU only"), "{e}");
        let e = pick(Precision::F32, true, true).unwrap_err().to_string();
        assert!(e.contains("quantized"), "{e}");
        // bf16 where the CPU has it; refused elsewhere, saying why.
        if bf16_runs() {
            assert_eq!(pick(Precision::Bf16, false, true).unwrap(), Precision::Bf16);
        } else {
            let e = pick(Precision::Bf16, false, true).unwrap_err().to_string();
            assert!(e.contains("slower than f32"), "{e}");
        }
    }

    #[test]
    fn training_choices() {
        let auto = if bf16_pays() {
            Precision::Bf16
        } else {
            Precision::F32
        };
        assert_eq!(for_training(Precision::Auto).unwrap().0, auto);
        assert_eq!(for_training(Precision::F32).unwrap().0, Precision::F32);
        let e = for_training(Precision::Int8).unwrap_err().to_string();
        assert!(e.contains("inference"), "{e}");
        assert_eq!(for_training(Precision::Bf16).is_ok(), bf16_runs());
    }
}
