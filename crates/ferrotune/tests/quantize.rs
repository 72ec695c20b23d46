//! `ferrotune quantize`: a quantized directory predicts exactly as int8 inference of the f32
//! model it came from, for every family; it holds no f32 copy of the linear weights; and a
//! damaged one (missing or mismatched scale, weights out of range, config and weights that
//! disagree) is refused with an error naming the file and tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ferrotune::data::reader::Example;
use ferrotune::families;
use ferrotune::formats::safetensors::{
    read_safetensors_with_i8, write_mixed_safetensors, F32View, I8Tensor, TensorView,
};
use ferrotune::precision::Precision;
use ferrotune::predict::Predictor;
use ferrotune::quantize::quantize_model;
use ferrotune::testing::{write_tiny_classifier, TINY_WORDS};

fn examples() -> Vec<Example> {
    (0..9)
        .map(|i| Example {
            id: i.to_string(),
            line: i,
            text: (0..3 + i)
                .map(|j| TINY_WORDS[(i + 5 * j) % 16])
                .collect::<Vec<_>>()
                .join(" "),
            text_pair: None,
            label: None,
        })
        .collect()
}

fn quantized(dir: &Path, family: &'static str) -> (PathBuf, PathBuf) {
    let model = write_tiny_classifier(dir, family, "single_label_classification", 16).unwrap();
    let q = dir.join("q");
    quantize_model(&model, &q).unwrap();
    (model, q)
}

#[test]
fn a_quantized_model_predicts_as_int8_of_its_f32_model_in_every_family() {
    for family in families::text_families() {
        let t = tempfile::tempdir().unwrap();
        let (model, q) = quantized(t.path(), family.model_type());
        let mut f32_model = Predictor::load(&model).unwrap();
        let f32_probs = f32_model.predict_probs(&examples(), |_| {}).unwrap();
        f32_model.set_precision(Precision::Int8).unwrap();
        let on_the_fly = f32_model.predict_probs(&examples(), |_| {}).unwrap();
        let (mut p, params) = Predictor::load_with_params(&q).unwrap();
        assert!(
            p.quantized && p.precision == Precision::Int8,
            "{}",
            family.name()
        );
        // Every linear layer's weights are int8 only: none of them is an f32 parameter.
        assert_eq!(params.int8_layers, params.linear_weights.len());
        assert!(params.int8_layers > 0);
        for w in &params.linear_weights {
            assert!(
                params.params.iter().all(|p| &p.name != w),
                "{w} loaded in f32"
            );
        }
        let loaded = p.predict_probs(&examples(), |_| {}).unwrap();
        assert_eq!(loaded, on_the_fly, "{}", family.name());
        assert_ne!(loaded, f32_probs, "{}: int8 did not run", family.name());
        // auto is int8 here; f32 and bf16 are refused, with the reason.
        assert!(p
            .set_precision(Precision::Auto)
            .unwrap()
            .contains("quantized"));
        let e = p.set_precision(Precision::F32).unwrap_err().to_string();
        assert!(e.contains("int8 weights only"), "{e}");
        assert!(p.set_precision(Precision::Bf16).is_err());
    }
}

