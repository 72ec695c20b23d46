//! Never lose a run: kill -9 then resume gives byte-identical weights; Ctrl-C writes a
//! resumable checkpoint and exits 130; a failed checkpoint write is never picked by
//! `--resume latest`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferrotune::testing::{write_tiny_csv, write_tiny_model, TinySpec};

const BIN: &str = env!("CARGO_BIN_EXE_ferrotune");

fn setup(dir: &Path, rows: usize, epochs: usize, save_steps: usize) -> PathBuf {
    let model = dir.join("model");
    write_tiny_model(&model, &TinySpec::default()).unwrap();
    write_tiny_csv(&dir.join("train.csv"), rows).unwrap();
    let recipe = dir.join("recipe.toml");
    std::fs::write(
        &recipe,
        format!(
            "model_name_or_path = {:?}\ntrain_file = {:?}\nvalidation_split = 0.25\n\
             num_train_epochs = {epochs}\nper_device_train_batch_size = 4\nlearning_rate = 1e-3\n\
             warmup_ratio = 0.1\nweight_decay = 0.01\nmax_seq_length = 16\nlogging_steps = 3\n\
             save_steps = {save_steps}\nsave_total_limit = 3\nseed = 5\n",
            model,
            dir.join("train.csv")
        ),
    )
    .unwrap();
    recipe
}

fn train(recipe: &Path, out: &Path, extra: &[&str], env: Option<(&str, &str)>) -> Command {
    let mut c = Command::new(BIN);
    c.args([
        "train",
        "--recipe",
        recipe.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
    ])
    .args(extra)
    .env_remove("FERROTUNE_FAILPOINT")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    if let Some((k, v)) = env {
        c.env(k, v);
    }
    c
}

fn finish(mut c: Command) -> (i32, String) {
    let o = c.output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn weights(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("model/model.safetensors")).unwrap()
}

fn eval_lines(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"split\":\"eval\"") || l.contains("\"split\":\"train\""))
        .map(str::to_string)
        .collect()
}

fn newest_checkpoint(out: &Path) -> usize {
    std::fs::read_dir(out.join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix("checkpoint-")?.parse::<usize>().ok()
        })
        .max()
        .unwrap_or(0)
}

/// Waits until a checkpoint of at least `step` exists; the run must still be going.
fn wait_for_checkpoint(child: &mut Child, out: &Path, step: usize) {
    let t0 = Instant::now();
    while newest_checkpoint(out) < step {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before the signal"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoint {step}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn kill_9_then_resume_gives_identical_weights() {
    let t = tempfile::tempdir().unwrap();
    let recipe = setup(t.path(), 400, 3, 1);
    let reference = t.path().join("reference");
    let (code, err) = finish(train(&recipe, &reference, &[], None));
    assert_eq!(code, 0, "{err}");

    let out = t.path().join("killed");
    let mut child = train(&recipe, &out, &[], None).spawn().unwrap();
    wait_for_checkpoint(&mut child, &out, 20);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !out.join("model").exists(),
        "the run finished before it was killed"
    );
    let (code, err) = finish(train(&recipe, &out, &["--resume", "latest"], None));
    assert_eq!(code, 0, "{err}");
    assert!(
        weights(&out) == weights(&reference),
        "weights differ after kill -9 + resume"
    );
    assert_eq!(eval_lines(&out), eval_lines(&reference));
}

#[test]
fn a_crash_between_checkpoints_loses_only_the_steps_since_the_last() {
    let t = tempfile::tempdir().unwrap();
    let recipe = setup(t.path(), 64, 2, 3);
    let reference = t.path().join("reference");
    assert_eq!(finish(train(&recipe, &reference, &[], None)).0, 0);
    let out = t.path().join("crashed");
    let (code, _) = finish(train(
        &recipe,
        &out,
        &[],
        Some(("FERROTUNE_FAILPOINT", "abort_after_step=7")),
    ));
    assert_ne!(code, 0);
    assert_eq!(newest_checkpoint(&out), 6);
    let (code, err) = finish(train(&recipe, &out, &["--resume", "latest"], None));
    assert_eq!(code, 0, "{err}");
    assert!(weights(&out) == weights(&reference));
    assert_eq!(eval_lines(&out), eval_lines(&reference));
}

