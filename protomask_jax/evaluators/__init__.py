"""Evaluators: one module per metric family (the reference's "techniques").

An ``Evaluator(model: evaluate.ModelArrays)`` sees every ``chunk.Chunk`` once (``update``) and
gives its eval.json group (``result()``, None without its ground truth). ``name``, ``title``
(formatted with the group), ``rows`` ``(key, label, unit)`` and optional ``notes`` ``(key,
label)`` make its table. A new family: one module here, one entry in :data:`TECHNIQUES`.
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
