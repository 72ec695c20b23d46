//! LoRA (low-rank adaptation) on linear layers, with Hugging Face PEFT's names and
//! semantics (`peft.tuners.lora.layer.Linear`, `LoraConfig`).
//!
//! A targeted linear layer computes `y = x Wᵀ + b + s·(dropout(x) Aᵀ) Bᵀ` with `A` `(r,
//! in)` drawn as PEFT's `init_lora_weights=True` (kaiming-uniform with `a = √5`, that is
//! U(−1/√in, 1/√in)), `B` `(out, r)` zeros, and `s = α/r` (`α/√r` with rsLoRA). With LoRA
//! on, only the `A`/`B` tensors and the modules in `modules_to_save` train: every other
//! tensor is placed in the [`GroupKind::Frozen`] group, which is never trained (no
//! gradient, no optimizer step, no weight decay), so the base weights stay bit-identical.
//! The adapters sit in their base layer's group, so discriminative learning rates,
//! `freeze` and gradual unfreezing act on them layer by layer.
//!
//! Targets are matched as PEFT's `check_target_module_exists`: a module (the Hugging Face
//! name of a linear layer, e.g. `bert.encoder.layer.0.attention.self.query`) is targeted
//! when its name is in the list or ends with `.{entry}`; `"all-linear"` targets every
//! linear layer but the output or classifier head (`lm_head`, `classifier`, `score`).
//! Modules in `modules_to_save` (matched as PEFT's `_set_trainable`: the module name ends
//! with the entry) train fully and are never targeted. A module the checkpoint lacks (a
//! new head, a new pooler) trains and is saved as if listed there.
//!
//! A model is built with adapters by running the family's `build` inside [`build`]: every
//! [`crate::nn::Builder`] created during it reads the [`LoraSpec`], so every family (and
//! any future one) gets LoRA on each linear layer it builds through the builder.
//!
//! Files: [`write_adapter`] writes a PEFT adapter directory (`adapter_config.json`,
//! `adapter_model.safetensors` with keys `base_model.model.{module}.lora_A.weight`,
//! `….lora_B.weight` and, for modules to save, `base_model.model.{tensor}` as PEFT ≥ 0.15
//! saves them); [`merged_tensors`] gives the full model with `W + s·B·A` folded in;
//! [`read_adapter`] and [`Adapter::apply`] load an adapter onto a base model.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::kernels::{fused, lora};
use crate::nn::{Ctx, ParamStore};

/// Which linear layers get adapters.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// Module names, each matched as the whole name or its suffix after a dot.
    List(Vec<String>),
    /// Every linear layer but the output or classifier head (PEFT's `"all-linear"`).
    AllLinear,
}

/// The module names no `"all-linear"` targets: the output head of a language model and
/// the classifier heads of sequence classification (PEFT's `SEQ_CLS_HEAD_NAMES`).
pub const HEAD_NAMES: &[&str] = &["lm_head", "classifier", "score"];

/// The modules PEFT adds to `modules_to_save` for sequence classification.
pub const SEQ_CLS_MODULES: &[&str] = &["classifier", "score"];

/// PEFT's default `target_modules` for a `model_type`
/// (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`), for the model types ferrotune
/// loads.
pub fn default_targets(model_type: &str) -> Option<&'static [&'static str]> {
    Some(match model_type {
        "bert" | "roberta" => &["query", "value"],
        "distilbert" => &["q_lin", "v_lin"],
        "mpnet" => &["q", "v"],
        "llama" | "mistral" | "qwen2" => &["q_proj", "v_proj"],
        "gpt2" => &["c_attn"],
        _ => return None,
    })
}

