"""Tests of the metric functions of protomask_jax.evaluators against hand-computed values and
plain loop implementations.

The loop implementations below are deliberately naive (one pixel, pair, sample or class at a
time) so they follow the written definitions, not the vectorised code.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.special

from protomask_jax.evaluators import (
    chunk,
    classification,
    compactness,
    complexity,
    contrastivity,
    faithfulness,
    frame,
)

# ------------------------------------------------------- the families' reductions, in short


def vlc(masks):
    return 100 * contrastivity.vlc_per_image(masks).mean()


def intra_prototype_distance(prototypes, ids):
    return contrastivity.intra_vector_distance_per_image(prototypes, ids).mean()


def inter_prototype_distance(prototypes, ids, labels, num_classes):
    return contrastivity.inter_vector_distance_per_class(
        prototypes, ids, labels, num_classes
    ).mean()


def faithfulness_terms(
    similarities, last_layer, logits, labels, winning_view, masks, num_masks, decisive, k=3
):
    outputs = SimpleNamespace(
        similarities=similarities,
        logits=logits,
        labels=labels,
        winning_view=winning_view,
        num_masks=num_masks,
    )
    return faithfulness.faithfulness_per_image(outputs, last_layer, masks, decisive, k)


def explanation_faithfulness(*args, **kwargs):
    return faithfulness.summarize(faithfulness_terms(*args, **kwargs))


def per_map(name, masks, objects, relevance=None):
    """One complexity metric ``[N, k]`` of regions ``masks`` (relevance: the masks or a map)."""
    maps = chunk.ExplanationMaps.from_masks(masks)
    if relevance is not None:
        maps = chunk.ExplanationMaps(relevance=relevance, mask=masks)
    return complexity.object_metrics(chunk.object_sums(maps, objects))[name]


def complexity_summary(masks, objects):
    """The complexity evaluator's group for one chunk holding these regions and objects."""
    n, k = masks.shape[:2]
    maps = SimpleNamespace(
        has_object=np.ones(n, bool),
        has_keypoints=np.zeros(n, bool),
        object_sources={"test"},
        keypoint_sources=set(),
    )
    explanations = chunk.ExplanationMaps.from_masks(masks)
    sums = chunk.object_sums(explanations, objects)
    fake_chunk = SimpleNamespace(
        maps=maps, object_sums=sums, explanations=explanations, top_ids=np.zeros((n, k), int)
    )
    evaluator = complexity.Evaluator(SimpleNamespace(last_layer=np.zeros((1, k))))
    evaluator.update(fake_chunk)
    return evaluator.result()


# ----------------------------------------------------------------------- loop references


def loop_macro_f1(labels, predictions, num_classes, weights=None):
    weights = np.ones(len(labels)) if weights is None else weights
    scores = []
    for c in range(num_classes):
        if c not in labels and c not in predictions:
            continue
        tp = fp = fn = 0.0
        for y, p, w in zip(labels, predictions, weights, strict=True):
            if y == c and p == c:
                tp += w
            elif p == c:
                fp += w
            elif y == c:
                fn += w
        denominator = 2 * tp + fp + fn
        scores.append(2 * tp / denominator if denominator else 0.0)
    return 100 * sum(scores) / len(scores)


def loop_balanced_weights(labels):
    counts = {}
    for y in labels:
        counts[y] = counts.get(y, 0) + 1
    return np.array([len(labels) / counts[y] for y in labels])


def loop_iou(a, b, empty):
    intersection = union = 0
    for value_a, value_b in zip(a.ravel(), b.ravel(), strict=True):
        intersection += bool(value_a) and bool(value_b)
        union += bool(value_a) or bool(value_b)
    return intersection / union if union else empty


def loop_vlc_per_image(masks):
    out = []
    for image in masks:
        k = len(image)
        total = 0.0
        for i in range(k):
            for j in range(k):
                if i != j:
                    total += 1 - loop_iou(image[i], image[j], empty=1.0)
        out.append(total / (k * (k - 1)))
    return np.array(out)


def loop_cosine(a, b):
    norm = max(np.linalg.norm(a), 1e-8) * max(np.linalg.norm(b), 1e-8)
    return float(np.dot(a, b) / norm)


def loop_inter_pd_per_class(prototypes, ids, labels, num_classes):
    """Follows the reference: per class, per member, cosine against every other-class sample
    rank by rank, mean; mean over members; 0 for absent classes or a single present class."""
    present = sorted(set(labels.tolist()))
    result = np.zeros(num_classes)
    if len(present) == 1:
        return result
    for c in present:
        members = [n for n in range(len(labels)) if labels[n] == c]
        others = [n for n in range(len(labels)) if labels[n] != c]
        member_means = []
        for a in members:
            distances = []
            for b in others:
                for r in range(ids.shape[1]):
                    distances.append(1 - loop_cosine(prototypes[ids[a, r]], prototypes[ids[b, r]]))
            member_means.append(np.mean(distances))
        result[c] = np.mean(member_means)
    return result


def loop_top(scores, k):
    """Top-k indices, largest first, lower index first among ties."""
    out = []
    for row in scores:
        order = sorted(range(len(row)), key=lambda j, row=row: (-row[j], j))
        out.append(order[:k])
    return np.array(out)


def loop_explanations(winning_view, masks, num_masks, ids):
    n, k = ids.shape
    out = np.zeros((n, k) + masks.shape[2:], bool)
    for b in range(n):
        for r in range(k):
            out[b, r] = masks[b, winning_view[b, ids[b, r]] % num_masks[b]]
    return out


def loop_keypoint_hits(masks, keypoints):
    n, m, size, _ = masks.shape
    hits = np.zeros((n, m, keypoints.shape[1]), bool)
    for b in range(n):
        for q, (y, x, visible) in enumerate(keypoints[b]):
            if visible <= 0 or y < 0 or x < 0:
                continue
            row, col = min(int(y * size), size - 1), min(int(x * size), size - 1)
            for i in range(m):
                hits[b, i, q] = bool(masks[b, i, row, col])
    return hits


def loop_part_consistency(ids, hits, num_prototypes):
    times = [0] * num_prototypes
    counts = [dict() for _ in range(num_prototypes)]
    for b in range(ids.shape[0]):
        for r in range(ids.shape[1]):
            j = int(ids[b, r])
            times[j] += 1
            for q in np.nonzero(hits[b, r])[0]:
                counts[j][q] = counts[j].get(q, 0) + 1
    scores = []
    for j in range(num_prototypes):
        if times[j] == 0:
            continue
        if counts[j]:
            scores.append(np.mean([c / times[j] for c in counts[j].values()]))
        else:
            scores.append(0.0)
    return 100 * np.mean(scores)


def loop_fraction(mask, region):
    size = inside = 0
    for value, in_region in zip(mask.ravel(), region.ravel(), strict=True):
        size += bool(value)
        inside += bool(value) and bool(in_region)
    return inside / size if size else 0.0


