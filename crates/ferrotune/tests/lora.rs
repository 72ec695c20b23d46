//! LoRA on a tiny random BERT: which tensors get gradients, base weights bit-identical
//! after training, the PEFT adapter export and its reload (`--adapter`), the merged export,
//! and the errors of a target that matches nothing and of an adapter that does not fit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ferrotune::data::reader::Example;
use ferrotune::families::{self, HeadSpec, Loaded};
use ferrotune::loss::{LossConfig, Targets};
use ferrotune::nn::lora::{self, LoraSpec};
use ferrotune::nn::{Batch, Ctx, GroupKind, TokenBatch};
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
         output_dir = {:?}\nper_device_train_batch_size = 8\nlearning_rate = 2e-2\n\
         num_train_epochs = 2\nmax_seq_length = 16\nseed = 3\nweight_decay = 0.1\n",
        model, data, out
    );
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    TrainConfig::from_toml_str(&text, Path::new("t.toml"), &sets)
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn spec(targets: &[&str]) -> LoraSpec {
    LoraSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: lora::Targets::List(targets.iter().map(|s| s.to_string()).collect()),
        modules_to_save: vec!["classifier".into()],
        use_rslora: false,
        seed: 5,
        base_4bit: false,
    }
}

fn build(model: &Path, spec: &LoraSpec) -> Loaded {
    lora::build(Some(spec), || {
        families::load(model, &HeadSpec::new(2), 3, &Device::Cpu).map(|(_, _, l)| l)
    })
    .unwrap()
}

/// With LoRA, a training step gives the frozen base no gradient, B and the head a non-zero
/// one, and A exactly zero (B starts at zero, as PEFT's: `dL/dA = s·Bᵀ·dL/dy·x`); once B
/// has moved (one SGD step on it), every A has a non-zero gradient too.
#[test]
fn gradients_reach_the_adapters_and_the_head_only() {
    let t = tempfile::tempdir().unwrap();
    let (model, _) = setup(t.path());
    let loaded = build(&model, &spec(&["query", "value"]));
    let params = &loaded.params;
    let state = params.lora.as_ref().unwrap();
    // Two layers, query and value each.
    assert_eq!(state.modules.len(), 4);
    assert_eq!(state.saved, vec!["classifier".to_string()]);
    let frozen: Vec<bool> = params
        .groups
        .iter()
        .map(|g| g.kind == GroupKind::Frozen)
        .collect();
    let dev = Device::Cpu;
    let ids: Vec<u32> = (0..2 * 8).map(|i| 5 + (i * 7 % 20) as u32).collect();
    let batch = Batch::Tokens(TokenBatch {
        input_ids: Tensor::from_vec(ids, (2, 8), &dev).unwrap(),
        token_type_ids: Tensor::zeros((2, 8), candle_core::DType::U32, &dev).unwrap(),
        attention_mask: Tensor::ones((2, 8), candle_core::DType::F32, &dev).unwrap(),
    });
    let y = Targets::Classes(Tensor::from_vec(vec![0u32, 1], 2, &dev).unwrap());
    let grads = |params: &ferrotune::nn::ParamStore| {
        let ctx = Ctx {
            frozen: &frozen,
            train: true,
            ..Ctx::eval()
        };
        ferrotune::train::step::loss_and_grads(
            loaded.model.as_ref(),
            params,
            &batch,
            &y,
            &LossConfig::default(),
            1.0,
            ctx,
        )
        .unwrap()
        .1
    };
    let g = grads(params);
    let nonzero = |g: &Option<Vec<f32>>| g.as_ref().is_some_and(|g| g.iter().any(|&v| v != 0.0));
    let (mut a, mut b, mut head, mut base) = (0, 0, 0, 0);
    for (p, g) in params.params.iter().zip(&g) {
        let kind = params.groups[p.group].kind;
        if kind == GroupKind::Frozen {
            assert!(g.is_none(), "{} is frozen but has a gradient", p.name);
            base += 1;
        } else if p.name.ends_with(".lora_A.weight") {
            let g = g.as_ref().expect("A trains");
            assert!(
                g.iter().all(|&v| v == 0.0),
                "{}: B = 0, so no gradient",
                p.name
            );
            a += 1;
        } else if p.name.ends_with(".lora_B.weight") {
            assert!(nonzero(g), "{} has no gradient", p.name);
            b += 1;
        } else {
            assert!(p.name.starts_with("classifier."), "{} trains", p.name);
            assert!(nonzero(g), "{} has no gradient", p.name);
            head += 1;
        }
    }
    assert_eq!((a, b, head), (4, 4, 2));
    assert!(base > 20);
    // One SGD step on B: now A's gradient is non-zero.
    for (p, g) in params.params.iter().zip(&g) {
        if p.name.ends_with(".lora_B.weight") {
            let g = Tensor::from_vec(g.clone().unwrap(), p.var.dims(), &dev).unwrap();
            p.var
                .set(&(p.var.as_tensor() - (g * 10.0).unwrap()).unwrap())
                .unwrap();
        }
    }
    let g = grads(params);
    for (p, g) in params.params.iter().zip(&g) {
        if p.name.ends_with(".lora_A.weight") {
            assert!(nonzero(g), "{} has no gradient after B moved", p.name);
        }
    }
}

