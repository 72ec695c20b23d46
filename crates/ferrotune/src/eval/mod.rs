//! Evaluation of fine-tuned models.
//!
//! [`metrics`] turns predictions and gold labels into the scores people compare models
//! by: accuracy, precision / recall / F1 (per class, macro, micro and support-weighted),
//! the Matthews correlation coefficient and the confusion matrix for single-label
//! classification; the same precision / recall / F1 family plus subset accuracy for
//! multi-label classification; and MSE, MAE, RMSE, R², Pearson's and Spearman's
//! correlation for regression. The definitions follow scikit-learn's and SciPy's
//! defaults, with every undefined ratio (a division by zero) reported as `0.0`, never
//! `NaN`.

pub mod metrics;
