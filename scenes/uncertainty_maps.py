"""Uncertainty maps on disk: `<name>_uncertainty.tif` (float32) and a colour-mapped PNG preview.

The map itself is computed by `models.uncertainty` (per-pixel std of several samples' [0, 1]
outputs, averaged over the colour channels). For a GeoTIFF scene the map is assembled from the
N sample rasters written by `scenes.scene_io.super_resolve_raster`, window by window, and keeps the
output's georeferencing; pixels the output masks are NaN (the map's nodata).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from scenes.raster import model_bands, open_raster, scene_stretch
from scenes.scene_io import atomic_output

# Viridis at nine evenly spaced points (perceptually uniform, readable in grey and by the
# colour-blind); the preview interpolates linearly between them.
VIRIDIS = np.array([
    (68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
    (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37),
], dtype=np.float32)  # fmt: skip
PREVIEW_SIDE = 4096  # longest side of a PNG preview (larger maps are decimated)
STRIP = 256  # output rows per window when combining sample rasters


def uncertainty_paths(output: str | Path) -> tuple[Path, Path]:
    """(`<stem>_uncertainty.tif`, `<stem>_uncertainty.png`) beside the output image `output`."""
    output = Path(output)
    stem = output.with_name(f"{output.stem}_uncertainty")
    return stem.with_suffix(".tif"), stem.with_suffix(".png")


def colour_map(values: np.ndarray, vmax: float) -> np.ndarray:
    """[H, W] values (NaN allowed) -> uint8 [H, W, 3] viridis of `values / vmax` (clipped to
    [0, 1]); NaN is black."""
    t = np.clip(np.nan_to_num(values, nan=0.0) / max(float(vmax), 1e-12), 0.0, 1.0)
    pos = t * (len(VIRIDIS) - 1)
    lo = np.minimum(pos.astype(np.int64), len(VIRIDIS) - 2)
    frac = (pos - lo)[..., None]
    rgb = VIRIDIS[lo] * (1 - frac) + VIRIDIS[lo + 1] * frac
    rgb[np.isnan(values)] = 0
    return np.round(rgb).astype(np.uint8)


def write_preview(tif: Path, png: Path) -> None:
    """The PNG preview of a map: viridis from 0 to the map's 99th percentile (decimated to at
    most `PREVIEW_SIDE` pixels per side)."""
    with open_raster(tif) as src:
        factor = max(1, -(-max(src.height, src.width) // PREVIEW_SIDE))
        shape = (-(-src.height // factor), -(-src.width // factor))
        values = src.read(1, out_shape=shape, resampling=Resampling.average).astype(np.float32)
    finite = values[np.isfinite(values)]
    vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
    with atomic_output(png) as tmp:
        Image.fromarray(colour_map(values, vmax)).save(tmp, format="PNG")


def write_uncertainty(output: str | Path, uncertainty: np.ndarray) -> tuple[Path, Path]:
    """Writes the map [H, W] of the (non-georeferenced) output image `output` as float32 TIFF and
    PNG preview (`uncertainty_paths`); returns both paths."""
    tif, png = uncertainty_paths(output)
    values = np.asarray(uncertainty, dtype=np.float32)
    profile = dict(driver="GTiff", height=values.shape[0], width=values.shape[1], count=1,
                   dtype="float32", compress="deflate", predictor=3)  # fmt: skip
    with atomic_output(tif) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(values, 1)
    write_preview(tif, png)
    return tif, png


def raster_uncertainty(
    src_path: str | Path,
    samples: Sequence[Path],
    bands: tuple[int, ...] | None = None,
    value_range: tuple[float, float] | None = None,
) -> tuple[Path, Path]:
    """The map of a GeoTIFF scene from its sample rasters (`samples[0]` is the output itself):
    each sample's model bands mapped back to [0, 1] with the scene's stretch, std over samples,
    mean over the three model channels; georeferenced as the output. Returns the two paths."""
    with open_raster(src_path) as src:
        model = [b - 1 for b in model_bands(src, bands)]
        stretch = scene_stretch(src, tuple(b + 1 for b in model), value_range)
    tif, png = uncertainty_paths(samples[0])
    with open_raster(samples[0]) as ref:
        profile = dict(driver="GTiff", height=ref.height, width=ref.width, count=1,
                       dtype="float32", nodata=float("nan"), tiled=True, blockxsize=256,
                       blockysize=256, compress="deflate", predictor=3)  # fmt: skip
        profile.update({k: v for k, v in (("crs", ref.crs), ("transform", ref.transform)) if v})
    readers = [open_raster(p) for p in samples]
    try:
        with atomic_output(tif) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(tmp, "w", **profile) as dst:
                for row in range(0, profile["height"], STRIP):
                    window = Window(0, row, profile["width"], min(STRIP, profile["height"] - row))
                    units = [stretch.to_unit(r.read(window=window)[model]) for r in readers]
                    std = np.stack(units).astype(np.float64).std(axis=0).mean(axis=0)
                    valid = readers[0].read_masks(window=window).any(axis=0)
                    dst.write(np.where(valid, std, np.nan).astype(np.float32), 1, window=window)
    finally:
        for reader in readers:
            reader.close()
    write_preview(tif, png)
    return tif, png
