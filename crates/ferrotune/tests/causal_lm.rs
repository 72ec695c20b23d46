//! Causal-LM fine-tuning: the data side without a model (packing, completion-only and
//! assistant-only labels, chat templates, bad rows), the fused loss against its composed
//! reference, the recipe's refusals, and (with a Llama family registered) a tiny random
//! model trained end to end.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use ferrotune::config::TrainConfig;
use ferrotune::data::lm::{
    read_lm_data, ChatTemplate, LmContent, LmFormat, LmReadOptions, LmTokenizer, Message,
    IGNORE_INDEX,
};
use ferrotune::tasks::causal_lm::{lm_loss, lm_loss_composed};
use ferrotune::tasks::TargetData;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

/// The tiny vocabulary: special tokens first.
const VOCAB: &[&str] = &[
    "<unk>",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "user",
    "assistant",
    "system",
    "hello",
    "hi",
    "there",
    "how",
    "are",
    "you",
    "fine",
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    ".",
    "?",
];

fn id(w: &str) -> u32 {
    VOCAB.iter().position(|v| *v == w).unwrap() as u32
}

fn ids(words: &str) -> Vec<u32> {
    words.split_whitespace().map(id).collect()
}

/// A word-level tokenizer over [`VOCAB`]; with `bos`, it adds `<s>` in front of every
/// text encoded with special tokens (as Llama's does).
fn tiny_tokenizer(bos: bool) -> Tokenizer {
    let vocab: HashMap<String, u32> = VOCAB
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), i as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("<unk>".into())
        .build()
        .unwrap();
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    tok.add_special_tokens(
        &["<s>", "</s>", "<|im_start|>", "<|im_end|>"].map(|t| AddedToken::from(t, true)),
    );
    if bos {
        let tp = TemplateProcessing::builder()
            .try_single("<s> $A")
            .unwrap()
            .special_tokens(vec![("<s>", id("<s>"))])
            .build()
            .unwrap();
        tok.with_post_processor(Some(tp));
    }
    tok
}

fn lm(bos: bool) -> LmTokenizer {
    LmTokenizer::new(tiny_tokenizer(bos), Some(id("</s>")), Some(chatml())).unwrap()
}

/// A small ChatML template (the shape of SmolLM2-Instruct's).
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fn chatml() -> ChatTemplate {
    ChatTemplate::new(CHATML, "<s>", "</s>", Path::new("tokenizer_config.json")).unwrap()
}

fn msg(role: &str, content: &str) -> Message {
    Message {
        role: role.into(),
        content: content.into(),
    }
}

fn opts() -> LmReadOptions {
    LmReadOptions {
        text_column: "text".into(),
        file_extensions: vec!["txt".into()],
        encoding_errors: Default::default(),
        skip_bad_rows: false,
    }
}

fn write(p: &Path, s: &str) {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(p, s).unwrap();
}

/// Documents get BOS (the tokenizer's) and EOS, are concatenated and cut into blocks; the
/// remainder is dropped; every token is a label.
#[test]
fn packing_counts_and_block_contents() {
    let docs = ["the cat sat", "on the mat ."];
    // <s> the cat sat </s> <s> on the mat . </s>: 11 tokens.
    let blocks = lm(true).pack(docs, 4).unwrap();
    assert_eq!(blocks.len(), 2, "11 tokens make 2 blocks of 4, 3 dropped");
    assert_eq!(blocks[0].ids, ids("<s> the cat sat"));
    assert_eq!(blocks[1].ids, ids("</s> <s> on the"));
    for b in &blocks {
        let l: Vec<i64> = b.ids.iter().map(|&i| i as i64).collect();
        assert_eq!(b.labels, l);
        assert_eq!(
            b.counted(),
            3,
            "the first token of a block is predicted from nothing"
        );
    }
    // Without a BOS-adding tokenizer: the cat sat </s> on the mat . </s> = 9 tokens.
    let blocks = lm(false).pack(docs, 3).unwrap();
    assert_eq!(blocks.len(), 3);
    assert_eq!(blocks[1].ids, ids("</s> on the"));
    assert_eq!(blocks[2].ids, ids("mat . </s>"));
    // A block longer than all the text: nothing.
    assert!(lm(true).pack(docs, 12).unwrap().is_empty());
}