/// A LoRA configuration (PEFT's `LoraConfig`, the keys ferrotune supports).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// Rank `r` (at least 1).
    pub r: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// `lora_dropout`: dropout on the adapter's input.
    pub dropout: f64,
    /// `target_modules`.
    pub targets: Targets,
    /// `modules_to_save`: modules that train fully (and are saved with the adapter).
    pub modules_to_save: Vec<String>,
    /// `use_rslora`: scale by `α/√r` instead of `α/r`.
    pub use_rslora: bool,
    /// Seed of the adapters' `A` initialisation.
    pub seed: u64,
    /// `load_in_4bit`: the frozen base linear weights kept in 4 bits
    /// ([`crate::kernels::q4`]).
    pub base_4bit: bool,
}

impl LoraSpec {
    /// The adapters' scale `s`: `α/r`, or `α/√r` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// The outermost module of `module` (itself or one of its parents) that
    /// `modules_to_save` names, matched as PEFT (`name.endswith(entry)`).
    pub fn saved_module(&self, module: &str) -> Option<String> {
        let parts: Vec<&str> = module.split('.').collect();
        (1..=parts.len()).map(|n| parts[..n].join(".")).find(|m| {
            self.modules_to_save
                .iter()
                .any(|e| !e.is_empty() && m.ends_with(e.as_str()))
        })
    }

    /// Whether linear layer `module` gets an adapter (never one inside a module to save).
    pub fn targets(&self, module: &str) -> bool {
        if self.saved_module(module).is_some() {
            return false;
        }
        match &self.targets {
            Targets::List(l) => l
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}"))),
            Targets::AllLinear => !HEAD_NAMES.contains(&module),
        }
    }
}

/// One adapter on a linear layer: `s·(dropout(x) Aᵀ) Bᵀ`.
pub struct Lora {
    /// `A`, `(r, in)`.
    pub a: Var,
    /// `B`, `(out, r)`.
    pub b: Var,
    /// `s`.
    pub scale: f64,
    /// Dropout probability on the adapter's input.
    pub dropout: f64,
    /// The parameter group of `A` and `B` (the base layer's).
    pub group: usize,
    /// The adapter's index in the model: its dropout masks are its own.
    pub id: u64,
}

impl Lora {
    /// The adapter's output `s·(dropout(x) Aᵀ) Bᵀ` on 2-D `x` `(rows, in)`: two thin
    /// GEMMs through rank `r`. Its dropout seed is derived from the context's generator
    /// without drawing from it (the trainer advances the generator each micro-batch) and
    /// from the adapter's index, so every adapter and step has its own masks and a
    /// resumed run draws the same ones.
    pub fn delta(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        let a = ctx.w(&self.a, self.group);
        let b = ctx.w(&self.b, self.group);
        let x = match self.dropout_seed(ctx) {
            Some(d) => fused::dropout(x, d)?,
            None => x.clone(),
        };
        // The scale multiplies the thin `(rows, r)` product, not the `(rows, out)` output:
        // one pass over r columns instead of `out`, forward and backward (for PEFT's
        // usual power-of-two `alpha / r` the same numbers).
        let h = (x.matmul(&a.t()?)? * self.scale)?;
        Ok(h.matmul(&b.t()?)?)
    }

    /// `A`, `B` and the [`lora::Part`] of the fused ops ([`crate::kernels::lora`]) that
    /// compute what [`Lora::delta`] does: the same scale and dropout masks.
    pub fn fused_part(&self, ctx: &Ctx) -> (Tensor, Tensor, lora::Part) {
        let part = lora::Part {
            r: self.a.dims()[0],
            scale: self.scale as f32,
            dropout: self.dropout_seed(ctx),
        };
        (ctx.w(&self.a, self.group), ctx.w(&self.b, self.group), part)
    }

    fn dropout_seed(&self, ctx: &Ctx) -> Option<fused::Dropout> {
        if !ctx.train || self.dropout <= 0.0 {
            return None;
        }
        let mut rng = ctx.rng.as_deref()?.clone();
        let next: u64 = rng.random();
        let seed =
            crate::dist::hash64(&[next, self.id, 0x6c6f_7261].map(u64::to_le_bytes).concat());
        Some(fused::Dropout {
            p: self.dropout as f32,
            seed,
            row0: ctx.row0,
            tokens: ctx.tokens,
        })
    }
}

