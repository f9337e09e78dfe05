"""Exact normalisation statistics for stages too large to run whole: a chain streamed by bands.

A network given as a chain of stages on a stack of maps (`ldm.chain`: `GAPEncoder.stages`,
`UNetModel.stages`, `GAPDecoder.latent_stages` / `sr_stages`) runs one stage at a time over
bands of rows of the whole scene; a band reads its inputs with the stage's `halo` extra rows on
each side and keeps its own rows. A stage with normalisation layers first runs once per layer
over all bands, summing that layer's input over the bands' own rows
(`SceneStatistics.measure`, every earlier layer normalised with its exact statistics), then once
more to produce its outputs. A global stage (`halo` None: attention) runs whole. The maps on the
stack (several at once: skip connections, running sums) are held in memory while they fit a
limit together, else in temporary files read and written with plain file I/O (so they never
count as the process's resident memory).
"""

from __future__ import annotations

import math
import os
import tempfile

import torch

from ldm.chain import Stage
from models.memory import release_memory
from models.scene_stats import SceneStatistics, StopStage
from utils.resample import axis_map

WORK = 6  # working maps of a stage per map it reads or writes (norm, activation, convs, residual)


class Spill:
    """A float32 map [B, C, H, W] written and read by bands of rows: a tensor (`data`), or a
    temporary file of rows [B, C, W]. Reads are fresh copies (a stage may overwrite them)."""

    def __init__(self, shape, data=None, in_memory: bool = True, channels_last: bool = False):
        self.shape = tuple(shape)
        self.nbytes = 4 * math.prod(self.shape)
        self.format = torch.channels_last if channels_last else torch.contiguous_format
        self.data, self.file, self.counted = data, None, data is None and in_memory
        if data is None and in_memory:
            self.data = torch.empty(self.shape, memory_format=self.format)
        elif data is None:
            self.file = tempfile.TemporaryFile()
            self.file.truncate(self.nbytes)

    def write(self, r0: int, x: torch.Tensor) -> None:
        if self.file is None:
            self.data[..., r0 : r0 + x.shape[-2], :] = x
            return
        rows = x.float().permute(2, 0, 1, 3).contiguous()  # [rows, B, C, W]
        view = memoryview(rows.numpy()).cast("B")
        offset, done = self.nbytes // self.shape[2] * r0, 0
        while done < len(view):
            done += os.pwrite(self.file.fileno(), view[done:], offset + done)

    def read(self, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) -> [B, C, r1 - r0, W], a copy."""
        if self.file is None:
            return self.data[..., r0:r1, :].clone(memory_format=self.format)
        b, c, _, w = self.shape
        rows = torch.empty(r1 - r0, b, c, w)
        view = memoryview(rows.numpy()).cast("B")
        offset, done = self.nbytes // self.shape[2] * r0, 0
        while done < len(view):
            done += os.preadv(self.file.fileno(), [view[done:]], offset + done)
        return rows.permute(1, 2, 0, 3).contiguous(memory_format=self.format)

    def whole(self) -> torch.Tensor:
        return self.data if self.file is None else self.read(0, self.shape[2])

    def close(self) -> None:
        self.data = None
        if self.file is not None:
            self.file.close()


class Rows:
    """A map [B, C, H, W] computed band by band: `read(r0, r1)` = `compute(r0, r1)` (the
    bicubic-upsampled LR image an encoder reads, never held whole)."""

    def __init__(self, shape, compute):
        self.shape, self.read, self.counted = tuple(shape), compute, False

    def whole(self) -> torch.Tensor:
        return self.read(0, self.shape[2])

    def close(self) -> None:
        """Nothing is held."""


class Nearest:
    """A map [B, C, h, w] read as its nearest resize to `size` (`F.interpolate`'s taps, `mode`
    "nearest" or "nearest-exact"), by bands of rows: the decoder's h_k on the LR grid, never
    stored at that size."""

    def __init__(self, source, size, mode: str = "nearest"):
        source = as_map(source)
        self.source, self.counted = source, False
        self.shape = (*source.shape[:2], *size)
        self.rows, self.cols = (axis_map(n, m, mode).index[0] for n, m in
                                zip(source.shape[2:], size))  # fmt: skip

    def read(self, r0: int, r1: int) -> torch.Tensor:
        rows = self.rows[r0:r1]
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        band = self.source.read(lo, hi)
        return band.index_select(-2, rows - lo).index_select(-1, self.cols)

    def whole(self) -> torch.Tensor:
        return self.read(0, self.shape[2])

    def close(self) -> None:
        """The source stays (it is another map of the stack)."""


class Store:
    """Spills of one streamed run: in memory while they fit `limit` bytes together, else in
    temporary files."""

    def __init__(self, limit: int):
        self.left = limit

    def spill(self, shape, channels_last: bool = False) -> Spill:
        nbytes = 4 * math.prod(shape)
        in_memory = nbytes <= self.left
        self.left -= nbytes if in_memory else 0
        return Spill(shape, in_memory=in_memory, channels_last=channels_last)

    def keep(self, t: torch.Tensor) -> Spill:
        """A copy of `t` [B, C, H, W] as a spill of this store (the caller drops `t`)."""
        spill = self.spill(t.shape, channels_last(t))
        spill.write(0, t)
        return spill

    def close(self, spill) -> None:
        if spill.counted:
            self.left += spill.nbytes
        spill.close()


def stream_chain(chain: list[Stage], maps, stats: SceneStatistics, band_bytes: int, store: Store):
    """`maps` (bottom first: tensors [B, C, H, W] or `Spill`s) through `chain` by bands of about
    `band_bytes` of working memory -> the final stack as `Spill`s of `store` (in memory while
    its limit allows, else in files), every layer of `stats` normalised with the statistics of
    the untiled run (float64 sums)."""
    stack = [as_map(m) for m in maps]
    for stage in chain:
        args = stack[len(stack) - stage.take :]
        del stack[len(stack) - stage.take :]
        if stage.halo is None:  # global: the whole map at once, its own statistics
            out = stage.fn(*(a.whole() for a in args))
            stack += [store.keep(t) for t in (out if isinstance(out, tuple) else (out,))]
        else:
            stack += stream_stage(stage, args, stats, band_bytes, store)
        for a in args:
            store.close(a)
        release_memory()  # the bands' freed blocks back to the OS: RSS follows what is alive
    return stack


def as_map(m):
    """A tensor as a `Spill` holding it (not counted against the limit); a map as it is."""
    return m if hasattr(m, "read") else Spill(m.shape, m, channels_last=channels_last(m))


def channels_last(t: torch.Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def row_bytes(stage: Stage, args) -> float:
    """Bytes per output row of the larger of a stage's inputs and outputs, the outputs' widths
    from a run on its first rows (plain normalisation: only shapes are read)."""
    rows = min(args[0].shape[2], stage.stride * (2 * stage.halo + 1))
    out = stage.fn(*(m.read(0, rows) for m in args))
    out = out if isinstance(out, tuple) else (out,)
    outputs = sum(4 * math.prod(t.shape[:2]) * t.shape[-1] for t in out)
    inputs = sum(4 * math.prod(a.shape[:2]) * a.shape[-1] for a in args) * stage.stride / stage.up
    return max(inputs, outputs)


def stream_stage(stage: Stage, args, stats, band_bytes: int, store: Store) -> list[Spill]:
    """One stage of `stream_chain`: passes over the bands until every normalisation layer it
    reaches has its statistics, then the pass that writes its outputs."""
    (h_in, w_in), s, u = args[0].shape[-2:], stage.stride, stage.up
    h_out = h_in * u // s
    step = max(1, int(band_bytes // (WORK * row_bytes(stage, args))))
    bands = [(a, min(a + step, h_out)) for a in range(0, h_out, step)]
    while True:
        outs = None
        for a, b in bands:
            lo = max(0, a * s // u - stage.halo) // s * s  # a multiple of the stride
            hi = min(h_in, -(-b * s // u) + stage.halo)
            own = a - lo * u // s  # the band's first own output row
            try:
                with stats.measure(((own, own + b - a), (0, w_in))):
                    out = stage.fn(*(m.read(lo, hi) for m in args))
            except StopStage as stop:
                if s != 1 or u != 1:
                    raise RuntimeError(
                        "a resampling stage with normalisation must run whole"
                    ) from stop
                continue
            out = out if isinstance(out, tuple) else (out,)
            if outs is None:
                shapes = [(*t.shape[:2], h_out, t.shape[-1]) for t in out]
                outs = [store.spill(shape, channels_last(t)) for shape, t in zip(shapes, out)]
            for spill, t in zip(outs, out):
                spill.write(a, t[..., own : own + b - a, :])
        if not stats.settle():
            return outs
