"""Crop-exact resampling: any window of a global `F.interpolate` (nearest / bilinear / bicubic,
align_corners=False) from a crop of its input, so that a tile or a streamed block is resampled on
the whole scene's pixel grid whatever the scale (non-integer, asymmetric)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AxisMap:
    """Taps of a 1-D resize: output position i = sum_k weight[k, i] * input[index[k, i]]."""

    index: torch.Tensor  # [K, n_out] long, global input positions
    weight: torch.Tensor  # [K, n_out] float64

    @property
    def span(self) -> tuple[int, int]:
        """Input range [lo, hi) that the taps read."""
        return int(self.index.min()), int(self.index.max()) + 1


def axis_map(in_size: int, out_size: int, mode: str, start: int = 0, stop: int | None = None):
    """The taps of `F.interpolate(..., mode, align_corners=False)` for outputs [start, stop).

    Follows PyTorch's kernels: `src = (in/out) * (i + 0.5) - 0.5` (clamped at 0 except for
    bicubic); bilinear reads floor(src) and the next sample; bicubic reads 4 samples with the
    A = -0.75 cubic convolution, clamping indices at the border; nearest reads floor(i * in/out),
    nearest-exact floor((i + 0.5) * in/out) (both taken from `F.interpolate` itself so that its
    float rounding is identical).

    Returns:
        An `AxisMap` with K = 1, 2 or 4 taps per output.
    """
    stop = out_size if stop is None else stop
    i = torch.arange(start, stop, dtype=torch.float64)
    if mode in ("nearest", "nearest-exact"):
        src = torch.arange(in_size, dtype=torch.float32)[None, None, :, None]
        idx = F.interpolate(src, size=(out_size, 1), mode=mode)[0, 0, start:stop, 0]
        return AxisMap(idx.long()[None], torch.ones(1, stop - start, dtype=torch.float64))
    # PyTorch's CPU kernels: float32 scale, src = fma(scale, i + 0.5, -0.5) rounded to float32.
    scale = torch.tensor(in_size / out_size, dtype=torch.float32).double()
    src = (scale * (i + 0.5) - 0.5).float().double()
    if mode == "bilinear":
        src = src.clamp(min=0)
        i0 = src.floor().clamp(max=in_size - 1)
        t = (src - i0).clamp(0, 1)
        i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
        return AxisMap(torch.stack([i0, i1]).long(), torch.stack([1 - t, t]))
    if mode == "bicubic":
        i0 = src.floor()
        t = src - i0
        a = -0.75
        x1, x2 = t + 1, 1 - t
        weight = torch.stack(
            [
                ((a * x1 - 5 * a) * x1 + 8 * a) * x1 - 4 * a,
                ((a + 2) * t - (a + 3)) * t * t + 1,
                ((a + 2) * x2 - (a + 3)) * x2 * x2 + 1,
                ((a * (x2 + 1) - 5 * a) * (x2 + 1) + 8 * a) * (x2 + 1) - 4 * a,
            ]
        )
        index = torch.stack([i0 - 1 + k for k in range(4)]).clamp(0, in_size - 1)
        return AxisMap(index.long(), weight)
    modes = "nearest, nearest-exact, bilinear, bicubic"
    raise ValueError(f"unsupported resize mode {mode!r} ({modes})")


def resize_window(
    x: torch.Tensor, maps: tuple[AxisMap, AxisMap], offset: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """Resample a crop of a global input to a window of the global resize.

    Args:
        x: [B, C, h, w] crop of the global input whose top-left pixel is at `offset`.
        maps: row and column `AxisMap`s (global input positions) of the output window.
        offset: global (row, col) of `x[..., 0, 0]`; every tap must fall inside the crop.

    Returns:
        [B, C, n_rows, n_cols], equal to the window of the global `F.interpolate` (up to float
        rounding: the taps are summed in a different order).
    """
    for dim, amap, off in ((2, maps[0], offset[0]), (3, maps[1], offset[1])):
        index = amap.index - off
        if int(index.min()) < 0 or int(index.max()) >= x.shape[dim]:
            raise ValueError(
                f"crop [{off}, {off + x.shape[dim]}) misses input positions {amap.span} "
                "needed by the output window"
            )
        weight = amap.weight.to(device=x.device, dtype=x.dtype)
        shape = [1] * x.ndim
        shape[dim] = -1
        out = None
        for idx, w in zip(index.to(x.device), weight):  # tap by tap: two temporaries at most
            tap = x.index_select(dim, idx)
            out = tap.mul_(w.view(shape)) if out is None else out.addcmul_(tap, w.view(shape))
        x = out
    return x


def cut(x: torch.Tensor, box, memory_format=None) -> torch.Tensor:
    """x[..., r0:r1, c0:c1] for box ((r0, r1), (c0, c1)), optionally made contiguous."""
    (r0, r1), (c0, c1) = box
    x = x[..., r0:r1, c0:c1]
    return x if memory_format is None else x.contiguous(memory_format=memory_format)


def resize_crop(x, out_size, rows, cols, mode, offset=(0, 0), in_size=None) -> torch.Tensor:
    """Window rows x cols of `F.interpolate(global, out_size, mode)`; `x` is the global input's
    crop at `offset` (the whole input when `in_size` is None).

    At integer factors (output = k x input on each axis) the crop of every tap the window reads
    is resized by `F.interpolate` itself and cut to the window: its sample positions are the
    global ones shifted by whole pixels, and clamping at its border only touches outputs whose
    taps leave it (outside the window)."""
    in_size = tuple(x.shape[-2:]) if in_size is None else tuple(in_size)
    full = tuple(x.shape[-2:]) == in_size
    if full and rows == (0, out_size[0]) and cols == (0, out_size[1]):
        return F.interpolate(x, size=tuple(out_size), mode=mode, align_corners=False)
    maps = (
        axis_map(in_size[0], out_size[0], mode, *rows),
        axis_map(in_size[1], out_size[1], mode, *cols),
    )
    if full and offset == (0, 0):  # crop to what the window reads
        spans = [m.span for m in maps]
        x, offset = cut(x, spans), (spans[0][0], spans[1][0])
    factors = [m // n if m % n == 0 else 0 for m, n in zip(out_size, in_size)]
    spans = [m.span for m in maps]
    inside = all(o <= a and b <= o + n for (a, b), o, n in zip(spans, offset, x.shape[-2:]))
    if all(factors) and inside:  # integer factors: resize what the window reads, then cut
        x = cut(x, [(a - o, b - o) for (a, b), o in zip(spans, offset)])
        (k0, k1), (o0, o1) = factors, (spans[0][0], spans[1][0])
        corners = None if mode in ("nearest", "nearest-exact") else False
        up = F.interpolate(x, size=(k0 * x.shape[-2], k1 * x.shape[-1]), mode=mode,
                           align_corners=corners)  # fmt: skip
        (a, b), (c, d) = rows, cols
        return up[..., a - k0 * o0 : b - k0 * o0, c - k1 * o1 : d - k1 * o1]
    return resize_window(x, maps, offset)