/// A `.txt` file holds one document per non-empty line; a folder one per file, read
/// recursively in sorted order; CSV rows by `text_column`.
#[test]
fn text_layouts_read_documents_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("a.txt");
    write(&f, "the cat sat\n\non the mat .\n");
    let d = read_lm_data(&f, &opts()).unwrap();
    assert_eq!(d.format, LmFormat::Text);
    let texts: Vec<&LmContent> = d.rows.iter().map(|r| &r.content).collect();
    assert_eq!(
        texts,
        [
            &LmContent::Text("the cat sat".into()),
            &LmContent::Text("on the mat .".into())
        ]
    );
    let dir = tmp.path().join("docs");
    write(&dir.join("b/2.txt"), "hello there");
    write(&dir.join("a.txt"), "the cat sat");
    write(&dir.join("b/1.txt"), "how are you ?");
    write(&dir.join("skip.md"), "not read");
    let d = read_lm_data(&dir, &opts()).unwrap();
    let names: Vec<&str> = d.rows.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(names, ["a.txt", "b/1.txt", "b/2.txt"]);
    let blocks = lm(true)
        .items(&d.rows, d.format, 100, &dir)
        .unwrap_or_default();
    assert!(blocks.is_empty(), "15 tokens do not fill a block of 100");
    let blocks = lm(true).items(&d.rows, d.format, 5, &dir).unwrap();
    assert_eq!(blocks.len(), 3);
    assert_eq!(blocks[0].ids, ids("<s> the cat sat </s>"));
    assert_eq!(blocks[1].ids, ids("<s> how are you ?"));
    let csv = tmp.path().join("d.csv");
    write(&csv, "id,text\n1,the cat sat\n2,hello there\n");
    let d = read_lm_data(&csv, &opts()).unwrap();
    assert_eq!(d.rows.len(), 2);
    assert_eq!(d.rows[1].content, LmContent::Text("hello there".into()));
    assert_eq!(d.rows[1].line, 3);
}

/// Prompt/completion: only the completion's tokens and the EOS after it are labels;
/// truncation cuts ids and labels alike.
#[test]
fn completion_only_labels() {
    let it = lm(true)
        .prompt_completion("how are you ?", "fine", 64)
        .unwrap();
    assert_eq!(it.ids, ids("<s> how are you ? fine </s>"));
    let i = IGNORE_INDEX;
    assert_eq!(
        it.labels,
        vec![i, i, i, i, i, id("fine") as i64, id("</s>") as i64]
    );
    assert_eq!(it.counted(), 2);
    let cut = lm(true)
        .prompt_completion("how are you ?", "fine", 6)
        .unwrap();
    assert_eq!(cut.ids.len(), 6);
    assert_eq!(cut.labels.len(), 6);
    assert_eq!(cut.counted(), 1);
    // From a JSONL file.
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("pc.jsonl");
    write(
        &f,
        "{\"prompt\": \"hello\", \"completion\": \"hi there\"}\n\n{\"prompt\": \"how are you ?\", \"completion\": \"fine\"}\n",
    );
    let d = read_lm_data(&f, &opts()).unwrap();
    assert_eq!(d.format, LmFormat::PromptCompletion);
    assert_eq!(d.rows[1].line, 3);
    let items = lm(false).items(&d.rows, d.format, 64, &f).unwrap();
    assert_eq!(items.len(), 2, "one sequence per row, not packed");
    assert_eq!(items[0].ids, ids("hello hi there </s>"));
    assert_eq!(items[0].counted(), 3);
}

