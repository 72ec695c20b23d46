//! End to end on a tiny random model written in the real file formats: train, evaluate,
//! export, reload, predict; determinism; data errors.

use std::path::{Path, PathBuf};

use ferrotune::predict::Predictor;
use ferrotune::testing::{write_tiny_csv, write_tiny_model, TinySpec};
use ferrotune::train::{train, Silent};
use ferrotune::TrainConfig;

fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let model = dir.join("model");
    write_tiny_model(&model, &TinySpec::default()).unwrap();
    let csv = dir.join("train.csv");
    write_tiny_csv(&csv, 96).unwrap();
    (model, csv)
}

/// metrics.jsonl without its wall-clock lines (`throughput`), which no two runs share.
fn without_timings(metrics: &str) -> String {
    metrics
        .lines()
        .filter(|l| !l.contains("\"split\":\"throughput\""))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn recipe(model: &Path, csv: &Path, out: &Path, extra: &str) -> TrainConfig {
    // `extra` holds `key = value` lines that override the base recipe.
    let sets: Vec<String> = extra.lines().map(|l| l.replacen(" = ", "=", 1)).collect();
    let text = format!(
        "model_name_or_path = {:?}\ntrain_file = {:?}\nvalidation_split = 0.25\n\
         output_dir = {:?}\nper_device_train_batch_size = 8\nlearning_rate = 5e-3\n\
         num_train_epochs = 6\nwarmup_ratio = 0.1\nweight_decay = 0.01\nmax_seq_length = 16\n\
         logging_steps = 5\nseed = 3\n",
        model, csv, out
    );
    TrainConfig::from_toml_str(&text, Path::new("test.toml"), &sets).unwrap()
}

#[test]
fn trains_exports_and_predicts_the_same() {
    let t = tempfile::tempdir().unwrap();
    let (model, csv) = setup(t.path());
    let out = t.path().join("run");
    let cfg = recipe(&model, &csv, &out, "");
    let summary = train(&cfg, &mut Silent).unwrap();
    assert_eq!(summary.epochs.len(), 6);
    // The task is separable by one word; the tiny model must learn it.
    let best = &summary.epochs[summary.best_epoch - 1];
    assert!(best.get("accuracy") >= 0.9, "{:?}", summary.epochs);

    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let evals: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["split"] == "eval")
        .collect();
    assert_eq!(evals.len(), 6);
    assert_eq!(evals[0]["epoch"], 1);
    assert!(metrics.contains("\"split\":\"train\""));
    assert!(out.join("split.json").exists());
    assert!(out.join("recipe.resolved.toml").exists());

    // The export is a Hugging Face directory, and predicting with it reproduces the
    // trainer's evaluation of the best epoch.
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model/config.json")).unwrap())
            .unwrap();
    assert_eq!(
        cfg_json["architectures"][0],
        "BertForSequenceClassification"
    );
    assert_eq!(cfg_json["id2label"]["0"], "neg");
    assert_eq!(cfg_json["label2id"]["pos"], 1);
    assert_eq!(cfg_json["num_labels"], 2);
    assert_eq!(cfg_json["problem_type"], "single_label_classification");
    let names =
        ferrotune::formats::safetensors::safetensors_shapes(&out.join("model/model.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>();
    assert!(names.contains(&"bert.embeddings.word_embeddings.weight".to_string()));
    assert!(names.contains(&"bert.pooler.dense.weight".to_string()));
    assert!(names.contains(&"classifier.weight".to_string()));

    let p = Predictor::load(&out.join("model")).unwrap();
    let split: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("split.json")).unwrap()).unwrap();
    let all = ferrotune::data::reader::read_examples(
        &csv,
        &ferrotune::data::reader::ReaderOptions {
            text_column: "text".into(),
            text_pair_column: None,
            label_column: Some("label".into()),
            encoding_errors: Default::default(),
            file_extensions: vec!["txt".into()],
            ..Default::default()
        },
    )
    .unwrap();
    let eval_ids: Vec<&str> = split["eval"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let eval: Vec<_> = all
        .into_iter()
        .filter(|e| eval_ids.contains(&e.id.as_str()))
        .collect();
    assert_eq!(eval.len(), eval_ids.len());
    let r = p.evaluate(&eval, &csv, "label").unwrap();
    assert!((r.get("accuracy") - best.get("accuracy")).abs() < 1e-12);
    assert!(
        (r.get("loss") - best.get("loss")).abs() < 1e-4,
        "{} vs {}",
        r.get("loss"),
        best.get("loss")
    );
    let probs = p.predict_probs(&eval, |_| {}).unwrap();
    for row in &probs {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
}

#[test]
fn same_seed_same_threads_gives_identical_results() {
    let t = tempfile::tempdir().unwrap();
    let (model, csv) = setup(t.path());
    let run = |name: &str| {
        let out = t.path().join(name);
        train(
            &recipe(&model, &csv, &out, "num_train_epochs = 2\n"),
            &mut Silent,
        )
        .unwrap();
        (
            without_timings(&std::fs::read_to_string(out.join("metrics.jsonl")).unwrap()),
            std::fs::read(out.join("model/model.safetensors")).unwrap(),
        )
    };
    let (m1, w1) = run("a");
    let (m2, w2) = run("b");
    assert_eq!(m1, m2);
    assert!(
        w1 == w2,
        "model.safetensors differs between two identical runs"
    );
    // A different seed gives different weights.
    let out = t.path().join("c");
    train(
        &recipe(&model, &csv, &out, "num_train_epochs = 2\n").clone_with_seed(4),
        &mut Silent,
    )
    .unwrap();
    assert!(std::fs::read(out.join("model/model.safetensors")).unwrap() != w1);
}

/// `group_by_length = true` trains the same examples in another order: repeatable, and
/// not the run without it.
#[test]
fn group_by_length_is_repeatable_and_changes_the_batches() {
    let t = tempfile::tempdir().unwrap();
    let (model, csv) = setup(t.path());
    let run = |name: &str, extra: &str| {
        let out = t.path().join(name);
        let text = format!("num_train_epochs = 1\n{extra}");
        train(&recipe(&model, &csv, &out, &text), &mut Silent).unwrap();
        (
            without_timings(&std::fs::read_to_string(out.join("metrics.jsonl")).unwrap()),
            std::fs::read(out.join("model/model.safetensors")).unwrap(),
        )
    };
    let (m1, w1) = run("grouped-a", "group_by_length = true\n");
    let (m2, w2) = run("grouped-b", "group_by_length = true\n");
    let (_, plain) = run("plain", "");
    assert_eq!(m1, m2);
    assert!(w1 == w2, "two grouped runs differ");
    assert!(w1 != plain, "grouping by length changed nothing");
    let steps = |m: &str| {
        m.lines()
            .filter(|l| l.contains("\"split\":\"train\""))
            .count()
    };
    assert!(steps(&m1) > 0);
}

trait WithSeed {
    fn clone_with_seed(&self, seed: u64) -> Self;
}
impl WithSeed for TrainConfig {
    fn clone_with_seed(&self, seed: u64) -> Self {
        let mut c = self.clone();
        c.seed = seed;
        c
    }
}

fn train_err(extra: &str, edit: impl Fn(&Path, &Path)) -> String {
    let t = tempfile::tempdir().unwrap();
    let (model, csv) = setup(t.path());
    edit(&model, &csv);
    let cfg = recipe(&model, &csv, &t.path().join("run"), extra);
    let e = train(&cfg, &mut Silent)
        .expect_err("expected an error")
        .to_string();
    assert_eq!(e.lines().count(), 1, "not one line: {e}");
    e
}

#[test]
fn an_evaluation_label_never_seen_in_training_is_named() {
    let t = tempfile::tempdir().unwrap();
    let val = t.path().join("val.csv");
    std::fs::write(
        &val,
        "text,label\nthe film was good .,pos\nthe plot was fine .,meh\n",
    )
    .unwrap();
    let e = train_err(
        &format!("validation_file = {:?}\nvalidation_split = 0.5\n", val),
        |_, _| {},
    );
    // validation_file takes precedence over validation_split.
    assert!(e.contains("val.csv:3") && e.contains("`meh`"), "{e}");
}

#[test]
fn missing_column_empty_file_bad_utf8_unknown_model_type() {
    let e = train_err("text_column = \"sentence\"\n", |_, _| {});
    assert!(e.contains("train.csv") && e.contains("`sentence`"), "{e}");

    let e = train_err("", |_, csv| std::fs::write(csv, "").unwrap());
    assert!(e.contains("train.csv"), "{e}");

    let e = train_err("", |_, csv| {
        let mut b = std::fs::read(csv).unwrap();
        b.extend_from_slice(b"the film was \xff\xfe bad .,neg\n");
        std::fs::write(csv, b).unwrap();
    });
    assert!(e.contains("train.csv:98") && e.contains("UTF-8"), "{e}");

    let e = train_err("", |model, _| {
        let p = model.join("config.json");
        let s = std::fs::read_to_string(&p)
            .unwrap()
            .replace("\"bert\"", "\"xlnet\"");
        std::fs::write(p, s).unwrap();
    });
    assert!(
        e.contains("config.json") && e.contains("model_type") && e.contains("xlnet"),
        "{e}"
    );

    let e = train_err("", |model, _| {
        let p = model.join("model.safetensors");
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() - 100]).unwrap();
    });
    assert!(e.contains("model.safetensors"), "{e}");
}

