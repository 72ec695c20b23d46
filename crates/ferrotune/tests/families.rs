//! Every model family through the same checks, on tiny random checkpoints written in
//! transformers' formats: loading (with and without the backbone prefix; errors naming
//! the file and tensor), padding, dropout, the fused kernels against their composition,
//! the first-token shortcut, gradients (every trainable tensor gets one, frozen ones none,
//! through the gradient sink), and the errors for a `model_type` no family claims or
//! weights of another family.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ferrotune::data::batch::Features;
use ferrotune::data::reader::Example;
use ferrotune::data::{InputEncoder, TextEncoder};
use ferrotune::families::{self, HeadSpec, Loaded};
use ferrotune::kernels::{fused, grad_sink::GradSink};
use ferrotune::loss::{compute, LossConfig, Targets};
use ferrotune::nn::{Batch, Ctx, GroupKind, ParamStore, Pooling};
use ferrotune::testing::{write_tiny_model, TinySpec};
use ferrotune::train::step::{loss_and_grads, loss_and_grads_into};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Every registered text family's `model_type` (image families: tests/images.rs).
fn model_types() -> Vec<&'static str> {
    families::text_families()
        .iter()
        .map(|f| f.model_type())
        .collect()
}

/// A tiny random checkpoint of `family` in a temporary directory.
fn tiny(family: &'static str) -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join(family);
    write_tiny_model(&dir, &TinySpec::of(family)).unwrap();
    (t, dir)
}

fn load_head(dir: &Path, head: &HeadSpec) -> ferrotune::Result<Loaded> {
    Ok(families::load(dir, head, 1, &Device::Cpu)?.2)
}

