//! Classification, multi-label and regression metrics.
//!
//! Every definition matches scikit-learn's (and, for correlations, SciPy's) defaults, so
//! that numbers reported by ferrotune can be compared with numbers from the Python
//! ecosystem. Where those libraries would return `NaN` or warn (a ratio whose denominator
//! is zero, a correlation with a constant input, an empty input), these functions return
//! `0.0`, which is scikit-learn's `zero_division=0` convention.
//!
//! Notation used in the formulas below, for a class (or label) `c`:
//!
//! * `TP_c` — samples whose gold label is `c` and whose prediction is `c`;
//! * `P_c` — samples predicted as `c` (`TP_c` plus false positives);
//! * `T_c` — samples whose gold label is `c` (`TP_c` plus false negatives), the *support*;
//! * `safe_div(a, b)` — `a / b`, or `0` when `b = 0`.
//!
//! The test module checks the results against reference values produced by
//! scikit-learn and SciPy with the script `metrics_reference.py` beside this file.

use serde::{Deserialize, Serialize};

/// Divides `num` by `den`, returning `0.0` when `den` is zero (scikit-learn's
/// `zero_division=0`).
fn safe_div(num: f64, den: f64) -> f64 {
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// Arithmetic mean of `values`, `0.0` for an empty slice.
fn mean(values: &[f64]) -> f64 {
    safe_div(values.iter().sum(), values.len() as f64)
}

/// Precision, recall and F1 of one class from its counts.
///
/// `precision = safe_div(TP, P)`, `recall = safe_div(TP, T)` and
/// `F1 = safe_div(2·TP, T + P)`, which equals `2·precision·recall / (precision + recall)`
/// and is how scikit-learn computes it.
fn prf(tp: u64, pred: u64, truth: u64) -> (f64, f64, f64) {
    let (tp, pred, truth) = (tp as f64, pred as f64, truth as f64);
    (
        safe_div(tp, pred),
        safe_div(tp, truth),
        safe_div(2.0 * tp, truth + pred),
    )
}

/// Precision, recall, F1 and support of one class (or of one label, in multi-label
/// classification).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassStats {
    /// Index of the class (or label) these numbers are about.
    pub label_id: usize,
    /// `safe_div(TP_c, P_c)`: the share of the samples predicted as `c` that are `c`.
    pub precision: f64,
    /// `safe_div(TP_c, T_c)`: the share of the samples of class `c` predicted as `c`.
    pub recall: f64,
    /// `safe_div(2·TP_c, T_c + P_c)`, the harmonic mean of precision and recall.
    pub f1: f64,
    /// `T_c`: the number of samples whose gold label is `c`.
    pub support: usize,
}

/// Builds the per-class statistics from per-class counts.
fn class_stats(tp: &[u64], pred: &[u64], truth: &[u64]) -> Vec<ClassStats> {
    tp.iter()
        .zip(pred)
        .zip(truth)
        .enumerate()
        .map(|(label_id, ((&tp, &pred), &truth))| {
            let (precision, recall, f1) = prf(tp, pred, truth);
            ClassStats {
                label_id,
                precision,
                recall,
                f1,
                support: truth as usize,
            }
        })
        .collect()
}

/// Macro averages `(precision, recall, F1)`: unweighted means of the per-class values.
fn macro_avg(stats: &[ClassStats]) -> (f64, f64, f64) {
    let p: Vec<f64> = stats.iter().map(|s| s.precision).collect();
    let r: Vec<f64> = stats.iter().map(|s| s.recall).collect();
    let f: Vec<f64> = stats.iter().map(|s| s.f1).collect();
    (mean(&p), mean(&r), mean(&f))
}

/// Micro averages `(precision, recall, F1)`: the per-class formulas applied to the
/// counts summed over classes.
fn micro_avg(tp: &[u64], pred: &[u64], truth: &[u64]) -> (f64, f64, f64) {
    prf(tp.iter().sum(), pred.iter().sum(), truth.iter().sum())
}