fn examples() -> Vec<Example> {
    [
        "the movie was very good .",
        "bad film !",
        "the plot was awful",
        "great acting",
    ]
    .iter()
    .map(|t| Example {
        id: "x".into(),
        line: 1,
        text: t.to_string(),
        text_pair: None,
        label: None,
    })
    .collect()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A LoRA run: the base tensors stay bit-identical (in the checkpoint, which holds the
/// adapters apart), the adapter directory is PEFT's, the merged model gives the logits of
/// base + adapter, and the adapter reloads (`--adapter`) to the same logits.
#[test]
fn lora_run_keeps_the_base_and_exports_adapter_and_merged_model() {
    let t = tempfile::tempdir().unwrap();
    let (model, csv) = setup(t.path());
    let out = t.path().join("run");
    let cfg = config(
        &model,
        &csv,
        &out,
        &[
            "lora_r=4",
            "lora_alpha=8",
            "lora_dropout=0.1",
            "lora_target_modules=[\"query\",\"value\"]",
        ],
    )
    .unwrap();
    train(&cfg, &mut Silent).unwrap();

    // The checkpoint's tensors in the model's order: the frozen ones are the base's, bit
    // for bit.
    let loaded = build(&model, &spec(&["query", "value"]));
    let ck =
        ferrotune::train::checkpoint::list(&ferrotune::train::checkpoint::checkpoints_dir(&out))
            .pop()
            .unwrap()
            .1;
    let saved = tensors(&ck.join("model.safetensors"));
    let base = tensors(&model.join("model.safetensors"));
    let mut checked = 0;
    let mut b_moved = false;
    for (i, p) in loaded.params.state().enumerate() {
        let now = &saved[&format!("p.{i:05}")];
        if loaded.params.groups[p.group].kind == GroupKind::Frozen {
            let name = p.name.trim_start_matches("bert.");
            assert_eq!(values(now), values(&base[name]), "{name} changed");
            checked += 1;
        } else if p.name.ends_with("lora_B.weight") {
            b_moved |= values(now).iter().any(|&v| v != 0.0);
        }
    }
    assert_eq!(checked, base.len());
    assert!(b_moved, "no adapter trained");

    // The PEFT adapter directory.
    let adapter = out.join("adapter");
    let ac: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(ac["peft_type"], "LORA");
    assert_eq!(ac["task_type"], "SEQ_CLS");
    assert_eq!(ac["r"], 4);
    assert_eq!(ac["lora_alpha"], 8.0);
    assert_eq!(ac["lora_dropout"], 0.1);
    assert_eq!(ac["fan_in_fan_out"], false);
    assert_eq!(ac["target_modules"], serde_json::json!(["query", "value"]));
    assert_eq!(
        ac["modules_to_save"],
        serde_json::json!(["classifier", "score"])
    );
    let at = tensors(&adapter.join("adapter_model.safetensors"));
    let mut keys: Vec<&str> = at.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys.len(), 2 * 4 + 2, "{keys:?}");
    assert!(
        keys.contains(&"base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight")
    );
    assert!(keys.contains(&"base_model.model.classifier.weight"));
    assert_eq!(
        at["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"].dims(),
        &[4, 16]
    );

    // Merged model vs base + adapter vs the adapter reloaded.
    let merged = Predictor::load(&out.join("model")).unwrap();
    let (with_adapter, _) = Predictor::load_with_adapter(&model, Some(&adapter)).unwrap();
    let ex = examples();
    let lm = merged.predict_logits(&ex, |_| {}).unwrap();
    let la = with_adapter.predict_logits(&ex, |_| {}).unwrap();
    let d = max_diff(&lm, &la);
    assert!(d < 1e-5, "merged vs base + adapter: {d}");
    assert_eq!(with_adapter.labels, merged.labels);
    // The merged model differs from the base where the adapters are.
    let mt = tensors(&out.join("model/model.safetensors"));
    let q = "encoder.layer.0.attention.self.query.weight";
    assert_ne!(values(&mt[&format!("bert.{q}")]), values(&base[q]));
    let k = "encoder.layer.0.attention.self.key.weight";
    assert_eq!(values(&mt[&format!("bert.{k}")]), values(&base[k]));
    assert!(!mt.keys().any(|k| k.contains("lora_")));
}

/// `lora_target_modules` that matches nothing is a configuration error listing the linear
/// layers' names; `"all-linear"` targets every linear layer but the classifier.
#[test]
fn targets_that_match_nothing_list_the_linear_layers() {
    let t = tempfile::tempdir().unwrap();
    let (model, csv) = setup(t.path());
    let out = t.path().join("run");
    let cfg = config(
        &model,
        &csv,
        &out,
        &["lora_r=4", "lora_target_modules=[\"q_proj\"]"],
    )
    .unwrap();
    let e = train(&cfg, &mut Silent).unwrap_err();
    assert!(e.is_bad_input(), "{e}");
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "{msg}");
    assert!(
        msg.contains("q_proj") && msg.contains("query, key, value, dense"),
        "{msg}"
    );
    let loaded = lora::build(
        Some(&LoraSpec {
            targets: lora::Targets::AllLinear,
            ..spec(&[])
        }),
        || families::load(&model, &HeadSpec::new(2), 3, &Device::Cpu).map(|(_, _, l)| l),
    )
    .unwrap();
    let mods: Vec<&str> = loaded
        .params
        .lora
        .as_ref()
        .unwrap()
        .modules
        .iter()
        .map(|m| m.module.as_str())
        .collect();
    // 6 per layer, and BERT's pooler; not the classifier.
    assert_eq!(mods.len(), 2 * 6 + 1, "{mods:?}");
    assert!(mods.contains(&"bert.pooler.dense"));
    assert!(!mods.iter().any(|m| m.starts_with("classifier")));
    // A string other than "all-linear" is refused when the recipe is read.
    let e = config(
        &model,
        &csv,
        &out,
        &["lora_r=4", "lora_target_modules=\"q.*\""],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("lora_target_modules") && e.contains("all-linear"),
        "{e}"
    );
}

