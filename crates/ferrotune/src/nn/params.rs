//! The trainable parameters of a model, in a fixed order, each in a named layer group.
//!
//! Groups drive freezing, gradual unfreezing and per-layer (discriminative) learning rates.
//! They are declared by the model as it is built ([`crate::nn::Builder::group`]), bottom to
//! top, so the layout follows the module tree rather than tensor names: the embeddings
//! (and anything else below the first layer, such as MPNet's relative position bias), one
//! group per encoder layer, then what sits on top (BERT's pooler, the task head).
//! The trainer reads only the groups' [`GroupKind`]s; no family is named outside its
//! folder.

use std::collections::HashMap;

use candle_core::{Tensor, Var};

use crate::error::Result;

/// One parameter tensor.
#[derive(Clone)]
pub struct Param {
    /// Its Hugging Face name in the exported checkpoint
    /// (`bert.encoder.layer.0.attention.self.query.weight`, `classifier.weight`, ...).
    pub name: String,
    /// The variable (shared with the model).
    pub var: Var,
    /// Its layer group (an index into [`ParamStore::groups`]).
    pub group: usize,
    /// Exempt from weight decay (biases and normalisation weights, as transformers does).
    pub no_decay: bool,
}

/// What a layer group is, for freezing and learning rates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKind {
    /// Below the first layer: embeddings, shared position biases.
    Embeddings,
    /// Backbone layer `i` (0-based from the bottom).
    Layer(usize),
    /// A pretrained layer between the backbone and the head (BERT's pooler).
    Pooler,
    /// The task head.
    Head,
    /// The pretrained weights LoRA leaves as they are ([`crate::nn::lora`]): always
    /// frozen, whatever the recipe's freezing. Not a layer: its parameters sit at every
    /// depth of the model.
    Frozen,
}

impl GroupKind {
    /// Part of the backbone (what `freeze = "backbone"` and gradual unfreezing act on).
    pub fn is_backbone(self) -> bool {
        matches!(self, GroupKind::Embeddings | GroupKind::Layer(_))
    }
}

/// A layer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Its name in logs (`embeddings`, `layer.3`, `pooler`, `head`).
    pub name: String,
    /// What it is.
    pub kind: GroupKind,
}

/// All parameters of a model, and its layer groups (bottom to top).
#[derive(Clone, Default)]
pub struct ParamStore {
    /// The parameters, in model order.
    pub params: Vec<Param>,
    /// The layer groups, bottom to top.
    pub groups: Vec<Group>,
    /// The export names of the linear layers' weights (what int8 quantizes), in model
    /// order.
    pub linear_weights: Vec<String>,
    /// Linear layers loaded as int8 weights only (from a quantized model); their weights
    /// are not among `params`.
    pub int8_layers: usize,
    /// State that is not trained but saved with the weights: batch norm's running mean
    /// and variance, updated by the forward pass in training. Exported, checkpointed and
    /// restored with the parameters; never given a gradient or an optimizer step.
    pub buffers: Vec<Param>,
    /// Export names of weights whose Hugging Face tensor is the transpose of ours (GPT-2's
    /// `Conv1D` layers store `(in, out)`; ferrotune's linear layers hold `(out, in)`).
    pub transposed: Vec<String>,
    /// The LoRA adapters and what else trains beside them (`None` without LoRA).
    pub lora: Option<crate::nn::lora::LoraState>,
    /// Frozen linear weights kept in 4 bits (`load_in_4bit`) under their export names, in
    /// ferrotune's `(out, in)` layout: not among `params` (never trained, checkpointed or
    /// copied for the best epoch); exported dequantised.
    pub q4: Vec<(String, std::sync::Arc<crate::kernels::q4::Q4Weight>)>,
}

impl ParamStore {
    /// Adds a group (groups are declared bottom to top) and returns its index. A kind
    /// declared twice returns the first group of that kind.
    pub fn add_group(&mut self, kind: GroupKind) -> usize {
        if let Some(i) = self.groups.iter().position(|g| g.kind == kind) {
            return i;
        }
        let name = match kind {
            GroupKind::Embeddings => "embeddings".to_string(),
            GroupKind::Layer(i) => format!("layer.{i}"),
            GroupKind::Pooler => "pooler".to_string(),
            GroupKind::Head => "head".to_string(),
            GroupKind::Frozen => "frozen".to_string(),
        };
        self.groups.push(Group { name, kind });
        self.groups.len() - 1
    }