/// Report of a single-label classification run, as returned by
/// [`classification_report`].
///
/// All averages are over the `num_classes` classes `0..num_classes`, including classes
/// that never occur among the gold labels or the predictions (scikit-learn's behaviour
/// when `labels=range(num_classes)` is passed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassificationReport {
    /// `(number of samples with prediction = gold label) / N`, with `N` the number of
    /// samples.
    pub accuracy: f64,
    /// `Σ_c precision_c / K` over the `K = num_classes` classes.
    pub macro_precision: f64,
    /// `Σ_c recall_c / K`.
    pub macro_recall: f64,
    /// `Σ_c F1_c / K` (the mean of the per-class F1 scores, not the F1 of the macro
    /// precision and recall).
    pub macro_f1: f64,
    /// `safe_div(Σ_c TP_c, Σ_c P_c)`; equal to the accuracy when every prediction and
    /// gold label is a valid class.
    pub micro_precision: f64,
    /// `safe_div(Σ_c TP_c, Σ_c T_c)`.
    pub micro_recall: f64,
    /// `safe_div(2·Σ_c TP_c, Σ_c T_c + Σ_c P_c)`.
    pub micro_f1: f64,
    /// `safe_div(Σ_c T_c·precision_c, Σ_c T_c)`: precision averaged with the support as
    /// weight.
    pub weighted_precision: f64,
    /// `safe_div(Σ_c T_c·recall_c, Σ_c T_c)`.
    pub weighted_recall: f64,
    /// `safe_div(Σ_c T_c·F1_c, Σ_c T_c)`.
    pub weighted_f1: f64,
    /// Matthews correlation coefficient, multi-class form (Gorodkin's R_K), computed from
    /// the confusion matrix `C` with `t_k = Σ_j C[k][j]`, `p_k = Σ_i C[i][k]`,
    /// `c = Σ_k C[k][k]` and `s = Σ_k p_k`:
    ///
    /// `MCC = (c·s − Σ_k t_k·p_k) / sqrt((s² − Σ_k p_k²)·(s² − Σ_k t_k²))`,
    ///
    /// and `0` when the denominator is zero (e.g. when every sample is predicted as the
    /// same class). Ranges from −1 to 1; 0 is chance level.
    pub mcc: f64,
    /// Statistics of each class `0..num_classes`, in class order.
    pub per_class: Vec<ClassStats>,
    /// Confusion matrix, `num_classes × num_classes`: `confusion[t][p]` counts the
    /// samples with gold label `t` predicted as `p`.
    pub confusion: Vec<Vec<u64>>,
}

/// Scores single-label predictions against gold labels.
///
/// `preds[i]` and `labels[i]` are the predicted and gold class of sample `i`, each in
/// `0..num_classes`. See the fields of [`ClassificationReport`] for the formulas, which
/// are those of scikit-learn's `accuracy_score`, `precision_recall_fscore_support`
/// (with `labels=range(num_classes)`, `zero_division=0`), `matthews_corrcoef` and
/// `confusion_matrix`.
///
/// Edge cases, none of which panics:
///
/// * empty input: every score is `0.0` and the confusion matrix is all zeros;
/// * slices of different lengths: the extra tail of the longer one is ignored;
/// * a class index `>= num_classes` belongs to no class: the pair counts in `N` for the
///   accuracy, a valid gold label with an invalid prediction is a false negative of its
///   class and a valid prediction with an invalid gold label is a false positive (as
///   scikit-learn does with an explicit `labels` list), and the pair is left out of the
///   confusion matrix and so out of the MCC.
pub fn classification_report(
    preds: &[usize],
    labels: &[usize],
    num_classes: usize,
) -> ClassificationReport {
    let n = preds.len().min(labels.len());
    let mut confusion = vec![vec![0u64; num_classes]; num_classes];
    let mut tp = vec![0u64; num_classes];
    let mut pred_sum = vec![0u64; num_classes];
    let mut true_sum = vec![0u64; num_classes];
    let mut correct = 0u64;
    for (&p, &t) in preds.iter().zip(labels) {
        if p == t {
            correct += 1;
        }
        if p < num_classes {
            pred_sum[p] += 1;
        }
        if t < num_classes {
            true_sum[t] += 1;
            if p < num_classes {
                confusion[t][p] += 1;
                if p == t {
                    tp[t] += 1;
                }
            }
        }
    }

    let per_class = class_stats(&tp, &pred_sum, &true_sum);
    let (macro_precision, macro_recall, macro_f1) = macro_avg(&per_class);
    let (micro_precision, micro_recall, micro_f1) = micro_avg(&tp, &pred_sum, &true_sum);

    let total_support: f64 = true_sum.iter().map(|&s| s as f64).sum();
    let weighted = |value: fn(&ClassStats) -> f64| -> f64 {
        let num: f64 = per_class.iter().map(|s| value(s) * s.support as f64).sum();
        safe_div(num, total_support)
    };

    ClassificationReport {
        accuracy: safe_div(correct as f64, n as f64),
        macro_precision,
        macro_recall,
        macro_f1,
        micro_precision,
        micro_recall,
        micro_f1,
        weighted_precision: weighted(|s| s.precision),
        weighted_recall: weighted(|s| s.recall),
        weighted_f1: weighted(|s| s.f1),
        mcc: matthews_corrcoef(&confusion),
        per_class,
        confusion,
    }
}

