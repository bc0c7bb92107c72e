"""predict: files a person hands over, decoded as documented; the CLI on a folder of them; its
prediction for a test image equals evaluate's for that image's record."""

from __future__ import annotations

import csv
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.special
from PIL import Image

from protomask_jax.data import images


def _upright(height: int = 12, width: int = 20) -> np.ndarray:
    """An image whose every pixel differs, so any flip or rotation shows."""
    y, x = np.mgrid[:height, :width]
    return np.stack([y * 20, x * 12, (y * width + x) % 256], -1).astype(np.uint8)


def _png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB): grey, grey+alpha, RGB, RGBA."""
    height, width = values.shape[:2]
    channels = 1 if values.ndim == 2 else values.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _save(path: Path, image: Image.Image, **options) -> Path:
    image.save(path, **options)
    return path


@pytest.mark.parametrize(
    "orientation, stored",
    [
        (3, lambda u: u[::-1, ::-1]),  # rotated 180
        (6, lambda u: np.rot90(u, 1)),  # viewers turn it 90 degrees clockwise
        (8, lambda u: np.rot90(u, -1)),  # ... counter-clockwise
        (2, lambda u: u[:, ::-1]),  # mirrored
    ],
)
def test_exif_orientation_gives_the_upright_image(tmp_path, orientation, stored):
    upright = _upright()
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(
        tmp_path / "x.png", Image.fromarray(np.ascontiguousarray(stored(upright))), exif=exif
    )
    loaded = images.load_image(path)
    np.testing.assert_array_equal(loaded.rgb, upright)
    assert loaded.size == upright.shape[:2]
    assert loaded.notes == [f"EXIF orientation {orientation} applied"]


def test_sixteen_bit_keeps_the_high_byte(tmp_path):
    grey = np.array([[0, 255, 256, 4096], [32768, 65535, 1000, 40000]], np.uint16)
    (tmp_path / "grey.png").write_bytes(_png16(grey))
    loaded = images.load_image(tmp_path / "grey.png")
    high = (grey // 256).astype(np.uint8)  # 255 -> 0, 256 -> 1, 65535 -> 255
    np.testing.assert_array_equal(loaded.rgb, np.repeat(high[..., None], 3, -1))
    assert loaded.notes == ["16-bit grey scaled to 8 bits"]
    rgb = np.stack([grey, 65535 - grey, grey // 3], -1)
    (tmp_path / "rgb.png").write_bytes(_png16(rgb))
    loaded = images.load_image(tmp_path / "rgb.png")
    np.testing.assert_array_equal(loaded.rgb, rgb // 256)
    assert loaded.notes == ["16-bit RGB converted to 8 bits per channel"]
    # 16-bit grey as PIL writes it (mode I;16), not only as written by hand above.
    _save(tmp_path / "pil.png", Image.fromarray(grey))
    loaded = images.load_image(tmp_path / "pil.png")
    np.testing.assert_array_equal(loaded.rgb[..., 1], high)
    assert loaded.notes == ["16-bit grey scaled to 8 bits"]
    # An 8-bit RGB PNG gets no note.
    _save(tmp_path / "eight.png", Image.fromarray(high[..., None].repeat(3, -1)))
    assert images.load_image(tmp_path / "eight.png").notes == []


def _two_frame_gif(path: Path) -> Path:
    """First frame all red, second all blue."""
    frames = [Image.new("RGB", (8, 6), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    return path


def test_an_animation_is_read_as_its_first_frame_and_says_so(tmp_path):
    loaded = images.load_image(_two_frame_gif(tmp_path / "anim.gif"))
    np.testing.assert_array_equal(loaded.rgb, np.broadcast_to([255, 0, 0], (6, 8, 3)))
    assert loaded.notes == ["animated (2 frames): only the first frame used"]
    still = _save(tmp_path / "still.gif", Image.new("RGB", (8, 6), (0, 0, 255)))
    assert images.load_image(still).notes == []


def test_small_images_get_a_note_naming_their_size():
    from protomask_jax import predict

    view = 32  # SMALL_FRACTION 0.5: a shorter side under 16 px is noted
    note = predict.size_note((8, 8), view)
    assert note.startswith("small image: 8x8 px, shorter side under 16 px")
    assert "upscaled at least 4.0x" in note
    note = predict.size_note((15, 40), view)  # (H, W): the width is given first
    assert note.startswith("small image: 40x15 px") and "at least 2.1x" in note
    assert predict.size_note((16, 40), view) is None
    assert predict.size_note((60, 80), view) is None
    assert predict.size_note((112, 300), 224) is None  # the default config's views
    assert predict.size_note((111, 300), 224).startswith("small image: 300x111 px")


def test_figures_are_named_by_file_stem_and_collisions_by_path():
    import hashlib
    import os

    from protomask_jax import predict

    files = [
        Path("a/cat.jpg"),
        Path("b/cat.png"),
        Path("b/dog.png"),
        Path("b/Dog.gif"),  # a collision on case-insensitive file systems
        Path("my photo #1.jpg"),
        Path("b/dog.png"),  # the same file named twice
    ]

    def digest(path: Path) -> str:
        return hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:6]

    dog = f"dog-{digest(files[2])}"
    expected = [
        f"cat-{digest(files[0])}",
        f"cat-{digest(files[1])}",
        dog,
        f"Dog-{digest(files[3])}",
        "my_photo__1",
        f"{dog}-2",
    ]
    assert predict.figure_names(files) == expected
    assert len({name.lower() for name in expected}) == len(expected)
    # A name depends on the files, not on their order.
    assert predict.figure_names(files[:5][::-1]) == expected[:5][::-1]
    assert predict.figure_names([Path("x/cat.jpg"), Path("dog.png")]) == ["cat", "dog"]


def test_cmyk_and_grey_become_rgb(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0]], [[50, 100, 150, 30], [0, 0, 0, 255]]])
    path = _save(tmp_path / "cmyk.tif", Image.fromarray(cmyk.astype(np.uint8), "CMYK"))
    loaded = images.load_image(path)
    # The usual formula: each of R, G, B = 255 (1 - C/255)(1 - K/255).
    expected = (255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255
    np.testing.assert_allclose(loaded.rgb, expected, atol=1)
    assert loaded.notes == ["CMYK converted to RGB"]
    grey = np.array([[0, 100], [200, 255]], np.uint8)
    loaded = images.load_image(_save(tmp_path / "grey.jpg", Image.fromarray(grey), quality=100))
    assert loaded.rgb.shape == (2, 2, 3)
    np.testing.assert_array_equal(loaded.rgb[..., 0], loaded.rgb[..., 2])
    np.testing.assert_allclose(loaded.rgb[..., 0], grey, atol=2)


def test_alpha_is_composited_over_white(tmp_path):
    colour = np.array([10, 200, 30])
    alpha = np.array([[0, 255], [128, 64]])
    rgba = np.concatenate([np.broadcast_to(colour, (2, 2, 3)), alpha[..., None]], -1)
    path = _save(tmp_path / "a.png", Image.fromarray(rgba.astype(np.uint8), "RGBA"))
    loaded = images.load_image(path)
    expected = alpha[..., None] / 255 * colour + (1 - alpha[..., None] / 255) * 255
    np.testing.assert_allclose(loaded.rgb, expected, atol=1)
    assert loaded.notes == ["transparent pixels composited over white"]
    # A palette image with a transparent index, and an opaque RGBA file (no note).
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([10, 20, 30, 40, 50, 60])
    path = _save(tmp_path / "p.png", palette, transparency=0)
    np.testing.assert_array_equal(images.load_image(path).rgb, [[[255, 255, 255], [40, 50, 60]]])
    opaque = np.concatenate([_upright(), np.full((12, 20, 1), 255, np.uint8)], -1)
    loaded = images.load_image(_save(tmp_path / "o.webp", Image.fromarray(opaque), lossless=True))
    np.testing.assert_array_equal(loaded.rgb, _upright())
    assert loaded.notes == []


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_huge_images_are_scaled_to_the_limit(tmp_path, monkeypatch, suffix):
    monkeypatch.setattr(images, "MAX_SIDE", 64)
    y, x = np.mgrid[:200, :300]
    smooth = np.stack([y, x * 0.8, (x + y) * 0.5], -1).astype(np.uint8)
    path = _save(tmp_path / f"big.{suffix}", Image.fromarray(smooth), quality=95)
    loaded = images.load_image(path)
    assert loaded.rgb.shape == (43, 64, 3) and loaded.size == (200, 300)
    assert loaded.notes == ["downscaled from 300x200 to 64x43 px"]
    # A smooth ramp survives scaling: the pixel at (i, j) shows the ramp near (i, j) * 300/64.
    expected = Image.fromarray(smooth).resize((64, 43), Image.Resampling.LANCZOS)
    assert np.abs(loaded.rgb.astype(int) - np.asarray(expected)).mean() < 2.0


def test_tiny_images_are_kept(tmp_path):
    pixel = np.array([[[1, 2, 3]]], np.uint8)
    np.testing.assert_array_equal(
        images.load_image(_save(tmp_path / "p.png", Image.fromarray(pixel))).rgb, pixel
    )


def test_unreadable_files_name_themselves(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(images.ImageError, match=r"notes.txt: not a readable image"):
        images.load_image(tmp_path / "notes.txt")
    buffer = io.BytesIO()
    Image.fromarray(_upright(64, 64)).save(buffer, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(images.ImageError, match=r"cut.jpg: not a readable image .*truncated"):
        images.load_image(tmp_path / "cut.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses > 2x this many pixels
    path = _save(tmp_path / "bomb.png", Image.fromarray(_upright(20, 20)))
    with pytest.raises(images.ImageError, match="DecompressionBombError"):
        images.load_image(path)


# ----------------------------------------------------------------- predict on a trained run


@pytest.fixture(scope="module")
def slic_run(tmp_path_factory) -> tuple[Path, object]:
    """(workdir, config) of the tiny config trained on a parts world exported with slic."""
    from configs import demo
    from protomask_jax import trainer
    from segmentation import export

    base = tmp_path_factory.mktemp("predict_slic")
    config = demo.get_config()
    config.unlock()
    config.dataset.update(root=str(base / "dataset"), records_dir=str(base / "records"))
    config.dataset.num_classes = 4
    config.dataset.synthetic.update(
        num_classes=4, image_size=64, train_per_class=6, test_per_class=2, seed=0
    )
    config.segmentation.update(method="slic", max_masks=6, shards=dict(train=2, test=1))
    config.segmentation.slic.n_segments = 8
    config.input.update(canvas_size=32, view_size=32, num_views=4, batch_size=8, eval_batch_size=8)
    config.model.update(backbone="resnet_micro", prototype_dim=8, prototypes_per_class=2)
    config.train.update(joint_epochs=1, finetune_epochs=1, eval_every_epochs=1)
    config.lock()
    export.export(config, progress=False)
    trainer.train_and_evaluate(config, base / "run")
    return base / "run", config


def _everyday_folder(folder: Path) -> Path:
    """A normal JPEG, grey, alpha, EXIF-rotated and tiny images, and a cut-off JPEG."""
    folder.mkdir()
    photo = _upright(60, 80)
    Image.fromarray(photo).save(folder / "normal.jpg")
    Image.fromarray(photo).convert("L").save(folder / "grey.png")
    alpha = np.concatenate([photo, np.full((60, 80, 1), 128, np.uint8)], -1)
    Image.fromarray(alpha).save(folder / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(photo).save(folder / "rotated.jpg", exif=exif)
    Image.fromarray(photo[:5, :7]).save(folder / "tiny.png")
    (folder / "corrupt.jpg").write_bytes((folder / "normal.jpg").read_bytes()[:300])
    return folder


def _run_cli(*args: str):
    """The CLI in a subprocess; it prints whether torch was ever imported as it exits."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    code = (
        "import atexit, runpy, sys\n"
        "atexit.register(lambda: print('torch imported:', 'torch' in sys.modules))\n"
        f"sys.argv = ['predict', *{list(args)!r}]\n"
        "runpy.run_module('protomask_jax.predict', run_name='__main__', alter_sys=True)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(repo), JAX_PLATFORMS="cpu")
    command = [sys.executable, "-c", code]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=repo, timeout=300)


