"""Image reading for the data pipeline: any file Pillow opens becomes an RGB uint8 image.

Mode conversions done by `load_image` (no EXIF rotation, first frame of multi-page files):

| mode              | conversion                                                              |
|-------------------|-------------------------------------------------------------------------|
| RGB               | unchanged                                                               |
| 1, L              | grey replicated to R, G, B                                              |
| LA, RGBA, PA      | alpha is dropped (not composited): transparent pixels keep their colour |
| P                 | palette looked up (transparency dropped)                                |
| CMYK, YCbCr, LAB… | Pillow's `convert("RGB")` (no ICC colour management)                    |
| I;16, I;16B, …    | 16-bit grey: v >> 8 (high byte), then replicated                        |
| I                 | 32-bit int, read as 16-bit: clip(v, 0, 65535) >> 8                      |
| F                 | 32-bit float, read as [0, 1]: round(clip(x, 0, 1) * 255)                |

16-bit RGB PNG/TIFF files are reduced to 8 bit by Pillow's decoder, which keeps the high byte;
`v >> 8` for 16-bit grey matches it (it differs from round(v / 257) by at most 1).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_FIX = "re-export it as an 8-bit RGB PNG/JPEG or remove it from the folder/split"


class ImageReadError(ValueError):
    """An image file is empty, corrupt or unreadable; the message names the file and the fix."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB uint8 following the table in the module docstring."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        v = np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8
        return Image.fromarray(v.astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "F":
        v = np.round(np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0) * 255.0)
        return Image.fromarray(v.astype(np.uint8), mode="L").convert("RGB")
    if img.mode in ("LA", "PA"):
        img = img.convert(img.mode[0])  # drop alpha first: LA -> L, PA -> P
    return img.convert("RGB")  # RGBA drops alpha; L, P, CMYK, YCbCr, ... by Pillow


def _open_error(path: Path, err: Exception) -> ImageReadError:
    return ImageReadError(f"cannot read image {path}: {type(err).__name__}: {err}; {_FIX}")


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ImageReadError(f"image {path} does not exist; check the folder or the split file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"image {path} is an empty (0-byte) file; {_FIX}")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file as an RGB uint8 Pillow image.

    Args:
        path: image file (any format/mode Pillow reads; see the module docstring).

    Returns:
        RGB image, size (W, H), values 0..255.

    Raises:
        ImageReadError: the file is missing, empty, truncated or not an image.
    """
    path = Path(path)
    _check_file(path)
    try:
        with Image.open(path) as img:
            img.load()  # decode now so truncated files fail here, not later
            return _to_rgb(img).copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise _open_error(path, err) from err


def verify_image(path: str | os.PathLike) -> tuple[int, int]:
    """Check that an image decodes to its end, cheaply, and return its size.

    PNG: `verify` reads every chunk and checks its CRC. JPEG: a decode at 1/8 size (`draft`),
    which still reads the whole entropy-coded stream, so a truncated file fails here (Pillow's
    `verify` reads only the header of a JPEG). Other formats (TIFF, ...): a full decode.

    Returns:
        (height, width) in pixels.

    Raises:
        ImageReadError: the file is missing, empty, truncated or corrupt.
    """
    path = Path(path)
    _check_file(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.format == "PNG":
                img.verify()
            else:
                if img.format == "JPEG":
                    img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
                img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise _open_error(path, err) from err
    return height, width


def list_images(root: str | os.PathLike, recursive: bool = True) -> list[str]:
    """List image files (png/jpg/jpeg/tif/tiff, any case) under `root`.

    Hidden files and folders (name starting with ".", e.g. macOS `._x.jpg`) are skipped.

    Returns:
        Sorted paths relative to `root`, with "/" separators (e.g. `Park/park_1.jpg`).
    """
    root = Path(root)
    paths = root.rglob("*") if recursive else root.glob("*")
    return sorted(
        p.relative_to(root).as_posix()
        for p in paths
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def to_tensor01(img: Image.Image) -> torch.Tensor:
    """RGB uint8 Pillow image (W, H) -> FloatTensor [3, H, W] in [0, 1]."""
    if img.mode != "RGB":
        raise ValueError(f"to_tensor01 expects an RGB image, got mode {img.mode!r}; use load_image")
    arr = np.asarray(img, dtype=np.uint8)  # [H, W, 3]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