/// Multi-class Matthews correlation coefficient of a square confusion matrix, computed
/// in the same order as scikit-learn's `matthews_corrcoef`.
fn matthews_corrcoef(confusion: &[Vec<u64>]) -> f64 {
    let k = confusion.len();
    let t_sum: Vec<f64> = confusion
        .iter()
        .map(|row| row.iter().map(|&v| v as f64).sum())
        .collect();
    let p_sum: Vec<f64> = (0..k)
        .map(|j| confusion.iter().map(|row| row[j] as f64).sum())
        .collect();
    let n_correct: f64 = (0..k).map(|i| confusion[i][i] as f64).sum();
    let n_samples: f64 = p_sum.iter().sum();
    let dot = |a: &[f64], b: &[f64]| -> f64 { a.iter().zip(b).map(|(x, y)| x * y).sum() };
    let cov_ytyp = n_correct * n_samples - dot(&t_sum, &p_sum);
    let cov_ypyp = n_samples * n_samples - dot(&p_sum, &p_sum);
    let cov_ytyt = n_samples * n_samples - dot(&t_sum, &t_sum);
    let denom = cov_ypyp * cov_ytyt;
    if denom == 0.0 {
        0.0
    } else {
        cov_ytyp / denom.sqrt()
    }
}

/// Display name of class `i`: `names[i]`, or the index itself when `names` is too short.
fn class_name(names: &[String], i: usize) -> String {
    names.get(i).cloned().unwrap_or_else(|| i.to_string())
}

/// Quotes a CSV field when it holds a comma, a double quote or a line break (RFC 4180),
/// doubling any double quote inside it.
fn csv_field(field: &str) -> String {
    if field.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_string()
    }
}

impl ClassificationReport {
    /// Renders the confusion matrix as CSV, one row per gold class and one column per
    /// predicted class.
    ///
    /// The header is an empty cell followed by `pred_<name>` for each class; each row
    /// starts with `true_<name>` followed by the counts `confusion[t][p]`. Lines end with
    /// `\n`, including the last. `names[i]` names class `i`; classes past the end of
    /// `names` are named by their index. Fields holding a comma, quote or line break are
    /// quoted as RFC 4180 requires.
    pub fn confusion_csv(&self, names: &[String]) -> String {
        let k = self.confusion.len();
        let mut out = String::new();
        for p in 0..k {
            out.push(',');
            out.push_str(&csv_field(&format!("pred_{}", class_name(names, p))));
        }
        out.push('\n');
        for (t, row) in self.confusion.iter().enumerate() {
            out.push_str(&csv_field(&format!("true_{}", class_name(names, t))));
            for count in row {
                out.push(',');
                out.push_str(&count.to_string());
            }
            out.push('\n');
        }
        out
    }

    /// Renders a human-readable table laid out like scikit-learn's
    /// `classification_report` (with `digits=4`): one row per class with precision,
    /// recall, F1 and support, then the accuracy, the macro average and the
    /// support-weighted average, followed by a line with the MCC.
    ///
    /// `names[i]` names class `i`; classes past the end of `names` are named by their
    /// index.
    pub fn per_class_table(&self, names: &[String]) -> String {
        const DIGITS: usize = 4;
        let row_names: Vec<String> = self
            .per_class
            .iter()
            .map(|s| class_name(names, s.label_id))
            .collect();
        let width = row_names
            .iter()
            .map(|n| n.chars().count())
            .chain(["weighted avg".len(), DIGITS])
            .max()
            .unwrap_or(DIGITS);
        let total_support: usize = self.per_class.iter().map(|s| s.support).sum();
        let row = |name: &str, p: f64, r: f64, f: f64, support: usize| -> String {
            format!("{name:>width$}  {p:>9.DIGITS$} {r:>9.DIGITS$} {f:>9.DIGITS$} {support:>9}\n")
        };

        let mut out = format!(
            "{:>width$}  {:>9} {:>9} {:>9} {:>9}\n\n",
            "", "precision", "recall", "f1-score", "support"
        );
        for (name, s) in row_names.iter().zip(&self.per_class) {
            out.push_str(&row(name, s.precision, s.recall, s.f1, s.support));
        }
        out.push('\n');
        out.push_str(&format!(
            "{:>width$}  {:>9} {:>9} {:>9.DIGITS$} {:>9}\n",
            "accuracy", "", "", self.accuracy, total_support
        ));
        out.push_str(&row(
            "macro avg",
            self.macro_precision,
            self.macro_recall,
            self.macro_f1,
            total_support,
        ));
        out.push_str(&row(
            "weighted avg",
            self.weighted_precision,
            self.weighted_recall,
            self.weighted_f1,
            total_support,
        ));
        out.push_str(&format!(
            "\n{:>width$}  {:>9} {:>9} {:>9.DIGITS$}\n",
            "mcc", "", "", self.mcc
        ));
        out
    }
}

