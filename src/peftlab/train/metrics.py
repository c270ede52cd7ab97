"""GLUE and QA metrics, from scikit-learn and scipy."""

from __future__ import annotations

import numpy as np


def compute(names: tuple[str, ...], preds, labels) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    preds, labels = np.asarray(preds), np.asarray(labels)
    fns = {
        "accuracy": lambda: accuracy_score(labels, preds),
        "f1": lambda: f1_score(labels, preds),
        "matthews": lambda: matthews_corrcoef(labels, preds),
        "pearson": lambda: pearsonr(preds, labels)[0],
        "spearman": lambda: spearmanr(preds, labels)[0],
    }
    out = {}
    for n in names:
        v = float(fns[n]())
        out[n] = 0.0 if np.isnan(v) else v
    return out
