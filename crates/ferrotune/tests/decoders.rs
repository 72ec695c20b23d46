//! Decoder families (Llama; GPT-2): causal attention, grouped-query heads, the KV cache of
//! generation, the last-token classifier, and config errors. The generic family tests
//! (tests/families.rs) cover them too, as every text family; transformers parity is
//! `scripts/check-decoder-parity`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ferrotune::families::{self, HeadSpec, Loaded};
use ferrotune::generate::{generate, Sampling};
use ferrotune::nn::{Batch, Ctx, TokenBatch};
use ferrotune::testing::write_tiny_decoder;

/// The decoder families and the config edits each is tested with: grouped-query heads
/// with an untied head, and plain heads with a tied one.
type Variant = (&'static str, &'static str, fn(&mut serde_json::Value));

fn variants() -> Vec<Variant> {
    vec![
        ("llama", "gqa-untied", |c| {
            c["num_attention_heads"] = 4.into();
            c["num_key_value_heads"] = 2.into();
            c["hidden_size"] = 16.into();
            c["tie_word_embeddings"] = false.into();
        }),
        ("llama", "mha-tied", |_| {}),
        ("gpt2", "tied", |_| {}),
    ]
}

fn write(t: &Path, family: &'static str, name: &str, edit: fn(&mut serde_json::Value)) -> PathBuf {
    let dir = t.join(format!("{family}-{name}"));
    write_tiny_decoder(&dir, family, 5, edit).unwrap();
    dir
}

fn load(dir: &Path, labels: usize) -> Loaded {
    families::load(dir, &HeadSpec::new(labels), 3, &Device::Cpu)
        .unwrap()
        .2
}

fn tokens(rows: &[Vec<u32>], mask: &[Vec<f32>]) -> Batch {
    let (b, s) = (rows.len(), rows[0].len());
    let dev = Device::Cpu;
    Batch::Tokens(TokenBatch {
        input_ids: Tensor::from_vec(rows.concat(), (b, s), &dev).unwrap(),
        token_type_ids: Tensor::zeros((b, s), DType::U32, &dev).unwrap(),
        attention_mask: Tensor::from_vec(mask.concat(), (b, s), &dev).unwrap(),
    })
}

fn ids(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| 5 + (i * 7 + seed * 3) % 40).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn lm_rows(l: &Loaded, rows: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let mask: Vec<Vec<f32>> = rows.iter().map(|r| vec![1.0; r.len()]).collect();
    l.model
        .lm_logits(&mut Ctx::eval(), &tokens(rows, &mask))
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// A token's logits depend on it and the tokens before it only.
#[test]
fn next_token_logits_are_causal() {
    let t = tempfile::tempdir().unwrap();
    for (family, name, edit) in variants() {
        let l = load(&write(t.path(), family, name, edit), 0);
        let a = ids(9, 1);
        let mut b = a.clone();
        b[6] = 3;
        b[8] = 4;
        let (la, lb) = (lm_rows(&l, &[a]), lm_rows(&l, &[b]));
        for i in 0..6 {
            assert!(max_diff(&la[i], &lb[i]) < 1e-6, "{family}-{name}: row {i}");
        }
        assert!(
            max_diff(&la[6], &lb[6]) > 1e-4,
            "{family}-{name}: row 6 sees token 6"
        );
    }
}

/// Generating with the KV cache, a token at a time after the prompt, gives the logits of
/// the full forward pass at every position.
#[test]
fn the_kv_cache_gives_the_full_pass_logits() {
    let t = tempfile::tempdir().unwrap();
    for (family, name, edit) in variants() {
        let l = load(&write(t.path(), family, name, edit), 0);
        let seq = ids(11, 2);
        let full = lm_rows(&l, std::slice::from_ref(&seq));
        let g = l.model.generator().expect("a decoder generates");
        let mut cache = g.new_cache();
        let first = g.step(&seq[..5], &mut cache).unwrap();
        assert!(max_diff(&first, &full[4]) < 1e-5, "{family}-{name}: prompt");
        for (i, &tok) in seq.iter().enumerate().skip(5) {
            let step = g.step(&[tok], &mut cache).unwrap();
            assert!(
                max_diff(&step, &full[i]) < 1e-5,
                "{family}-{name}: position {i}"
            );
        }
        assert_eq!(cache.len, seq.len());
    }
}

/// The classifier reads each sequence's last token: a right-padded row scores as it does
/// alone, and batches of sequences of different lengths agree with single ones.
#[test]
fn the_classifier_reads_the_last_real_token() {
    let t = tempfile::tempdir().unwrap();
    for (family, name, edit) in variants() {
        let l = load(&write(t.path(), family, name, edit), 3);
        let (a, b) = (ids(9, 3), ids(6, 4));
        let mut padded = b.clone();
        padded.extend([2, 2, 2]);
        let mask = vec![vec![1.0; 9], [vec![1.0; 6], vec![0.0; 3]].concat()];
        let both: Vec<Vec<f32>> = l
            .model
            .forward(&mut Ctx::eval(), &tokens(&[a.clone(), padded], &mask))
            .unwrap()
            .to_vec2()
            .unwrap();
        for (row, alone) in [(0, a), (1, b)] {
            let m = vec![vec![1.0; alone.len()]];
            let one: Vec<Vec<f32>> = l
                .model
                .forward(&mut Ctx::eval(), &tokens(&[alone], &m))
                .unwrap()
                .to_vec2()
                .unwrap();
            assert!(
                max_diff(&both[row], &one[0]) < 1e-5,
                "{family}-{name}: row {row}"
            );
        }
    }
}

/// Greedy generation is deterministic, stops at `max_new_tokens`, and its text is the
/// decoding of its tokens.
#[test]
fn greedy_generation_through_the_tokenizer() {
    let t = tempfile::tempdir().unwrap();
    let dir = write(t.path(), "llama", "gen", |_| {});
    let g = ferrotune::generate::TextGenerator::load(&dir).unwrap();
    let s = Sampling {
        max_new_tokens: 7,
        ..Sampling::default()
    };
    let mut streamed = String::new();
    let a = g
        .run("the movie was", &s, |p| streamed.push_str(p))
        .unwrap();
    let b = g.run("the movie was", &s, |_| {}).unwrap();
    assert_eq!(a, b);
    assert_eq!(streamed, a.text);
    assert!(a.ids.len() == 7 || a.finish == ferrotune::generate::Finish::EosToken);
    let text = g.tokenizer.decode(&a.ids, true).unwrap();
    assert_eq!(text, a.text);
    // The same through the library function, from the prompt's ids.
    let ids = g.encode("the movie was").unwrap();
    let c = generate(
        g.model.generator().unwrap(),
        &g.tokenizer,
        &ids,
        &g.eos,
        &s,
        |_| {},
    )
    .unwrap();
    assert_eq!(c, a);
    // An encoder does not generate.
    let enc = t.path().join("bert");
    ferrotune::testing::write_tiny_model(&enc, &ferrotune::testing::TinySpec::of("bert")).unwrap();
    let err = ferrotune::generate::TextGenerator::load(&enc)
        .err()
        .unwrap();
    assert!(err.to_string().contains("not a decoder"), "{err}");
}

/// An unknown rotary scaling is a one-line error naming config.json and the field.
#[test]
fn an_unknown_rope_scaling_is_named() {
    let t = tempfile::tempdir().unwrap();
    let dir = write(t.path(), "llama", "rope", |_| {});
    let cp = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cp).unwrap()).unwrap();
    cfg["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    std::fs::write(&cp, cfg.to_string()).unwrap();
    let err = families::load(&dir, &HeadSpec::new(0), 0, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
    assert!(err.contains("rope_scaling"), "{err}");
    assert!(err.contains("yarn"), "{err}");
    assert!(!err.contains('\n'), "{err}");
}

/// Config fields a decoder cannot run with are one-line errors naming config.json and the
/// field: key/value heads that do not divide the query heads, an activation other than
/// Llama's, and GPT-2's attention scalings that are not supported.
#[test]
fn unsupported_decoder_configs_name_the_field() {
    let t = tempfile::tempdir().unwrap();
    let cases: [(&'static str, &str, serde_json::Value); 4] = [
        ("llama", "num_key_value_heads", 3.into()),
        ("llama", "hidden_act", "gelu".into()),
        ("gpt2", "scale_attn_by_inverse_layer_idx", true.into()),
        ("gpt2", "scale_attn_weights", false.into()),
    ];
    for (family, field, value) in cases {
        let dir = write(t.path(), family, field, |_| {});
        let cp = dir.join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cp).unwrap()).unwrap();
        cfg[field] = value;
        std::fs::write(&cp, cfg.to_string()).unwrap();
        let err = families::load(&dir, &HeadSpec::new(0), 0, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("config.json") && err.contains(field),
            "{family}: {err}"
        );
        assert!(!err.contains('\n'), "{err}");
    }
}

