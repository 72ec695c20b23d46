//! Image models through the CLI: train a random EfficientNet-Lite0 on IDX files and on a
//! folder of PNGs, export it in timm's format, predict and evaluate with it; the same for
//! tiny ResNets in transformers' and timm's formats; a crash and
//! `--resume` give the uninterrupted run's weights byte for byte; frozen stages stay
//! bit-identical; bad image data is a one-line error naming the file (exit 2); `serve`
//! answers base64 and multipart images as `predict` answers the same file.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ferrotune::testing::{
    write_tiny_idx, write_tiny_image_classifier, write_tiny_image_model, write_tiny_resnet,
};

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

/// `ferrotune eval` of `model` on `test` succeeds and reports accuracy.
fn evaluates(model: &Path, test: &Path) {
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
    evaluates(&model, &test);
}

/// Trains `recipe` uninterrupted into `dir/reference`, and again into `dir/crashed` with a
/// crash after step 5 and `--resume latest`; asserts the two exports are byte-identical.
/// Returns the uninterrupted run's folder.
fn crash_and_resume_match(recipe: &Path, dir: &Path) -> PathBuf {
    let reference = dir.join("reference");
    let (code, err) = train(recipe, &reference, &[], None);
    assert_eq!(code, 0, "{err}");
    let out = dir.join("crashed");
    let (code, _) = train(
        recipe,
        &out,
        &[],
        Some(("FERROTUNE_FAILPOINT", "abort_after_step=5")),
    );
    assert_ne!(code, 0);
    assert!(!out.join("model").exists());
    let (code, err) = train(recipe, &out, &["--resume", "latest"], None);
    assert_eq!(code, 0, "{err}");
    let a = std::fs::read(reference.join("model/model.safetensors")).unwrap();
    let b = std::fs::read(out.join("model/model.safetensors")).unwrap();
    assert!(a == b, "weights differ after a crash and resume");
    reference
}

/// A crash after step 5 and `--resume latest` end with the uninterrupted run's weights
/// (random crops and flips included), byte for byte.
#[test]
fn a_crash_and_resume_give_the_uninterrupted_weights() {
    let t = tempfile::tempdir().unwrap();
    let recipe = setup(t.path(), "");
    crash_and_resume_match(&recipe, t.path());
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

/// fastai's `fine_tune` with frozen batch-norm statistics: the first epoch trains the
/// head alone, the second every group; the running statistics never move.
#[test]
fn freeze_epochs_then_all_with_frozen_batch_norm_statistics() {
    let t = tempfile::tempdir().unwrap();
    let recipe = setup(t.path(), "freeze_epochs = 1\nfreeze_bn = true\n");
    let out = t.path().join("run");
    let (code, err) = train(&recipe, &out, &[], None);
    assert_eq!(code, 0, "{err}");
    // The last checkpoint (the export is the best epoch's, maybe the first) holds its
    // tensors by index, the parameters first and the buffers (batch-norm statistics)
    // last: each statistic is as it was; the parameters trained in epoch 2.
    let bits = |v: &Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    let before = tensors(&t.path().join("model/model.safetensors"));
    let stats = before
        .keys()
        .filter(|n| n.ends_with(".running_mean") || n.ends_with(".running_var"))
        .count();
    let initial: std::collections::HashSet<Vec<u32>> = before.values().map(bits).collect();
    let last = tensors(&out.join("checkpoints/checkpoint-12/model.safetensors"));
    assert_eq!(last.len(), before.len());
    let n_params = last.len() - stats;
    let (mut params_changed, mut stats_kept) = (0, 0);
    for (k, v) in &last {
        let i: usize = k.trim_start_matches("p.").parse().unwrap();
        let kept = initial.contains(&bits(v));
        if i >= n_params {
            stats_kept += kept as usize;
        } else {
            params_changed += !kept as usize;
        }
    }
    assert_eq!(stats_kept, stats, "batch-norm statistics moved");
    // (A random network on frozen statistics has dead units, whose weights get no
    // gradient: not every parameter moves.)
    assert!(
        params_changed > n_params / 2,
        "{params_changed} of {n_params} trained"
    );
    // The groups' frozen state as logged: the backbone frozen at step 0, nothing at the
    // start of epoch 2 (step 6: 48 images, batches of 8).
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let frozen_at = |step: u64| -> Vec<bool> {
        let line = log
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["split"] == "param_groups" && v["step"] == step)
            .unwrap_or_else(|| panic!("no param_groups line at step {step}"));
        line["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["frozen"].as_bool().unwrap())
            .collect()
    };
    let first = frozen_at(0);
    assert!(!first.last().unwrap() && first[..first.len() - 1].iter().all(|&f| f));
    assert!(frozen_at(6).iter().all(|&f| !f));
}

/// Mixup and CutMix with a moving average of the weights: each epoch evaluates the
/// average too, the export is the best epoch's average, and a crash + `--resume` ends
/// byte-identical to the uninterrupted run.
#[test]
fn mixup_cutmix_and_ema_resume_exactly_and_export_the_average() {
    let t = tempfile::tempdir().unwrap();
    let recipe = setup(
        t.path(),
        "model_ema_decay = 0.8\nmixup_alpha = 0.4\ncutmix_alpha = 1.0\n",
    );
    let reference = crash_and_resume_match(&recipe, t.path());
    let log = std::fs::read_to_string(reference.join("metrics.jsonl")).unwrap();
    let evals: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["split"] == "eval")
        .collect();
    assert_eq!(evals.len(), 2);
    assert!(evals.iter().all(|e| e["eval_ema_accuracy"].is_number()));
    // The export holds the best epoch's average: the last checkpoint's `best` weights.
    let sorted = |m: std::collections::HashMap<String, Vec<f32>>| {
        let mut v: Vec<Vec<u32>> = m
            .into_values()
            .map(|t| t.iter().map(|x| x.to_bits()).collect())
            .collect();
        v.sort();
        v
    };
    let ck = reference.join("checkpoints/checkpoint-12");
    let exported = sorted(tensors(&reference.join("model/model.safetensors")));
    assert!(exported == sorted(tensors(&ck.join("best.safetensors"))));
    assert!(exported != sorted(tensors(&ck.join("model.safetensors"))));
}