/// The model in `dir` with a 3-label head and `pooling` (the family's default: `None`).
fn load(dir: &Path, pooling: Option<Pooling>) -> ferrotune::Result<Loaded> {
    load_head(
        dir,
        &HeadSpec {
            pooling,
            ..HeadSpec::new(3)
        },
    )
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

/// Two texts of different lengths through the family's own tokenizer, and the encoder.
fn items(dir: &Path) -> (TextEncoder, Vec<Features>) {
    let enc = TextEncoder::load(dir, 16).unwrap();
    let ex = [example("the movie was very good ."), example("bad film !")];
    let f = enc.encode(&ex).unwrap();
    assert!(f[0].ids.len() > f[1].ids.len());
    (enc, f)
}

/// The two texts as one padded batch.
fn batch(dir: &Path) -> Batch {
    let (enc, f) = items(dir);
    enc.collate(&[&f[0], &f[1]], &Device::Cpu).unwrap()
}

fn targets() -> Targets {
    Targets::Classes(Tensor::new(&[0u32, 2], &Device::Cpu).unwrap())
}

fn train_ctx<'a>(frozen: &'a [bool], rng: &'a mut ChaCha8Rng) -> Ctx<'a> {
    Ctx {
        train: true,
        frozen,
        rng: Some(rng),
        int8: false,
        bf16: false,
        row0: 0,
        tokens: (0, 0),
        freeze_bn: false,
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

type Step = (f32, Vec<Option<Vec<f32>>>, Vec<f32>);

/// Loss, every gradient (nothing frozen, dropout seeded by `seed`) and the inference
/// logits of one step of `l` on `b`.
fn training_step(l: &Loaded, b: &Batch, seed: u64) -> Step {
    let frozen = vec![false; l.params.num_groups()];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (loss, grads) = loss_and_grads(
        l.model.as_ref(),
        &l.params,
        b,
        &targets(),
        &LossConfig::default(),
        1.0,
        train_ctx(&frozen, &mut rng),
    )
    .unwrap();
    let logits = l.model.forward(&mut Ctx::eval(), b).unwrap();
    let logits = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (loss, grads, logits)
}

/// Two [`training_step`]s agree: loss and logits within `tol`, every gradient within
/// `grad_tol` relative to its largest element.
fn assert_steps_agree(
    params: &ParamStore,
    a: &Step,
    b: &Step,
    tol: f32,
    grad_tol: f32,
    what: &str,
) {
    let ((al, ag, ao), (bl, bg, bo)) = (a, b);
    assert!((al - bl).abs() < tol, "{what}: loss {al} vs {bl}");
    for (x, y) in ao.iter().zip(bo) {
        assert!((x - y).abs() < tol, "{what}: logits {ao:?} vs {bo:?}");
    }
    for ((p, a), b) in params.params.iter().zip(ag).zip(bg) {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        let d = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            d < grad_tol * scale,
            "{what} {}: {d} (largest {scale})",
            p.name
        );
    }
}

/// No dropout anywhere (masks depend on tensor shapes, which the shortcuts change).
fn no_dropout(pooling: Option<Pooling>) -> HeadSpec {
    HeadSpec {
        pooling,
        hidden_dropout: Some(0.0),
        attention_dropout: Some(0.0),
        classifier_dropout: Some(0.0),
        ..HeadSpec::new(3)
    }
}

#[test]
fn loads_with_and_without_the_backbone_prefix_identically() {
    for family in model_types() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        write_tiny_model(&a, &TinySpec::of(family)).unwrap();
        let prefixed = TinySpec {
            prefix: true,
            ..TinySpec::of(family)
        };
        write_tiny_model(&b, &prefixed).unwrap();
        let names =
            ferrotune::formats::safetensors::safetensors_shapes(&b.join("model.safetensors"))
                .unwrap();
        let prefix = ferrotune::testing::backbone_prefix(family);
        assert!(
            names.iter().all(|(n, _)| n.starts_with(&prefix)),
            "{family}: {names:?}"
        );
        let (la, lb) = (load(&a, None).unwrap(), load(&b, None).unwrap());
        let x = batch(&a);
        let ha = la.model.hidden_states(&mut Ctx::eval(), &x).unwrap();
        let hb = lb.model.hidden_states(&mut Ctx::eval(), &x).unwrap();
        assert_eq!(max_abs_diff(&ha, &hb), 0.0, "{family}");
        assert!(la.new_head, "{family}");
        // Every parameter is exported under the family's prefix or as part of the head.
        for p in &la.params.params {
            let head = la.params.groups[p.group].kind == GroupKind::Head;
            assert!(head || p.name.starts_with(&prefix), "{}", p.name);
        }
    }
}

#[test]
fn padding_does_not_change_the_output() {
    for family in model_types() {
        let (_t, dir) = tiny(family);
        let (enc, f) = items(&dir);
        for &pooling in families::by_model_type(family).unwrap().poolings() {
            let m = load(&dir, Some(pooling)).unwrap().model;
            let alone = enc.collate(&[&f[1]], &Device::Cpu).unwrap();
            let alone = m.forward(&mut Ctx::eval(), &alone).unwrap();
            let padded = m.forward(&mut Ctx::eval(), &batch(&dir)).unwrap();
            let d = max_abs_diff(&alone.get(0).unwrap(), &padded.get(1).unwrap());
            assert!(d < 1e-5, "{family} {pooling:?}: {d}");
        }
    }
}

/// With the fused layers, every weight matrix, linear bias, encoder layer norm and
/// embedding table gets its gradient from the gradient sink, not from candle's store
/// (the point of the sink: the values are the same either way, so only this test
/// notices if the sink stops being used).
#[test]
fn weight_gradients_go_through_the_sink() {
    for family in model_types() {
        let (_t, dir) = tiny(family);
        let l = load(&dir, None).unwrap();
        let x = batch(&dir);
        let frozen = vec![false; l.params.num_groups()];
        let tensors: Vec<_> = l
            .params
            .params
            .iter()
            .map(|p| Some(p.var.as_tensor()))
            .collect();
        let sink = GradSink::new(&tensors, vec![None; tensors.len()], false);
        let (_, sink) = fused::with_enabled(true, || {
            sink.run(|| {
                let mut rng = ChaCha8Rng::seed_from_u64(7);
                let logits = l
                    .model
                    .forward(&mut train_ctx(&frozen, &mut rng), &x)
                    .unwrap();
                let loss = compute(&LossConfig::default(), &logits, &targets()).unwrap();
                loss.backward().unwrap()
            })
        });
        let (_, wrote) = sink.into_parts();
        for (p, wrote) in l.params.params.iter().zip(wrote) {
            // Tables read as a slice (candle's narrow) rather than looked up: positions
            // counted from 0 (BERT, DistilBERT, GPT-2) and RoBERTa's single token type.
            let sliced = (p.name.contains("position_embeddings")
                && matches!(family, "bert" | "distilbert"))
                || (p.name.contains("token_type_embeddings") && family == "roberta")
                || (p.name.ends_with("wpe.weight") && family == "gpt2");
            let matrix = p.var.rank() == 2 && !sliced;
            let norm = p.name.contains("LayerNorm")
                || p.name.contains("layer_norm")
                || p.name.contains(".ln_");
            let linear_bias = p.name.ends_with(".bias") && !norm;
            // The encoder layers' norms (fused with their residual sum), not the embeddings'.
            let layer_norm = norm && p.name.contains("layer.");
            if matrix || linear_bias || layer_norm {
                assert!(wrote, "{family}: {} did not go through the sink", p.name);
            }
        }
    }
}

/// Gradient buffers kept from an earlier step are overwritten (the fused layers write
/// weight gradients into them directly), and added to when accumulating; with the fused
/// layers on and off alike.
#[test]
fn gradient_buffers_are_overwritten_then_accumulated() {
    for family in model_types() {
        let (_t, dir) = tiny(family);
        let l = load(&dir, None).unwrap();
        let x = batch(&dir);
        let frozen = vec![false; l.params.num_groups()];
        for on in [true, false] {
            fused::with_enabled(on, || {
                let step = |out: &mut [Option<Vec<f32>>], add: bool| {
                    let mut rng = ChaCha8Rng::seed_from_u64(7);
                    let ctx = train_ctx(&frozen, &mut rng);
                    let cfg = LossConfig::default();
                    let m = l.model.as_ref();
                    loss_and_grads_into(m, &l.params, &x, &targets(), &cfg, 1.0, ctx, out, add)
                        .unwrap();
                };
                let mut want = vec![None; l.params.params.len()];
                step(&mut want, false);
                // Stale buffers of the right size, and one missing.
                let mut out: Vec<_> = want
                    .iter()
                    .map(|g| g.as_ref().map(|g| vec![1e3f32; g.len()]))
                    .collect();
                out[0] = None;
                step(&mut out, false);
                step(&mut out, false);
                let close = |a: &[Option<Vec<f32>>], k: f32| {
                    for ((p, a), b) in l.params.params.iter().zip(a).zip(&want) {
                        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
                        let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                        let d = a
                            .iter()
                            .zip(b)
                            .fold(0f32, |m, (x, y)| m.max((x - k * y).abs()));
                        assert!(d < 1e-5 * scale, "{family} fused {on}, {}: {d}", p.name);
                    }
                };
                close(&out, 1.0);
                step(&mut out, true);
                close(&out, 2.0);
            })
        }
    }
}

/// The fused model (fused QKV projection, attention with MPNet's position bias, linear
/// layers with the intermediate GELU inside, embeddings, layer norm; the gradient sink)
/// computes the same loss and gradients as the composition of candle operations, in
/// training (same dropout masks: same seed) with padding, and the same logits at
/// inference.
#[test]
fn fused_and_composed_models_agree() {
    for family in model_types() {
        let (_t, dir) = tiny(family);
        let l = load(&dir, None).unwrap();
        let x = batch(&dir);
        let run = |on: bool| fused::with_enabled(on, || training_step(&l, &x, 7));
        let (f, c) = (run(true), run(false));
        let what = format!("{family}: fused vs composed");
        assert_steps_agree(&l.params, &f, &c, 1e-5, 1e-4, &what);
    }
}

/// The last layer run for the first row only gives the full layer's logits, loss and
/// every gradient (dropout off: its masks depend on the tensor's shape), with padding,
/// for every pooling that reads the first token.
#[test]
fn first_token_last_layer_matches_the_full_layer() {
    for family in model_types() {
        let (_t, dir) = tiny(family);
        let x = batch(&dir);
        let poolings = families::by_model_type(family).unwrap().poolings();
        for &pooling in poolings.iter().filter(|p| p.reads_first_token_only()) {
            let run = |first_only: bool| {
                let mut l = load_head(&dir, &no_dropout(Some(pooling))).unwrap();
                l.model.set_first_token_only(first_only);
                (training_step(&l, &x, 3), l.params)
            };
            let ((first, params), (full, _)) = (run(true), run(false));
            let what = format!("{family} {pooling:?}, first token vs full layer");
            assert_steps_agree(&params, &first, &full, 1e-5, 1e-5, &what);
        }
    }
}

#[test]
fn every_trainable_tensor_gets_a_gradient_and_frozen_ones_none() {
    for family in model_types() {
        let (_t, dir) = tiny(family);
        let x = batch(&dir);
        for &pooling in families::by_model_type(family).unwrap().poolings() {
            let l = load(&dir, Some(pooling)).unwrap();
            let lc = LossConfig::default();
            let mut rng = ChaCha8Rng::seed_from_u64(0);
            let grads = |frozen: &[bool], rng: &mut ChaCha8Rng| {
                let m = l.model.as_ref();
                let ctx = train_ctx(frozen, rng);
                loss_and_grads(m, &l.params, &x, &targets(), &lc, 1.0, ctx)
                    .unwrap()
                    .1
            };
            // Nothing frozen: every tensor gets a non-zero gradient.
            let frozen = vec![false; l.params.num_groups()];
            for (p, g) in l.params.params.iter().zip(grads(&frozen, &mut rng)) {
                let g = g.unwrap_or_else(|| panic!("{family}: {} got no gradient", p.name));
                assert!(
                    g.iter().any(|&x| x != 0.0),
                    "{family} {pooling:?}: {} has a zero gradient",
                    p.name
                );
            }
            // Embeddings and the first layer frozen: they get none, the rest do.
            let mut frozen = vec![false; l.params.num_groups()];
            frozen[0] = true;
            frozen[1] = true;
            for (p, g) in l.params.params.iter().zip(grads(&frozen, &mut rng)) {
                if p.group <= 1 {
                    assert!(g.is_none(), "{family}: {} is frozen but got one", p.name);
                } else {
                    let g = g.unwrap();
                    assert!(g.iter().any(|&x| x != 0.0), "{family}: {}", p.name);
                }
            }
        }
    }
}

#[test]
fn dropout_is_seeded_and_only_in_training() {
    for family in model_types() {
        let (_t, dir) = tiny(family);
        let m = load(&dir, None).unwrap().model;
        let x = batch(&dir);
        let run = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut ctx = Ctx {
                train: true,
                frozen: &[],
                rng: Some(&mut rng),
                int8: false,
                bf16: false,
                row0: 0,
                tokens: (0, 0),
                freeze_bn: false,
            };
            m.forward(&mut ctx, &x).unwrap().to_vec2::<f32>().unwrap()
        };
        assert_eq!(run(1), run(1), "{family}");
        assert_ne!(run(1), run(2), "{family}");
        let e = m.forward(&mut Ctx::eval(), &x).unwrap();
        assert_ne!(run(1), e.to_vec2::<f32>().unwrap(), "{family}");
    }
}

