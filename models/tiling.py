"""Tiles of whole-scene inference: the tile-size rule, overlapping windows, cosine blending, the
decoder's LR tiles and their HR windows on the scene's grid, exact crops.

A scene is cut into overlapping windows along each axis; a window's output is weighted by cosine
ramps across its overlaps, and the weights of all windows are normalised to sum to one, so tiles
cross-fade and the result needs no weight map. `OutputWindow` resamples a tile on the whole
scene's pixel grid whatever the scale (`utils.resample`: crop-exact windows of `F.interpolate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from utils.resample import resize_crop

MIN_TILE = 16  # LR pixels


def check_tile(tile: int, overlap: int, context: int = 8) -> None:
    """Raises ValueError naming the fix for an impossible decoder tile / overlap / context (LR
    pixels; tile 0 = untiled)."""
    least = max(MIN_TILE, 2 * overlap)
    if overlap < 0:
        raise ValueError(f"tile overlap {overlap} must be >= 0")
    if tile < 0 or tile and tile < least:
        raise ValueError(
            f"tile {tile} is below the minimum {least} (>= {MIN_TILE} and >= 2 x the overlap "
            f"{overlap}); use 0 to disable tiling"
        )
    if tile and context < 2:
        raise ValueError(f"context {context} must be >= 2 (the bicubic skip reads 2 LR pixels)")


def align_down(value: int, align: int) -> int:
    return value // align * align


def split_axis(length: int, tile: int, overlap: int, align: int = 1) -> list[tuple[int, int]]:
    """Overlapping windows [start, stop) that cover [0, length).

    Windows are `tile` long and start every `tile - overlap`; every start is a multiple of
    `align`. The last window ends at `length`; it starts at `length - tile` rounded down to `align`
    (or, if that is the previous start, replaces the previous window), so it may be up to
    `align - 1` longer than `tile`. `tile <= 0` or `tile >= length` gives one window.

    Args:
        length: axis length (> 0).
        tile: window length (a multiple of `align`).
        overlap: overlap of consecutive windows, `0 <= overlap <= tile / 2`, a multiple of `align`.
        align: alignment of the window starts.

    Returns:
        Sorted windows; consecutive ones overlap by at least `overlap`.
    """
    if tile <= 0 or tile >= length:
        return [(0, length)]
    if tile % align or overlap % align or not 0 <= 2 * overlap <= tile:
        raise ValueError(
            f"tile {tile} and overlap {overlap} must be multiples of {align} with "
            f"0 <= overlap <= tile / 2"
        )
    windows, start = [], 0
    while start + tile < length:
        windows.append((start, start + tile))
        start += tile - overlap
    last = align_down(length - tile, align)
    if last > windows[-1][0]:
        windows.append((last, length))
    else:  # the last full window would start at the previous start: extend that one
        windows[-1] = (windows[-1][0], length)
    return windows


def axis_weights(windows: list[tuple[int, int]], length: int) -> list[torch.Tensor]:
    """Blending weights of 1-D windows, normalised to sum to one at every position.

    A window's weight ramps up as `sin^2(pi/2 * (x + 0.5) / r)` over the `r` pixels it shares
    with the previous window and down symmetrically over those it shares with the next one.
    Where exactly two windows overlap the two ramps already sum to one (sin^2 + cos^2): a smooth
    cross-fade; where three overlap (a last window moved back), the normalisation takes over.

    Returns:
        One float64 tensor [stop - start] per window.
    """
    raw = []
    for k, (start, stop) in enumerate(windows):
        w = torch.ones(stop - start, dtype=torch.float64)
        if k > 0:
            width = min(windows[k - 1][1] - start, stop - start)
            w[:width] *= _ramp(width)
        if k < len(windows) - 1:
            width = min(stop - windows[k + 1][0], stop - start)
            w[stop - start - width :] *= _ramp(width).flip(0)
        raw.append(w)
    total = torch.zeros(length, dtype=torch.float64)
    for (start, stop), w in zip(windows, raw):
        total[start:stop] += w
    return [w / total[start:stop] for (start, stop), w in zip(windows, raw)]


def _ramp(width: int) -> torch.Tensor:
    """Rising cosine ramp sin^2(pi/2 * (x + 0.5) / width), x = 0 .. width - 1 (float64)."""
    x = (torch.arange(width, dtype=torch.float64) + 0.5) / max(width, 1)
    return torch.sin(0.5 * math.pi * x) ** 2


@dataclass(frozen=True)
class Window:
    """A 2-D tile: rows and columns [start, stop) and its separable blending weights."""

    rows: tuple[int, int]
    cols: tuple[int, int]
    weight_rows: torch.Tensor  # [stop - start] float64
    weight_cols: torch.Tensor

    def weight(self, like: torch.Tensor) -> torch.Tensor:
        """[1, 1, rows, cols] weights in the dtype/device of `like`."""
        w = self.weight_rows[:, None] * self.weight_cols[None, :]
        return w.to(device=like.device, dtype=like.dtype)[None, None]


def tile_grid(
    size: tuple[int, int], tile: tuple[int, int], overlap: tuple[int, int], align: int = 1
) -> list[Window]:
    """Row-major grid of overlapping 2-D windows covering an image of `size` = (H, W)."""
    rows, cols = (split_axis(n, t, o, align) for n, t, o in zip(size, tile, overlap))
    return windows_from(rows, cols, size)


def windows_from(rows: list[tuple[int, int]], cols: list[tuple[int, int]], size) -> list[Window]:
    """Grid of windows from explicit 1-D windows (e.g. an LR grid mapped to HR pixels)."""
    axes = [list(zip(windows, axis_weights(windows, n))) for windows, n in zip((rows, cols), size)]
    return [Window(r, c, wr, wc) for r, wr in axes[0] for c, wc in axes[1]]


# ------------------------------------------------------------------------ tile bookkeeping
def shrink(size, pixels: int) -> tuple[int, int]:
    """`size` scaled down (aspect kept) to at most `pixels` pixels; unchanged if it fits."""
    factor = max(1.0, (size[0] * size[1] / pixels) ** 0.5)
    return tuple(max(1, round(n / factor)) for n in size)


def grow(win: Window, context: int, size) -> tuple[tuple[int, int], tuple[int, int]]:
    """The window's rows/cols widened by `context` on each side, clipped to the image."""
    axes = zip((win.rows, win.cols), size)
    return tuple((max(0, a - context), min(n, b + context)) for (a, b), n in axes)