/// One adapted module, as the parameter store records it.
#[derive(Clone)]
pub struct LoraModule {
    /// The module's Hugging Face name (`bert.encoder.layer.0.attention.self.query`).
    pub module: String,
    /// `A`, `(r, in)`.
    pub a: Var,
    /// `B`, `(out, r)`.
    pub b: Var,
}

/// A model's LoRA: the configuration, the adapted modules, the modules that train fully.
#[derive(Clone)]
pub struct LoraState {
    /// The configuration it was built with.
    pub spec: LoraSpec,
    /// The adapted modules, in model order.
    pub modules: Vec<LoraModule>,
    /// The modules to save that the model has (configured, or new), in model order.
    pub saved: Vec<String>,
    /// Every linear layer's module name (for the error when nothing matches).
    pub linears: Vec<String>,
}

impl LoraState {
    /// A state for `spec` with nothing built yet.
    pub fn new(spec: LoraSpec) -> LoraState {
        LoraState {
            spec,
            modules: Vec::new(),
            saved: Vec::new(),
            linears: Vec::new(),
        }
    }

    /// Records `module` as one to save (once).
    pub fn add_saved(&mut self, module: &str) {
        if !self.saved.iter().any(|m| m == module) {
            self.saved.push(module.to_string());
        }
    }

    /// The `modules_to_save` written to `adapter_config.json`: the configured entries,
    /// then the new modules no entry covers.
    pub fn modules_to_save(&self) -> Vec<String> {
        let mut out = self.spec.modules_to_save.clone();
        for m in &self.saved {
            if !out.iter().any(|e| m.ends_with(e.as_str())) {
                out.push(m.clone());
            }
        }
        out
    }

    /// Whether export name `tensor` belongs to a module to save.
    pub fn is_saved(&self, tensor: &str) -> bool {
        self.saved
            .iter()
            .any(|m| tensor.starts_with(&format!("{m}.")))
    }
}

thread_local! {
    static SCOPE: RefCell<Option<LoraSpec>> = const { RefCell::new(None) };
}

/// The LoRA configuration of the build running on this thread, if any (read by
/// [`crate::nn::Builder::new`]).
pub fn current() -> Option<LoraSpec> {
    SCOPE.with(|s| s.borrow().clone())
}

/// Restores the previous scope when dropped (also when the build panics).
struct ScopeGuard(Option<LoraSpec>);

impl Drop for ScopeGuard {
    fn drop(&mut self) {
        let prev = self.0.take();
        SCOPE.with(|s| *s.borrow_mut() = prev);
    }
}

/// Runs `build` (a family's model build) with adapters per `spec` on every linear layer
/// it builds through [`crate::nn::Builder`]; `None` builds without. With a `spec`, a
/// `target_modules` that matches no linear layer is a configuration error listing the
/// layers' names.
pub fn build<T: AsRef<ParamStore>>(
    spec: Option<&LoraSpec>,
    build: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let Some(spec) = spec else {
        return build();
    };
    let prev = SCOPE.with(|s| s.borrow_mut().replace(spec.clone()));
    let _guard = ScopeGuard(prev);
    let loaded = build()?;
    check(loaded.as_ref())?;
    Ok(loaded)
}

/// The error when no linear layer of `params` is targeted (a configuration error listing
/// the layers' short names, deduplicated).
pub fn check(params: &ParamStore) -> Result<()> {
    let Some(state) = &params.lora else {
        return Err(Error::Config(
            "LoRA is on, but this model builds no linear layers through the builder".into(),
        ));
    };
    if !state.modules.is_empty() {
        return Ok(());
    }
    let mut short: Vec<&str> = Vec::new();
    for m in &state.linears {
        let s = m.rsplit('.').next().unwrap_or(m);
        if !short.contains(&s) {
            short.push(s);
        }
    }
    let wanted = match &state.spec.targets {
        Targets::List(l) => format!("{l:?}"),
        Targets::AllLinear => "\"all-linear\"".into(),
    };
    Err(Error::Config(format!(
        "`lora_target_modules` {wanted} matches no linear layer of this model (its linear \
         layers: {})",
        short.join(", ")
    )))
}