/// An adapter that does not fit the base model (a module the model lacks, an A of another
/// shape, a missing tensor) is an error naming adapter_model.safetensors and the tensor.
#[test]
fn an_adapter_that_does_not_fit_names_the_tensor() {
    let t = tempfile::tempdir().unwrap();
    let (model, _) = setup(t.path());
    let loaded = build(&model, &spec(&["query", "value"]));
    let dir = t.path().join("adapter");
    lora::write_adapter(&dir, &loaded.params, "base", "SEQ_CLS", &[]).unwrap();
    // As written, it loads.
    Predictor::load_with_adapter(&model, Some(&dir))
        .map(|_| ())
        .or_else(|e| {
            // The base model has no labels of its own (no id2label): that is the only
            // acceptable failure here.
            assert!(e.to_string().contains("id2label"), "{e}");
            Ok::<(), ferrotune::Error>(())
        })
        .unwrap();
    let file = dir.join("adapter_model.safetensors");
    let good = tensors(&file);
    let check = |edit: &dyn Fn(&mut HashMap<String, Tensor>), want: &str| {
        let mut ts = good.clone();
        edit(&mut ts);
        candle_core::safetensors::save(&ts, &file).unwrap();
        let ad = lora::read_adapter(&dir, &Device::Cpu).unwrap();
        let e = ad
            .load(|| families::load(&model, &HeadSpec::new(2), 3, &Device::Cpu).map(|(_, _, l)| l))
            .map(|_| ())
            .unwrap_err();
        assert!(e.is_bad_input(), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("adapter_model.safetensors") && msg.contains(want) && !msg.contains('\n'),
            "{msg}"
        );
    };
    let a0 = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight";
    check(
        &|ts| {
            ts.insert(
                "base_model.model.bert.encoder.layer.7.attention.self.query.lora_A.weight".into(),
                Tensor::zeros((4, 16), candle_core::DType::F32, &Device::Cpu).unwrap(),
            );
        },
        "layer.7.attention.self.query.lora_A.weight",
    );
    check(
        &|ts| {
            ts.insert(
                a0.into(),
                Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
            );
        },
        a0,
    );
    check(
        &|ts| {
            ts.remove(a0);
        },
        a0,
    );
    check(
        &|ts| {
            ts.remove("base_model.model.classifier.weight");
        },
        "base_model.model.classifier.weight",
    );
}

