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
    let run: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(run["split"], "run");
    assert_eq!(run["build"], ferrotune::BUILD_PROFILE, "{run}");
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
    for family in ferrotune::families::text_families() {
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
        assert_eq!(last["build"], ferrotune::BUILD_PROFILE, "{stdout}");
    }
    // A debug build says so, where timings are read: `--version` (the bench scripts check it).
    let (code, version, _) = ferrotune(&["--version"]);
    assert_eq!(code, 0);
    assert_eq!(
        version.contains("debug build"),
        ferrotune::DEBUG_BUILD,
        "{version}"
    );
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

/// Trains the tiny model of `dir` (see [`write_recipe`]) with `extra` recipe lines; its
/// exported model directory.
fn trained(dir: &Path, extra: &str) -> std::path::PathBuf {
    let recipe = write_recipe(dir, extra);
    let (code, _, stderr) = ferrotune(&["train", "--recipe", &recipe]);
    assert_eq!(code, 0, "{stderr}");
    dir.join("out/model")
}

fn jsonl(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}

/// Labels, and scores to 1e-6 (a line's batch neighbours change the GEMM's blocking,
/// which moves the last bit of a score).
fn same_predictions(a: &[serde_json::Value], b: &[serde_json::Value]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x["label"], y["label"]);
        for (k, v) in x["scores"].as_object().unwrap() {
            let w = y["scores"][k].as_f64().unwrap();
            assert!((v.as_f64().unwrap() - w).abs() < 1e-6, "{x} vs {y}");
        }
    }
}

#[test]
fn predict_streams_in_chunks_in_input_order() {
    let t = tempfile::tempdir().unwrap();
    let model = trained(t.path(), "");
    let m = model.to_str().unwrap();
    // Lines of many lengths, so each chunk is reordered by length inside.
    let words = ["good", "bad", "film", "plot", "was", "very", "the", "awful"];
    let mut text = String::new();
    for i in 0..1000 {
        let n = 1 + (i * 7919) % 13;
        let line: Vec<&str> = (0..n).map(|j| words[(i + j * 3) % words.len()]).collect();
        text.push_str(&line.join(" "));
        text.push('\n');
    }
    let input = t.path().join("in.txt");
    std::fs::write(&input, &text).unwrap();
    let run = |chunk: &str, out: &str| {
        let out = t.path().join(out);
        let (code, _, stderr) = ferrotune(&[
            "predict",
            "--model",
            m,
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--chunk-size",
            chunk,
        ]);
        assert_eq!(code, 0, "{stderr}");
        assert!(stderr.contains("1000 predictions written"), "{stderr}");
        assert!(!Path::new(&format!("{}.partial", out.display())).exists());
        std::fs::read_to_string(out).unwrap()
    };
    let whole = jsonl(&run("100000", "whole.jsonl"));
    let chunked = jsonl(&run("37", "chunked.jsonl"));
    same_predictions(&chunked, &whole);
    // Each line's prediction is that of the line alone (order kept through the chunks).
    for i in [0usize, 36, 37, 500, 999] {
        let one = t.path().join("one.txt");
        std::fs::write(&one, text.lines().nth(i).unwrap()).unwrap();
        let (code, stdout, stderr) =
            ferrotune(&["predict", "--model", m, "--input", one.to_str().unwrap()]);
        assert_eq!(code, 0, "{stderr}");
        same_predictions(&jsonl(&stdout), &chunked[i..=i]);
    }
    // CSV output: the header once, one row per line.
    let csv = run("37", "chunked.csv");
    assert_eq!(csv.matches("label,neg,pos").count(), 1);
    assert_eq!(csv.lines().count(), 1001);
    // Standard output holds the same lines as the file.
    let (code, stdout, stderr) = ferrotune(&[
        "predict",
        "--model",
        m,
        "--input",
        input.to_str().unwrap(),
        "--chunk-size",
        "37",
    ]);
    assert_eq!(code, 0, "{stderr}");
    same_predictions(&jsonl(&stdout), &chunked);
}

