//! Everything before the first training step: read the data (skipping bad rows when asked),
//! split it, map labels, resolve the loss, load the model with its head and encode the
//! examples.

use std::path::Path;

use candle_core::Device;
use serde_json::json;

use crate::config::{ClassWeights, OnBadRow, ProblemType, TrainConfig};
use crate::data::batch::Features;
use crate::data::labels::LabelMap;
use crate::data::reader::{open_examples, skipped_files, Example, ReaderOptions};
use crate::data::split::{stratified_sample, stratified_split};
use crate::data::{encoder_for, ImageRecipe, InputEncoder};
use crate::error::{Error, Result};
use crate::families::{self, Family, HeadSpec, HfConfig, InputKind, Model};
use crate::loss::LossConfig;
use crate::nn::ParamStore;
use crate::tasks::TargetData;
use crate::train::held_out::HeldOut;
use crate::train::log::Progress;

/// Everything loaded and prepared before the first step.
pub struct Prepared {
    /// The resolved recipe.
    pub cfg: TrainConfig,
    /// The pretrained model's configuration.
    pub hf: HfConfig,
    /// Its family.
    pub family: &'static dyn Family,
    /// The model.
    pub model: Box<dyn Model>,
    /// Its parameters.
    pub params: ParamStore,
    /// The input encoder (tokenizer).
    pub encoder: Box<dyn InputEncoder>,
    /// Class names (classification) or target names (regression).
    pub labels: LabelMap,
    /// Encoded training examples and their targets.
    pub train: (Vec<Features>, TargetData),
    /// The training examples' ids (`line N`, or a path), for messages.
    pub train_ids: Vec<String>,
    /// Encoded evaluation examples and their targets.
    pub eval: (Vec<Features>, TargetData),
    /// What `eval_predictions.jsonl` shows of each evaluation example.
    pub eval_rows: Vec<HeldOut>,
    /// The loss.
    pub loss: LossConfig,
    /// Notes for the user (new head, ...).
    pub notes: Vec<String>,
}

/// Examples tokenized per progress update.
const ENCODE_CHUNK: usize = 512;

/// `examples` encoded a chunk at a time, with progress (examples/s and ETA on a long set).
/// The tokenizer pads nothing, so chunks encode exactly as the whole set would.
/// With `skip`, an example that does not encode holds its error in its place; without,
/// the first such error ends the run.
fn encode(
    encoder: &dyn InputEncoder,
    examples: &[Example],
    name: &str,
    progress: &mut dyn Progress,
    skip: bool,
) -> Result<Vec<Result<Features>>> {
    progress.start(name, examples.len() as u64);
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(ENCODE_CHUNK) {
        if skip {
            out.extend(encoder.encode_each(chunk)?);
        } else {
            out.extend(encoder.encode(chunk)?.into_iter().map(Ok));
        }
        progress.advance(chunk.len() as u64);
    }
    progress.finish();
    Ok(out)
}

fn reader_options(cfg: &TrainConfig) -> ReaderOptions {
    ReaderOptions {
        text_column: cfg.input_column().to_string(),
        text_pair_column: cfg.text_pair_column.clone(),
        label_column: Some(cfg.label_column.clone()),
        encoding_errors: cfg.encoding_errors,
        file_extensions: cfg.file_extensions.clone(),
        header: cfg.header,
        column_names: cfg.column_names.clone(),
        image_paths: cfg.image_column.is_some(),
    }
}

/// `split.json`: the example ids of each side of a `validation_split`, so that the split
/// can be reused elsewhere (the PyTorch comparison script reads it).
fn split_json(cfg: &TrainConfig, train: &[Example], eval: &[Example]) -> String {
    json!({
        "seed": cfg.seed,
        "validation_split": cfg.validation_split,
        "train_file": cfg.train_file,
        "train": train.iter().map(|e| &e.id).collect::<Vec<_>>(),
        "eval": eval.iter().map(|e| &e.id).collect::<Vec<_>>(),
    })
    .to_string()
}

/// Rows left out under `on_bad_row = "skip"`, and notes about data clean-up.
#[derive(Default)]
struct SkipLog {
    rows: Vec<serde_json::Value>,
    notes: Vec<String>,
}

