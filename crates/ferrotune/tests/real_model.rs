//! Tests on the real all-MiniLM-L6-v2 checkpoint and the BBC News data. They run when the
//! assets are present (`python3 scripts/fetch-assets`; `.ci/run` always fetches them) and
//! print why they were skipped otherwise.

use std::path::{Path, PathBuf};

use candle_core::{Device, D};
use ferrotune::data::batch::{make_batch, tokenize};
use ferrotune::data::reader::Example;
use ferrotune::data::tokenizer::load_tokenizer;
use ferrotune::families::{self, HeadSpec};
use ferrotune::nn::{Ctx, Pooling};

fn assets() -> Option<PathBuf> {
    let dir = std::env::var_os("FERROTUNE_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets"));
    if dir.join("all-MiniLM-L6-v2/model.safetensors").exists() {
        Some(dir)
    } else {
        eprintln!(
            "skipped: assets not found in {} (run scripts/fetch-assets)",
            dir.display()
        );
        None
    }
}

fn example(text: &str) -> Example {
    Example {
        id: "x".into(),
        line: 1,
        text: text.into(),
        text_pair: None,
        label: None,
    }
}

#[test]
fn minilm_matches_the_reference_values() {
    let Some(assets) = assets() else { return };
    let dir = assets.join("all-MiniLM-L6-v2");
    let tok = load_tokenizer(&dir, 256).unwrap();
    let head = HeadSpec {
        pooling: Some(Pooling::Mean),
        ..HeadSpec::new(2)
    };
    let (_, _, l) = families::load(&dir, &head, 0, &Device::Cpu).unwrap();
    let texts = ["A man is eating food.", "A man is eating a piece of bread."];
    let ex: Vec<Example> = texts.iter().map(|t| example(t)).collect();
    let feats = tokenize(&tok, &ex).unwrap();
    // ASSETS.md: the ids of the first sentence.
    assert_eq!(
        feats[0].ids,
        vec![101, 1037, 2158, 2003, 5983, 2833, 1012, 102]
    );

    let batch = make_batch(&[&feats[0], &feats[1]], 0, &Device::Cpu).unwrap();
    let hidden = l.model.hidden_states(&mut Ctx::eval(), &batch).unwrap();
    let first: Vec<f32> = hidden
        .get(0)
        .unwrap()
        .get(0)
        .unwrap()
        .narrow(0, 0, 5)
        .unwrap()
        .to_vec1()
        .unwrap();
    let want = [
        -0.00255041f32,
        0.11769731,
        0.00373789,
        0.24470814,
        -0.5172313,
    ];
    for (a, b) in first.iter().zip(want) {
        assert!(
            (a - b).abs() < 1e-4,
            "last_hidden_state[0,0,:5] = {first:?}, want {want:?}"
        );
    }
    let mask = &batch.tokens().unwrap().attention_mask;
    let pooled = Pooling::Mean.pool(&hidden, mask).unwrap();
    let norm = pooled
        .sqr()
        .unwrap()
        .sum_keepdim(D::Minus1)
        .unwrap()
        .sqrt()
        .unwrap();
    let emb = pooled
        .broadcast_div(&norm)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let want = [
        0.03324157f32,
        0.00440606,
        -0.00627694,
        0.04837871,
        -0.13870225,
    ];
    for (a, b) in emb[0].iter().zip(want) {
        assert!(
            (a - b).abs() < 1e-5,
            "embedding[:5] = {:?}, want {want:?}",
            &emb[0][..5]
        );
    }
    let cos: f32 = emb[0].iter().zip(&emb[1]).map(|(a, b)| a * b).sum();
    assert!((cos - 0.755).abs() < 0.001, "cosine {cos}");
}