/// The run line of metrics.jsonl (its first line).
fn run_line(out: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    serde_json::from_str(text.lines().next().unwrap()).unwrap()
}

#[test]
fn max_train_samples_keeps_every_class_and_labels_come_from_the_whole_file() {
    let t = tempfile::tempdir().unwrap();
    let (model, _) = setup(t.path());
    // 60 rows of `pos`, then 4 of `neg`: the first 20 rows hold no `neg`.
    let csv = t.path().join("sorted.csv");
    let mut text = String::from("text,label\n");
    for i in 0..60 {
        text.push_str(&format!("a good film {i},pos\n"));
    }
    for i in 0..4 {
        text.push_str(&format!("a bad film {i},neg\n"));
    }
    std::fs::write(&csv, text).unwrap();
    let out = t.path().join("run");
    let cfg = recipe(
        &model,
        &csv,
        &out,
        "max_train_samples = 20\nnum_train_epochs = 1",
    );
    train(&cfg, &mut Silent).unwrap();
    let run = run_line(&out);
    assert_eq!(run["train_examples"], 20, "{run}");
    assert_eq!(run["labels"], serde_json::json!(["neg", "pos"]), "{run}");
    assert_eq!(run["warnings"], 0, "{run}");

    // With a validation file, the label set still comes from every training row.
    let val = t.path().join("val.csv");
    std::fs::write(&val, "text,label\na fine film,pos\na poor film,neg\n").unwrap();
    let out = t.path().join("run2");
    let cfg = recipe(
        &model,
        &csv,
        &out,
        &format!("max_train_samples = 20\nnum_train_epochs = 1\nvalidation_file = {val:?}"),
    );
    train(&cfg, &mut Silent).unwrap();
    let run = run_line(&out);
    assert_eq!(run["labels"], serde_json::json!(["neg", "pos"]), "{run}");
    // validation_split (in the base recipe) is ignored, and the run says so.
    let notes = run["notes"].to_string();
    assert!(notes.contains("`validation_split` is ignored"), "{run}");
}