/// `A` initialised as PEFT's `kaiming_uniform_(a=√5)`: U(−1/√in, 1/√in).
pub fn init_a(rng: &mut ChaCha8Rng, r: usize, inp: usize, device: &Device) -> Result<Tensor> {
    let bound = 1.0 / (inp.max(1) as f64).sqrt();
    let data: Vec<f32> = (0..r * inp)
        .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
        .collect();
    Ok(Tensor::from_vec(data, (r, inp), device)?)
}

/// The generator of the adapters' `A` matrices for `seed` (separate from the builder's,
/// so new heads draw the same weights with LoRA as without).
pub fn init_rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ 0x10ca_a0a0)
}

/// The export name of an adapter's `A` (`which` = `"A"`) or `B` tensor of `module`.
pub fn tensor_name(module: &str, which: &str) -> String {
    format!("{module}.lora_{which}.weight")
}

/// PEFT's prefix of every key of `adapter_model.safetensors`.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// The adapter file's name in an adapter directory.
pub const ADAPTER_FILE: &str = "adapter_model.safetensors";

/// The adapter configuration's name in an adapter directory.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// The model's tensors with every adapter folded into its base weight (`W + s·B·A`) and
/// without the adapter tensors: a full model under the base model's names.
pub fn merged_tensors(params: &ParamStore) -> Result<HashMap<String, Tensor>> {
    let mut out = params.named_tensors()?;
    let Some(state) = &params.lora else {
        return Ok(out);
    };
    let s = state.spec.scale();
    for m in &state.modules {
        out.remove(&tensor_name(&m.module, "A"));
        out.remove(&tensor_name(&m.module, "B"));
        let delta = (m.b.as_tensor().matmul(m.a.as_tensor())? * s)?;
        let name = format!("{}.weight", m.module);
        let base = out.remove(&name).ok_or_else(|| {
            Error::Msg(format!("LoRA on `{}`: no base weight `{name}`", m.module))
        })?;
        out.insert(name, (base + delta)?);
    }
    Ok(out)
}

/// The tensors of `adapter_model.safetensors` under PEFT's keys: each adapter's
/// `base_model.model.{module}.lora_A.weight` / `lora_B.weight`, and each tensor of a module
/// to save as `base_model.model.{tensor}`.
pub fn adapter_tensors(params: &ParamStore) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    let Some(state) = &params.lora else {
        return out;
    };
    for m in &state.modules {
        for (which, v) in [("A", &m.a), ("B", &m.b)] {
            out.insert(
                format!("{PEFT_PREFIX}{}", tensor_name(&m.module, which)),
                v.as_tensor().clone(),
            );
        }
    }
    for p in params.state() {
        if state.is_saved(&p.name) {
            out.insert(
                format!("{PEFT_PREFIX}{}", p.name),
                p.var.as_tensor().clone(),
            );
        }
    }
    out
}

/// PEFT's task type of a model with `num_labels` outputs (0: a language model).
pub fn task_type(num_labels: usize) -> &'static str {
    if num_labels == 0 {
        "CAUSAL_LM"
    } else {
        "SEQ_CLS"
    }
}