impl SkipLog {
    /// Reads a data file, skipping bad rows when the recipe says so; the reader's notes
    /// (labels of mixed JSON types) are kept, except for regression, whose targets are
    /// numbers however they are written.
    fn read(
        &mut self,
        cfg: &TrainConfig,
        path: &Path,
        opts: &ReaderOptions,
    ) -> Result<Vec<Example>> {
        let mut rows = open_examples(path, opts)?;
        if cfg.on_bad_row == OnBadRow::Skip {
            rows = rows.skip_bad_rows();
        }
        let ex = rows.by_ref().collect::<Result<Vec<_>>>()?;
        if cfg.problem_type != ProblemType::Regression {
            self.notes.extend(rows.notes());
        }
        let skipped = rows.skipped();
        if !skipped.is_empty() {
            self.notes.push(format!(
                "{} row(s) of {} skipped (see skipped_rows.jsonl)",
                skipped.len(),
                path.display()
            ));
        }
        self.rows.extend(
            skipped
                .iter()
                .map(|s| json!({"file": path, "line": s.line, "reason": s.reason})),
        );
        Ok(ex)
    }

    /// Keeps the examples whose targets encode; the others are skipped rows.
    fn keep_encodable(
        &mut self,
        examples: Vec<Example>,
        path: &Path,
        encode: impl Fn(&Example) -> Result<TargetData>,
    ) -> Vec<Example> {
        let before = examples.len();
        let kept: Vec<Example> = examples
            .into_iter()
            .filter(|e| match encode(e) {
                Ok(_) => true,
                Err(err) => {
                    self.rows
                        .push(json!({"file": path, "line": e.line, "reason": err.to_string()}));
                    false
                }
            })
            .collect();
        if kept.len() < before {
            self.notes.push(format!(
                "{} row(s) of {} skipped: target not a number (see skipped_rows.jsonl)",
                before - kept.len(),
                path.display()
            ));
        }
        kept
    }

    /// The examples that encoded, their inputs and targets; the others (their input an
    /// error) are skipped rows, counted in `notes`.
    fn keep_encoded(
        &mut self,
        examples: Vec<Example>,
        encoded: Vec<Result<Features>>,
        targets: TargetData,
        path: &Path,
        notes: &mut Vec<String>,
    ) -> (Vec<Example>, Vec<Features>, TargetData) {
        let (mut kept, mut features, mut places) = (Vec::new(), Vec::new(), Vec::new());
        for (i, (e, f)) in examples.into_iter().zip(encoded).enumerate() {
            match f {
                Ok(f) => {
                    kept.push(e);
                    features.push(f);
                    places.push(i);
                }
                Err(err) => self.rows.push(json!({
                    "file": path,
                    "line": e.line,
                    "id": e.id,
                    "reason": err.to_string(),
                })),
            }
        }
        let dropped = targets.len() - kept.len();
        if dropped == 0 {
            return (kept, features, targets);
        }
        notes.push(format!(
            "{dropped} example(s) of {} skipped: could not be read (see skipped_rows.jsonl)",
            path.display()
        ));
        (kept, features, targets.keep(&places))
    }

    fn write(&self, dir: &Path) -> Result<()> {
        let p = dir.join("skipped_rows.jsonl");
        if self.rows.is_empty() {
            let _ = std::fs::remove_file(&p);
            return Ok(());
        }
        let text: String = self.rows.iter().map(|r| format!("{r}\n")).collect();
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
    }
}

/// Notes for labels that look like a mistake in the file rather than a class: a
/// byte-order mark (files concatenated), quotes kept as part of the value, spaces around it.
fn label_warnings(labels: &[String], file: &Path, notes: &mut Vec<String>) {
    for l in labels {
        let why = if l.starts_with('\u{feff}') {
            "starts with a byte-order mark (were files concatenated?)"
        } else if l.len() >= 2
            && ((l.starts_with('"') && l.ends_with('"'))
                || (l.starts_with('\'') && l.ends_with('\'')))
        {
            "keeps its quotes as part of the value"
        } else if l.trim() != l {
            "has spaces around it"
        } else {
            continue;
        };
        notes.push(format!(
            "warning: label {l:?} in {} {why}; it is a class of its own",
            file.display()
        ));
    }
}

/// Drops examples whose (text, text pair) repeats an earlier one; the first is kept.
pub fn deduplicate(examples: Vec<Example>, notes: &mut Vec<String>) -> Vec<Example> {
    let before = examples.len();
    let mut seen = std::collections::HashSet::new();
    let kept: Vec<Example> = examples
        .into_iter()
        .filter(|e| seen.insert((e.text.clone(), e.text_pair.clone())))
        .collect();
    if kept.len() < before {
        notes.push(format!(
            "{} duplicate example(s) dropped",
            before - kept.len()
        ));
    }
    kept
}

