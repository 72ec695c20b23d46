//! Building a model's parameters from a checkpoint (or at random), VarBuilder-style: the
//! model asks for each tensor by its Hugging Face name as it builds its layers, and the
//! builder loads it (checking its shape), records it in the [`ParamStore`] with its layer
//! group and export name, and marks biases and normalisation weights as exempt from weight
//! decay. How a new tensor is initialised follows from the layer that asks for it
//! (transformers' `_init_weights`): normal(0, `initializer_range`) for weights and
//! embeddings, zeros for biases, ones for normalisation scales.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::formats::safetensors::{read_safetensors_with_i8, I8Tensor};
use crate::kernels::int8::{self, QWeight};
use crate::nn::layers::{Embedding, LayerNorm, Linear, RmsNorm};
use crate::nn::lora::{self, Lora, LoraModule, LoraState};
use crate::nn::params::{GroupKind, Param, ParamStore};

/// Where the weights come from.
pub enum Weights {
    /// The tensors of a checkpoint file (its path, for messages).
    File {
        /// The file.
        path: std::path::PathBuf,
        /// Its tensors by name.
        tensors: HashMap<String, Tensor>,
        /// Its int8 tensors by name (a quantized model's linear weights).
        int8: HashMap<String, I8Tensor>,
    },
    /// Random weights (tests and benchmarks).
    Random,
}

impl Weights {
    /// The tensors of a safetensors file.
    pub fn safetensors(path: &Path, device: &Device) -> Result<Weights> {
        let (tensors, int8) = read_safetensors_with_i8(path, device)?;
        Ok(Weights::File {
            path: path.to_path_buf(),
            tensors,
            int8,
        })
    }

    /// The tensor names (none for random weights).
    pub fn names(&self) -> Vec<&str> {
        match self {
            Weights::File { tensors, int8, .. } => tensors
                .keys()
                .chain(int8.keys())
                .map(|k| k.as_str())
                .collect(),
            Weights::Random => Vec::new(),
        }
    }

    /// True when the checkpoint holds tensor `name`.
    pub fn has(&self, name: &str) -> bool {
        matches!(self, Weights::File { tensors, int8, .. }
            if tensors.contains_key(name) || int8.contains_key(name))
    }

    /// True when the checkpoint holds int8 tensors (a quantized model).
    pub fn is_quantized(&self) -> bool {
        matches!(self, Weights::File { int8, .. } if !int8.is_empty())
    }

    /// The int8 weight `name` `(out, inp)` with its scale `{name}_scale` `(out)`, as
    /// quantized weights; `None` when the checkpoint holds no int8 tensor of that name.
    /// Errors name the file and tensor: a missing or mismatched scale, a weight of another
    /// shape or outside the kernels' ±63, a scale for an f32 weight.
    pub fn int8_weight(&self, name: &str, out: usize, inp: usize) -> Result<Option<QWeight>> {
        let Weights::File {
            path,
            tensors,
            int8,
        } = self
        else {
            return Ok(None);
        };
        let scale_name = format!("{name}{SCALE_SUFFIX}");
        let scale = tensors.get(&scale_name);
        let Some(q) = int8.get(name) else {
            if scale.is_some() && tensors.contains_key(name) {
                return Err(Error::at(
                    path,
                    None,
                    Some(&scale_name),
                    format!("a scale beside an f32 weight `{name}`: a quantized weight is int8"),
                ));
            }
            return Ok(None);
        };
        let at = |field: &str, msg: String| Error::at(path, None, Some(field), msg);
        if q.shape != [out, inp] {
            return Err(at(
                name,
                format!(
                    "int8 tensor has shape {:?}, expected {:?}",
                    q.shape,
                    [out, inp]
                ),
            ));
        }
        if let Some(v) = q.data.iter().find(|&&v| (v as f32).abs() > int8::W_MAX) {
            return Err(at(
                name,
                format!(
                    "int8 weight {v} outside ±{} (ferrotune's quantized weights keep 7 bits; \
                     quantize the model with `ferrotune quantize`)",
                    int8::W_MAX
                ),
            ));
        }
        let scale = scale.ok_or_else(|| {
            at(
                &scale_name,
                format!("missing: the int8 weight `{name}` needs its per-channel scale"),
            )
        })?;
        if scale.dims() != [out] {
            return Err(at(
                &scale_name,
                format!(
                    "scale has shape {:?}, expected [{out}] (one per output channel of `{name}`)",
                    scale.dims()
                ),
            ));
        }
        let scales: Vec<f32> = scale.to_dtype(DType::F32)?.to_vec1()?;
        if let Some(s) = scales.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(at(
                &scale_name,
                format!("scale {s}: every scale must be finite and positive"),
            ));
        }
        Ok(Some(QWeight::from_quantized(
            q.data.clone(),
            scales,
            out,
            inp,
        )))
    }
}