#[test]
fn missing_and_misshaped_tensors_are_named() {
    for family in model_types() {
        let (_t, dir) = tiny(family);
        let st = dir.join("model.safetensors");
        let mut tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
        // A key projection of the second layer, whatever the family calls it.
        let name = tensors
            .keys()
            .find(|n| {
                ["layer.1.", "layers.1.", "h.1."]
                    .iter()
                    .any(|l| n.contains(l))
                    && [
                        ".key.weight",
                        ".k_lin.weight",
                        ".k.weight",
                        ".k_proj.weight",
                        ".c_attn.weight",
                    ]
                    .iter()
                    .any(|s| n.ends_with(s))
            })
            .unwrap()
            .clone();
        let w = tensors.remove(&name).unwrap();
        candle_core::safetensors::save(&tensors, &st).unwrap();
        let e = load(&dir, None).err().unwrap().to_string();
        assert!(e.contains("model.safetensors") && e.contains(&name), "{e}");
        assert!(e.contains("missing"), "{e}");
        let rows = w.dim(0).unwrap();
        tensors.insert(name.clone(), w.narrow(0, 0, rows / 2).unwrap());
        candle_core::safetensors::save(&tensors, &st).unwrap();
        let e = load(&dir, None).err().unwrap().to_string();
        assert!(e.contains(&name) && e.contains("has shape"), "{e}");
        assert_eq!(e.lines().count(), 1);
    }
}