/// `adapter_config.json` for `params` (PEFT `LoraConfig` keys), with the base model's
/// path or Hub id and PEFT's task type (`SEQ_CLS`, `CAUSAL_LM`).
pub fn adapter_config(params: &ParamStore, base: &str, task_type: &str) -> Result<Value> {
    let state = params
        .lora
        .as_ref()
        .ok_or_else(|| Error::Msg("the model has no LoRA adapters".into()))?;
    let spec = &state.spec;
    let targets = match &spec.targets {
        Targets::List(l) => l.clone(),
        // PEFT writes the modules "all-linear" resolved to.
        Targets::AllLinear => state.modules.iter().map(|m| m.module.clone()).collect(),
    };
    let saved = state.modules_to_save();
    let saved = if saved.is_empty() {
        Value::Null
    } else {
        json!(saved)
    };
    // PEFT's flag for adapters on layers stored `(in, out)` (GPT-2's `Conv1D`): it changes
    // how PEFT merges, not the adapter's tensors.
    let fan_in_fan_out = state
        .modules
        .iter()
        .any(|m| params.transposed.contains(&format!("{}.weight", m.module)));
    Ok(json!({
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.use_rslora,
        "target_modules": targets,
        "modules_to_save": saved,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "init_lora_weights": true,
        "inference_mode": true,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
    }))
}

/// Writes the PEFT adapter directory `dir` (`adapter_config.json`,
/// `adapter_model.safetensors`) and the `extra` files (name, bytes) under a temporary name,
/// then renames it into place.
pub fn write_adapter(
    dir: &Path,
    params: &ParamStore,
    base: &str,
    task_type: &str,
    extra: &[(&str, Vec<u8>)],
) -> Result<()> {
    let cfg = adapter_config(params, base, task_type)?;
    let tmp = dir.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let text = serde_json::to_string_pretty(&cfg)
        .map_err(|e| Error::Msg(format!("cannot serialise {ADAPTER_CONFIG}: {e}")))?;
    let p = tmp.join(ADAPTER_CONFIG);
    std::fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
    crate::formats::safetensors::write_safetensors(
        &adapter_tensors(params),
        &tmp.join(ADAPTER_FILE),
    )?;
    for (name, bytes) in extra {
        let p = tmp.join(name);
        std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    Ok(())
}

/// A PEFT LoRA adapter read from its directory.
pub struct Adapter {
    /// The directory.
    pub dir: PathBuf,
    /// Its configuration.
    pub spec: LoraSpec,
    /// `task_type` (`SEQ_CLS`, `CAUSAL_LM`, ...), if given.
    pub task_type: Option<String>,
    /// `adapter_model.safetensors`'s tensors, by key.
    pub tensors: HashMap<String, Tensor>,
}

/// The model `build` makes (the family's build, as in [`build`]), with the PEFT adapter
/// directory `adapter` loaded onto it when there is one (`--adapter`).
pub fn load_with_adapter<T: AsRef<ParamStore>>(
    adapter: Option<&Path>,
    device: &Device,
    build: impl FnOnce() -> Result<T>,
) -> Result<T> {
    match adapter {
        Some(a) => read_adapter(a, device)?.load(build),
        None => build(),
    }
}

/// Reads the adapter directory `dir`: `adapter_config.json` (a LoRA configuration; what
/// ferrotune does not implement, such as a `bias` or per-module ranks, is an error naming
/// the field) and `adapter_model.safetensors`.
pub fn read_adapter(dir: &Path, device: &Device) -> Result<Adapter> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(&cfg_path, format!("not valid JSON: {e}")))?;
    let bad = |field: &str, msg: &str| Error::at(&cfg_path, None, Some(field), msg.to_string());
    let peft_type = v.get("peft_type").and_then(|x| x.as_str()).unwrap_or("");
    if peft_type != "LORA" {
        return Err(bad(
            "peft_type",
            &format!("`{peft_type}`: ferrotune loads LORA adapters only"),
        ));
    }
    let r = v
        .get("r")
        .and_then(|x| x.as_u64())
        .filter(|&r| r > 0)
        .ok_or_else(|| bad("r", "expected a whole number of at least 1"))? as usize;
    let alpha = match v.get("lora_alpha") {
        None | Some(Value::Null) => 8.0,
        Some(x) => x
            .as_f64()
            .ok_or_else(|| bad("lora_alpha", "expected a number"))?,
    };
    let dropout = match v.get("lora_dropout") {
        None | Some(Value::Null) => 0.0,
        Some(x) => x
            .as_f64()
            .ok_or_else(|| bad("lora_dropout", "expected a number"))?,
    };
    let use_rslora = v
        .get("use_rslora")
        .and_then(|x| x.as_bool())
        .unwrap_or(false);
    let targets = match v.get("target_modules") {
        Some(Value::String(s)) if s.eq_ignore_ascii_case("all-linear") => Targets::AllLinear,
        Some(Value::Array(a)) => Targets::List(
            a.iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("target_modules", "expected a list of module names"))?,
        ),
        _ => {
            return Err(bad(
                "target_modules",
                "expected a list of module names or \"all-linear\" (regular expressions are \
                 not supported)",
            ))
        }
    };
    let modules_to_save = match v.get("modules_to_save") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("modules_to_save", "expected a list of module names"))?,
        Some(_) => return Err(bad("modules_to_save", "expected a list of module names")),
    };
    // `fan_in_fan_out` (PEFT's flag for `Conv1D` layers, which ferrotune reads transposed
    // into ordinary linear layers) changes no adapter tensor: either value loads.
    if let Some(b) = v.get("bias").and_then(|x| x.as_str()) {
        if b != "none" {
            return Err(bad(
                "bias",
                &format!("`{b}` is not supported (only \"none\")"),
            ));
        }
    }
    for field in ["rank_pattern", "alpha_pattern"] {
        if let Some(Value::Object(m)) = v.get(field) {
            if !m.is_empty() {
                return Err(bad(field, "per-module ranks or alphas are not supported"));
            }
        }
    }
    for field in ["use_dora", "lora_bias"] {
        if v.get(field).and_then(|x| x.as_bool()) == Some(true) {
            return Err(bad(field, "true is not supported"));
        }
    }
    let task_type = v
        .get("task_type")
        .and_then(|x| x.as_str())
        .map(str::to_string);
    let tensors = crate::formats::safetensors::read_safetensors(&dir.join(ADAPTER_FILE), device)?;
    Ok(Adapter {
        dir: dir.to_path_buf(),
        spec: LoraSpec {
            r,
            alpha,
            dropout,
            targets,
            modules_to_save,
            use_rslora,
            seed: 0,
            base_4bit: false,
        },
        task_type,
        tensors,
    })
}

