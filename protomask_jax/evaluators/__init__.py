"""Evaluators: one module per metric family (the reference's "techniques").

An evaluator is built from the model's head (``evaluate.ModelArrays``), sees every chunk of
images once (``update(chunk)``, see ``chunk.Chunk``) and returns its group of eval.json
(``result()``; None when the data lacks its ground truth). Its ``name``, ``title`` (formatted
with the group) and ``rows`` (``(key, label, unit)``) make its part of the printed and HTML
tables; optional ``notes`` (``(key, label)``) print under them. A new family is one module
here and one entry in :data:`TECHNIQUES`.
"""

from __future__ import annotations

from protomask_jax.evaluators import (
    classification,
    compactness,
    complexity,
    contrastivity,
    faithfulness,
)

TECHNIQUES = {
    module.Evaluator.name: module.Evaluator
    for module in (classification, compactness, contrastivity, complexity, faithfulness)
}


def check(names) -> list[str]:
    """``names`` (default: all) in the order of :data:`TECHNIQUES`; unknown ones refused."""
    names = list(TECHNIQUES) if names is None else list(names)
    unknown = sorted(set(names) - set(TECHNIQUES))
    if unknown:
        raise ValueError(f"--techniques: unknown {unknown}; choose from {list(TECHNIQUES)}")
    return [name for name in TECHNIQUES if name in names]


def build(names, model) -> list:
    return [TECHNIQUES[name](model) for name in check(names)]