def loop_faithfulness(similarities, weights, logits, labels, winning_view, masks, num_masks, g, k):
    rates, overlaps, chance_rates, chance_overlaps, correct = [], [], [], [], []
    for b in range(len(labels)):
        prediction = int(np.argmax(logits[b]))
        contribution = [similarities[b, j] * weights[prediction, j] for j in range(len(weights[0]))]
        chosen = loop_top(np.array([contribution]), k)[0]
        fractions = [
            loop_fraction(masks[b, winning_view[b, j] % num_masks[b]], g[b]) for j in chosen
        ]
        rates.append(np.mean([f > 0.5 for f in fractions]))
        overlaps.append(np.mean(fractions))
        all_fractions = [loop_fraction(masks[b, i], g[b]) for i in range(num_masks[b])]
        chance_rates.append(np.mean([f > 0.5 for f in all_fractions]))
        chance_overlaps.append(np.mean(all_fractions))
        correct.append(prediction == labels[b])
    correct = np.array(correct)
    return {
        "rate": 100 * np.mean(rates),
        "chance_rate": 100 * np.mean(chance_rates),
        "overlap": 100 * np.mean(overlaps),
        "chance_overlap": 100 * np.mean(chance_overlaps),
        "rate_correct": 100 * np.mean(np.array(rates)[correct]) if correct.any() else math.nan,
        "num_correct": int(correct.sum()),
    }


def random_masks(rng, shape, density=0.4):
    return rng.random(shape) < density


# ------------------------------------------------------------------------ classification


# Hand case: 5 samples, 4 classes; class 3 never occurs in labels or predictions.
HAND_LOGITS = np.array(
    [
        [3.0, 2.0, 1.0, 0.0],  # label 0, predicted 0; class 0 ranks 1st
        [1.0, 3.0, 2.0, 0.0],  # label 0, predicted 1; class 0 ranks 3rd
        [0.0, 2.0, 1.0, -1.0],  # label 1, predicted 1
        [2.0, 1.0, 0.0, -1.0],  # label 2, predicted 0; class 2 ranks 3rd
        [0.0, 1.0, 2.0, -1.0],  # label 2, predicted 2
    ]
)
HAND_LABELS = np.array([0, 0, 1, 2, 2])


def test_classification_hand_case():
    # top-1: samples 0, 2, 4 right -> 3/5.
    assert classification.top1_accuracy(HAND_LOGITS, HAND_LABELS) == pytest.approx(60.0)
    # top-2: also no gain (samples 1 and 3 have their class 3rd) -> 3/5; top-3: all -> 5/5.
    assert classification.topk_accuracy(HAND_LOGITS, HAND_LABELS, k=2) == pytest.approx(60.0)
    assert classification.topk_accuracy(HAND_LOGITS, HAND_LABELS, k=3) == pytest.approx(100.0)
    # recall: class 0 1/2, class 1 1/1, class 2 1/2 -> mean 2/3.
    assert classification.balanced_accuracy(HAND_LOGITS, HAND_LABELS) == pytest.approx(200 / 3)
    # F1: class 0 tp1 fp1 fn1 -> 2/4; class 1 tp1 fp1 fn0 -> 2/3; class 2 tp1 fp0 fn1 -> 2/3.
    # class 3 absent from labels and predictions -> excluded: (1/2 + 2/3 + 2/3) / 3.
    assert classification.macro_f1(HAND_LOGITS, HAND_LABELS) == pytest.approx(100 * (11 / 6) / 3)


def test_balanced_weights_hand_case():
    # N = 5; counts 2, 1, 2 -> weights 5/2, 5/2, 5, 5/2, 5/2.
    np.testing.assert_allclose(
        classification.balanced_sample_weights(HAND_LABELS), [2.5, 2.5, 5.0, 2.5, 2.5]
    )
    # weighted accuracy = (2.5 + 5 + 2.5) / 15 = 2/3 = the balanced accuracy.
    assert classification.top1_accuracy(HAND_LOGITS, HAND_LABELS, balanced=True) == pytest.approx(
        200 / 3
    )
    # weighted F1: class 0 tp 2.5 fp 2.5 (sample 3, true class 2) fn 2.5 -> 5/10;
    # class 1 tp 5 fp 2.5 (sample 1) -> 10/12.5; class 2 tp 2.5 fn 2.5 -> 5/7.5.
    expected = 100 * (0.5 + 10 / 12.5 + 5 / 7.5) / 3
    assert classification.macro_f1(HAND_LOGITS, HAND_LABELS, balanced=True) == pytest.approx(
        expected
    )


def test_classification_matches_loops_on_random_data():
    rng = np.random.default_rng(0)
    for _ in range(5):
        n, c = 40, 7
        logits = rng.normal(size=(n, c))
        labels = rng.integers(0, c - 2, n)  # the last two classes never occur as labels
        predictions = np.argmax(logits, axis=1)
        assert classification.macro_f1(logits, labels) == pytest.approx(
            loop_macro_f1(labels, predictions, c)
        )
        weights = loop_balanced_weights(labels.tolist())
        assert classification.macro_f1(logits, labels, balanced=True) == pytest.approx(
            loop_macro_f1(labels, predictions, c, weights)
        )
        recalls = [np.mean(predictions[labels == y] == y) for y in set(labels.tolist())]
        assert classification.balanced_accuracy(logits, labels) == pytest.approx(
            100 * np.mean(recalls)
        )
        assert classification.top1_accuracy(logits, labels, balanced=True) == pytest.approx(
            100 * np.mean(recalls)
        )
        for k in (1, 3):
            hits = [labels[b] in loop_top(logits[b : b + 1], k)[0] for b in range(n)]
            assert classification.topk_accuracy(logits, labels, k=k) == pytest.approx(
                100 * np.mean(hits)
            )
            expected = 100 * np.sum(np.array(hits) * weights) / weights.sum()
            assert classification.topk_accuracy(
                logits, labels, k=k, balanced=True
            ) == pytest.approx(expected)


def test_macro_f1_matches_sklearn_when_available():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(50, 6))
    labels = rng.integers(0, 5, 50)
    expected = sklearn_metrics.f1_score(
        labels, np.argmax(logits, 1), average="macro", zero_division=0
    )
    assert classification.macro_f1(logits, labels) == pytest.approx(100 * expected)


def test_labels_of_wrong_shape_are_rejected():
    with pytest.raises(ValueError, match=r"labels int \[N\]"):
        classification.top1_accuracy(HAND_LOGITS, np.zeros((5, 4)))


def loop_weighted_auc(scores, positive, weights):
    """Weighted share of (positive, negative) pairs ordered right, ties one half."""
    ordered = total = 0.0
    for i in range(len(scores)):
        for j in range(len(scores)):
            if positive[i] and not positive[j]:
                pair = weights[i] * weights[j]
                total += pair
                ordered += pair * (1.0 if scores[i] > scores[j] else 0.5 * (scores[i] == scores[j]))
    return ordered / total


