//! Text generation with a decoder: the prompt runs through the model once, filling its KV
//! cache, then one token at a time is chosen (greedy at temperature 0, else sampled with
//! temperature and nucleus `top_p` from a seeded generator) and fed back, until
//! `max_new_tokens`, an end-of-sequence token or the model's last position. Text is
//! handed out as it becomes whole (a token that ends inside a UTF-8 character waits for
//! the next). `ferrotune generate` and the server's `POST /generate` both run this.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::families::HfConfig;
use crate::nn::decoder::Generator;

/// How tokens are chosen (TGI's `parameters` names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// 0: greedy (the most likely token); above: sample from `softmax(logits / T)`.
    pub temperature: f64,
    /// Sample from the smallest set of most likely tokens whose probabilities sum to at
    /// least this (1: all).
    pub top_p: f64,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Sampling {
        Sampling {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl Sampling {
    /// Checks the values; the error names the parameter.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Config(format!(
                "`temperature` must be 0 (greedy) or more, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Config(format!(
                "`top_p` must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// `max_new_tokens` reached.
    Length,
    /// An end-of-sequence token was generated.
    EosToken,
    /// The model's last position was reached.
    MaxPositions,
}

impl Finish {
    /// TGI's `finish_reason` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Length => "length",
            Finish::EosToken => "eos_token",
            Finish::MaxPositions => "length",
        }
    }
}

/// What [`generate`] made.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The new tokens (an end-of-sequence token that stopped it included).
    pub ids: Vec<u32>,
    /// Their text (special tokens left out).
    pub text: String,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Why it stopped.
    pub finish: Finish,
}

/// The end-of-sequence ids of a model: `eos_token_id` of its `config.json` and of its
/// `generation_config.json` (a number or a list), when present.
pub fn eos_ids(cfg: &HfConfig) -> Vec<u32> {
    let mut out = Vec::new();
    let mut add = |v: Option<&serde_json::Value>| match v {
        Some(serde_json::Value::Array(a)) => {
            out.extend(a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)))
        }
        Some(v) => out.extend(v.as_u64().map(|x| x as u32)),
        None => {}
    };
    add(cfg.raw.get("eos_token_id"));
    if let Some(dir) = cfg.path.parent() {
        let gen = dir.join("generation_config.json");
        if let Ok(text) = std::fs::read_to_string(&gen) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                add(v.get("eos_token_id"));
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The index of the token chosen from `logits` under `s` (greedy at temperature 0).
pub fn choose(logits: &[f32], s: &Sampling, rng: &mut ChaCha8Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if s.temperature == 0.0 {
        return argmax();
    }
    let t = s.temperature as f32;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, ((v - max) / t).exp()))
        .collect();
    let total: f32 = probs.iter().map(|p| p.1).sum();
    if !(total > 0.0 && total.is_finite()) {
        return argmax();
    }
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    // The nucleus: the most likely tokens up to `top_p` of the mass (at least one).
    let mut keep = probs.len();
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p.1 / total;
            if acc >= s.top_p as f32 {
                keep = i + 1;
                break;
            }
        }
    }
    let probs = &probs[..keep];
    let mass: f32 = probs.iter().map(|p| p.1).sum();
    let mut r = rng.random::<f32>() * mass;
    for p in probs {
        r -= p.1;
        if r <= 0.0 {
            return p.0;
        }
    }
    probs[probs.len() - 1].0
}

