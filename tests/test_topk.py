"""Top-k images per prototype (``evaluators/topk.py``): the streamed top-k against a plain
argsort of the whole similarity matrix, and ``topk.json`` of a tiny trained run against an
independently collected one."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from _trained_run import independent_outputs, tiny_config, trained_workdir

from protomask_jax import evaluate, inference
from protomask_jax.data import pipeline
from protomask_jax.evaluators import topk


def _split_chunks(rng, sizes, num_prototypes, num_views):
    """Chunks of outputs with integer similarities (many ties) and their concatenation."""
    chunks, first_id = [], 100
    for n in sizes:
        chunks.append(
            SimpleNamespace(
                similarities=rng.integers(0, 4, (n, num_prototypes)).astype(np.float32),
                image_ids=np.arange(first_id, first_id + n),
                labels=rng.integers(0, 3, n),
                winning_view=rng.integers(0, num_views, (n, num_prototypes)),
                num_masks=rng.integers(1, num_views + 1, n),
            )
        )
        first_id += n
    whole = {key: np.concatenate([getattr(c, key) for c in chunks]) for key in vars(chunks[0])}
    return chunks, whole


def test_running_top_k_equals_a_stable_argsort_of_the_whole_matrix():
    rng = np.random.default_rng(0)
    chunks, whole = _split_chunks(rng, [3, 1, 7, 4], num_prototypes=6, num_views=5)
    model = SimpleNamespace(prototype_class=np.array([0, 0, 1, 1, 2, 2]))
    evaluator = topk.Evaluator(model, k=4)
    for outputs in chunks:
        evaluator.update(SimpleNamespace(outputs=outputs, split="test"))
    group = evaluator.result()

    order = np.argsort(-whole["similarities"], axis=0, kind="stable")[:4]  # ties: first image
    for j, entry in enumerate(group["prototypes"]):
        expected, entries = order[:, j], entry["test"]
        assert [e["image_id"] for e in entries] == whole["image_ids"][expected].tolist()
        assert [e["similarity"] for e in entries] == whole["similarities"][expected, j].tolist()
        views = whole["winning_view"][expected, j]
        assert [e["view"] for e in entry["test"]] == views.tolist()
        masks = views % whole["num_masks"][expected]
        assert [e["mask"] for e in entry["test"]] == masks.tolist()
        assert [e["label"] for e in entry["test"]] == whole["labels"][expected].tolist()
        assert entry["class"] == model.prototype_class[j]
    own = whole["labels"][order] == model.prototype_class[None, :]
    assert group["own_class_test"] == pytest.approx(100 * own.mean())
    assert group["distinct_test"] == len(np.unique(whole["image_ids"][order]))
    assert group["k"] == 4 and group["splits"] == ["test"]


def test_fewer_images_than_k_list_them_all():
    rng = np.random.default_rng(1)
    chunks, whole = _split_chunks(rng, [2], num_prototypes=3, num_views=4)
    evaluator = topk.Evaluator(SimpleNamespace(prototype_class=np.zeros(3, int)), k=5)
    evaluator.update(SimpleNamespace(outputs=chunks[0], split="train"))
    entries = evaluator.result()["prototypes"][0]["train"]
    assert sorted(e["image_id"] for e in entries) == whole["image_ids"].tolist()


@pytest.mark.slow
def test_topk_json_of_a_run_equals_an_argsort_of_an_independent_forward(
    tmp_path_factory, tiny_records
):

    workdir = trained_workdir(tmp_path_factory, tiny_records)
    config = tiny_config(tiny_records)
    results = evaluate.evaluate(config, workdir, resolution=16, techniques=["topk"], progress=False)
    written = json.loads((workdir / evaluate.TOPK_FILE).read_text())
    assert written["k"] == 5 and written["checkpoint"] == results["checkpoint"]
    assert "prototypes" not in results["topk"]  # the lists go to topk.json only
    restored = inference.restore_trained(config, workdir)
    eps = config.model.similarity_eps
    for split in ("test", "train"):
        independent = independent_outputs(restored, pipeline.RecordSet(tiny_records, split))
        distances = independent["min_distances"].astype(np.float64)
        similarities = np.log((distances + 1) / (distances + eps))  # [N, P]
        order = np.argsort(-similarities, axis=0, kind="stable")[:5]
        own = []
        for j, entry in enumerate(written["prototypes"]):
            rows = order[:, j]
            got = [e["image_id"] for e in entry[split]]
            assert got == independent["image_ids"][rows].tolist(), (split, j)
            # Near a pushed prototype (d ~ 1e-4) the similarity moves by 1 / (d + eps) ~ 4e3
            # per unit of distance: float32 rounding of d (~1e-7) moves it by up to ~1e-3.
            np.testing.assert_allclose(
                [e["similarity"] for e in entry[split]], similarities[rows, j], rtol=1e-4, atol=2e-3
            )
            views = independent["winning_view"][rows, j]
            assert [e["view"] for e in entry[split]] == views.tolist()
            masks = views % independent["num_masks"][rows]
            assert [e["mask"] for e in entry[split]] == masks.tolist()
            own += (independent["labels"][rows] == entry["class"]).tolist()
        assert results["topk"][f"own_class_{split}"] == pytest.approx(100 * np.mean(own))
    (workdir / "eval.json").unlink()
    (workdir / evaluate.TOPK_FILE).unlink()
