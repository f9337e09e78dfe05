"""Whole scenes for super_resolve.py: PNG/JPEG in memory, GeoTIFFs streamed from disk to disk.

PNG and JPEG (`read_scene`, `write_scene`): the model sees RGB in [0, 1] as
`value / (2^bits - 1)`, grey replicated to R, G, B; outputs are PNG in the input's layout:

| input (Pillow mode)            | written as                                                    |
|--------------------------------|---------------------------------------------------------------|
| RGB, P, CMYK, YCbCr (8 bit)    | 8-bit RGB (RGBA when a tRNS chunk makes colours transparent)  |
| RGBA, PA / LA                  | 8-bit RGBA / LA; alpha as a mask (nearest), 0 under alpha 0  |
| L, 1                           | 8-bit grey: mean of the three output channels                 |
| I;16 (16-bit grey), I          | 16-bit grey (I: values clipped to 0..65535)                   |
| 16-bit RGB PNG                 | 8 bit: Pillow keeps only the high byte (a warning says so)    |
| F (float), I;32, >4 bands, ... | refused with `ImageReadError` naming the mode                 |

A PNG/JPEG with a world file (georeferencing) is refused: convert it to GeoTIFF.

TIFF and GeoTIFF (`super_resolve_raster`, any band count and dtype, see `scenes.raster` for the
bands, radiometry, nodata and georeferencing): the scene is cut into blocks of `block` LR pixels
that read `overlap` more pixels on each side; each block is super-resolved on its own by `sr_fn`
(within a block the model's own tiling applies), which computes the block's window of the whole
scene's output grid (`scenes.blocks.BlockWindow`: at any scale, a block has the pixels an
untiled run has there), and neighbouring blocks are cross-faded linearly over the central
`overlap` pixels of their overlap, so block seams are blended. Memory depends on the block size
(plus a strip `overlap` output pixels high across the output and GDAL's block cache), not on the
scene. The processes of a torchrun / srun run can share one scene's blocks (`share`: all compute,
one writes, the same bytes as one process). Outputs are tiled, DEFLATE-compressed GeoTIFFs, or
Cloud-Optimized GeoTIFFs with overviews (`cog=True`), written under a temporary name and renamed
when complete.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
import torch
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from scenes.blocks import BlockShare, BlockWindow, SrFn, block_values
from scenes.raster import (
    Span,
    alpha_bands,
    block_spans,
    copy_metadata,
    has_mask,
    model_bands,
    nodata_fill,
    open_raster,
    output_profile,
    read_pixels,
    scene_stretch,
    to_dtype,
)
from utils.atomic import atomic_output
from utils.image_io import IMAGE_EXTENSIONS, ImageReadError

log = logging.getLogger(__name__)
TIFF = (".tif", ".tiff")
WORLD_FILES = (".pgw", ".pngw", ".jgw", ".jpgw", ".jpegw", ".wld")
BLOCK, OVERLAP = 512, 32  # LR pixels
COG_OPTIONS = dict(compress="DEFLATE", predictor="YES", blocksize=512,
                   overview_resampling="AVERAGE", bigtiff="IF_SAFER")  # fmt: skip


@dataclass
class Scene:
    """An image as the model sees it plus what is needed to write the result back.

    Attributes:
        rgb: [3, h, w] float32 in [0, 1].
        bands: 1 (grey) or 3 (RGB) colour bands in the file.
        bits: 8 or 16.
        alpha: [h, w] alpha band in the file's integer dtype, or None.
    """

    rgb: torch.Tensor
    bands: int
    bits: int
    alpha: np.ndarray | None = None

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.rgb.shape[-2:])


def is_raster(path: str | Path) -> bool:
    """True for TIFFs, which go through `super_resolve_raster` (GeoTIFF, multispectral)."""
    return Path(path).suffix.lower() in TIFF


def output_suffix(path: str | Path) -> str:
    return ".tif" if is_raster(path) else ".png"


def read_scene(path: str | Path) -> Scene:
    """Read a PNG or JPEG file (see the module docstring for the supported layouts).

    Raises:
        ImageReadError: missing, empty, corrupt, unsupported or georeferenced file, naming it and
            the fix.
    """
    path = Path(path)
    if path.suffix.lower() not in IMAGE_EXTENSIONS or is_raster(path):
        raise ImageReadError(
            f"{path}: read_scene reads PNG/JPEG; TIFFs go through super_resolve_raster"
            if is_raster(path)
            else f"{path}: unsupported file type; use one of {IMAGE_EXTENSIONS}"
        )
    if not path.is_file() or path.stat().st_size == 0:
        raise ImageReadError(f"{path} does not exist or is empty")
    world = [path.with_suffix(s) for s in WORLD_FILES if path.with_suffix(s).is_file()]
    if world:
        raise ImageReadError(
            f"{path} is georeferenced by {world[0].name}, which a PNG output cannot keep; "
            f"convert it to GeoTIFF first (gdal_translate {path.name} {path.stem}.tif)"
        )
    try:
        with Image.open(path) as img:
            rawmode = str(img.tile[0][-1]) if img.tile else ""
            if ";16" in rawmode and img.mode in ("RGB", "RGBA"):
                log.warning("%s: 16-bit colour is read as 8 bit by Pillow (use a TIFF)", path)
            img.load()
            return _from_pillow(path, img)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as err:  # PNG/JPEG are read whole; TIFFs are streamed
        raise ImageReadError(
            f"{path} is larger than Pillow reads in one piece ({err}); convert it to GeoTIFF "
            f"(gdal_translate {path.name} {path.stem}.tif), which is streamed block by block"
        ) from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"cannot read image {path}: {type(err).__name__}: {err}") from err


def _from_pillow(path: Path, img: Image.Image) -> Scene:
    mode = img.mode
    if "transparency" in img.info and mode in ("P", "L", "RGB"):  # tRNS: alpha in disguise
        img = img.convert("LA" if mode == "L" else "RGBA")
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


def _scene(arr: np.ndarray, bits: int) -> Scene:
    """[h, w, C] integer array with C in 1..4 (grey, grey+alpha, RGB, RGBA) -> Scene."""
    colour = 1 if arr.shape[-1] <= 2 else 3
    alpha = arr[..., colour].copy() if arr.shape[-1] in (2, 4) else None
    rgb = torch.from_numpy(arr[..., :colour].astype(np.float32) / (2**bits - 1))
    rgb = rgb.permute(2, 0, 1).expand(3, -1, -1).contiguous()
    return Scene(rgb=rgb, bands=colour, bits=bits, alpha=alpha)


def write_scene(path: str | Path, scene: Scene, sr: torch.Tensor) -> None:
    """Write `sr` [3, H, W] in [0, 1] as PNG in the layout of `scene` (bands, bit depth).

    Raises:
        RasterWriteError: the file could not be written; no partial file is left.
    """
    path = Path(path)
    maxval = 2**scene.bits - 1
    out = sr.float().clamp(0, 1)  # in-place steps below: a scene output may be large
    if scene.bands == 1:
        out = out.mean(dim=0, keepdim=True)
    dtype = np.uint8 if scene.bits == 8 else np.uint16
    arr = out.mul_(maxval).round_().permute(1, 2, 0).numpy().astype(dtype)  # [H, W, bands]
    if scene.alpha is not None:  # a mask, not a colour: nearest, no colour under alpha 0
        alpha = resize_nearest(scene.alpha, arr.shape[:2])
        arr[alpha == 0] = 0
        arr = np.concatenate([arr, alpha[..., None].astype(dtype)], axis=-1)
    if scene.bits == 16 and arr.shape[-1] > 1:
        log.warning("%s: Pillow cannot write 16-bit grey+alpha; alpha dropped", path)
        arr = arr[..., :1]
    with atomic_output(path) as tmp:
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(tmp, format="PNG")


def resize_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[h, w] -> [*size]: each output pixel takes the input pixel under its centre, so a mask
    keeps its values (no new levels, nothing out of range) and transparent stays transparent."""
    rows = np.minimum(((np.arange(size[0]) + 0.5) * mask.shape[0] / size[0]).astype(int),
                      mask.shape[0] - 1)  # fmt: skip
    cols = np.minimum(((np.arange(size[1]) + 0.5) * mask.shape[1] / size[1]).astype(int),
                      mask.shape[1] - 1)  # fmt: skip
    return mask[rows][:, cols]


