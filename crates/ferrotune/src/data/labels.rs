//! The mapping between label names and class ids.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use crate::data::reader::{Example, RawLabel};
use crate::error::{Error, Result};

/// The classes of a classification task, in id order (class id `i` is `labels()[i]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMap {
    labels: Vec<String>,
    ids: HashMap<String, usize>,
}

impl LabelMap {
    /// The classes found in the training data, sorted: numerically if every label
    /// parses as an integer (`2` before `10`; equal numbers such as `1` and `01` are
    /// ordered as text), otherwise lexicographically by their UTF-8 bytes, as Hugging
    /// Face's `run_glue` does. Each element of a [`RawLabel::List`] counts as a label;
    /// examples without a label are ignored.
    ///
    /// # Errors
    ///
    /// An error naming `path` (the training data) if there are no labels, or fewer
    /// than 2 distinct ones.
    pub fn from_examples(examples: &[Example], path: &Path) -> Result<LabelMap> {
        let mut set = BTreeSet::new();
        for ex in examples {
            match &ex.label {
                Some(RawLabel::Text(l)) => {
                    set.insert(l.as_str());
                }
                Some(RawLabel::List(ls)) => set.extend(ls.iter().map(String::as_str)),
                None => {}
            }
        }
        let mut labels: Vec<String> = set.into_iter().map(str::to_string).collect();
        match labels.as_slice() {
            [] => return Err(Error::file(path, "no labels in the training data")),
            [only] => {
                return Err(Error::file(
                    path,
                    format!(
                        "classification needs at least 2 classes, but every label in the \
                         training data is `{only}`"
                    ),
                ))
            }
            _ => {}
        }
        let numbers: Option<Vec<i128>> = labels.iter().map(|l| l.parse().ok()).collect();
        if let Some(numbers) = numbers {
            let mut pairs: Vec<(i128, String)> = numbers.into_iter().zip(labels).collect();
            pairs.sort();
            labels = pairs.into_iter().map(|(_, l)| l).collect();
        }
        Ok(LabelMap::from_labels(labels))
    }

    /// A map with the given labels in the given order (for example, as saved with a
    /// fine-tuned model). If a label appears twice, [`LabelMap::id`] returns its first
    /// position.
    pub fn from_labels(labels: Vec<String>) -> LabelMap {
        let mut ids = HashMap::with_capacity(labels.len());
        for (i, l) in labels.iter().enumerate() {
            ids.entry(l.clone()).or_insert(i);
        }
        LabelMap { labels, ids }
    }

    /// The number of classes.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no classes.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The class names in id order.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// The id of `label`, if it is one of the classes.
    pub fn id(&self, label: &str) -> Option<usize> {
        self.ids.get(label).copied()
    }

    /// The name of class `id`, or `"<unknown>"` if `id` is out of range (which would
    /// mean a model whose output size does not match its label list).
    pub fn name(&self, id: usize) -> &str {
        self.labels.get(id).map_or("<unknown>", String::as_str)
    }

    /// The class id of a single-label example. `path` is the file the example came
    /// from and `field` the label column, for error messages.
    ///
    /// # Errors
    ///
    /// An error at the example's line (or naming its file, for the directory layout)
    /// if it has no label, has a list of labels, or has a label not in this map.
    pub fn encode(&self, ex: &Example, path: &Path, field: &str) -> Result<usize> {
        match &ex.label {
            Some(RawLabel::Text(l)) => self.lookup(l, ex, path, field),
            Some(RawLabel::List(ls)) => Err(at(
                ex,
                path,
                field,
                format!(
                    "expected one label, found a list of {} (is this a multi-label task?)",
                    ls.len()
                ),
            )),
            None => Err(at(ex, path, field, "missing label".to_string())),
        }
    }

