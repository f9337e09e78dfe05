"""One procedural aerial scene: the layout painted by `SceneLayout`, rotated to a random road-grid
angle, cropped, then passed through a camera model (MTF blur, haze, sensor noise, JPEG).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFilter

from data.synthetic.layout import SceneLayout


def scene_size(size: int | Sequence[int]) -> tuple[int, int]:
    """`(height, width)` from a side or a pair; raises ValueError for sides < 8."""
    hw = (size, size) if isinstance(size, int | np.integer) else size
    hw = tuple(hw) if isinstance(hw, Sequence) and not isinstance(hw, str) else ()
    if len(hw) != 2 or not all(isinstance(s, int | np.integer) and s >= 8 for s in hw):
        raise ValueError(f"scene size must be an int or (height, width) of ints >= 8, got {size!r}")
    return int(hw[0]), int(hw[1])


def _camera(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Optics/detector MTF blur, haze and gain, sensor noise, then JPEG at quality 85-92."""
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.45, 0.75)))
    arr = np.asarray(img, np.float32)
    grey = arr.mean(-1, keepdims=True)
    arr = (grey + (arr - grey) * rng.uniform(0.7, 0.95)) * rng.uniform(0.92, 1.08)
    arr += rng.uniform(0, 14) * np.array([0.8, 0.9, 1.0], np.float32)  # atmospheric haze
    arr += rng.standard_normal(arr.shape[:2] + (1,), dtype=np.float32) * rng.uniform(1, 2.5)
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * rng.uniform(0.5, 1.5)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8)).save(
        buffer, "JPEG", quality=int(rng.integers(85, 93))
    )
    return Image.open(buffer).convert("RGB")


def generate_scene(
    size: int | tuple[int, int] = 512, seed: int | tuple[int, ...] = 0
) -> Image.Image:
    """Paint one aerial scene (deterministic per seed).

    The layout (road grid at a random angle, land use of each block, ground sampling 0.3-0.5 m/px,
    sun direction and camera parameters) is drawn from `numpy.random.default_rng(seed)`.

    Args:
        size: side in pixels, or `(height, width)`; sides >= 8.
        seed: non-negative int or tuple of them (a set uses `(set seed, image index)`).

    Returns:
        RGB uint8 Pillow image of `size` (about 0.1-0.3 s for 512 x 512 on one core).
    """
    h, w = scene_size(size)
    rng = np.random.default_rng(seed)
    angle = 0.0 if rng.random() < 0.3 else rng.uniform(0, 90)
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    ch, cw = math.ceil(w * sin + h * cos) + 2, math.ceil(w * cos + h * sin) + 2  # covers the crop
    img = SceneLayout(rng, ch, cw).render()
    if angle:  # the grid runs at `angle` to the image axes
        img = img.rotate(angle, Image.Resampling.BICUBIC)
    left, top = (cw - w) // 2, (ch - h) // 2
    img = img.crop((left, top, left + w, top + h))
    return _camera(img, rng)


def scene_name(index: int) -> str:
    """File name of scene `index` of a set: `scene_0000.png`, ..."""
    return f"scene_{index:04d}.png"
