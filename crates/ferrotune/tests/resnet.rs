//! ResNet in both libraries' formats: tiny random checkpoints written under
//! transformers' names and under timm's load to the same logits; one backward reaches
//! every unfrozen tensor; an export reads back in the format it came in with the same
//! logits; a classifier of another size than the config says is an error.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use ferrotune::artifact::ExportInfo;
use ferrotune::export::{export_model, ExportSpec};
use ferrotune::families::{self, resnet, HeadSpec, Loaded};
use ferrotune::nn::{Batch, Ctx, GroupKind, PixelBatch, Pooling};
use ferrotune::testing::{tiny_resnet_config, write_tiny_resnet};

fn pixels(n: usize, side: usize, seed: u64) -> Batch {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n * side * side * 3)
        .map(|_| rng.random_range(-2.0f32..2.0))
        .collect();
    Batch::Pixels(PixelBatch {
        pixels: Tensor::from_vec(v, (n, side, side, 3), &Device::Cpu).unwrap(),
    })
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn load(dir: &Path, classes: usize) -> Loaded {
    families::load(dir, &HeadSpec::new(classes), 0, &Device::Cpu)
        .unwrap()
        .2
}

fn logits(m: &Loaded, x: &Batch) -> Vec<f32> {
    values(&m.model.forward(&mut Ctx::eval(), x).unwrap())
}

fn tensors(dir: &Path) -> HashMap<String, Tensor> {
    ferrotune::formats::safetensors::read_safetensors(&dir.join("model.safetensors"), &Device::Cpu)
        .unwrap()
}

/// The same random weights under transformers' names (`config.json` with `model_type:
/// "resnet"`) and timm's (`architecture`, `model_args`) give the same logits, bit for bit,
/// for basic and bottleneck blocks; so do timm's tensors beside transformers' config
/// (renamed on loading). The layout is stem, four stages, head.
#[test]
fn both_conventions_load_to_the_same_logits() {
    for bottleneck in [false, true] {
        let t = tempfile::tempdir().unwrap();
        let (hf, timm) = (t.path().join("hf"), t.path().join("timm"));
        write_tiny_resnet(&hf, bottleneck, false, 5, 9).unwrap();
        write_tiny_resnet(&timm, bottleneck, true, 5, 9).unwrap();
        // The files hold the names of their library.
        let (a, b) = (tensors(&hf), tensors(&timm));
        assert!(a.contains_key("resnet.embedder.embedder.convolution.weight"));
        assert!(
            a.contains_key("resnet.encoder.stages.0.layers.0.shortcut.normalization.running_var")
        );
        assert!(a.contains_key("classifier.1.weight"));
        assert!(b.contains_key("conv1.weight") && b.contains_key("fc.bias"));
        assert!(b.contains_key("layer1.0.downsample.1.running_mean"));
        assert_eq!(
            b.contains_key("layer1.0.conv3.weight"),
            bottleneck,
            "a bottleneck block has a third convolution"
        );
        assert_eq!(a.len(), b.len());
        let c = tiny_resnet_config(bottleneck, false);
        for (k, v) in resnet::other_names(&c, &a) {
            assert_eq!(values(&v), values(&b[&k]), "{k}");
        }
        let x = pixels(2, 37, 1);
        let (m1, m2) = (load(&hf, 5), load(&timm, 5));
        assert!(!m1.new_head && !m2.new_head);
        let (l1, l2) = (logits(&m1, &x), logits(&m2, &x));
        assert_eq!(l1.len(), 10);
        assert!(l1.iter().any(|v| (v - l1[0]).abs() > 1e-3), "{l1:?}");
        assert_eq!(l1, l2, "bottleneck = {bottleneck}");
        // timm's tensors beside transformers' config.
        std::fs::copy(timm.join("model.safetensors"), hf.join("model.safetensors")).unwrap();
        assert_eq!(logits(&load(&hf, 5), &x), l1);
        let kinds: Vec<GroupKind> = m1.params.groups.iter().map(|g| g.kind).collect();
        let mut want = vec![GroupKind::Embeddings];
        want.extend((0..4).map(GroupKind::Layer));
        want.push(GroupKind::Head);
        assert_eq!(kinds, want);
        // The last feature map: 37 → 19 (stem) → 10 (max pool) → 10, 5, 3, 2.
        let h = m1.model.hidden_states(&mut Ctx::eval(), &x).unwrap();
        assert_eq!(h.dims(), [2, 4, if bottleneck { 32 } else { 16 }]);
    }
}

/// One training step: every trainable tensor of an unfrozen group gets a non-zero
/// gradient (shortcuts and bottlenecks included), frozen groups none and unchanged
/// batch-norm statistics, while the others' statistics move.
#[test]
fn gradients_reach_every_unfrozen_tensor_and_no_frozen_one() {
    for bottleneck in [false, true] {
        let t = tempfile::tempdir().unwrap();
        write_tiny_resnet(t.path(), bottleneck, bottleneck, 3, 4).unwrap();
        let loaded = load(t.path(), 3);
        let params = &loaded.params;
        let frozen: Vec<bool> = params
            .groups
            .iter()
            .map(|g| matches!(g.kind, GroupKind::Embeddings | GroupKind::Layer(0)))
            .collect();
        let before = params.snapshot().unwrap();
        let x = pixels(3, 33, 2);
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(1);
        let mut ctx = Ctx {
            train: true,
            frozen: &frozen,
            rng: Some(&mut rng),
            ..Ctx::eval()
        };
        let y = loaded.model.forward(&mut ctx, &x).unwrap();
        let probe = Tensor::new(
            &[[1f32, -2.0, 0.5], [0.3, 0.1, -1.0], [2.0, 0.0, 1.0]],
            &Device::Cpu,
        )
        .unwrap();
        let grads = (y * probe).unwrap().sum_all().unwrap().backward().unwrap();
        for p in &params.params {
            let g = grads.get(p.var.as_tensor());
            if frozen[p.group] {
                assert!(g.is_none(), "{} is frozen but has a gradient", p.name);
            } else {
                let g = g.unwrap_or_else(|| panic!("{} has no gradient", p.name));
                assert!(
                    values(g).iter().any(|&v| v != 0.0),
                    "{}: zero gradient",
                    p.name
                );
            }
        }
        let after = params.snapshot().unwrap();
        let n = params.params.len();
        assert!(!params.buffers.is_empty());
        for (i, b) in params.buffers.iter().enumerate() {
            let same = values(&before[n + i]) == values(&after[n + i]);
            assert_eq!(same, frozen[b.group], "{}", b.name);
        }
    }
}