def test_macro_precision_recall_hand_case():
    # Predictions 0, 1, 1, 0, 2 for labels 0, 0, 1, 2, 2 (HAND_LOGITS); classes 0, 1, 2 occur.
    # Unweighted: precision 1/2, 1/2, 1/1; recall 1/2, 1/1, 1/2.
    scores = classification.macro_scores(HAND_LOGITS, HAND_LABELS)
    assert scores["precision"] == pytest.approx(100 * 2 / 3)
    assert scores["recall"] == pytest.approx(100 * 2 / 3)
    # Balanced weights 2.5, 2.5, 5, 2.5, 2.5: precision class 0: 2.5 / (2.5 + 2.5) = 1/2,
    # class 1: 5 / (5 + 2.5) = 2/3, class 2: 1; recall is the plain recall (equal weights
    # within a class): 1/2, 1, 1/2.
    balanced = classification.macro_scores(HAND_LOGITS, HAND_LABELS, balanced=True)
    assert balanced["precision"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1) / 3)
    assert balanced["recall"] == pytest.approx(100 * 2 / 3)


def test_roc_auc_hand_case():
    # One column, positives scored 0.9 and 0.4, negatives 0.4 and 0.1: pairs (0.9, 0.4) 1,
    # (0.9, 0.1) 1, (0.4, 0.4) tie 1/2, (0.4, 0.1) 1 -> 3.5 / 4.
    scores = np.array([[0.9], [0.4], [0.4], [0.1]])
    positive = np.array([[True], [True], [False], [False]])
    np.testing.assert_allclose(classification.binary_auc(scores, positive, 1.0), [3.5 / 4])
    # weights 1, 3, 1, 1: (1 + 1 + 3 * 0.5 + 3) / (4 * 2) = 6.5 / 8.
    weights = np.array([[1.0], [3.0], [1.0], [1.0]])
    np.testing.assert_allclose(classification.binary_auc(scores, positive, weights), [6.5 / 8])
    # no negatives: undefined
    assert np.isnan(classification.binary_auc(scores, np.ones((4, 1), bool), 1.0)[0])


def test_precision_recall_roc_auc_match_sklearn_with_balanced_weights():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    for c in (3, 7):
        logits = np.round(rng.normal(size=(60, c)), 1)  # rounding makes ties
        labels = rng.integers(0, c, 60)
        labels[:c] = np.arange(c)  # every class present (sklearn's ovr AUC needs it)
        predictions = np.argmax(logits, axis=1)
        weights = loop_balanced_weights(labels.tolist())
        for name, function in (
            ("precision", sklearn_metrics.precision_score),
            ("recall", sklearn_metrics.recall_score),
            ("f1", sklearn_metrics.f1_score),
        ):
            expected = function(
                labels, predictions, average="macro", zero_division=0, sample_weight=weights
            )
            scores = classification.macro_scores(logits, labels, balanced=True)
            assert scores[name] == pytest.approx(100 * expected), name
        probabilities = scipy.special.softmax(logits, axis=1)
        expected = sklearn_metrics.roc_auc_score(
            labels, probabilities, multi_class="ovr", average="macro", sample_weight=weights
        )
        assert classification.roc_auc(logits, labels, balanced=True) == pytest.approx(
            100 * expected
        )
        loops = [loop_weighted_auc(probabilities[:, j], labels == j, weights) for j in range(c)]
        assert classification.roc_auc(logits, labels, balanced=True) == pytest.approx(
            100 * np.mean(loops)
        )


def test_multilabel_threshold_and_scores_hand_case():
    logits = np.array([[4.0, 0.0, 2.0], [1.0, 3.0, -1.0], [0.0, 0.0, 0.0]])
    labels = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0]])
    # TP means: sample 0 (4 + 2) / 2 = 3, sample 1 3; sample 2 has no positives -> left out.
    # TN means: 0, (1 - 1) / 2 = 0, 0. Threshold (3 + 0) / 2 = 1.5.
    threshold = classification.multilabel_threshold(logits, labels)
    assert threshold == pytest.approx(1.5)
    # predictions > 1.5: {0, 2}, {1}, {}: every sample exact; F1 1, 1, 0 (both empty).
    plain = classification.multilabel_scores(logits, labels, threshold)
    assert plain["accuracy"] == pytest.approx(100.0)
    assert plain["f1"] == pytest.approx(200 / 3)
    # threshold 3.5: {0}, {}, {} -> precision 1, 0, 0; recall 1/2, 0, 0; F1 2/3, 0, 0.
    plain = classification.multilabel_scores(logits, labels, 3.5)
    assert (plain["precision"], plain["recall"]) == pytest.approx((100 / 3, 100 / 6))
    assert plain["f1"] == pytest.approx(100 * 2 / 9)
    # per-sample AUC over classes: sample 0 positives 4, 2 vs negative 0 -> 1; sample 1 -> 1;
    # sample 2 has no positive class -> left out.
    assert plain["roc_auc"] == pytest.approx(100.0)
    # balanced weights: class counts 1, 1, 1 -> 3 per positive class: 6, 3, 0.
    np.testing.assert_allclose(classification.balanced_sample_weights(labels), [6.0, 3.0, 0.0])
    balanced = classification.multilabel_scores(logits, labels, 3.5, balanced=True)
    assert balanced["f1"] == pytest.approx(100 * (6 * 2 / 3) / 9)
    assert balanced["precision"] == pytest.approx(100 * 6 / 9)


def test_multilabel_scores_match_sklearn_samples_averages():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(40, 5))
    labels = rng.random((40, 5)) < 0.35
    labels[:, 0] |= ~labels.any(axis=1)  # every sample has a positive and (below) a negative
    labels[:, 4] &= ~labels[:, :4].all(axis=1)
    threshold = classification.multilabel_threshold(logits, labels)
    tp_means = [logits[b][labels[b]].mean() for b in range(40)]
    tn_means = [logits[b][~labels[b]].mean() for b in range(40)]
    assert threshold == pytest.approx((np.mean(tp_means) + np.mean(tn_means)) / 2)
    predictions = logits > threshold
    weights = classification.balanced_sample_weights(labels)
    counts = labels.sum(axis=0)
    loop_weights = [sum(40 / counts[c] for c in range(5) if labels[b, c]) for b in range(40)]
    np.testing.assert_allclose(weights, loop_weights)
    for balanced, sample_weight in ((False, None), (True, weights)):
        scores = classification.multilabel_scores(logits, labels, threshold, balanced=balanced)
        for name, function in (
            ("precision", sklearn_metrics.precision_score),
            ("recall", sklearn_metrics.recall_score),
            ("f1", sklearn_metrics.f1_score),
        ):
            expected = function(
                labels, predictions, average="samples", zero_division=0, sample_weight=sample_weight
            )
            assert scores[name] == pytest.approx(100 * expected), name
        expected = sklearn_metrics.accuracy_score(labels, predictions, sample_weight=sample_weight)
        assert scores["accuracy"] == pytest.approx(100 * expected)
        expected = sklearn_metrics.roc_auc_score(
            labels, logits, average="samples", sample_weight=sample_weight
        )
        assert scores["roc_auc"] == pytest.approx(100 * expected)


