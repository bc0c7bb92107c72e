"""Compactness (docs/reference.md §7.3): how many prototypes a decision can use and how sparse
the last layer ``W [C, P]`` is (with the reference's ``epsilon``), and how many prototypes
respond to an image (local size, from the similarities ``[N, P]``)."""

from __future__ import annotations

import numpy as np

EPSILON = 1e-3
LOCAL_SIZE_THRESHOLD = 0.1  # of the image's largest similarity (reference)


def global_explanation_size(last_layer, epsilon: float = EPSILON) -> int:
    """Prototypes with a positive connection ``W[c, j] > epsilon`` to some class."""
    return int(np.count_nonzero((np.asarray(last_layer) > epsilon).any(axis=0)))


def classification_sparsity(last_layer, epsilon: float = EPSILON) -> float:
    """Percentage of weights with ``|W| <= epsilon``."""
    weights = np.asarray(last_layer)
    return float(100.0 * np.count_nonzero(np.abs(weights) <= epsilon) / weights.size)


def negative_positive_reasoning_ratio(last_layer, epsilon: float = EPSILON) -> float:
    """``#(W < -epsilon) / #(W > epsilon)``; without positive weights 0 if there are no
    negative ones either, else inf (the reference divides by zero)."""
    weights = np.asarray(last_layer)
    negative = np.count_nonzero(weights < -epsilon)
    positive = np.count_nonzero(weights > epsilon)
    if positive == 0:
        return 0.0 if negative == 0 else float("inf")
    return float(negative / positive)


def local_explanation_size(similarities, threshold: float = LOCAL_SIZE_THRESHOLD) -> np.ndarray:
    """float64 ``[N]``: prototypes whose similarity exceeds ``threshold`` times the image's
    largest (an image whose largest similarity is 0 counts none, as the reference's nan)."""
    similarities = np.asarray(similarities, np.float64)
    peak = similarities.max(axis=1, keepdims=True)
    return np.count_nonzero((similarities > threshold * peak) & (peak > 0), axis=1).astype(float)


class Evaluator:
    name = "compactness"

    def __init__(self, model):
        self.last_layer = model.last_layer
        self.local_sizes = []

    def update(self, chunk) -> None:
        self.local_sizes.append(local_explanation_size(chunk.outputs.similarities))

    def result(self) -> dict:
        return {
            "epsilon": EPSILON,
            "global_explanation_size": global_explanation_size(self.last_layer),
            "classification_sparsity": classification_sparsity(self.last_layer),
            "negative_positive_ratio": negative_positive_reasoning_ratio(self.last_layer),
            "local_size": float(np.concatenate(self.local_sizes).mean()),
            "local_size_threshold": LOCAL_SIZE_THRESHOLD,
        }
