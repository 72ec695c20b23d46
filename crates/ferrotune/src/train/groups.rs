//! Per-group training settings: discriminative (layer-wise) learning rates, freezing and
//! gradual unfreezing. They read only the layer groups' kinds ([`GroupKind`]), which each
//! model declares as it is built, bottom to top — never tensor names or a family.

use serde_json::json;

use crate::config::{FreezeMode, TrainConfig};
use crate::error::Result;
use crate::nn::{Group, GroupKind, ParamStore};
use crate::train::log::{MetricsLog, Progress};

/// How far below the top a backbone group is: the top layer is 1, layer `i` of `layers`
/// is `layers − i`, the embeddings `layers + 1`. `None` for groups above the backbone.
pub fn depth_from_top(kind: GroupKind, layers: usize) -> Option<usize> {
    match kind {
        GroupKind::Embeddings => Some(layers + 1),
        GroupKind::Layer(i) => Some(layers.saturating_sub(i)),
        GroupKind::Pooler | GroupKind::Head | GroupKind::Frozen => None,
    }
}

fn layer_count(groups: &[Group]) -> usize {
    groups
        .iter()
        .filter(|g| matches!(g.kind, GroupKind::Layer(_)))
        .count()
}

/// The learning rate of each group before scheduling: discriminative
/// (`layerwise_lr_decay`) and `head_learning_rate`. A backbone group `d` below the top
/// ([`depth_from_top`]) gets `lr·decay^d`; the pooler and head get `head_learning_rate`
/// (default `lr`).
pub fn group_learning_rates(cfg: &TrainConfig, groups: &[Group]) -> Vec<f64> {
    let lr = cfg.learning_rate;
    let head = cfg.head_learning_rate.unwrap_or(lr);
    let layers = layer_count(groups);
    groups
        .iter()
        .map(|g| match depth_from_top(g.kind, layers) {
            Some(d) => lr * cfg.layerwise_lr_decay.powi(d as i32),
            None => head,
        })
        .collect()
}

/// Which groups are frozen at an epoch (1-based) and step: the recipe's fixed freezing,
/// the whole backbone in the first `freeze_epochs`, and with `gradual_unfreeze` every
/// backbone group not yet unfrozen. Gradual unfreezing starts
/// with what is above the backbone alone (pooler, head) and unfreezes one backbone group
/// per epoch (or every `unfreeze_every_steps` steps) from the top layer down to the
/// embeddings.
pub fn frozen_groups(cfg: &TrainConfig, groups: &[Group], epoch: usize, step: usize) -> Vec<bool> {
    let layers = layer_count(groups);
    let unfrozen = cfg
        .gradual_unfreeze
        .then(|| match cfg.unfreeze_every_steps {
            Some(k) => step / k,
            None => epoch.saturating_sub(1),
        });
    groups
        .iter()
        .map(|g| {
            let fixed = match (cfg.freeze, g.kind) {
                (FreezeMode::Embeddings, GroupKind::Embeddings) => true,
                (FreezeMode::Backbone, k) => k.is_backbone(),
                _ => false,
            };
            let first_layers = match g.kind {
                GroupKind::Embeddings => cfg.freeze_layers > 0,
                GroupKind::Layer(i) => i < cfg.freeze_layers,
                _ => false,
            };
            let not_yet = match (unfrozen, depth_from_top(g.kind, layers)) {
                (Some(u), Some(d)) => d > u,
                _ => false,
            };
            // fastai's `fine_tune`: the head alone for the first `freeze_epochs`.
            let head_only = epoch <= cfg.freeze_epochs && g.kind.is_backbone();
            // LoRA's base weights never train.
            let base = g.kind == GroupKind::Frozen;
            fixed || first_layers || not_yet || head_only || base
        })
        .collect()
}

