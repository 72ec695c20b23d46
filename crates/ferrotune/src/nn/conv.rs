//! The layers of image models, channels-last (`(batch, height, width, channels)`):
//! convolution (k×k, 1×1, depthwise), batch normalisation with running statistics (and
//! its activation in the same pass), ReLU6, max pooling, the residual add with its ReLU,
//! and global average pooling. Weights keep PyTorch's layouts (`(out, in, kh, kw)`), so
//! checkpoints load and export unchanged; the kernels are in [`crate::kernels::conv`].

use candle_core::{Tensor, Var};

use crate::error::{Error, Result};
use crate::kernels::conv::{self, Padding};

pub use crate::kernels::conv::BnAct;
use crate::nn::builder::{Builder, Init};
use crate::nn::layers::Linear;
use crate::nn::Ctx;

/// How a convolution pads its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PadMode {
    /// PyTorch's `padding = p` on every side.
    Symmetric(usize),
    /// TensorFlow's "SAME" (timm's `tf_` models): the output is `ceil(size / stride)`.
    Same,
}

/// A 2-D convolution without bias (image models follow each with batch norm).
pub struct Conv2d {
    /// `(out, in / groups, kh, kw)`.
    pub w: Var,
    /// Its parameter group.
    pub group: usize,
    /// Output channels.
    pub out: usize,
    /// Input channels.
    pub inp: usize,
    /// Window size (square).
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Padding.
    pub pad: PadMode,
    /// True for a depthwise convolution (`groups = in = out`).
    pub depthwise: bool,
}

impl Conv2d {
    /// The convolution `{name}.weight` of `inp → out` channels, `k × k`, from the
    /// builder; `depthwise` for one filter per channel (`out = inp`).
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        b: &mut Builder,
        name: &str,
        inp: usize,
        out: usize,
        k: usize,
        stride: usize,
        pad: PadMode,
        depthwise: bool,
        group: usize,
    ) -> Result<Conv2d> {
        let per_group = if depthwise { 1 } else { inp };
        let w = b.need(
            &format!("{name}.weight"),
            &[out, per_group, k, k],
            group,
            Init::Normal,
            false,
        )?;
        Ok(Conv2d {
            w,
            group,
            out,
            inp,
            k,
            stride,
            pad,
            depthwise,
        })
    }

    fn padding(&self, h: usize, w: usize) -> Padding {
        match self.pad {
            PadMode::Symmetric(p) => Padding::symmetric(p),
            PadMode::Same => Padding::same(h, w, self.k, self.stride),
        }
    }

    /// The convolution of `x` `(batch, h, w, in)` → `(batch, out_h, out_w, out)`.
    pub fn forward(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        if c != self.inp {
            return Err(Error::Msg(format!(
                "convolution of {} input channels given {c}",
                self.inp
            )));
        }
        let wt = ctx.w(&self.w, self.group);
        let pad = self.padding(h, w);
        let k = self.k;
        if self.depthwise {
            // (c, 1, k, k) → tap-major (k·k, c).
            let taps = wt.reshape((c, k * k))?.t()?.contiguous()?;
            return conv::depthwise(x, &taps, k, k, self.stride, pad);
        }
        let (ho, wo) = conv::out_size(x.dims(), k, k, self.stride, pad)?;
        let rows = if k == 1 && self.stride == 1 && pad == Padding::symmetric(0) {
            x.reshape((b * h * w, c))?
        } else {
            conv::im2col(x, k, k, self.stride, pad)?
        };
        // (out, in, k, k) → (out, k·k·in), the im2col row order.
        let wm = if k == 1 {
            wt.reshape((self.out, c))?
        } else {
            wt.permute((0, 2, 3, 1))?.reshape((self.out, k * k * c))?
        };
        Ok(rows.matmul(&wm.t()?)?.reshape((b, ho, wo, self.out))?)
    }
}

/// Batch normalisation over channels, with running statistics (PyTorch's
/// `BatchNorm2d`): in training, the batch's statistics normalise and update the running
/// ones (`running = (1 − momentum)·running + momentum·batch`, the variance unbiased);
/// otherwise — inference, a frozen group, or the context's `freeze_bn` — the running ones
/// normalise and nothing changes.
pub struct BatchNorm2d {
    /// `(c)`.
    pub weight: Var,
    /// `(c)`.
    pub bias: Var,
    /// `(c)`, a buffer.
    pub running_mean: Var,
    /// `(c)`, a buffer.
    pub running_var: Var,
    /// Added to the variance.
    pub eps: f64,
    /// Weight of the batch in the running statistics' update.
    pub momentum: f64,
    /// Its parameter group.
    pub group: usize,
}

