//! Image models through the CLI: train a random EfficientNet-Lite0 on IDX files and on a
//! folder of PNGs, export it in timm's format, predict and evaluate with it; the same for
//! tiny ResNets in transformers' and timm's formats; a crash and
//! `--resume` give the uninterrupted run's weights byte for byte; frozen stages stay
//! bit-identical; bad image data is a one-line error naming the file (exit 2).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ferrotune::testing::{write_tiny_idx, write_tiny_image_model, write_tiny_resnet};

const BIN: &str = env!("CARGO_BIN_EXE_ferrotune");

/// A random model, IDX train and test sets, and a recipe over them.
fn setup(dir: &Path, extra: &str) -> PathBuf {
    write_tiny_image_model(&dir.join("model")).unwrap();
    recipe_over(dir, extra)
}

/// IDX train and test sets and a recipe over them and the model in `dir/model`.
fn recipe_over(dir: &Path, extra: &str) -> PathBuf {
    let train = write_tiny_idx(&dir.join("data"), "train", 48, 12).unwrap();
    let test = write_tiny_idx(&dir.join("data"), "t10k", 24, 12).unwrap();
    let recipe = dir.join("recipe.toml");
    std::fs::write(
        &recipe,
        format!(
            "model_name_or_path = {:?}\ntrain_file = {:?}\nvalidation_file = {:?}\n\
             image_size = 16\n\
             train_transforms = [{{ name = \"RandomResizedCrop\", size = 16, scale = [0.6, 1.0] }}, \
             {{ name = \"RandomHorizontalFlip\" }}]\n\
             eval_transforms = [{{ name = \"Resize\", height = 16, width = 16 }}]\n\
             num_train_epochs = 2\nper_device_train_batch_size = 8\nlearning_rate = 1e-3\n\
             warmup_ratio = 0.1\nlogging_steps = 2\nsave_steps = 1\nsave_total_limit = 2\n\
             seed = 3\nreport_to = \"none\"\n{extra}",
            dir.join("model"),
            train,
            test
        ),
    )
    .unwrap();
    recipe
}

fn run(args: &[&str], env: Option<(&str, &str)>) -> (i32, String, String) {
    let mut c = Command::new(BIN);
    c.args(args)
        .env_remove("FERROTUNE_FAILPOINT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some((k, v)) = env {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn train(recipe: &Path, out: &Path, extra: &[&str], env: Option<(&str, &str)>) -> (i32, String) {
    let mut args = vec![
        "train",
        "--recipe",
        recipe.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    let (code, _, err) = run(&args, env);
    (code, err)
}

fn tensors(path: &Path) -> std::collections::HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(_, v)| v.dtype() == safetensors::Dtype::F32)
        .map(|(k, v)| {
            let f = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (k, f)
        })
        .collect()
}

