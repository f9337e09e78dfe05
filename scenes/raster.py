"""GeoTIFF and multispectral scenes: band choice, radiometry, georeferencing and nodata.

The model is an RGB network on [0, 1]; a raster reaches it and comes back as follows.

- Bands: `bands` (1-based, as in GDAL; `--bands 3,2,1`) names the three bands fed to the model as
  R, G, B (default: the first three; `--bands 1` feeds band 1 as grey). Every other band is
  upsampled bicubically in its own units. The output keeps the input's band count, order, dtype,
  band descriptions, colour interpretation, scales/offsets and tags.
- Radiometry (`Stretch`): 8-bit data map by `value / 255`. Any other dtype maps
  `(value - lo) / (hi - lo)`, clipped to [0, 1], with `lo, hi` the 2nd and 98th percentiles of each
  model band, computed once per scene on a decimated read (<= `STATS_PIXELS` pixels, GDAL uses the
  overviews when there are some) without the nodata pixels, or `--value-range MIN,MAX` for all
  bands. The output is mapped back with the same `lo, hi`, so values stay in the input's units;
  values outside [lo, hi] saturate at its ends (pass the full range, e.g. `--value-range 0,4095`,
  to keep them). Integer outputs are rounded and clipped to the dtype. The mapping is written to
  the output's tags: `LDCSR_STRETCH` (dataset) and `LDCSR_STRETCH_MIN/MAX` (per model band).
- Nodata: masked pixels (nodata value or internal mask) are left out of the statistics and take
  their band's median before upsampling (so nodata does not bleed into valid pixels); each band's
  mask is upsampled nearest and its pixels are written as the input's nodata value (or as an
  internal mask). A valid pixel that would equal the nodata value is moved one level away.
  NaN and inf pixels of a float raster are treated alike (left out, filled, and written back
  nearest as they were). An alpha band (RGBA GeoTIFF) is a mask too: its pixels are resized
  nearest, not bicubic, and written back as the output's alpha; colours under a masked pixel are
  written as 0.
- Tags: the input's are copied except GDAL's `STATISTICS_*`, which describe the input's pixels.
- Read errors of a truncated or corrupt file are `ImageReadError`s naming it (`read_pixels`).
- Georeferencing: the CRS is kept and the pixel size divided by the per-axis scale (the origin is
  kept); GCPs are scaled. A raster georeferenced by RPCs only is refused (orthorectify it first).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.control import GroundControlPoint
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from utils.image_io import ImageReadError

DEFAULT_PERCENTILES = (2.0, 98.0)
STATS_PIXELS = 1 << 20  # pixels per band read for the stretch statistics
TAG_PREFIX = "LDCSR_"
STALE_TAG_PREFIX = "STATISTICS_"  # per-band pixel statistics, which no longer hold after SR


def parse_bands(text: str | None, error: type[Exception] = ValueError) -> tuple[int, ...] | None:
    """`--bands`: "3,2,1" -> (3, 2, 1); "1" -> (1, 1, 1) (grey); None -> None (the first three).

    Raises:
        error: (the caller's error type) for anything but one or three band numbers >= 1.
    """
    if text is None:
        return None
    parts = text.split(",")
    if len(parts) not in (1, 3) or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise error(f"--bands {text!r}: expected three 1-based band numbers such as 3,2,1 (or one)")
    bands = tuple(int(p) for p in parts)
    return bands * 3 if len(bands) == 1 else bands


def parse_value_range(
    text: str | None, error: type[Exception] = ValueError
) -> tuple[float, float] | None:
    """`--value-range`: "MIN,MAX" -> (MIN, MAX) with MIN < MAX; None -> None (percentiles).

    Raises:
        error: (the caller's error type) for a malformed, empty or infinite range (an infinite
            end would map every value to 0 or 1).
    """
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        lo = hi = math.nan
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise error(f"--value-range {text!r}: expected finite MIN,MAX with MIN < MAX, e.g. 0,4095")
    return lo, hi


@dataclass(frozen=True)
class Stretch:
    """The linear map between a model band's values and [0, 1]: `(value - lo) / (hi - lo)`.

    Attributes:
        lo, hi: [3] float64, per model channel (R, G, B), in the band's units.
        method: how they were chosen ("identity", "percentile 2-98", "value-range").
    """

    lo: np.ndarray
    hi: np.ndarray
    method: str

    def to_unit(self, raw: np.ndarray) -> np.ndarray:
        """[3, h, w] band values -> float32 [3, h, w] in [0, 1]."""
        lo, span = self._columns()
        return np.clip((raw - lo) / span, 0.0, 1.0, dtype=np.float32)

    def from_unit(self, unit: np.ndarray) -> np.ndarray:
        """float [3, H, W] in [0, 1] -> float32 [3, H, W] band values."""
        lo, span = self._columns()
        return unit * span + lo

    def _columns(self) -> tuple[np.ndarray, np.ndarray]:
        """lo and hi - lo as float32 [3, 1, 1] (float32 arithmetic on the blocks)."""
        lo, span = self.lo.astype(np.float32), (self.hi - self.lo).astype(np.float32)
        return lo[:, None, None], span[:, None, None]


def open_raster(path: str | Path):
    """Open a raster for reading (a rasterio dataset; the caller closes it).

    Raises:
        ImageReadError: missing or empty file, or not a raster GDAL reads, naming it and the fix.
    """
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise ImageReadError(f"{path} does not exist or is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = rasterio.open(path)
    except RasterioError as err:
        raise ImageReadError(
            f"cannot read {path} as a raster ({err}); check that it is a complete GeoTIFF "
            "(`gdalinfo` must open it) or convert it with gdal_translate"
        ) from err
    if np.dtype(src.dtypes[0]).kind not in "uif":
        src.close()
        raise ImageReadError(f"{path}: unsupported data type {src.dtypes[0]}; use integer or float")
    return src


def raster_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of a raster, from its header.

    Raises:
        ImageReadError: as `open_raster`.
    """
    with open_raster(path) as src:
        return src.height, src.width


def model_bands(src, bands: tuple[int, ...] | None) -> tuple[int, int, int]:
    """The three 1-based bands fed to the model as R, G, B (see the module docstring).

    Raises:
        ImageReadError: too few bands or a band number out of range, naming the file and the fix.
    """
    count = src.count
    if bands is None:
        if count < 3:
            raise ImageReadError(
                f"{src.name} has {count} band(s); the model needs three: pass --bands 1 to feed "
                "band 1 as grey, or --bands 1,2,1 to choose per channel"
            )
        return (1, 2, 3)
    if len(bands) != 3 or not all(1 <= b <= count for b in bands):
        given = ",".join(map(str, bands))
        raise ImageReadError(
            f"{src.name} has {count} band(s) (numbered 1..{count}); --bands {given} is out of "
            "range: pick three of them, e.g. --bands 3,2,1"
        )
    return tuple(bands)


def has_mask(src) -> bool:
    """True when some pixels may be masked (a nodata value, an internal mask or alpha)."""
    return src.nodata is not None or any(MaskFlags.all_valid not in f for f in src.mask_flag_enums)


def alpha_bands(src) -> list[int]:
    """1-based numbers of the alpha bands (e.g. band 4 of an RGBA GeoTIFF). An alpha band is a
    mask, not a colour: it is resized nearest and written back as the output's alpha."""
    return [i + 1 for i, c in enumerate(src.colorinterp) if c == ColorInterp.alpha]


def read_pixels(src, masks: bool = False, **kwargs) -> np.ndarray:
    """`src.read(**kwargs)` (`src.read_masks` with `masks`), where a truncated or corrupt file's
    GDAL error becomes an `ImageReadError` naming the file and the fix (not a write error)."""
    try:
        return (src.read_masks if masks else src.read)(**kwargs)
    except RasterioError as err:
        raise ImageReadError(
            f"cannot read {src.name} ({err}): the file is truncated or corrupt; check it with "
            "`gdalinfo -checksum` and re-export or re-download it"
        ) from err


def scene_stretch(
    src,
    bands: tuple[int, int, int],
    value_range: tuple[float, float] | None = None,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    max_pixels: int = STATS_PIXELS,
) -> Stretch:
    """The scene's `Stretch`, computed once from a decimated, masked read of the model bands.

    Raises:
        ImageReadError: a model band has no valid pixel.
    """
    if value_range is not None:
        lo, hi = np.full(3, value_range[0]), np.full(3, value_range[1])
        return Stretch(lo, hi, "value-range")
    if src.dtypes[0] == "uint8":
        return Stretch(np.zeros(3), np.full(3, 255.0), "identity")
    step = max(1, math.ceil(math.sqrt(src.height * src.width / max_pixels)))
    shape = (math.ceil(src.height / step), math.ceil(src.width / step))
    unique = sorted(set(bands))
    sample = read_pixels(src, indexes=unique, out_shape=(len(unique), *shape), masked=True,
                         resampling=Resampling.nearest)  # fmt: skip
    limits = {}
    for band, values in zip(unique, sample):
        valid = values.compressed()
        valid = valid[np.isfinite(valid)]  # NaN / inf in a float raster: not statistics
        if valid.size == 0:
            raise ImageReadError(f"{src.name}: band {band} has no valid (non-nodata) pixel")
        lo, hi = np.percentile(valid.astype(np.float64), percentiles)
        limits[band] = (lo, hi if hi > lo else lo + 1.0)  # a constant band maps to 0
    lo, hi = (np.array([limits[b][k] for b in bands]) for k in (0, 1))
    return Stretch(lo, hi, f"percentile {percentiles[0]:g}-{percentiles[1]:g}")


def nodata_fill(src, max_pixels: int = STATS_PIXELS) -> np.ndarray:
    """float32 [C]: each band's median over its valid, finite pixels (decimated read), the value
    masked and NaN / inf pixels take before upsampling, so that they do not bleed into valid
    neighbours."""
    step = max(1, math.ceil(math.sqrt(src.height * src.width / max_pixels)))
    shape = (src.count, math.ceil(src.height / step), math.ceil(src.width / step))
    sample = read_pixels(src, out_shape=shape, masked=True, resampling=Resampling.nearest)
    sample = np.ma.masked_invalid(sample)  # NaN / inf pixels of a float raster
    return np.array([np.ma.median(band) if band.count() else 0.0 for band in sample], np.float32)


def scaled_georeference(src, out_size: tuple[int, int]) -> dict:
    """`crs`, `transform` and `gcps` of the output: pixel size / per-axis scale, origin kept.

    Raises:
        ImageReadError: the raster is georeferenced by RPCs only (they are not rescaled).
    """
    (h, w), (out_h, out_w) = (src.height, src.width), out_size
    scale_y, scale_x = out_h / h, out_w / w
    gcps, gcp_crs = src.gcps
    geo = {}
    if not src.transform.is_identity:
        geo["transform"] = src.transform @ Affine.scale(1 / scale_x, 1 / scale_y)
    if gcps:
        geo["gcps"] = [
            GroundControlPoint(g.row * scale_y, g.col * scale_x, g.x, g.y, g.z, g.id, g.info)
            for g in gcps
        ]
        geo["gcp_crs"] = gcp_crs
    if src.crs is not None:
        geo["crs"] = src.crs
    if src.rpcs is not None and not geo:
        raise ImageReadError(
            f"{src.name} is georeferenced by RPCs only, which are not rescaled; orthorectify it "
            "first (gdalwarp -rpc) so that it has a geotransform"
        )
    return geo


def output_profile(src, out_size: tuple[int, int], tile: int = 256) -> dict:
    """GTiff creation options: tiled, DEFLATE-compressed, the input's dtype, bands and nodata."""
    dtype = src.dtypes[0]
    profile = dict(
        driver="GTiff", height=out_size[0], width=out_size[1], count=src.count, dtype=dtype,
        nodata=src.nodata, tiled=True, blockxsize=tile, blockysize=tile, compress="deflate",
        predictor=3 if np.dtype(dtype).kind == "f" else 2, interleave="pixel", bigtiff="if_safer",
    )  # fmt: skip
    geo = scaled_georeference(src, out_size)
    profile.update({k: geo[k] for k in ("crs", "transform") if k in geo})
    return profile


def copy_metadata(src, dst, out_size, bands, stretch: Stretch) -> None:
    """Tags, band descriptions, colour interpretation, scales/offsets, units, GCPs and the
    radiometric mapping (`LDCSR_*` tags) from `src` to the open output `dst`."""
    geo = scaled_georeference(src, out_size)
    if "gcps" in geo:
        dst.gcps = (geo["gcps"], geo["gcp_crs"])
    dst.update_tags(**_current_tags(src.tags()))
    dst.update_tags(
        LDCSR_STRETCH=stretch.method,
        LDCSR_MODEL_BANDS=",".join(map(str, bands)),
        LDCSR_SCALE=f"{out_size[0] / src.height:g},{out_size[1] / src.width:g}",
    )
    for band in range(1, src.count + 1):
        dst.update_tags(band, **_current_tags(src.tags(band)))
        if src.descriptions[band - 1]:
            dst.set_band_description(band, src.descriptions[band - 1])
        if src.units[band - 1]:
            dst.set_band_unit(band, src.units[band - 1])
    for channel, band in enumerate(bands):
        lo, hi = stretch.lo[channel], stretch.hi[channel]
        dst.update_tags(band, LDCSR_STRETCH_MIN=f"{lo:.6g}", LDCSR_STRETCH_MAX=f"{hi:.6g}")
    dst.colorinterp = src.colorinterp
    dst.scales, dst.offsets = src.scales, src.offsets


def _current_tags(tags: dict) -> dict:
    """The tags that still describe the output: GDAL's `STATISTICS_*` (min, max, mean, ...)
    were computed from the input's pixels, so they are left out (GDAL recomputes them)."""
    return {k: v for k, v in tags.items() if not k.upper().startswith(STALE_TAG_PREFIX)}


def to_dtype(values: np.ndarray, valid: np.ndarray | None, dtype, nodata) -> np.ndarray:
    """float32 [C, H, W] band values -> `dtype` (rounded and clipped for integers); pixels where
    `valid` [C, H, W] is False get `nodata` (0 without one: the mask or alpha marks them), valid
    ones never equal it."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = np.clip(np.rint(values), info.min, info.max)
    out = values.astype(dtype)
    if valid is None:
        return out
    if nodata is None:  # masked by an internal mask or alpha: no invented colour under it
        out[~valid] = 0
        return out
    if not math.isnan(nodata):
        if dtype.kind == "f":
            away = np.nextafter(dtype.type(nodata), dtype.type(np.inf))
        else:
            away = nodata + 1 if nodata < np.iinfo(dtype).max else nodata - 1
        out[valid & (out == dtype.type(nodata))] = away
    out[~valid] = nodata
    return out


@dataclass(frozen=True)
class Span:
    """One block along one axis (rows or columns); LR and HR pixel ranges are [start, stop).

    Attributes:
        read: LR pixels read (the core plus up to `overlap` on each side).
        start, stop: HR pixels with a non-zero weight, on the scene's output grid (what the
            block computes from its read); `start` is the previous span's `final`.
        blended: end of the blend zone shared with the previous span (`start` if none).
        final: end of the pixels that no later span touches (`stop` for the last span).
        weight: float32 [stop - start] cross-fade weights; overlapping spans sum to 1.
        lr_of_hr: LR/HR size ratio, for the nearest-neighbour mask.
    """

    read: tuple[int, int]
    start: int
    blended: int
    final: int
    stop: int
    weight: np.ndarray
    lr_of_hr: float


def block_spans(n: int, out_n: int, block: int, overlap: int) -> list[Span]:
    """Cut an axis of `n` LR pixels (`out_n` HR pixels) into ceil(n / block) equal blocks.

    The boundary c between two blocks is blended over LR [c - overlap/2, c + overlap/2): the
    weight of the later block rises linearly with the LR position of the HR pixel centre. A
    block's HR pixels are those of the scene's output grid, so at any scale (non-integer,
    different per axis) a block computes exactly the pixels of the whole scene's output that its
    read can serve: the read reaches `overlap / 2` LR pixels beyond the weighted pixels.
    """
    count = max(1, math.ceil(n / block))
    edges = [round(k * n / count) for k in range(count + 1)]
    half = overlap // 2

    def hr(u: float) -> int:  # LR coordinate -> nearest HR pixel edge
        return math.floor(u * out_n / n + 0.5)

    def rise(u: np.ndarray, c: int) -> np.ndarray:
        return np.clip((u - c + half) / (2 * half), 0, 1) if half else (u >= c).astype(float)

    spans = []
    for k, (c0, c1) in enumerate(zip(edges, edges[1:])):
        first, last = k == 0, k == count - 1
        start, stop = hr(0 if first else c0 - half), hr(n if last else c1 + half)
        centres = (np.arange(start, stop) + 0.5) * n / out_n
        weight = np.ones(stop - start)
        if not first:
            weight *= rise(centres, c0)
        if not last:
            weight *= 1 - rise(centres, c1)
        read = (max(0, c0 - overlap), min(n, c1 + overlap))
        spans.append(Span(
            read=read, start=start,
            blended=start if first else hr(c0 + half), final=stop if last else hr(c1 - half),
            stop=stop, weight=weight.astype(np.float32), lr_of_hr=n / out_n,
        ))  # fmt: skip
    return spans
