//! Non-finite steps are skipped, logged and counted; too many in a row stop the run with
//! the step and the batch's rows named.

use std::path::Path;

use ferrotune::testing::{write_tiny_model, TinySpec};
use ferrotune::train::{train, Silent};
use ferrotune::TrainConfig;

fn setup(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let model = dir.join("model");
    write_tiny_model(&model, &TinySpec::default()).unwrap();
    let data = dir.join("reg.csv");
    let mut s = String::from("text,label\n");
    for i in 0..40 {
        // Line 7 holds a target whose square overflows f32: its batch's loss is infinite.
        let v = if i == 5 {
            "1e30".to_string()
        } else {
            format!("0.{}", i % 10)
        };
        s.push_str(&format!("the film was good .,{v}\n"));
    }
    std::fs::write(&data, s).unwrap();
    (model, data)
}

fn config(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> TrainConfig {
    let text = format!(
        "model_name_or_path = {model:?}\ntrain_file = {data:?}\nvalidation_file = {data:?}\n\
         output_dir = {out:?}\nproblem_type = \"regression\"\nper_device_train_batch_size = 4\n\
         num_train_epochs = 2\nmax_seq_length = 16\nlearning_rate = 1e-3\n"
    );
    let sets: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    TrainConfig::from_toml_str(&text, Path::new("t.toml"), &sets).unwrap()
}

#[test]
fn non_finite_steps_are_skipped_and_counted() {
    let t = tempfile::tempdir().unwrap();
    let (model, data) = setup(t.path());
    let out = t.path().join("run");
    let s = train(&config(&model, &data, &out, &[]), &mut Silent).unwrap();
    assert_eq!(s.steps, 20);
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let skipped: Vec<&str> = log.lines().filter(|l| l.contains("\"skipped\"")).collect();
    // The bad row is in one batch per epoch.
    assert_eq!(skipped.len(), 2, "{log}");
    assert!(
        skipped.iter().all(|l| l.contains("\"line 7\"")),
        "{skipped:?}"
    );
    // The weights stayed finite: the skipped steps changed nothing.
    let w = candle_core::safetensors::load(
        out.join("model/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    for (name, t) in w {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{name}");
    }
}

#[test]
fn too_many_bad_steps_in_a_row_stop_the_run_naming_the_rows() {
    let t = tempfile::tempdir().unwrap();
    let (model, data) = setup(t.path());
    let out = t.path().join("run");
    let e = train(
        &config(&model, &data, &out, &["max_bad_steps=0"]),
        &mut Silent,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("non-finite") && e.contains("line 7") && e.contains("reg.csv"),
        "{e}"
    );
}
