"""Classification metrics (docs/reference.md §7.2), in percent.

``logits [N, C]``, ``labels`` int ``[N]``. The reference reports its numbers with "balanced"
sample weights ``1 / freq(class)`` (``balanced=True`` here); with them its accuracy is the
balanced accuracy.
"""

from __future__ import annotations

import numpy as np

from protomask_jax.evaluators.chunk import divide

TOP_CLASSES_K = 3  # top-3 accuracy, as the reference


def _checked(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"logits must be [N, C] and labels int [N]; got {logits.shape} and {labels.shape}"
        )
    return logits, labels.astype(np.int64)


def balanced_sample_weights(labels) -> np.ndarray:
    """float64 ``[N]``: ``N / n_y`` (the reference adds 1e-8 to the class frequency)."""
    labels = np.asarray(labels, dtype=np.int64)
    return len(labels) / np.bincount(labels)[labels].astype(np.float64)


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
