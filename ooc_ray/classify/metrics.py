"""Per-trial test metrics (scikit-learn), over every class of the manifest even when a fold lacks one."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support


def compute_metrics(y_true, y_pred, n_classes: int) -> dict:
    """accuracy, macro precision/recall/F1 (zero_division=0), per-class recall, confusion (rows = true)."""
    y_true = np.asarray(y_true, dtype=int)
    y_pred = np.asarray(y_pred, dtype=int)
    labels = list(range(n_classes))
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average="macro", zero_division=0
    )
    _, per_class_recall, _, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision_macro": float(precision),
        "recall_macro": float(recall),
        "f1_macro": float(f1),
        "per_class_recall": [float(r) for r in per_class_recall],
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).astype(int).tolist(),
    }