def super_resolve_raster(
    src_path: str | Path,
    dst_path: str | Path,
    sr_fn: SrFn,
    out_size: tuple[int, int],
    bands: tuple[int, ...] | None = None,
    value_range: tuple[float, float] | None = None,
    cog: bool = False,
    block: int = BLOCK,
    overlap: int = OVERLAP,
    share: BlockShare | None = None,
) -> None:
    """Super-resolve a (Geo)TIFF block by block from disk to disk (see the module docstring).

    Args:
        src_path: input raster, any band count (>= 3, or `bands` given) and real dtype.
        dst_path: output .tif (a GeoTIFF keeps its georeferencing only as TIFF).
        sr_fn: `sr_fn(lr, window)`: lr [1, 3, h, w] in [0, 1], the LR crop of a block ->
            [1, 3, *window.size] in [0, 1], the `BlockWindow` of the scene's output (the pixels
            the whole scene's output has there, so that blocks agree with an untiled run).
        out_size: (H, W) of the output scene.
        bands: 1-based bands fed as R, G, B (`scenes.raster.parse_bands`); None = 1, 2, 3.
        value_range: (min, max) of the radiometric stretch; None = per-scene 2-98 % percentiles
            (identity for 8 bit).
        cog: write a Cloud-Optimized GeoTIFF with overviews.
        block, overlap: LR block size and the LR pixels each block reads beyond it (even,
            >= 4: a bicubic tap reaches 2 LR pixels; block >= 2 * overlap).
        share: several processes on this scene (`scenes.blocks.BlockShare`): every rank calls
            this with the same arguments, block k runs on rank k mod N, `share.writer` writes.

    Raises:
        ImageReadError: unreadable input or bad `bands`, naming the file and the fix.
        RasterWriteError: the output could not be written; no partial file is left.
        ValueError: a non-TIFF `dst_path` or bad block sizes.
        SharedSceneError: with `share`, any rank's failure, on every rank.
    """
    dst_path, share = Path(dst_path), share or BlockShare()
    if not is_raster(dst_path):
        raise ValueError(f"{dst_path}: rasters are written as .tif to keep their georeferencing")
    if overlap < 4 or overlap % 2 or block < max(16, 2 * overlap):
        raise ValueError(f"block {block}, overlap {overlap}: need an even overlap >= 4 and "
                         "block >= max(16, 2 * overlap)")  # fmt: skip
    with ExitStack() as files:  # input; on the writer the output, renamed when all is written
        opened, error = share.attempt(_open, files, src_path, dst_path, out_size, bands,
                                      value_range, share.writes)  # fmt: skip
        share.agree(error)
        src, dst, bands, stretch, fill = opened
        rows = block_spans(src.height, out_size[0], block, overlap)
        cols = block_spans(src.width, out_size[1], block, overlap)
        lr_size = (src.height, src.width)

        def compute(k: int) -> np.ndarray:  # block k in raster order, weighted
            ys, xs = rows[k // len(cols)], cols[k % len(cols)]
            window = BlockWindow(lr_size, tuple(out_size), (ys.read[0], xs.read[0]),
                                 (ys.start, ys.stop), (xs.start, xs.stop))  # fmt: skip
            return block_values(src, sr_fn, bands, stretch, fill, ys, xs, window)

        blend = _Blend(src, dst, rows, cols) if share.writes else None
        share.run(len(rows) * len(cols), compute, blend.add if blend else None)
        share.agree(share.attempt(blend.finish, cog)[1] if blend else None)


def _open(files: ExitStack, src_path, dst_path: Path, out_size, bands, value_range, writes):
    """Opens the input (and, when `writes`, the output under a temporary name) into `files`
    -> (src, dst or None, model bands, stretch, fill value of masked and NaN pixels or None)."""
    with open_raster(src_path) as src:
        profile = output_profile(src, out_size)
    files.enter_context(rasterio.Env(GDAL_CACHEMAX=_cache_bytes(profile)))
    src = files.enter_context(open_raster(src_path))
    bands = model_bands(src, bands)
    stretch = scene_stretch(src, bands, value_range)  # once per scene, decimated
    fill = nodata_fill(src) if has_mask(src) or _floats(src) else None  # also NaN / inf
    dst = None
    if writes:
        tmp = files.enter_context(atomic_output(dst_path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            dst = files.enter_context(rasterio.open(tmp, "w", **profile))
        copy_metadata(src, dst, out_size, bands, stretch)
    return src, dst, bands, stretch, fill


def _cache_bytes(profile: dict) -> int:
    """GDAL block cache: three rows of output tiles (partially written tiles stay in memory
    until complete, so they are compressed once), at least 32 MB."""
    tile_row = profile["width"] * profile["blockysize"] * profile["count"]
    return max(32 * 2**20, 3 * tile_row * np.dtype(profile["dtype"]).itemsize)


def _to_cog(path: Path) -> None:
    """Rewrite a finished GeoTIFF in place as a Cloud-Optimized GeoTIFF with overviews."""
    cog = path.with_name(f"{path.stem}.cog{path.suffix}")
    try:
        rasterio.shutil.copy(path, cog, driver="COG", **COG_OPTIONS)
        os.replace(cog, path)
    finally:
        cog.unlink(missing_ok=True)


class _Blend:
    """The block loop's writing side: weighted blocks arrive in raster order and are summed with
    a carry to the right (O(block)) and a strip below (the blend zone across the output width);
    each final region is written once."""

    def __init__(self, src, dst, rows: list[Span], cols: list[Span]):
        self.src, self.dst, self.rows, self.cols, self.masked = src, dst, rows, cols, has_mask(src)
        height = max(r.stop - r.final for r in rows)
        self.strip, self.carry = np.zeros((src.count, height, dst.width), np.float32), None

    def add(self, k: int, acc: np.ndarray) -> None:
        """Block k's weighted values [C, *window.size]."""
        (i, j), strip = divmod(k, len(self.cols)), self.strip
        ys, xs = self.rows[i], self.cols[j]
        if j > 0:
            acc[:, :, : xs.blended - xs.start] += self.carry
        top, keep, done = ys.blended - ys.start, xs.final - xs.start, ys.final - ys.start
        acc[:, :top, :keep] += strip[:, :top, xs.start : xs.final]
        _write_final(self.src, self.dst, acc[:, :done, :keep], ys, xs, self.masked)
        strip[:, : ys.stop - ys.final, xs.start : xs.final] = acc[:, done:, :keep]
        self.carry = acc[:, :, keep:].copy()

    def finish(self, cog: bool) -> None:
        """Flushes the output (GDAL writes its cached tiles now); `cog`: rewrites it as a COG."""
        self.dst.close()
        if cog:
            _to_cog(Path(self.dst.name))


def _write_final(src, dst, values: np.ndarray, ys: Span, xs: Span, masked: bool) -> None:
    """Write the finished region [C, final - start] of a block, masked where the input is."""
    window = Window(xs.start, ys.start, xs.final - xs.start, ys.final - ys.start)
    valid = None
    if masked or _floats(src):  # nearest: the LR pixel under each HR pixel centre
        rows = ((np.arange(ys.start, ys.final) + 0.5) * ys.lr_of_hr).astype(int)
        cols = ((np.arange(xs.start, xs.final) + 0.5) * xs.lr_of_hr).astype(int)
        rows, cols = np.minimum(rows, src.height - 1), np.minimum(cols, src.width - 1)
        lr_window = Window.from_slices((rows[0], rows[-1] + 1), (cols[0], cols[-1] + 1))

        def nearest(lr: np.ndarray) -> np.ndarray:  # [C, h, w] LR window -> [C, *window]
            return lr[:, rows - rows[0]][:, :, cols - cols[0]]

        if masked:
            valid = nearest(read_pixels(src, masks=True, window=lr_window)) > 0  # 0 = masked
        alpha = alpha_bands(src)
        if alpha:  # a mask, not a colour: nearest, in the alpha band's own values
            values[[b - 1 for b in alpha]] = nearest(
                read_pixels(src, indexes=alpha, window=lr_window).astype(np.float32)
            )
        if _floats(src):  # NaN / inf pixels are data: carried through nearest, not spread
            lr = nearest(read_pixels(src, window=lr_window))
            odd = ~np.isfinite(lr)
            values[odd] = lr[odd]
    write_window(dst, to_dtype(values, valid, dst.dtypes[0], dst.nodata), window)
    if valid is not None and dst.nodata is None and not alpha_bands(src):  # an internal mask
        dst.write_mask(valid.any(axis=0), window=window)


def _floats(src) -> bool:
    return np.dtype(src.dtypes[0]).kind == "f"


def write_window(dst, arr: np.ndarray, window: Window) -> None:
    """Write [C, h, w] to `window` of the open output (one place for write errors)."""
    dst.write(arr, window=window)