/// `load_in_4bit = true` on f32 weights, every text family (QLoRA-style, lossy): the run
/// trains, and the merged export holds each frozen linear layer that is not adapted as its
/// 4-bit weights dequantised (ggml's Q4_1 of the base, in either layout), every other
/// frozen tensor as the base's. Widths that are not whole blocks of 32 stay f32.
#[test]
fn a_4bit_base_trains_every_text_family() {
    use ferrotune::kernels::q4::Q4Weight;
    let q4 = |t: &Tensor| -> Option<Vec<f32>> {
        let (o, i) = t.dims2().ok()?;
        Some(Q4Weight::quantize(&values(t), o, i)?.dequantize())
    };
    for fam in families::text_families() {
        let name = fam.model_type();
        let t = tempfile::tempdir().unwrap();
        let model = t.path().join("model");
        let spec = TinySpec {
            hidden: 32,
            intermediate: 64,
            ..TinySpec::of(name)
        };
        write_tiny_model(&model, &spec).unwrap();
        let csv = t.path().join("train.csv");
        write_tiny_csv(&csv, 32).unwrap();
        let out = t.path().join("run");
        let cfg = config(
            &model,
            &csv,
            &out,
            &["lora_r=4", "load_in_4bit=true", "num_train_epochs=1"],
        )
        .unwrap();
        train(&cfg, &mut Silent).unwrap_or_else(|e| panic!("{name}: {e}"));
        let base = tensors(&model.join("model.safetensors"));
        let merged = tensors(&out.join("model/model.safetensors"));
        let adapted: Vec<String> = tensors(&out.join("adapter/adapter_model.safetensors"))
            .keys()
            .filter_map(|k| k.strip_suffix(".lora_A.weight"))
            .map(|k| k.trim_start_matches("base_model.model.").to_string())
            .collect();
        let (mut kept, mut four) = (0, 0);
        for (k, m) in &merged {
            let Some(b) = base
                .get(k)
                .or_else(|| k.split_once('.').and_then(|(_, rest)| base.get(rest)))
            else {
                continue; // a new head
            };
            if adapted.iter().any(|a| k.starts_with(&format!("{a}."))) || b.dims() != m.dims() {
                continue;
            }
            let mv = values(m);
            if mv == values(b) {
                kept += 1;
                continue;
            }
            let tr = |t: &Tensor| t.t().unwrap().contiguous().unwrap();
            let as_4bit = q4(b) == Some(mv.clone())
                || q4(&tr(b)).map(|v| {
                    let (o, i) = tr(b).dims2().unwrap();
                    values(&tr(&Tensor::from_vec(v, (o, i), &Device::Cpu).unwrap()))
                }) == Some(mv);
            assert!(
                as_4bit,
                "{name}: {k} is neither the base nor its 4-bit weights"
            );
            four += 1;
        }
        assert!(four > 0 && kept > 0, "{name}: {four} 4-bit, {kept} kept");
    }
}
