"""inference: a run restored without its optimizer equals the training-side restore, and one
explainer per explanation type answers both the metrics' and the panels' questions."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from _trained_run import tiny_config, trained_workdir

from protomask_jax import checkpoint as ckpt
from protomask_jax import config_checks, inference, phases, sharding, trainer
from protomask_jax.data import pipeline
from protomask_jax.data import records as records_lib
from protomask_jax.evaluators import chunk as chunk_lib
from protomask_jax.evaluators import frame

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_records):
    return tiny_config(tiny_records), trained_workdir(tmp_path_factory, tiny_records)


def _with_explanation(config, **explain):
    config = config.copy_and_resolve_references()
    config.unlock()
    config.explain.update(explain)
    config.lock()
    return config


def test_restore_reads_the_weights_and_builds_no_optimizer(run, monkeypatch):
    config, workdir = run
    # What resuming training restores: the whole state, optimizer included.
    manager = ckpt.manager(workdir / "checkpoints", max_to_keep=None)
    step = manager.latest_step()
    meta = ckpt.read_meta(manager, step)
    phase = next(p for p in phases.plan_phases(config, 1, pruned=True) if p.name == meta["phase"])
    mesh = sharding.make_mesh(config)
    target = trainer._abstract_train_state(config, mesh, phase, meta["num_prototypes"])
    full = jax.device_get(ckpt.restore_state(manager, step, target))
    assert full.opt_state is not None

    def no_optimizer(*_):
        raise AssertionError("inference built an optimizer")

    monkeypatch.setattr(phases, "make_optimizer", no_optimizer)
    restored = inference.restore_trained(config, workdir, which="latest")
    assert restored.state.opt_state is None
    assert restored.checkpoint == f"checkpoints step {step}"
    assert restored.meta == meta
    ours = jax.device_get(restored.state)
    for name in ckpt.WEIGHTS:
        expected, got = getattr(full, name), getattr(ours, name)
        assert jax.tree.structure(got) == jax.tree.structure(expected)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_equal(a, b)
    # The default picks the last phase's best-on-validation checkpoint.
    assert inference.restore_trained(config, workdir).checkpoint.startswith("best_")


def test_one_explainer_per_kind_for_chunks_and_views(run, tiny_records):
    config, workdir = run
    test_set = pipeline.RecordSet(tiny_records, "test")
    masked = inference.restore_trained(_with_explanation(config, explanation_type="mask"), workdir)
    explainer = inference.explainer(masked, test_set, 16)
    assert isinstance(explainer, inference.MaskExplainer) and explainer.kind == "mask"
    outputs = inference.run_model(masked, test_set, progress=False)
    render = functools.partial(frame.render_frame_maps, test_set, num_views=4, resolution=16)
    chunk = chunk_lib.Chunk(outputs, render)
    maps = explainer.chunk_maps(chunk)
    # The mask of each top prototype's winning view (view v shows mask v % num_masks).
    for n in range(len(outputs.labels)):
        for i, j in enumerate(chunk.top_ids[n]):
            shown = outputs.winning_view[n, j] % outputs.num_masks[n]
            np.testing.assert_array_equal(maps.mask[n, i], chunk.maps.masks[n, shown] != 0)
    record = records_lib.ImageRecord.from_bytes(test_set.reader[0])
    assert explainer.view_maps(record, [0, 1], [0, 1]) is None

    trained = inference.restore_trained(config, workdir)  # the default: prp
    prp_explainer = inference.explainer(trained)
    assert isinstance(prp_explainer, inference.PrpExplainer) and prp_explainer.kind == "prp"
    relevance = prp_explainer.view_maps(record, [0, 1], [2, 3])
    view = config.input.view_size
    assert relevance.shape == (2, view, view) and (relevance >= 0).all() and relevance.any()
    with pytest.raises(ValueError, match="record set and resolution"):
        prp_explainer.chunk_maps(chunk)
    unknown = SimpleNamespace(config=_with_explanation(config, explanation_type="gradcam"))
    with pytest.raises(config_checks.ConfigError, match="explain.explanation_type"):
        inference.explainer(unknown)


def test_the_evaluation_forward_compiles_once_per_run(run, tiny_records):
    # Validation, push, pruning and the final test all ask for it: one compile, not four.
    config, workdir = run
    trained = inference.restore_trained(config, workdir)
    test_set = pipeline.RecordSet(tiny_records, "test")
    for _ in range(2):
        forward = trained.eval_fn()
        for batch in trained.eval_batches(test_set, test_set.good):
            forward(trained.state.params, trained.state.batch_stats, trained.state.constants, batch)
    assert trained.eval_fn() is forward
    assert forward._cache_size() == 1
    assert trained.eval_fn(return_views=True) is not forward
