//! The `ferrotune` binary on good and bad input: bad input gives a one-line error naming
//! the file (and line or field), a non-zero exit, and never a panic.

use std::path::Path;
use std::process::Command;

use ferrotune::testing::{write_tiny_csv, write_tiny_model, TinySpec};

fn ferrotune(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A recipe for the tiny model and data in `dir`, writing to `dir/out` (never to the
/// working directory, even when the run fails).
fn write_recipe(dir: &Path, extra: &str) -> String {
    let model = dir.join("model");
    if !model.exists() {
        write_tiny_model(&model, &TinySpec::default()).unwrap();
        write_tiny_csv(&dir.join("train.csv"), 64).unwrap();
    }
    let recipe = dir.join("recipe.toml");
    std::fs::write(
        &recipe,
        format!(
            "model_name_or_path = {:?}\ntrain_file = {:?}\noutput_dir = {:?}\n\
             validation_split = 0.25\nnum_train_epochs = 2\nlearning_rate = 1e-3\n\
             max_seq_length = 16\n{extra}",
            model,
            dir.join("train.csv"),
            dir.join("out"),
        ),
    )
    .unwrap();
    recipe.to_string_lossy().into_owned()
}

fn assert_clean_error(code: i32, stderr: &str, needles: &[&str]) {
    assert_ne!(code, 0, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    assert!(stderr.starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "`{n}` not in: {stderr}");
    }
}

#[test]
fn train_predict_eval_inspect() {
    let t = tempfile::tempdir().unwrap();
    let recipe = write_recipe(t.path(), "");
    let out = t.path().join("run");
    let (code, stdout, stderr) = ferrotune(&[
        "train",
        "--recipe",
        &recipe,
        "--output-dir",
        out.to_str().unwrap(),
        "--set",
        "num_train_epochs=2",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("epoch 1: eval_loss"), "{stdout}");
    assert!(stdout.contains("epoch 2: eval_loss"), "{stdout}");
    let model = out.join("model");
    let m = model.to_str().unwrap();

    let input = t.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"text\": \"the film was good .\"}\n{\"text\": \"awful plot\"}\n",
    )
    .unwrap();
    let pred = t.path().join("pred.jsonl");
    let (code, _, stderr) = ferrotune(&[
        "predict",
        "--model",
        m,
        "--input",
        input.to_str().unwrap(),
        "--output",
        pred.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&pred)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let s =
        lines[0]["scores"]["pos"].as_f64().unwrap() + lines[0]["scores"]["neg"].as_f64().unwrap();
    assert!((s - 1.0).abs() < 1e-5);
    assert!(lines[0]["label"] == "pos" || lines[0]["label"] == "neg");

    let csv_out = t.path().join("pred.csv");
    let (code, _, _) = ferrotune(&[
        "predict",
        "--model",
        m,
        "--input",
        input.to_str().unwrap(),
        "--output",
        csv_out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    let csv = std::fs::read_to_string(&csv_out).unwrap();
    assert!(csv.starts_with("label,neg,pos\n"), "{csv}");
    assert_eq!(csv.lines().count(), 3);

    let (code, stdout, stderr) = ferrotune(&[
        "eval",
        "--model",
        m,
        "--input",
        t.path().join("train.csv").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("\"eval_accuracy\""), "{stdout}");

    let (code, stdout, _) = ferrotune(&["inspect", "--model", m]);
    assert_eq!(code, 0);
    assert!(stdout.contains("BertForSequenceClassification"), "{stdout}");
    assert!(stdout.contains("labels:       2 (neg, pos)"), "{stdout}");
}

#[test]
fn bad_recipe_and_data_give_one_line_errors() {
    let t = tempfile::tempdir().unwrap();
    let recipe = write_recipe(t.path(), "learning_rat = 2e-5\n");
    let (code, _, stderr) = ferrotune(&["train", "--recipe", &recipe]);
    assert_clean_error(
        code,
        &stderr,
        &["recipe.toml:8", "learning_rat", "learning_rate"],
    );

    let recipe = write_recipe(t.path(), "");
    let (code, _, stderr) = ferrotune(&["train", "--recipe", &recipe, "--set", "sed=3"]);
    assert_clean_error(code, &stderr, &["sed", "seed"]);

    let recipe = write_recipe(t.path(), "label_column = \"sentiment\"\n");
    let (code, _, stderr) = ferrotune(&["train", "--recipe", &recipe]);
    assert_clean_error(code, &stderr, &["train.csv", "sentiment"]);

    let (code, _, stderr) = ferrotune(&["train", "--recipe", "does-not-exist.toml"]);
    assert_clean_error(code, &stderr, &["does-not-exist.toml"]);

    let (code, _, stderr) = ferrotune(&[
        "predict",
        "--model",
        t.path().to_str().unwrap(),
        "--input",
        "x.txt",
    ]);
    assert_clean_error(code, &stderr, &["config.json"]);
}

/// Every family through the whole command line: train, predict, eval, inspect (which
/// names the family), embed, and a benchmark step of its preset shape.
#[test]
fn every_family_trains_predicts_evaluates_inspects_and_embeds() {
    for family in ferrotune::families::FAMILIES {
        let t = tempfile::tempdir().unwrap();
        let model = t.path().join("base");
        write_tiny_model(&model, &TinySpec::of(family.model_type())).unwrap();
        let data = t.path().join("train.csv");
        write_tiny_csv(&data, 48).unwrap();
        let recipe = t.path().join("recipe.toml");
        std::fs::write(
            &recipe,
            format!(
                "model_name_or_path = {model:?}\ntrain_file = {data:?}\nvalidation_split = 0.25\n\
                 num_train_epochs = 1\nlearning_rate = 1e-3\nmax_seq_length = 16\n"
            ),
        )
        .unwrap();
        let out = t.path().join("run");
        let (code, stdout, stderr) = ferrotune(&[
            "train",
            "--recipe",
            recipe.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{}: {stderr}", family.name());
        assert!(stdout.contains(&format!("({})", family.name())), "{stdout}");
        assert!(stdout.contains("epoch 1: eval_loss"), "{stdout}");
        let m = out.join("model");
        let m = m.to_str().unwrap();
        let (code, stdout, stderr) =
            ferrotune(&["predict", "--model", m, "--input", data.to_str().unwrap()]);
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(stdout.lines().count(), 48);
        let (code, stdout, stderr) =
            ferrotune(&["eval", "--model", m, "--input", data.to_str().unwrap()]);
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains("\"eval_accuracy\""), "{stdout}");
        let (code, stdout, _) = ferrotune(&["inspect", "--model", m]);
        assert_eq!(code, 0);
        assert!(
            stdout.contains(&format!("family:       {}", family.name())),
            "{stdout}"
        );
        assert!(stdout.contains(family.architecture()), "{stdout}");
        for base in [model.to_str().unwrap(), m] {
            let (code, stdout, stderr) = ferrotune(&[
                "embed",
                "--model",
                base,
                "--input",
                data.to_str().unwrap(),
                "--normalize",
            ]);
            assert_eq!(code, 0, "{stderr}");
            let rows: Vec<serde_json::Value> = stdout
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(rows.len(), 48);
            let e: Vec<f64> = rows[0]["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            assert_eq!(e.len(), 16);
            let norm = e.iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        }
    }
}

#[test]
fn bench_runs_every_preset_shape() {
    for preset in ferrotune::bench::presets() {
        let (code, stdout, stderr) = ferrotune(&[
            "bench",
            "infer",
            "--preset",
            preset.name,
            "--batch",
            "1",
            "--seq",
            "4",
            "--steps",
            "1",
        ]);
        assert_eq!(code, 0, "{}: {stderr}", preset.name);
        let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert!(last["median_ms"].as_f64().unwrap() > 0.0, "{stdout}");
    }
    let (code, _, stderr) = ferrotune(&["bench", "infer", "--preset", "gpt-9"]);
    assert_clean_error(code, &stderr, &["gpt-9", "minilm-l6", "bert-base"]);
}

/// A `model_type` no family claims, and weights of another family than `config.json`
/// says: one line naming the file and what is wrong, exit 2 (bad input).
#[test]
fn unknown_family_and_wrong_family_weights_exit_2() {
    let t = tempfile::tempdir().unwrap();
    let recipe = write_recipe(t.path(), "");
    let config = t.path().join("model/config.json");
    let original = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, original.replace("\"bert\"", "\"gpt_neox\"")).unwrap();
    let (code, _, stderr) = ferrotune(&["train", "--recipe", &recipe]);
    assert_eq!(code, 2, "{stderr}");
    assert_clean_error(
        code,
        &stderr,
        &[
            "config.json",
            "model_type",
            "gpt_neox",
            "bert, roberta, distilbert, mpnet",
        ],
    );
    std::fs::write(&config, original).unwrap();
    let other = t.path().join("distilbert");
    let spec = TinySpec {
        prefix: true,
        ..TinySpec::of("distilbert")
    };
    write_tiny_model(&other, &spec).unwrap();
    std::fs::copy(
        other.join("model.safetensors"),
        t.path().join("model/model.safetensors"),
    )
    .unwrap();
    let (code, _, stderr) = ferrotune(&["train", "--recipe", &recipe]);
    assert_eq!(code, 2, "{stderr}");
    assert_clean_error(
        code,
        &stderr,
        &["model.safetensors", "DistilBERT", "`distilbert`", "`bert`"],
    );
}

#[test]
fn an_output_dir_in_use_is_refused_unless_overwritten() {
    let t = tempfile::tempdir().unwrap();
    let recipe = write_recipe(t.path(), "");
    let out = t.path().join("run");
    let run = |extra: &[&str]| {
        let mut args = vec!["train", "--recipe", &recipe, "--set", "num_train_epochs=1"];
        args.push("--output-dir");
        args.push(out.to_str().unwrap());
        args.extend_from_slice(extra);
        ferrotune(&args)
    };
    let (code, _, stderr) = run(&[]);
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = run(&[]);
    assert_eq!(code, 2, "{stderr}");
    assert_clean_error(
        code,
        &stderr,
        &[
            "run",
            "previous run",
            "--resume latest",
            "--overwrite-output-dir",
        ],
    );
    // A stale checkpoint of the previous run must not survive the overwrite.
    let stale = out.join("checkpoints/checkpoint-999");
    std::fs::create_dir_all(&stale).unwrap();
    let (code, _, stderr) = run(&["--overwrite-output-dir"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stale.exists());
    assert!(out.join("model/model.safetensors").exists());

    // A folder with the user's own files is never written into.
    let mine = t.path().join("mine");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "keep me").unwrap();
    for extra in [&[][..], &["--overwrite-output-dir"][..]] {
        let mut args = vec!["train", "--recipe", &recipe, "--output-dir"];
        args.push(mine.to_str().unwrap());
        args.extend_from_slice(extra);
        let (code, _, stderr) = ferrotune(&args);
        assert_eq!(code, 2, "{stderr}");
        assert_clean_error(code, &stderr, &["mine", "notes.txt", "no ferrotune run"]);
    }
    assert_eq!(std::fs::read_dir(&mine).unwrap().count(), 1);
}
