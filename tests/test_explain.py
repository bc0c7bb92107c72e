"""Tests of the explanation report: picture helpers on hand-made inputs, the report of a tiny
trained run (files, links, panels against an independent forward, PRP heatmaps against PRP on
hand-made views, top images per prototype) and its screenshot."""

from __future__ import annotations

import html.parser
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from _trained_run import (
    independent_outputs,
    run_module,
    tiny_config,
    trained_workdir,
    write_config_file,
)
from PIL import Image

from protomask_jax import explain, inference, prp
from protomask_jax.report import (
    curves,
    gallery,
    names,
    panels,
    pictures,
    relevance,
    screenshot,
)

# ------------------------------------------------------------------------- helpers


def test_mask_overlay_outlines_the_mask_and_dims_the_rest():
    image = np.full((30, 30, 3), 200, np.uint8)
    mask = np.zeros((30, 30), bool)
    mask[10:20, 10:20] = True
    colour = (10, 20, 250)
    out = pictures.mask_overlay(image, mask, colour, width=30)  # same size: no resampling
    assert out.shape == (30, 30, 3)
    np.testing.assert_array_equal(out[10, 15], colour)  # on the mask's edge
    np.testing.assert_array_equal(out[12, 15], colour)  # 3 px wide
    np.testing.assert_array_equal(out[13:17, 13:17], 200)  # inside: the image itself
    np.testing.assert_array_equal(out[9, 15], 255)  # a white halo just outside
    assert (out[0:5, 0:5] < 200 * 0.6).all()  # the rest dimmed


def test_mask_overlay_marks_a_vanishing_mask_by_its_box():
    image = np.full((200, 200, 3), 100, np.uint8)
    mask = np.zeros((200, 200), bool)
    mask[50, 60] = True  # one pixel: gone after shrinking to 40 px
    out = pictures.mask_overlay(image, mask, (255, 0, 0), width=40, box=[0.2, 0.2, 0.4, 0.5])
    # The box (rows 8..15, cols 8..19 at 40 px) stays bright; far away is dimmed.
    np.testing.assert_array_equal(out[12, 14], 100)
    np.testing.assert_array_equal(out[8, 14], (255, 0, 0))
    assert out[30, 30, 0] < 100


def test_outline_colours_the_mask_border_and_leaves_the_rest():
    picture = np.full((12, 12, 3), 50, np.uint8)
    picture[5, 6] = (1, 2, 3)  # inside, past the outline: must survive
    mask = np.zeros((12, 12), bool)
    mask[3:9, 3:9] = True
    colour = (0, 229, 255)
    out = pictures.outline(picture, mask, colour, width=2)
    border = mask.copy()
    border[5:7, 5:7] = False  # the 6 x 6 square less its 2 x 2 core: 32 pixels
    assert border.sum() == 32
    np.testing.assert_array_equal(out[border], np.tile(colour, (32, 1)))
    np.testing.assert_array_equal(out[~border], picture[~border])
    assert picture[3, 3, 0] == 50  # the input is not drawn on


def test_prp_thumbnails_outline_the_views_mask():
    # A 40 x 40 image whose mask is an L in the box rows/cols 10..29: in the 192 px view the
    # L is the top half and the bottom-left quarter. Zero relevance: the map is plain grey.
    from protomask_jax.data import records

    image = np.full((40, 40, 3), 120, np.uint8)
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:20] = mask[10:20, 10:30] = True
    record = SimpleNamespace(
        boxes=np.array([[0.25, 0.25, 0.75, 0.75]]), mask_pngs=[records.encode_mask_png(mask)]
    )
    decoded = pictures.DecodedImage(record, image)
    side = pictures.rendered("match_view")
    assert side == 192
    maps = lambda record, masks, ids: np.zeros((len(masks), 8, 8), np.float32)  # noqa: E731
    heatmaps = relevance.Heatmaps(SimpleNamespace(view_maps=maps), None, [], None)
    (drawn,) = heatmaps.views(decoded, [0], [0], "match_view")
    plain = relevance.heatmap_overlay(decoded.view(0, "match_view"), np.zeros((8, 8)))
    cyan = np.all(drawn == relevance.MASK_OUTLINE, axis=-1)
    assert cyan[0, 50] and cyan[150, 95] and cyan[94, 150]  # top, inner sides of the L
    assert not cyan[50, 50] and not cyan[150, 150]  # inside the L; outside it
    np.testing.assert_array_equal(drawn[~cyan], plain[~cyan])
    # Without masks in the record, the map alone.
    decoded = pictures.DecodedImage(SimpleNamespace(boxes=record.boxes, mask_pngs=[]), image)
    np.testing.assert_array_equal(heatmaps.views(decoded, [0], [0], "match_view")[0], plain)


