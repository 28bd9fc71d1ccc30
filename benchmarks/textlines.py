"""Text-line images for the PP-OCR direction classifier: what it classifies in RapidOCR
(a detected text line, upright or turned 180°), rendered here from the shipped sentences.

``textlines(split, count, seed)`` returns ``([count, 3, 48, 192] float32, labels)``:

1. Text: word windows of ``graphopt/data/sentences.txt`` (``split="calibration"`` uses the
   even lines, ``"validation"`` the odd ones, so the two sets share no sentence).
2. Rendering (Pillow): a TrueType font found on the machine (the calibration and
   validation sets draw from disjoint halves of the font list when there are two or more),
   else Pillow's built-in font; dark ink on a light background that is either flat or a
   lightened crop of a scikit-image photo (calibration photos vs validation photos of
   ``benchmarks/photos.py``), a little blur and noise.
3. Half of the lines are turned 180° (label 1), as RapidOCR's classifier sees them.
4. Preprocessing is RapidOCR's ``TextClassifier.resize_norm_img``: height 48 keeping the
   aspect ratio, width at most 192, ``(x / 255 − 0.5) / 0.5``, zero padding on the right.
"""

from __future__ import annotations

import glob
import math

import numpy as np

FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "/Library/Fonts",
             "C:/Windows/Fonts")


def _fonts() -> list[str]:
    found = []
    for d in FONT_DIRS:
        found += glob.glob(f"{d}/**/*.ttf", recursive=True)
    return sorted(f for f in found if "Bold" not in f or "Oblique" not in f)


def _font_pool(split: str) -> list:
    fonts = _fonts()
    if len(fonts) >= 2:
        return fonts[0::2] if split == "calibration" else fonts[1::2]
    return [None]  # Pillow's built-in font


def _load(path, size: int):
    from PIL import ImageFont

    if path is None:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(path, size)


def resize_norm(img: np.ndarray, height: int = 48, width: int = 192) -> np.ndarray:
    """RapidOCR's ``TextClassifier.resize_norm_img`` for an ``[h, w, 3]`` uint8 image."""
    from PIL import Image

    h, w = img.shape[:2]
    rw = min(width, int(math.ceil(height * w / float(h))))
    resized = np.asarray(Image.fromarray(img).resize((rw, height), Image.BILINEAR),
                         dtype=np.float32)
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :rw] = (resized.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return out


def textlines(split: str, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, ImageDraw, ImageFilter

    from graphopt.data.text import read_sentences
    from photos import CALIBRATION_PHOTOS, VALIDATION_PHOTOS, _photo

    rng = np.random.default_rng(seed)
    lines = read_sentences()
    lines = lines[0::2] if split == "calibration" else lines[1::2]
    fonts = _font_pool(split)
    photos = [_photo(n) for n in (CALIBRATION_PHOTOS if split == "calibration"
                                  else VALIDATION_PHOTOS)]
    images = np.zeros((count, 3, 48, 192), np.float32)
    labels = np.zeros(count, np.int64)
    for k in range(count):
        words = lines[int(rng.integers(len(lines)))].split()
        n = int(rng.integers(1, min(len(words), 7) + 1))
        start = int(rng.integers(0, len(words) - n + 1))
        text = " ".join(words[start:start + n])
        font = _load(fonts[int(rng.integers(len(fonts)))], int(rng.integers(20, 40)))
        left, top, right, bottom = font.getbbox(text)
        pad = int(rng.integers(2, 10))
        w, h = right - left + 2 * pad, bottom - top + 2 * pad
        if rng.random() < 0.5:
            bg = np.full((h, w, 3), rng.integers(170, 256, 3), np.uint8)
        else:
            ph = photos[int(rng.integers(len(photos)))]
            y = int(rng.integers(0, max(ph.shape[0] - h, 1)))
            x = int(rng.integers(0, max(ph.shape[1] - w, 1)))
            crop = np.asarray(Image.fromarray(ph.astype(np.uint8)).resize(
                (max(w, ph.shape[1]), max(h, ph.shape[0]))))[y:y + h, x:x + w]
            bg = (160 + 0.37 * crop.astype(np.float32)).astype(np.uint8)
        canvas = Image.fromarray(bg)
        ink = tuple(int(c) for c in rng.integers(0, 90, 3))
        ImageDraw.Draw(canvas).text((pad - left, pad - top), text, font=font, fill=ink)
        if rng.random() < 0.5:
            canvas = canvas.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))
        arr = np.asarray(canvas, np.float32) + rng.normal(0, rng.uniform(0, 8), (h, w, 3))
        arr = np.clip(arr, 0, 255).astype(np.uint8)
        if rng.random() < 0.5:
            arr = arr[::-1, ::-1].copy()
            labels[k] = 1
        images[k] = resize_norm(arr)
    return images, labels