impl Adapter {
    /// Sets the adapters and modules to save of `params` (a model built with this
    /// adapter's [`LoraSpec`]) from the file. A key that names no adapter or tensor of the
    /// model, a tensor of another shape, or an adapter the file lacks is an error naming
    /// `adapter_model.safetensors` and the tensor.
    pub fn apply(&self, params: &ParamStore) -> Result<()> {
        let file = self.dir.join(ADAPTER_FILE);
        let at = |key: &str, msg: String| Error::at(&file, None, Some(key), msg);
        let state = params
            .lora
            .as_ref()
            .ok_or_else(|| Error::Msg("the model was built without LoRA".into()))?;
        let mut targets: HashMap<String, &Var> = HashMap::new();
        for m in &state.modules {
            targets.insert(tensor_name(&m.module, "A"), &m.a);
            targets.insert(tensor_name(&m.module, "B"), &m.b);
        }
        let saved: HashMap<&str, &Var> = params
            .state()
            .filter(|p| state.is_saved(&p.name))
            .map(|p| (p.name.as_str(), &p.var))
            .collect();
        let mut keys: Vec<&String> = self.tensors.keys().collect();
        keys.sort();
        let mut set: BTreeSet<String> = BTreeSet::new();
        for key in keys {
            let t = &self.tensors[key];
            let Some(name) = key.strip_prefix(PEFT_PREFIX) else {
                return Err(at(
                    key,
                    format!("key does not start with `{PEFT_PREFIX}` (not a PEFT adapter)"),
                ));
            };
            let is_lora = name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight");
            let var = if is_lora {
                *targets.get(name).ok_or_else(|| {
                    at(
                        key,
                        "no such LoRA target in the model (the adapter was trained on \
                         another base model?)"
                            .into(),
                    )
                })?
            } else {
                *saved.get(name).ok_or_else(|| {
                    at(
                        key,
                        "no such tensor among the model's modules to save (the adapter \
                         was trained on another base model?)"
                            .into(),
                    )
                })?
            };
            if t.dims() != var.dims() {
                return Err(at(
                    key,
                    format!(
                        "tensor has shape {:?}, but the model's is {:?}",
                        t.dims(),
                        var.dims()
                    ),
                ));
            }
            var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
            set.insert(name.to_string());
        }
        let missing = targets
            .keys()
            .map(String::as_str)
            .chain(saved.keys().copied())
            .filter(|n| !set.contains(*n))
            .min();
        if let Some(n) = missing {
            return Err(at(
                &format!("{PEFT_PREFIX}{n}"),
                "missing: the model has this adapter tensor, the file does not".into(),
            ));
        }
        Ok(())
    }

