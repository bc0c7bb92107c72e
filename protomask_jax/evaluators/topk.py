"""Top-k images per prototype (docs/reference.md §7.9, ProtoPNet's global analysis): for each
prototype, the ``k`` images of each split with the highest similarity and the view that matched.

Streamed: per split a running ``[k, P]`` top-k is merged with every chunk's similarities
``[n, P]`` by a stable sort with the earlier images first, so ties go to the image read first,
as ``np.argsort(-S, axis=0, kind="stable")[:k]`` over the whole split would; no ``N x P``
matrix is kept. The summary (eval.json): per split the share of the listed images of the
prototype's own class and the number of distinct images; ``prototypes``: the lists
``evaluate`` writes to ``WORKDIR/topk.json``.
"""

from __future__ import annotations

import numpy as np

K = 5  # images per prototype and split (the reference)
_COLUMNS = ("similarity", "image_id", "label", "view", "mask", "own")


def merge(top: dict | None, new: dict, k: int) -> dict:
    """The ``k`` most similar rows per prototype of ``top`` (earlier) and ``new`` (``[n, P]``
    arrays of :data:`_COLUMNS`)."""
    merged = new if top is None else {c: np.concatenate([top[c], new[c]]) for c in _COLUMNS}
    order = np.argsort(-merged["similarity"], axis=0, kind="stable")[:k]
    return {c: np.take_along_axis(merged[c], order, axis=0) for c in _COLUMNS}


class Evaluator:
    name = "topk"
    every_split = True

    def __init__(self, model, k: int = K):
        self.prototype_class = np.asarray(model.prototype_class)
        self.k = max(1, int(k))
        self.top: dict[str, dict] = {}

    def update(self, chunk) -> None:
        out = chunk.outputs
        labels, classes = np.asarray(out.labels), self.prototype_class
        if labels.ndim == 1:
            own = labels[:, None] == classes[None, :]
        else:  # multi-hot: own class when the set holds it; the first class is listed
            own, labels = labels[:, classes] > 0, np.argmax(labels, axis=1)
        per_image = np.stack([out.image_ids, labels, out.num_masks])[..., None]  # [3, n, 1]
        image_ids, labels, num_masks = np.broadcast_arrays(*per_image, out.winning_view)[:3]
        new = {
            "similarity": np.asarray(out.similarities, np.float64),
            "image_id": image_ids,
            "label": labels,
            "view": np.asarray(out.winning_view),
            "mask": np.asarray(out.winning_view) % num_masks,
            "own": own,
        }
        self.top[chunk.split] = merge(self.top.get(chunk.split), new, self.k)

    def result(self) -> dict:
        group = {"k": self.k, "splits": sorted(self.top)}
        lists = [{"prototype": j, "class": int(c)} for j, c in enumerate(self.prototype_class)]
        for split, top in sorted(self.top.items()):
            group[f"own_class_{split}"] = float(100.0 * top["own"].mean())
            group[f"distinct_{split}"] = len(np.unique(top["image_id"]))
            for j, entry in enumerate(lists):
                entry[split] = [
                    {
                        "image_id": int(top["image_id"][r, j]),
                        "label": int(top["label"][r, j]),
                        "similarity": float(top["similarity"][r, j]),
                        "view": int(top["view"][r, j]),
                        "mask": int(top["mask"][r, j]),
                    }
                    for r in range(len(top["similarity"]))
                ]
        return group | {"prototypes": lists}
