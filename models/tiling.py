"""Tiles of whole-scene rendering: the tile-size rule, the decoder's LR tiles and their HR
windows on the scene's grid, exact crops.

The windows of a scene's render tiles do not overlap: each tile computes its window exactly, from
an LR crop that holds the window's receptive field, and `OutputWindow` resamples it on the whole
scene's pixel grid whatever the scale (`utils.resample`: crop-exact windows of `F.interpolate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from utils.resample import resize_crop

MIN_TILE = 16  # LR pixels


def check_tile(tile: int) -> None:
    """Raises ValueError naming the fix for an impossible render tile (LR pixels; 0 = untiled)."""
    if tile < 0 or tile and tile < MIN_TILE:
        raise ValueError(f"tile {tile} is below the minimum {MIN_TILE}; use 0 to disable tiling")


@dataclass(frozen=True)
class Window:
    """A 2-D tile's rows and columns [start, stop) in its output."""

    rows: tuple[int, int]
    cols: tuple[int, int]


def windows_from(rows: list[tuple[int, int]], cols: list[tuple[int, int]]) -> list[Window]:
    """Row-major grid of windows from 1-D windows (e.g. an LR grid mapped to HR pixels)."""
    return [Window(r, c) for r in rows for c in cols]


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
    lr_windows, hr_windows = windows_from(*lr_axes), windows_from(*hr_axes)
    return [(grow(lw, context, geo.lr), hw) for lw, hw in zip(lr_windows, hr_windows)]


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


def place(total: torch.Tensor, part: torch.Tensor, win: Window) -> None:
    """Writes a tile's output `part` into its window `win` of `total`."""
    total[..., slice(*win.rows), slice(*win.cols)] = part
