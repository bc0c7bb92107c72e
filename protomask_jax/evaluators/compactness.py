"""Compactness of the last layer ``W [C, P]`` (docs/reference.md §7.3), with the reference's
``epsilon``: how many prototypes a decision can use and how sparse the weights are."""

from __future__ import annotations

import numpy as np

EPSILON = 1e-3


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


class Evaluator:
    name = "compactness"
    title = "Compactness (epsilon = {epsilon})"
    rows = (
        ("global_explanation_size", "global explanation size", "prototypes"),
        ("classification_sparsity", "classification sparsity", "%"),
        ("negative_positive_ratio", "negative/positive reasoning ratio", ""),
    )

    def __init__(self, model):
        self.last_layer = model.last_layer

    def update(self, chunk) -> None:
        pass  # a property of the model, not of the images

    def result(self) -> dict:
        return {
            "epsilon": EPSILON,
            "global_explanation_size": global_explanation_size(self.last_layer),
            "classification_sparsity": classification_sparsity(self.last_layer),
            "negative_positive_ratio": negative_positive_reasoning_ratio(self.last_layer),
        }