def test_classification_evaluator_takes_multi_hot_labels():
    logits = np.array([[4.0, 0.0, 2.0], [1.0, 3.0, -1.0], [0.0, 0.0, 0.0]])
    labels = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0]])
    evaluator = classification.Evaluator(SimpleNamespace())
    evaluator.update(SimpleNamespace(outputs=SimpleNamespace(logits=logits, labels=labels)))
    group = evaluator.result()
    assert group["threshold"] == pytest.approx(1.5)  # derived from the images (hand case)
    assert group["subset_accuracy"] == pytest.approx(100.0)
    assert group["samples_f1"] == pytest.approx(200 / 3)
    # balanced weights 6, 3, 0: both weighted samples exact and F1 1.
    assert group["balanced_accuracy"] == group["balanced_f1"] == pytest.approx(100.0)
    assert "top1_accuracy" not in group
    # a run's own threshold wins: 3.5 as in the hand case.
    evaluator = classification.Evaluator(SimpleNamespace(multi_label_threshold=3.5))
    evaluator.update(SimpleNamespace(outputs=SimpleNamespace(logits=logits, labels=labels)))
    assert evaluator.result()["samples_f1"] == pytest.approx(100 * 2 / 9)


def test_classification_evaluator_single_label_group():
    evaluator = classification.Evaluator(SimpleNamespace())
    evaluator.update(
        SimpleNamespace(outputs=SimpleNamespace(logits=HAND_LOGITS, labels=HAND_LABELS))
    )
    group = evaluator.result()
    assert group["top1_accuracy"] == pytest.approx(60.0)
    assert group["balanced_accuracy"] == pytest.approx(200 / 3)
    # balanced top-3: every sample's class is in its top 3 -> 100.
    assert group["balanced_top3_accuracy"] == pytest.approx(100.0)
    assert group["balanced_precision"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1) / 3)
    assert 0.0 <= group["balanced_roc_auc"] <= 100.0


# --------------------------------------------------------------------------- compactness


def test_compactness_hand_case():
    eps = 1e-3
    last_layer = np.array(
        [
            [1.0, 0.0, -0.5, 0.0005],  # prototype 0 positive
            [0.0, 0.002, -0.002, 0.0],  # prototype 1 positive (0.002 > eps)
        ]
    )
    # positive columns: 0, 1 (prototype 3's 0.0005 <= eps) -> 2.
    assert compactness.global_explanation_size(last_layer, eps) == 2
    # |w| <= eps: 0.0, 0.0005, 0.0, 0.0 -> 4 of 8 -> 50 %.
    assert compactness.classification_sparsity(last_layer, eps) == pytest.approx(50.0)
    # negatives -0.5, -0.002 = 2; positives 1.0, 0.002 = 2 -> 1.
    assert compactness.negative_positive_reasoning_ratio(last_layer, eps) == pytest.approx(1.0)


def test_npr_without_positive_weights():
    assert compactness.negative_positive_reasoning_ratio(np.zeros((2, 3))) == 0.0
    assert compactness.negative_positive_reasoning_ratio(-np.ones((2, 3))) == math.inf


def test_compactness_matches_loops():
    rng = np.random.default_rng(3)
    last_layer = rng.normal(scale=2e-3, size=(6, 11))
    eps = 1e-3
    flat = last_layer.ravel().tolist()
    columns = [any(last_layer[c, j] > eps for c in range(6)) for j in range(11)]
    assert compactness.global_explanation_size(last_layer) == sum(columns)
    assert compactness.classification_sparsity(last_layer) == pytest.approx(
        100 * sum(abs(w) <= eps for w in flat) / len(flat)
    )
    assert compactness.negative_positive_reasoning_ratio(last_layer) == pytest.approx(
        sum(w < -eps for w in flat) / sum(w > eps for w in flat)
    )


# ------------------------------------------------------------ explanation masks and boxes


def test_top_prototypes_orders_and_breaks_ties_by_index():
    similarities = np.array([[0.1, 0.5, 0.5, 0.9, 0.0]])
    np.testing.assert_array_equal(chunk.top_indices(similarities, 3), [[3, 1, 2]])
    rng = np.random.default_rng(4)
    scores = rng.integers(0, 4, size=(10, 8)).astype(float)  # many ties
    np.testing.assert_array_equal(chunk.top_indices(scores, 5), loop_top(scores, 5))


def test_explanation_masks_use_cyclic_view_index():
    masks = np.zeros((1, 4, 2, 2), bool)
    masks[0, 0, 0, 0] = masks[0, 1, 1, 1] = True  # 2 real masks, slots 2-3 padding
    winning_view = np.array([[0, 1, 2, 3]])
    out = chunk.explanation_masks(winning_view, masks, np.array([2]), np.array([[2, 3, 0]]))
    # view 2 -> mask 0, view 3 -> mask 1, view 0 -> mask 0.
    np.testing.assert_array_equal(out[0], masks[0, [0, 1, 0]])
    rng = np.random.default_rng(5)
    masks = random_masks(rng, (6, 5, 4, 4))
    num_masks = rng.integers(1, 6, 6)
    winning_view = rng.integers(0, 5, (6, 9))
    ids = rng.integers(0, 9, (6, 3))
    np.testing.assert_array_equal(
        chunk.explanation_masks(winning_view, masks, num_masks, ids),
        loop_explanations(winning_view, masks, num_masks, ids),
    )


def test_explanation_masks_reject_bad_mask_counts():
    with pytest.raises(ValueError, match="num_masks must lie"):
        chunk.explanation_masks(
            np.zeros((1, 2), int), np.zeros((1, 3, 2, 2)), np.array([0]), np.zeros((1, 1), int)
        )


def test_local_explanation_size_golden_cases():
    # The reference's unit-test cases: scores relative to each image's largest, > 0.1.
    local_size = compactness.local_explanation_size
    np.testing.assert_array_equal(local_size([[2, 0.2], [0.05, 0.04], [1.1, 10.0]]), [1, 2, 2])
    np.testing.assert_array_equal(local_size([[0.0, 0.0], [0.0, 0.0]]), [0, 0])  # 0/0 -> none
    # exactly at the threshold: 0.02 / 0.2 and 0.01 / 0.1 do not count.
    np.testing.assert_array_equal(local_size([[0.02, 0.2], [0.11, 0.1], [0.01, 0.1]]), [1, 2, 1])
    np.testing.assert_array_equal(local_size([[0.2]]), [1])


def test_local_explanation_size_matches_loop():
    rng = np.random.default_rng(4)
    scores = rng.random((9, 13)) ** 4
    expected = [sum(s / max(row) > 0.1 for s in row) for row in scores]
    np.testing.assert_array_equal(compactness.local_explanation_size(scores), expected)


# ---------------------------------------------------------------------------- contrastivity


