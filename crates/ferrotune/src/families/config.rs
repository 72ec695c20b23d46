//! A model directory's `config.json`, read with clear errors. Only the fields every family
//! shares are read here (`model_type`, labels, `problem_type`); each family parses its own
//! fields from [`HfConfig::raw`] with [`HfConfig::parse`]. The whole object is kept so the
//! exporter can write back what ferrotune did not interpret.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// The family-independent part of a `config.json`.
#[derive(Debug, Clone)]
pub struct HfConfig {
    /// `bert`, `roberta`, ... (see [`crate::families::FAMILIES`]).
    pub model_type: String,
    /// Labels of a fine-tuned checkpoint (`id2label`).
    pub id2label: Option<BTreeMap<String, String>>,
    /// `single_label_classification`, `multi_label_classification` or `regression`.
    pub problem_type: Option<String>,
    /// The whole object as read.
    pub raw: serde_json::Map<String, serde_json::Value>,
    /// The file it was read from (for messages).
    pub path: PathBuf,
}

impl HfConfig {
    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("config.json"))
    }

    /// Reads a `config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let raw: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::at(path, Some(e.line()), None, format!("invalid JSON: {e}")))?;
        let serde_json::Value::Object(raw) = raw else {
            return Err(Error::file(path, "expected a JSON object"));
        };
        Self::from_object(raw, path)
    }

    /// The config of a JSON object (read from `path`, for messages).
    pub fn from_object(
        raw: serde_json::Map<String, serde_json::Value>,
        path: &Path,
    ) -> Result<Self> {
        // timm's hub configs name the model by `architecture` and have no `model_type`.
        let model_type = match (raw.get("model_type"), raw.get("architecture")) {
            (Some(serde_json::Value::String(t)), _) => t.clone(),
            (Some(_), _) => return Err(Error::at(path, None, Some("model_type"), "not a string")),
            (None, Some(serde_json::Value::String(a))) => a.clone(),
            (None, Some(_)) => {
                return Err(Error::at(path, None, Some("architecture"), "not a string"))
            }
            (None, None) => {
                return Err(Error::at(
                    path,
                    None,
                    Some("model_type"),
                    "missing (and no timm `architecture`)",
                ))
            }
        };
        let field = |k: &str| -> Result<Option<serde_json::Value>> {
            match raw.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => Ok(Some(v.clone())),
            }
        };
        let id2label = field("id2label")?
            .map(|v| {
                serde_json::from_value(v)
                    .map_err(|e| Error::at(path, None, Some("id2label"), format!("{e}")))
            })
            .transpose()?;
        let problem_type = match field("problem_type")? {
            None => None,
            Some(serde_json::Value::String(s)) => Some(s),
            Some(_) => return Err(Error::at(path, None, Some("problem_type"), "not a string")),
        };
        Ok(HfConfig {
            model_type,
            id2label,
            problem_type,
            raw,
            path: path.to_path_buf(),
        })
    }

    /// The family's own fields, deserialized from the whole object; an error names the
    /// file and, where serde says, the field.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(serde_json::Value::Object(self.raw.clone())).map_err(|e| {
            let msg = e.to_string();
            // serde's "missing field `x`" / "invalid type ... at line" → name the field.
            let field = msg
                .split('`')
                .nth(1)
                .filter(|_| msg.starts_with("missing field"))
                .map(str::to_string);
            match field {
                Some(f) => Error::at(&self.path, None, Some(&f), "missing"),
                None => Error::file(&self.path, msg),
            }
        })
    }

    /// The labels of a fine-tuned checkpoint, in id order, if it has them.
    pub fn labels(&self) -> Option<Vec<String>> {
        // timm writes `label_names`, a list in class order.
        if let Some(names) = self.raw.get("label_names").and_then(|v| v.as_array()) {
            let names: Option<Vec<String>> = names
                .iter()
                .map(|n| n.as_str().map(str::to_string))
                .collect();
            if let Some(names) = names.filter(|n| !n.is_empty()) {
                return Some(names);
            }
        }
        let map = self.id2label.as_ref()?;
        let mut pairs: Vec<(usize, String)> = map
            .iter()
            .filter_map(|(k, v)| k.parse::<usize>().ok().map(|k| (k, v.clone())))
            .collect();
        pairs.sort();
        if pairs.iter().enumerate().all(|(i, (k, _))| i == *k) && !pairs.is_empty() {
            Some(pairs.into_iter().map(|(_, v)| v).collect())
        } else {
            None
        }
    }

    /// The `architectures[0]` of the file, if any.
    pub fn architecture(&self) -> Option<&str> {
        self.raw
            .get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|a| a.as_str())
    }
}