/// Report of a multi-label classification run, as returned by [`multilabel_report`].
///
/// Each sample has a set of labels, encoded as one boolean per label. Counts are taken
/// per label over all samples: `TP_l` samples have label `l` in both the prediction and
/// the gold set, `P_l` have it predicted and `T_l` have it in the gold set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MultiLabelReport {
    /// Share of the samples whose predicted label set equals the gold set exactly
    /// (scikit-learn's `accuracy_score` on indicator matrices).
    pub subset_accuracy: f64,
    /// `safe_div(2·Σ_l TP_l, Σ_l T_l + Σ_l P_l)`.
    pub micro_f1: f64,
    /// `Σ_l F1_l / L` over all `L` labels, including labels with no support.
    pub macro_f1: f64,
    /// `safe_div(Σ_l TP_l, Σ_l P_l)`.
    pub micro_precision: f64,
    /// `safe_div(Σ_l TP_l, Σ_l T_l)`.
    pub micro_recall: f64,
    /// `Σ_l precision_l / L`.
    pub macro_precision: f64,
    /// `Σ_l recall_l / L`.
    pub macro_recall: f64,
    /// Statistics of each label `0..L`, in label order.
    pub per_label: Vec<ClassStats>,
}

/// Scores multi-label predictions against gold label sets.
///
/// `preds[i][l]` tells whether label `l` is predicted for sample `i`, `labels[i][l]`
/// whether it is in the gold set. Definitions are scikit-learn's for indicator
/// matrices with `zero_division=0`: see [`MultiLabelReport`].
///
/// Edge cases, none of which panics: empty input gives all zeros and no labels; with
/// outer slices of different lengths the extra samples of the longer one are ignored;
/// the number of labels `L` is the longest row of either input, and shorter rows are
/// read as `false` past their end.
pub fn multilabel_report(preds: &[Vec<bool>], labels: &[Vec<bool>]) -> MultiLabelReport {
    let n = preds.len().min(labels.len());
    let num_labels = preds[..n]
        .iter()
        .chain(&labels[..n])
        .map(Vec::len)
        .max()
        .unwrap_or(0);
    let mut tp = vec![0u64; num_labels];
    let mut pred_sum = vec![0u64; num_labels];
    let mut true_sum = vec![0u64; num_labels];
    let mut exact = 0u64;
    for (p_row, t_row) in preds.iter().zip(labels) {
        let mut all_equal = true;
        for l in 0..num_labels {
            let p = p_row.get(l).copied().unwrap_or(false);
            let t = t_row.get(l).copied().unwrap_or(false);
            pred_sum[l] += u64::from(p);
            true_sum[l] += u64::from(t);
            tp[l] += u64::from(p && t);
            all_equal &= p == t;
        }
        exact += u64::from(all_equal);
    }

    let per_label = class_stats(&tp, &pred_sum, &true_sum);
    let (macro_precision, macro_recall, macro_f1) = macro_avg(&per_label);
    let (micro_precision, micro_recall, micro_f1) = micro_avg(&tp, &pred_sum, &true_sum);
    MultiLabelReport {
        subset_accuracy: safe_div(exact as f64, n as f64),
        micro_f1,
        macro_f1,
        micro_precision,
        micro_recall,
        macro_precision,
        macro_recall,
        per_label,
    }
}

/// Report of a regression run, as returned by [`regression_report`].
///
/// In the formulas, `ŷ_i` are the predictions, `y_i` the targets, `N` the number of
/// samples and `ȳ` the mean target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegressionReport {
    /// Mean squared error, `Σ_i (ŷ_i − y_i)² / N`.
    pub mse: f64,
    /// Mean absolute error, `Σ_i |ŷ_i − y_i| / N`.
    pub mae: f64,
    /// Root mean squared error, `sqrt(mse)`.
    pub rmse: f64,
    /// Coefficient of determination (scikit-learn's `r2_score`),
    /// `1 − Σ_i (y_i − ŷ_i)² / Σ_i (y_i − ȳ)²`. When the targets are constant
    /// (denominator zero) it is `1` for a perfect prediction and `0` otherwise; it is
    /// `0` with fewer than two samples. It can be negative: a model worse than always
    /// predicting `ȳ`.
    pub r2: f64,
    /// Pearson's correlation coefficient (SciPy's `pearsonr`),
    /// `Σ_i (ŷ_i − mean ŷ)(y_i − ȳ) / sqrt(Σ_i (ŷ_i − mean ŷ)² · Σ_i (y_i − ȳ)²)`,
    /// clipped to `[−1, 1]`; `0` when either input is constant or has fewer than two
    /// samples.
    pub pearson: f64,
    /// Spearman's rank correlation coefficient (SciPy's `spearmanr`): Pearson's
    /// coefficient of the ranks of `ŷ` and of `y`, where tied values share the average
    /// of the ranks they span; `0` when either input is constant.
    pub spearman: f64,
}

