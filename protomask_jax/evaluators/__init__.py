"""Evaluators: one module per metric family (the reference's "techniques").

An ``Evaluator(model: inference.ModelArrays)`` sees every ``chunk.Chunk`` once (``update``) and
gives its eval.json group (``result()``, None without its ground truth, which its optional
``missing`` names for eval.json's ``not_computed``); optional ``aliases``
are other names ``--techniques`` accepts, ``every_split`` asks for the chunks of every split.
Its table is its entry in :data:`TABLES`. A new family: one module here, one entry in
:data:`TECHNIQUES` and one in the table text.
"""

from __future__ import annotations

from protomask_jax.base import UserError
from protomask_jax.evaluators import (
    classification,
    compactness,
    completeness,
    complexity,
    continuity,
    contrastivity,
    faithfulness,
    topk,
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
        topk,
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


def build(names, model, options: dict | None = None) -> list:
    """The evaluators of ``names``; ``options[name]``: keyword arguments of one family."""
    options = options or {}
    return [TECHNIQUES[name](model, **options.get(name, {})) for name in check(names)]


# Every family's table: "family | title (formatted with its group)", then its rows
# "key | unit | label" (unit "-": none; "note": shown as "label: value").
_TABLE_TEXT = """
classification | Classification
  top1_accuracy | % | top-1 accuracy
  top3_accuracy | % | top-3 accuracy
  top2_accuracy | % | top-2 accuracy
  macro_f1 | % | macro F1
  subset_accuracy | % | exact-match accuracy
  samples_f1 | % | F1 (samples)
  threshold | - | decision threshold (logit)
  balanced_accuracy | % | balanced accuracy (reference)
  balanced_top3_accuracy | % | balanced top-3 accuracy
  balanced_top2_accuracy | % | balanced top-2 accuracy
  balanced_precision | % | balanced precision
  balanced_recall | % | balanced recall
  balanced_f1 | % | balanced F1
  balanced_roc_auc | % | balanced ROC AUC
compactness | Compactness (epsilon = {epsilon})
  global_explanation_size | prototypes | global explanation size
  classification_sparsity | % | classification sparsity
  negative_positive_ratio | - | negative/positive reasoning ratio
  local_size | prototypes | local explanation size
contrastivity | Contrastivity (top-{k} prototypes per image)
  vlc | % | VLC (explanations)
  vac | % | VAC (explanation values)
  plc | views | PLC (winning view index)
  palc | % | PALC (views over half the similarity range)
  intra_prototype_distance | 1 - cos | intra prototype distance
  inter_prototype_distance | 1 - cos | inter prototype distance
  intra_feature_distance | 1 - cos | intra feature distance
  inter_feature_distance | 1 - cos | inter feature distance
  prototype_entropy | bits | prototype entropy
  prototypes_used | prototypes | prototypes in some top-k set
complexity | Ground truth (top-{k} prototypes per image)
  object_overlap | % | object overlap
  background_overlap | % | background overlap
  iou | % | IoU with the object
  ior | - | inside-outside relevance (IOR)
  oirr | - | outside/inside relevance ratio
  whole_frame_regions | % | regions covering the whole frame
  part_consistency | % | part consistency
  object_mask | note | object mask
  keypoints | note | keypoints
faithfulness | Explanation faithfulness (top-{k} contributions to the prediction)
  rate | % | explanations on the deciding part
  chance_rate | % |   chance level (a random mask)
  rate_correct | % |   on correctly classified images
  overlap | % | mean overlap with the deciding part
  chance_overlap | % |   chance level (a random mask)
  relevance_rate | % | PRP maps mostly on the deciding part
  relevance_mass | % | PRP relevance on the deciding part
continuity | Continuity (top-{k} prototypes, photometric perturbation)
  vlc | % | VLC (explanation region)
  vac | % | VAC (explanation values)
  plc | views | PLC (winning view index)
  psc | % | PSC (peak similarity)
  prc | places | PRC (prototype rank)
  palc | % | PALC (views over half the range)
  pac | % | PAC (view similarities)
  cac | % | CAC (sorted logits)
  crc | places | CRC (new rank of the prediction)
  stability | % | stability (part keypoints)
completeness | Output completeness (top-{k} prototypes, noise outside the explanation box)
topk | Top-{k} images per prototype (WORKDIR/topk.json)
  own_class_test | % | test images of the prototype's class
  own_class_train | % | train images of the prototype's class
  distinct_test | images | distinct test images
  distinct_train | images | distinct train images
"""


def _tables(text: str) -> dict[str, tuple[str, list[tuple[str, str, str]]]]:
    """``{family: (title, [(key, unit, label)])}`` of the table text."""
    tables: dict[str, tuple[str, list]] = {}
    for line in text.strip().splitlines():
        if not line.startswith(" "):
            family, title = line.split(" | ", 1)
            tables[family] = (title, [])
            continue
        key, unit, label = line.split(" | ", 2)
        tables[family][1].append((key.strip(), "" if unit == "-" else unit, label))
    return tables


TABLES = _tables(_TABLE_TEXT)
TABLES["completeness"][1].extend(TABLES["continuity"][1])  # its group has the first seven
