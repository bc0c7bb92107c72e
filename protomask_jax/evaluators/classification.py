"""Classification metrics (docs/reference.md §7.2), in percent.

``logits [N, C]``; ``labels`` int ``[N]`` (single-label) or multi-hot ``[N, C]`` (the
``multilabel_*`` functions). The reference reports its numbers with "balanced" sample weights
``1 / freq(class)`` (``balanced=True`` here); with them its accuracy is the balanced accuracy.
"""

from __future__ import annotations

import numpy as np

from protomask_jax.evaluators.chunk import divide

TOP_CLASSES_K = 3  # top-3 accuracy, as the reference


def _logits_2d(logits) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, C], got shape {logits.shape}")
    return logits


def _labels_1d(labels, num_samples: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (num_samples,):
        raise ValueError(
            f"labels must be int [N={num_samples}] for single-label metrics, got shape "
            f"{labels.shape}; pass multi-hot [N, C] labels to the multilabel_* functions."
        )
    return labels.astype(np.int64)


def _checked(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    logits = _logits_2d(logits)
    return logits, _labels_1d(labels, logits.shape[0])


def balanced_sample_weights(labels) -> np.ndarray:
    """float64 ``[N]``: ``N / n_y`` per sample; multi-hot labels sum it over positive classes.

    The reference adds 1e-8 to the class frequency; only present classes get weight here.
    """
    labels = np.asarray(labels)
    if labels.ndim == 1:
        counts = np.bincount(labels.astype(np.int64))
        return len(labels) / counts[labels.astype(np.int64)].astype(np.float64)
    targets = (labels != 0).astype(np.float64)
    return targets @ divide(len(labels), targets.sum(axis=0), 0.0)


def _mean(values: np.ndarray, labels, balanced: bool) -> float:
    weights = balanced_sample_weights(labels) if balanced else None
    return float(100.0 * np.average(values.astype(np.float64), weights=weights))


def top1_accuracy(logits, labels, balanced: bool = False) -> float:
    logits, labels = _checked(logits, labels)
    return _mean(np.argmax(logits, axis=1) == labels, labels, balanced)


def topk_accuracy(logits, labels, k: int = TOP_CLASSES_K, balanced: bool = False) -> float:
    """The true class is among the ``k`` largest logits; with ties, when fewer than ``k``
    classes score strictly higher (sklearn breaks ties by index)."""
    logits, labels = _checked(logits, labels)
    true_logit = np.take_along_axis(logits, labels[:, None], axis=1)
    return _mean(np.count_nonzero(logits > true_logit, axis=1) < k, labels, balanced)


def balanced_accuracy(logits, labels) -> float:
    """Mean recall over the classes present in ``labels`` (sklearn's definition)."""
    logits, labels = _checked(logits, labels)
    correct = np.argmax(logits, axis=1) == labels
    total = np.bincount(labels, minlength=logits.shape[1])
    hits = np.bincount(labels, weights=correct, minlength=logits.shape[1])
    return float(100.0 * np.mean(hits[total > 0] / total[total > 0]))


def macro_f1(logits, labels, balanced: bool = False) -> float:
    """sklearn's macro F1 (``zero_division=0``): over the classes in the labels or the
    predictions; balanced weights count each sample by its true class, as the reference."""
    logits, labels = _checked(logits, labels)
    num_classes = logits.shape[1]
    predictions = np.argmax(logits, axis=1)
    weights = balanced_sample_weights(labels) if balanced else np.ones(len(labels))
    confusion = np.bincount(
        labels * num_classes + predictions, weights=weights, minlength=num_classes**2
    ).reshape(num_classes, num_classes)
    true_positive = np.diag(confusion)
    false_positive = confusion.sum(axis=0) - true_positive
    false_negative = confusion.sum(axis=1) - true_positive
    f1 = divide(2 * true_positive, 2 * true_positive + false_positive + false_negative, 0.0)
    occurring = np.bincount(np.concatenate([labels, predictions]), minlength=num_classes) > 0
    return float(100.0 * np.mean(f1[occurring]))


def multilabel_threshold(logits, labels) -> float:
    """``(mean TP logit + mean TN logit) / 2``, the means over samples of per-sample means.

    Samples without positives (negatives) are left out of that mean; the reference adds 1 to
    every sample's positive count as soon as one sample has none.
    """
    logits = _logits_2d(logits)
    targets = np.asarray(labels) != 0
    if targets.shape != logits.shape:
        raise ValueError(f"labels must be multi-hot {logits.shape}, got {targets.shape}")
    means = []
    for side in (targets, ~targets):
        count = side.sum(axis=1)
        if not (count > 0).any():
            raise ValueError("multilabel_threshold needs a positive and a negative label")
        means.append(divide(np.where(side, logits, 0.0).sum(axis=1), count, 0.0)[count > 0])
    return float((means[0].mean() + means[1].mean()) / 2)


def multilabel_samples_f1(logits, labels, threshold: float, balanced: bool = False) -> float:
    """sklearn's ``average="samples"`` F1 of ``logit > threshold`` (0 when both sets are empty)."""
    targets = np.asarray(labels) != 0
    predictions = _logits_2d(logits) > threshold
    size = np.count_nonzero(targets, axis=1) + np.count_nonzero(predictions, axis=1)
    f1 = divide(2 * np.count_nonzero(targets & predictions, axis=1), size, 0.0)
    return _mean(f1, targets, balanced)


def multilabel_subset_accuracy(logits, labels, threshold: float, balanced: bool = False) -> float:
    """Exact-match accuracy of ``logit > threshold`` (sklearn's accuracy on multi-hot labels)."""
    targets = np.asarray(labels) != 0
    return _mean(np.all(targets == (_logits_2d(logits) > threshold), axis=1), targets, balanced)


class Evaluator:
    name = "classification"
    title = "Classification"
    rows = (
        ("top1_accuracy", "top-1 accuracy", "%"),
        ("top3_accuracy", "top-3 accuracy", "%"),
        ("top2_accuracy", "top-2 accuracy", "%"),
        ("balanced_accuracy", "balanced accuracy", "%"),
        ("macro_f1", "macro F1", "%"),
    )

    def __init__(self, model):
        self.logits, self.labels = [], []

    def update(self, chunk) -> None:
        self.logits.append(chunk.outputs.logits)
        self.labels.append(chunk.outputs.labels)

    def result(self) -> dict:
        logits, labels = np.concatenate(self.logits), np.concatenate(self.labels)
        k = min(TOP_CLASSES_K, logits.shape[1])
        return {
            "top1_accuracy": top1_accuracy(logits, labels),
            f"top{k}_accuracy": topk_accuracy(logits, labels, k=k),
            "balanced_accuracy": balanced_accuracy(logits, labels),
            "macro_f1": macro_f1(logits, labels),
        }