#[test]
fn sigint_writes_a_resumable_checkpoint_and_exits_130() {
    let t = tempfile::tempdir().unwrap();
    let recipe = setup(t.path(), 400, 3, 50);
    let reference = t.path().join("reference");
    assert_eq!(finish(train(&recipe, &reference, &[], None)).0, 0);
    let out = t.path().join("interrupted");
    let mut child = train(&recipe, &out, &[], None).spawn().unwrap();
    // Wait for the run to be training (its first periodic checkpoint), then Ctrl-C.
    wait_for_checkpoint(&mut child, &out, 50);
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("--resume latest"), "{err}");
    assert!(!out.join("model").exists());
    let (code, err) = finish(train(&recipe, &out, &["--resume", "latest"], None));
    assert_eq!(code, 0, "{err}");
    assert!(weights(&out) == weights(&reference));
}

#[test]
fn a_failed_checkpoint_write_is_never_picked() {
    let t = tempfile::tempdir().unwrap();
    let recipe = setup(t.path(), 64, 2, 2);
    let reference = t.path().join("reference");
    assert_eq!(finish(train(&recipe, &reference, &[], None)).0, 0);
    let out = t.path().join("failed");
    let (code, err) = finish(train(
        &recipe,
        &out,
        &[],
        Some(("FERROTUNE_FAILPOINT", "checkpoint_write_fail=4")),
    ));
    // A failed write (as on a full disk) is the machine's fault, not the input's: exit 1,
    // and its partial directory is gone at once.
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("simulated write failure"), "{err}");
    assert!(err.contains("checkpoint-4.partial"), "{err}");
    assert!(!out.join("checkpoints/checkpoint-4.partial").exists());
    assert_eq!(
        ferrotune::train::checkpoint::resolve(&out, "latest").unwrap(),
        out.join("checkpoints/checkpoint-2")
    );
    let (code, err) = finish(train(&recipe, &out, &["--resume", "latest"], None));
    assert_eq!(code, 0, "{err}");
    assert!(weights(&out) == weights(&reference));
}

#[test]
fn resume_without_a_checkpoint_and_an_unwritable_output_dir_are_clear_errors() {
    let t = tempfile::tempdir().unwrap();
    let recipe = setup(t.path(), 16, 1, 1);
    let (code, err) = finish(train(
        &recipe,
        &t.path().join("fresh"),
        &["--resume", "latest"],
        None,
    ));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no complete checkpoint"), "{err}");
    // A path under a regular file can never be created (even by root).
    let file = t.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let (code, err) = finish(train(&recipe, &file.join("run"), &[], None));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("a-file/run"), "{err}");
}

#[test]
fn a_resume_with_a_changed_setting_names_each_key() {
    let t = tempfile::tempdir().unwrap();
    let recipe = setup(t.path(), 16, 1, 1);
    let out = t.path().join("run");
    assert_eq!(finish(train(&recipe, &out, &[], None)).0, 0);
    let (code, err) = finish(train(
        &recipe,
        &out,
        &[
            "--resume",
            "latest",
            "--set",
            "learning_rate=2e-5",
            "--set",
            "seed=6",
        ],
        None,
    ));
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    for needle in [
        "`learning_rate` was 0.001, now 0.00002",
        "`seed` was 5, now 6",
        "same recipe",
    ] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
}

#[test]
fn a_closed_stdout_checkpoints_then_exits_quietly() {
    use std::io::{BufRead, BufReader};
    let t = tempfile::tempdir().unwrap();
    let recipe = setup(t.path(), 200, 2, 50);
    let reference = t.path().join("reference");
    assert_eq!(finish(train(&recipe, &reference, &[], None)).0, 0);
    // `ferrotune train ... | head -1`: the reader goes after the first line.
    let out = t.path().join("piped");
    let mut child = train(&recipe, &out, &[], None)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(!first.is_empty());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(o.status.code(), Some(141), "{err}");
    assert!(err.contains("--resume latest"), "{err}");
    assert!(newest_checkpoint(&out) > 0, "{err}");
    let (code, err) = finish(train(&recipe, &out, &["--resume", "latest"], None));
    assert_eq!(code, 0, "{err}");
    assert!(weights(&out) == weights(&reference));

    // `predict ... | head -0`: nothing to save, so a quiet success.
    let input = t.path().join("texts.txt");
    std::fs::write(&input, "good\nbad\n".repeat(50)).unwrap();
    let mut child = Command::new(BIN)
        .args(["predict", "--model", out.join("model").to_str().unwrap()])
        .args(["--input", input.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