def test_vlc_golden_cases():
    a = np.zeros((4, 4), bool)
    a[0, :4] = True  # 4 pixels
    b = np.zeros((4, 4), bool)
    b[0, 2:4] = b[1, 2:4] = True  # 4 pixels, 2 shared with a -> IoU 2/6
    far = np.zeros((4, 4), bool)
    far[3, 0] = True
    empty = np.zeros((4, 4), bool)
    masks = np.stack(
        [
            [a, b],  # change 1 - 1/3 = 2/3 for both ordered pairs
            [a, a],  # identical -> 0
            [a, far],  # no overlap -> 1
            [empty, empty],  # both empty: identical by our convention -> 0
        ]
    )
    np.testing.assert_allclose(contrastivity.vlc_per_image(masks), [2 / 3, 0.0, 1.0, 0.0])
    assert vlc(masks) == pytest.approx(100 * (2 / 3 + 1) / 4)
    # k = 3: masks a, a, far -> pairs (a,a) 0 twice, (a,far) 1 four times -> 4/6.
    np.testing.assert_allclose(contrastivity.vlc_per_image(np.stack([[a, a, far]])), [4 / 6])


def test_vlc_matches_loop_and_accepts_jax_arrays():
    import jax.numpy as jnp

    rng = np.random.default_rng(7)
    masks = random_masks(rng, (5, 4, 6, 6), density=0.3)
    masks[0, 1] = False  # an empty mask among non-empty ones
    np.testing.assert_allclose(contrastivity.vlc_per_image(masks), loop_vlc_per_image(masks))
    assert vlc(jnp.asarray(masks)) == pytest.approx(100 * loop_vlc_per_image(masks).mean())


def test_vlc_needs_two_explanations():
    with pytest.raises(ValueError, match="k >= 2"):
        contrastivity.vlc_per_image(np.ones((1, 1, 2, 2), bool))


def test_intra_prototype_distance_hand_case():
    prototypes = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [1.0, 1e-3]])
    # ids (0, 1, 2): distances 1, 0, 1 -> ordered pairs sum 4 over 6 -> 2/3.
    # ids (0, 3): 1 - cos = 1 - 1/sqrt(1 + 1e-6) = 5e-7 < 1e-5 -> 0.
    ids = np.array([[0, 1, 2], [0, 3, 3]])
    np.testing.assert_allclose(
        contrastivity.intra_vector_distance_per_image(prototypes, ids), [2 / 3, 0.0]
    )
    assert intra_prototype_distance(prototypes, ids) == pytest.approx(1 / 3)


def test_intra_prototype_distance_matches_loop():
    rng = np.random.default_rng(8)
    prototypes = rng.normal(size=(12, 6))
    ids = np.stack([rng.permutation(12)[:5] for _ in range(7)])
    expected = []
    for row in ids:
        pairs = []
        for i in row:
            for j in row:
                if i != j:
                    distance = 1 - loop_cosine(prototypes[i], prototypes[j])
                    pairs.append(distance if distance >= 1e-5 else 0.0)
        expected.append(np.mean(pairs))
    np.testing.assert_allclose(
        contrastivity.intra_vector_distance_per_image(prototypes, ids), expected, rtol=1e-12
    )


def test_inter_prototype_distance_hand_case():
    prototypes = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    ids = np.array([[0, 1], [0, 0], [2, 1]])
    labels = np.array([0, 0, 1])
    # class 0 vs image 2: image 0 ranks (0 vs 2: 1-(-1)=2, 1 vs 1: 0) -> 1;
    # image 1 (0 vs 2: 2, 0 vs 1: 1) -> 1.5; mean 1.25.
    # class 1 (image 2) vs images 0, 1: (2 + 0) / 2 = 1 and (2 + 1) / 2 = 1.5 -> 1.25.
    # class 2 absent -> 0.
    per_class = contrastivity.inter_vector_distance_per_class(prototypes, ids, labels, 3)
    np.testing.assert_allclose(per_class, [1.25, 1.25, 0.0])
    assert inter_prototype_distance(prototypes, ids, labels, 3) == pytest.approx(2.5 / 3)
    # a single present class gives zeros (reference).
    np.testing.assert_array_equal(
        contrastivity.inter_vector_distance_per_class(prototypes, ids, np.zeros(3, int), 3), 0.0
    )
    # multi-hot labels with one present class but an unlabelled image 2: still one class -> 0.
    only_class_0 = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(
        contrastivity.inter_vector_distance_per_class(prototypes, ids, only_class_0, 3), 0.0
    )
    # a class labelled on every image has no other images: 0 (the reference gives nan);
    # class 1 (image 2) vs images 0, 1 as above -> 1.25.
    all_class_0 = np.array([[1, 0, 0], [1, 0, 0], [1, 1, 0]])
    np.testing.assert_allclose(
        contrastivity.inter_vector_distance_per_class(prototypes, ids, all_class_0, 3),
        [0.0, 1.25, 0.0],
    )


def test_inter_prototype_distance_matches_reference_loop():
    rng = np.random.default_rng(9)
    prototypes = rng.random((15, 4))
    ids = np.stack([rng.permutation(15)[:5] for _ in range(12)])
    labels = rng.choice([0, 1, 3, 4], size=12)  # classes 2 and 5 absent
    np.testing.assert_allclose(
        contrastivity.inter_vector_distance_per_class(prototypes, ids, labels, 6),
        loop_inter_pd_per_class(prototypes, ids, labels, 6),
        rtol=1e-10,
        atol=1e-12,
    )
    one_hot = np.eye(6)[labels]
    assert inter_prototype_distance(prototypes, ids, one_hot, 6) == pytest.approx(
        loop_inter_pd_per_class(prototypes, ids, labels, 6).mean()
    )


def test_vac_golden_cases():
    # The reference's unit-test maps: image 0 four 2s against four 1s -> 1 - 4/8; image 1 six
    # 1s against six 5s -> 1 - 6/30 (values compared sorted, wherever they lie).
    first = np.zeros((2, 2, 4, 4))
    first[0, 0, :2, :2], first[0, 1, :2, 2:] = 2, 1
    first[1, 0].flat[[0, 3, 9, 13, 14, 15]] = 1
    first[1, 1].flat[[3, 8, 12, 13, 14, 15]] = 5
    maps = chunk.ExplanationMaps(relevance=first, mask=first > 0)
    np.testing.assert_allclose(
        contrastivity.vac_per_image(contrastivity.sorted_maps(maps)), [0.5, 0.8]
    )
    # A binary map's values are its size: 1 - min / max, the same as sorting 0/1 maps.
    rng = np.random.default_rng(5)
    masks = random_masks(rng, (4, 3, 5, 5))
    masks[0, 0] = masks[0, 1] = False  # two empty maps: identical, change 0
    binary = contrastivity.sorted_maps(chunk.ExplanationMaps.from_masks(masks))
    as_floats = chunk.ExplanationMaps(relevance=masks.astype(float), mask=masks)
    np.testing.assert_allclose(
        contrastivity.vac_per_image(binary),
        contrastivity.vac_per_image(contrastivity.sorted_maps(as_floats)),
    )