/// Logs each parameter group's learning rate and whether it is frozen (and, at the start
/// or when something is frozen, which groups train).
pub fn log_groups(
    log: &mut MetricsLog,
    params: &ParamStore,
    group_lr: &[f64],
    frozen: &[bool],
    step: usize,
    progress: &mut dyn Progress,
) -> Result<()> {
    let groups: Vec<serde_json::Value> = params
        .groups
        .iter()
        .enumerate()
        .map(|(g, group)| {
            json!({
                "group": group.name,
                "learning_rate": group_lr[g],
                "frozen": frozen[g],
                "parameters": params.group_count(g),
            })
        })
        .collect();
    log.line(json!({"split": "param_groups", "step": step, "groups": groups}))?;
    let trainable: Vec<&str> = params
        .groups
        .iter()
        .zip(frozen)
        .filter(|(_, &f)| !f)
        .map(|(g, _)| g.name.as_str())
        .collect();
    if step == 0 || frozen.iter().any(|&f| f) {
        progress.message(&format!(
            "step {step}: training {} of {} parameter groups ({})",
            trainable.len(),
            params.num_groups(),
            trainable.join(", ")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(sets: &[&str]) -> TrainConfig {
        let text = "model_name_or_path = \"m\"\ntrain_file = \"t.csv\"\nvalidation_split = 0.2\n";
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        TrainConfig::from_toml_str(text, Path::new("t.toml"), &sets).unwrap()
    }

    /// BERT's layout with `layers` layers: embeddings, layers, pooler, head.
    fn bert_like(layers: usize) -> Vec<Group> {
        let mut s = ParamStore::default();
        s.add_group(GroupKind::Embeddings);
        (0..layers).for_each(|i| {
            s.add_group(GroupKind::Layer(i));
        });
        s.add_group(GroupKind::Pooler);
        s.add_group(GroupKind::Head);
        s.groups
    }

    #[test]
    fn layerwise_learning_rates_follow_the_formula() {
        let c = cfg(&[
            "learning_rate=1e-4",
            "layerwise_lr_decay=0.5",
            "head_learning_rate=1e-3",
        ]);
        let lr = group_learning_rates(&c, &bert_like(3));
        // groups: embeddings, layer.0, layer.1, layer.2, pooler, head
        let want = [
            1e-4 * 0.0625,
            1e-4 * 0.125,
            1e-4 * 0.25,
            1e-4 * 0.5,
            1e-3,
            1e-3,
        ];
        for (a, b) in lr.iter().zip(want) {
            assert!((a - b).abs() < 1e-15, "{lr:?}");
        }
        assert_eq!(
            group_learning_rates(&cfg(&[]), &bert_like(2)),
            vec![5e-5; 5]
        );
    }

    #[test]
    fn freezing_and_gradual_unfreezing_groups() {
        let f = |sets: &[&str], epoch, step| frozen_groups(&cfg(sets), &bert_like(3), epoch, step);
        let (t, o) = (true, false);
        assert_eq!(f(&[], 1, 0), [o, o, o, o, o, o]);
        assert_eq!(f(&["freeze=\"embeddings\""], 1, 0), [t, o, o, o, o, o]);
        assert_eq!(f(&["freeze=\"backbone\""], 1, 0), [t, t, t, t, o, o]);
        assert_eq!(f(&["freeze_layers=2"], 1, 0), [t, t, t, o, o, o]);
        assert_eq!(f(&["freeze_layers=9"], 1, 0), [t, t, t, t, o, o]);
        let g = ["gradual_unfreeze=true"];
        assert_eq!(f(&g, 1, 0), [t, t, t, t, o, o]);
        assert_eq!(f(&g, 2, 0), [t, t, t, o, o, o]);
        assert_eq!(f(&g, 4, 0), [t, o, o, o, o, o]);
        assert_eq!(f(&g, 9, 0), [o, o, o, o, o, o]);
        let s = ["gradual_unfreeze=true", "unfreeze_every_steps=10"];
        assert_eq!(f(&s, 1, 9), [t, t, t, t, o, o]);
        assert_eq!(f(&s, 1, 10), [t, t, t, o, o, o]);
        // Permanently frozen groups stay frozen.
        let p = ["gradual_unfreeze=true", "freeze=\"embeddings\""];
        assert_eq!(f(&p, 9, 0), [t, o, o, o, o, o]);
        // fastai's fine_tune: the head (and pooler) alone for `freeze_epochs`, then all.
        let ft = ["freeze_epochs=2", "num_train_epochs=4"];
        assert_eq!(f(&ft, 1, 0), [t, t, t, t, o, o]);
        assert_eq!(f(&ft, 2, 99), [t, t, t, t, o, o]);
        assert_eq!(f(&ft, 3, 0), [o, o, o, o, o, o]);
        let ft = ["freeze_epochs=1", "num_train_epochs=3", "freeze_layers=1"];
        assert_eq!(f(&ft, 2, 0), [t, t, o, o, o, o]);
    }

    /// A layout without a pooler (RoBERTa, MPNet, DistilBERT): the same rules by kind.
    #[test]
    fn groups_without_a_pooler_follow_the_same_rules() {
        let mut s = ParamStore::default();
        s.add_group(GroupKind::Embeddings);
        s.add_group(GroupKind::Layer(0));
        s.add_group(GroupKind::Layer(1));
        s.add_group(GroupKind::Head);
        let (t, o) = (true, false);
        let c = cfg(&["freeze=\"backbone\""]);
        assert_eq!(frozen_groups(&c, &s.groups, 1, 0), [t, t, t, o]);
        let c = cfg(&["gradual_unfreeze=true"]);
        assert_eq!(frozen_groups(&c, &s.groups, 2, 0), [t, t, o, o]);
        let c = cfg(&["layerwise_lr_decay=0.5", "learning_rate=1.0"]);
        assert_eq!(group_learning_rates(&c, &s.groups), [0.125, 0.25, 0.5, 1.0]);
    }
}
