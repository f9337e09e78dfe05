"""Reading and writing whole scenes for super_resolve.py, keeping bands, bit depth and GeoTIFF.

The model sees RGB in [0, 1]: `value / (2^bits - 1)` (no contrast stretch), grey replicated to
R, G, B. Outputs are written back in the input's layout:

| input (Pillow mode)            | written as                                                    |
|--------------------------------|---------------------------------------------------------------|
| RGB, P, CMYK, YCbCr (8 bit)    | 8-bit RGB                                                     |
| RGBA, PA / LA                  | 8-bit RGBA / LA; alpha resized bicubic, not super-resolved    |
| L, 1                           | 8-bit grey: mean of the three output channels                 |
| I;16 (16-bit grey), I          | 16-bit grey (I: values clipped to 0..65535)                   |
| 16-bit RGB(A) TIFF             | 16-bit, read/written with tifffile when installed; else 8 bit |
| 16-bit RGB PNG                 | 8 bit: Pillow keeps only the high byte (a warning says so)    |
| GeoTIFF (rasterio installed)   | same bands/dtype (uint8/uint16), CRS kept, pixel size / scale |
| F (float), I;32, >4 bands, ... | refused with `ImageReadError` naming the mode                 |

Outputs are PNG for PNG/JPEG inputs (lossless) and TIFF for TIFF inputs.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from utils.image_io import IMAGE_EXTENSIONS, ImageReadError

log = logging.getLogger(__name__)
TIFF = (".tif", ".tiff")


@dataclass
class Scene:
    """An image as the model sees it plus what is needed to write the result back.

    Attributes:
        rgb: [3, h, w] float32 in [0, 1].
        bands: 1 (grey) or 3 (RGB) colour bands in the file.
        bits: 8 or 16.
        alpha: [h, w] alpha band in the file's integer dtype, or None.
        writer: "pillow", "tifffile" or "rasterio".
        profile: rasterio profile of a GeoTIFF (else empty).
    """

    rgb: torch.Tensor
    bands: int
    bits: int
    alpha: np.ndarray | None = None
    writer: str = "pillow"
    profile: dict = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.rgb.shape[-2:])


def optional(name: str):
    """The module `name` if it is installed, else None. rasterio (GeoTIFF) and tifffile (16-bit
    colour TIFF) are optional extras, not in requirement.txt: `pip install rasterio tifffile`."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def output_suffix(path: str | Path) -> str:
    return ".tif" if Path(path).suffix.lower() in TIFF else ".png"


def read_scene(path: str | Path) -> Scene:
    """Read an image file (see the module docstring for the supported layouts).

    Raises:
        ImageReadError: missing, empty, corrupt or unsupported file, naming it and the fix.
    """
    path = Path(path)
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ImageReadError(f"{path}: unsupported file type; use one of {IMAGE_EXTENSIONS}")
    if not path.is_file() or path.stat().st_size == 0:
        raise ImageReadError(f"{path} does not exist or is empty")
    if path.suffix.lower() in TIFF and optional("rasterio") is not None:
        return _read_rasterio(path)
    try:
        with Image.open(path) as img:
            rawmode = str(img.tile[0][-1]) if img.tile else ""
            if ";16" in rawmode and img.mode in ("RGB", "RGBA"):
                return _read_16bit_colour(path, img)
            img.load()
            return _from_pillow(path, img)
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"cannot read image {path}: {type(err).__name__}: {err}") from err


def _from_pillow(path: Path, img: Image.Image) -> Scene:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey = np.clip(np.asarray(img, dtype=np.int64), 0, 65535).astype(np.uint16)
        return _scene(grey[..., None], 16)
    if mode in ("1", "L", "LA", "RGB", "RGBA"):
        arr = np.asarray(img.convert("L") if mode == "1" else img, dtype=np.uint8)
        return _scene(arr.reshape(*arr.shape[:2], -1), 8)
    if mode in ("P", "PA", "CMYK", "YCbCr"):
        img = img.convert("RGBA" if mode == "PA" else "RGB")
        return _scene(np.asarray(img, dtype=np.uint8), 8)
    raise ImageReadError(
        f"{path}: unsupported image mode {mode!r}; convert it to 8- or 16-bit RGB or grey "
        "(e.g. scale floats to uint16)"
    )


