//! Data-parallel training under `mpirun` (issue 18): 2 ranks × batch 8 equal 1 rank ×
//! batch 16; a dead rank stops every rank and `--resume latest` then finishes with the
//! weights of an uninterrupted run; a checkpoint of another world size and ranks with
//! different recipes are one-line errors.
//!
//! Runs when the binary carries MPI (`--features mpi`, as `scripts/test` builds it where
//! Open MPI is installed) and `mpirun` is on the PATH; otherwise each test says it skipped.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferrotune::testing::{write_tiny_csv, write_tiny_model, TinySpec};

const BIN: &str = env!("CARGO_BIN_EXE_ferrotune");

/// True when MPI runs can be tested here.
fn mpi_ready() -> bool {
    let built_in = Command::new(BIN)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("mpi: built in"))
        .unwrap_or(false);
    let mpirun = Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !(built_in && mpirun) {
        eprintln!(
            "skipped: needs a ferrotune built with --features mpi ({built_in}) and mpirun \
             ({mpirun})"
        );
    }
    built_in && mpirun
}

/// A tiny model, `rows` rows of data and a recipe without dropout (unless a test sets it),
/// `threads = 1`.
fn setup(dir: &Path, rows: usize, extra: &str) -> PathBuf {
    let model = dir.join("model");
    write_tiny_model(&model, &TinySpec::default()).unwrap();
    write_tiny_csv(&dir.join("train.csv"), rows).unwrap();
    let recipe = dir.join("recipe.toml");
    std::fs::write(
        &recipe,
        format!(
            "model_name_or_path = {:?}\ntrain_file = {:?}\nvalidation_split = 0.2\n\
             num_train_epochs = 1\nlearning_rate = 1e-3\nwarmup_ratio = 0.1\n\
             weight_decay = 0.01\nmax_seq_length = 16\nlogging_steps = 5\nseed = 7\n\
             threads = 1\nhidden_dropout_prob = 0.0\nattention_probs_dropout_prob = 0.0\n\
             classifier_dropout = 0.0\n{extra}",
            model,
            dir.join("train.csv")
        ),
    )
    .unwrap();
    recipe
}

/// `mpirun` as the tests run it: as root if need be, TCP between ranks, unbound
/// (the ranks' `threads = 1` share this machine's cores).
fn mpirun() -> Command {
    let mut c = Command::new("mpirun");
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl", "self,tcp")
        .args(["--oversubscribe", "--bind-to", "none"]);
    c
}

