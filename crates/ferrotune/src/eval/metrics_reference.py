"""Reference values for the tests of metrics.rs, computed with scikit-learn and SciPy.

The Rust tests in metrics.rs hard-code the numbers this script prints. To regenerate
them (the values were produced with scikit-learn 1.9.1, SciPy 1.17.1, NumPy 2):

    python3 -m venv /tmp/venv-sk && /tmp/venv-sk/bin/pip install scikit-learn scipy
    /tmp/venv-sk/bin/python crates/ferrotune/src/eval/metrics_reference.py

Where scikit-learn or SciPy return NaN (a correlation with a constant input), ferrotune
returns 0.0; the script prints the NaN as it comes and the test expects 0.0.
"""

import warnings

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    matthews_corrcoef,
    mean_absolute_error,
    mean_squared_error,
    precision_recall_fscore_support,
    r2_score,
)

warnings.simplefilter("ignore", UndefinedMetricWarning)
warnings.simplefilter("ignore", RuntimeWarning)


def show(name, value):
    print(f"    {name} = {float(value)!r}")


# --- single-label classification -------------------------------------------------------
CLASSIFICATION_CASES = {
    # 5 classes: class 3 is predicted once but has no support; class 4 occurs nowhere.
    "cls_a": dict(
        preds=[0, 1, 1, 1, 0, 2, 2, 3, 2, 0, 1, 0],
        labels=[0, 0, 1, 1, 1, 2, 2, 2, 2, 0, 1, 2],
        num_classes=5,
    ),
    # 3 classes: class 1 has support 3 but is never predicted.
    "cls_b": dict(
        preds=[0, 0, 0, 2, 0, 0, 2, 0],
        labels=[0, 1, 2, 2, 1, 0, 2, 1],
        num_classes=3,
    ),
    # Everything predicted as one class: MCC's denominator is zero.
    "cls_c": dict(preds=[1, 1, 1, 1, 1], labels=[0, 1, 1, 0, 1], num_classes=2),
}


def classification(name, preds, labels, num_classes):
    print(f"{name}: preds={preds} labels={labels} num_classes={num_classes}")
    labs = list(range(num_classes))
    show("accuracy", accuracy_score(labels, preds))
    for avg in ("macro", "micro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            labels, preds, labels=labs, average=avg, zero_division=0
        )
        show(f"{avg}_precision", p)
        show(f"{avg}_recall", r)
        show(f"{avg}_f1", f)
    show("mcc", matthews_corrcoef(labels, preds))
    p, r, f, s = precision_recall_fscore_support(
        labels, preds, labels=labs, average=None, zero_division=0
    )
    for c in labs:
        print(f"    class {c}: precision={float(p[c])!r} recall={float(r[c])!r} f1={float(f[c])!r} support={s[c]}")
    print(f"    confusion = {confusion_matrix(labels, preds, labels=labs).tolist()}")


# --- multi-label classification --------------------------------------------------------
MULTILABEL_CASES = {
    # 5 samples x 4 labels: label 2 is never predicted, label 3 is never in the gold sets.
    "ml_a": dict(
        preds=[
            [1, 0, 0, 0],
            [1, 1, 0, 1],
            [0, 1, 0, 0],
            [1, 1, 0, 0],
            [0, 0, 0, 0],
        ],
        labels=[
            [1, 0, 1, 0],
            [1, 1, 0, 0],
            [0, 0, 1, 0],
            [1, 1, 0, 0],
            [0, 0, 0, 0],
        ],
    ),
}


def multilabel(name, preds, labels):
    y_pred, y_true = np.array(preds), np.array(labels)
    print(f"{name}:")
    show("subset_accuracy", accuracy_score(y_true, y_pred))
    for avg in ("micro", "macro"):
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, average=avg, zero_division=0
        )
        show(f"{avg}_precision", p)
        show(f"{avg}_recall", r)
        show(f"{avg}_f1", f)
    p, r, f, s = precision_recall_fscore_support(
        y_true, y_pred, average=None, zero_division=0
    )
    for c in range(y_true.shape[1]):
        print(f"    label {c}: precision={float(p[c])!r} recall={float(r[c])!r} f1={float(f[c])!r} support={s[c]}")


# --- regression ------------------------------------------------------------------------
REGRESSION_CASES = {
    # scikit-learn's r2_score docstring example.
    "reg_a": dict(preds=[2.5, 0.0, 2.0, 8.0], targets=[3.0, -0.5, 2.0, 7.0]),
    # Ties in both inputs (Spearman's average ranks) and a negative correlation part.
    "reg_b": dict(
        preds=[1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.5],
        targets=[1.5, 2.0, 1.0, 4.0, 4.0, 6.0, 3.0, 0.0],
    ),
    # Worse than predicting the mean: negative R^2, negative correlations.
    "reg_c": dict(preds=[3.0, 2.0, 1.0, 0.0], targets=[0.1, 1.2, 1.9, 3.3]),
    # Constant predictions: correlations undefined (NaN in SciPy, 0.0 in ferrotune).
    "reg_d": dict(preds=[2.0, 2.0, 2.0], targets=[1.0, 2.0, 4.0]),
    # Constant targets, imperfect prediction: R^2 is 0.0 (force_finite).
    "reg_e": dict(preds=[1.0, 2.0, 3.0], targets=[2.0, 2.0, 2.0]),
}


def regression(name, preds, targets):
    print(f"{name}: preds={preds} targets={targets}")
    mse = mean_squared_error(targets, preds)
    show("mse", mse)
    show("mae", mean_absolute_error(targets, preds))
    show("rmse", np.sqrt(mse))
    show("r2", r2_score(targets, preds))
    show("pearson", pearsonr(preds, targets).statistic)
    show("spearman", spearmanr(preds, targets).statistic)


if __name__ == "__main__":
    for name, case in CLASSIFICATION_CASES.items():
        classification(name, **case)
    for name, case in MULTILABEL_CASES.items():
        multilabel(name, **case)
    for name, case in REGRESSION_CASES.items():
        regression(name, **case)