/// A causal-LM training step with the head fused with the loss
/// (`ferrotune::loss::lm_head_loss`; fused RMS norm and SwiGLU in Llama) gives the loss and
/// every parameter's gradient of the composed model (candle's matmul head, log-softmax
/// loss), with padding and ignored labels, for tied and untied heads.
#[test]
fn the_fused_language_model_step_matches_the_composed_one() {
    use ferrotune::kernels::fused;
    use ferrotune::loss::{LossConfig, Targets};
    use ferrotune::train::step::loss_and_grads;
    use rand::SeedableRng;
    let t = tempfile::tempdir().unwrap();
    for (family, name, edit) in variants() {
        let dir = write(t.path(), family, name, edit);
        let l = load(&dir, 0);
        let rows = vec![ids(9, 1), ids(9, 2)];
        let mask = vec![vec![1.0; 9], [vec![1.0; 6], vec![0.0; 3]].concat()];
        let i = -100i64;
        let labels: Vec<i64> = [
            vec![i, i, i, 7, 8, 9, 10, 11, 12],
            vec![5, 6, 7, 8, 9, 10, i, i, i],
        ]
        .concat();
        let labels = Tensor::from_vec(labels, (2, 9), &Device::Cpu).unwrap();
        let batch = tokens(&rows, &mask);
        let frozen = vec![false; l.params.num_groups()];
        let step = |on: bool| {
            fused::with_enabled(on, || {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
                let ctx = Ctx {
                    train: true,
                    frozen: &frozen,
                    rng: Some(&mut rng),
                    ..Ctx::eval()
                };
                let targets = Targets::Tokens(labels.clone());
                let m = l.model.as_ref();
                loss_and_grads(
                    m,
                    &l.params,
                    &batch,
                    &targets,
                    &LossConfig::default(),
                    1.0,
                    ctx,
                )
                .unwrap()
            })
        };
        let ((lf, gf), (lc, gc)) = (step(true), step(false));
        assert!((lf - lc).abs() < 1e-5, "{family}-{name}: loss {lf} vs {lc}");
        for ((p, a), b) in l.params.params.iter().zip(&gf).zip(&gc) {
            let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
            let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
            let d = max_diff(a, b);
            assert!(
                d < 1e-4 * scale,
                "{family}-{name} {}: {d} (scale {scale})",
                p.name
            );
        }
    }
}