#[test]
fn truncated_safetensors_is_an_error_naming_the_file() {
    for family in model_types() {
        let (_t, dir) = tiny(family);
        let st = dir.join("model.safetensors");
        let bytes = std::fs::read(&st).unwrap();
        std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
        let e = load(&dir, None).err().unwrap().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("truncated"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1);
    }
}

/// A `model_type` no family claims is an error naming the file and field and listing the
/// families there are.
#[test]
fn an_unknown_model_type_lists_the_families() {
    let (_t, dir) = tiny("bert");
    let p = dir.join("config.json");
    let s = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"bert\"", "\"gpt_neox\"");
    std::fs::write(&p, s).unwrap();
    let e = load(&dir, None).err().unwrap();
    let msg = e.to_string();
    assert!(
        msg.contains("config.json") && msg.contains("model_type"),
        "{msg}"
    );
    assert!(msg.contains("`gpt_neox`"), "{msg}");
    for t in model_types() {
        assert!(msg.contains(t), "{msg} does not list {t}");
    }
    assert!(matches!(e, ferrotune::Error::Input { .. }));
    assert_eq!(msg.lines().count(), 1);
}

/// A `config.json` of one family beside another family's weights: the error names the
/// family the tensor names belong to.
#[test]
fn weights_of_another_family_are_named() {
    let types = model_types();
    for weights in &types {
        for config in &types {
            if weights == config {
                continue;
            }
            let (_t, wdir) = tiny(weights);
            let prefixed = TinySpec {
                prefix: true,
                ..TinySpec::of(weights)
            };
            write_tiny_model(&wdir, &prefixed).unwrap();
            let (_t2, cdir) = tiny(config);
            std::fs::copy(
                wdir.join("model.safetensors"),
                cdir.join("model.safetensors"),
            )
            .unwrap();
            let e = load(&cdir, None).err().unwrap();
            let msg = e.to_string();
            let fam = families::by_model_type(weights).unwrap();
            assert!(
                msg.contains("model.safetensors")
                    && msg.contains(fam.name())
                    && msg.contains(&format!("`{weights}`"))
                    && msg.contains(&format!("`{config}`")),
                "{config} config, {weights} weights: {msg}"
            );
            assert!(matches!(e, ferrotune::Error::Input { .. }));
        }
    }
}