/// A CSV of image paths (`image_column`, relative to the CSV) trains and predicts; a
/// truncated image stops the run naming it, or is left out under `on_bad_row = "skip"`
/// and listed in skipped_rows.jsonl.
#[test]
fn csv_of_image_paths_and_skipping_undecodable_images() {
    let t = tempfile::tempdir().unwrap();
    let recipe = setup(t.path(), "");
    let text = std::fs::read_to_string(&recipe).unwrap();
    let imgs =
        ferrotune::data::image::read_idx_images(&t.path().join("data/train-images-idx3-ubyte"))
            .unwrap();
    let dir = t.path().join("pics");
    std::fs::create_dir_all(dir.join("img")).unwrap();
    let mut csv = String::from("file,label\n");
    for (i, img) in imgs.iter().enumerate().take(24) {
        img.save(dir.join(format!("img/{i}.png"))).unwrap();
        csv.push_str(&format!("img/{i}.png,{}\n", ["cat", "dog"][i % 2]));
    }
    std::fs::write(dir.join("data.csv"), &csv).unwrap();
    let bad = dir.join("img/5.png");
    let bytes = std::fs::read(&bad).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let test = t.path().join("data/t10k-images-idx3-ubyte");
    let base = text
        .replace(
            &format!(
                "train_file = {:?}",
                t.path().join("data/train-images-idx3-ubyte")
            ),
            &format!(
                "train_file = {:?}\nimage_column = \"file\"",
                dir.join("data.csv")
            ),
        )
        .replace(
            &format!("validation_file = {:?}", test),
            "validation_split = 0.25",
        );
    let r = t.path().join("csv.toml");
    std::fs::write(&r, &base).unwrap();
    let (code, err) = train(&r, &t.path().join("strict"), &[], None);
    assert_eq!(code, 2, "{err}");
    let line = err.lines().rfind(|l| l.starts_with("error")).unwrap();
    assert!(line.contains("5.png"), "{err}");
    std::fs::write(&r, format!("{base}on_bad_row = \"skip\"\n")).unwrap();
    let out = t.path().join("skip");
    let (code, err) = train(&r, &out, &[], None);
    assert_eq!(code, 0, "{err}");
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert!(
        first["notes"].to_string().contains("1 example(s)"),
        "{first}"
    );
    let skipped = std::fs::read_to_string(out.join("skipped_rows.jsonl")).unwrap();
    assert_eq!(skipped.lines().count(), 1);
    assert!(
        skipped.contains("line 7") || skipped.contains("\"line\":7"),
        "{skipped}"
    );
    // The exported model reads the same column of a CSV.
    std::fs::write(&bad, &bytes).unwrap();
    let (code, preds, err) = run(
        &[
            "predict",
            "--model",
            out.join("model").to_str().unwrap(),
            "--input",
            dir.join("data.csv").to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(preds.lines().count(), 24);
}

/// Kills the server it holds (our own child, by its handle) if the test ends early.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// POSTs `body` as `content_type` to `/predict` over HTTP/1.1; the status and the body.
fn post(addr: &str, content_type: &str, body: &[u8]) -> (u16, serde_json::Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST /predict HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut res = Vec::new();
    s.read_to_end(&mut res).unwrap();
    let res = String::from_utf8_lossy(&res).into_owned();
    let status = res
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = res
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let v = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {res}"));
    (status, v)
}

/// `[{label, score}, ...]` against `ferrotune predict`'s `{"scores": {label: p}}`.
fn assert_same_scores(got: &serde_json::Value, want: &serde_json::Value) {
    let got = got
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {got}"));
    let want = want["scores"].as_object().unwrap();
    assert_eq!(got.len(), want.len());
    for item in got {
        let label = item["label"].as_str().unwrap();
        let (g, w) = (
            item["score"].as_f64().unwrap(),
            want[label].as_f64().unwrap(),
        );
        assert!((g - w).abs() <= 1e-5, "{label}: {g} vs {w}");
    }
}

/// `ferrotune serve` on an image model answers a base64 JSON image and a multipart upload
/// as `ferrotune predict` answers the same file; `--max-image-pixels` and
/// `--max-image-bytes` are 413s, a non-image a 400, and the server keeps serving, then
/// stops on SIGTERM.
#[test]
fn serve_answers_images_as_predict_does() {
    use base64::Engine;
    let t = tempfile::tempdir().unwrap();
    let model = write_tiny_image_classifier(t.path()).unwrap();
    let data = t.path().join("data");
    let imgs = ferrotune::data::image::read_idx_images(&write_tiny_idx(&data, "a", 2, 12).unwrap())
        .unwrap();
    let big = ferrotune::data::image::read_idx_images(&write_tiny_idx(&data, "b", 1, 15).unwrap())
        .unwrap();
    let png = |img: &ferrotune::data::image::Image, name: &str| {
        let p = t.path().join(name);
        img.save(&p).unwrap();
        p
    };
    let (first, second, large) = (
        png(&imgs[0], "0.png"),
        png(&imgs[1], "1.png"),
        png(&big[0], "big.png"),
    );
    let predict = |p: &Path| {
        let (code, out, err) = run(
            &[
                "predict",
                "--model",
                model.to_str().unwrap(),
                "--input",
                p.to_str().unwrap(),
            ],
            None,
        );
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(out.lines().next().unwrap()).unwrap()
    };
    let (want0, want1) = (predict(&first), predict(&second));
    let bytes0 = std::fs::read(&first).unwrap();
    let bytes1 = std::fs::read(&second).unwrap();
    let large = std::fs::read(&large).unwrap();
    // Every image fits the byte cap; the large one is over the pixel cap.
    let max_bytes = bytes0.len().max(bytes1.len()).max(large.len());

    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--model",
            model.to_str().unwrap(),
            "--port",
            "0",
            "--threads",
            "1",
            // 12×12 = 144 fits, 15×15 = 225 does not.
            "--max-image-pixels",
            "200",
            "--max-image-bytes",
            &max_bytes.to_string(),
        ])
        .env_remove("FERROTUNE_FAILPOINT")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let server = Server(child);
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("serve exited before listening")
            .unwrap();
        if let Some((_, a)) = line.split_once("listening on http://") {
            break a.trim().to_string();
        }
    };

    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    // Base64 in JSON, a data URL in a list.
    let (status, v) = post(
        &addr,
        "application/json",
        serde_json::json!({"inputs": b64(&bytes0)})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(status, 200, "{v}");
    assert_same_scores(&v, &want0);
    let body = serde_json::json!({"inputs": [b64(&bytes0), format!("data:image/png;base64,{}", b64(&bytes1))]});
    let (status, v) = post(&addr, "application/json", body.to_string().as_bytes());
    assert_eq!(status, 200, "{v}");
    assert_same_scores(&v[0], &want0);
    assert_same_scores(&v[1], &want1);
    // Multipart: two files, in order.
    let mut form = Vec::new();
    for (name, b) in [("1.png", &bytes1), ("0.png", &bytes0)] {
        form.extend(format!("--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\nContent-Type: image/png\r\n\r\n").bytes());
        form.extend_from_slice(b);
        form.extend(b"\r\n");
    }
    form.extend(b"--XyZ--\r\n");
    let (status, v) = post(&addr, "multipart/form-data; boundary=XyZ", &form);
    assert_eq!(status, 200, "{v}");
    assert_same_scores(&v[0], &want1);
    assert_same_scores(&v[1], &want0);
    // The caps of the command line, and a non-image.
    let (status, v) = post(&addr, "image/png", &large);
    assert_eq!(status, 413, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("225 pixels, over the limit of 200"),
        "{v}"
    );
    let (status, v) = post(&addr, "image/png", &vec![0u8; max_bytes + 1]);
    assert_eq!(status, 413, "{v}");
    let cap = format!("limit of {max_bytes} bytes per image");
    assert!(v["error"].as_str().unwrap().contains(&cap), "{v}");
    let (status, v) = post(
        &addr,
        "application/json",
        br#"{"inputs": "a photo of a cat"}"#,
    );
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("not base64"), "{v}");
    let (status, v) = post(&addr, "image/png", b"not an image");
    assert_eq!(status, 400, "{v}");
    let (status, v) = post(&addr, "image/png", &bytes1);
    assert_eq!(status, 200, "{v}");
    assert_same_scores(&v, &want1);

    // SIGTERM: it drains and exits 0.
    let pid = server.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut server = server;
    let status = server.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
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
        evaluates(&model, &test);
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