#[test]
fn an_interrupted_predict_leaves_whole_lines_in_partial() {
    use std::process::Stdio;
    let t = tempfile::tempdir().unwrap();
    let model = trained(t.path(), "");
    let input = t.path().join("in.txt");
    std::fs::write(&input, "the film was good .\nawful plot\n".repeat(200_000)).unwrap();
    let out = t.path().join("pred.jsonl");
    let partial = t.path().join("pred.jsonl.partial");
    let child = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["predict", "--model", model.to_str().unwrap()])
        .args(["--input", input.to_str().unwrap()])
        .args(["--output", out.to_str().unwrap(), "--chunk-size", "500"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while std::fs::metadata(&partial).map_or(0, |m| m.len()) == 0 {
        assert!(t0.elapsed().as_secs() < 120, "no output after 2 minutes");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(
        !out.exists(),
        "an interrupted output must not take the final name"
    );
    let lines = jsonl(&std::fs::read_to_string(&partial).unwrap());
    assert!(
        !lines.is_empty() && lines.len() < 400_000,
        "{}",
        lines.len()
    );
    assert_eq!(lines.len() % 500, 0, "whole chunks only");
    assert!(
        err.contains(&format!("the {} predictions made before it", lines.len())),
        "{err}"
    );
}

#[test]
fn headerless_csv_trains_predicts_and_evaluates() {
    let t = tempfile::tempdir().unwrap();
    write_recipe(t.path(), "");
    // The tiny data without its header, label first: `pos,the film was good .`
    let rows: Vec<String> = std::fs::read_to_string(t.path().join("train.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let (text, label) = l.rsplit_once(',').unwrap();
            format!("{label},{text}")
        })
        .collect();
    let data = t.path().join("plain.csv");
    std::fs::write(&data, rows.join("\r\n") + "\r\n").unwrap();
    let d = data.to_str().unwrap();

    let recipe = write_recipe(t.path(), "");
    let set_data = format!("train_file={d:?}");
    // Without `header = false`: the error says what to do.
    let (code, _, stderr) = ferrotune(&["train", "--recipe", &recipe, "--set", &set_data]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("field `text`: column not found"),
        "{stderr}"
    );
    assert!(stderr.contains("looks like data"), "{stderr}");
    assert!(stderr.contains("header = false"), "{stderr}");
    // With it, columns by index (a TOML integer or a string).
    let (code, stdout, stderr) = ferrotune(&[
        "train",
        "--recipe",
        &recipe,
        "--set",
        &set_data,
        "--set",
        "header=false",
        "--set",
        "text_column=1",
        "--set",
        "label_column=\"0\"",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("epoch 1: eval_loss"), "{stdout}");
    let model = t.path().join("out/model");
    let m = model.to_str().unwrap();
    // eval and predict read headerless input as the model was trained.
    let (code, stdout, stderr) = ferrotune(&["eval", "--model", m, "--input", d]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(&format!("\"eval_examples\":{}", rows.len())),
        "{stdout}"
    );
    let (code, stdout, stderr) = ferrotune(&["predict", "--model", m, "--input", d]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(jsonl(&stdout).len(), rows.len());
}

#[test]
fn labels_of_mixed_json_types_are_warned_about() {
    let t = tempfile::tempdir().unwrap();
    write_recipe(t.path(), "");
    let mut s = String::new();
    for i in 0..40 {
        let label = match i % 3 {
            0 => "1".to_string(),
            1 => "\"1\"".to_string(),
            _ => "0".to_string(),
        };
        s.push_str(&format!(
            "{{\"text\": \"text number {i}\", \"label\": {label}}}\n"
        ));
    }
    let data = t.path().join("mixed.jsonl");
    std::fs::write(&data, s).unwrap();
    let recipe = write_recipe(t.path(), "");
    let (code, stdout, stderr) = ferrotune(&[
        "train",
        "--recipe",
        &recipe,
        "--set",
        &format!("train_file={data:?}"),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let all = format!("{stdout}{stderr}");
    assert!(all.contains("mixed JSON types"), "{all}");
    assert!(all.contains("1 and \"1\" are one class"), "{all}");
    let metrics = std::fs::read_to_string(t.path().join("out/metrics.jsonl")).unwrap();
    assert!(metrics.contains("mixed JSON types"), "{metrics}");
}

/// A full disk, made real with a file-size limit (`ulimit -f`): the write fails with
/// EFBIG as on ENOSPC. Exit 1 (not bad input), the path named, nothing half-written left.
#[test]
fn a_full_disk_is_exit_1_and_leaves_nothing_half_written() {
    let t = tempfile::tempdir().unwrap();
    let model = trained(t.path(), "");
    let bin = env!("CARGO_BIN_EXE_ferrotune");
    let limited = |kb: usize, args: &str| {
        let o = Command::new("bash")
            .args(["-c", &format!("ulimit -f {kb}; exec {bin} {args}")])
            .output()
            .unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    // Training: the first checkpoint does not fit.
    let recipe = t.path().join("recipe.toml");
    let run = t.path().join("full");
    let (code, err) = limited(
        8,
        &format!(
            "train --recipe {} --output-dir {}",
            recipe.display(),
            run.display()
        ),
    );
    let sizes: Vec<(std::path::PathBuf, u64)> = walk(&run)
        .into_iter()
        .map(|p| (p.clone(), p.metadata().map_or(0, |m| m.len())))
        .collect();
    assert_eq!(code, 1, "{err} {sizes:?}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("File too large") || err.contains("No space"),
        "{err}"
    );
    assert!(err.contains(&run.display().to_string()), "{err}");
    let leftovers: Vec<_> = walk(&run)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Predicting: the output stops at its last whole line.
    let input = t.path().join("in.txt");
    std::fs::write(&input, "the film was good .\nawful plot\n".repeat(5000)).unwrap();
    let out = t.path().join("pred.jsonl");
    let (code, err) = limited(
        200,
        &format!(
            "predict --model {} --input {} --output {} --chunk-size 100",
            model.display(),
            input.display(),
            out.display()
        ),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("pred.jsonl.partial"), "{err}");
    assert!(!out.exists());
    let partial = std::fs::read_to_string(t.path().join("pred.jsonl.partial")).unwrap();
    let lines = jsonl(&partial);
    assert!(!lines.is_empty() && lines.len() < 10_000);
    assert!(partial.ends_with('\n'));
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
    }
    out
}

#[test]
fn train_writes_a_report_and_report_says_what_it_cannot_read() {
    let t = tempfile::tempdir().unwrap();
    // A line per step: the tiny run takes 6 steps, fewer than the default logging_steps.
    trained(t.path(), "logging_steps = 1\n");
    let run = t.path().join("out");
    // The run's own report, written at the end of `train`.
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    for needle in [
        "id=\"loss\"",
        "id=\"learning_rate\"",
        "id=\"eval_metrics\"",
        "id=\"confusion_matrix\"",
        "Held-out examples with the highest loss",
        "Per class",
    ] {
        assert!(html.contains(needle), "`{needle}` not in the report");
    }
    // Self-contained: no script, no address but the SVG namespace.
    assert!(!html.contains("<script"));
    assert_eq!(
        html.matches("http").count(),
        html.matches("http://www.w3.org/2000/svg").count()
    );
    for png in ["loss", "learning_rate", "eval_metrics", "confusion_matrix"] {
        let b = std::fs::read(run.join("plots").join(format!("{png}.png"))).unwrap();
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{png}.png");
    }
    let preds = std::fs::read_to_string(run.join("eval_predictions.jsonl")).unwrap();
    let lines = jsonl(&preds);
    assert_eq!(lines.len(), 16, "a quarter of 64 rows is held out");
    assert!(lines.iter().all(|l| l["loss"].as_f64().unwrap() >= 0.0));

    // Elsewhere, with --output.
    let other = t.path().join("elsewhere/r.html");
    std::fs::create_dir_all(other.parent().unwrap()).unwrap();
    let (code, _, stderr) = ferrotune(&[
        "report",
        run.to_str().unwrap(),
        "--output",
        other.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(other.is_file() && t.path().join("elsewhere/plots/loss.png").is_file());

    // A cut last line of metrics.jsonl: a partial report that says so.
    let metrics = run.join("metrics.jsonl");
    let full = std::fs::read_to_string(&metrics).unwrap();
    let cut = &full[..full.len() - 20];
    std::fs::write(&metrics, cut).unwrap();
    let n = cut.lines().count();
    let (code, _, stderr) = ferrotune(&["report", run.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains(&format!("metrics.jsonl line {n} is cut short")),
        "{stderr}"
    );
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(html.contains("This report is partial"));

    // Not a run; an empty run; no such directory: one-line errors, exit 2.
    let (code, _, stderr) = ferrotune(&["report", run.join("model").to_str().unwrap()]);
    assert_clean_error(code, &stderr, &["not a ferrotune run", "metrics.jsonl"]);
    assert_eq!(code, 2);
    std::fs::write(&metrics, "").unwrap();
    let (code, _, stderr) = ferrotune(&["report", run.to_str().unwrap()]);
    assert_clean_error(code, &stderr, &["metrics.jsonl", "holds no metrics yet"]);
    let (code, _, stderr) = ferrotune(&["report", t.path().join("nope").to_str().unwrap()]);
    assert_clean_error(code, &stderr, &["nope", "no such directory"]);
}

#[test]
fn int8_predict_and_eval_track_f32() {
    let t = tempfile::tempdir().unwrap();
    let model = trained(t.path(), "");
    let m = model.to_str().unwrap();
    let input = t.path().join("train.csv");
    let run = |precision: &str| {
        let (code, stdout, stderr) = ferrotune(&[
            "predict",
            "--model",
            m,
            "--input",
            input.to_str().unwrap(),
            "--precision",
            precision,
        ]);
        assert_eq!(code, 0, "{stderr}");
        jsonl(&stdout)
    };
    let (f, q) = (run("f32"), run("int8"));
    assert_eq!(f.len(), 64);
    let mut worst = 0f64;
    for (a, b) in f.iter().zip(&q) {
        for label in ["neg", "pos"] {
            let d =
                (a["scores"][label].as_f64().unwrap() - b["scores"][label].as_f64().unwrap()).abs();
            worst = worst.max(d);
        }
    }
    assert!(worst > 0.0, "int8 did not run");
    assert!(worst < 0.05, "int8 probabilities off by {worst}");
    let (code, stdout, stderr) = ferrotune(&[
        "eval",
        "--model",
        m,
        "--input",
        input.to_str().unwrap(),
        "--precision",
        "int8",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("\"eval_accuracy\""), "{stdout}");
    // An unknown precision: clap's one error, exit 2.
    let (code, _, stderr) = ferrotune(&[
        "predict",
        "--model",
        m,
        "--input",
        "x",
        "--precision",
        "fp8",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("invalid value 'fp8'"), "{stderr}");
}

/// Invalid UTF-8 in eval's and predict's input: a one-line error that names the file and
/// line and says what to pass; with `--encoding-errors replace` every row is read.
#[test]
fn eval_and_predict_take_encoding_errors() {
    let t = tempfile::tempdir().unwrap();
    let model = trained(t.path(), "");
    let m = model.to_str().unwrap();
    let mut data = std::fs::read(t.path().join("train.csv")).unwrap();
    data.extend_from_slice(b"the caf\xe9 was great .,pos\n");
    let input = t.path().join("latin1.csv");
    std::fs::write(&input, data).unwrap();
    let d = input.to_str().unwrap();
    for cmd in ["eval", "predict"] {
        let (code, _, stderr) = ferrotune(&[cmd, "--model", m, "--input", d]);
        assert_eq!(code, 2, "{stderr}");
        assert_clean_error(
            code,
            &stderr,
            &[
                "latin1.csv:66",
                "invalid UTF-8",
                "--encoding-errors replace",
            ],
        );
    }
    let args = ["--model", m, "--input", d, "--encoding-errors", "replace"];
    let (code, stdout, stderr) = ferrotune(&[&["eval"], &args[..]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("\"eval_examples\":65"), "{stdout}");
    let (code, stdout, stderr) = ferrotune(&[&["predict"], &args[..]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(jsonl(&stdout).len(), 65);
}

#[test]
fn a_quantized_model_predicts_as_int8_and_precision_errors_are_one_line() {
    let t = tempfile::tempdir().unwrap();
    let model = trained(t.path(), "");
    let m = model.to_str().unwrap();
    // The run says which precision it chose and why, in its first log line.
    let metrics = std::fs::read_to_string(t.path().join("out/metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    // auto: bf16 mixed precision where it pays (an AMX CPU), else f32.
    let auto = if ferrotune::precision::bf16_pays() {
        "bf16"
    } else {
        "f32"
    };
    assert_eq!(first["precision"], auto, "{first}");
    assert!(first["precision_reason"].as_str().unwrap().contains("auto"));
    let q = t.path().join("q");
    let qs = q.to_str().unwrap();
    let (code, stdout, stderr) = ferrotune(&["quantize", "--model", m, "--output", qs]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("linear layers in int8"), "{stdout}");
    let input = t.path().join("train.csv");
    let input = input.to_str().unwrap();
    let predict = |dir: &str, extra: &[&str]| {
        let mut args = vec!["predict", "--model", dir, "--input", input];
        args.extend_from_slice(extra);
        ferrotune(&args)
    };
    let (code, on_the_fly, stderr) = predict(m, &["--precision", "int8"]);
    assert_eq!(code, 0, "{stderr}");
    // auto picks int8 for the quantized model, and says so.
    let (code, loaded, stderr) = predict(qs, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("the model is quantized"), "{stderr}");
    assert_eq!(loaded, on_the_fly);
    let (code, _, stderr) = predict(qs, &["--precision", "f32"]);
    assert_eq!(code, 2);
    assert_clean_error(code, &stderr, &["precision f32", "int8 weights only"]);
    // bf16 inference where the CPU has a bf16 dot product; refused elsewhere.
    let (code, _, stderr) = predict(m, &["--precision", "bf16"]);
    if ferrotune::precision::bf16_dot_product() {
        assert_eq!(code, 0, "{stderr}");
    } else {
        assert_eq!(code, 2);
        assert_clean_error(code, &stderr, &["precision bf16", "slower than f32"]);
    }
    let (code, _, stderr) = ferrotune(&["quantize", "--model", m, "--output", qs]);
    assert_eq!(code, 2);
    assert_clean_error(code, &stderr, &["already exists"]);
    // A missing scale tensor (renamed in the header, which keeps the offsets valid):
    // named with the file.
    let st = q.join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let at = header.find("_scale\"").unwrap();
    let key_start = header[..at].rfind('"').unwrap() + 1;
    let scale = header[key_start..at + 6].to_string();
    bytes[8 + at + 5] = b'X';
    std::fs::write(&st, bytes).unwrap();
    let (code, _, stderr) = predict(qs, &[]);
    assert_eq!(code, 2);
    assert_clean_error(code, &stderr, &["model.safetensors", &scale, "missing"]);
    // Training: int8 is refused before anything is loaded; bf16 too on a CPU without a
    // bf16 dot product (it would be slower than f32).
    let recipe = write_recipe(t.path(), "precision = \"int8\"\n");
    let (code, _, stderr) = ferrotune(&["train", "--recipe", &recipe]);
    assert_eq!(code, 2);
    assert_clean_error(code, &stderr, &["recipe.toml", "precision", "inference"]);
    let (code, _, stderr) = ferrotune(&["train", "--recipe", &recipe, "--set", "precision=fp8"]);
    assert_clean_error(code, &stderr, &["precision"]);
    if !ferrotune::precision::bf16_dot_product() {
        let (code, _, stderr) =
            ferrotune(&["train", "--recipe", &recipe, "--set", "precision=bf16"]);
        assert_eq!(code, 2);
        assert_clean_error(code, &stderr, &["precision", "slower than f32"]);
    }
}

/// The metrics.jsonl lines of a run with an evaluation loss.
fn eval_losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["eval_loss"].as_f64())
        .collect()
}

/// bf16 mixed-precision training (emulated where the CPU has no bf16 dot product) runs
/// end to end, says so, and tracks the f32 run of the same recipe; bf16 inference too.
#[test]
fn bf16_training_tracks_f32() {
    let t = tempfile::tempdir().unwrap();
    let f32_model = trained(t.path(), "");
    let f32_losses = eval_losses(&t.path().join("out"));
    let t2 = tempfile::tempdir().unwrap();
    let recipe = write_recipe(t2.path(), "precision = \"bf16\"\n");
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["train", "--recipe", &recipe])
        .env("FERROTUNE_EMULATE_BF16", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("bf16 (as asked"), "{stdout}");
    let run = t2.path().join("out");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert_eq!(first["precision"], "bf16", "{first}");
    let bf16_losses = eval_losses(&run);
    assert_eq!(bf16_losses.len(), f32_losses.len());
    for (a, b) in bf16_losses.iter().zip(&f32_losses) {
        assert!(
            (a - b).abs() <= 0.02 * b.abs().max(0.1),
            "bf16 {a} vs f32 {b}"
        );
    }
    // bf16 inference of the f32 model: close to its f32 probabilities.
    let input = t.path().join("train.csv");
    let m = f32_model.to_str().unwrap();
    let args = ["predict", "--model", m, "--input", input.to_str().unwrap()];
    let bf16 = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(args)
        .args(["--precision", "bf16"])
        .env("FERROTUNE_EMULATE_BF16", "1")
        .output()
        .unwrap();
    assert!(
        bf16.status.success(),
        "{}",
        String::from_utf8_lossy(&bf16.stderr)
    );
    let (code, f32_out, stderr) = ferrotune(&args);
    assert_eq!(code, 0, "{stderr}");
    let (a, b) = (
        jsonl(&String::from_utf8_lossy(&bf16.stdout)),
        jsonl(&f32_out),
    );
    let mut worst = 0f64;
    for (x, y) in a.iter().zip(&b) {
        for label in ["neg", "pos"] {
            let d =
                (x["scores"][label].as_f64().unwrap() - y["scores"][label].as_f64().unwrap()).abs();
            worst = worst.max(d);
        }
    }
    assert!(
        worst > 0.0 && worst < 0.05,
        "bf16 probabilities off by {worst}"
    );
}
