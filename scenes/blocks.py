"""The blocks of a streamed (Geo)TIFF scene (`scenes.scene_io.super_resolve_raster`): what
each computes (`BlockWindow`), its noise seed, and how the processes of a torchrun / srun run
share one scene (`BlockShare`): all ranks compute blocks, one writes the output, the same bytes
as one process writes.

Block k (raster order) runs on rank k mod N, in rounds of one block per rank; after each round
the writer rank receives the round's blocks (a gather over gloo) and cross-fades and writes them
in order, so it holds one round of blocks (and their pickled copies) beyond what one process
holds, whatever the scene's size. Every block draws its noise from `BlockWindow.seed` (the
scene's seed and the block's position), so which rank computes it, and how many ranks there
are, does not change the output. A failure on any rank (a block, opening the input or output,
writing) is agreed on at the next round: every rank raises the same `SharedSceneError`, the
writer's temporary output is removed, and only the writer reports it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from rasterio.windows import Window

from scenes.raster import Span, Stretch, read_pixels
from utils.distributed import World
from utils.resample import resize_crop

log = logging.getLogger(__name__)


class SharedSceneError(RuntimeError):
    """A shared scene failed on some rank; raised on every rank with the same message.
    `recorded` is True on the writer, the one rank that reports the failure."""

    def __init__(self, message: str, recorded: bool):
        super().__init__(message)
        self.recorded = recorded


@dataclass(frozen=True)
class BlockWindow:
    """What `sr_fn` computes for one block: the output window `rows` x `cols` ([start, stop)) of
    the whole scene's output grid `out_size`, from the LR crop whose top-left pixel is `offset` in
    a scene of `lr_size`. These are the fields of `models.tiling.OutputWindow`."""

    lr_size: tuple[int, int]
    out_size: tuple[int, int]
    offset: tuple[int, int]
    rows: tuple[int, int]
    cols: tuple[int, int]

    @property
    def size(self) -> tuple[int, int]:
        return self.rows[1] - self.rows[0], self.cols[1] - self.cols[0]

    def seed(self, seed: int) -> int:
        """The block's noise seed for a scene's `seed`: `seed` itself for the block at the
        scene's origin (a one-block scene is seeded as the same image in PNG), else a hash of
        (seed, offset) (numpy's SeedSequence), distinct from the `seed + n` of other samples."""
        if tuple(self.offset) == (0, 0):
            return seed
        entropy = (seed % 2**64, *self.offset)
        return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


SrFn = Callable[[torch.Tensor, BlockWindow], torch.Tensor]


def block_values(src, sr_fn: SrFn, bands, stretch: Stretch, fill, ys: Span, xs: Span,
                 out: BlockWindow) -> np.ndarray:  # fmt: skip
    """One block's weighted values [C, *out.size]: its LR read of `src` (masked pixels set to
    `fill` [C]) super-resolved on its window `out` of the scene's output grid, times the
    cross-fade weights of its spans `ys`, `xs`."""
    window = Window.from_slices(ys.read, xs.read)
    raw = read_pixels(src, window=window).astype(np.float32)  # [C, h, w]
    if fill is not None:
        masked = (read_pixels(src, masks=True, window=window) == 0) | ~np.isfinite(raw)
        raw[masked] = np.broadcast_to(fill[:, None, None], raw.shape)[masked]
    values = upsample_bands(raw, sr_fn, bands, stretch, out)
    return values * ys.weight[:, None] * xs.weight[None, :]


def upsample_bands(
    raw: np.ndarray, sr_fn: SrFn, bands, stretch: Stretch, window: BlockWindow
) -> np.ndarray:
    """All bands of one block's LR crop, float32 [C, h, w] -> [C, *window.size], in the input's
    units.

    The model bands go through `stretch` and `sr_fn` (a band fed to several channels gets their
    mean); the others are resized bicubically (align_corners=False) on the scene's grid.
    """
    model, size = [b - 1 for b in bands], window.size
    lr = torch.from_numpy(stretch.to_unit(raw[model]))[None]  # [1, 3, h, w]
    sr = sr_fn(lr, window)
    if tuple(sr.shape) != (1, 3, *size):
        raise ValueError(f"sr_fn returned {tuple(sr.shape)}, expected {(1, 3, *size)}")
    sr = stretch.from_unit(sr[0].detach().float().clamp(0, 1).cpu().numpy())  # [3, *size]
    out = np.empty((raw.shape[0], *size), np.float32)
    for band in set(model):
        out[band] = sr[[c for c, b in enumerate(model) if b == band]].mean(axis=0)
    others = [b for b in range(raw.shape[0]) if b not in model]
    if others:
        resized = resize_crop(torch.from_numpy(raw[others])[None], window.out_size, window.rows,
                              window.cols, "bicubic", window.offset, window.lr_size)  # fmt: skip
        out[others] = resized[0].numpy()
    return out


@dataclass(frozen=True)
class BlockShare:
    """How this process takes part in one scene: `world`'s ranks compute, `writer` writes.
    `BlockShare()` is one process: blocks run in turn and errors propagate unchanged."""

    world: World = field(default_factory=World)
    writer: int = 0
    name: str = ""  # the scene, for the log

    @property
    def writes(self) -> bool:
        """True on the rank that opens, fills and renames the output."""
        return self.world.rank == self.writer

    def attempt(self, fn: Callable, *args) -> tuple:
        """`(fn(*args), None)`, or `(None, message)` when it fails in a run of several processes
        (the failure is agreed on by `agree`); one process lets the exception propagate."""
        if self.world.size == 1:
            return fn(*args), None
        try:
            return fn(*args), None
        except Exception as err:  # agreed on with the other ranks before anyone raises
            return None, f"{err} (rank {self.world.rank})"

    def agree(self, error: str | None) -> None:
        """Collective: when any rank passes an error, every rank raises the first one (by rank)
        as `SharedSceneError`."""
        errors = [e for e in self.world.all_gather(error) if e]
        if errors:
            raise SharedSceneError(errors[0], recorded=self.writes)

    def run(self, count: int, compute: Callable[[int], np.ndarray],
            consume: Callable[[int, np.ndarray], None] | None) -> None:  # fmt: skip
        """`consume(k, compute(k))` for k = 0 .. count - 1, `consume` in order on the writer
        (None on the other ranks); several processes share the blocks as the module says."""
        size, rank = self.world.size, self.world.rank
        if size == 1:
            for k in range(count):
                consume(k, compute(k))
            return
        pending = None  # the writer's failure to consume the previous round
        for first in range(0, count, size):
            k = first + rank
            block, error = self.attempt(compute, k) if k < count else (None, None)
            if error is not None:
                error = f"block {k} of {count}: {error}"
            elif k < count:  # which rank ran what: a run's log shows each block once
                log.info("rank %d: %s block %d of %d", rank, self.name, k, count)
            self.agree(error or pending)
            blocks = self.world.gather(block, dst=self.writer)
            if self.writes:
                _, pending = self.attempt(_consume_all, consume, first, blocks[: count - first])
        self.agree(pending)


def _consume_all(consume: Callable[[int, np.ndarray], None], first: int, blocks: list) -> None:
    for k, block in enumerate(blocks, start=first):
        consume(k, block)