/// Scores real-valued predictions against targets.
///
/// See [`RegressionReport`] for the formulas. Edge cases, none of which panics: empty
/// input gives all zeros; with slices of different lengths the extra tail of the longer
/// one is ignored. Non-finite inputs (NaN, infinities) are not valid and propagate into
/// the results.
pub fn regression_report(preds: &[f64], targets: &[f64]) -> RegressionReport {
    let n = preds.len().min(targets.len());
    let (preds, targets) = (&preds[..n], &targets[..n]);
    if n == 0 {
        return RegressionReport {
            mse: 0.0,
            mae: 0.0,
            rmse: 0.0,
            r2: 0.0,
            pearson: 0.0,
            spearman: 0.0,
        };
    }
    let nf = n as f64;
    let sq_err: f64 = preds
        .iter()
        .zip(targets)
        .map(|(p, t)| (t - p) * (t - p))
        .sum();
    let abs_err: f64 = preds.iter().zip(targets).map(|(p, t)| (t - p).abs()).sum();
    let mse = sq_err / nf;
    let target_mean = targets.iter().sum::<f64>() / nf;
    let ss_tot: f64 = targets
        .iter()
        .map(|t| (t - target_mean) * (t - target_mean))
        .sum();
    let r2 = if n < 2 {
        0.0
    } else if ss_tot != 0.0 {
        1.0 - sq_err / ss_tot
    } else if sq_err == 0.0 {
        1.0
    } else {
        0.0
    };
    RegressionReport {
        mse,
        mae: abs_err / nf,
        rmse: mse.sqrt(),
        r2,
        pearson: pearson(preds, targets),
        spearman: pearson(&average_ranks(preds), &average_ranks(targets)),
    }
}

/// Pearson's correlation of two equally long slices, computed as SciPy's `pearsonr`
/// does (centre, scale by the largest deviation, normalise, dot product, clip).
/// Returns `0.0` for fewer than two samples or a constant input.
fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let is_constant = |v: &[f64]| v.iter().all(|&a| a == v[0]);
    if x.len() < 2 || x.len() != y.len() || is_constant(x) || is_constant(y) {
        return 0.0;
    }
    let normalised = |v: &[f64]| -> Vec<f64> {
        let m = v.iter().sum::<f64>() / v.len() as f64;
        let centred: Vec<f64> = v.iter().map(|a| a - m).collect();
        let max_abs = centred.iter().fold(0.0f64, |acc, a| acc.max(a.abs()));
        let norm = max_abs
            * centred
                .iter()
                .map(|a| (a / max_abs) * (a / max_abs))
                .sum::<f64>()
                .sqrt();
        centred.iter().map(|a| a / norm).collect()
    };
    let r: f64 = normalised(x)
        .iter()
        .zip(normalised(y))
        .map(|(a, b)| a * b)
        .sum();
    r.clamp(-1.0, 1.0)
}

/// 1-based ranks of `v`, tied values getting the mean of the ranks they span
/// (SciPy's `rankdata(method="average")`).
fn average_ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut ranks = vec![0.0; v.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && v[order[end]] == v[order[start]] {
            end += 1;
        }
        // Positions start..end hold ranks start+1..=end; their mean is (start+1+end)/2.
        let rank = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = rank;
        }
        start = end;
    }
    ranks
}

#[cfg(test)]
mod tests {
    //! The expected numbers below were computed independently with scikit-learn 1.9.1
    //! and SciPy 1.17.1 by `metrics_reference.py`, which sits beside this file; each case
    //! is named as in that script (`cls_a`, `ml_a`, `reg_b`, ...). Run it to regenerate
    //! them.

    use super::*;

    const TOL: f64 = 1e-9;

    fn close(actual: f64, expected: f64, what: &str) {
        assert!(
            (actual - expected).abs() <= TOL,
            "{what}: got {actual:?}, expected {expected:?}"
        );
    }

    /// Checks `(precision, recall, f1, support)` of every class.
    fn check_classes(actual: &[ClassStats], expected: &[(f64, f64, f64, usize)]) {
        assert_eq!(actual.len(), expected.len());
        for (i, (s, &(p, r, f, support))) in actual.iter().zip(expected).enumerate() {
            assert_eq!(s.label_id, i);
            close(s.precision, p, &format!("precision of {i}"));
            close(s.recall, r, &format!("recall of {i}"));
            close(s.f1, f, &format!("f1 of {i}"));
            assert_eq!(s.support, support, "support of {i}");
        }
    }