/// Generates from `prompt_ids` with `model` (see the module documentation); `on_text`
/// receives each new piece of text as it becomes whole.
pub fn generate(
    model: &dyn Generator,
    tok: &Tokenizer,
    prompt_ids: &[u32],
    eos: &[u32],
    s: &Sampling,
    mut on_text: impl FnMut(&str),
) -> Result<Generated> {
    s.validate()?;
    if prompt_ids.is_empty() {
        return Err(Error::Config("the prompt has no tokens".into()));
    }
    let max = model.max_positions();
    if prompt_ids.len() >= max {
        return Err(Error::Config(format!(
            "the prompt has {} tokens; the model takes {max} positions in all",
            prompt_ids.len()
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
    let mut cache = model.new_cache();
    let mut logits = model.step(prompt_ids, &mut cache)?;
    let mut ids = Vec::new();
    let mut shown = 0usize;
    let decode = |ids: &[u32]| -> Result<String> {
        tok.decode(ids, true)
            .map_err(|e| Error::Msg(format!("decoding generated tokens: {e}")))
    };
    let finish = loop {
        if ids.len() >= s.max_new_tokens {
            break Finish::Length;
        }
        let next = choose(&logits, s, &mut rng);
        ids.push(next);
        let text = decode(&ids)?;
        // A piece that ends inside a character decodes to U+FFFD; wait for the rest.
        if text.len() > shown && !text.ends_with('\u{FFFD}') {
            on_text(&text[shown..]);
            shown = text.len();
        }
        if eos.contains(&next) {
            break Finish::EosToken;
        }
        if cache.len + 1 > max {
            break Finish::MaxPositions;
        }
        if ids.len() < s.max_new_tokens {
            logits = model.step(&[next], &mut cache)?;
        }
    };
    let text = decode(&ids)?;
    if text.len() > shown {
        on_text(&text[shown..]);
    }
    Ok(Generated {
        ids,
        text,
        prompt_tokens: prompt_ids.len(),
        finish,
    })
}

/// A decoder loaded for generation, with its tokenizer and end-of-sequence ids.
pub struct TextGenerator {
    /// The model (its language-model head).
    pub model: Box<dyn crate::families::Model>,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Tokens that end a generation.
    pub eos: Vec<u32>,
    /// The model directory.
    pub dir: std::path::PathBuf,
}

impl TextGenerator {
    /// Loads the language model of directory `dir` (a decoder's `config.json`, weights
    /// and tokenizer). A model of another kind is a one-line error naming the directory.
    pub fn load(dir: &std::path::Path) -> Result<TextGenerator> {
        TextGenerator::load_with_adapter(dir, None)
    }

    /// [`TextGenerator::load`] with a PEFT LoRA adapter directory applied to the model
    /// (an adapter that does not fit it is an error naming its file and tensor).
    pub fn load_with_adapter(
        dir: &std::path::Path,
        adapter: Option<&std::path::Path>,
    ) -> Result<TextGenerator> {
        let device = crate::nn::device();
        let head = crate::families::HeadSpec::new(0);
        let cfg = HfConfig::from_dir(dir)?;
        let fam = crate::families::family(&cfg)?;
        let build = || crate::families::load_weights(&cfg, fam, dir, &head, 0, &device);
        let loaded = crate::nn::lora::load_with_adapter(adapter, &device, build)?;
        if loaded.model.generator().is_none() {
            return Err(Error::file(
                dir,
                format!("{} models do not generate text (not a decoder)", fam.name()),
            ));
        }
        let max = fam.max_tokens(&cfg)?;
        let tokenizer = crate::data::tokenizer::load_tokenizer(dir, max)?;
        Ok(TextGenerator {
            model: loaded.model,
            tokenizer,
            eos: eos_ids(&cfg),
            dir: dir.to_path_buf(),
        })
    }

    /// The prompt's token ids, as the tokenizer encodes it (with the special tokens its
    /// template adds, as transformers' tokenizer call does).
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(prompt, true)
            .map_err(|e| Error::Msg(format!("tokenizing the prompt: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Generates from `prompt` ([`generate`]).
    pub fn run(&self, prompt: &str, s: &Sampling, on_text: impl FnMut(&str)) -> Result<Generated> {
        let ids = self.encode(prompt)?;
        let g = self
            .model
            .generator()
            .expect("checked to be a decoder when loaded");
        generate(g, &self.tokenizer, &ids, &self.eos, s, on_text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Greedy picks the largest logit; sampling at a tiny top_p keeps only the most
    /// likely token; a seeded sampler repeats itself.
    #[test]
    fn choosing_tokens() {
        let logits = [0.1f32, 2.0, -1.0, 1.9];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(choose(&logits, &Sampling::default(), &mut rng), 1);
        let nucleus = Sampling {
            temperature: 1.0,
            top_p: 0.01,
            ..Sampling::default()
        };
        for _ in 0..20 {
            assert_eq!(choose(&logits, &nucleus, &mut rng), 1);
        }
        let hot = Sampling {
            temperature: 5.0,
            ..Sampling::default()
        };
        let draw = |seed| {
            let mut r = ChaCha8Rng::seed_from_u64(seed);
            (0..50)
                .map(|_| choose(&logits, &hot, &mut r))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        let seen: std::collections::BTreeSet<u32> = draw(3).into_iter().collect();
        assert!(
            seen.len() >= 3,
            "a hot sampler visits several tokens: {seen:?}"
        );
        assert!(Sampling {
            top_p: 0.0,
            ..Sampling::default()
        }
        .validate()
        .is_err());
    }
}
