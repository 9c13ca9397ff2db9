"""Classification metrics from predictions: torchmetrics / scikit-learn do the arithmetic, not hand-rolled
formulas.

Macro averages are taken over the classes present in the evaluated labels: PlantVillage subsets often lack
some of the 38 declared classes, and a class with no examples has no recall to average.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, num_classes: int, n_bins: int = 15
) -> float:
    """Top-label ECE (L1, equal-width confidence bins) via torchmetrics."""
    return float(
        multiclass_calibration_error(
            torch.as_tensor(np.asarray(probs, dtype=np.float32)),
            torch.as_tensor(np.asarray(labels, dtype=np.int64)),
            num_classes=num_classes,
            n_bins=n_bins,
            norm="l1",
        )
    )


def top_k_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of images whose label is among the ``k`` most probable classes (torchmetrics, micro
    average)."""
    num_classes = probs.shape[1]
    return float(
        multiclass_accuracy(
            torch.as_tensor(np.asarray(probs, dtype=np.float32)),
            torch.as_tensor(np.asarray(labels, dtype=np.int64)),
            num_classes=num_classes,
            top_k=min(k, num_classes),
            average="micro",
        )
    )


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, list[float]]:
    """Per-bin mean confidence, accuracy and count of the top label (the data of a reliability diagram)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(index, weights=confidence, minlength=n_bins) / counts
        acc = np.bincount(index, weights=correct.astype(float), minlength=n_bins) / counts
    return {
        "edges": edges.tolist(),
        "confidence": np.nan_to_num(conf).tolist(),
        "accuracy": np.nan_to_num(acc).tolist(),
        "count": counts.astype(int).tolist(),
    }


def most_confused_pairs(cm: np.ndarray, names: Sequence[str], top: int = 10) -> list[dict[str, Any]]:
    """The largest off-diagonal cells of a confusion matrix (true -> predicted), with the row's share."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    rows, cols = np.nonzero(off)
    order = np.argsort(-off[rows, cols], kind="stable")[:top]
    return [
        {
            "true": names[rows[i]],
            "predicted": names[cols[i]],
            "count": int(off[rows[i], cols[i]]),
            "share_of_true": float(off[rows[i], cols[i]] / max(1, cm[rows[i]].sum())),
        }
        for i in order
    ]


def classification_metrics(
    probs: np.ndarray, labels: np.ndarray, names: Sequence[str], n_bins: int = 15
) -> dict[str, Any]:
    """Everything the report needs from calibrated probabilities and true label ids.

    Returns:
        ``top1``, ``top5``, ``macro_f1``, ``ece``, ``per_class`` (precision/recall/F1/support for every
        declared class), ``confusion_matrix`` (rows true, columns predicted, all classes), ``most_confused``,
        ``reliability`` and ``images``.
    """
    probs, labels = np.asarray(probs), np.asarray(labels, dtype=np.int64)
    num_classes = len(names)
    if probs.shape != (len(labels), num_classes):
        raise ValueError(
            f"probs shape {probs.shape} does not match {len(labels)} labels x {num_classes} classes"
        )
    preds = probs.argmax(axis=1)
    all_ids = list(range(num_classes))
    present = sorted(set(labels.tolist()))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, preds, labels=all_ids, zero_division=0
    )
    cm = confusion_matrix(labels, preds, labels=all_ids)
    return {
        "images": len(labels),
        "classes_present": len(present),
        "top1": top_k_accuracy(probs, labels, 1),
        "top5": top_k_accuracy(probs, labels, 5),
        "macro_f1": float(f1_score(labels, preds, labels=present, average="macro", zero_division=0)),
        "ece": expected_calibration_error(probs, labels, num_classes, n_bins),
        "per_class": [
            {
                "class_id": i,
                "name": names[i],
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i in all_ids
        ],
        "confusion_matrix": cm.tolist(),
        "most_confused": most_confused_pairs(cm, names),
        "reliability": reliability_bins(probs, labels, n_bins),
    }