def test_vac_matches_loop_on_float_maps():
    rng = np.random.default_rng(6)
    maps = rng.random((3, 4, 3, 3)) * (rng.random((3, 4, 3, 3)) < 0.5)
    explanations = chunk.ExplanationMaps(relevance=maps, mask=maps > 0)
    expected = []
    for image in maps:
        changes = []
        for i in range(4):
            for j in range(4):
                if i != j:
                    a = sorted(image[i].ravel(), reverse=True)
                    b = sorted(image[j].ravel(), reverse=True)
                    low = sum(min(x, y) for x, y in zip(a, b, strict=True))
                    high = sum(max(x, y) for x, y in zip(a, b, strict=True))
                    changes.append(1 - low / high)
        expected.append(np.mean(changes))
    np.testing.assert_allclose(
        contrastivity.vac_per_image(contrastivity.sorted_maps(explanations)), expected
    )


def test_plc_and_palc_on_views():
    # Winning views 0, 3, 1: |0-3| + |0-1| + |3-1| = 6, twice over 6 ordered pairs -> 2.
    np.testing.assert_allclose(contrastivity.plc_per_image([[0, 3, 1], [2, 2, 2]]), [2.0, 0.0])
    # Min-max over the views: (s - min) / (max - min) > 0.5; all equal -> no view (0/0).
    view_similarities = np.array([[[1.0, 2.0, 3.0], [1.0, 2.5, 3.0], [4.0, 4.0, 4.0]]])
    masks = contrastivity.min_max_view_masks(view_similarities)
    np.testing.assert_array_equal(masks, [[[0, 0, 1], [0, 1, 1], [0, 0, 0]]])
    # PALC = VLC of those view sets: pairs {2}/{1,2} 1 - 1/2, {2}/{} 1, {1,2}/{} 1 -> 5/6.
    np.testing.assert_allclose(contrastivity.vlc_per_image(masks), [(0.5 + 1 + 1) / 3])


def test_vector_distances_golden_cases():
    # The reference's cases: equal vectors 0, orthogonal 1, opposite 2.
    vectors = np.array([[1, 1, 1], [1, 1, 1], [0, 0, 1], [1, 0, 0], [-1, 1, 1], [1, -1, -1.0]])
    ids = np.array([[0, 1], [2, 3], [4, 5]])
    np.testing.assert_allclose(
        contrastivity.intra_vector_distance_per_image(vectors, ids), [0, 1, 2], atol=1e-12
    )
    # Image 0 three (1, 1, 1), image 1 three zero vectors (cosine 0): both classes 1.
    vectors = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    per_class = contrastivity.inter_vector_distance_per_class(
        vectors, np.array([[0, 0, 0], [1, 1, 1]]), np.array([[1, 0], [0, 1]]), 2
    )
    np.testing.assert_allclose(per_class, [1.0, 1.0])


def test_prototype_entropy_golden_case_and_loop():
    # The reference's case: prototypes 0-3 score 0.1 twice (one bin -> 0 bits); prototype 4
    # scores 0.1 and 1.0 (bins 1 and 9, half each -> 1 bit).
    similarities = np.array([[0.1] * 5, [0.1, 0.1, 0.1, 0.1, 1.0]])
    np.testing.assert_allclose(contrastivity.prototype_entropy(similarities), [0, 0, 0, 0, 1])
    rng = np.random.default_rng(10)
    similarities = rng.random((2000, 6)) ** np.array([1, 2, 4, 8, 30, 200])
    expected = []
    for column in similarities.T:
        counts = [0] * 10
        for value in column / column.max():
            counts[min(int(value * 10), 9)] += 1
        probabilities = [c / len(column) for c in counts]
        entropy = -sum(p * math.log2(p) for p in probabilities if p >= 1e-3)
        expected.append(min(max(entropy, 0.0), 1.0))
    np.testing.assert_allclose(contrastivity.prototype_entropy(similarities), expected)
    assert 0 < min(expected) < 1  # the last columns are concentrated enough to fall below 1


def test_contrastivity_evaluator_group():
    # 2 images, P = 3 prototypes, k = 2, K = 3 views, D = 2.
    outputs = SimpleNamespace(
        labels=np.array([0, 1]),
        similarities=np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]]),
        winning_view=np.array([[0, 2, 1], [1, 4, 0]]),  # view 4 repeats mask 1 (of 3)
        num_masks=np.array([3, 3]),
        top_view_similarities=np.array([[[3, 1, 1], [1, 1, 2.0]], [[1, 1, 3], [2, 2, 1.0]]]),
        top_embeddings=np.array([[[1, 0], [0, 1.0]], [[1, 1], [1, 1.0]]]),
    )
    masks = np.zeros((2, 2, 2, 2), bool)
    masks[0, 0, 0], masks[0, 1, 1], masks[1, 0, 0], masks[1, 1, 0, 0] = True, True, True, True
    fake_chunk = SimpleNamespace(
        outputs=outputs,
        top_ids=np.array([[0, 1], [2, 1]]),
        explanations=chunk.ExplanationMaps.from_masks(masks),
    )
    model = SimpleNamespace(prototypes=np.eye(3, 2), last_layer=np.zeros((2, 3)))
    evaluator = contrastivity.Evaluator(model)
    evaluator.update(fake_chunk)
    group = evaluator.result()
    # VLC: image 0 disjoint rows -> 1; image 1 row 0 vs its first pixel -> 1 - 1/2.
    assert group["vlc"] == pytest.approx(100 * (1 + 0.5) / 2)
    # VAC: sizes 2, 2 -> 0; 2, 1 -> 1/2.
    assert group["vac"] == pytest.approx(100 * 0.25)
    # PLC: views of prototypes (0, 1) in image 0: 0, 2 -> 2; (2, 1) in image 1: 0, 1 -> 1.
    assert group["plc"] == pytest.approx(1.5)
    # PALC: image 0 view sets {0} and {2} -> 1; image 1 {2} and {0, 1} -> 1.
    assert group["palc"] == pytest.approx(100.0)
    # FD: image 0 orthogonal embeddings -> 1; image 1 equal -> 0. Inter FD: class 0 image
    # (1, 0), (0, 1) vs (1, 1), (1, 1) rank-wise: 1 - 1/sqrt(2) each; the same for class 1.
    assert group["intra_feature_distance"] == pytest.approx(0.5)
    assert group["inter_feature_distance"] == pytest.approx(1 - 1 / math.sqrt(2))
    # prototypes 0, 1 (image 0) and 2, 1 (image 1): all three used, prototype 1 twice.
    assert group["prototype_histogram"] == {"0": 1, "1": 2, "2": 1}
    assert group["prototypes_used"] == 3
    # prototypes 0 and 2 score 1 and 1/3 of their peak (two bins -> 1 bit), prototype 1
    # scores 2 twice (one bin -> 0 bits).
    assert group["prototype_entropy"] == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- complexity


