"""Multi-label end to end: the attribute parts world, multi-hot batches, the margin loss, the
decision threshold, and a tiny run through train, evaluate and explain, against values
computed here from the records and an independent forward."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo_multilabel
from protomask_jax import evaluate, explain, inference, losses, steps, trainer
from protomask_jax.data import pipeline
from protomask_jax.data import records as records_lib
from segmentation import parts_world as pw

NUM_CLASSES = 4


def test_attribute_world_labels_are_the_painted_signatures(tmp_path):
    metadata = pw.generate(
        tmp_path, num_classes=8, image_size=64, train_per_class=6, test_per_class=1,
        multi_label=True,
    )  # fmt: skip
    specs = pw.attribute_specs(8)
    counts = np.zeros(8)
    for entry in metadata["images"]:
        label = entry["label"]
        assert label == sorted(set(label)) and len(label) >= 1
        parts = [p for c in label for p in specs[c].decisive]
        assert len(parts) == len(set(parts))  # one attribute per part at most
        assert entry["decisive_parts"] == sorted(parts)
        for c in label:  # each attribute is painted: its part in its shape and colour
            ((part, (shape, colour)),) = specs[c].decisive.items()
            painted = entry["parts"][pw.PART_NAMES[part]]
            assert (painted["shape"], painted["colour"]) == (shape, colour)
        for name, painted in entry["parts"].items():  # no other part wears a signature colour
            if pw.PART_NAMES.index(name) not in parts:
                assert painted["colour"] in pw.DISTRACTOR_COLOURS
        counts[label] += 1
    # 8 attributes on 4 parts, a part shows one of its two with probability 1/2: ~1/4 each.
    assert np.all(counts / len(metadata["images"]) > 0.1)
    with pytest.raises(ValueError, match="already holds"):
        pw.generate(tmp_path, num_classes=8, image_size=64, train_per_class=6, test_per_class=1)


def test_batch_accuracy_takes_the_batch_threshold():
    logits = np.array([[3.0, 0.0, 2.0], [1.0, 4.0, 0.0], [0.5, 0.0, 3.5]], np.float32)
    labels = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 0]])
    # TP means per sample: 2.5, 4, 0.5 -> 7/3; TN means: 0, 0.5, 1.75 -> 0.75; threshold 1.5417.
    # Predictions: {0, 2} right, {1} right, {2} wrong.
    accuracy = steps.batch_accuracy(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(accuracy, 2 / 3, rtol=1e-6)


def _reference_margin_loss(logits, targets):
    """torch's MultiLabelMarginLoss(reduction="sum") by its definition, on the reference's
    targets (positive indices, largest first, then -1)."""
    total = 0.0
    for x, hot in zip(logits, targets, strict=True):
        indices = list(np.flatnonzero(hot)[::-1]) + [-1] * (len(x) - hot.sum())
        positives = indices[: indices.index(-1)] if -1 in indices else indices
        for j in positives:
            for i in range(len(x)):
                if i not in positives:
                    total += max(0.0, 1.0 - (x[j] - x[i])) / len(x)
    return total


def test_the_training_loss_takes_the_margin_loss_for_multi_hot_labels():
    logits = np.array([[2.0, -1.0, 0.5, 0.0], [0.2, 0.1, 3.0, -2.0], [1.0, 1.0, 1.0, 1.0]])
    targets = np.array([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]])
    outputs = SimpleNamespace(logits=jnp.asarray(logits, jnp.float32))
    coefficients = SimpleNamespace(ce=1.0, l1=0.0, class_weighted=True)
    prototype_class = jnp.arange(4)
    total, terms = losses.protomask_loss(
        outputs, jnp.asarray(targets), jnp.zeros((4, 2)), jnp.eye(4), prototype_class,
        "finetune", coefficients,
    )  # fmt: skip
    expected = _reference_margin_loss(logits, targets)
    # By hand: sample 0 (positives 0, 2) only the pair (2, 3) costs 1 - 0.5; sample 1
    # (positive 3 at -2) costs 1 + 2.2, 1 + 2.1, 1 + 5; sample 2 has no negatives.
    assert expected == pytest.approx((0.5 + 3.2 + 3.1 + 6.0) / 4)
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    np.testing.assert_allclose(terms["ce"], expected, rtol=1e-6)


# ------------------------------------------------------------------------------ a tiny run


def tiny_multilabel_config(base: Path):
    config = demo_multilabel.get_config()
    config.unlock()
    config.dataset.update(
        root=str(base / "dataset"), records_dir=str(base / "records"), num_classes=NUM_CLASSES
    )
    config.dataset.synthetic.update(
        num_classes=NUM_CLASSES, image_size=64, train_per_class=6, test_per_class=3, seed=0
    )
    config.segmentation.update(method="gt", max_masks=8)
    config.segmentation.shards.update(train=2, test=1)
    config.input.update(
        canvas_size=32, view_size=32, num_views=4, batch_size=8, eval_batch_size=8,
        validation_fraction=0.25,
    )  # fmt: skip
    config.model.update(backbone="resnet_micro", prototype_dim=8, prototypes_per_class=2)
    config.train.update(joint_epochs=2, finetune_epochs=1, eval_every_epochs=1)
    config.lock()
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(config, workdir, results) of a tiny multi-label run, evaluated and explained."""
    from segmentation import export

    base = tmp_path_factory.mktemp("multilabel")
    config = tiny_multilabel_config(base)
    export.export(config, progress=False)
    results = trainer.train_and_evaluate(config, base / "run")
    evaluate.evaluate(config, base / "run", resolution=32, progress=False)
    return config, base / "run", results


