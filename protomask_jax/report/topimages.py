"""Report section "Top images per prototype" (ProtoPNet's global analysis): for the prototypes
the panels show, the training and test images each is most similar to, from
``WORKDIR/topk.json`` (``python -m protomask_jax.evaluate --techniques topk``), the matched
view's mask outlined. Pictures: ``topk/{split}_{image id}_m{mask}_c{class}.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

from protomask_jax import evaluate
from protomask_jax.base import as_path
from protomask_jax.report import html, pictures
from protomask_jax.report.html import e
from protomask_jax.report.names import html_name

SPLITS = ("train", "test")


def _cell(canvas, images, split: str, entry: dict, own: int) -> str:
    decoded = images.get(entry["image_id"])
    overlay = decoded.overlay(entry["mask"], canvas.colours[own], "topk")
    name = f"topk/{split}_{entry['image_id']}_m{entry['mask']}_c{own}.png"
    label = entry["label"][0] if isinstance(entry["label"], list) else entry["label"]
    alt = f"{split} image {entry['image_id']}: {decoded.file_name}"
    return (
        f'<div class="top" title="{e(alt)}">'
        f"{html.img(canvas.save(overlay, name), alt, pictures.SIZES['topk'])}"
        f"<div>{html.chip(canvas.colours[label])} {entry['similarity']:.2f}</div></div>"
    )


def section(canvas, workdir: Path, prototypes, images: dict, checkpoint: str) -> html.Section:
    """The rows of ``prototypes`` (ids), ``images[split]`` their ``pictures.RecordImages``."""
    key, nav, heading = "topk", "Top images", "Top images per prototype"
    path = as_path(workdir) / evaluate.TOPK_FILE
    top = json.loads(path.read_text()) if path.exists() else {}
    if top.get("checkpoint") != checkpoint:
        made = f"{path.name} is of {top['checkpoint']}" if top else f"No {path.name} yet"
        note = (
            f"{made}: run `python -m protomask_jax.evaluate --workdir {workdir} --techniques "
            f"topk` (on {checkpoint}) and re-run this report."
        )
        return html.Section(key, nav, heading, note)
    rows = []
    for j in prototypes:
        entry = top["prototypes"][j]
        own = entry["class"]
        groups = "".join(
            f'<div class="split"><b>{split}</b><div class="tops">'
            + "".join(_cell(canvas, images[split], split, item, own) for item in entry[split])
            + "</div></div>"
            for split in SPLITS
            if entry.get(split)
        )
        chip, name = html.chip(canvas.colours[own]), html_name(canvas.class_names[own])
        rows.append(
            f'<div class="topk" data-prototype="{j}"><div class="proto">{chip}'
            f'<a href="#prototype-{j}">prototype {j}</a><br>{name}</div>{groups}</div>'
        )
    note = (
        f"The {top['k']} training and test images most similar to each prototype shown above, "
        "the matched view's mask outlined in the prototype's class colour; under each the "
        "true class's colour and the similarity."
    )
    return html.Section(key, nav, heading, note, "".join(rows))