/// The chat template renders a 2-turn conversation as transformers would; only the
/// assistant turn (its text and its `<|im_end|>`) is labelled.
#[test]
fn chat_template_renders_and_masks_assistant_turns() {
    let conv = [msg("user", "hello"), msg("assistant", "hi there")];
    let t = chatml();
    assert_eq!(
        t.render(&conv, false).unwrap(),
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nhi there<|im_end|>\n"
    );
    assert_eq!(
        t.render(&conv[..1], true).unwrap(),
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    );
    let it = lm(true).chat(&conv, 64).unwrap();
    // The template writes the special tokens; no BOS is added on top.
    assert_eq!(
        it.ids,
        ids("<|im_start|> user hello <|im_end|> <|im_start|> assistant hi there <|im_end|>")
    );
    let kept: Vec<u32> = it
        .labels
        .iter()
        .filter(|&&l| l != IGNORE_INDEX)
        .map(|&l| l as u32)
        .collect();
    assert_eq!(kept, ids("hi there <|im_end|>"));
    // Two assistant turns: both labelled, the user's not.
    let conv = [
        msg("system", "you are fine"),
        msg("user", "hello"),
        msg("assistant", "hi"),
        msg("user", "how are you ?"),
        msg("assistant", "fine"),
    ];
    let it = lm(true).chat(&conv, 64).unwrap();
    let kept: Vec<u32> = it
        .labels
        .iter()
        .filter(|&&l| l != IGNORE_INDEX)
        .map(|&l| l as u32)
        .collect();
    assert_eq!(kept, ids("hi <|im_end|> fine <|im_end|>"));
    // raise_exception and Python string methods, as Hugging Face templates use them.
    let strict = ChatTemplate::new(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0]['content'].strip() }}",
        "",
        "",
        Path::new("t.json"),
    )
    .unwrap();
    assert_eq!(strict.render(&[msg("user", "  hi ")], false).unwrap(), "hi");
    let e = strict.render(&[msg("system", "x")], false).unwrap_err();
    assert!(e.to_string().contains("first must be user"), "{e}");
    // A template read from tokenizer_config.json.
    let tmp = tempfile::tempdir().unwrap();
    write(
        &tmp.path().join("tokenizer_config.json"),
        &serde_json::json!({"chat_template": CHATML, "eos_token": "</s>"}).to_string(),
    );
    let t = ChatTemplate::from_dir(tmp.path()).unwrap().unwrap();
    assert_eq!(
        t.render(&conv[1..3], false).unwrap(),
        chatml().render(&conv[1..3], false).unwrap()
    );
}