@pytest.mark.slow
def test_cli_explains_everyday_files_and_skips_a_corrupt_one(slic_run, tmp_path):
    import hashlib
    import json
    import os
    import re

    workdir, _ = slic_run
    folder = _everyday_folder(tmp_path / "photos")
    (folder / "more").mkdir()  # a second "normal": its figure's name would collide
    Image.fromarray(_upright(60, 80)[::-1]).save(folder / "more" / "normal.png")
    out = tmp_path / "out"
    done = _run_cli("--workdir", str(workdir), "--out", str(out), str(folder))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert f"skipped {folder / 'corrupt.jpg'}: not a readable image" in done.stdout
    assert "torch imported: False" in done.stdout  # slic: the torch side stays unloaded
    result = json.loads((out / "predictions.json").read_text())
    explained = {Path(entry["file"]).name: entry for entry in result["images"]}
    assert sorted(explained) == [
        "alpha.png", "grey.png", "normal.jpg", "normal.png", "rotated.jpg", "tiny.png"
    ]  # fmt: skip
    # Figures are named by file; the two "normal"s by a digest of their paths.
    digest = {
        name: hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:6]
        for name, path in (("normal.jpg", folder / "normal.jpg"),
                           ("normal.png", folder / "more" / "normal.png"))
    }  # fmt: skip
    figures = {name: f"figures/{Path(name).stem}.png" for name in explained}
    figures |= {name: f"figures/normal-{digest[name]}.png" for name in digest}
    assert {name: entry["figure"] for name, entry in explained.items()} == figures
    assert sorted((out / "figures").iterdir()) == sorted(out / f for f in figures.values())
    # The table on stdout: a header, a row per image, then the notes.
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("file "))
    assert lines[header].split() == ["file", "class", "1", "class", "2", "class", "3", "notes"]
    rows = {line.split()[0]: line for line in lines[header + 1 : header + 7]}
    assert sorted(rows) == sorted(explained)
    for name, entry in explained.items():
        top = entry["top5"][0]
        assert f"{top['name']} {100 * top['probability']:.1f}%" in rows[name]
    assert rows["tiny.png"].endswith(" 1") and rows["grey.png"].endswith("%")
    notes = lines[lines.index("notes:") + 1 :]
    assert "  rotated.jpg: EXIF orientation 6 applied" in notes
    assert any(line.startswith("  tiny.png: small image: 7x5 px") for line in notes)
    assert (out / "predictions.csv").read_text().startswith("file,class_1,probability_1,")
    assert [Path(s["file"]).name for s in result["skipped"]] == ["corrupt.jpg"]
    assert explained["rotated.jpg"]["image_size"] == [80, 60]
    assert explained["rotated.jpg"]["notes"] == ["EXIF orientation 6 applied"]
    assert explained["tiny.png"]["image_size"] == [5, 7]
    for entry in result["images"]:
        probabilities = [c["probability"] for c in entry["top5"]]
        assert probabilities == sorted(probabilities, reverse=True)
        assert entry["predicted"]["class_id"] == int(np.argmax(entry["logits"]))
        assert len(entry["contributions"]) == 3
        for c in entry["contributions"]:
            y0, x0, y1, x1 = c["view_box"]
            assert 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1
            assert c["contribution"] == pytest.approx(c["similarity"] * c["weight"], rel=1e-6)
            assert (out / c["mask"]).is_file()
    # PRP maps of the matched views (the run's explain.explanation_type), as in the report.
    assert len(list((out / "images").glob("*_prp.png"))) == 6 * 3
    page = (out / "index.html").read_text()
    linked = re.findall(r'(?:src|href)="([^"#:]+\.png)"', page)
    assert len(linked) > 6 * 3 and all((out / path).is_file() for path in linked)
    assert set(figures.values()) <= set(linked)
    assert "corrupt.jpg" in page

    # An empty folder, and a folder without one readable image: one line each, exit code 2.
    (tmp_path / "empty").mkdir()
    done = _run_cli("--workdir", str(workdir), str(tmp_path / "empty"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: no files to explain in")
    done = _run_cli("--workdir", str(workdir), "--top_classes=0", str(folder))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: --top_classes=0: give at least 1 (the default is 5)."
    )


@pytest.mark.slow
def test_prediction_equals_evaluate_for_a_test_image(slic_run, tmp_path):
    from protomask_jax import inference, predict
    from protomask_jax.data import pipeline
    from protomask_jax.data import records as records_lib

    workdir, config = slic_run
    test_set = pipeline.RecordSet(config.dataset.records_dir, "test")
    chosen = [1, 6]
    files = []
    for index in chosen:
        record = records_lib.ImageRecord.from_bytes(test_set.reader[index])
        files.append(tmp_path / f"test_{record.image_id}.png")
        files[-1].write_bytes(record.image_bytes)
    out = tmp_path / "out"
    # More classes asked for than the run has (4): all of them.
    result = predict.predict(
        config, workdir, files, out, top_classes=9, figures=False, progress=False
    )
    expected = inference.run_model(inference.restore_trained(config, workdir), test_set, chosen)
    logits = np.asarray([entry["logits"] for entry in result["images"]], np.float32)
    np.testing.assert_array_equal(logits, expected.logits)
    predicted = [entry["predicted"]["class_id"] for entry in result["images"]]
    assert predicted == np.argmax(expected.logits, axis=1).tolist()
    # The explained views are the evaluated winning views' masks.
    for entry, similarities in zip(result["images"], expected.similarities, strict=True):
        for c in entry["contributions"]:
            assert c["similarity"] == pytest.approx(float(similarities[c["prototype"]]))
    # predictions.csv: every class, most probable first, with softmax(evaluate's logits).
    names = records_lib.load_dataset_info(config.dataset.records_dir)["class_names"]
    with open(out / "predictions.csv", newline="") as f:
        table = list(csv.reader(f))
    header = ["file"] + [f"{key}_{i}" for i in range(1, 5) for key in ("class", "probability")]
    assert table[0] == [*header, "notes"]
    assert [row[0] for row in table[1:]] == [str(f) for f in files]
    for row, logit in zip(table[1:], expected.logits.astype(np.float64), strict=True):
        probabilities = scipy.special.softmax(logit)
        order = sorted(range(4), key=lambda c: -probabilities[c])
        assert row[1:-1:2] == [names[c] for c in order]
        np.testing.assert_allclose([float(p) for p in row[2:-1:2]], probabilities[order], atol=1e-6)
        assert row[-1] == ""  # a normal image has no notes
    # No figures asked for: none drawn, no page.
    assert sorted(p.name for p in out.iterdir()) == ["masks", "predictions.csv", "predictions.json"]
    assert all(entry["figure"] is None for entry in result["images"])


@pytest.mark.slow
def test_decoding_and_size_notes_reach_the_csv_and_the_summary(slic_run, tmp_path):
    from protomask_jax import predict

    workdir, config = slic_run
    folder = tmp_path / "notes"
    folder.mkdir()
    photo = _upright(60, 80)
    Image.fromarray(photo).save(folder / "normal.png")
    (folder / "rgb16.png").write_bytes(_png16(photo.astype(np.uint16) * 257))
    Image.fromarray(photo[..., 0].astype(np.uint16) * 257).save(folder / "grey16.png")  # I;16
    _two_frame_gif(folder / "anim.gif")
    Image.fromarray(photo[:8, :8]).save(folder / "tiny.png")
    out = tmp_path / "out"
    result = predict.predict(config, workdir, [folder], out, figures=False, progress=False)
    with open(out / "predictions.csv", newline="") as f:
        notes = {Path(row["file"]).name: row["notes"] for row in csv.DictReader(f)}
    # 8x6 GIF: also small for the run's 32 px views.
    gif = "small image: 8x6 px, shorter side under 16 px"
    assert notes["normal.png"] == ""
    assert notes["rgb16.png"] == "16-bit RGB converted to 8 bits per channel"
    assert notes["grey16.png"] == "16-bit grey scaled to 8 bits"
    assert notes["anim.gif"].startswith(f"animated (2 frames): only the first frame used; {gif}")
    assert notes["tiny.png"].startswith("small image: 8x8 px, shorter side under 16 px")
    assert "upscaled at least 4.0x" in notes["tiny.png"]
    text = predict.summary(result, out)
    assert text.splitlines()[0].split()[0] == "file"
    assert "  tiny.png: small image: 8x8 px" in text and "  rgb16.png: 16-bit RGB" in text
    assert "normal.png:" not in text  # no note, no line
    assert "no figures; written:" in text and "index.html" not in text


@pytest.mark.slow
def test_unusable_inputs_and_outputs_are_refused(slic_run, tmp_path):
    from protomask_jax import predict

    workdir, config = slic_run
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("text")
    with pytest.raises(predict.PredictError, match="none of the 1 file"):
        predict.predict(config, workdir, [tmp_path / "junk"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(predict.PredictError, match="no such file or folder"):
        predict.predict(config, workdir, [tmp_path / "nothing.jpg"], tmp_path / "out")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(predict.PredictError, match="holds no predictions.json of an earlier run"):
        predict.predict(config, workdir, [tmp_path / "junk"], tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_segmenter_follows_the_records():
    from configs import common
    from protomask_jax import predict

    config = common.get_base_config()
    info = {
        "segmenter": {
            "method": "slic",
            "params": {"n_segments": 5, "compactness": 3.0, "sigma": 0},
        },
        "postprocess": {"max_masks": 7, "skip_background": 1, "min_box_px": 3},
    }
    made, note = predict.segmentation_config(config, info, None)
    seg = made.segmentation
    assert (seg.method, seg.slic.n_segments, seg.slic.compactness, seg.max_masks) == (
        "slic",
        5,
        3.0,
        7,
    )
    assert (seg.skip_background, seg.min_box_px, note) == (1, 3, "")
    assert predict.segmentation_config(config, info, "grid")[0].segmentation.method == "grid"
    info["segmenter"] = {"method": "gt", "params": {}}
    made, note = predict.segmentation_config(config, info, None)
    assert (made.segmentation.method, made.segmentation.slic.n_segments) == ("slic", 7)
    assert note.startswith("the run was trained on the dataset's own masks (gt)")
    assert config.segmentation.method == "sam"  # the run's config is left as it was
