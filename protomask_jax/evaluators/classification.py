"""Classification metrics (docs/reference.md §7.2), in percent.

``logits [N, C]``; ``labels`` int ``[N]`` (single-label) or multi-hot ``[N, C]``. The
reference reports every number with "balanced" sample weights (``balanced_sample_weights``);
eval.json gives those under ``balanced_*`` keys (with them the reference's accuracy is the
balanced accuracy) and the plain top-1/top-k accuracy and macro F1 beside them.
Single-label precision, recall and F1 are macro averages, multi-label ones "samples"
averages of the predictions ``logit > threshold``; ROC AUC is one-vs-rest on the softmax
(single-label) or per sample on the logits (multi-label).
"""

from __future__ import annotations

import numpy as np
from scipy import special

from protomask_jax.evaluators.chunk import divide

TOP_CLASSES_K = 3  # top-3 accuracy, as the reference


def _checked(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"logits must be [N, C] and labels int [N]; got {logits.shape} and {labels.shape}"
        )
    return logits, labels.astype(np.int64)


def _checked_multi_hot(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if logits.ndim != 2 or labels.shape != logits.shape:
        raise ValueError(
            f"logits must be [N, C] and labels multi-hot [N, C]; got {logits.shape} and "
            f"{labels.shape}"
        )
    return logits, labels != 0


def balanced_sample_weights(labels) -> np.ndarray:
    """float64 ``[N]``: ``N / n_y``; multi-hot: the sum of ``N / n_c`` over the sample's
    classes (the reference adds 1e-8 to the class frequencies; every mean here divides by the
    weights' sum, so only their ratios matter)."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        targets = (labels != 0).astype(np.float64)
        return targets @ divide(len(labels), targets.sum(axis=0), 0.0)
    labels = labels.astype(np.int64)
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


def macro_scores(logits, labels, balanced: bool = False) -> dict[str, float]:
    """sklearn's macro precision, recall and F1 (``zero_division=0``) over the classes in the
    labels or the predictions; balanced weights count each sample by its true class."""
    logits, labels = _checked(logits, labels)
    num_classes = logits.shape[1]
    predictions = np.argmax(logits, axis=1)
    weights = balanced_sample_weights(labels) if balanced else np.ones(len(labels))
    confusion = np.bincount(
        labels * num_classes + predictions, weights=weights, minlength=num_classes**2
    ).reshape(num_classes, num_classes)
    true_positive = np.diag(confusion)
    predicted, actual = confusion.sum(axis=0), confusion.sum(axis=1)
    occurring = np.bincount(np.concatenate([labels, predictions]), minlength=num_classes) > 0
    scores = {
        "precision": divide(true_positive, predicted, 0.0),
        "recall": divide(true_positive, actual, 0.0),
        "f1": divide(2 * true_positive, predicted + actual, 0.0),
    }
    return {name: float(100.0 * values[occurring].mean()) for name, values in scores.items()}


def macro_f1(logits, labels, balanced: bool = False) -> float:
    return macro_scores(logits, labels, balanced)["f1"]


def binary_auc(scores, positive, weights) -> np.ndarray:
    """float64 ``[J]``: the weighted ROC AUC of column ``j`` of ``scores [M, J]`` against
    ``positive`` bool ``[M, J]`` (weights broadcast to ``[M, J]``), i.e. the weighted share
    of (positive, negative) pairs ordered right, ties counting one half: the area under
    sklearn's ROC curve. nan for a column without positives or negatives."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    weights = np.broadcast_to(np.asarray(weights, np.float64), scores.shape)
    order = np.argsort(scores, axis=0, kind="stable")
    scores = np.take_along_axis(scores, order, axis=0)
    positive = np.take_along_axis(positive, order, axis=0)
    weights = np.take_along_axis(weights, order, axis=0)
    negative_weight = np.where(positive, 0.0, weights)
    negatives_up_to = np.cumsum(negative_weight, axis=0)
    # Each run of equal scores: negatives below the run, and negatives within it.
    rows = np.arange(len(scores))[:, None]
    starts = np.ones(scores.shape, bool)
    starts[1:] = scores[1:] != scores[:-1]
    ends = np.ones(scores.shape, bool)
    ends[:-1] = starts[1:]
    first = np.maximum.accumulate(np.where(starts, rows, 0), axis=0)
    last = np.minimum.accumulate(np.where(ends, rows, len(scores) - 1)[::-1], axis=0)[::-1]
    below = np.take_along_axis(negatives_up_to - negative_weight, first, axis=0)
    tied = np.take_along_axis(negatives_up_to, last, axis=0) - below
    positive_weight = np.where(positive, weights, 0.0)
    ordered = (positive_weight * (below + 0.5 * tied)).sum(axis=0)
    pairs = positive_weight.sum(axis=0) * negative_weight.sum(axis=0)
    return divide(ordered, pairs, np.nan)


def roc_auc(logits, labels, balanced: bool = False) -> float:
    """Macro one-vs-rest ROC AUC of the softmax over the classes present in ``labels``
    (sklearn refuses a class without test samples; it has no AUC)."""
    logits, labels = _checked(logits, labels)
    weights = balanced_sample_weights(labels) if balanced else np.ones(len(labels))
    positive = labels[:, None] == np.arange(logits.shape[1])
    present = positive.any(axis=0)
    probabilities = special.softmax(logits, axis=1)[:, present]
    auc = binary_auc(probabilities, positive[:, present], weights[:, None])
    return float(100.0 * np.nanmean(auc))


# ------------------------------------------------------------------------------ multi-label


def multilabel_threshold(logits, labels) -> float:
    """``(mean TP logit + mean TN logit) / 2``: the means over samples of the mean logit of
    each sample's positive (negative) classes, samples without any left out (the reference
    adds 1 to every sample's positive count once one sample has none)."""
    logits, targets = _checked_multi_hot(logits, labels)
    num_positive = targets.sum(axis=1)
    num_negative = targets.shape[1] - num_positive
    if not (num_positive > 0).any() or not (num_negative > 0).any():
        raise ValueError("the multi-label threshold needs a positive and a negative label")
    positive_mean = divide(np.where(targets, logits, 0.0).sum(axis=1), num_positive, 0.0)
    negative_mean = divide(np.where(targets, 0.0, logits).sum(axis=1), num_negative, 0.0)
    mean_tp = positive_mean[num_positive > 0].mean()
    mean_tn = negative_mean[num_negative > 0].mean()
    return float((mean_tp + mean_tn) / 2)


def multilabel_scores(logits, labels, threshold: float, balanced: bool = False) -> dict:
    """Predictions ``logit > threshold``. ``accuracy``: exact match (sklearn's accuracy of
    multi-hot targets); ``precision``, ``recall``, ``f1``: per-sample scores (0 when their
    denominator is), averaged over samples; ``roc_auc``: per-sample AUC of the logits, over
    the samples with a positive and a negative class (sklearn refuses the others)."""
    logits, targets = _checked_multi_hot(logits, labels)
    predictions = logits > threshold
    overlap = np.count_nonzero(targets & predictions, axis=1)
    actual, predicted = targets.sum(axis=1), predictions.sum(axis=1)
    weights = balanced_sample_weights(targets) if balanced else np.ones(len(targets))
    per_sample = {
        "accuracy": np.all(targets == predictions, axis=1).astype(np.float64),
        "precision": divide(overlap, predicted, 0.0),
        "recall": divide(overlap, actual, 0.0),
        "f1": divide(2 * overlap, actual + predicted, 0.0),
        "roc_auc": binary_auc(logits.T, targets.T, 1.0),
    }
    scores = {}
    for name, values in per_sample.items():
        defined = np.isfinite(values) & (weights > 0)
        scores[name] = (
            float(100.0 * np.average(values[defined], weights=weights[defined]))
            if defined.any()
            else float("nan")
        )
    return scores


class Evaluator:
    name = "classification"
    aliases = ("general",)  # the reference's name of the technique

    def __init__(self, model):
        self.threshold = getattr(model, "multi_label_threshold", None)
        self.logits, self.labels = [], []

    def update(self, chunk) -> None:
        self.logits.append(chunk.outputs.logits)
        self.labels.append(chunk.outputs.labels)

    def result(self) -> dict:
        logits, labels = np.concatenate(self.logits), np.concatenate(self.labels)
        if labels.ndim == 2:
            return self._multi_label(logits, labels)
        k = min(TOP_CLASSES_K, logits.shape[1])
        balanced = macro_scores(logits, labels, balanced=True)
        return {
            "top1_accuracy": top1_accuracy(logits, labels),
            f"top{k}_accuracy": topk_accuracy(logits, labels, k=k),
            "macro_f1": macro_f1(logits, labels),
            "balanced_accuracy": balanced_accuracy(logits, labels),
            f"balanced_top{k}_accuracy": topk_accuracy(logits, labels, k=k, balanced=True),
            **{f"balanced_{name}": value for name, value in balanced.items()},
            "balanced_roc_auc": roc_auc(logits, labels, balanced=True),
        }

    def _multi_label(self, logits, labels) -> dict:
        threshold = self.threshold
        if threshold is None:  # the reference's `threshold` technique on the same images
            threshold = multilabel_threshold(logits, labels)
        plain = multilabel_scores(logits, labels, threshold)
        balanced = multilabel_scores(logits, labels, threshold, balanced=True)
        return {
            "threshold": float(threshold),
            "subset_accuracy": plain["accuracy"],
            "samples_f1": plain["f1"],
            **{f"balanced_{name}": value for name, value in balanced.items()},
        }