/// Bad rows: one line naming the file, line and field; skipped under `on_bad_row = "skip"`.
#[test]
fn bad_rows_name_file_line_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("pc.jsonl");
    write(
        &f,
        "{\"prompt\": \"hello\", \"completion\": \"hi\"}\n{\"prompt\": \"how are you ?\"}\n{\"prompt\": \"hi\", \"completion\": \"fine\"}\n",
    );
    let e = read_lm_data(&f, &opts()).unwrap_err().to_string();
    assert!(
        e.contains("pc.jsonl") && e.contains('2') && e.contains("completion"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
    let d = read_lm_data(
        &f,
        &LmReadOptions {
            skip_bad_rows: true,
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(d.rows.len(), 2);
    assert_eq!(d.skipped.len(), 1);
    assert_eq!(d.skipped[0].line, 2);
    assert!(d.skipped[0].reason.contains("completion"));
    // Conversations: a message without a role, invalid JSON.
    let f = tmp.path().join("chat.jsonl");
    write(
        &f,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hello\"}, {\"role\": \"assistant\", \"content\": \"hi\"}]}\n{\"messages\": [{\"content\": \"hello\"}]}\n",
    );
    let e = read_lm_data(&f, &opts()).unwrap_err().to_string();
    assert!(
        e.contains("chat.jsonl") && e.contains("messages[0].role"),
        "{e}"
    );
    write(&f, "{\"messages\": [}\n");
    let e = read_lm_data(&f, &opts()).unwrap_err().to_string();
    assert!(e.contains("not valid JSON"), "{e}");
    // Conversations without a chat template.
    let no_template = LmTokenizer::new(tiny_tokenizer(false), None, None).unwrap();
    let e = no_template
        .chat(&[msg("user", "hi"), msg("assistant", "hi")], 8)
        .unwrap_err()
        .to_string();
    assert!(e.contains("chat_template"), "{e}");
}

/// The fused loss equals transformers' ForCausalLMLoss composed from candle's operations,
/// in value and in gradient, with ignored positions and padding.
#[test]
fn fused_loss_matches_composed_reference() {
    let (b, s, v) = (2usize, 5usize, 7usize);
    let z: Vec<f32> = (0..b * s * v)
        .map(|i| ((i * 37 % 23) as f32 - 11.0) / 4.0)
        .collect();
    let x = Var::from_vec(z, (b * s, v), &Device::Cpu).unwrap();
    let labels = Tensor::from_vec(
        vec![
            1i64,
            2,
            3,
            IGNORE_INDEX,
            6,
            IGNORE_INDEX,
            0,
            5,
            IGNORE_INDEX,
            IGNORE_INDEX,
        ],
        (b, s),
        &Device::Cpu,
    )
    .unwrap();
    let fused = lm_loss(x.as_tensor(), &labels).unwrap();
    let composed = lm_loss_composed(x.as_tensor(), &labels).unwrap();
    let (f, c) = (
        fused.to_scalar::<f32>().unwrap(),
        composed.to_scalar::<f32>().unwrap(),
    );
    assert!((f - c).abs() < 1e-5, "{f} vs {c}");
    // By hand: the counted next-token targets are 2, 3, 6 (sequence 0: rows 0, 1, 3) and
    // 0, 5 (sequence 1: rows 5, 6).
    let zs = x.as_tensor().to_vec2::<f32>().unwrap();
    let nll = |r: usize, t: usize| {
        let m = zs[r].iter().cloned().fold(f32::MIN, f32::max);
        let lse = zs[r].iter().map(|z| (z - m).exp()).sum::<f32>().ln() + m;
        lse - zs[r][t]
    };
    let want = (nll(0, 2) + nll(1, 3) + nll(3, 6) + nll(5, 0) + nll(6, 5)) / 5.0;
    assert!((f - want).abs() < 1e-5, "{f} vs {want}");
    let gf = fused.backward().unwrap();
    let gc = composed.backward().unwrap();
    let a = gf
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let c = gc
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (a, c) in a.iter().zip(&c) {
        assert!((a - c).abs() < 1e-6, "{a} vs {c}");
    }
    // No counted token: a zero loss, not NaN.
    let none = Tensor::from_vec(vec![IGNORE_INDEX; b * s], (b, s), &Device::Cpu).unwrap();
    assert_eq!(
        lm_loss(x.as_tensor(), &none)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    // A label outside the vocabulary is an error, not a panic.
    let bad =
        Tensor::from_vec(vec![0i64, 99, 0, 0, 0, 0, 0, 0, 0, 0], (b, s), &Device::Cpu).unwrap();
    assert!(lm_loss(x.as_tensor(), &bad)
        .unwrap_err()
        .to_string()
        .contains("vocabulary"));
}

/// Accumulation weighs micro-batches by counted tokens: shares are those of the window's
/// token mean; batches pad labels with the ignore index.
#[test]
fn accumulation_weights_by_counted_tokens() {
    let i = IGNORE_INDEX;
    let t = TargetData::Tokens(vec![vec![1, 2, 3, 4], vec![i, i, 5], vec![1, 2]]);
    assert_eq!(t.weight(&[0]), 3.0);
    assert_eq!(t.weight(&[1]), 1.0);
    assert_eq!(t.weight(&[0, 1, 2]), 5.0);
    let ferrotune::loss::Targets::Tokens(y) = t.select(&[1, 2], &Device::Cpu).unwrap() else {
        panic!("token targets")
    };
    assert_eq!(
        y.to_vec2::<i64>().unwrap(),
        vec![vec![i, i, 5], vec![1, 2, i]]
    );
    assert_eq!(TargetData::Classes(vec![0, 1]).weight(&[0, 1]), 2.0);
}

/// Classification-only settings are refused for causal_lm with one line naming the key;
/// `block_size` is refused for the other tasks.
#[test]
fn recipe_refuses_classification_settings() {
    let base = "model_name_or_path = \"m\"\ntrain_file = \"t.txt\"\nvalidation_split = 0.1\nproblem_type = \"causal_lm\"\n";
    let p = Path::new("r.toml");
    let ok = TrainConfig::from_toml_str(base, p, &["block_size=128".into()]).unwrap();
    assert_eq!(ok.block_size, Some(128));
    for set in [
        "label_smoothing=0.1",
        "class_weights=\"balanced\"",
        "loss=\"focal\"",
        "mixup_alpha=0.2",
        "block_size=1",
    ] {
        let e = TrainConfig::from_toml_str(base, p, &[set.into()])
            .unwrap_err()
            .to_string();
        let key = set.split('=').next().unwrap();
        assert!(e.contains(key), "{set}: {e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
    let cls = "model_name_or_path = \"m\"\ntrain_file = \"t.csv\"\nvalidation_split = 0.1\n";
    let e = TrainConfig::from_toml_str(cls, p, &["block_size=64".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("block_size") && e.contains("causal_lm"), "{e}");
}

/// A tiny random Llama's recipe on a tiny repetitive text in `dir`.
fn llama_recipe(dir: &Path, out: &str) -> TrainConfig {
    let base = dir.join("base");
    if !base.exists() {
        ferrotune::testing::write_tiny_decoder(&base, "llama", 7, |_| {}).unwrap();
        let lines = [
            "the movie was very good .",
            "the film was great !",
            "the plot is bad , the acting is awful .",
            "a movie is a film .",
        ];
        let text: String = (0..48).map(|i| format!("{}\n", lines[i % 4])).collect();
        write(&dir.join("train.txt"), &text);
    }
    TrainConfig {
        model_name_or_path: base,
        train_file: dir.join("train.txt"),
        problem_type: ferrotune::tasks::ProblemType::CausalLm,
        block_size: Some(16),
        validation_split: Some(0.25),
        num_train_epochs: 2,
        learning_rate: 3e-3,
        warmup_ratio: 0.1,
        per_device_train_batch_size: 4,
        gradient_accumulation_steps: 2,
        per_device_eval_batch_size: 8,
        output_dir: dir.join(out),
        report_to: vec![],
        logging_steps: 1,
        ..TrainConfig::default()
    }
}

fn epoch_metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["split"] == "eval")
        .collect()
}

/// A tiny random Llama trained 2 epochs on a tiny text: the evaluation loss falls, the
/// perplexity is its exponential, the exported model is a causal LM (no problem_type), and
/// `ferrotune eval`'s function gives the best epoch's numbers on the same held-out text.
#[test]
fn tiny_llama_learns_a_tiny_text() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = llama_recipe(tmp.path(), "out");
    let s = ferrotune::train::train(&cfg, &mut ferrotune::train::Silent).unwrap();
    let ev = epoch_metrics(&cfg.output_dir);
    assert_eq!(ev.len(), 2);
    let (l1, l2) = (
        ev[0]["eval_loss"].as_f64().unwrap(),
        ev[1]["eval_loss"].as_f64().unwrap(),
    );
    eprintln!("eval_loss by epoch: {l1:.4}, {l2:.4}");
    assert!(l2 < l1, "eval loss did not fall: {l1} then {l2}");
    for e in &ev {
        let (l, p) = (
            e["eval_loss"].as_f64().unwrap(),
            e["eval_perplexity"].as_f64().unwrap(),
        );
        assert!((p - l.exp()).abs() < 1e-6 * p, "{p} vs exp({l})");
        assert!(e["eval_tokens"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(s.best_epoch, 2);
    let cj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.model_dir.join("config.json")).unwrap())
            .unwrap();
    assert!(cj.get("problem_type").is_none(), "{cj}");
    assert!(ferrotune::train::causal_lm::is_causal_lm_dir(&s.model_dir).unwrap());
    let preds = std::fs::read_to_string(cfg.output_dir.join("eval_predictions.jsonl")).unwrap();
    assert!(preds.lines().count() > 0 && preds.contains("\"perplexity\""));
    // `ferrotune eval` on the exported model: the trained model fits the text better than
    // the random base did.
    let eval = |dir: &Path| {
        ferrotune::train::causal_lm::evaluate_dir(dir, &cfg.train_file, Some(16), 8, "text")
            .unwrap()
    };
    let (trained, base) = (eval(&s.model_dir), eval(&cfg.model_name_or_path));
    eprintln!("eval on the text: trained {trained:?}, base {base:?}");
    assert!(trained["loss"] < base["loss"], "{trained:?} vs {base:?}");
    assert!((trained["perplexity"] - trained["loss"].exp()).abs() < 1e-9 * trained["perplexity"]);
}

/// A run stopped after its first step and resumed ends with the same model, byte for
/// byte, as the run that was never stopped.
#[test]
fn tiny_llama_resumes_exactly() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    let whole = llama_recipe(tmp.path(), "whole");
    ferrotune::train::train(&whole, &mut ferrotune::train::Silent).unwrap();
    let cut = llama_recipe(tmp.path(), "cut");
    let stop = Arc::new(AtomicBool::new(true));
    let control = ferrotune::train::Control {
        stop: stop.clone(),
        ..Default::default()
    };
    let e =
        ferrotune::train::train_with(&cut, &mut ferrotune::train::Silent, &control).unwrap_err();
    assert!(
        matches!(e, ferrotune::error::Error::Interrupted { .. }),
        "{e}"
    );
    stop.store(false, Ordering::SeqCst);
    let control = ferrotune::train::Control {
        resume: Some("latest".into()),
        ..Default::default()
    };
    ferrotune::train::train_with(&cut, &mut ferrotune::train::Silent, &control).unwrap();
    let bytes = |out: &Path| std::fs::read(out.join("model/model.safetensors")).unwrap();
    assert!(
        bytes(&whole.output_dir) == bytes(&cut.output_dir),
        "the resumed run's model differs"
    );
    assert_eq!(
        epoch_metrics(&whole.output_dir),
        epoch_metrics(&cut.output_dir)
    );
}

/// `block_size` above the model's positions stops the run before training: one line
/// naming the field, the model's positions and its config.json.
#[test]
fn a_block_size_above_the_models_positions_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = llama_recipe(tmp.path(), "out");
    cfg.block_size = Some(65);
    let e = ferrotune::train::train(&cfg, &mut ferrotune::train::Silent)
        .err()
        .unwrap();
    let msg = e.to_string();
    assert!(matches!(e, ferrotune::Error::Config(_)), "{msg}");
    assert!(
        msg.contains("`block_size` 65") && msg.contains("64 positions"),
        "{msg}"
    );
    assert!(msg.contains("config.json") && !msg.contains('\n'), "{msg}");
}

/// A causal LM with `lora_r`: only the adapters train (every base tensor of the last
/// checkpoint is the base model's, bit for bit, and some `lora_B` moved), the PEFT adapter
/// is exported as a CAUSAL_LM adapter beside the merged model, and the adapter reloads on
/// the base to the merged model's logits.
#[test]
fn lora_trains_only_the_adapters_of_a_causal_lm() {
    use ferrotune::config::LoraTargets;
    use ferrotune::nn::GroupKind;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        lora_r: 4,
        lora_alpha: 8.0,
        lora_target_modules: Some(LoraTargets::Named("all-linear".into())),
        ..llama_recipe(tmp.path(), "out")
    };
    ferrotune::train::train(&cfg, &mut ferrotune::train::Silent).unwrap();
    let out = &cfg.output_dir;
    let ac: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(ac["task_type"], "CAUSAL_LM");
    assert_eq!(ac["fan_in_fan_out"], false);
    let base_dir = &cfg.model_name_or_path;
    let spec = cfg.lora_spec("llama", false).unwrap();
    let loaded = ferrotune::nn::lora::build(spec.as_ref(), || {
        Ok(ferrotune::families::load(
            base_dir,
            &ferrotune::families::HeadSpec::new(0),
            3,
            &Device::Cpu,
        )?
        .2)
    })
    .unwrap();
    let read = |p: &Path| {
        candle_core::safetensors::load(p, &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect::<HashMap<String, Vec<f32>>>()
    };
    let ck =
        ferrotune::train::checkpoint::list(&ferrotune::train::checkpoint::checkpoints_dir(out))
            .pop()
            .unwrap()
            .1;
    let (saved, base) = (
        read(&ck.join("model.safetensors")),
        read(&base_dir.join("model.safetensors")),
    );
    let (mut frozen, mut b_moved) = (0, false);
    for (i, p) in loaded.params.state().enumerate() {
        let now = &saved[&format!("p.{i:05}")];
        if loaded.params.groups[p.group].kind == GroupKind::Frozen {
            assert_eq!(now, &base[&p.name], "{} changed", p.name);
            frozen += 1;
        } else {
            assert!(p.name.contains("lora_"), "{} trains", p.name);
            b_moved |= p.name.ends_with("lora_B.weight") && now.iter().any(|&v| v != 0.0);
        }
    }
    assert_eq!(frozen, base.len());
    assert!(b_moved, "no adapter trained");
    // The adapter on the base gives the merged model's logits.
    let merged = ferrotune::families::load(
        &out.join("model"),
        &ferrotune::families::HeadSpec::new(0),
        3,
        &Device::Cpu,
    )
    .unwrap()
    .2;
    let batch = {
        let ids: Vec<u32> = (0..10u32).map(|i| 5 + i % 11).collect();
        ferrotune::nn::Batch::Tokens(ferrotune::nn::TokenBatch {
            input_ids: Tensor::from_vec(ids, (1, 10), &Device::Cpu).unwrap(),
            token_type_ids: Tensor::zeros((1, 10), candle_core::DType::U32, &Device::Cpu).unwrap(),
            attention_mask: Tensor::ones((1, 10), candle_core::DType::F32, &Device::Cpu).unwrap(),
        })
    };
    let adapted = ferrotune::nn::lora::read_adapter(&out.join("adapter"), &Device::Cpu)
        .unwrap()
        .load(|| {
            Ok(ferrotune::families::load(
                base_dir,
                &ferrotune::families::HeadSpec::new(0),
                3,
                &Device::Cpu,
            )?
            .2)
        })
        .unwrap();
    let logits = |m: &ferrotune::families::Loaded| {
        m.model
            .lm_logits(&mut ferrotune::nn::Ctx::eval(), &batch)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (a, b) = (logits(&merged), logits(&adapted));
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-4, "merged vs base + adapter: {d}");
}

/// `load_in_4bit` (QLoRA-style): on a model whose linear weights are 4-bit blocks already
/// (as a Q4_1 GGUF file's are, dequantised), the run with its frozen linear layers kept in
/// 4 bits is the run on the f32 weights, bit for bit: the same evaluation losses, adapter
/// and merged model. The 4-bit build holds no f32 copy of those weights (they leave the
/// parameters; the export dequantises them), and the key without LoRA is refused.
#[test]
fn a_4bit_base_trains_exactly_as_its_f32_weights() {
    use ferrotune::config::LoraTargets;
    use ferrotune::kernels::q4::Q4Weight;
    let tmp = tempfile::tempdir().unwrap();
    let recipe = |out: &str, four: bool| TrainConfig {
        lora_r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.1,
        lora_target_modules: Some(LoraTargets::Named("all-linear".into())),
        load_in_4bit: Some(four),
        // Both in f32: `auto` trains the f32 weights in bf16 on an AMX CPU, while the 4-bit
        // layers' GEMMs are f32 always.
        precision: ferrotune::precision::Precision::F32,
        ..llama_recipe(tmp.path(), out)
    };
    // Linear widths of whole blocks (64 and 96 inputs), the weights made 4-bit exact.
    let base = recipe("out4", true).model_name_or_path;
    std::fs::remove_dir_all(&base).unwrap();
    ferrotune::testing::write_tiny_decoder(&base, "llama", 7, |c| {
        c["hidden_size"] = 64.into();
        c["intermediate_size"] = 96.into();
    })
    .unwrap();
    let st = base.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let mut linear = 0;
    for (name, t) in tensors.iter_mut() {
        if name.ends_with("_proj.weight") {
            let (o, i) = t.dims2().unwrap();
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let q = Q4Weight::quantize(&v, o, i).unwrap().dequantize();
            *t = Tensor::from_vec(q, (o, i), &Device::Cpu).unwrap();
            linear += 1;
        }
    }
    assert_eq!(linear, 14);
    candle_core::safetensors::save(&tensors, &st).unwrap();

    let (c4, c32) = (recipe("out4", true), recipe("out32", false));
    // The 4-bit build: every linear weight 4-bit, none among the parameters.
    let spec = c4.lora_spec("llama", false).unwrap();
    assert!(spec.as_ref().unwrap().base_4bit);
    let loaded = ferrotune::nn::lora::build(spec.as_ref(), || {
        Ok(ferrotune::families::load(
            &base,
            &ferrotune::families::HeadSpec::new(0),
            3,
            &Device::Cpu,
        )?
        .2)
    })
    .unwrap();
    assert_eq!(loaded.params.q4.len(), linear);
    assert!(loaded
        .params
        .params
        .iter()
        .all(|p| !p.name.ends_with("_proj.weight")));

    for c in [&c4, &c32] {
        ferrotune::train::train(c, &mut ferrotune::train::Silent).unwrap();
    }
    let losses = |out: &Path| -> Vec<f64> {
        epoch_metrics(out)
            .iter()
            .map(|m| m["eval_loss"].as_f64().unwrap())
            .collect()
    };
    assert_eq!(losses(&c4.output_dir), losses(&c32.output_dir));
    assert_eq!(losses(&c4.output_dir).len(), 2);
    for file in [
        "adapter/adapter_model.safetensors",
        "model/model.safetensors",
    ] {
        let read = |out: &Path| {
            let mut v: Vec<(String, Vec<f32>)> =
                candle_core::safetensors::load(out.join(file), &Device::Cpu)
                    .unwrap()
                    .into_iter()
                    .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
                    .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        assert_eq!(read(&c4.output_dir), read(&c32.output_dir), "{file}");
    }
    // Stopped after its first step and resumed (the checkpoint holds no 4-bit weights:
    // they are rebuilt from the base), it ends with the same model and adapter.
    let cut = recipe("cut4", true);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let control = ferrotune::train::Control {
        stop: stop.clone(),
        ..Default::default()
    };
    ferrotune::train::train_with(&cut, &mut ferrotune::train::Silent, &control).unwrap_err();
    let control = ferrotune::train::Control {
        resume: Some("latest".into()),
        ..Default::default()
    };
    ferrotune::train::train_with(&cut, &mut ferrotune::train::Silent, &control).unwrap();
    for file in [
        "adapter/adapter_model.safetensors",
        "model/model.safetensors",
    ] {
        let bytes = |out: &Path| std::fs::read(out.join(file)).unwrap();
        assert!(
            bytes(&c4.output_dir) == bytes(&cut.output_dir),
            "resumed: {file}"
        );
    }
    // The adapters trained.
    let adapter = candle_core::safetensors::load(
        c4.output_dir.join("adapter/adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert!(adapter.iter().any(|(k, t)| k.ends_with("lora_B.weight")
        && t.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0));

    let e = TrainConfig::from_toml_str(
        "model_name_or_path = \"m\"\ntrain_file = \"t\"\nload_in_4bit = true\n",
        Path::new("r.toml"),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("r.toml") && e.contains("load_in_4bit") && e.contains("lora_r"),
        "{e}"
    );
}