    /// Builds a model with this adapter (`build` runs the family's build, as in
    /// [`build`]) and loads the adapter's tensors into it.
    pub fn load<T: AsRef<ParamStore>>(&self, build: impl FnOnce() -> Result<T>) -> Result<T> {
        let loaded = self::build(Some(&self.spec), build)?;
        self.apply(loaded.as_ref())?;
        Ok(loaded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(targets: Targets, save: &[&str]) -> LoraSpec {
        LoraSpec {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets,
            modules_to_save: save.iter().map(|s| s.to_string()).collect(),
            use_rslora: false,
            seed: 0,
            base_4bit: false,
        }
    }

    /// Targets and modules to save match module names as PEFT does.
    #[test]
    fn matches_modules_as_peft() {
        let s = spec(
            Targets::List(vec!["query".into(), "value".into()]),
            &["classifier"],
        );
        assert!(s.targets("bert.encoder.layer.0.attention.self.query"));
        assert!(s.targets("query"));
        assert!(!s.targets("bert.encoder.layer.0.attention.self.key"));
        // `myquery` does not end with `.query`.
        assert!(!s.targets("bert.myquery"));
        // PEFT's `_set_trainable` matches by plain suffix: `pre_classifier` too.
        assert_eq!(
            s.saved_module("pre_classifier").as_deref(),
            Some("pre_classifier")
        );
        assert_eq!(
            s.saved_module("classifier.dense").as_deref(),
            Some("classifier")
        );
        assert_eq!(s.saved_module("bert.pooler.dense"), None);
        let all = spec(Targets::AllLinear, &["classifier"]);
        assert!(all.targets("bert.pooler.dense"));
        assert!(!all.targets("classifier"));
        assert!(!all.targets("classifier.out_proj"));
        assert!(!all.targets("lm_head"));
        assert_eq!(spec(Targets::AllLinear, &[]).scale(), 2.0);
        let mut rs = spec(Targets::AllLinear, &[]);
        rs.use_rslora = true;
        assert_eq!(rs.scale(), 4.0);
    }

    /// A's initialisation stays within PEFT's kaiming-uniform bound and spreads over it.
    #[test]
    fn a_is_kaiming_uniform() {
        let mut rng = init_rng(1);
        let a = init_a(&mut rng, 8, 64, &Device::Cpu).unwrap();
        let v: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let bound = 1.0 / 8.0;
        assert!(v.iter().all(|x| x.abs() <= bound));
        assert!(v.iter().any(|x| *x > 0.9 * bound) && v.iter().any(|x| *x < -0.9 * bound));
    }
}