/// A pooling the family's head does not read (BERT's pooler, for the others) is a
/// configuration error naming the ones it does.
#[test]
fn a_pooling_the_head_does_not_read_is_refused() {
    for family in families::text_families() {
        if family.poolings().contains(&Pooling::Pooler) {
            continue;
        }
        let (_t, dir) = tiny(family.model_type());
        let e = load(&dir, Some(Pooling::Pooler)).err().unwrap();
        let msg = e.to_string();
        let allowed: Vec<&str> = family.poolings().iter().map(|p| p.as_str()).collect();
        assert!(
            msg.contains("pooler") && msg.contains(&allowed.join(", ")),
            "{msg}"
        );
        assert!(msg.contains(family.name()), "{msg}");
        assert!(matches!(e, ferrotune::Error::Config(_)));
    }
}

/// The layer groups follow the module tree: the embeddings, one group per layer, then
/// the pooler (BERT's; the decoders' final norm), then the head.
#[test]
fn layer_groups_follow_the_module_tree() {
    for family in model_types() {
        let (_t, dir) = tiny(family);
        let l = load(&dir, None).unwrap();
        let kinds: Vec<GroupKind> = l.params.groups.iter().map(|g| g.kind).collect();
        let mut want = vec![
            GroupKind::Embeddings,
            GroupKind::Layer(0),
            GroupKind::Layer(1),
        ];
        if matches!(family, "bert" | "llama" | "gpt2") {
            want.push(GroupKind::Pooler);
        }
        want.push(GroupKind::Head);
        assert_eq!(kinds, want, "{family}");
        for p in &l.params.params {
            let head = ["classifier", "pre_classifier", "score"]
                .iter()
                .any(|h| p.name.starts_with(h));
            assert_eq!(
                l.params.groups[p.group].kind == GroupKind::Head,
                head,
                "{family}: {}",
                p.name
            );
        }
    }
}