@pytest.mark.parametrize(
    "name, width, max_lines, keep_underscores, lines",
    [
        ("001.Black_footed_Albatross", 26, 2, False, ["001.Black footed Albatross"]),
        ("001.Black_footed_Albatross", 20, 2, False, ["001.Black footed", "Albatross"]),
        ("001.Black_footed_Albatross", 12, 3, False, ["001.Black", "footed", "Albatross"]),
        # one line too many: the last shown ends in the ellipsis
        ("001.Black_footed_Albatross", 12, 2, False, ["001.Black", "footed\u2026"]),
        ("200.Common__Yellowthroat ", 30, 2, False, ["200.Common Yellowthroat"]),
        # a word longer than a line is cut, never broken onto the next
        ("Supercalifragilistic bird", 8, 2, False, ["Superca\u2026", "bird"]),
        # file names keep their underscores and may break after one
        (
            "Black_Footed_Albatross_0046_18.jpg",
            14,
            3,
            True,
            ["Black_Footed_", "Albatross_", "0046_18.jpg"],
        ),
        ("Black_Footed_Albatross_0046_18.jpg", 14, 2, True, ["Black_Footed_", "Albatross_\u2026"]),
        ("test image 27: a_b.png", 16, 2, True, ["test image 27:", "a_b.png"]),
    ],
)
def test_wrap_name_breaks_between_words_and_cuts_with_an_ellipsis(
    name, width, max_lines, keep_underscores, lines
):
    assert names.wrap_name(name, width, max_lines, keep_underscores) == lines
    assert all(len(line) <= width for line in lines)


def test_html_names_wrap_at_words_clamp_and_carry_the_full_name():
    span = names.html_name("001.Black_footed_Albatross")
    assert span == (
        '<span class="name-box" style="-webkit-line-clamp: 2; line-clamp: 2" '
        'title="001.Black_footed_Albatross">001.Black footed Albatross</span>'
    )
    span = names.html_name('a_b "c".jpg', "file", lines=1)
    assert 'title="a_b &quot;c&quot;.jpg"' in span and "-webkit-line-clamp: 1;" in span
    assert span.endswith(">a_<wbr>b &quot;c&quot;.jpg</span>")  # may break after "_" only
    # the page's style clips a name-box: it cannot spill out of its box
    from protomask_jax.report import html

    rule = html.STYLE.split(".name-box {")[1].split("}")[0]
    assert "overflow: hidden" in rule and "max-width: 100%" in rule
    assert "word-break: normal" in rule  # never mid-word


def test_view_crop_takes_the_box_and_stretches_it_to_a_square():
    image = np.zeros((40, 80, 3), np.uint8)
    image[10:20, 40:80] = 255  # the box below, exactly
    crop = pictures.view_crop(image, np.array([0.25, 0.5, 0.5, 1.0]), 16)
    assert crop.shape == (16, 16, 3)
    assert crop.min() == 255


def test_top_contributions_rank_by_similarity_times_weight():
    similarities = np.array([1.0, 4.0, 2.0, 2.0], np.float32)
    last_layer = np.array([[0.5, -1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]], np.float32)
    winning_view = np.array([0, 5, 3, 4])
    matches = panels.top_contributions(similarities, last_layer, 0, winning_view, 3, 3)
    # contributions to class 0: [0.5, -4, 2, 2] -> 2 (tie, lower index), 3, 0
    assert [m.prototype for m in matches] == [2, 3, 0]
    assert [m.contribution for m in matches] == [2.0, 2.0, 0.5]
    assert [m.mask_index for m in matches] == [0, 1, 0]  # views 3, 4, 0 of 3 masks
    assert matches[0].weight == 1.0 and matches[0].similarity == 2.0