    /// Number of groups.
    pub fn num_groups(&self) -> usize {
        self.groups.len()
    }

    /// Number of backbone layers (groups of kind [`GroupKind::Layer`]).
    pub fn num_layers(&self) -> usize {
        self.groups
            .iter()
            .filter(|g| matches!(g.kind, GroupKind::Layer(_)))
            .count()
    }

    /// Total number of scalar parameters (4-bit weights included).
    pub fn count(&self) -> usize {
        let q4: usize = self.q4.iter().map(|(_, q)| q.out * q.inp).sum();
        self.params
            .iter()
            .map(|p| p.var.elem_count())
            .sum::<usize>()
            + q4
    }

    /// Scalar parameters in group `g`.
    pub fn group_count(&self, g: usize) -> usize {
        self.params
            .iter()
            .filter(|p| p.group == g)
            .map(|p| p.var.elem_count())
            .sum()
    }

    /// The parameters, then the buffers: everything a checkpoint holds, in its order.
    pub fn state(&self) -> impl Iterator<Item = &Param> {
        self.params.iter().chain(&self.buffers)
    }

    /// Number of tensors a checkpoint holds (parameters and buffers).
    pub fn state_len(&self) -> usize {
        self.params.len() + self.buffers.len()
    }

    /// Every parameter's and buffer's current value, shared (for writing a checkpoint).
    pub fn current(&self) -> Vec<Tensor> {
        self.state().map(|p| p.var.as_tensor().clone()).collect()
    }

    /// A copy of every parameter's and buffer's current value (for keeping the best
    /// epoch). The frozen group's tensors (LoRA's base weights), which nothing changes, are
    /// shared rather than copied: a LoRA run keeps no second copy of its base model.
    pub fn snapshot(&self) -> Result<Vec<Tensor>> {
        Ok(self
            .params
            .iter()
            .map(|p| match self.is_frozen(p.group) {
                true => Ok(p.var.as_tensor().clone()),
                false => p.var.as_tensor().copy(),
            })
            .chain(self.buffers.iter().map(|p| p.var.as_tensor().copy()))
            .collect::<candle_core::Result<_>>()?)
    }

    /// Whether group `g` is the frozen group (LoRA's base weights: never trained).
    fn is_frozen(&self, g: usize) -> bool {
        self.groups.get(g).map(|g| g.kind) == Some(GroupKind::Frozen)
    }

    /// Sets every parameter and buffer from a [`ParamStore::snapshot`] (or another list of
    /// their values: an average of the weights), but the frozen group's: nothing changes
    /// those (and a snapshot shares them).
    pub fn restore(&self, snap: &[Tensor]) -> Result<()> {
        if snap.len() != self.state_len() {
            return Err(crate::error::Error::Msg(format!(
                "{} saved tensors for a model of {} parameters and buffers",
                snap.len(),
                self.state_len()
            )));
        }
        let params = self.params.iter().map(|p| !self.is_frozen(p.group));
        let set = params.chain(self.buffers.iter().map(|_| true));
        for ((p, t), set) in self.state().zip(snap).zip(set) {
            if set {
                p.var.set(t)?;
            }
        }
        Ok(())
    }

    /// The tensors under their export names, in the Hugging Face layout (the
    /// [`ParamStore::transposed`] ones transposed back): what an exported
    /// `model.safetensors` holds.
    pub fn export_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = self.named_tensors()?;
        for name in &self.transposed {
            if let Some(t) = out.get_mut(name) {
                *t = t.t()?.contiguous()?;
            }
        }
        Ok(out)
    }

    /// The tensors under their export names, in ferrotune's layout (4-bit weights
    /// dequantised).
    pub fn named_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out: HashMap<String, Tensor> = self
            .state()
            .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
            .collect();
        let device = self
            .params
            .first()
            .map_or(candle_core::Device::Cpu, |p| p.var.device().clone());
        for (name, q) in &self.q4 {
            let t = Tensor::from_vec(q.dequantize(), (q.out, q.inp), &device)?;
            out.insert(name.clone(), t);
        }
        Ok(out)
    }
}
