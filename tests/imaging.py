"""Real image files for tests, written with Pillow: plain, EXIF-rotated and unusual formats."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112


def pattern(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic RGB picture with a few rectangles: content the tiny models can chew on."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 40, np.uint8)
    image[:, :, 2] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    for _ in range(4):
        y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
        image[y0:y0 + height // 3, x0:x0 + width // 3] = rng.integers(0, 255, 3)
    return image


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_with_orientation(array: np.ndarray, orientation: int) -> bytes:
    """A JPEG whose stored pixels are `array` and whose EXIF says to rotate them for display."""
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[EXIF_ORIENTATION] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def write_test_images(directory: Path) -> None:
    for i, (h, w) in enumerate([(240, 320), (300, 200), (96, 128), (480, 640)]):
        (directory / f"img{i}.png").write_bytes(png_bytes(pattern(h, w, seed=i)))
    # Stored 160 wide x 120 high; orientation 6 means "rotate 90 degrees clockwise to display".
    (directory / "exif6.jpg").write_bytes(jpeg_with_orientation(pattern(120, 160, seed=7), 6))
    (directory / "not-an-image.png").write_bytes(b"<html><body>login</body></html>")