def _read_16bit_colour(path: Path, img: Image.Image) -> Scene:
    tifffile = optional("tifffile")
    if path.suffix.lower() in TIFF and tifffile is not None:
        arr = tifffile.imread(path)
        if arr.ndim != 3 or arr.dtype != np.uint16:
            raise ImageReadError(f"{path}: unsupported TIFF layout {arr.shape} {arr.dtype}")
        scene = _scene(arr, 16)
        scene.writer = "tifffile"
        return scene
    log.warning("%s: 16-bit colour is read as 8 bit by Pillow (install tifffile for TIFF)", path)
    img.load()
    return _from_pillow(path, img)


def _scene(arr: np.ndarray, bits: int) -> Scene:
    """[h, w, C] integer array with C in 1..4 (grey, grey+alpha, RGB, RGBA) -> Scene."""
    channels = arr.shape[-1]
    if channels not in (1, 2, 3, 4):
        raise ImageReadError(f"{channels} bands are not supported (1-4: grey/RGB with alpha)")
    colour = 1 if channels <= 2 else 3
    alpha = arr[..., colour].copy() if channels in (2, 4) else None
    rgb = torch.from_numpy(arr[..., :colour].astype(np.float32) / (2**bits - 1))
    rgb = rgb.permute(2, 0, 1).expand(3, -1, -1).contiguous()
    return Scene(rgb=rgb, bands=colour, bits=bits, alpha=alpha)


def _read_rasterio(path: Path) -> Scene:
    rasterio = optional("rasterio")
    try:
        with rasterio.open(path) as src:
            arr, profile = src.read(), dict(src.profile)
    except rasterio.errors.RasterioError as err:
        raise ImageReadError(f"cannot read image {path}: {err}") from err
    bits = {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}.get(arr.dtype)
    if bits is None:
        raise ImageReadError(f"{path}: unsupported data type {arr.dtype}; use uint8 or uint16")
    scene = _scene(np.moveaxis(arr, 0, -1), bits)
    scene.writer, scene.profile = "rasterio", profile
    return scene


def write_scene(path: str | Path, scene: Scene, sr: torch.Tensor) -> None:
    """Write `sr` [3, H, W] in [0, 1] in the layout of `scene` (bands, bit depth, georeference)."""
    path = Path(path)
    maxval = 2**scene.bits - 1
    out = sr.float().clamp(0, 1)  # in-place steps below: a scene output may be large
    if scene.bands == 1:
        out = out.mean(dim=0, keepdim=True)
    if scene.alpha is not None:
        alpha = torch.from_numpy(scene.alpha.astype(np.float32) / maxval)[None, None]
        alpha = F.interpolate(alpha, size=out.shape[-2:], mode="bicubic", align_corners=False)
        out = torch.cat([out, alpha[0].clamp_(0, 1)])
    dtype = np.uint8 if scene.bits == 8 else np.uint16
    arr = out.mul_(maxval).round_().permute(1, 2, 0).numpy().astype(dtype)  # [H, W, bands]
    if scene.writer == "rasterio":
        _write_rasterio(path, scene, arr)
    elif scene.writer == "tifffile":
        optional("tifffile").imwrite(path, arr, photometric="rgb" if arr.shape[-1] >= 3 else None)
    elif scene.bits == 16:
        if arr.shape[-1] > 1:
            log.warning("%s: Pillow cannot write 16-bit grey+alpha; alpha dropped", path)
        Image.fromarray(arr[..., 0]).save(path)
    else:
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)


def _write_rasterio(path: Path, scene: Scene, arr: np.ndarray) -> None:
    rasterio, affine = optional("rasterio"), optional("affine")  # affine: a rasterio dependency
    (h, w), (height, width) = scene.size, arr.shape[:2]
    profile = dict(scene.profile)
    transform = profile.get("transform")
    if transform is not None:  # pixel size divided by the scale, same origin
        scale = affine.Affine.scale(w / width, h / height)
        matmul = hasattr(affine.Affine, "__matmul__")  # affine >= 2.4 prefers @ to *
        profile["transform"] = transform @ scale if matmul else transform * scale
    profile.update(width=width, height=height, count=arr.shape[-1])
    for key in ("blockxsize", "blockysize"):  # block sizes of the input may not fit the output
        profile.pop(key, None)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.moveaxis(arr, -1, 0))