def test_select_images_round_robin_over_classes_and_explicit_ids():
    fake = SimpleNamespace(
        image_ids=np.array([15, 11, 12, 13, 14, 10, -1]),  # the last record was skipped as bad
        labels=np.array([1, 0, 0, 1, 2, 0, -1]),
        good=np.arange(6),
        split="test",
        records_dir="records",
    )
    chosen = explain.select_images(fake, None, 5)
    # ids by class: 0 -> 10, 11, 12; 1 -> 13, 15; 2 -> 14. Round robin: 10, 13, 14, 11, 15.
    np.testing.assert_array_equal(fake.image_ids[chosen], [10, 13, 14, 11, 15])
    np.testing.assert_array_equal(explain.select_images(fake, [14, 10], 5), [4, 5])
    with pytest.raises(ValueError, match=r"\[99\]"):
        explain.select_images(fake, [14, 99], 5)
    with pytest.raises(ValueError, match=r"\[-1\]"):  # a skipped record cannot be asked for
        explain.select_images(fake, [-1], 5)
    assert len(explain.select_images(fake, None, 10)) == 6


def test_prototype_sources_follow_pruning_and_missing_push():
    pushed = {
        "image_id": [7, -1, 9, 3],
        "mask_index": [0, -1, 2, 1],
        "distance": [0.5, float("inf"), 0.25, 1.0],
    }
    pruned = gallery.prototype_sources(
        {"pushed": True, "push": pushed, "kept_prototypes": [3, 0, 1]}, 3
    )
    assert [(s.image_id, s.mask_index, s.distance) for s in pruned] == [
        (3, 1, 1.0),
        (7, 0, 0.5),
        (None, None, None),  # no image of its class: never projected
    ]
    unpushed = gallery.prototype_sources({"pushed": False, "push": None}, 2)
    assert all(s.image_id is None for s in unpushed)


def _page_with(section):
    from protomask_jax.report import html

    return html.page("report", [], [], [section], "footer")


def test_duplicate_prototypes_get_a_warning_card_and_a_line_on_their_cards():
    from protomask_jax.report import html

    # The user's case: 9 of 10 prototypes pushed onto mask 1 of train image 4.
    sources = [gallery.PrototypeSource(4, 1, 0.5)] * 9 + [gallery.PrototypeSource(8, 0, 0.2)]
    prototypes = np.array([[1.0, 2.0]] * 9 + [[3.0, 4.0]], np.float32)
    groups = gallery.duplicate_groups(sources, prototypes)
    assert groups == [list(range(9))]
    warning = gallery.duplicates_warning(groups, sources)
    text = _page_with(html.Section("prototypes", "P", "Prototypes", "", "cards", warning))
    assert text.count('class="warning"') == 1
    assert "Duplicate prototypes: 9 of 10 share one view, so 8 of them add nothing." in text
    assert "prototypes " + ", ".join(f'<a href="#prototype-{j}">{j}</a>' for j in range(9)) in text
    assert ": train image 4, mask 1</li>" in text
    # The card sits above the sections.
    assert text.index('id="duplicate-prototypes"') < text.index('<section id="prototypes">')


def test_gallery_section_marks_the_cards_of_duplicates(tmp_path):
    # Never projected, but prototypes 0 and 2 have one vector: the section warns and says so
    # on both cards; prototype 1 is left alone.
    sources = [gallery.PrototypeSource()] * 3
    prototypes = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], np.float32)
    groups = gallery.duplicate_groups(sources, prototypes)
    assert groups == [[0, 2]]
    canvas = pictures.Canvas(tmp_path, ["a", "b"], [(255, 0, 0), (0, 0, 255)])
    arrays = SimpleNamespace(prototype_class=np.array([0, 0, 1]), last_layer=np.eye(2, 3))
    section, _ = gallery.section(canvas, arrays, sources, None, lambda: None, duplicates=groups)
    assert "Duplicate prototypes: 2 of 3 share one view" in section.warning
    assert "identical vectors</li>" in section.warning
    cards = section.body.split('class="card"')[1:]  # by class: 0 and 1 (a), then 2 (b)
    assert [f'data-prototype="{j}"' in card for j, card in enumerate(cards)] == [True] * 3
    assert "same view as prototype 2<" in cards[0] and "same view as prototype 0<" in cards[2]
    assert "same view" not in cards[1]


def test_no_warning_card_without_duplicate_prototypes():
    from protomask_jax.report import html

    sources = [gallery.PrototypeSource(4, 1, 0.5), gallery.PrototypeSource(4, 2, 0.5)]
    groups = gallery.duplicate_groups(sources, np.eye(2, dtype=np.float32))
    assert groups == [] and gallery.duplicates_warning(groups, sources) == ""
    section = html.Section("prototypes", "P", "Prototypes", "", "cards")
    assert 'class="warning"' not in _page_with(section)


