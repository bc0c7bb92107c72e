"""Top-k images per prototype (docs/reference.md §7.9, ProtoPNet's global analysis): for each
prototype, the ``k`` images of each split with the highest similarity and the view that matched.

Streamed: per split a running ``[k, P]`` top-k is merged with every chunk's similarities
``[n, P]``, so no ``N x P`` matrix is kept. The merge is a stable sort with the earlier images
first, so ties go to the image read first, as ``np.argsort(-S, axis=0, kind="stable")[:k]``
over the whole split would. Every split's chunks reach this family (``every_split``);
``evaluate`` writes the per-prototype lists to ``WORKDIR/topk.json`` and this summary to
eval.json: per split the share of the images of the prototype's own class and how many
distinct images the lists hold.
"""

from __future__ import annotations

from typing import Any

import numpy as np

K = 5  # images per prototype and split (the reference)
_FIELDS = ("similarity", "image_id", "view", "mask")


class RunningTopK:
    """The ``k`` largest similarities per prototype seen so far, with their image, winning view
    and its mask (``view % num_masks``), each ``[k', P]`` (``k' <= k`` until k images)."""

    def __init__(self, k: int, num_prototypes: int):
        self.k = k
        self.columns = {name: np.zeros((0, num_prototypes)) for name in _FIELDS}
        self.labels: dict[int, Any] = {}

    def update(self, similarities, image_ids, labels, winning_view, num_masks) -> None:
        similarities = np.asarray(similarities, np.float64)
        shape = similarities.shape
        image_ids = np.asarray(image_ids, np.int64)
        new = {
            "similarity": similarities,
            "image_id": np.broadcast_to(image_ids[:, None], shape),
            "view": np.asarray(winning_view),
            "mask": np.asarray(winning_view) % np.asarray(num_masks)[:, None],
        }
        merged = {name: np.concatenate([self.columns[name], new[name]]) for name in _FIELDS}
        order = np.argsort(-merged["similarity"], axis=0, kind="stable")[: self.k]
        self.columns = {name: np.take_along_axis(v, order, axis=0) for name, v in merged.items()}
        self.labels.update(zip(image_ids.tolist(), np.asarray(labels).tolist(), strict=True))

    def entries(self, prototype: int) -> list[dict[str, Any]]:
        """Prototype ``prototype``'s images, most similar first."""
        rows = range(len(self.columns["similarity"]))
        return [
            {
                "image_id": int(self.columns["image_id"][r, prototype]),
                "label": self.labels[int(self.columns["image_id"][r, prototype])],
                "similarity": float(self.columns["similarity"][r, prototype]),
                "view": int(self.columns["view"][r, prototype]),
                "mask": int(self.columns["mask"][r, prototype]),
            }
            for r in rows
        ]


def _own_class(label, own: int) -> bool:
    return own in label if isinstance(label, list) else label == own


class Evaluator:
    name = "topk"
    every_split = True

    def __init__(self, model, k: int = K):
        self.prototype_class = np.asarray(model.prototype_class)
        self.k = max(1, int(k))
        self.splits: dict[str, RunningTopK] = {}

    def update(self, chunk) -> None:
        outputs = chunk.outputs
        if chunk.split not in self.splits:
            self.splits[chunk.split] = RunningTopK(self.k, len(self.prototype_class))
        self.splits[chunk.split].update(
            outputs.similarities,
            outputs.image_ids,
            outputs.labels,
            outputs.winning_view,
            outputs.num_masks,
        )

    def result(self) -> dict:
        """The summary, and under ``prototypes`` the lists for topk.json."""
        group: dict[str, Any] = {"k": self.k, "splits": sorted(self.splits)}
        prototypes = [{"prototype": j, "class": int(c)} for j, c in enumerate(self.prototype_class)]
        for split, running in sorted(self.splits.items()):
            own = []
            for j, entry in enumerate(prototypes):
                entry[split] = running.entries(j)
                own += [_own_class(e["label"], entry["class"]) for e in entry[split]]
            group[f"own_class_{split}"] = float(100.0 * np.mean(own))
            group[f"distinct_{split}"] = len(np.unique(running.columns["image_id"]))
        return group | {"prototypes": prototypes}