#[test]
fn labels_that_look_like_file_mistakes_are_warned_about() {
    let t = tempfile::tempdir().unwrap();
    let (model, _) = setup(t.path());
    // Two CSV files concatenated: the second one's byte-order mark lands mid-file, and
    // its header is a row.
    let csv = t.path().join("joined.csv");
    let mut text = String::from("label,text\n");
    for i in 0..30 {
        text.push_str(&format!("1,a good film {i}\n0,a bad film {i}\n"));
    }
    text.push_str("\u{feff}\"1\",a fine film\n");
    std::fs::write(&csv, text).unwrap();
    let out = t.path().join("run");
    let cfg = recipe(&model, &csv, &out, "num_train_epochs = 1");
    train(&cfg, &mut Silent).unwrap();
    let run = run_line(&out);
    let notes = run["notes"].to_string();
    assert_eq!(run["warnings"], 1, "{run}");
    assert!(notes.contains("byte-order mark"), "{notes}");
    assert!(notes.contains("joined.csv"), "{notes}");
}

#[test]
fn a_class_folder_reads_its_extensions_and_warns_about_repeats() {
    let t = tempfile::tempdir().unwrap();
    let (model, _) = setup(t.path());
    // Each message twice, as .txt and as .json (which names its own label), and some
    // texts repeated under other names.
    let data = t.path().join("groups");
    for (class, word) in [("pos", "good"), ("neg", "bad")] {
        let dir = data.join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..30 {
            let text = format!("a {word} film number {}", i % 20);
            std::fs::write(dir.join(format!("{i:03}.txt")), &text).unwrap();
            let json = format!("{{\"text\": \"{text}\", \"group\": \"{class}\"}}");
            std::fs::write(dir.join(format!("{i:03}.json")), json).unwrap();
        }
    }
    let out = t.path().join("run");
    let cfg = recipe(&model, &data, &out, "num_train_epochs = 1");
    train(&cfg, &mut Silent).unwrap();
    let run = run_line(&out);
    assert_eq!(
        run["train_examples"].as_u64().unwrap() + run["eval_examples"].as_u64().unwrap(),
        60,
        "{run}"
    );
    let notes = run["notes"].to_string();
    assert!(
        notes.contains("60 file(s)") && notes.contains(".json x60"),
        "{notes}"
    );
    assert!(notes.contains("repeat a training text"), "{notes}");
    // `deduplicate` drops the repeats (and the warning); other extensions can be chosen.
    let out = t.path().join("run2");
    let cfg = recipe(
        &model,
        &data,
        &out,
        "num_train_epochs = 1\ndeduplicate = true\nfile_extensions = [\".TXT\"]",
    );
    train(&cfg, &mut Silent).unwrap();
    let run = run_line(&out);
    let notes = run["notes"].to_string();
    assert!(!notes.contains("repeat a training text"), "{notes}");
    assert_eq!(
        run["train_examples"].as_u64().unwrap() + run["eval_examples"].as_u64().unwrap(),
        40,
        "{run}"
    );
    // An extension no file has: an error naming what the folder holds.
    let e = train(
        &recipe(
            &model,
            &data,
            &t.path().join("run3"),
            "file_extensions = [\"md\"]",
        ),
        &mut Silent,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no md files") && e.contains("000.json"), "{e}");
}

/// A protobuf message's fields as (field number, value): varints and fixed64 as `u64`,
/// fixed32 as its bits, length-delimited as bytes. Enough to read an Event back without
/// the writer's code.
fn proto_fields(mut b: &[u8]) -> Vec<(u32, ProtoValue)> {
    fn varint(b: &mut &[u8]) -> u64 {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let byte = b[0];
            *b = &b[1..];
            v |= ((byte & 0x7f) as u64) << shift;
            if byte < 0x80 {
                return v;
            }
            shift += 7;
        }
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b);
        let (field, wire) = ((key >> 3) as u32, key & 7);
        let v = match wire {
            0 => ProtoValue::Int(varint(&mut b)),
            1 => {
                let v = u64::from_le_bytes(b[..8].try_into().unwrap());
                b = &b[8..];
                ProtoValue::Int(v)
            }
            2 => {
                let n = varint(&mut b) as usize;
                let v = b[..n].to_vec();
                b = &b[n..];
                ProtoValue::Bytes(v)
            }
            5 => {
                let v = u32::from_le_bytes(b[..4].try_into().unwrap());
                b = &b[4..];
                ProtoValue::Int(v as u64)
            }
            w => panic!("wire type {w}"),
        };
        out.push((field, v));
    }
    out
}

