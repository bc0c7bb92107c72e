"""predict: files a person hands over, decoded as documented; the CLI on a folder of them; its
prediction for a test image equals evaluate's for that image's record."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
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
    path = _save(tmp_path / "x.png", Image.fromarray(np.ascontiguousarray(stored(upright))), exif=exif)
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
    np.testing.assert_array_equal(images.load_image(tmp_path / "rgb.png").rgb, rgb // 256)


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
