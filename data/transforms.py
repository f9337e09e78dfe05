"""Image transforms of the LDCSR data protocol (docs/method.md, "Data protocol").

LR images are Pillow-bicubic resizes of the uint8 HR to `(int(H/s), int(W/s))`; training crops get
LIIF-style flips and 90-degree rotations before the LR is made.
"""

from __future__ import annotations

import torch
from PIL import Image


def lr_size(hr_hw: tuple[int, int], scale: float) -> tuple[int, int]:
    """LR size for an HR size and a scale, truncating as the paper protocol does.

    Args:
        hr_hw: HR (height, width) in pixels.
        scale: SR factor s >= 1.

    Returns:
        (int(H / s), int(W / s)).

    Raises:
        ValueError: if `scale` is not positive or a side becomes 0.
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    height, width = hr_hw
    size = (int(height / scale), int(width / scale))
    if min(size) < 1:
        raise ValueError(
            f"image {height}x{width} too small for scale {scale}: the LR would be "
            f"{size[0]}x{size[1]}; use a smaller scale or a larger image"
        )
    return size


def resize_bicubic(img: Image.Image, size_hw: tuple[int, int]) -> Image.Image:
    """Pillow bicubic resize (on uint8 data, as the paper's LR images are made).

    Args:
        img: Pillow image.
        size_hw: target (height, width).

    Returns:
        Image of height `size_hw[0]` and width `size_hw[1]`.
    """
    height, width = size_hw
    # Pillow takes (width, height); the authors' helper passed (h, w), which transposes the LR of
    # non-square images (docs/method.md, "Known weaknesses").
    return img.resize((width, height), Image.Resampling.BICUBIC)


def augment(img: Image.Image, rng: torch.Generator | None = None) -> Image.Image:
    """Random horizontal flip, vertical flip and 90-degree rotation, each with p = 0.5.

    Together they draw uniformly from the 8 symmetries of the square (LIIF's augment uses a
    transpose instead of the rotation, which gives the same group). A rotation swaps H and W, so
    non-square inputs may come back transposed; the training crops are square.

    Args:
        img: Pillow image (the HR crop, before the LR is made from it).
        rng: torch generator; None uses torch's global RNG (seeded per DataLoader worker).

    Returns:
        The transformed image.
    """
    hflip, vflip, rot90 = (torch.rand(3, generator=rng) < 0.5).tolist()
    if hflip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if vflip:
        img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if rot90:
        img = img.transpose(Image.Transpose.ROTATE_90)
    return img