def to_output_window(window: tuple[int, int], n: int, n_out: int) -> tuple[int, int]:
    """LR window -> HR window on the scene's grid (image borders map to image borders)."""
    a, b = window
    return (0 if a == 0 else round(a * n_out / n), n_out if b == n else round(b * n_out / n))


def decoder_tiles(geo, lr_axes, context: int) -> list:
    """(LR crop: window grown by `context`, HR window) pairs of the 1-D LR windows `lr_axes`
    (rows, cols) of a scene's `Geometry` `geo`; for a block of a larger scene, the scene's HR
    windows cut to the block's window."""
    (lr_n, out_n), offsets = geo.scene, (0, 0) if geo.window is None else geo.window.offset
    lr_axes = [list(ax) for ax in lr_axes]
    hr_axes = [
        [to_output_window((a + o, b + o), n, m) for a, b in ax]
        for ax, o, n, m in zip(lr_axes, offsets, lr_n, out_n)
    ]
    if geo.window is not None:
        for k, (start, stop) in enumerate((geo.window.rows, geo.window.cols)):
            cut_to = [(max(c, start) - start, min(d, stop) - start) for c, d in hr_axes[k]]
            kept = [(lw, hw) for lw, hw in zip(lr_axes[k], cut_to) if hw[1] > hw[0]]
            lr_axes[k], hr_axes[k] = [lw for lw, _ in kept], [hw for _, hw in kept]
    lr_windows, hr_windows = windows_from(*lr_axes, geo.lr), windows_from(*hr_axes, geo.target)
    return [(grow(lw, context, geo.lr), hw) for lw, hw in zip(lr_windows, hr_windows)]


def trim(x: torch.Tensor, box, win: Window) -> torch.Tensor:
    """The part of the output of a crop `box` ((r0, r1), (c0, c1)) that lies in `win`."""
    (r0, _), (c0, _) = box
    (a, b), (c, d) = win.rows, win.cols
    return x[..., a - r0 : b - r0, c - c0 : d - c0]


@dataclass(frozen=True)
class OutputWindow:
    """A tile's output window on the scene's grid, as the upsamplers' `window` argument.

    `lr_size` and `out_size` are the scene's; the tile's features are the LR crop whose top-left
    pixel is `offset`; the tile contributes output rows x cols.
    """

    lr_size: tuple[int, int]
    out_size: tuple[int, int]
    offset: tuple[int, int]
    rows: tuple[int, int]
    cols: tuple[int, int]

    def resize(self, feat: torch.Tensor, mode: str, factor: int = 1) -> torch.Tensor:
        """Window of `F.interpolate(global, out_size, mode)` where `feat` is the crop, at
        `factor * offset`, of a global map on the `factor`x LR grid."""
        in_size = (self.lr_size[0] * factor, self.lr_size[1] * factor)
        offset = (self.offset[0] * factor, self.offset[1] * factor)
        return resize_crop(feat, self.out_size, self.rows, self.cols, mode, offset, in_size)


def accumulate(total: torch.Tensor, part: torch.Tensor, win: Window) -> None:
    total[..., slice(*win.rows), slice(*win.cols)] += part.float() * win.weight(total)