def test_complexity_golden_cases():
    g = np.zeros((4, 4), bool)
    g[:2, :2] = True  # object: 4 pixels top-left
    inside = np.zeros((4, 4), bool)
    inside[0, :2] = True  # 2 pixels, all on the object
    outside = np.zeros((4, 4), bool)
    outside[3, :] = True  # 4 pixels, none on the object
    half = np.zeros((4, 4), bool)
    half[1, :4] = True  # 4 pixels, 2 on the object
    empty = np.zeros((4, 4), bool)
    s = np.stack([[inside, outside, half, empty]])
    gt = g[None]
    # object overlap |S∩G|/|G|: 2/4, 0, 2/4, 0.
    np.testing.assert_allclose(per_map("object_overlap", s, gt), [[0.5, 0, 0.5, 0]])
    # background 1 - |S∩G|/|S|: 0, 1, 1/2, 0 (empty S -> 0).
    np.testing.assert_allclose(per_map("background_overlap", s, gt), [[0, 1, 0.5, 0]])
    # IoU: 2/4, 0/8, 2/6, 0/4.
    np.testing.assert_allclose(per_map("iou", s, gt), [[0.5, 0, 1 / 3, 0]])
    # IOR of binary maps: [S∩G≠∅] - [S\G≠∅] -> 1, -1, 0, 0 (all-zero map).
    np.testing.assert_allclose(per_map("ior", s, gt), [[1.0, -1.0, 0.0, 0.0]])
    # OIRR: only inside -> 0; nothing inside -> inf; half -> 1/1; all-zero -> inf.
    np.testing.assert_allclose(per_map("oirr", s, gt), [[0.0, np.inf, 1.0, np.inf]])
    summary = complexity_summary(s, gt)
    assert summary["object_overlap"] == pytest.approx(100 * 1.0 / 4)
    assert summary["background_overlap"] == pytest.approx(100 * 1.5 / 4)
    assert summary["iou"] == pytest.approx(100 * (0.5 + 1 / 3) / 4)
    assert summary["ior"] == pytest.approx(0.0)
    assert summary["oirr"] == pytest.approx(0.5)  # mean of the finite ratios 0 and 1


def test_complexity_with_empty_object_mask():
    s = np.ones((1, 2, 3, 3), bool)
    gt = np.zeros((1, 3, 3), bool)
    np.testing.assert_array_equal(per_map("object_overlap", s, gt), 0.0)
    np.testing.assert_array_equal(per_map("background_overlap", s, gt), 1.0)
    np.testing.assert_array_equal(per_map("iou", s, gt), 0.0)
    assert math.isnan(complexity_summary(s, gt)["oirr"])


def test_relevance_metrics_match_loops_on_float_maps():
    rng = np.random.default_rng(10)
    relevance = rng.random((3, 4, 5, 5)) * (rng.random((3, 4, 5, 5)) < 0.5)
    relevance[0, 0] = 0.0  # all-zero map
    g = random_masks(rng, (3, 5, 5), density=0.5)
    ior, oirr = np.zeros((3, 4)), np.zeros((3, 4))
    for b in range(3):
        for i in range(4):
            a = relevance[b, i]
            peak = a.max()
            normalised = a / peak if peak else a * 0
            ins = [v for v, m in zip(normalised.ravel(), g[b].ravel(), strict=True) if m and v]
            outs = [v for v, m in zip(normalised.ravel(), g[b].ravel(), strict=True) if not m and v]
            ior[b, i] = (np.mean(ins) if ins else 0) - (np.mean(outs) if outs else 0)
            raw_in = [v for v, m in zip(a.ravel(), g[b].ravel(), strict=True) if m and v]
            raw_out = [v for v, m in zip(a.ravel(), g[b].ravel(), strict=True) if not m and v]
            if not raw_in:
                oirr[b, i] = np.inf
            else:
                oirr[b, i] = (np.mean(raw_out) if raw_out else 0) / np.mean(raw_in)
    regions = relevance != 0
    np.testing.assert_allclose(per_map("ior", regions, g, relevance), ior)
    np.testing.assert_allclose(per_map("oirr", regions, g, relevance), oirr)
    masks = relevance > 0
    for b in range(3):
        for i in range(4):
            assert per_map("iou", masks, g)[b, i] == pytest.approx(
                loop_iou(masks[b, i], g[b], empty=0.0)
            )
            assert per_map("object_overlap", masks, g)[b, i] == pytest.approx(
                loop_fraction(g[b], masks[b, i])
            )


def test_mask_explanations_take_a_shortcut_to_the_sums_of_the_general_path():
    rng = np.random.default_rng(15)
    masks = random_masks(rng, (4, 3, 6, 6), density=0.3)
    masks[0, 0] = False  # an empty region
    objects = random_masks(rng, (4, 6, 6), density=0.5)
    shortcut = chunk.object_sums(chunk.ExplanationMaps.from_masks(masks), objects)
    general_maps = chunk.ExplanationMaps(relevance=masks.astype(np.float32), mask=masks)
    assert chunk.ExplanationMaps.from_masks(masks).binary and not general_maps.binary
    general = chunk.object_sums(general_maps, objects)
    for field in ("size", "inside", "relevance", "relevance_inside", "support", "peak"):
        np.testing.assert_array_equal(getattr(shortcut, field), getattr(general, field), field)


def test_relevance_maps_keep_the_pixels_at_or_above_their_95th_percentile():
    ramp = np.arange(1.0, 21.0).reshape(1, 1, 4, 5)  # 95th percentile 1 + 0.95 * 19 = 19.05
    maps = chunk.ExplanationMaps.from_relevance(ramp)
    np.testing.assert_array_equal(maps.mask[0, 0], ramp[0, 0] == 20)
    np.testing.assert_array_equal(maps.relevance[0, 0], np.where(ramp[0, 0] == 20, 20.0, 0.0))
    # Mostly zero: the percentile is 0, so every pixel is in the region but only the nonzero
    # ones carry relevance (the IOR/OIRR support is smaller than the region).
    sparse = np.zeros((1, 1, 5, 8))  # 95th percentile: between sorted values 37 and 38, both 0
    sparse[0, 0, 0, 0] = 3.0
    maps = chunk.ExplanationMaps.from_relevance(sparse)
    assert maps.mask.all() and not maps.binary
    sums = chunk.object_sums(maps, np.ones((1, 5, 8), bool))
    assert (sums.size[0, 0], sums.support[0, 0], sums.relevance[0, 0]) == (40.0, 1.0, 3.0)


# --------------------------------------------------------------------- keypoints / consistency