/// The note a LoRA run prints: rank, alpha, adapted layers, trainable parameters, modules
/// to save (`None` without LoRA).
pub(crate) fn lora_note(params: &crate::nn::ParamStore) -> Option<String> {
    let l = params.lora.as_ref()?;
    let trainable: usize = params
        .params
        .iter()
        .filter(|p| params.groups[p.group].kind != crate::nn::GroupKind::Frozen)
        .map(|p| p.var.elem_count())
        .sum();
    let four: Vec<&crate::kernels::q4::Q4Weight> = params.q4.iter().map(|(_, q)| &**q).collect();
    let base = match four.len() {
        0 => String::new(),
        n => format!(
            "; {n} frozen linear layers 4-bit (load_in_4bit): {:.0} MB instead of {:.0} MB",
            four.iter().map(|q| q.bytes()).sum::<usize>() as f64 / 1e6,
            four.iter().map(|q| q.out * q.inp * 4).sum::<usize>() as f64 / 1e6
        ),
    };
    Some(format!(
        "LoRA r={} alpha={} on {} linear layers; {} of {} parameters train (modules to \
         save: {}){base}",
        l.spec.r,
        l.spec.alpha,
        l.modules.len(),
        trainable,
        params.count(),
        if l.saved.is_empty() {
            "none".to_string()
        } else {
            l.saved.join(", ")
        }
    ))
}

