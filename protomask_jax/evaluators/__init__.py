"""Evaluators: one module per metric family (the reference's "techniques").

An ``Evaluator(model: evaluate.ModelArrays)`` sees every ``chunk.Chunk`` once (``update``) and
gives its eval.json group (``result()``, None without its ground truth). ``name``, ``title``
(formatted with the group), ``rows`` ``(key, label, unit)`` and optional ``notes`` ``(key,
label)`` make its table; optional ``aliases`` are other names ``--techniques`` accepts. A new
family: one module here, one entry in :data:`TECHNIQUES`.
"""

from __future__ import annotations

from protomask_jax.cli import UserError
from protomask_jax.evaluators import (
    classification,
    compactness,
    completeness,
    complexity,
    continuity,
    contrastivity,
    faithfulness,
)

TECHNIQUES = {
    module.Evaluator.name: module.Evaluator
    for module in (
        classification,
        compactness,
        contrastivity,
        complexity,
        faithfulness,
        continuity,
        completeness,
    )
}
# What runs without --techniques: the families of the authors' evaluation script, plus ours.
DEFAULT = ("classification", "compactness", "contrastivity", "complexity", "faithfulness")
# Families that rerun the model on perturbed images.
PERTURBED = ("continuity", "completeness")
ALIASES = {
    alias: name
    for name, evaluator in TECHNIQUES.items()
    for alias in getattr(evaluator, "aliases", ())
}


def check(names) -> list[str]:
    """``names`` (default: :data:`DEFAULT`; aliases resolved) in the order of
    :data:`TECHNIQUES`; unknown ones refused."""
    names = {ALIASES.get(name, name) for name in (DEFAULT if names is None else names)}
    unknown = sorted(names - set(TECHNIQUES))
    if unknown:
        choices = sorted([*TECHNIQUES, *ALIASES])
        raise UserError(f"--techniques: unknown {unknown}; choose from {choices}")
    return [name for name in TECHNIQUES if name in names]


def build(names, model) -> list:
    return [TECHNIQUES[name](model) for name in check(names)]