    /// The class ids of a multi-label example, sorted and without repeats: a
    /// [`RawLabel::Text`] is one label (it is not split), a [`RawLabel::List`] is each of
    /// its elements (possibly none). `path` and `field` are for error messages.
    ///
    /// # Errors
    ///
    /// As for [`LabelMap::encode`], except that lists are accepted.
    pub fn encode_multi(&self, ex: &Example, path: &Path, field: &str) -> Result<Vec<usize>> {
        let mut ids = match &ex.label {
            Some(RawLabel::Text(l)) => vec![self.lookup(l, ex, path, field)?],
            Some(RawLabel::List(ls)) => ls
                .iter()
                .map(|l| self.lookup(l, ex, path, field))
                .collect::<Result<Vec<_>>>()?,
            None => return Err(at(ex, path, field, "missing label".to_string())),
        };
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    fn lookup(&self, label: &str, ex: &Example, path: &Path, field: &str) -> Result<usize> {
        self.id(label).ok_or_else(|| {
            const SHOWN: usize = 20;
            let mut known = self
                .labels
                .iter()
                .take(SHOWN)
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            if self.labels.len() > SHOWN {
                known.push_str(&format!(", ... ({} more)", self.labels.len() - SHOWN));
            }
            at(
                ex,
                path,
                field,
                format!(
                    "label `{label}` does not appear in the training data (known labels: {known})"
                ),
            )
        })
    }
}

/// An error about example `ex` of `path`: at its line, or, for the directory layout
/// (line 0), naming its file `path/id`.
fn at(ex: &Example, path: &Path, field: &str, msg: String) -> Error {
    if ex.line > 0 {
        Error::at(path, Some(ex.line), Some(field), msg)
    } else {
        Error::at(path.join(&ex.id), None, Some(field), msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(line: usize, id: &str, label: Option<RawLabel>) -> Example {
        Example {
            id: id.to_string(),
            line,
            text: String::new(),
            text_pair: None,
            label,
        }
    }

    fn text(line: usize, l: &str) -> Example {
        ex(
            line,
            &format!("line {line}"),
            Some(RawLabel::Text(l.to_string())),
        )
    }

    fn list(line: usize, ls: &[&str]) -> Example {
        let ls = ls.iter().map(|s| s.to_string()).collect();
        ex(line, &format!("line {line}"), Some(RawLabel::List(ls)))
    }

    fn from(labels: &[&str]) -> Result<LabelMap> {
        let examples: Vec<Example> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| text(i + 2, l))
            .collect();
        LabelMap::from_examples(&examples, Path::new("train.csv"))
    }

    #[test]
    fn numeric_labels_sort_numerically() {
        let m = from(&["10", "2", "-1", "2", "01", "1"]).unwrap();
        assert_eq!(m.labels(), ["-1", "01", "1", "2", "10"]);
        assert_eq!(m.id("10"), Some(4));
    }

    #[test]
    fn other_labels_sort_lexicographically() {
        let m = from(&["neutral", "positive", "negative", "10", "2"]).unwrap();
        assert_eq!(m.labels(), ["10", "2", "negative", "neutral", "positive"]);
        assert_eq!(m.len(), 5);
        assert!(!m.is_empty());
        assert_eq!(m.name(2), "negative");
        assert_eq!(m.name(99), "<unknown>");
        assert_eq!(m.id("x"), None);
    }

    #[test]
    fn list_labels_contribute_each_element() {
        let examples = [
            list(1, &["b", "c"]),
            list(2, &[]),
            text(3, "a"),
            ex(4, "x", None),
        ];
        let m = LabelMap::from_examples(&examples, Path::new("t.jsonl")).unwrap();
        assert_eq!(m.labels(), ["a", "b", "c"]);
    }

    #[test]
    fn too_few_labels() {
        let err = from(&[]).unwrap_err().to_string();
        assert_eq!(err, "train.csv: no labels in the training data");
        let err = from(&["x", "x"]).unwrap_err().to_string();
        assert!(
            err.starts_with("train.csv: classification needs at least 2 classes"),
            "{err}"
        );
        assert!(err.contains("`x`"), "{err}");
    }

    #[test]
    fn encode_single() {
        let m = from(&["a", "b", "c"]).unwrap();
        let p = Path::new("eval.csv");
        assert_eq!(m.encode(&text(5, "b"), p, "label").unwrap(), 1);
        let err = m
            .encode(&text(7, "xyz"), p, "label")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "eval.csv:7: field `label`: label `xyz` does not appear in the training data \
             (known labels: a, b, c)"
        );
        let err = m
            .encode(&list(8, &["a"]), p, "label")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("eval.csv:8: field `label`: expected one label"),
            "{err}"
        );
        let err = m
            .encode(&ex(9, "line 9", None), p, "label")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "eval.csv:9: field `label`: missing label");
    }

    #[test]
    fn unseen_label_in_directory_names_the_file() {
        let m = from(&["a", "b"]).unwrap();
        let e = ex(0, "tech/001.txt", Some(RawLabel::Text("tech".into())));
        let err = m
            .encode(&e, Path::new("bbc"), "label")
            .unwrap_err()
            .to_string();
        let file = Path::new("bbc").join("tech/001.txt");
        assert_eq!(
            err,
            format!(
                "{}: field `label`: label `tech` does not appear in the training data \
                 (known labels: a, b)",
                file.display()
            )
        );
    }

    #[test]
    fn long_label_lists_are_shortened() {
        let names: Vec<String> = (0..25).map(|i| i.to_string()).collect();
        let m = LabelMap::from_labels(names);
        let err = m
            .encode(&text(2, "x"), Path::new("e.csv"), "y")
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("(known labels: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, ... (5 more))"), "{err}");
    }

    #[test]
    fn encode_multi() {
        let m = LabelMap::from_labels(vec!["x".into(), "y".into(), "z".into()]);
        let p = Path::new("d.jsonl");
        assert_eq!(
            m.encode_multi(&list(1, &["z", "x", "z"]), p, "l").unwrap(),
            [0, 2]
        );
        assert_eq!(
            m.encode_multi(&list(1, &[]), p, "l").unwrap(),
            Vec::<usize>::new()
        );
        assert_eq!(m.encode_multi(&text(1, "y"), p, "l").unwrap(), [1]);
        assert_eq!(
            m.encode_multi(&text(1, "x,y"), p, "l")
                .unwrap_err()
                .to_string(),
            "d.jsonl:1: field `l`: label `x,y` does not appear in the training data \
             (known labels: x, y, z)"
        );
        let err = m
            .encode_multi(&list(3, &["x", "w"]), p, "l")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("d.jsonl:3: field `l`: label `w` does not"),
            "{err}"
        );
        let err = m
            .encode_multi(&ex(4, "line 4", None), p, "l")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "d.jsonl:4: field `l`: missing label");
    }

    #[test]
    fn from_labels_keeps_order() {
        let m = LabelMap::from_labels(vec!["b".into(), "a".into(), "b".into()]);
        assert_eq!(m.labels(), ["b", "a", "b"]);
        assert_eq!(m.id("b"), Some(0));
        assert!(LabelMap::from_labels(vec![]).is_empty());
    }
}