def test_training_curves_plot_rows_and_refuse_an_empty_log(tmp_path):
    rows = [
        {"step": 5, "phase": "joint", "train/loss": 2.0, "train/accuracy": 0.3},
        {"step": 10, "phase": "joint", "train/loss": 1.5, "train/accuracy": 0.5},
        {"step": 10, "phase": "joint", "val/accuracy": 0.4},
        {"step": 15, "phase": "finetune", "train/loss": 1.0, "train/accuracy": 0.7},
    ]
    path = tmp_path / "curves.png"
    assert curves.plot_training_curves(rows, path)
    picture = np.asarray(Image.open(path).convert("L"))
    assert picture.shape[1] > 1000 and picture.std() > 10
    assert not curves.plot_training_curves([{"step": 1, "val/accuracy": 0.5}], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_class_colours_are_distinct():
    for count in (3, 12, 50):
        colours = pictures.class_colours(count)
        assert len(colours) == count == len(set(colours))


def test_top_images_section_asks_for_a_topk_json_of_the_checkpoint(tmp_path):
    from protomask_jax.report import topimages

    section = topimages.section(None, tmp_path, [0], {}, "best_finetune step 9")
    assert "No topk.json yet" in section.note and not section.body
    (tmp_path / "topk.json").write_text('{"checkpoint": "best_joint step 3", "prototypes": []}')
    section = topimages.section(None, tmp_path, [0], {}, "best_finetune step 9")
    assert "topk.json is of best_joint step 3" in section.note and not section.body
    assert "--techniques topk` (on best_finetune step 9)" in section.note


# ------------------------------------------------------------------ tiny trained run


class _Page(html.parser.HTMLParser):
    """Collects the report's picture sources, links and tagged elements."""

    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.cards: dict[int, list[str]] = {}
        self.panels: dict[int, list[int]] = {}
        self.matches: dict[tuple[int, int], list[str]] = {}  # (image, rank) -> pictures
        self.top_rows: dict[int, list[str]] = {}  # prototype -> top images
        self._card = self._panel = self._match = self._top = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "img":
            self.images.append(attrs["src"])
            if self._card is not None:
                self.cards[self._card].append(attrs["src"])
            for key, store in ((self._match, self.matches), (self._top, self.top_rows)):
                if key is not None:
                    store[key].append(attrs["src"])
        if tag == "a":
            self.links.append(attrs["href"])
        if "card" in classes:
            self._card = int(attrs["data-prototype"])
            self.cards[self._card] = []
        if "panel" in classes:
            self._panel, self._match = int(attrs["data-image"]), None
            self.panels[self._panel] = []
        if "match" in classes:
            self._card = None
            self.panels[self._panel].append(int(attrs["data-prototype"]))
            self._match = (self._panel, len(self.panels[self._panel]))
            self.matches[self._match] = []
        if "topk" in classes:
            self._top = int(attrs["data-prototype"])
            self.top_rows[self._top] = []

    def handle_endtag(self, tag):
        if tag == "section":
            self._card = self._match = self._top = None


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_records):
    """The tiny run, evaluated, and its report for two chosen test images."""
    from protomask_jax import evaluate

    workdir = trained_workdir(tmp_path_factory, tiny_records)
    config = tiny_config(tiny_records)  # PRP explanations: the default
    techniques = [*evaluate.evaluators.DEFAULT, "topk"]
    evaluate.evaluate(config, workdir, resolution=32, techniques=techniques, progress=False)
    image_ids = [27, 24]
    index = explain.explain(config, workdir, image_ids=image_ids, top_k=3, progress=False)
    return SimpleNamespace(
        config=config, workdir=workdir, index=index, image_ids=image_ids, records=tiny_records
    )