/// The name of an int8 weight's per-channel scale: `{weight}_scale`.
pub const SCALE_SUFFIX: &str = "_scale";

/// How a tensor the checkpoint lacks is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// normal(0, `initializer_range`).
    Normal,
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
}

/// Builds a model's parameters (see the module documentation).
pub struct Builder<'a> {
    weights: &'a Weights,
    /// Prefix of the backbone's tensors in the checkpoint (`"bert."` or `""`).
    ckpt_prefix: String,
    /// Prefix of the backbone's tensors in the export (`"bert."`).
    export_prefix: String,
    store: ParamStore,
    rng: ChaCha8Rng,
    init_std: f64,
    device: Device,
    /// LoRA, when the build runs inside [`crate::nn::lora::build`].
    lora: Option<LoraBuild>,
}

/// The builder's LoRA state: where frozen tensors go, the adapters' generator, and what
/// was built.
struct LoraBuild {
    /// The [`GroupKind::Frozen`] group.
    frozen: usize,
    rng: ChaCha8Rng,
    state: LoraState,
}

/// The module of a tensor: its export name without the last component.
fn module_of(name: &str) -> &str {
    name.rsplit_once('.').map_or(name, |(m, _)| m)
}

/// One normal sample per element, by Box–Muller (two uniforms give one normal sample; the
/// second is dropped for clarity).
fn normal(rng: &mut ChaCha8Rng, n: usize, std: f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random::<f64>().max(1e-300);
            let u2: f64 = rng.random::<f64>();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect()
}

