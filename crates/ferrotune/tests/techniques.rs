//! The fine-tuning techniques of issue 3 on a tiny random model: freezing, gradual
//! unfreezing, gradient accumulation, other task types, and recipe validation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ferrotune::predict::Predictor;
use ferrotune::testing::{write_tiny_csv, write_tiny_model, TinySpec};
use ferrotune::train::{train, Silent};
use ferrotune::TrainConfig;

fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let model = dir.join("model");
    write_tiny_model(&model, &TinySpec::default()).unwrap();
    let csv = dir.join("train.csv");
    write_tiny_csv(&csv, 48).unwrap();
    (model, csv)
}

fn config(model: &Path, data: &Path, out: &Path, sets: &[&str]) -> ferrotune::Result<TrainConfig> {
    let text = format!(
        "model_name_or_path = {:?}\ntrain_file = {:?}\nvalidation_split = 0.25\n\
         output_dir = {:?}\nper_device_train_batch_size = 8\nlearning_rate = 5e-3\n\
         num_train_epochs = 2\nmax_seq_length = 16\nseed = 3\n",
        model, data, out
    );
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    TrainConfig::from_toml_str(&text, Path::new("t.toml"), &sets)
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn frozen_weights_are_bit_identical_after_training() {
    let t = tempfile::tempdir().unwrap();
    let (model, csv) = setup(t.path());
    let out = t.path().join("run");
    let cfg = config(
        &model,
        &csv,
        &out,
        &["freeze=\"embeddings\"", "freeze_layers=1"],
    )
    .unwrap();
    train(&cfg, &mut Silent).unwrap();
    let before = tensors(&model.join("model.safetensors"));
    let after = tensors(&out.join("model/model.safetensors"));
    let mut frozen = 0;
    for (name, b) in &before {
        let a = &after[&format!("bert.{name}")];
        if name.starts_with("embeddings.") || name.starts_with("encoder.layer.0.") {
            assert!(same(a, b), "{name} is frozen but changed");
            frozen += 1;
        } else if !name.starts_with("pooler.") {
            assert!(!same(a, b), "{name} trains but did not change");
        }
    }
    assert_eq!(frozen, 5 + 16);
}

#[test]
fn gradual_unfreezing_trains_the_head_alone_first() {
    let t = tempfile::tempdir().unwrap();
    let (model, csv) = setup(t.path());
    let out = t.path().join("run");
    let cfg = config(
        &model,
        &csv,
        &out,
        &["gradual_unfreeze=true", "num_train_epochs=1"],
    )
    .unwrap();
    train(&cfg, &mut Silent).unwrap();
    let before = tensors(&model.join("model.safetensors"));
    let after = tensors(&out.join("model/model.safetensors"));
    for (name, b) in &before {
        let a = &after[&format!("bert.{name}")];
        if name.starts_with("pooler.") {
            assert!(!same(a, b), "{name}");
        } else {
            assert!(
                same(a, b),
                "{name} changed in the first gradual-unfreezing epoch"
            );
        }
    }
    // The learning rate and state of every group is logged at step 0.
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let groups = log
        .lines()
        .find(|l| l.contains("\"param_groups\""))
        .unwrap()
        .to_string();
    assert!(groups.contains("\"group\":\"layer.1\""), "{groups}");
    assert!(groups.contains("\"frozen\":true"), "{groups}");
}

#[test]
fn accumulating_k_batches_equals_one_batch_k_times_larger() {
    let t = tempfile::tempdir().unwrap();
    let (model, csv) = setup(t.path());
    let common = [
        "num_train_epochs=1",
        "max_train_samples=8",
        "hidden_dropout_prob=0.0",
        "attention_probs_dropout_prob=0.0",
        "classifier_dropout=0.0",
        "lr_scheduler_type=\"constant\"",
        // SGD's update is linear in the gradient, so the comparison measures the gradient
        // itself (Adam's first step, g/|g|, would magnify rounding in near-zero entries).
        "optimizer=\"sgd\"",
        "learning_rate=0.5",
        "max_grad_norm=0",
    ];
    let run = |name: &str, steps: usize, extra: &[&str]| {
        let out = t.path().join(name);
        let mut sets: Vec<&str> = common.to_vec();
        sets.extend_from_slice(extra);
        let s = train(&config(&model, &csv, &out, &sets).unwrap(), &mut Silent).unwrap();
        assert_eq!(s.steps, steps);
        tensors(&out.join("model/model.safetensors"))
    };
    let big = run("big", 1, &["per_device_train_batch_size=8"]);
    let acc = run(
        "acc",
        1,
        &[
            "per_device_train_batch_size=4",
            "gradient_accumulation_steps=2",
        ],
    );
    let single = run(
        "small",
        2,
        &["per_device_train_batch_size=4", "num_train_epochs=1"],
    );
    let mut max_diff = 0f32;
    let mut single_diff = 0f32;
    for (name, b) in &big {
        let d = (b - &acc[name]).unwrap().abs().unwrap().max_all().unwrap();
        max_diff = max_diff.max(d.to_scalar::<f32>().unwrap());
        let d = (b - &single[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        single_diff = single_diff.max(d.to_scalar::<f32>().unwrap());
    }
    assert!(max_diff < 1e-6, "accumulated update differs by {max_diff}");
    // Without accumulation, batches of 4 take two different steps: clearly different.
    assert!(single_diff > 1e-3, "{single_diff}");
}

#[test]
fn regression_trains_exports_and_predicts_values() {
    let t = tempfile::tempdir().unwrap();
    let (model, _) = setup(t.path());
    let data = t.path().join("reg.csv");
    let mut s = String::from("text,score\n");
    for i in 0..40 {
        let (w, v) = if i % 2 == 0 {
            ("good", 0.9)
        } else {
            ("bad", 0.1)
        };
        s.push_str(&format!("the film was {w} .,{v}\n"));
    }
    std::fs::write(&data, s).unwrap();
    let out = t.path().join("run");
    let cfg = config(
        &model,
        &data,
        &out,
        &[
            "problem_type=\"regression\"",
            "label_column=\"score\"",
            "loss=\"huber\"",
            "num_train_epochs=4",
        ],
    )
    .unwrap();
    let summary = train(&cfg, &mut Silent).unwrap();
    let m = &summary.epochs[summary.best_epoch - 1];
    for k in ["mse", "mae", "rmse", "r2", "pearson", "spearman", "loss"] {
        assert!(m.get(k).is_finite(), "{k} missing: {m:?}");
    }
    let cfg_json = std::fs::read_to_string(out.join("model/config.json")).unwrap();
    assert!(
        cfg_json.contains("\"problem_type\": \"regression\""),
        "{cfg_json}"
    );
    let p = Predictor::load(&out.join("model")).unwrap();
    let ex = ferrotune::data::reader::read_examples(
        &data,
        &ferrotune::data::reader::ReaderOptions {
            label_column: None,
            ..Default::default()
        },
    )
    .unwrap();
    let outputs = p.predict_probs(&ex[..2], |_| {}).unwrap();
    let text = String::from_utf8(p.format(&outputs, false).unwrap()).unwrap();
    assert!(text.starts_with("{\"value\":"), "{text}");
}

#[test]
fn multi_label_trains_with_label_lists() {
    let t = tempfile::tempdir().unwrap();
    let (model, _) = setup(t.path());
    let data = t.path().join("ml.jsonl");
    let mut s = String::new();
    for i in 0..40 {
        let labels = match i % 3 {
            0 => "[\"plot\", \"acting\"]",
            1 => "[\"plot\"]",
            _ => "[]",
        };
        let text = [
            "the plot and acting were good",
            "the plot was fine",
            "a film",
        ][i % 3];
        s.push_str(&format!("{{\"text\": \"{text}\", \"label\": {labels}}}\n"));
    }
    std::fs::write(&data, s).unwrap();
    let out = t.path().join("run");
    let cfg = config(
        &model,
        &data,
        &out,
        &[
            "problem_type=\"multi_label_classification\"",
            "num_train_epochs=3",
        ],
    )
    .unwrap();
    let summary = train(&cfg, &mut Silent).unwrap();
    let m = &summary.epochs[0];
    for k in ["micro_f1", "macro_f1", "subset_accuracy", "loss"] {
        assert!(m.get(k).is_finite(), "{k} missing: {m:?}");
    }
    let p = Predictor::load(&out.join("model")).unwrap();
    assert_eq!(p.labels, ["acting", "plot"]);
    let outputs = p
        .predict_probs(
            &ferrotune::data::reader::read_examples(&data, &Default::default()).unwrap()[..1],
            |_| {},
        )
        .unwrap();
    let text = String::from_utf8(p.format(&outputs, false).unwrap()).unwrap();
    assert!(text.starts_with("{\"labels\":"), "{text}");
}

#[test]
fn bad_values_are_rejected_when_the_recipe_is_read() {
    let t = tempfile::tempdir().unwrap();
    let m = t.path().join("no-model-here");
    let d = t.path().join("no-data-here.csv");
    let o = t.path().join("run");
    let err = |sets: &[&str]| config(&m, &d, &o, sets).unwrap_err().to_string();
    let e = err(&["loss=\"focal\"", "focal_gamma=-1"]);
    assert!(e.contains("`focal_gamma`"), "{e}");
    for v in ["0", "1.5", "-0.1"] {
        let e = err(&[&format!("layerwise_lr_decay={v}")]);
        assert!(
            e.contains("`layerwise_lr_decay`") && e.contains("(0, 1]"),
            "{e}"
        );
    }
    let e = err(&["loss=\"hinge\""]);
    assert!(e.contains("`loss`"), "{e}");
    let e = err(&["lr_scheduler_type=\"warmup_cosine\""]);
    assert!(e.contains("`lr_scheduler_type`"), "{e}");
    let e = err(&["problem_type=\"regression\"", "loss=\"cross_entropy\""]);
    assert!(e.contains("`loss`") && e.contains("regression"), "{e}");
}

#[test]
fn data_errors_come_before_the_model_is_loaded() {
    let t = tempfile::tempdir().unwrap();
    let missing_model = t.path().join("no-model-here");
    // Regression with a label that is not a number.
    let data = t.path().join("reg.csv");
    std::fs::write(&data, "text,label\na,0.5\nb,high\nc,0.1\nd,0.2\n").unwrap();
    let cfg = config(
        &missing_model,
        &data,
        &t.path().join("r1"),
        &["problem_type=\"regression\""],
    )
    .unwrap();
    let e = train(&cfg, &mut Silent).unwrap_err().to_string();
    assert!(
        e.contains("reg.csv:3") && e.contains("`high`") && e.contains("not a number"),
        "{e}"
    );
    // The same row is skipped with on_bad_row = "skip" (then the missing model is reported).
    let cfg = config(
        &missing_model,
        &data,
        &t.path().join("r2"),
        &["problem_type=\"regression\"", "on_bad_row=\"skip\""],
    )
    .unwrap();
    let e = train(&cfg, &mut Silent).unwrap_err().to_string();
    assert!(e.contains("no-model-here"), "{e}");
    let skipped = std::fs::read_to_string(t.path().join("r2/skipped_rows.jsonl")).unwrap();
    assert!(skipped.contains("\"line\":3"), "{skipped}");
    // Multi-label with an evaluation label never seen in training.
    let tr = t.path().join("tr.jsonl");
    let ev = t.path().join("ev.jsonl");
    std::fs::write(
        &tr,
        "{\"text\":\"a\",\"label\":[\"x\"]}\n{\"text\":\"b\",\"label\":[\"y\"]}\n",
    )
    .unwrap();
    std::fs::write(&ev, "{\"text\":\"c\",\"label\":[\"x\",\"z\"]}\n").unwrap();
    let cfg = config(
        &missing_model,
        &tr,
        &t.path().join("r3"),
        &[
            "problem_type=\"multi_label_classification\"",
            &format!("validation_file={:?}", ev.to_string_lossy()),
        ],
    )
    .unwrap();
    let e = train(&cfg, &mut Silent).unwrap_err().to_string();
    assert!(e.contains("ev.jsonl:1") && e.contains("`z`"), "{e}");
}

/// Every family runs every task type with the techniques of the recipe: freezing (frozen
/// weights bit-identical, the rest changed), gradual unfreezing, discriminative learning
/// rates, gradient accumulation, L1/L2 penalties, focal, smooth-L1 and label smoothing,
/// class weights, SGD — and exports a model its predictor reloads.
#[test]
fn every_family_runs_every_task_and_technique() {
    for family in ferrotune::families::text_families() {
        let t = tempfile::tempdir().unwrap();
        let model = t.path().join("model");
        write_tiny_model(&model, &TinySpec::of(family.model_type())).unwrap();
        let prefix = ferrotune::testing::backbone_prefix(family.model_type());
        let (csv, ml, reg) = (
            t.path().join("train.csv"),
            t.path().join("ml.jsonl"),
            t.path().join("reg.csv"),
        );
        write_tiny_csv(&csv, 48).unwrap();
        let mut s = String::new();
        for i in 0..24 {
            let (text, labels) = [
                ("the plot and acting were good", "[\"plot\", \"acting\"]"),
                ("the plot was fine", "[\"plot\"]"),
                ("a film", "[]"),
            ][i % 3];
            s.push_str(&format!("{{\"text\": \"{text}\", \"label\": {labels}}}\n"));
        }
        std::fs::write(&ml, s).unwrap();
        let mut s = String::from("text,label\n");
        for i in 0..24 {
            let (w, v) = [("good", 0.9), ("bad", 0.1)][i % 2];
            s.push_str(&format!("the film was {w} .,{v}\n"));
        }
        std::fs::write(&reg, s).unwrap();
        let cases: [(&str, &Path, &[&str]); 3] = [
            (
                "single",
                &csv,
                &[
                    "freeze=\"embeddings\"",
                    "freeze_layers=1",
                    "layerwise_lr_decay=0.8",
                    "head_learning_rate=1e-2",
                    "label_smoothing=0.1",
                    "class_weights=\"balanced\"",
                    "l2_penalty=1e-4",
                ],
            ),
            (
                "multi",
                &ml,
                &[
                    "problem_type=\"multi_label_classification\"",
                    "loss=\"focal\"",
                    "gradient_accumulation_steps=2",
                    "gradual_unfreeze=true",
                    "l1_penalty=1e-5",
                ],
            ),
            (
                "regression",
                &reg,
                &[
                    "problem_type=\"regression\"",
                    "loss=\"smooth_l1\"",
                    "optimizer=\"sgd\"",
                    "momentum=0.9",
                    "pooling=\"mean\"",
                ],
            ),
        ];
        for (name, data, sets) in cases {
            let out = t.path().join(name);
            // Mean pooling where the family's head reads it (decoders read the last token).
            let mean = family.poolings().contains(&ferrotune::nn::Pooling::Mean);
            let sets: Vec<&str> = sets
                .iter()
                .copied()
                .filter(|s| mean || !s.starts_with("pooling="))
                .collect();
            let cfg = config(&model, data, &out, &sets).unwrap();
            let s = train(&cfg, &mut Silent)
                .unwrap_or_else(|e| panic!("{} {name}: {e}", family.name()));
            let m = &s.epochs[0];
            assert!(m.get("loss").is_finite(), "{} {name}: {m:?}", family.name());
            let p = Predictor::load(&out.join("model")).unwrap();
            assert_eq!(p.family.model_type(), family.model_type());
            let ex = ferrotune::data::reader::read_examples(data, &Default::default()).unwrap();
            assert_eq!(p.predict_probs(&ex[..3], |_| {}).unwrap().len(), 3);
            if name == "single" {
                // The embeddings and the first layer are frozen: bit-identical.
                let before = tensors(&model.join("model.safetensors"));
                let after = tensors(&out.join("model/model.safetensors"));
                let mut frozen = 0;
                for (k, b) in &before {
                    let a = &after[&format!("{prefix}{k}")];
                    // The first layer and the embeddings, as each family names them.
                    let first = ["layer.0.", "layers.0.", "h.0."]
                        .iter()
                        .any(|l| k.contains(l))
                        || ["embeddings.", "embed_tokens.", "wte.", "wpe."]
                            .iter()
                            .any(|e| k.starts_with(e));
                    let bias_table = k.contains("relative_attention_bias");
                    if first || bias_table {
                        assert!(same(a, b), "{}: {k} is frozen but changed", family.name());
                        frozen += 1;
                    } else if !k.contains("pooler") && !k.contains("token_type") {
                        assert!(
                            !same(a, b),
                            "{}: {k} trains but did not change",
                            family.name()
                        );
                    }
                }
                assert!(frozen > 0);
            }
        }
    }
}