def test_keypoints_on_masks_fixes_reference_bugs():
    masks = np.zeros((1, 2, 4, 4), bool)
    masks[0, 0, 3, 3] = True  # the last pixel, where the reference's (-1, -1) padding lands
    masks[0, 1, 0, 1] = True
    keypoints = np.array(
        [
            [
                [-1.0, -1.0, 1.0],  # padding, even with the visible flag set: never counts
                [0.1, 0.3, 1.0],  # pixel (0, 1) -> on mask 1
                [0.1, 0.3, 0.0],  # same place but invisible -> nowhere
                [1.0, 1.0, 1.0],  # y = x = 1 -> clamped to the last pixel -> on mask 0
            ]
        ]
    )
    hits = complexity.keypoints_on_masks(masks, keypoints)
    np.testing.assert_array_equal(hits, [[[0, 0, 0, 1], [0, 1, 0, 0]]])
    rng = np.random.default_rng(11)
    masks = random_masks(rng, (4, 3, 6, 6))
    keypoints = np.concatenate(
        [rng.uniform(-0.2, 1.0, (4, 5, 2)), rng.integers(0, 2, (4, 5, 1))], axis=-1
    )
    np.testing.assert_array_equal(
        complexity.keypoints_on_masks(masks, keypoints), loop_keypoint_hits(masks, keypoints)
    )


def test_part_consistency_hand_case():
    ids = np.array([[0, 1], [0, 2]])
    hits = np.zeros((2, 2, 3), bool)
    hits[0, 0, [0, 1]] = True  # prototype 0 covers parts 0, 1
    hits[1, 0, 0] = True  # prototype 0 covers part 0
    hits[1, 1, 2] = True  # prototype 2 covers part 2; prototype 1 covers nothing
    # times: p0 2, p1 1, p2 1. p0: part 0 2/2, part 1 1/2 -> 0.75; p1 -> 0; p2: 1/1 -> 1.
    # prototype 3 never activated -> not counted. (0.75 + 0 + 1) / 3.
    assert complexity.part_consistency(ids, hits, 4) == pytest.approx(100 * 1.75 / 3)
    assert complexity.part_consistency(ids, np.zeros_like(hits), 4) == 0.0


def test_part_consistency_matches_loop():
    rng = np.random.default_rng(12)
    ids = np.stack([rng.permutation(10)[:5] for _ in range(15)])
    hits = rng.random((15, 5, 6)) < 0.3
    assert complexity.part_consistency(ids, hits, 10) == pytest.approx(
        loop_part_consistency(ids, hits, 10)
    )


# ------------------------------------------------------------------------- faithfulness


def test_decisive_part_masks_ignore_padding_and_background():
    part_map = np.array([[[0, 1], [2, 3]]])  # background, parts 0, 1, 2
    # decisive parts {2}, padded with -1: the padding must not select background pixels.
    np.testing.assert_array_equal(
        frame.decisive_part_masks(part_map, np.array([[2, -1]])), [[[0, 0], [0, 1]]]
    )
    np.testing.assert_array_equal(
        frame.decisive_part_masks(part_map, np.array([[0, 1]])), [[[0, 1], [1, 0]]]
    )


def test_faithfulness_hand_case():
    # One image, frame 2x4, decisive part = left half (4 pixels).
    g = np.zeros((1, 2, 4), bool)
    g[0, :, :2] = True
    masks = np.zeros((1, 4, 2, 4), bool)
    masks[0, 0, :, :3] = True  # 6 px, 4 on G -> 2/3 -> hit
    masks[0, 1, :, 2:] = True  # 4 px, 0 on G -> miss
    masks[0, 2, 0, 1:3] = True  # 2 px, 1 on G -> 1/2, not > 1/2 -> miss
    num_masks = np.array([3])  # slot 3 is padding (cyclic copy of mask 0)
    similarities = np.array([[1.0, 2.0, 3.0, 0.5]])
    last_layer = np.array([[1.0, 1.0, 0.0, 4.0], [0.0, 0.0, 1.0, 0.0]])
    logits = similarities @ last_layer.T  # [5, 3] -> predicted class 0
    # contributions to class 0: 1, 2, 0, 2 -> top-2: prototype 1 (2.0), then 3 (2.0, tie).
    # winning views: prototype 1 -> view 3 -> mask 3 % 3 = 0 (hit, 2/3);
    # prototype 3 -> view 1 -> mask 1 (miss, 0).
    winning_view = np.array([[2, 3, 0, 1]])
    result = explanation_faithfulness(
        similarities, last_layer, logits, np.array([1]), winning_view, masks, num_masks, g, k=2
    )
    assert result["rate"] == pytest.approx(50.0)
    assert result["overlap"] == pytest.approx(100 * (2 / 3 + 0) / 2)
    # chance over the 3 real masks: hits 1, 0, 0 -> 1/3; overlaps (2/3 + 0 + 1/2) / 3.
    assert result["chance_rate"] == pytest.approx(100 / 3)
    assert result["chance_overlap"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 3)
    # label 1 != prediction 0: no correct image -> nan.
    assert result["num_correct"] == 0
    assert math.isnan(result["rate_correct"])


def test_faithfulness_empty_masks_never_hit():
    masks = np.zeros((1, 2, 3, 3), bool)
    masks[0, 1] = True
    g = np.ones((1, 3, 3), bool)
    per_image = faithfulness_terms(
        np.array([[1.0, 1.0]]),
        np.array([[1.0, 0.0]]),
        np.array([[1.0]]),
        np.array([0]),
        np.array([[0, 1]]),
        masks,
        np.array([2]),
        g,
        k=1,
    )
    # prototype 0 contributes 1 (prototype 1: 0) -> view 0 -> the empty mask: fraction 0.
    np.testing.assert_allclose(per_image["hit_rate"], [0.0])
    np.testing.assert_allclose(per_image["chance_hit_rate"], [0.5])  # the full mask hits


def test_faithfulness_matches_loop():
    rng = np.random.default_rng(14)
    n, p, c, kmax, size = 8, 10, 3, 5, 6
    similarities = rng.random((n, p))
    last_layer = rng.normal(size=(c, p))
    logits = similarities @ last_layer.T
    labels = np.where(rng.random(n) < 0.6, np.argmax(logits, 1), rng.integers(0, c, n))
    winning_view = rng.integers(0, kmax, (n, p))
    masks = random_masks(rng, (n, kmax, size, size), density=0.35)
    num_masks = rng.integers(1, kmax + 1, n)
    part_map = rng.integers(0, 4, (n, size, size))
    decisive = frame.decisive_part_masks(part_map, rng.integers(-1, 3, (n, 2)))
    result = explanation_faithfulness(
        similarities, last_layer, logits, labels, winning_view, masks, num_masks, decisive, k=3
    )
    expected = loop_faithfulness(
        similarities, last_layer, logits, labels, winning_view, masks, num_masks, decisive, 3
    )
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, nan_ok=True), key
    # The per-image form concatenated over two batches gives the same summary.
    halves = [
        faithfulness_terms(
            similarities[s],
            last_layer,
            logits[s],
            labels[s],
            winning_view[s],
            masks[s],
            num_masks[s],
            decisive[s],
        )
        for s in (slice(0, 3), slice(3, n))
    ]
    joined = {key: np.concatenate([h[key] for h in halves]) for key in halves[0]}
    assert faithfulness.summarize(joined) == pytest.approx(result, nan_ok=True)
