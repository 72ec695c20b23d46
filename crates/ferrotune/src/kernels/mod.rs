//! CPU kernels: fused operations with forward and backward passes, as candle custom ops.
//!
//! - [`par`]: the parallel loop on candle's thread pool and the raw-buffer helpers.
//! - [`gemm`]: the strided GEMM call split over that pool.
//! - [`simd`]: vectorised exp, erf, row sums and softmax rows, chosen at run time.
//! - [`grad_sink`]: parameter gradients written straight into the trainer's buffers.
//! - [`fused`]: layer norm, residual + dropout + layer norm, GELU, softmax, dropout.
//! - [`linear`]: `x Wᵀ + b` (and with GELU) in one GEMM.
//! - [`attention`]: multi-head self-attention over a fused QKV projection.
//! - [`decode`]: causal grouped-query self-attention of decoders, and over a KV cache.
//! - [`embedding`]: the embedding lookup whose table gradient goes to the sink.
//! - [`lm_head`]: a language model's head fused with its next-token loss.
//! - [`rms_norm`]: Llama's RMS norm.
//! - [`swiglu`]: Llama's gated MLP activation, `silu(gate) · up`.
//! - [`rope`]: Llama's rotary position embedding on the fused QKV projection.
//! - [`conv`]: channels-last convolution (im2col, depthwise), batch norm: image models.
//! - [`amx`]: Intel AMX tiles (inline assembly): the micro-kernel of `bf16` and `int8`.
//! - [`int8`]: int8 weights and the integer GEMM of int8 inference (`par` only).
//! - [`bf16`]: bf16 weights and the bf16 GEMM (f32 sums) of bf16 inference (`par` only).
//! - [`lora`]: LoRA adapters' thin GEMMs, with their dropout, as two fused ops.
//! - [`q4`]: 4-bit (Q4_1) frozen base weights of LoRA, dequantised inside the layer's op
//!   (the GEMMs of `linear`).
//!
//! Imports point one way: `par`, `gemm`, `simd` ← `grad_sink` ← `fused`, `linear`,
//! `embedding`, `lm_head`, `rms_norm` ← `attention` (which takes dropout masks from `fused`).

pub mod amx;
pub mod attention;
pub mod bf16;
pub mod conv;
pub mod decode;
pub mod embedding;
pub mod fused;
pub mod gemm;
pub mod grad_sink;
pub mod int8;
pub mod linear;
pub mod lm_head;
pub mod lora;
pub mod par;
pub mod q4;
pub mod rms_norm;
pub mod rope;
pub mod simd;
pub mod swiglu;