/// Checks that `dir` can be created and written, before anything slow happens.
pub fn ensure_writable(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let probe = dir.join(".ferrotune-write-test");
    std::fs::write(&probe, b"ok").map_err(|e| Error::io(dir, e))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// The loss of a run, with class weights resolved against the training targets.
pub fn loss_config(cfg: &TrainConfig, labels: &LabelMap, train: &TargetData) -> Result<LossConfig> {
    let class_weights = match (&cfg.class_weights, train) {
        (None, _) => None,
        (Some(ClassWeights::List(w)), _) => {
            if w.len() != labels.len() {
                return Err(Error::Config(format!(
                    "`class_weights` has {} values but the training data has {} classes ({})",
                    w.len(),
                    labels.len(),
                    labels.labels().join(", ")
                )));
            }
            Some(w.clone())
        }
        (Some(ClassWeights::Named(_)), TargetData::Classes(y)) => {
            // scikit-learn's "balanced": n / (k · count(c)).
            let k = labels.len();
            let mut count = vec![0usize; k];
            y.iter().for_each(|&c| count[c as usize] += 1);
            Some(
                count
                    .iter()
                    .map(|&c| y.len() as f64 / (k as f64 * c.max(1) as f64))
                    .collect(),
            )
        }
        (Some(ClassWeights::Named(_)), _) => None,
    };
    let pos_weight = match &cfg.pos_weight {
        Some(w) if w.len() == 1 => Some(vec![w[0]; labels.len()]),
        Some(w) if w.len() != labels.len() => {
            return Err(Error::Config(format!(
                "`pos_weight` has {} values but there are {} labels",
                w.len(),
                labels.len()
            )))
        }
        other => other.clone(),
    };
    Ok(LossConfig {
        kind: cfg.loss_kind(),
        label_smoothing: cfg.label_smoothing,
        class_weights,
        pos_weight,
        focal_gamma: cfg.focal_gamma,
        focal_alpha: cfg.focal_alpha,
        smooth_l1_beta: cfg.smooth_l1_beta,
        huber_delta: cfg.huber_delta,
    })
}

/// Reads the data and the model, encodes: everything up to the first training step.
/// Data errors come before the model is loaded.
pub fn prepare(
    cfg: &TrainConfig,
    device: &Device,
    progress: &mut dyn Progress,
) -> Result<Prepared> {
    prepare_for(cfg, device, progress, true)
}

/// [`prepare`]; with `writes` false (the ranks other than 0 of a distributed run) nothing
/// is written to the output directory (`skipped_rows.jsonl`, `split.json`).
pub fn prepare_for(
    cfg: &TrainConfig,
    device: &Device,
    progress: &mut dyn Progress,
    writes: bool,
) -> Result<Prepared> {
    if cfg.problem_type == ProblemType::CausalLm {
        return Err(Error::Msg(
            "internal: a causal-LM run is prepared by train::causal_lm::prepare".into(),
        ));
    }
    if writes {
        ensure_writable(&cfg.output_dir)?;
    }
    let opts = reader_options(cfg);
    let task = cfg.problem_type.task();
    let sep = cfg.label_separator.as_deref();
    let field = cfg.label_column.as_str();
    let mut skipped = SkipLog::default();
    // Reads a file; under `on_bad_row = "skip"` a target the task cannot encode (a
    // regression target that is not a number) is a bad row too.
    let mut read = |path: &Path| -> Result<Vec<Example>> {
        let ex = skipped.read(cfg, path, &opts)?;
        if cfg.on_bad_row == OnBadRow::Skip && cfg.problem_type == ProblemType::Regression {
            let probe = LabelMap::from_labels(vec![field.to_string()]);
            return Ok(skipped.keep_encodable(ex, path, |e| {
                task.encode_targets(&probe, std::slice::from_ref(e), path, field, sep)
            }));
        }
        Ok(ex)
    };
    let mut all_train = read(&cfg.train_file)?;
    let eval_file = match &cfg.validation_file {
        Some(vf) => Some(read(vf)?),
        None => None,
    };
    for path in std::iter::once(&cfg.train_file).chain(cfg.validation_file.as_ref()) {
        let left_out = skipped_files(path, &opts);
        if !left_out.is_empty() {
            let n: usize = left_out.iter().map(|(_, c)| c).sum();
            let kinds: Vec<String> = left_out.iter().map(|(e, c)| format!("{e} x{c}")).collect();
            skipped.notes.push(format!(
                "warning: {n} file(s) in {} skipped, their extension not in `file_extensions` \
                 ({}): {}",
                path.display(),
                cfg.file_extensions.join(", "),
                kinds.join(", ")
            ));
        }
    }
    if cfg.deduplicate {
        all_train = deduplicate(all_train, &mut skipped.notes);
    }
    // The rows left out are worth seeing even when the run then stops on bad input.
    if writes {
        skipped.write(&cfg.output_dir)?;
    }
    // split.json is written once the data and the model have been checked.
    let mut split = None;
    let (mut train, mut eval, eval_path) = match (&cfg.validation_file, eval_file) {
        (Some(vf), Some(ev)) => (all_train, ev, vf.clone()),
        _ => {
            let frac = cfg.validation_split.unwrap_or(0.2);
            let (t, e) = stratified_split(all_train, |e| task.stratum(e), frac, cfg.seed);
            split = Some(split_json(cfg, &t, &e));
            (t, e, cfg.train_file.clone())
        }
    };
    if !cfg.deduplicate {
        let seen: std::collections::HashSet<(&str, Option<&str>)> = train
            .iter()
            .map(|e| (e.text.as_str(), e.text_pair.as_deref()))
            .collect();
        let repeats = eval
            .iter()
            .filter(|e| seen.contains(&(e.text.as_str(), e.text_pair.as_deref())))
            .count();
        if repeats > 0 {
            skipped.notes.push(format!(
                "warning: {repeats} evaluation example(s) repeat a training text exactly, so \
                 evaluation overstates accuracy; `deduplicate = true` drops repeats before the \
                 split"
            ));
        }
    }
    // The label set comes from all the training data, before any sampling: a class
    // missing from the first `max_train_samples` rows is still a class.
    if train.is_empty() {
        return Err(Error::file(&cfg.train_file, "no training examples"));
    }
    let labels = task.label_map(&train, &cfg.train_file, &cfg.label_column, sep)?;
    if let Some(n) = cfg.max_train_samples {
        if split.is_some() {
            train = stratified_sample(train, |e| task.stratum(e), n);
        } else {
            train.truncate(n);
        }
    }
    if let Some(n) = cfg.max_eval_samples {
        eval.truncate(n);
    }
    if train.is_empty() {
        return Err(Error::file(&cfg.train_file, "no training examples"));
    }
    if eval.is_empty() {
        return Err(Error::file(&eval_path, "no evaluation examples"));
    }
    if cfg.problem_type != ProblemType::Regression {
        label_warnings(labels.labels(), &cfg.train_file, &mut skipped.notes);
    }
    if cfg.validation_file.is_some() && cfg.validation_split.is_some() {
        skipped.notes.push(
            "`validation_split` is ignored: `validation_file` is given and is the evaluation \
             data"
                .into(),
        );
    }
    let train_y = task.encode_targets(&labels, &train, &cfg.train_file, field, sep)?;
    let eval_y = task.encode_targets(&labels, &eval, &eval_path, field, sep)?;
    let loss = loss_config(cfg, &labels, &train_y)?;
    loss.validate()?;

    let dir = &cfg.model_name_or_path;
    let hf = HfConfig::from_dir(dir)?;
    let family = families::family(&hf)?;
    let max_tokens = family.max_tokens(&hf)?;
    let images = family.input() == InputKind::Image;
    if cfg.mixing() && !images {
        return Err(Error::Config(format!(
            "`mixup_alpha` / `cutmix_alpha` blend images; {} reads text",
            dir.display()
        )));
    }
    if cfg.image_column.is_some() && !images {
        return Err(Error::Config(format!(
            "`image_column` is for image models; {} reads text (use `text_column`)",
            dir.display()
        )));
    }
    if !images && cfg.max_seq_length > max_tokens {
        return Err(Error::Config(format!(
            "`max_seq_length` {} exceeds the model's {max_tokens} positions",
            cfg.max_seq_length
        )));
    }
    let head = HeadSpec {
        num_labels: labels.len(),
        pooling: cfg.pooling,
        hidden_dropout: cfg.hidden_dropout_prob,
        attention_dropout: cfg.attention_probs_dropout_prob,
        classifier_dropout: cfg.classifier_dropout,
    };
    families::pooling(family, &head)?;
    let encoder = encoder_for(family, &hf, dir, cfg.max_seq_length, &image_recipe(cfg))?;
    // With `lora_r`, the model is built with adapters (see `nn::lora`).
    let lora = cfg.lora_spec(&hf.model_type, !labels.is_empty())?;
    let loaded = crate::nn::lora::build(lora.as_ref(), || {
        families::load_weights(&hf, family, dir, &head, cfg.seed, device)
    })?;
    let mut notes = skipped.notes.clone();
    notes.extend(lora_note(&loaded.params));
    notes.extend(loaded.notes);
    let skip = cfg.on_bad_row == OnBadRow::Skip;
    if loaded.new_head {
        notes.push(format!(
            "a new head with {} outputs is initialised",
            labels.len()
        ));
    }
    let (train_what, eval_what) = if images {
        ("decode train images", "decode eval images")
    } else {
        ("tokenize train", "tokenize eval")
    };
    // Under `on_bad_row = "skip"`, examples that did not encode (images that do not
    // decode) are left out with their targets, and listed in skipped_rows.jsonl.
    let train_enc = encode(encoder.as_ref(), &train, train_what, progress, skip)?;
    let eval_enc = encode(encoder.as_ref(), &eval, eval_what, progress, skip)?;
    let (train, train_f, train_y) =
        skipped.keep_encoded(train, train_enc, train_y, &cfg.train_file, &mut notes);
    let (eval, eval_f, eval_y) =
        skipped.keep_encoded(eval, eval_enc, eval_y, &eval_path, &mut notes);
    if train.is_empty() {
        return Err(Error::file(
            &cfg.train_file,
            "no training examples could be read",
        ));
    }
    if eval.is_empty() {
        return Err(Error::file(
            &eval_path,
            "no evaluation examples could be read",
        ));
    }
    if writes && !skipped.rows.is_empty() {
        skipped.write(&cfg.output_dir)?;
    }
    if let Some(text) = split.filter(|_| writes) {
        let p = cfg.output_dir.join("split.json");
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
    }
    Ok(Prepared {
        cfg: cfg.clone(),
        hf,
        family,
        model: loaded.model,
        params: loaded.params,
        encoder,
        labels,
        train: (train_f, train_y),
        train_ids: train.iter().map(|e| e.id.clone()).collect(),
        eval: (eval_f, eval_y),
        eval_rows: eval.iter().map(HeldOut::of).collect(),
        loss,
        notes,
    })
}

/// The recipe's image settings.
pub fn image_recipe(cfg: &TrainConfig) -> ImageRecipe {
    ImageRecipe {
        size: cfg.image_size,
        train: cfg.train_transforms.clone(),
        eval: cfg.eval_transforms.clone(),
        mean: cfg.image_mean,
        std: cfg.image_std,
    }
}
