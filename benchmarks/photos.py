"""Calibration and validation images for the real-weight CNN benchmarks: crops of the
photographs scikit-image ships (``skimage.data``), two disjoint sets of photos.

``crops(names, count, height, width, seed)`` returns ``[count, 3, height, width]`` float32
in PaddleOCR's normalization ((x / 255 − 0.5) / 0.5): random crops of the photos' own
aspect-free windows (``height``:``width`` ratio), resized with anti-aliasing; grayscale
photos are repeated on three channels.
"""

from __future__ import annotations

import numpy as np

CALIBRATION_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "page", "immunohistochemistry")
VALIDATION_PHOTOS = ("camera", "cat", "motorcycle", "text", "brick", "colorwheel")


def _photo(name: str) -> np.ndarray:
    import skimage.data as data

    image = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return image[:, :, :3].astype(np.float32)


def crops(names, count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    photos = [_photo(n) for n in names]
    out = np.zeros((count, 3, height, width), np.float32)
    for k in range(count):
        img = photos[k % len(photos)]
        h, w = img.shape[:2]
        scale = rng.uniform(0.3, 1.0)
        ch = max(int(min(h, w * height / width) * scale), 8)
        cw = max(int(ch * width / height), 8)
        ch, cw = min(ch, h), min(cw, w)
        y = rng.integers(0, h - ch + 1)
        x = rng.integers(0, w - cw + 1)
        patch = resize(img[y:y + ch, x:x + cw], (height, width), anti_aliasing=True,
                       preserve_range=True)
        out[k] = ((patch / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    return out
