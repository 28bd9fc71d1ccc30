"""Scene images for the PP-OCR text detector: scikit-image photographs with text lines
drawn on them, what the detector looks for (most bundled photos hold no text at all, and a
probability map that is ~0 everywhere makes the cosine of two maps meaningless).

``scenes(split, count, size, seed)`` returns ``[count, 3, size, size]`` float32:

1. Background: a random crop of a photo, resized to ``size`` squared (``split="calibration"``
   draws from ``photos.CALIBRATION_PHOTOS``, ``"validation"`` from ``VALIDATION_PHOTOS``).
2. Text: 2–6 lines of words from the shipped sentences (even lines calibrate, odd lines
   validate), fonts from disjoint halves of the machine's fonts (``textlines._font_pool``),
   random size, position and ink (dark on light or light on dark, with a plate behind the
   line half of the time so the contrast varies), some lines turned by a small angle.
3. Normalization as RapidOCR feeds its detector (BGR, ``(x / 255 − 0.5) / 0.5``).
"""

from __future__ import annotations

import numpy as np


def scenes(split: str, count: int, size: int = 320, seed: int = 0) -> np.ndarray:
    from PIL import Image, ImageDraw

    from graphopt.data.text import read_sentences
    from photos import CALIBRATION_PHOTOS, VALIDATION_PHOTOS, crops
    from textlines import _font_pool, _load

    rng = np.random.default_rng(seed + (0 if split == "calibration" else 7919))
    names = CALIBRATION_PHOTOS if split == "calibration" else VALIDATION_PHOTOS
    backgrounds = crops(names, count, size, size, seed=seed + (0 if split == "calibration"
                                                               else 104729))
    lines = read_sentences()
    lines = lines[0::2] if split == "calibration" else lines[1::2]
    fonts = _font_pool(split)
    out = np.zeros((count, 3, size, size), np.float32)
    for k in range(count):
        rgb = ((backgrounds[k].transpose(1, 2, 0) * 0.5 + 0.5) * 255).clip(0, 255)
        canvas = Image.fromarray(rgb.astype(np.uint8)).convert("RGBA")
        for _ in range(int(rng.integers(2, 7))):
            words = lines[int(rng.integers(len(lines)))].split()
            n = int(rng.integers(1, min(len(words), 6) + 1))
            start = int(rng.integers(0, len(words) - n + 1))
            text = " ".join(words[start:start + n])
            font = _load(fonts[int(rng.integers(len(fonts)))],
                         int(rng.integers(max(10, size // 32), max(12, size // 10))))
            left, top, right, bottom = font.getbbox(text)
            w, h = right - left + 8, bottom - top + 8
            layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
            draw = ImageDraw.Draw(layer)
            dark = rng.random() < 0.6
            ink = tuple(int(c) for c in rng.integers(0, 70, 3)) if dark else \
                tuple(int(c) for c in rng.integers(190, 256, 3))
            if rng.random() < 0.5:
                plate = tuple(int(c) for c in (rng.integers(180, 256, 3) if dark
                                               else rng.integers(0, 80, 3)))
                draw.rectangle((0, 0, w, h), fill=plate + (255,))
            draw.text((4 - left, 4 - top), text, font=font, fill=ink + (255,))
            if rng.random() < 0.3:
                layer = layer.rotate(float(rng.uniform(-12, 12)), expand=True,
                                     resample=Image.BILINEAR)
            x = int(rng.integers(0, max(1, size - min(layer.width, size))))
            y = int(rng.integers(0, max(1, size - layer.height)))
            canvas.alpha_composite(layer, (x, y))
        arr = np.asarray(canvas.convert("RGB"), np.float32)[:, :, ::-1]
        out[k] = ((arr / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    return out