@pytest.mark.slow
def test_report_links_only_existing_files_and_shows_every_prototype_and_image(report):
    from protomask_jax.data import pipeline, records

    assert report.index == report.workdir / "report" / "index.html"
    page = _Page()
    page.feed(report.index.read_text())
    root = report.index.parent
    assert page.images and all((root / src).is_file() for src in page.images)
    local = [href for href in page.links if not href.startswith("#")]
    assert local and all((root / href).is_file() for href in local)
    anchors = [href[1:] for href in page.links if href.startswith("#")]
    text = report.index.read_text()
    assert all(f'id="{anchor}"' in text for anchor in anchors)
    assert "curves.png" in page.images

    # Every prototype has its gallery card with its source picture and view crop (push ran).
    restored = inference.restore_trained(report.config, report.workdir)
    num_prototypes = restored.state.params["prototypes"].shape[0]
    assert sorted(page.cards) == list(range(num_prototypes))
    for j, sources in page.cards.items():
        assert sources == [f"prototypes/p{j:04d}_source.png", f"prototypes/p{j:04d}_view.png"]

    # Every requested image has its panel, in the requested order, with the 3 prototypes of
    # largest similarity x weight for the predicted class of an independent forward pass.
    assert list(page.panels) == report.image_ids
    test_set = pipeline.RecordSet(report.records, "test")
    independent = independent_outputs(restored, test_set)
    reader = records.ShardedRecords(records.list_shards(report.records, "test"))
    stored = [records.ImageRecord.from_bytes(reader[i]) for i in range(len(reader))]
    file_names = {record.image_id: record.filename for record in stored}
    eps = report.config.model.similarity_eps
    distances = independent["min_distances"].astype(np.float64)
    similarities = np.log((distances + 1) / (distances + eps))
    last_layer = np.asarray(restored.state.params["last_layer"][...]).T
    for image_id, shown in page.panels.items():
        n = int(np.flatnonzero(independent["image_ids"] == image_id)[0])
        predicted = int(np.argmax(independent["logits"][n]))
        contributions = similarities[n] * last_layer[predicted]
        expected = sorted(range(num_prototypes), key=lambda j: (-contributions[j], j))[:3]
        assert shown == expected
        correct = predicted == independent["labels"][n]
        assert f'class="panel {"right" if correct else "wrong"}" id="image-{image_id}"' in text
        # Named by id and by the file it came from (read here from the records), in full in
        # the tooltip of the clamped name.
        assert f'title="test image {image_id}: {Path(file_names[image_id]).name}"' in text

    # The header carries the evaluation (eval.json) and the run.
    assert "explanations on the deciding part" in text.lower()
    assert report.config.model.backbone in text


@pytest.mark.slow
def test_report_summary_and_page_flag_prototypes_pushed_onto_one_view(report):
    push = json.loads((report.workdir / "push.json").read_text())
    by_view: dict[tuple[int, int], list[int]] = {}
    for j, view in enumerate(zip(push["image_id"], push["mask_index"], strict=True)):
        by_view.setdefault(view, []).append(j)
    expected = sorted(group for group in by_view.values() if len(group) > 1)
    summary = json.loads((report.index.parent / "summary.json").read_text())
    assert summary["duplicate_groups"] == expected == push["duplicate_groups"]
    assert summary["num_redundant_prototypes"] == sum(len(g) - 1 for g in expected)
    assert summary["num_prototypes"] == len(push["image_id"])
    assert ('id="duplicate-prototypes"' in report.index.read_text()) == bool(expected)