    /// Checks accuracy, macro / micro / weighted (P, R, F1) and MCC, in that order.
    fn check_summary(r: &ClassificationReport, expected: [f64; 11]) {
        let actual = [
            r.accuracy,
            r.macro_precision,
            r.macro_recall,
            r.macro_f1,
            r.micro_precision,
            r.micro_recall,
            r.micro_f1,
            r.weighted_precision,
            r.weighted_recall,
            r.weighted_f1,
            r.mcc,
        ];
        let names = [
            "accuracy",
            "macro_precision",
            "macro_recall",
            "macro_f1",
            "micro_precision",
            "micro_recall",
            "micro_f1",
            "weighted_precision",
            "weighted_recall",
            "weighted_f1",
            "mcc",
        ];
        for ((a, e), name) in actual.into_iter().zip(expected).zip(names) {
            close(a, e, name);
        }
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn cls_a_unsupported_and_absent_classes_match_sklearn() {
        // Class 3 is predicted once but has no support; class 4 occurs nowhere. Both
        // still count in the macro averages.
        let preds = [0, 1, 1, 1, 0, 2, 2, 3, 2, 0, 1, 0];
        let labels = [0, 0, 1, 1, 1, 2, 2, 2, 2, 0, 1, 2];
        let r = classification_report(&preds, &labels, 5);
        check_summary(
            &r,
            [
                0.6666666666666666,
                0.45,
                0.4033333333333333,
                0.41428571428571426,
                0.6666666666666666,
                0.6666666666666666,
                0.6666666666666666,
                0.7916666666666666,
                0.6666666666666666,
                0.7053571428571429,
                0.5412673827612543,
            ],
        );
        check_classes(
            &r.per_class,
            &[
                (0.5, 0.6666666666666666, 0.5714285714285714, 3),
                (0.75, 0.75, 0.75, 4),
                (1.0, 0.6, 0.75, 5),
                (0.0, 0.0, 0.0, 0),
                (0.0, 0.0, 0.0, 0),
            ],
        );
        assert_eq!(
            r.confusion,
            vec![
                vec![2, 1, 0, 0, 0],
                vec![1, 3, 0, 0, 0],
                vec![1, 0, 3, 1, 0],
                vec![0, 0, 0, 0, 0],
                vec![0, 0, 0, 0, 0],
            ]
        );
    }

    #[test]
    fn cls_b_never_predicted_class_matches_sklearn() {
        // Class 1 has support 3 but is never predicted: precision 0 by zero_division=0.
        let preds = [0, 0, 0, 2, 0, 0, 2, 0];
        let labels = [0, 1, 2, 2, 1, 0, 2, 1];
        let r = classification_report(&preds, &labels, 3);
        check_summary(
            &r,
            [
                0.5,
                0.4444444444444444,
                0.5555555555555555,
                0.43333333333333335,
                0.5,
                0.5,
                0.5,
                0.4583333333333333,
                0.5,
                0.42500000000000004,
                0.44095855184409843,
            ],
        );
        check_classes(
            &r.per_class,
            &[
                (0.3333333333333333, 1.0, 0.5, 2),
                (0.0, 0.0, 0.0, 3),
                (1.0, 0.6666666666666666, 0.8, 3),
            ],
        );
        assert_eq!(
            r.confusion,
            vec![vec![2, 0, 0], vec![3, 0, 0], vec![1, 0, 2]]
        );
    }

    #[test]
    fn cls_c_single_predicted_class_gives_zero_mcc() {
        let r = classification_report(&[1, 1, 1, 1, 1], &[0, 1, 1, 0, 1], 2);
        check_summary(
            &r,
            [0.6, 0.3, 0.5, 0.375, 0.6, 0.6, 0.6, 0.36, 0.6, 0.45, 0.0],
        );
        check_classes(&r.per_class, &[(0.0, 0.0, 0.0, 2), (0.6, 1.0, 0.75, 3)]);
        assert_eq!(r.confusion, vec![vec![0, 2], vec![0, 3]]);
    }

    #[test]
    fn perfect_classification_scores_one() {
        let y = [0, 1, 2, 2, 1];
        let r = classification_report(&y, &y, 3);
        check_summary(&r, [1.0; 11]);
    }

    #[test]
    fn empty_classification_is_all_zeros() {
        let r = classification_report(&[], &[], 3);
        check_summary(&r, [0.0; 11]);
        check_classes(&r.per_class, &[(0.0, 0.0, 0.0, 0); 3]);
        assert_eq!(r.confusion, vec![vec![0; 3]; 3]);

        let r = classification_report(&[], &[], 0);
        check_summary(&r, [0.0; 11]);
        assert!(r.per_class.is_empty() && r.confusion.is_empty());
    }

    #[test]
    fn mismatched_lengths_use_the_common_prefix() {
        let long = classification_report(&[0, 1, 1, 0, 1], &[0, 1, 0], 2);
        let short = classification_report(&[0, 1, 1], &[0, 1, 0], 2);
        assert_eq!(long, short);
    }

    #[test]
    fn out_of_range_indices_do_not_panic_and_count_as_misses() {
        // Sample 1: gold 1, prediction 7 (no class) is a false negative of class 1.
        // Sample 2: gold 9 (no class), prediction 0 is a false positive of class 0.
        let r = classification_report(&[0, 7, 0], &[0, 1, 9], 2);
        close(r.accuracy, 1.0 / 3.0, "accuracy");
        check_classes(
            &r.per_class,
            &[(0.5, 1.0, 2.0 / 3.0, 1), (0.0, 0.0, 0.0, 1)],
        );
        assert_eq!(r.confusion, vec![vec![1, 0], vec![0, 0]]);
        close(r.micro_precision, 0.5, "micro_precision");
        close(r.micro_recall, 0.5, "micro_recall");
    }

    #[test]
    fn confusion_csv_has_named_header_and_rows() {
        let r = classification_report(&[1, 1, 1, 1, 1], &[0, 1, 1, 0, 1], 2);
        assert_eq!(
            r.confusion_csv(&names(&["neg", "pos"])),
            ",pred_neg,pred_pos\ntrue_neg,0,2\ntrue_pos,0,3\n"
        );
        // Missing names fall back to the index; awkward names are quoted.
        assert_eq!(
            r.confusion_csv(&names(&["a,b"])),
            ",\"pred_a,b\",pred_1\n\"true_a,b\",0,2\ntrue_1,0,3\n"
        );
    }

    #[test]
    fn per_class_table_is_laid_out_like_sklearn() {
        let r = classification_report(&[1, 1, 1, 1, 1], &[0, 1, 1, 0, 1], 2);
        let expected = concat!(
            "              precision    recall  f1-score   support\n",
            "\n",
            "         neg     0.0000    0.0000    0.0000         2\n",
            "         pos     0.6000    1.0000    0.7500         3\n",
            "\n",
            "    accuracy                         0.6000         5\n",
            "   macro avg     0.3000    0.5000    0.3750         5\n",
            "weighted avg     0.3600    0.6000    0.4500         5\n",
            "\n",
            "         mcc                         0.0000\n",
        );
        assert_eq!(r.per_class_table(&names(&["neg", "pos"])), expected);
        // A long name widens the first column.
        let table = r.per_class_table(&names(&["a-very-long-class-name"]));
        assert!(table.contains("\na-very-long-class-name     0.0000"));
        assert!(table.contains("\n                     1     0.6000"));
    }

    #[test]
    fn ml_a_matches_sklearn() {
        // Label 2 is never predicted; label 3 is never in a gold set.
        let b = |rows: &[[u8; 4]]| -> Vec<Vec<bool>> {
            rows.iter()
                .map(|r| r.iter().map(|&v| v == 1).collect())
                .collect()
        };
        let preds = b(&[
            [1, 0, 0, 0],
            [1, 1, 0, 1],
            [0, 1, 0, 0],
            [1, 1, 0, 0],
            [0, 0, 0, 0],
        ]);
        let labels = b(&[
            [1, 0, 1, 0],
            [1, 1, 0, 0],
            [0, 0, 1, 0],
            [1, 1, 0, 0],
            [0, 0, 0, 0],
        ]);
        let r = multilabel_report(&preds, &labels);
        close(r.subset_accuracy, 0.4, "subset_accuracy");
        close(r.micro_precision, 0.7142857142857143, "micro_precision");
        close(r.micro_recall, 0.7142857142857143, "micro_recall");
        close(r.micro_f1, 0.7142857142857143, "micro_f1");
        close(r.macro_precision, 0.41666666666666663, "macro_precision");
        close(r.macro_recall, 0.5, "macro_recall");
        close(r.macro_f1, 0.45, "macro_f1");
        check_classes(
            &r.per_label,
            &[
                (1.0, 1.0, 1.0, 3),
                (0.6666666666666666, 1.0, 0.8, 2),
                (0.0, 0.0, 0.0, 2),
                (0.0, 0.0, 0.0, 0),
            ],
        );
    }

    #[test]
    fn multilabel_edge_cases_do_not_panic() {
        let r = multilabel_report(&[], &[]);
        assert_eq!(r.subset_accuracy, 0.0);
        assert_eq!(r.micro_f1, 0.0);
        assert_eq!(r.macro_f1, 0.0);
        assert!(r.per_label.is_empty());

        // Ragged rows: missing entries read as false; the extra sample is ignored.
        let preds = vec![vec![true], vec![false, true], vec![true, true]];
        let labels = vec![vec![true, false], vec![false, true]];
        let r = multilabel_report(&preds, &labels);
        close(r.subset_accuracy, 1.0, "subset_accuracy");
        close(r.micro_f1, 1.0, "micro_f1");
        check_classes(&r.per_label, &[(1.0, 1.0, 1.0, 1), (1.0, 1.0, 1.0, 1)]);
    }

    /// Checks mse, mae, rmse, r2, pearson, spearman, in that order.
    fn check_regression(preds: &[f64], targets: &[f64], expected: [f64; 6]) {
        let r = regression_report(preds, targets);
        let actual = [r.mse, r.mae, r.rmse, r.r2, r.pearson, r.spearman];
        let names = ["mse", "mae", "rmse", "r2", "pearson", "spearman"];
        for ((a, e), name) in actual.into_iter().zip(expected).zip(names) {
            close(a, e, name);
        }
    }

    #[test]
    fn reg_a_matches_sklearn_and_scipy() {
        check_regression(
            &[2.5, 0.0, 2.0, 8.0],
            &[3.0, -0.5, 2.0, 7.0],
            [
                0.375,
                0.5,
                0.6123724356957945,
                0.9486081370449679,
                0.98486961844827,
                1.0,
            ],
        );
    }

    #[test]
    fn reg_b_ties_use_average_ranks() {
        check_regression(
            &[1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.5],
            &[1.5, 2.0, 1.0, 4.0, 4.0, 6.0, 3.0, 0.0],
            [
                1.0625,
                0.875,
                1.0307764064044151,
                0.6788665879574971,
                0.8430011115370095,
                0.8644610860794936,
            ],
        );
    }

    #[test]
    fn reg_c_negative_r2_and_correlations() {
        check_regression(
            &[3.0, 2.0, 1.0, 0.0],
            &[0.1, 1.2, 1.9, 3.3],
            [
                5.1875,
                1.9749999999999999,
                2.277608394786075,
                -2.8515081206496524,
                -0.9922670847697213,
                -1.0,
            ],
        );
    }

    #[test]
    fn reg_d_constant_predictions_give_zero_correlation() {
        // SciPy returns NaN for both correlations here; ferrotune returns 0.
        check_regression(
            &[2.0, 2.0, 2.0],
            &[1.0, 2.0, 4.0],
            [
                1.6666666666666667,
                1.0,
                1.2909944487358056,
                -0.07142857142857162,
                0.0,
                0.0,
            ],
        );
    }

    #[test]
    fn reg_e_constant_targets_give_zero_r2() {
        check_regression(
            &[1.0, 2.0, 3.0],
            &[2.0, 2.0, 2.0],
            [
                0.6666666666666666,
                0.6666666666666666,
                0.816496580927726,
                0.0,
                0.0,
                0.0,
            ],
        );
        // A perfect prediction of constant targets has R^2 = 1 (sklearn's force_finite).
        let r = regression_report(&[2.0, 2.0], &[2.0, 2.0]);
        assert_eq!((r.r2, r.pearson, r.spearman), (1.0, 0.0, 0.0));
    }

    #[test]
    fn regression_edge_cases_do_not_panic_or_nan() {
        for r in [
            regression_report(&[], &[]),
            regression_report(&[1.0], &[]),
            regression_report(&[1.0], &[3.0]),
        ] {
            for v in [r.mse, r.mae, r.rmse, r.r2, r.pearson, r.spearman] {
                assert!(v.is_finite(), "{r:?}");
            }
        }
        let r = regression_report(&[1.0], &[3.0]);
        assert_eq!((r.mse, r.mae, r.rmse, r.r2), (4.0, 2.0, 2.0, 0.0));
        // Extra predictions are ignored.
        assert_eq!(
            regression_report(&[1.0, 2.0, 9.0], &[1.0, 3.0]),
            regression_report(&[1.0, 2.0], &[1.0, 3.0])
        );
    }

    #[test]
    fn average_ranks_share_ties() {
        assert_eq!(
            average_ranks(&[10.0, 20.0, 20.0, 5.0, 20.0]),
            vec![2.0, 4.0, 4.0, 1.0, 4.0]
        );
        assert_eq!(average_ranks(&[]), Vec::<f64>::new());
    }

    #[test]
    fn reports_serialise_to_json() {
        let r = classification_report(&[0, 1], &[0, 0], 2);
        let json = serde_json::to_string(&r).unwrap();
        let back: ClassificationReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        assert!(json.contains("\"macro_f1\""));
    }
}