def _label_sets_from_records(records_dir, split) -> dict[int, list[int]]:
    sets = {}
    for shard in records_lib.list_shards(records_dir, split):
        for data in records_lib.iter_records(shard):
            record = records_lib.ImageRecord.from_bytes(data)
            sets[record.image_id] = np.atleast_1d(record.label).tolist()
    return sets


def _independent(trained, record_set, indices):
    """Logits of ``indices`` decoded one by one, one eager batch, and their multi-hot labels."""
    examples, hot = [], np.zeros((len(indices), NUM_CLASSES), np.int64)
    for row, i in enumerate(indices):
        record = records_lib.ImageRecord.from_bytes(record_set.reader[int(i)])
        examples.append(pipeline.fit_record(record, trained.spec, f"record {i}"))
        hot[row, np.atleast_1d(record.label)] = 1
    batch = {key: np.stack([e[key] for e in examples]) for key in examples[0]}
    state = jax.device_get(trained.state)
    eval_step = steps.make_eval_step(trained.graphdef, trained.step_config)
    return np.asarray(
        eval_step(state.params, state.batch_stats, state.constants, batch).logits
    ), hot


def _threshold(logits, hot):
    """(mean over samples of the mean positive logit + the same for negatives) / 2."""
    tp = [logits[n][hot[n] > 0].mean() for n in range(len(hot)) if hot[n].any()]
    tn = [logits[n][hot[n] == 0].mean() for n in range(len(hot)) if (hot[n] == 0).any()]
    return (np.mean(tp) + np.mean(tn)) / 2