@pytest.mark.slow
def test_panels_show_prp_heatmaps_of_the_matched_views(report):
    """Each row: the test image's mask and its view under the PRP map, the prototype's source
    and its view under its map, each view's mask outlined; the maps equal PRP run on a view
    made by hand."""
    import jax

    from protomask_jax.data import pipeline
    from protomask_jax.data import views as views_lib

    page = _Page()
    page.feed(report.index.read_text())
    root = report.index.parent
    restored = inference.restore_trained(report.config, report.workdir)
    sources = gallery.prototype_sources(restored.meta, len(page.cards))
    view_relevance = inference.PrpExplainer(restored).view_maps
    state = jax.device_get(restored.state)
    model = prp.canonize((restored.graphdef, state.params, state.batch_stats, state.constants))
    test_set = pipeline.RecordSet(report.records, "test")
    images = pictures.RecordImages(test_set)
    for image_id, shown in page.panels.items():
        for rank, j in enumerate(shown, start=1):
            stem = f"images/{image_id}_r{rank}"
            assert page.matches[image_id, rank] == [
                f"{stem}_mask.png",
                f"{stem}_prp.png",
                f"prototypes/p{j:04d}_source.png",
                f"prototypes/p{j:04d}_prp.png",
            ]
    # One image's heatmaps against PRP on its views made by hand (fit_record + make_views).
    image_id, shown = next(iter(page.panels.items()))
    decoded = images.get(image_id)
    masks = [int(m) for m in _matched_masks(restored, test_set, image_id, shown)]
    maps = view_relevance(decoded.record, masks, shown)
    example = pipeline.fit_record(decoded.record, restored.spec, "")
    for rank, (mask, j) in enumerate(zip(masks, shown, strict=True), start=1):
        view = views_lib.make_views(
            example["canvas"][None],
            example["boxes"][None, [mask]],
            None,
            view_size=restored.config.input.view_size,
            dtype=np.float32,
        )
        expected, _ = prp.relevance_maps(model, view, np.array([[j]]))  # the only view wins
        np.testing.assert_allclose(maps[rank - 1], np.asarray(expected)[0, 0], rtol=1e-4, atol=1e-7)
        drawn = np.asarray(Image.open(root / f"images/{image_id}_r{rank}_prp.png"))
        redrawn = relevance.heatmap_overlay(decoded.view(mask, "match_view"), maps[rank - 1])
        outlined = decoded.view_mask(mask, "match_view")
        redrawn = pictures.outline(redrawn, outlined, relevance.MASK_OUTLINE)
        np.testing.assert_allclose(drawn, redrawn, atol=1)
        assert not np.array_equal(drawn, decoded.view(mask, "match_view"))
    # The prototype side: the source view push recorded, under the prototype's own map.
    j = shown[0]
    source = sources[j]
    train_images = pictures.RecordImages(pipeline.RecordSet(report.records, "train"))
    decoded = train_images.get(source.image_id)
    (source_map,) = view_relevance(decoded.record, [source.mask_index], [j])
    drawn = np.asarray(Image.open(root / f"prototypes/p{j:04d}_prp.png"))
    redrawn = relevance.heatmap_overlay(decoded.view(source.mask_index, "match_view"), source_map)
    outlined = decoded.view_mask(source.mask_index, "match_view")
    redrawn = pictures.outline(redrawn, outlined, relevance.MASK_OUTLINE)
    np.testing.assert_allclose(drawn, redrawn, atol=1)


def _matched_masks(restored, test_set, image_id, prototypes):
    """The masks of the model's winning views of ``prototypes`` on one test image."""

    index = int(np.flatnonzero(test_set.image_ids == image_id)[0])
    outputs = inference.run_model(restored, test_set, [index], progress=False)
    return outputs.winning_view[0, prototypes] % outputs.num_masks[0]


@pytest.mark.slow
def test_top_images_section_lists_topk_json(report):
    import json

    page = _Page()
    page.feed(report.index.read_text())
    top = json.loads((report.workdir / "topk.json").read_text())
    shown = sorted({j for rows in page.panels.values() for j in rows})
    assert sorted(page.top_rows) == shown
    for j in shown:
        entry = top["prototypes"][j]
        expected = [
            f"topk/{split}_{e['image_id']}_m{e['mask']}_c{entry['class']}.png"
            for split in ("train", "test")
            for e in entry[split]
        ]
        assert page.top_rows[j] == expected


@pytest.mark.slow
def test_explain_command_line_writes_the_report(report, tmp_path):
    config_file = write_config_file(tmp_path / "tiny_config.py", report.records)
    workdir = tmp_path / "copy"
    shutil.copytree(report.workdir, workdir, ignore=shutil.ignore_patterns("report"))
    completed = run_module(
        "protomask_jax.explain",
        f"--config={config_file}",
        f"--workdir={workdir}",
        "--num_images=2",
        "--top_k=2",
        "--config.explain.explanation_type=mask",
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    index = workdir / "report" / "index.html"
    assert f"report: {index.resolve()}" in completed.stdout
    page = _Page()
    page.feed(index.read_text())
    # Round robin over the 4 classes: the lowest ids of classes 0 and 1.
    assert len(page.panels) == 2 and all(len(rows) == 2 for rows in page.panels.values())
    # Mask explanations: the plain view crops, no heatmap.
    for (image_id, rank), pictures_of_row in page.matches.items():
        assert pictures_of_row[1] == f"images/{image_id}_r{rank}_view.png"
        assert not any(name.endswith("_prp.png") for name in pictures_of_row)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs /usr/bin/chromium")
def test_screenshot_of_the_report_is_not_blank(report, tmp_path):
    png = screenshot.screenshot(
        report.index, tmp_path / "shot.png", width=1000, height=900, chromium="/usr/bin/chromium"
    )
    picture = np.asarray(Image.open(png).convert("RGB"))
    assert picture.shape == (900, 1000, 3)
    # A rendered page: the dark header band on top, a light page below, many colours.
    assert picture[:40].mean() < 100 and picture[-200:].mean() > 150
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 500