impl<'a> Builder<'a> {
    /// A builder over `weights`. The backbone's tensors are exported under
    /// `export_prefix` (`"bert."`), and read from the checkpoint with that prefix when
    /// `{export_prefix}{probe}` is in it, else without (sentence-transformers checkpoints
    /// have none). New tensors are drawn from a generator seeded by `seed`.
    pub fn new(
        weights: &'a Weights,
        export_prefix: &str,
        probe: &str,
        init_std: f64,
        seed: u64,
        device: &Device,
    ) -> Self {
        let ckpt_prefix = if weights.has(&format!("{export_prefix}{probe}")) {
            export_prefix.to_string()
        } else {
            String::new()
        };
        let mut store = ParamStore::default();
        // Inside `lora::build`: the frozen group holds every tensor that does not train.
        let lora = lora::current().map(|spec| LoraBuild {
            frozen: store.add_group(GroupKind::Frozen),
            rng: lora::init_rng(spec.seed),
            state: LoraState::new(spec),
        });
        Builder {
            weights,
            ckpt_prefix,
            export_prefix: export_prefix.to_string(),
            store,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_4ead),
            init_std,
            device: device.clone(),
            lora,
        }
    }

    /// The group the tensors of module `module` (an export name) train in: `group`, or
    /// with LoRA the frozen group unless the module is one to save (or `new`: not in the
    /// checkpoint, so it must train, and is saved with the adapter).
    fn placed(&self, module: &str, group: usize, new: bool) -> usize {
        match &self.lora {
            Some(l) if !new && l.state.spec.saved_module(module).is_none() => l.frozen,
            _ => group,
        }
    }

    /// Records module `module` as one to save when LoRA trains it.
    fn note_saved(&mut self, module: &str, new: bool) {
        if let Some(l) = &mut self.lora {
            match l.state.spec.saved_module(module) {
                Some(m) => l.state.add_saved(&m),
                None if new => l.state.add_saved(module),
                None => {}
            }
        }
    }

    /// With LoRA, the layer of module `module` (export name) as the builder hands it out:
    /// in the group its tensors were placed in, with an adapter when the module is
    /// targeted, and with `load_in_4bit` its weights in 4 bits when it is frozen. Families
    /// that build a linear layer themselves call this with it.
    pub fn adapt_linear(
        &mut self,
        lin: Linear,
        module: &str,
        group: usize,
        new: bool,
    ) -> Result<Linear> {
        let lin = self.attach_adapter(lin, module, group, new)?;
        self.frozen_to_4bit(lin, module)
    }

    /// With `load_in_4bit`, a frozen layer `module` with its weights in 4 bits
    /// ([`Linear::into_4bit`]): its f32 weight parameter leaves the store, and the 4-bit
    /// weights are recorded in [`ParamStore::q4`] for the export.
    fn frozen_to_4bit(&mut self, lin: Linear, module: &str) -> Result<Linear> {
        let Some(l) = &self.lora else {
            return Ok(lin);
        };
        if !l.state.spec.base_4bit || lin.group != l.frozen || lin.int8_only {
            return Ok(lin);
        }
        let name = format!("{module}.weight");
        let Some(i) = self.store.params.iter().rposition(|p| p.name == name) else {
            return Ok(lin);
        };
        let lin = lin.into_4bit()?;
        if let Some(q) = &lin.q4 {
            self.store.params.remove(i);
            self.store.q4.push((name, q.clone()));
        }
        Ok(lin)
    }

    /// [`Builder::adapt_linear`] before the 4-bit weights: the group, and the adapter.
    fn attach_adapter(
        &mut self,
        mut lin: Linear,
        module: &str,
        group: usize,
        new: bool,
    ) -> Result<Linear> {
        if self.lora.is_none() {
            return Ok(lin);
        }
        lin.group = self.placed(module, group, new);
        let device = self.device.clone();
        let l = self.lora.as_mut().expect("checked above");
        l.state.linears.push(module.to_string());
        if new || !l.state.spec.targets(module) {
            return Ok(lin);
        }
        if lin.int8_only {
            return Err(Error::Config(format!(
                "LoRA on `{module}`: the model is quantized (int8 weights only); train                  adapters on the f32 model it was quantized from"
            )));
        }
        let (out, inp) = lin.dims()?;
        let spec = &l.state.spec;
        let (r, scale, dropout) = (spec.r, spec.scale(), spec.dropout);
        let a = Var::from_tensor(&lora::init_a(&mut l.rng, r, inp, &device)?)?;
        let b = Var::from_tensor(&Tensor::zeros((out, r), DType::F32, &device)?)?;
        let id = l.state.modules.len() as u64;
        l.state.modules.push(LoraModule {
            module: module.to_string(),
            a: a.clone(),
            b: b.clone(),
        });
        for (which, v) in [("A", &a), ("B", &b)] {
            self.store.params.push(Param {
                name: lora::tensor_name(module, which),
                var: v.clone(),
                group,
                no_decay: false,
            });
        }
        lin.lora = Some(Lora {
            a,
            b,
            scale,
            dropout,
            group,
            id,
        });
        Ok(lin)
    }

    /// The prefix the checkpoint's backbone tensors carry (`"bert."` or `""`).
    pub fn checkpoint_prefix(&self) -> &str {
        &self.ckpt_prefix
    }

    /// Declares the next layer group (bottom to top) and returns its index.
    pub fn group(&mut self, kind: GroupKind) -> usize {
        self.store.add_group(kind)
    }

    /// The parameters built so far (with LoRA, its state in [`ParamStore::lora`]).
    pub fn finish(mut self) -> ParamStore {
        if let Some(l) = self.lora.take() {
            self.store.lora = Some(l.state);
        }
        self.store
    }

    /// A backbone tensor: it must be in the checkpoint under its name (with or without
    /// the backbone prefix), of this shape; random weights when there is no checkpoint.
    pub fn need(
        &mut self,
        name: &str,
        shape: &[usize],
        group: usize,
        init: Init,
        no_decay: bool,
    ) -> Result<Var> {
        let t = match self.weights {
            Weights::Random => self.random(shape, init)?,
            Weights::File {
                path,
                tensors,
                int8,
            } => {
                let full = format!("{}{}", self.ckpt_prefix, name);
                if int8.contains_key(&full) {
                    return Err(Error::at(
                        path,
                        None,
                        Some(&full),
                        "int8 tensor where an f32 one is expected (only linear layers' \
                         weights are quantized)",
                    ));
                }
                let t = tensors.get(&full).ok_or_else(|| {
                    Error::at(
                        path,
                        None,
                        Some(&full),
                        "tensor is missing from the checkpoint",
                    )
                })?;
                if t.dims() != shape {
                    return Err(Error::at(
                        path,
                        None,
                        Some(&full),
                        format!("tensor has shape {:?}, expected {:?}", t.dims(), shape),
                    ));
                }
                t.to_dtype(DType::F32)?.to_device(&self.device)?
            }
        };
        let export = format!("{}{}", self.export_prefix, name);
        self.push(export, t, group, no_decay)
    }

    /// A buffer (batch norm's running statistics) of layer group `group` (frozen with
    /// it): read like [`Builder::need`], kept
    /// among [`ParamStore::buffers`], never trained.
    pub fn buffer(&mut self, name: &str, shape: &[usize], group: usize, init: Init) -> Result<Var> {
        let var = self.need(name, shape, group, init, true)?;
        let p = self.store.params.pop().expect("need pushed the tensor");
        self.store.buffers.push(p);
        Ok(var)
    }

    /// A tensor outside the backbone (pooler, head): loaded when the checkpoint has it
    /// under `ckpt_name` with this shape, else initialised. Returns the variable and
    /// whether it was newly initialised.
    pub fn optional(
        &mut self,
        ckpt_name: &str,
        export_name: &str,
        shape: &[usize],
        group: usize,
        init: Init,
        no_decay: bool,
    ) -> Result<(Var, bool)> {
        let found = match self.weights {
            Weights::File { tensors, .. } => tensors.get(ckpt_name).filter(|t| t.dims() == shape),
            Weights::Random => None,
        };
        let (t, new) = match found {
            Some(t) => (t.to_dtype(DType::F32)?.to_device(&self.device)?, false),
            None => (self.random(shape, init)?, true),
        };
        let var = self.push_new(export_name.to_string(), t, group, no_decay, new)?;
        Ok((var, new))
    }

    fn random(&mut self, shape: &[usize], init: Init) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let data = match init {
            Init::Zeros => vec![0f32; n],
            Init::Ones => vec![1f32; n],
            Init::Normal => normal(&mut self.rng, n, self.init_std),
        };
        Ok(Tensor::from_vec(data, shape, &self.device)?)
    }

    fn push(&mut self, name: String, t: Tensor, group: usize, no_decay: bool) -> Result<Var> {
        self.push_new(name, t, group, no_decay, false)
    }

    /// [`Builder::push`] of a tensor that is new (`new`) or loaded; with LoRA it goes to
    /// the frozen group unless it trains.
    fn push_new(
        &mut self,
        name: String,
        t: Tensor,
        group: usize,
        no_decay: bool,
        new: bool,
    ) -> Result<Var> {
        let module = module_of(&name).to_string();
        let group = self.placed(&module, group, new);
        self.note_saved(&module, new);
        let var = Var::from_tensor(&t)?;
        self.store.params.push(Param {
            name,
            var: var.clone(),
            group,
            no_decay,
        });
        Ok(var)
    }

    /// A backbone linear layer `{name}.weight` `(out, inp)` and `{name}.bias`.
    /// From a quantized model, the int8 weight and its scale instead (no f32 weights).
    pub fn linear(&mut self, name: &str, out: usize, inp: usize, group: usize) -> Result<Linear> {
        let full = format!("{}{name}.weight", self.ckpt_prefix);
        if let Some(q) = self.weights.int8_weight(&full, out, inp)? {
            let b = self.need(&format!("{name}.bias"), &[out], group, Init::Zeros, true)?;
            self.store
                .linear_weights
                .push(format!("{}{name}.weight", self.export_prefix));
            self.store.int8_layers += 1;
            let module = format!("{}{name}", self.export_prefix);
            return self.adapt_linear(Linear::quantized(q, b, group)?, &module, group, false);
        }
        self.store
            .linear_weights
            .push(format!("{}{name}.weight", self.export_prefix));
        let lin = Linear::new(
            self.need(
                &format!("{name}.weight"),
                &[out, inp],
                group,
                Init::Normal,
                false,
            )?,
            self.need(&format!("{name}.bias"), &[out], group, Init::Zeros, true)?,
            group,
        );
        let module = format!("{}{name}", self.export_prefix);
        self.adapt_linear(lin, &module, group, false)
    }

    /// A backbone linear layer `{name}.weight` `(out, inp)` without a bias (Llama's
    /// projections): its bias is a zero tensor that is not a parameter — never trained,
    /// never exported.
    pub fn linear_no_bias(
        &mut self,
        name: &str,
        out: usize,
        inp: usize,
        group: usize,
    ) -> Result<Linear> {
        self.store
            .linear_weights
            .push(format!("{}{name}.weight", self.export_prefix));
        let module = format!("{}{name}", self.export_prefix);
        let b = Var::from_tensor(&Tensor::zeros(out, DType::F32, &self.device)?)?;
        let full = format!("{}{name}.weight", self.ckpt_prefix);
        if let Some(q) = self.weights.int8_weight(&full, out, inp)? {
            self.store.int8_layers += 1;
            return self.adapt_linear(Linear::quantized(q, b, group)?, &module, group, false);
        }
        let w = self.need(
            &format!("{name}.weight"),
            &[out, inp],
            group,
            Init::Normal,
            false,
        )?;
        self.adapt_linear(Linear::new(w, b, group), &module, group, false)
    }

    /// A linear layer outside the backbone without a bias (a decoder's `score` head),
    /// exported as `{export}.weight`: loaded from `{ckpt}.weight` when the checkpoint has
    /// it with this shape, else new. Returns the layer and whether it is new.
    pub fn optional_linear_no_bias(
        &mut self,
        ckpt: &str,
        export: &str,
        out: usize,
        inp: usize,
        group: usize,
    ) -> Result<(Linear, bool)> {
        self.store.linear_weights.push(format!("{export}.weight"));
        let ckpt_w = format!("{ckpt}.weight");
        // From a quantized model, its int8 weight (of this shape; another is a new head).
        let fits = match self.weights {
            Weights::File { int8, .. } => int8.get(&ckpt_w).is_none_or(|t| t.shape == [out, inp]),
            Weights::Random => true,
        };
        if fits {
            if let Some(q) = self.weights.int8_weight(&ckpt_w, out, inp)? {
                let b = Var::from_tensor(&Tensor::zeros(out, DType::F32, &self.device)?)?;
                self.store.int8_layers += 1;
                let lin = Linear::quantized(q, b, group)?;
                return Ok((self.adapt_linear(lin, export, group, false)?, false));
            }
        }
        let (w, new) = self.optional(
            &format!("{ckpt}.weight"),
            &format!("{export}.weight"),
            &[out, inp],
            group,
            Init::Normal,
            false,
        )?;
        let b = Var::from_tensor(&Tensor::zeros(out, DType::F32, &self.device)?)?;
        let lin = self.adapt_linear(Linear::new(w, b, group), export, group, new)?;
        Ok((lin, new))
    }

    /// A backbone linear layer stored transposed, as GPT-2's `Conv1D`: `{name}.weight` is
    /// `(inp, out)` in the checkpoint and the export, `(out, inp)` in the layer (so it runs,
    /// trains and takes adapters as any linear layer); `{name}.bias` `(out)`.
    pub fn linear_transposed(
        &mut self,
        name: &str,
        out: usize,
        inp: usize,
        group: usize,
    ) -> Result<Linear> {
        let export = format!("{}{name}.weight", self.export_prefix);
        self.store.linear_weights.push(export.clone());
        // A quantized model holds ferrotune's `(out, inp)` int8 rows (quantized per output
        // channel from the layer, not from GPT-2's layout).
        let full = format!("{}{name}.weight", self.ckpt_prefix);
        if let Some(q) = self.weights.int8_weight(&full, out, inp)? {
            let b = self.need(&format!("{name}.bias"), &[out], group, Init::Zeros, true)?;
            self.store.int8_layers += 1;
            let module = format!("{}{name}", self.export_prefix);
            return self.adapt_linear(Linear::quantized(q, b, group)?, &module, group, false);
        }
        self.need(
            &format!("{name}.weight"),
            &[inp, out],
            group,
            Init::Normal,
            false,
        )?;
        let p = self
            .store
            .params
            .last_mut()
            .expect("need pushed the weight");
        let w = Var::from_tensor(&p.var.as_tensor().t()?.contiguous()?)?;
        p.var = w.clone();
        self.store.transposed.push(export);
        let b = self.need(&format!("{name}.bias"), &[out], group, Init::Zeros, true)?;
        let module = format!("{}{name}", self.export_prefix);
        self.adapt_linear(Linear::new(w, b, group), &module, group, false)
    }

    /// A backbone RMS norm `{name}.weight` of width `n` (no shift).
    pub fn rms_norm(&mut self, name: &str, n: usize, eps: f64, group: usize) -> Result<RmsNorm> {
        Ok(RmsNorm {
            g: self.need(&format!("{name}.weight"), &[n], group, Init::Ones, true)?,
            eps,
            group,
        })
    }

    /// A backbone layer norm `{name}.weight` and `{name}.bias` of width `n`.
    pub fn layer_norm(
        &mut self,
        name: &str,
        n: usize,
        eps: f64,
        group: usize,
    ) -> Result<LayerNorm> {
        let g = self.need(&format!("{name}.weight"), &[n], group, Init::Ones, true)?;
        let b = self.need(&format!("{name}.bias"), &[n], group, Init::Zeros, true)?;
        let group = self.placed(&format!("{}{name}", self.export_prefix), group, false);
        Ok(LayerNorm { g, b, eps, group })
    }

    /// A backbone embedding table `{name}.weight` `(rows, dim)`.
    pub fn embedding(
        &mut self,
        name: &str,
        rows: usize,
        dim: usize,
        group: usize,
    ) -> Result<Embedding> {
        let table = self.need(
            &format!("{name}.weight"),
            &[rows, dim],
            group,
            Init::Normal,
            false,
        )?;
        let group = self.placed(&format!("{}{name}", self.export_prefix), group, false);
        Ok(Embedding { table, group })
    }

    /// A linear layer outside the backbone (pooler, head), exported as `{export}.weight`
    /// and `{export}.bias`: loaded from `{ckpt}.weight` / `{ckpt}.bias` when the checkpoint
    /// has both with these shapes, else new. Returns the layer and whether any of it is
    /// new.
    pub fn optional_linear(
        &mut self,
        ckpt: &str,
        export: &str,
        out: usize,
        inp: usize,
        group: usize,
    ) -> Result<(Linear, bool)> {
        let ckpt_w = format!("{ckpt}.weight");
        self.store.linear_weights.push(format!("{export}.weight"));
        // An int8 head of another size is a new head, as an f32 one is.
        let fits = match self.weights {
            Weights::File { int8, .. } => int8.get(&ckpt_w).is_none_or(|t| t.shape == [out, inp]),
            Weights::Random => true,
        };
        let quantized = if fits {
            self.weights.int8_weight(&ckpt_w, out, inp)?
        } else {
            None
        };
        if let Some(q) = quantized {
            let (b, new) = self.optional(
                &format!("{ckpt}.bias"),
                &format!("{export}.bias"),
                &[out],
                group,
                Init::Zeros,
                true,
            )?;
            self.store.int8_layers += 1;
            let lin = self.adapt_linear(Linear::quantized(q, b, group)?, export, group, new)?;
            return Ok((lin, new));
        }
        let (w, n1) = self.optional(
            &format!("{ckpt}.weight"),
            &format!("{export}.weight"),
            &[out, inp],
            group,
            Init::Normal,
            false,
        )?;
        let (b, n2) = self.optional(
            &format!("{ckpt}.bias"),
            &format!("{export}.bias"),
            &[out],
            group,
            Init::Zeros,
            true,
        )?;
        let new = n1 || n2;
        let lin = self.adapt_linear(Linear::new(w, b, group), export, group, new)?;
        Ok((lin, new))
    }
}