@pytest.mark.slow
def test_batches_carry_the_label_sets_of_the_generated_images(run):
    config, _, _ = run
    metadata = pw.load_metadata(config.dataset.root)
    generated = {e["id"]: e["label"] for e in metadata["images"] if e["split"] == "train"}
    assert generated == _label_sets_from_records(config.dataset.records_dir, "train")
    record_set = pipeline.RecordSet(config.dataset.records_dir, "train")
    spec = pipeline.PipelineSpec.from_config(config)
    stream = pipeline.eval_stream(record_set, record_set.good, spec, global_batch=8)
    seen = 0
    for batch in stream:
        assert batch["label"].shape == (8, NUM_CLASSES) and batch["label"].dtype == np.int32
        for hot, image_id, weight in zip(
            batch["label"], batch["image_id"], batch["weight"], strict=True
        ):
            if weight > 0:
                assert np.flatnonzero(hot).tolist() == generated[int(image_id)]
                seen += 1
            else:
                assert not hot.any()  # filler rows hold no class
    assert seen == len(generated)
    # class weights count images holding each class
    hot = pipeline.multi_hot([generated[i] for i in sorted(generated)], NUM_CLASSES)
    counts = hot.sum(axis=0)
    np.testing.assert_allclose(
        pipeline.class_weights(hot, NUM_CLASSES), len(hot) / (NUM_CLASSES * counts), rtol=1e-6
    )


@pytest.mark.slow
def test_threshold_is_the_validation_formula_and_evaluate_uses_it(run):
    config, workdir, results = run
    trained = inference.restore_trained(config, workdir)
    train_set = pipeline.RecordSet(config.dataset.records_dir, "train")
    _, val = pipeline.split_train_validation(
        train_set.labels[train_set.good], config.input.validation_fraction, config.seed
    )
    logits, hot = _independent(trained, train_set, train_set.good[val])
    threshold = _threshold(logits, hot)
    np.testing.assert_allclose(trained.meta["multi_label_threshold"], threshold, rtol=1e-5)
    written = json.loads((workdir / "eval.json").read_text())
    np.testing.assert_allclose(written["classification"]["threshold"], threshold, rtol=1e-5)
    np.testing.assert_allclose(results["best"]["threshold"], threshold, rtol=1e-5)

    # results.json and eval.json against sklearn on the test logits at that threshold
    from sklearn import metrics

    test_set = pipeline.RecordSet(config.dataset.records_dir, "test")
    logits, hot = _independent(trained, test_set, test_set.good)
    predicted = (logits > threshold).astype(int)
    subset = metrics.accuracy_score(hot, predicted)
    assert results["test_accuracy"] == pytest.approx(subset)
    group = written["classification"]
    assert group["subset_accuracy"] == pytest.approx(100 * subset)
    samples_f1 = metrics.f1_score(hot, predicted, average="samples", zero_division=0)
    assert group["samples_f1"] == pytest.approx(100 * samples_f1)
    weights = np.array([sum(len(hot) / hot[:, c].sum() for c in np.flatnonzero(h)) for h in hot])
    for name, score in (
        ("precision", metrics.precision_score),
        ("recall", metrics.recall_score),
        ("f1", metrics.f1_score),
    ):
        expected = score(hot, predicted, average="samples", sample_weight=weights, zero_division=0)
        assert group[f"balanced_{name}"] == pytest.approx(100 * expected), name
    both = hot.any(axis=1) & ~hot.all(axis=1)
    auc = metrics.roc_auc_score(
        hot[both], logits[both], average="samples", sample_weight=weights[both]
    )
    assert group["balanced_roc_auc"] == pytest.approx(100 * auc)
    # the families that assume one label per image handle label sets
    assert written["faithfulness"]["num_images"] == len(hot)
    assert written["contrastivity"]["inter_prototype_distance"] is not None


@pytest.mark.slow
def test_push_lands_on_images_holding_the_class_and_explain_writes_the_report(run):
    config, workdir, _ = run
    trained = inference.restore_trained(config, workdir)
    label_sets = _label_sets_from_records(config.dataset.records_dir, "train")
    classes = np.asarray(trained.state.constants["prototype_class"][...])
    for image_id, own in zip(trained.meta["push"]["image_id"], classes, strict=True):
        assert own in label_sets[image_id]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    accuracies = [row["train/accuracy"] for row in rows if "train/accuracy" in row]
    assert accuracies and all(0.0 <= a <= 1.0 for a in accuracies)
    index = explain.explain(config, workdir, num_images=4, progress=False)
    page = index.read_text()
    assert page.count('class="panel ') == 4
    assert "exact-match accuracy" in page