impl BatchNorm2d {
    /// The batch norm `{name}.weight`, `.bias`, `.running_mean`, `.running_var` over `c`
    /// channels.
    pub fn build(
        b: &mut Builder,
        name: &str,
        c: usize,
        eps: f64,
        momentum: f64,
        group: usize,
    ) -> Result<BatchNorm2d> {
        Ok(BatchNorm2d {
            weight: b.need(&format!("{name}.weight"), &[c], group, Init::Ones, true)?,
            bias: b.need(&format!("{name}.bias"), &[c], group, Init::Zeros, true)?,
            running_mean: b.buffer(&format!("{name}.running_mean"), &[c], group, Init::Zeros)?,
            running_var: b.buffer(&format!("{name}.running_var"), &[c], group, Init::Ones)?,
            eps,
            momentum,
            group,
        })
    }

    /// Normalises `x` (channels last).
    pub fn forward(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        self.forward_act(ctx, x, BnAct::None)
    }

    /// [`BatchNorm2d::forward`], then the activation `act` (ReLU, ReLU6), in one pass.
    pub fn forward_act(&self, ctx: &Ctx, x: &Tensor, act: BnAct) -> Result<Tensor> {
        let w = ctx.w(&self.weight, self.group);
        let b = ctx.w(&self.bias, self.group);
        let frozen_group = self.group_frozen(ctx);
        if ctx.train && !frozen_group && !ctx.freeze_bn {
            let (mean, var) = conv::channel_stats(x)?;
            let n = x.elem_count() / mean.len().max(1);
            self.update(&mean, &var, n)?;
            conv::batch_norm(x, &w, &b, &mean, &var, self.eps, true, act)
        } else {
            let mean = self.running_mean.as_tensor().to_vec1::<f32>()?;
            let var = self.running_var.as_tensor().to_vec1::<f32>()?;
            conv::batch_norm(x, &w, &b, &mean, &var, self.eps, false, act)
        }
    }

    fn group_frozen(&self, ctx: &Ctx) -> bool {
        ctx.frozen.get(self.group).copied().unwrap_or(false)
    }

    fn update(&self, mean: &[f32], var: &[f32], n: usize) -> Result<()> {
        let m = self.momentum as f32;
        let unbias = if n > 1 {
            n as f32 / (n - 1) as f32
        } else {
            1.0
        };
        let rm = self.running_mean.as_tensor().to_vec1::<f32>()?;
        let rv = self.running_var.as_tensor().to_vec1::<f32>()?;
        let rm: Vec<f32> = rm
            .iter()
            .zip(mean)
            .map(|(r, x)| (1.0 - m) * r + m * x)
            .collect();
        let rv: Vec<f32> = rv
            .iter()
            .zip(var)
            .map(|(r, x)| (1.0 - m) * r + m * x * unbias)
            .collect();
        let dev = self.running_mean.device();
        self.running_mean
            .set(&Tensor::from_vec(rm, mean.len(), dev)?)?;
        self.running_var
            .set(&Tensor::from_vec(rv, var.len(), dev)?)?;
        Ok(())
    }
}

/// `min(max(x, 0), 6)`, fused ([`conv::relu6`]).
pub fn relu6(x: &Tensor) -> Result<Tensor> {
    conv::relu6(x)
}

/// Max pooling over `k × k` windows with `stride` and `pad` on every side (PyTorch's
/// `MaxPool2d(k, stride, pad)`, the padding never chosen), fused ([`conv::max_pool`]).
pub fn max_pool(x: &Tensor, k: usize, stride: usize, pad: usize) -> Result<Tensor> {
    conv::max_pool(x, k, stride, Padding::symmetric(pad))
}

/// `max(a + b, 0)`, a residual block's sum and ReLU, fused ([`conv::add_relu`]).
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    conv::add_relu(a, b)
}

/// The mean over height and width: `(batch, h, w, c)` → `(batch, c)`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    Ok(x.reshape((b, h * w, c))?.mean(1)?)
}

/// A feature map `(batch, h, w, c)` as `(batch, h·w, c)`: its positions as a sequence
/// (an image model's hidden states).
pub fn positions(f: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = f.dims4()?;
    Ok(f.reshape((b, h * w, c))?)
}

/// An image classifier's head, as timm and transformers build it: the mean of the last
/// feature map over height and width, dropout, a linear layer.
pub struct PooledClassifier {
    /// The linear layer.
    pub linear: Linear,
    /// Dropout before it.
    pub drop_rate: f64,
}

impl PooledClassifier {
    /// Logits `(batch, classes)` of feature map `f` `(batch, h, w, c)`.
    pub fn forward(&self, ctx: &mut Ctx, f: &Tensor) -> Result<Tensor> {
        let pooled = ctx.dropout(&global_avg_pool(f)?, self.drop_rate)?;
        self.linear.forward(ctx, &pooled)
    }
}