/// Int8 and bf16 inference track f32 for every family: logits within a few percent of
/// their spread, and the same on a second call (weights converted once). bf16 runs its
/// emulated kernel where the CPU has no avx512_bf16 (the same arithmetic, slower).
#[test]
fn int8_and_bf16_inference_track_f32() {
    for (name, low) in [
        ("int8", Ctx::eval_int8 as fn() -> Ctx<'static>),
        ("bf16", Ctx::eval_bf16),
    ] {
        low_precision_tracks_f32(name, low);
    }
}

fn low_precision_tracks_f32(name: &str, low: fn() -> Ctx<'static>) {
    for family in model_types() {
        let (_t, dir) = tiny(family);
        let l = load(&dir, None).unwrap();
        let x = batch(&dir);
        let f32_logits = l.model.forward(&mut Ctx::eval(), &x).unwrap();
        let i8_logits = l.model.forward(&mut low(), &x).unwrap();
        let again = l.model.forward(&mut low(), &x).unwrap();
        assert_eq!(
            max_abs_diff(&i8_logits, &again),
            0.0,
            "{family}: {name} not repeatable"
        );
        let spread = f32_logits
            .abs()
            .unwrap()
            .max_keepdim(1)
            .unwrap()
            .max_keepdim(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()[0][0];
        let d = max_abs_diff(&f32_logits, &i8_logits);
        assert!(d > 0.0, "{family}: {name} did not run");
        assert!(
            d <= 0.05 * spread.max(1e-3),
            "{family}: {name} logits off by {d} (spread {spread})"
        );
        // Training ignores int8; bf16 is mixed-precision training, close to f32.
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut ctx = train_ctx(&[], &mut rng);
        let flags = low();
        (ctx.int8, ctx.bf16) = (flags.int8, flags.bf16);
        let mut rng2 = ChaCha8Rng::seed_from_u64(1);
        let a = l.model.forward(&mut ctx, &x).unwrap();
        let b = l.model.forward(&mut train_ctx(&[], &mut rng2), &x).unwrap();
        let d = max_abs_diff(&a, &b);
        if name == "int8" {
            assert_eq!(d, 0.0, "{family}: int8 changed training");
        } else {
            assert!(
                d > 0.0 && d <= 0.05 * spread.max(1e-3),
                "{family}: bf16 training {d}"
            );
        }
    }
}