/// Trains on IDX files, exports timm's format (no tokenizer; `label_names`, the trained
/// input size), predicts IDX images and a PNG alike, and evaluates on the IDX test set.
#[test]
fn trains_exports_predicts_and_evaluates_on_idx_and_png() {
    let t = tempfile::tempdir().unwrap();
    let recipe = setup(t.path(), "");
    let out = t.path().join("run");
    let (code, err) = train(&recipe, &out, &[], None);
    assert_eq!(code, 0, "{err}");
    let model = out.join("model");
    assert!(!model.join("tokenizer.json").exists());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architecture"], "tf_efficientnet_lite0");
    assert_eq!(cfg["num_classes"], 3);
    assert_eq!(cfg["label_names"], serde_json::json!(["0", "1", "2"]));
    assert_eq!(
        cfg["pretrained_cfg"]["input_size"],
        serde_json::json!([3, 16, 16])
    );
    let test = t.path().join("data/t10k-images-idx3-ubyte");
    let predict = |input: &Path| {
        run(
            &[
                "predict",
                "--model",
                model.to_str().unwrap(),
                "--input",
                input.to_str().unwrap(),
            ],
            None,
        )
    };
    let (code, preds, err) = predict(&test);
    assert_eq!(code, 0, "{err}");
    let first = preds.lines().next().unwrap().to_string();
    assert_eq!(preds.lines().count(), 24);
    // The same image as a PNG file gives the same prediction.
    let img = ferrotune::data::image::read_idx_images(&test).unwrap();
    let png = t.path().join("first.png");
    img[0].save(&png).unwrap();
    let (code, one, err) = predict(&png);
    assert_eq!(code, 0, "{err}");
    let label = |l: &str| serde_json::from_str::<serde_json::Value>(l).unwrap()["label"].clone();
    assert_eq!(label(one.trim()), label(&first));
    let (code, report, err) = run(
        &[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--input",
            test.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(report.contains("accuracy"), "{report}");
}

/// A crash after step 5 and `--resume latest` end with the uninterrupted run's weights
/// (random crops and flips included), byte for byte.
#[test]
fn a_crash_and_resume_give_the_uninterrupted_weights() {
    let t = tempfile::tempdir().unwrap();
    let recipe = setup(t.path(), "");
    let reference = t.path().join("reference");
    assert_eq!(train(&recipe, &reference, &[], None).0, 0);
    let out = t.path().join("crashed");
    let (code, _) = train(
        &recipe,
        &out,
        &[],
        Some(("FERROTUNE_FAILPOINT", "abort_after_step=5")),
    );
    assert_ne!(code, 0);
    assert!(!out.join("model").exists());
    let (code, err) = train(&recipe, &out, &["--resume", "latest"], None);
    assert_eq!(code, 0, "{err}");
    let a = std::fs::read(reference.join("model/model.safetensors")).unwrap();
    let b = std::fs::read(out.join("model/model.safetensors")).unwrap();
    assert!(a == b, "weights differ after a crash and resume");
}

/// With the stem and the first three stages frozen, their weights and batch-norm
/// statistics come out bit-identical; the rest trained.
#[test]
fn frozen_stages_stay_bit_identical() {
    let t = tempfile::tempdir().unwrap();
    let recipe = setup(t.path(), "freeze_layers = 3\n");
    let out = t.path().join("run");
    let (code, err) = train(&recipe, &out, &[], None);
    assert_eq!(code, 0, "{err}");
    let before = tensors(&t.path().join("model/model.safetensors"));
    let after = tensors(&out.join("model/model.safetensors"));
    let frozen = |n: &str| {
        ["conv_stem.", "bn1.", "blocks.0.", "blocks.1.", "blocks.2."]
            .iter()
            .any(|p| n.starts_with(p))
    };
    let mut changed = 0;
    for (name, a) in &after {
        if name.starts_with("classifier.") {
            continue;
        }
        let same = before[name] == *a;
        if frozen(name) {
            assert!(same, "{name} is frozen but changed");
        } else if !same {
            changed += 1;
        }
    }
    assert!(changed > 100, "only {changed} unfrozen tensors changed");
}

/// Bad image data: labels and images of different counts, a wrong IDX magic number, an
/// empty class folder, a truncated PNG — each a one-line error naming the file, exit 2.
#[test]
fn bad_image_data_is_a_one_line_error() {
    let t = tempfile::tempdir().unwrap();
    let recipe = setup(t.path(), "");
    let text = std::fs::read_to_string(&recipe).unwrap();
    let data = t.path().join("data");
    let check = |recipe_text: String, needle: &str, what: &str| {
        let r = t.path().join(format!("{what}.toml"));
        std::fs::write(&r, recipe_text).unwrap();
        let (code, err) = train(&r, &t.path().join(what), &[], None);
        assert_eq!(code, 2, "{what}: {err}");
        let line = err
            .lines()
            .rfind(|l| l.starts_with("error"))
            .unwrap_or_default();
        assert!(line.contains(needle), "{what}: {err}");
    };
    // 47 labels for 48 images.
    let lp = data.join("train-labels-idx1-ubyte");
    let mut l = std::fs::read(&lp).unwrap();
    l.pop();
    l[7] = 47;
    std::fs::write(&lp, &l).unwrap();
    check(text.clone(), "train-labels-idx1-ubyte", "counts");
    write_tiny_idx(&data, "train", 48, 12).unwrap();
    // A wrong magic number.
    let ip = data.join("train-images-idx3-ubyte");
    let mut b = std::fs::read(&ip).unwrap();
    b[3] = 0x01;
    std::fs::write(&ip, &b).unwrap();
    check(text.clone(), "magic", "magic");
    write_tiny_idx(&data, "train", 48, 12).unwrap();
    // A class folder with no image, and a truncated PNG.
    let folders = t.path().join("folders");
    let imgs = ferrotune::data::image::read_idx_images(&ip).unwrap();
    for (c, class) in ["a", "b"].iter().enumerate() {
        std::fs::create_dir_all(folders.join(class)).unwrap();
        for i in 0..4 {
            imgs[c * 4 + i]
                .save(folders.join(class).join(format!("{i}.png")))
                .unwrap();
        }
    }
    let test = data.join("t10k-images-idx3-ubyte");
    let with_folders = text
        .replace(
            &format!("train_file = {:?}", ip),
            &format!("train_file = {:?}\nfile_extensions = [\"png\"]", folders),
        )
        .replace(
            &format!("validation_file = {:?}", test),
            "validation_split = 0.25",
        );
    let cut = folders.join("b/3.png");
    let bytes = std::fs::read(&cut).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    check(with_folders.clone(), "3.png", "truncated");
    std::fs::create_dir_all(folders.join("c")).unwrap();
    check(with_folders, "c", "empty");
}

/// A tiny ResNet, in transformers' format (basic blocks) and in timm's (bottleneck),
/// trains on IDX files, exports in the format it came in, predicts and evaluates.
#[test]
fn resnet_trains_exports_and_predicts_in_both_formats() {
    for timm in [false, true] {
        let t = tempfile::tempdir().unwrap();
        write_tiny_resnet(&t.path().join("model"), timm, timm, 1000, 2).unwrap();
        let recipe = recipe_over(t.path(), "");
        let out = t.path().join("run");
        let (code, err) = train(&recipe, &out, &[], None);
        assert_eq!(code, 0, "{err}");
        let model = out.join("model");
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap())
                .unwrap();
        let names = tensors(&model.join("model.safetensors"));
        if timm {
            assert_eq!(cfg["architecture"], "resnet50");
            assert_eq!(cfg["num_classes"], 3);
            assert!(names.contains_key("fc.weight") && names.contains_key("layer1.0.conv3.weight"));
        } else {
            assert_eq!(cfg["model_type"], "resnet");
            assert_eq!(cfg["num_labels"], 3);
            assert!(names.contains_key("classifier.1.weight"));
        }
        let test = t.path().join("data/t10k-images-idx3-ubyte");
        let (code, preds, err) = run(
            &[
                "predict",
                "--model",
                model.to_str().unwrap(),
                "--input",
                test.to_str().unwrap(),
            ],
            None,
        );
        assert_eq!(code, 0, "{err}");
        assert_eq!(preds.lines().count(), 24);
        let (code, report, err) = run(
            &[
                "eval",
                "--model",
                model.to_str().unwrap(),
                "--input",
                test.to_str().unwrap(),
            ],
            None,
        );
        assert_eq!(code, 0, "{err}");
        assert!(report.contains("accuracy"), "{report}");
    }
}

/// A model whose classifier has another size than its config says — a pretrained
/// ResNet or EfficientNet to train, or an exported one to predict with — is a one-line
/// error naming the config file, the field and the model file, exit 2.
#[test]
fn a_classifier_of_another_size_than_the_config_is_exit_2() {
    let t = tempfile::tempdir().unwrap();
    let edit = |dir: &Path, field: &str, v: serde_json::Value| {
        let p = dir.join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        cfg[field] = v;
        std::fs::write(&p, cfg.to_string()).unwrap();
    };
    let one_line_error = |err: &str, field: &str| {
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
        assert_eq!(errors.len(), 1, "{err}");
        assert!(
            errors[0].contains("config.json")
                && errors[0].contains(&format!("`{field}`"))
                && errors[0].contains("model.safetensors"),
            "{err}"
        );
    };
    for (i, field) in ["num_classes", "num_labels"].into_iter().enumerate() {
        let dir = t.path().join(field);
        if i == 0 {
            write_tiny_image_model(&dir.join("model")).unwrap();
        } else {
            write_tiny_resnet(&dir.join("model"), false, false, 5, 1).unwrap();
        }
        let recipe = recipe_over(&dir, "");
        edit(&dir.join("model"), field, serde_json::json!(4));
        let (code, err) = train(&recipe, &dir.join("run"), &[], None);
        assert_eq!(code, 2, "{err}");
        one_line_error(&err, field);
    }
    // An exported model whose config lost a class.
    let dir = t.path().join("export");
    write_tiny_resnet(&dir.join("model"), false, true, 3, 1).unwrap();
    let recipe = recipe_over(&dir, "");
    let (code, err) = train(&recipe, &dir.join("run"), &[], None);
    assert_eq!(code, 0, "{err}");
    let model = dir.join("run/model");
    edit(&model, "num_classes", serde_json::json!(2));
    let test = dir.join("data/t10k-images-idx3-ubyte");
    let (code, _, err) = run(
        &[
            "predict",
            "--model",
            model.to_str().unwrap(),
            "--input",
            test.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 2, "{err}");
    one_line_error(&err, "num_classes");
}
