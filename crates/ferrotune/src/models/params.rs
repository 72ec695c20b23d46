//! The trainable parameters of a model, in a fixed order, with the layer group each belongs
//! to. Groups drive freezing, gradual unfreezing and per-layer learning rates.
//!
//! Groups, bottom to top: `0` = embeddings, `1..=L` = encoder layers, `L+1` = pooler,
//! `L+2` = task head.

use std::collections::HashMap;

use candle_core::{Tensor, Var};

use crate::error::Result;

/// One parameter tensor.
#[derive(Clone)]
pub struct Param {
    /// Its Hugging Face name in an exported `BertForSequenceClassification` checkpoint
    /// (`bert.encoder.layer.0.attention.self.query.weight`, `classifier.weight`, ...).
    pub name: String,
    /// The variable (shared with the model).
    pub var: Var,
    /// Its layer group.
    pub group: usize,
    /// Exempt from weight decay (biases and LayerNorm weights, as transformers does).
    pub no_decay: bool,
}

/// All parameters of a model.
#[derive(Clone)]
pub struct ParamStore {
    /// The parameters, in model order.
    pub params: Vec<Param>,
    num_layers: usize,
}

impl ParamStore {
    /// The embeddings' group.
    pub const EMBEDDINGS: usize = 0;

    /// An empty store for a model of `num_layers` encoder layers.
    pub fn new(num_layers: usize) -> Self {
        ParamStore {
            params: Vec::new(),
            num_layers,
        }
    }

    /// The group of encoder layer `i` (0-based).
    pub fn layer_group(i: usize) -> usize {
        i + 1
    }

    /// The pooler's group.
    pub fn pooler_group(&self) -> usize {
        self.num_layers + 1
    }

    /// The task head's group.
    pub fn head_group(&self) -> usize {
        self.num_layers + 2
    }

    /// Number of groups.
    pub fn num_groups(&self) -> usize {
        self.num_layers + 3
    }

    /// Number of encoder layers.
    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// Total number of scalar parameters.
    pub fn count(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }

    /// A copy of every parameter's current value (for keeping the best epoch).
    pub fn snapshot(&self) -> Result<Vec<Tensor>> {
        Ok(self
            .params
            .iter()
            .map(|p| p.var.as_tensor().copy())
            .collect::<candle_core::Result<_>>()?)
    }

    /// Sets every parameter from a [`ParamStore::snapshot`].
    pub fn restore(&self, snap: &[Tensor]) -> Result<()> {
        for (p, t) in self.params.iter().zip(snap) {
            p.var.set(t)?;
        }
        Ok(())
    }

    /// The tensors under their export names.
    pub fn named_tensors(&self) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
            .collect()
    }
}