#[test]
fn the_quantized_file_holds_int8_weights_scales_and_f32_rest() {
    let t = tempfile::tempdir().unwrap();
    let (model, q) = quantized(t.path(), "bert");
    let (f32s, int8) =
        read_safetensors_with_i8(&model.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert!(int8.is_empty());
    let (rest, qw) =
        read_safetensors_with_i8(&q.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    // 2 layers × 6 linear layers, the pooler and the classifier.
    assert_eq!(qw.len(), 14);
    for (name, w) in &qw {
        assert!(w.data.iter().all(|v| v.abs() <= 63), "{name}");
        let scale = &rest[&format!("{name}_scale")];
        assert_eq!(scale.dims(), &[w.shape[0]]);
        // Dequantized, each weight is within half a step of the f32 one.
        let orig: Vec<f32> = f32s[name].flatten_all().unwrap().to_vec1().unwrap();
        let s: Vec<f32> = scale.to_vec1().unwrap();
        let inp = w.shape[1];
        for (i, (&qv, &o)) in w.data.iter().zip(&orig).enumerate() {
            let back = qv as f32 * s[i / inp];
            assert!((back - o).abs() <= s[i / inp] / 2.0 + 1e-6, "{name}[{i}]");
        }
    }
    // Everything else is as it was.
    for (name, t) in &f32s {
        if !qw.contains_key(name) {
            let (a, b): (Vec<f32>, Vec<f32>) = (
                t.flatten_all().unwrap().to_vec1().unwrap(),
                rest[name].flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert_eq!(a, b, "{name}");
        }
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(q.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg["quantization_config"]["quant_method"], "ferrotune-int8",
        "{cfg}"
    );
    assert_eq!(cfg["quantization_config"]["quantized_layers"], 14);
    assert!(q.join("tokenizer.json").exists() && q.join("vocab.txt").exists());
}

#[test]
fn quantize_refuses_an_existing_output_and_a_quantized_model() {
    let t = tempfile::tempdir().unwrap();
    let (model, q) = quantized(t.path(), "bert");
    let e = quantize_model(&model, &q).unwrap_err().to_string();
    assert!(e.contains("already exists"), "{e}");
    let e = quantize_model(&q, &t.path().join("qq"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("quantized already"), "{e}");
    assert!(!t.path().join("qq").exists());
}

/// Rewrites `dir/model.safetensors` after `edit` changes its tensors.
fn rewrite(
    dir: &Path,
    edit: impl FnOnce(&mut HashMap<String, Vec<f32>>, &mut HashMap<String, I8Tensor>),
) {
    let path = dir.join("model.safetensors");
    let (t, mut int8) = read_safetensors_with_i8(&path, &candle_core::Device::Cpu).unwrap();
    let mut shapes: HashMap<String, Vec<usize>> = HashMap::new();
    let mut f32s: HashMap<String, Vec<f32>> = HashMap::new();
    for (k, v) in t {
        shapes.insert(k.clone(), v.dims().to_vec());
        f32s.insert(k, v.flatten_all().unwrap().to_vec1().unwrap());
    }
    edit(&mut f32s, &mut int8);
    let mut views = Vec::new();
    for (k, v) in &f32s {
        let shape = if shapes.get(k).map(|s| s.iter().product::<usize>()) == Some(v.len()) {
            shapes[k].clone()
        } else {
            vec![v.len()]
        };
        views.push((k.clone(), TensorView::F32(F32View { shape, data: v })));
    }
    for (k, v) in &int8 {
        views.push((k.clone(), TensorView::I8(v)));
    }
    write_mixed_safetensors(views, None, &path).unwrap();
}

fn load_error(dir: &Path) -> String {
    let e = Predictor::load(dir).err().expect("loaded").to_string();
    assert_eq!(e.lines().count(), 1, "{e}");
    e
}

const W: &str = "bert.encoder.layer.0.attention.self.query.weight";

#[test]
fn a_damaged_quantized_model_is_refused_naming_the_tensor() {
    let t = tempfile::tempdir().unwrap();
    let (_, q) = quantized(t.path(), "bert");
    let fresh = |name: &str| {
        let d = t.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in std::fs::read_dir(&q).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), d.join(f.file_name())).unwrap();
        }
        d
    };
    // A missing scale.
    let d = fresh("missing");
    rewrite(&d, |f, _| {
        f.remove(&format!("{W}_scale"));
    });
    let e = load_error(&d);
    assert!(
        e.contains("model.safetensors") && e.contains(&format!("{W}_scale")),
        "{e}"
    );
    assert!(e.contains("missing"), "{e}");
    // A scale of the wrong length.
    let d = fresh("mismatched");
    rewrite(&d, |f, _| {
        f.get_mut(&format!("{W}_scale")).unwrap().pop();
    });
    let e = load_error(&d);
    assert!(
        e.contains(&format!("{W}_scale")) && e.contains("expected [16]"),
        "{e}"
    );
    // A zero scale.
    let d = fresh("zero");
    rewrite(&d, |f, _| {
        f.get_mut(&format!("{W}_scale")).unwrap()[3] = 0.0;
    });
    let e = load_error(&d);
    assert!(e.contains("finite and positive"), "{e}");
    // A weight outside ±63 (the AVX2 kernel's range).
    let d = fresh("range");
    rewrite(&d, |_, i| {
        i.get_mut(W).unwrap().data[5] = -128;
    });
    let e = load_error(&d);
    assert!(e.contains(W) && e.contains("-128"), "{e}");
    // int8 weights, but config.json does not say the model is quantized.
    let d = fresh("config");
    let cfg = d.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("quantization_config");
    std::fs::write(&cfg, v.to_string()).unwrap();
    let e = load_error(&d);
    assert!(
        e.contains("config.json") && e.contains("quantization_config"),
        "{e}"
    );
    // An int8 tensor where f32 belongs (an embedding table).
    let d = fresh("embedding");
    rewrite(&d, |f, i| {
        let name = "bert.embeddings.token_type_embeddings.weight";
        let n = f.remove(name).unwrap().len();
        i.insert(
            name.into(),
            I8Tensor {
                shape: vec![2, n / 2],
                data: vec![1; n],
            },
        );
    });
    let e = load_error(&d);
    assert!(
        e.contains("token_type_embeddings") && e.contains("f32 one"),
        "{e}"
    );
}

#[test]
fn a_quantized_model_embeds_in_int8_and_inspect_says_it_is_quantized() {
    let t = tempfile::tempdir().unwrap();
    let (model, q) = quantized(t.path(), "bert");
    let dev = candle_core::Device::Cpu;
    let embed = |dir: &Path, ctx_int8: bool| {
        let (m, enc) = ferrotune::infer::load_embedder(dir, None, &dev).unwrap();
        use ferrotune::data::InputEncoder;
        let items = enc.encode(&examples()).unwrap();
        if ctx_int8 {
            // The f32 model through int8: what the quantized one must give.
            let batch = enc
                .collate(&items.iter().collect::<Vec<_>>(), &dev)
                .unwrap();
            let h = m
                .hidden_states(&mut ferrotune::nn::Ctx::eval_int8(), &batch)
                .unwrap();
            return h.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        }
        let batch = enc
            .collate(&items.iter().collect::<Vec<_>>(), &dev)
            .unwrap();
        let h = m
            .hidden_states(&mut ferrotune::nn::Ctx::eval(), &batch)
            .unwrap();
        h.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    // Its head (3 labels) is not the embedder's (1): read as a new head, not an error.
    assert_eq!(embed(&q, false), embed(&model, true));
    let text = ferrotune::artifact::inspect(&q).unwrap();
    assert!(
        text.contains("quantized:    ferrotune-int8: 14 linear layers"),
        "{text}"
    );
    let f32_text = ferrotune::artifact::inspect(&model).unwrap();
    let params = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("parameters:"))
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string()
    };
    assert_eq!(params(&text), params(&f32_text));
    assert!(!f32_text.contains("quantized"));
}