#[derive(Debug, Clone)]
enum ProtoValue {
    Int(u64),
    Bytes(Vec<u8>),
}

/// Every metrics.jsonl number is a TensorBoard scalar at its step, with TensorBoard's
/// framing (CRC32C) and Event layout; `report_to = "none"` writes no event file.
#[test]
fn tensorboard_events_mirror_metrics_jsonl() {
    let t = tempfile::tempdir().unwrap();
    let (model, csv) = setup(t.path());
    let out = t.path().join("run");
    let cfg = recipe(&model, &csv, &out, "num_train_epochs = 2");
    train(&cfg, &mut Silent).unwrap();
    let files: Vec<PathBuf> = std::fs::read_dir(out.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("events.out.tfevents."));
    let records = ferrotune::formats::tfevents::read_records(&files[0]).unwrap();
    let mut scalars = std::collections::BTreeMap::new();
    let mut texts = Vec::new();
    for r in &records {
        let fields = proto_fields(r);
        let step = fields
            .iter()
            .find(|(f, _)| *f == 2)
            .map_or(0, |(_, v)| match v {
                ProtoValue::Int(s) => *s,
                _ => panic!(),
            });
        for (f, v) in &fields {
            let (5, ProtoValue::Bytes(summary)) = (*f, v) else {
                continue;
            };
            for (_, value) in proto_fields(summary) {
                let ProtoValue::Bytes(value) = value else {
                    panic!()
                };
                let vf = proto_fields(&value);
                let tag = vf.iter().find_map(|(f, v)| match (f, v) {
                    (1, ProtoValue::Bytes(b)) => Some(String::from_utf8(b.clone()).unwrap()),
                    _ => None,
                });
                let simple = vf.iter().find_map(|(f, v)| match (f, v) {
                    (2, ProtoValue::Int(bits)) => Some(f32::from_bits(*bits as u32)),
                    _ => None,
                });
                match simple {
                    Some(x) => {
                        scalars.insert((tag.unwrap(), step), x);
                    }
                    None => texts.push(tag.unwrap()),
                }
            }
        }
    }
    assert_eq!(texts, vec!["recipe".to_string()]);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let mut want = std::collections::BTreeMap::new();
    for line in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let (step, s) = ferrotune::train::log::scalars_of(&v).unwrap();
        for (tag, x) in s {
            want.insert((tag, step), x);
        }
    }
    assert_eq!(scalars, want);
    for tag in [
        "train/loss",
        "train/learning_rate",
        "train/grad_norm",
        "eval/accuracy",
        "eval/loss",
        "throughput/examples_per_second",
        "throughput/tokens_per_second",
        "train/learning_rate/head",
    ] {
        assert!(
            scalars.keys().any(|(t, _)| t == tag),
            "{tag} missing: {:?}",
            scalars.keys().collect::<Vec<_>>()
        );
    }
    // eval/accuracy at the step of each epoch's end, equal to the log's.
    let evals: Vec<(u64, f32)> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["split"] == "eval")
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["eval_accuracy"].as_f64().unwrap() as f32,
            )
        })
        .collect();
    for (step, acc) in evals {
        assert_eq!(scalars[&("eval/accuracy".to_string(), step)], acc);
    }

    let off = t.path().join("off");
    let cfg = recipe(
        &model,
        &csv,
        &off,
        "num_train_epochs = 1\nreport_to = \"none\"",
    );
    train(&cfg, &mut Silent).unwrap();
    assert!(!off.join("runs").exists());
}