/// Exported (with a new head of 3 classes) and read back, the model gives the same
/// logits bit for bit, in the format it came in: transformers' `architectures` and
/// names, or timm's `architecture`, `model_args`, `num_classes`, `label_names` and names.
#[test]
fn export_round_trips_in_the_format_it_came_in() {
    for timm in [false, true] {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("base");
        write_tiny_resnet(&base, !timm, timm, 7, 5).unwrap();
        if timm {
            // As timm's `save_for_hf` writes it: the class count among the arguments too.
            let p = base.join("config.json");
            let mut c: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            c["model_args"]["num_classes"] = serde_json::json!(7);
            std::fs::write(&p, c.to_string()).unwrap();
        }
        let (cfg, fam, loaded) = families::load(&base, &HeadSpec::new(3), 1, &Device::Cpu).unwrap();
        assert!(
            loaded.new_head,
            "a 7-class checkpoint gets a new 3-class head"
        );
        let labels: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let out = t.path().join("model");
        export_model(
            &out,
            &ExportSpec {
                base: &cfg,
                family: fam,
                source_dir: &base,
                params: &loaded.params,
                tokenizer: None,
                labels: &labels,
                problem_type: "single_label_classification",
                info: ExportInfo::defaults(Pooling::Mean, 224),
                card: None,
            },
        )
        .unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        let names = tensors(&out);
        if timm {
            assert_eq!(json["architecture"], "resnet18");
            assert_eq!(json["num_classes"], 3);
            assert_eq!(json["label_names"], serde_json::json!(["a", "b", "c"]));
            assert_eq!(
                json["model_args"]["layers"],
                serde_json::json!([2, 1, 1, 1])
            );
            assert_eq!(json["model_args"]["num_classes"], 3);
            assert!(names.contains_key("fc.weight") && names.contains_key("layer4.0.bn2.bias"));
        } else {
            assert_eq!(json["model_type"], "resnet");
            assert_eq!(
                json["architectures"],
                serde_json::json!(["ResNetForImageClassification"])
            );
            assert_eq!(json["num_labels"], 3);
            assert!(json.get("num_classes").is_none());
            assert!(names.contains_key("classifier.1.weight"));
            assert!(
                names.contains_key("resnet.encoder.stages.3.layers.0.layer.2.convolution.weight")
            );
        }
        let back = load(&out, 3);
        assert!(!back.new_head);
        let x = pixels(2, 29, 3);
        assert_eq!(logits(&loaded, &x), logits(&back, &x), "timm = {timm}");
        assert_eq!(back.params.named_tensors().unwrap().len(), names.len());
    }
}

/// A model file whose classifier has another size than its config declares (timm's
/// `num_classes`, transformers' `id2label` or `num_labels`) is a one-line error naming
/// the config file, the field and the model file, not a silently new head.
#[test]
fn a_classifier_of_another_size_than_the_config_says_is_an_error() {
    let t = tempfile::tempdir().unwrap();
    for (timm, field, value) in [
        (true, "num_classes", serde_json::json!(4)),
        (false, "num_labels", serde_json::json!(4)),
        (false, "id2label", serde_json::json!({"0": "x", "1": "y"})),
    ] {
        let dir = t.path().join(field);
        write_tiny_resnet(&dir, false, timm, 5, 1).unwrap();
        let p = dir.join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        cfg[field] = value;
        std::fs::write(&p, cfg.to_string()).unwrap();
        let e = match families::load(&dir, &HeadSpec::new(5), 0, &Device::Cpu) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{field}: a mismatched classifier loaded"),
        };
        assert!(
            e.contains("config.json")
                && e.contains(&format!("`{field}`"))
                && e.contains("model.safetensors")
                && e.contains("has 5")
                && !e.contains('\n'),
            "{e}"
        );
    }
}

/// Configuration fields ferrotune's ResNet does not have are errors naming the field.
#[test]
fn unsupported_config_fields_are_named() {
    let t = tempfile::tempdir().unwrap();
    for (timm, key, value, needle) in [
        (false, "hidden_act", serde_json::json!("gelu"), "hidden_act"),
        (false, "layer_type", serde_json::json!("wide"), "layer_type"),
        (false, "depths", serde_json::json!([1, 1]), "hidden_sizes"),
        (
            true,
            "model_args",
            serde_json::json!({"stem_type": "deep"}),
            "model_args.stem_type",
        ),
    ] {
        let dir = t.path().join(key);
        write_tiny_resnet(&dir, false, timm, 2, 1).unwrap();
        let p = dir.join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        cfg[key] = value;
        std::fs::write(&p, cfg.to_string()).unwrap();
        let e = match families::load(&dir, &HeadSpec::new(2), 0, &Device::Cpu) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{key}: loaded"),
        };
        assert!(e.contains("config.json") && e.contains(needle), "{e}");
    }
}