/// `ferrotune train` under `mpirun -n ranks` (or alone when `ranks` is 0).
fn train(ranks: usize, recipe: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = if ranks == 0 {
        Command::new(BIN)
    } else {
        let mut c = mpirun();
        c.args(["-n", &ranks.to_string(), BIN]);
        c
    };
    c.args(["train", "--recipe", recipe.to_str().unwrap()])
        .args(["--output-dir", out.to_str().unwrap()])
        // The ranks' equivalence is checked in f32: `auto` trains in bf16 on an AMX CPU,
        // whose tile sums group each rank's tokens differently from one rank's (2.8e-5
        // apart after 20 steps, against f32's < 1e-5).
        .args(["--set", "precision=f32"])
        .args(extra)
        .env_remove("FERROTUNE_FAILPOINT")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

fn run(mut c: Command) -> (i32, String) {
    let o = c.output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn ok(c: Command) {
    let (code, err) = run(c);
    assert_eq!(code, 0, "{err}");
}

/// The exported weights, by name.
fn weights(out: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(out.join("model/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let f = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (n, f)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The largest |a − b| over the tensors, apart from the attention key biases, and over
/// those. A key bias's exact gradient is zero (adding a constant to every key's score in a
/// row leaves the softmax unchanged), so what it gets is rounding noise, which AdamW
/// divides by its own root mean square into updates of up to ±lr: those differ between any
/// two summation orders — one process with and without accumulation as much as one
/// process and two ranks — bounded only by 2·lr per step.
fn max_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let (mut m, mut key_bias) = (0f32, 0f32);
    for ((na, va), (nb, vb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        let d = va
            .iter()
            .zip(vb)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        // BERT/RoBERTa, DistilBERT, MPNet names of the key projection's bias.
        if [
            "attention.self.key.bias",
            "attention.k_lin.bias",
            "attention.attn.k.bias",
        ]
        .iter()
        .any(|k| na.ends_with(k))
        {
            key_bias = key_bias.max(d);
        } else {
            m = m.max(d);
        }
    }
    (m, key_bias)
}

fn steps(out: &Path) -> u64 {
    let s = std::fs::read_to_string(out.join("train_summary.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&s).unwrap();
    v["steps"].as_u64().unwrap()
}

#[test]
fn two_ranks_of_8_train_as_one_rank_of_16_with_and_without_accumulation() {
    if !mpi_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 400 rows, 320 for training: 20 steps of 16. With dropout: the masks follow the
    // sequence, so a step split over ranks draws those of one process.
    let recipe = setup(dir.path(), 400, "");
    let dropout = [
        "--set",
        "hidden_dropout_prob=0.1",
        "--set",
        "attention_probs_dropout_prob=0.1",
    ];
    let go = |ranks: usize, out: &str, sets: &[&str]| -> PathBuf {
        let out = dir.path().join(out);
        let mut args: Vec<&str> = dropout.to_vec();
        for s in sets {
            args.extend(["--set", s]);
        }
        ok(train(ranks, &recipe, &out, &args));
        assert_eq!(steps(&out), 20);
        out
    };
    let one = go(0, "one", &["per_device_train_batch_size=16"]);
    let two = go(2, "two", &["per_device_train_batch_size=8"]);
    // Accumulation: each micro-batch draws its own masks, so the reference is one
    // process with the same micro-batches (8) and windows (2).
    let accum = ["gradient_accumulation_steps=2"];
    let solo_accum = go(
        0,
        "solo_accum",
        &["per_device_train_batch_size=8", accum[0]],
    );
    let two_accum = go(2, "two_accum", &["per_device_train_batch_size=4", accum[0]]);
    let (d2, k2) = max_diff(&weights(&one), &weights(&two));
    let (d3, k3) = max_diff(&weights(&solo_accum), &weights(&two_accum));
    eprintln!(
        "max |Δw| after 20 steps (other tensors; key biases): 2 ranks × 8 against 1 × 16 \
         {d2:e}; {k2:e}, 2 ranks × 4 × accumulation 2 against 1 × 8 × 2 {d3:e}; {k3:e}"
    );
    assert!(d2 < 1e-5, "2 ranks × 8 differ from 1 × 16 by {d2}");
    assert!(d3 < 1e-5, "2 ranks × 4 × 2 differ from 1 × 8 × 2 by {d3}");
    // AdamW's bound for a parameter whose gradient is rounding noise: 2·lr·steps.
    let bound = 2.0 * 1e-3 * 20.0;
    assert!(k2.max(k3) < bound, "key biases: {k2} {k3}");
    // Rank 0 alone wrote the run: one run line, naming both ranks.
    let log = std::fs::read_to_string(two.join("metrics.jsonl")).unwrap();
    let run_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"split\":\"run\""))
        .collect();
    assert_eq!(run_lines.len(), 1, "{log}");
    assert!(
        run_lines[0].contains("\"world_size\":2"),
        "{}",
        run_lines[0]
    );
    assert!(log.contains("\"split\":\"allreduce\""), "{log}");
    // The same held-out evaluation, shared by the ranks.
    let eval = |out: &Path| -> f64 {
        let s = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let line = s
            .lines()
            .find(|l| l.contains("\"split\":\"eval\""))
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["eval_loss"].as_f64().unwrap()
    };
    assert!((eval(&one) - eval(&two)).abs() < 1e-4);
}

#[test]
fn every_family_and_regression_train_on_two_ranks_as_on_one_process() {
    if !mpi_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), 160, "");
    for family in ["roberta", "distilbert", "mpnet"] {
        let model = dir.path().join(family);
        write_tiny_model(&model, &TinySpec::of(family)).unwrap();
        let m = format!("model_name_or_path={:?}", model.to_str().unwrap());
        let go = |ranks: usize, bs: &str| -> PathBuf {
            let out = dir.path().join(format!("{family}-{ranks}"));
            let sets = [
                m.as_str(),
                bs,
                "hidden_dropout_prob=0.1",
                "attention_probs_dropout_prob=0.1",
            ];
            let args: Vec<&str> = sets.iter().flat_map(|s| ["--set", s]).collect();
            ok(train(ranks, &recipe, &out, &args));
            out
        };
        let one = go(0, "per_device_train_batch_size=16");
        let two = go(2, "per_device_train_batch_size=8");
        let (d, k) = max_diff(&weights(&one), &weights(&two));
        eprintln!("{family}: max |Δw| 2 ranks × 8 against 1 × 16: {d:e}; key biases {k:e}");
        assert!(d < 1e-5, "{family}: 2 ranks × 8 differ from 1 × 16 by {d}");
        assert!(k < 2.0 * 1e-3 * 8.0, "{family}: key biases {k}");
    }
    // Another task: regression (MSE) on scores derived from the same texts.
    let text = std::fs::read_to_string(dir.path().join("train.csv")).unwrap();
    let scored: String = text
        .lines()
        .enumerate()
        .map(|(i, l)| match i {
            0 => "text,label\n".to_string(),
            _ => {
                let (t, label) = l.rsplit_once(',').unwrap();
                let y = if label == "pos" { 0.8 } else { -0.3 } + (i % 7) as f64 * 0.05;
                format!("{t},{y}\n")
            }
        })
        .collect();
    let csv = dir.path().join("scores.csv");
    std::fs::write(&csv, scored).unwrap();
    let f = format!("train_file={:?}", csv.to_str().unwrap());
    let go = |ranks: usize, bs: &str| -> PathBuf {
        let out = dir.path().join(format!("regression-{ranks}"));
        let sets = [
            f.as_str(),
            "problem_type=\"regression\"",
            bs,
            "hidden_dropout_prob=0.1",
        ];
        let args: Vec<&str> = sets.iter().flat_map(|s| ["--set", s]).collect();
        ok(train(ranks, &recipe, &out, &args));
        out
    };
    let one = go(0, "per_device_train_batch_size=16");
    let two = go(2, "per_device_train_batch_size=8");
    let log = std::fs::read_to_string(two.join("metrics.jsonl")).unwrap();
    assert!(log.contains("\"problem_type\":\"regression\""), "{log}");
    let (d, k) = max_diff(&weights(&one), &weights(&two));
    eprintln!("regression: max |Δw| 2 ranks × 8 against 1 × 16: {d:e}; key biases {k:e}");
    assert!(
        d < 1e-5,
        "regression: 2 ranks × 8 differ from 1 × 16 by {d}"
    );
}

/// A rank's pid, from the ranks `mpirun` started for output directory `out`.
fn rank_pid(out: &Path, rank: usize) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if !cmd.starts_with(BIN) || !cmd.contains(out.to_str().unwrap()) {
            continue;
        }
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let want = format!("OMPI_COMM_WORLD_RANK={rank}");
        if env.split(|&b| b == 0).any(|kv| kv == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn a_killed_rank_stops_every_rank_and_resume_finishes_as_if_uninterrupted() {
    if !mpi_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // With dropout: the generator's position is checkpointed and restored on resume.
    let recipe = setup(
        dir.path(),
        400,
        "per_device_train_batch_size = 4\nsave_steps = 5\nsave_total_limit = 2\n",
    );
    let with_dropout = [
        "--set",
        "hidden_dropout_prob=0.1",
        "--set",
        "num_train_epochs=2",
    ];
    let whole = dir.path().join("whole");
    ok(train(2, &recipe, &whole, &with_dropout));
    let out = dir.path().join("killed");
    let mut c = train(2, &recipe, &out, &with_dropout);
    let mut child = c.spawn().unwrap();
    // Wait for a checkpoint, then kill rank 1.
    let t0 = Instant::now();
    let ck = out.join("checkpoints");
    while std::fs::read_dir(&ck).map_or(0, |d| d.count()) == 0 {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = rank_pid(&out, 1).expect("rank 1's pid");
    let killed = Instant::now();
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "the ranks were still running 30 s after rank 1 was killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success());
    assert!(err.contains("rank 1"), "{err}");
    assert!(rank_pid(&out, 0).is_none(), "rank 0 outlived the run");
    // Resume with the same world size: the weights of the uninterrupted run, bit for bit.
    ok(train(
        2,
        &recipe,
        &out,
        &[&with_dropout[..], &["--resume", "latest"]].concat(),
    ));
    assert_eq!(
        std::fs::read(out.join("model/model.safetensors")).unwrap(),
        std::fs::read(whole.join("model/model.safetensors")).unwrap()
    );
}

#[test]
fn another_world_size_or_another_recipe_is_a_one_line_error() {
    if !mpi_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(
        dir.path(),
        60,
        "per_device_train_batch_size = 4\nsave_steps = 3\n",
    );
    let out = dir.path().join("out");
    ok(train(0, &recipe, &out, &[]));
    let (code, err) = run(train(2, &recipe, &out, &["--resume", "latest"]));
    assert_ne!(code, 0);
    assert!(
        err.contains("written by a run of 1 rank(s) and this run has 2"),
        "{err}"
    );
    // Ranks started with different recipes (MPMD): refused before training.
    let other = dir.path().join("other.toml");
    std::fs::write(
        &other,
        std::fs::read_to_string(&recipe)
            .unwrap()
            .replace("seed = 7", "seed = 8"),
    )
    .unwrap();
    let out2 = dir.path().join("out2");
    let mut c = mpirun();
    let o = out2.to_str().unwrap();
    c.args(["-n", "1", BIN, "train"])
        .args(["--recipe", recipe.to_str().unwrap(), "--output-dir", o])
        .args([":", "-n", "1", BIN, "train"])
        .args(["--recipe", other.to_str().unwrap(), "--output-dir", o])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let (code, err) = run(c);
    assert_ne!(code, 0);
    assert!(
        err.contains("different recipes: rank(s) 1 differ from rank 0"),
        "{err}"
    );
    assert!(!out2.join("checkpoints").exists());
    // The same recipe over different data: relative paths, each rank in its own working
    // directory (as two hosts holding different copies of the file).
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for (d, rows) in [(&a, 60), (&b, 61)] {
        write_tiny_model(&d.join("model"), &TinySpec::default()).unwrap();
        write_tiny_csv(&d.join("train.csv"), rows).unwrap();
    }
    let rel = dir.path().join("relative.toml");
    std::fs::write(
        &rel,
        "model_name_or_path = \"model\"\ntrain_file = \"train.csv\"\n\
         validation_split = 0.2\nnum_train_epochs = 1\nper_device_train_batch_size = 4\n\
         max_seq_length = 16\nthreads = 1\n",
    )
    .unwrap();
    let out3 = dir.path().join("out3");
    let (r, o) = (rel.to_str().unwrap(), out3.to_str().unwrap());
    let mut c = mpirun();
    c.args(["-n", "1", "-wdir", a.to_str().unwrap(), BIN, "train"])
        .args(["--recipe", r, "--output-dir", o])
        .args([":", "-n", "1", "-wdir", b.to_str().unwrap(), BIN, "train"])
        .args(["--recipe", r, "--output-dir", o])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let (code, err) = run(c);
    assert_ne!(code, 0);
    assert!(
        err.contains("different training and evaluation data: rank(s) 1 differ"),
        "{err}"
    );
    assert!(!out3.join("checkpoints").exists());
}

#[test]
fn sigterm_on_mpirun_checkpoints_once_and_the_run_resumes() {
    if !mpi_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), 2000, "per_device_train_batch_size = 2\n");
    let out = dir.path().join("out");
    let mut c = train(2, &recipe, &out, &["--set", "num_train_epochs=3"]);
    // Without it mpirun kills the ranks 1 s after SIGTERM (docs/DISTRIBUTED.md).
    c.env("OMPI_MCA_odls_base_sigkill_timeout", "10")
        .env("FERROTUNE_FAILPOINT", "sleep_ms_per_step=20");
    let mut child = c.spawn().unwrap();
    let t0 = Instant::now();
    let started = || {
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .is_ok_and(|s| s.contains("\"split\":\"train\""))
    };
    while !started() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(t0.elapsed() < Duration::from_secs(120), "no step logged");
        std::thread::sleep(Duration::from_millis(5));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success());
    assert!(err.contains("interrupted after step"), "{err}");
    assert!(
        err.contains("to continue: mpirun -n 2 ferrotune train"),
        "{err}"
    );
    // One checkpoint for the signal, of the step every rank stopped after, and the newest
    // (besides it only those of finished epochs: 1600 training rows / global batch 4 =
    // 400 steps each; on a loaded machine the signal may arrive at an epoch's end).
    let step: usize = err
        .split("interrupted after step ")
        .nth(1)
        .and_then(|t| t.split(';').next())
        .and_then(|n| n.trim().parse().ok())
        .expect("the step in the message");
    let mut cks: Vec<usize> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix("checkpoint-")?.parse().ok()
        })
        .collect();
    cks.sort();
    assert_eq!(cks.last(), Some(&step), "{cks:?} {err}");
    assert!(cks[..cks.len() - 1].iter().all(|s| s % 400 == 0), "{cks:?}");
    let (code, err) = run(train(
        2,
        &recipe,
        &out,
        &["--set", "num_train_epochs=3", "--resume", "latest"],
    ));
    assert_eq!(code, 0, "{err}");
    assert!(out.join("model/model.safetensors").exists());
}
