"""Exact normalisation statistics for stages too large to run whole: a chain streamed by bands.

A network given as a chain of (stage, halo, stride) (`GAPEncoder.stages`) runs one stage at a
time over bands of rows of the whole scene; a band reads its input with `halo` extra rows on
each side and keeps its own rows. A stage with normalisation layers first runs once per layer
over all bands, summing that layer's input over the bands' own rows
(`SceneStatistics.measure`, every earlier layer normalised with its exact statistics), then once
more to produce its output. Between stages the activation is held in memory, or, when larger
than a limit, in a temporary file read and written with plain file I/O (so it never counts as
the process's resident memory).
"""

from __future__ import annotations

import os
import tempfile

import torch

from models.scene_stats import SceneStatistics, StopStage


class Spill:
    """A float32 map [B, C, H, W] written and read by bands of rows: a tensor, or over `limit`
    bytes a temporary file of rows [B, C, W]."""

    def __init__(self, shape, limit: int, data: torch.Tensor | None = None):
        self.shape = tuple(shape)
        b, c, _, w = self.shape
        self.row = 4 * b * c * w  # bytes per row
        self.data, self.file = data, None
        if data is None and self.row * self.shape[2] <= limit:
            self.data = torch.empty(self.shape)
        elif data is None:
            self.file = tempfile.TemporaryFile()
            self.file.truncate(self.row * self.shape[2])

    def write(self, r0: int, x: torch.Tensor) -> None:
        if self.file is None:
            self.data[..., r0 : r0 + x.shape[-2], :] = x
            return
        rows = x.float().permute(2, 0, 1, 3).contiguous()  # [rows, B, C, W]
        view = memoryview(rows.numpy()).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self.file.fileno(), view[done:], self.row * r0 + done)

    def read(self, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) -> [B, C, r1 - r0, W], contiguous."""
        if self.file is None:
            return self.data[..., r0:r1, :].contiguous()
        b, c, _, w = self.shape
        rows = torch.empty(r1 - r0, b, c, w)
        view = memoryview(rows.numpy()).cast("B")
        done = 0
        while done < len(view):
            done += os.preadv(self.file.fileno(), [view[done:]], self.row * r0 + done)
        return rows.permute(1, 2, 0, 3).contiguous()


def stream_chain(chain, x: torch.Tensor, stats: SceneStatistics, band_pixels: int, limit: int):
    """x [B, C, H, W] through `chain` [(stage, halo, stride)] by bands of about `band_pixels`
    output pixels -> the last stage's output, every layer of `stats` normalised with the
    statistics of the untiled run (float64 sums). Activations over `limit` bytes are spilled."""
    src = Spill(x.shape, limit, x)
    for stage, halo, stride in chain:
        src = stream_stage(stage, halo, stride, src, stats, band_pixels, limit)
    return src.read(0, src.shape[2])


def stream_stage(stage, halo: int, stride: int, src: Spill, stats, band_pixels: int, limit: int):
    """One stage of `stream_chain`: passes over the bands until every normalisation layer it
    reaches has its statistics, then the pass that writes its output (a `Spill`)."""
    h_in, w_in = src.shape[-2:]
    h_out = h_in // stride if stride > 1 else h_in
    step = max(1, band_pixels // max(1, w_in // stride))
    bands = [(a, min(a + step, h_out)) for a in range(0, h_out, step)]
    while True:
        out = None
        for a, b in bands:
            if stride == 1:  # a 'same' stage: rows [a - halo, b + halo)
                lo, hi = max(0, a - halo), min(h_in, b + halo)
            else:  # a strided stage reads rows stride * i .. stride * i + halo (padded at the end)
                lo, hi = stride * a, min(h_in, stride * b + halo)
            own = a - lo if stride == 1 else 0
            try:
                with stats.measure(((own, own + b - a), (0, w_in))):
                    y = stage(src.read(lo, hi))
            except StopStage:
                continue
            if out is None:
                out = Spill((*y.shape[:2], h_out, y.shape[-1]), limit)
            out.write(a, y[..., own : own + b - a, :])
        if not stats.settle():
            return out