#[test]
fn bbc_news_reads_as_five_topics() {
    let Some(assets) = assets() else { return };
    let ex = ferrotune::data::reader::read_examples(
        &assets.join("bbc-news"),
        &ferrotune::data::reader::ReaderOptions {
            text_column: "text".into(),
            text_pair_column: None,
            label_column: Some("label".into()),
            encoding_errors: ferrotune::data::reader::EncodingErrors::Replace,
            file_extensions: vec!["txt".into()],
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(ex.len(), 2225);
    let labels = ferrotune::data::labels::LabelMap::from_examples(&ex, &assets).unwrap();
    assert_eq!(
        labels.labels(),
        ["business", "entertainment", "politics", "sports", "tech"]
    );
}

/// A short real fine-tune: 400 BBC articles, 64 tokens, one epoch. The full recipe
/// (`recipes/bbc-news.toml`) is the README's main command; this checks the real path in CI.
#[test]
fn short_real_fine_tune_learns_the_topics() {
    let Some(assets) = assets() else { return };
    let t = tempfile::tempdir().unwrap();
    let text = format!(
        "model_name_or_path = {:?}\ntrain_file = {:?}\nvalidation_split = 0.2\n\
         output_dir = {:?}\nmax_seq_length = 64\nper_device_train_batch_size = 16\n\
         learning_rate = 2e-4\nnum_train_epochs = 1\nwarmup_ratio = 0.1\nweight_decay = 0.01\n\
         max_train_samples = 400\nmax_eval_samples = 200\nencoding_errors = \"replace\"\npooling = \"mean\"\nseed = 42\n",
        assets.join("all-MiniLM-L6-v2"),
        assets.join("bbc-news"),
        t.path().join("run")
    );
    let cfg = ferrotune::TrainConfig::from_toml_str(&text, Path::new("t.toml"), &[]).unwrap();
    let s = ferrotune::train::train(&cfg, &mut ferrotune::train::Silent).unwrap();
    let acc = s.epochs[0].get("accuracy");
    eprintln!("short fine-tune: {:?}", s.epochs[0]);
    assert!(acc >= 0.85, "accuracy {acc} after a short fine-tune");

    // Its int8 copy: within 0.5 points of f32 on all the held-out examples (the run
    // evaluated 200 of them), and non-embedding weights at most 0.3x their f32 size.
    let model = t.path().join("run/model");
    let q = t.path().join("q");
    let sizes = ferrotune::quantize::quantize_model(&model, &q).unwrap();
    let ratio = sizes.non_embedding_bytes as f64 / sizes.non_embedding_f32_bytes as f64;
    assert!(
        ratio <= 0.3,
        "quantized non-embedding size {ratio:.3}x of f32"
    );
    let split: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path().join("run/split.json")).unwrap())
            .unwrap();
    let held: std::collections::HashSet<&str> = split["eval"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let f32_model = ferrotune::predict::Predictor::load(&model).unwrap();
    let opts = ferrotune::data::reader::ReaderOptions {
        encoding_errors: ferrotune::data::reader::EncodingErrors::Replace,
        ..f32_model.reader_options(true)
    };
    let all = ferrotune::data::reader::read_examples(&assets.join("bbc-news"), &opts).unwrap();
    let eval: Vec<Example> = all
        .into_iter()
        .filter(|e| held.contains(e.id.as_str()))
        .collect();
    assert!(eval.len() >= 400, "{} held out", eval.len());
    let path = assets.join("bbc-news");
    let a = f32_model.evaluate(&eval, &path, "label").unwrap().metrics["accuracy"];
    let quantized = ferrotune::predict::Predictor::load(&q).unwrap();
    assert_eq!(quantized.precision, ferrotune::precision::Precision::Int8);
    let b = quantized.evaluate(&eval, &path, "label").unwrap().metrics["accuracy"];
    eprintln!("held-out accuracy: f32 {a:.4}, int8 {b:.4}; non-embedding size {ratio:.3}x");
    assert!((a - b).abs() <= 0.005 + 1e-9, "f32 {a} vs int8 {b}");
}

/// all-mpnet-base-v2 (MPNet: relative position bias, positions from the padding index):
/// its token ids, last hidden state and mean-pooled, L2-normalised sentence embeddings
/// equal transformers' (values computed with transformers 5.24, PyTorch 2.15, f32;
/// `scripts/check-embedding-parity` compares 66 texts up to 384 tokens: 1.5e-6 raw,
/// 6.6e-7 normalised).
#[test]
fn mpnet_matches_transformers_embeddings() {
    let Some(assets) = assets() else { return };
    let dir = assets.join("all-mpnet-base-v2");
    if !dir.join("model.safetensors").exists() {
        eprintln!(
            "skipped: {} not found (run scripts/fetch-assets)",
            dir.display()
        );
        return;
    }
    let device = Device::Cpu;
    let (model, enc) = ferrotune::infer::load_embedder(&dir, None, &device).unwrap();
    use ferrotune::data::InputEncoder;
    let texts = ["A man is eating food.", "A man is eating a piece of bread."];
    let ex: Vec<Example> = texts.iter().map(|t| example(t)).collect();
    let items = enc.encode(&ex).unwrap();
    assert_eq!(items[0].ids, vec![0, 1041, 2162, 2007, 5987, 2837, 1016, 2]);
    let batch = enc.collate(&[&items[0], &items[1]], &device).unwrap();
    let hidden = model.hidden_states(&mut Ctx::eval(), &batch).unwrap();
    let first: Vec<f32> = hidden.get(0).unwrap().get(0).unwrap().to_vec1().unwrap();
    let want = [
        0.10134734f32,
        -0.09379318,
        -0.01386451,
        0.11295321,
        -0.03940766,
    ];
    for (a, b) in first.iter().zip(want) {
        assert!(
            (a - b).abs() < 1e-5,
            "last_hidden_state[0,0,:5] = {:?}",
            &first[..5]
        );
    }
    let model = model.as_ref();
    let emb =
        ferrotune::infer::embed(model, &enc, &items, Pooling::Mean, true, 8, &device).unwrap();
    let want = [
        0.03550082f32,
        -0.00843165,
        0.02202412,
        0.01626268,
        -0.00540161,
    ];
    for (a, b) in emb[0].iter().zip(want) {
        assert!((a - b).abs() < 1e-5, "embedding[:5] = {:?}", &emb[0][..5]);
    }
    let cos: f32 = emb[0].iter().zip(&emb[1]).map(|(a, b)| a * b).sum();
    assert!((cos - 0.6601131).abs() < 1e-5, "cosine {cos}");
}
