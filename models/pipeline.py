"""The one inference pipeline of LDCSR and its autoencoder (docs/method.md, "Tiled inference"):
condition encoding, sampling, latent features, decoding, each stage over the tiles of a plan;
untiled is the plan with one tile per stage. `LDCSR.super_resolve`, `super_resolve_condition`
and `AutoencoderKL.reconstruct` all run through `run`.

`Pipeline` only orchestrates, calling the public stage methods of the model it is given
(`LDCSR`: `encode_upsampled`, `condition_stages`, `draw_noise`, `denoiser`, `sample`, `unscale`;
its `first_stage_model`, an `AutoencoderKL`: `build_encoder_input`, `encode_mode`,
`encode_mode_stages`, `latent_features`, `sr_branch`, `render`):

1. encoder (stage-2 condition, or the stage-1 posterior mode) on latent tiles: a latent tile
   [i0, i1) reads HR rows [8 i0, 8 i1) of its input (bicubic_up(lr) from an LR crop on the
   scene's grid); tiles carry `latent_context` latent pixels (discarded) and cross-fade over
   `latent_overlap`; over the budget, the encoder streams by bands with exact statistics;
2. sampling: x_T and the step noises drawn once for the whole latent; each step's eps blended
   from latent tiles starting at multiples of 8, conditioned on the scene's scale and height;
3. the latent features on latent tiles;
4. decoder tiles in LR pixels (`tile`, `overlap`, `context`): `sr_branch` on the LR crop, then
   `render` on the tile's HR window of the scene's grid, cross-faded; or, when the SR branch
   fits the budget, `sr_branch` on the whole LR image and `render` on non-overlapping windows
   of it (one window, the whole output, when untiled).

A stage with scene-wide statistics (GroupNorm, IMD channel attention) runs whole where it fits
the budget; otherwise its tiles share statistics recorded in one reference pass
(`models.scene_stats`, downscaled to `stats_pixels`).
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ldm.blocks import ContrastChannelAttention
from models.geometry import Geometry
from models.memory import choose_tile, memory_budget, output_bytes, release_memory, retained_heap
from models.scene_stats import SceneStatistics
from models.stream import stream_chain
from models.tiling import (
    accumulate,
    check_tile,
    decoder_tiles,
    grow,
    shrink,
    split_axis,
    tile_grid,
    trim,
)
from utils.resample import axis_map, cut, resize_crop, resize_window

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
STAGES = ("condition", "unet", "latent", "sr")  # the stages with scene-wide statistics
# LR pixels around a render tile: the upsampler's 3x3 convolutions on the 1x, 2x and 4x grids
# reach 1 + 1/2 + 1/4 LR pixels, its bilinear taps 1 pixel of the finest grid, the bicubic skip 2.
RENDER_CONTEXT = 3
log = logging.getLogger(__name__)


def autocast(precision: str, like: torch.Tensor):
    """Autocast context for "bf16" / "fp16" (a no-op for "fp32")."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} not in {sorted(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(like.device.type, dtype)


def run(
    stages,
    peak_bytes: int,
    geo: Geometry,
    like: torch.Tensor,
    max_memory: float | str | None = "auto",
    tile: int | None = None,
    tile_overlap: int = 16,
    precision: str = "fp32",
    progress: bool = False,
) -> torch.Tensor:
    """`stages(pipeline)` on the `Pipeline` that the memory budget calls for, under
    `torch.inference_mode()` and autocast `precision`; returns the result in float32.

    Untiled (one tile per stage) when the untiled run's `peak_bytes` fits the budget or `tile`
    is 0; else decoder tiles of `tile` LR pixels, every stage with scene-wide statistics run
    whole where it fits the budget.

    Args:
        stages: `stages(pipeline) -> tensor`, e.g. `lambda p: p.super_resolve(model, lr, geo)`.
        peak_bytes: the model's estimate of the untiled run's activation memory.
        geo: the scene's geometry (its scale sets the automatic tile size).
        like: a tensor on the device and of the dtype of the computation.
        max_memory: memory budget in GB (None: unbounded, never tile automatically; "auto":
            `MEMORY_MARGIN` of the memory available now, `memory_budget`).
        tile: LR tile size; None = automatic, 0 = untiled.
        tile_overlap: LR overlap of neighbouring tiles (cross-faded).
        precision: autocast precision.
        progress: show a progress bar over tiles.
    """
    budget = memory_budget(max_memory, like.device)
    if tile is None:
        tile = choose_tile(peak_bytes, budget, geo.scale, tile_overlap)
    check_tile(tile, tile_overlap)
    bound = "unbounded" if budget is None else f"{budget:.2f} GB"
    log.info("memory budget %s (%s): %s", bound, max_memory, f"tile {tile}" if tile else "untiled")
    limit = None if budget is None or tile == 0 else int(budget * 2**30)
    pipeline = Pipeline(tile, tile_overlap, progress=progress, budget=limit)
    # Tiles return freed memory to the OS between them (`release_memory`): a heap kept across a
    # large scene's stages fragments (peak RSS 3.2 -> 4.0 GB, measured). Where the untiled run
    # fits the budget, freed memory is reused rather than mapped afresh.
    pipeline.keep_heap = limit is None or peak_bytes <= limit
    with autocast(precision, like), torch.inference_mode():
        with retained_heap(like.device) if pipeline.keep_heap else contextlib.nullcontext():
            return stages(pipeline).float()


class Pipeline:
    """Super-resolution (LDCSR, and its condition decoded alone: `sr_kd`) or reconstruction
    (stage 1) of whole scenes, stage by stage over the tiles of a plan.

    Args:
        tile: decoder tile in LR pixels (>= 16 and >= 2 * overlap); 0 = the whole image.
        overlap: LR overlap of neighbouring decoder tiles (cross-faded).
        context: LR pixels computed around a decoder tile and discarded (>= 2).
        condition_tile: encoder tile in latent pixels (8 HR pixels each; 0 = whole).
        latent_tile: tile of the UNet and of the latent features, in latent pixels.
        latent_overlap, latent_context: overlap and context of latent tiles. All latent sizes are
            multiples of 8.
        stats_pixels: pixels of the reference pass that records the normalisation statistics of
            a tiled stage (its input is downscaled to fit; a quarter of it for the SR branch,
            which is costlier per pixel); 0 = per-tile statistics.
        progress: show a progress bar over tiles.
        budget: bytes of activations a stage may use: a stage of `STAGES` runs whole when its
            estimate (the model's `stage_bytes`) fits, and with the SR branch whole the decoder
            renders `tile`-sized windows of it (`RENDER_CONTEXT`, no overlap). None: every
            stage whole (with `tile` 0: the untiled run). 0: every stage on its tiles.
    """

    def __init__(
        self,
        tile: int = 0,
        overlap: int = 16,
        context: int = 8,
        condition_tile: int = 96,
        latent_tile: int = 256,
        latent_overlap: int = 16,
        latent_context: int = 16,
        stats_pixels: int = 1 << 19,
        progress: bool = False,
        budget: int | None = 0,
    ):
        check_tile(tile, overlap, context)
        lat = (condition_tile, latent_tile, latent_overlap, latent_context)
        if any(v % 8 or v < 0 for v in lat) or any(0 < t < 2 * latent_overlap for t in lat[:2]):
            raise ValueError(f"latent tiles/overlap/context {lat}: multiples of 8, >= 2 * overlap")
        self.tile, self.overlap, self.context = tile, overlap, context
        self.condition_tile, self.latent_tile = condition_tile, latent_tile
        self.latent_overlap, self.latent_context = latent_overlap, latent_context
        self.progress, self.stats_pixels, self.budget = progress, stats_pixels, budget
        self.keep_heap = False  # set by `run`: keep freed memory in the heap between tiles
        self.bar = tqdm(disable=True)  # tiles done (`progress_bar`)

    # --------------------------------------------------------------------------------- entries
    def super_resolve(self, model, lr: torch.Tensor, geo: Geometry, generator=None):
        """LDCSR sampling: lr [B, 3, *geo.lr] in [-1, 1] -> [B, 3, *geo.target] in [-1, 1]
        (clamped). Call it under `model.ema_scope()`; `generator` (CPU) seeds x_T and the step
        noises."""
        plan = self.plan(geo, self.whole_stages(model, geo, lr.shape[0]))
        total = sum(len(v) for v in plan.values()) + len(plan["unet"]) * (model.timesteps - 1)
        with torch.inference_mode(), self.progress_bar(total):
            cond = self.condition(model, lr, geo, plan)  # [B, C, *geo.latent]
            x_T, noises = model.draw_noise(cond.shape, generator)
            bound = model.denoiser(geo.scale, geo.scene_out[0], lr.shape[0])
            z0 = model.sample(self.denoiser(bound, plan["unet"]), x_T, cond, noises)
            ae = model.first_stage_model
            return self.decode(ae, model.unscale(z0), lr, geo, plan).clamp_(-1, 1)

    def decode_condition(self, model, lr: torch.Tensor, geo: Geometry) -> torch.Tensor:
        """The authors' `sr_kd`: the condition encoding decoded as the latent, lr [B, 3, *geo.lr]
        in [-1, 1] -> [B, 3, *geo.out] in [-1, 1] (clamped)."""
        plan = self.plan(geo, self.whole_stages(model, geo, lr.shape[0]))
        del plan["unet"]
        with torch.inference_mode(), self.progress_bar(sum(len(v) for v in plan.values())):
            cond = self.condition(model, lr, geo, plan)
            ae = model.first_stage_model
            return self.decode(ae, model.unscale(cond), lr, geo, plan).clamp_(-1, 1)

    def reconstruct(self, autoencoder, lr, hr, geo: Geometry) -> torch.Tensor:
        """Stage 1: decode(mode(encode(hr, lr)), lr, hr size), [-1, 1] in, [-1, 1] out
        (clamped)."""
        plan = self.plan(geo, self.whole_stages(autoencoder, geo, lr.shape[0]))
        with torch.inference_mode(), self.progress_bar(sum(len(v) for v in plan.values())):
            z = None
            if autoencoder.use_latent:

                def crop(size, rows, cols):
                    lr_up = resize_crop(lr, size, rows, cols, "bicubic")
                    small = hr if size == geo.out else F.interpolate(hr, size=size, mode="area")
                    return autoencoder.build_encoder_input(cut(small, (rows, cols)), lr_up)

                chain = autoencoder.encode_mode_stages()
                z = self.encode(autoencoder, autoencoder.encode_mode, crop, geo, plan, chain)
            return self.decode(autoencoder, z, lr, geo, plan).clamp_(-1, 1)

    # ------------------------------------------------------------------------------------ plan
    def whole_stages(self, model, geo: Geometry, batch: int) -> frozenset[str]:
        """The `STAGES` whose whole-scene run (the model's `stage_bytes`) fits `budget` next to
        the result and the blending totals (`output_bytes`); all of them when unbounded."""
        if self.budget is None:
            return frozenset(STAGES)
        if self.budget == 0:
            return frozenset()
        held = output_bytes(geo.target, batch)
        stages = model.stage_bytes(geo.lr, geo.out, batch)
        return frozenset(k for k, v in stages.items() if v + held <= self.budget)

    def plan(self, geo: Geometry, whole=frozenset()) -> dict[str, list]:
        """Tiles of each stage as (crop, window) pairs: `crop` ((r0, r1), (c0, c1)) is what a tile
        computes, the `Window` what it contributes. "condition", "unet" and "latent" are on the
        latent grid (starts at multiples of 8); "decoder" has LR crops and HR windows. A stage
        in `whole` has one tile; with "sr" in `whole`, "sr" (one entry: the SR branch on the
        whole LR image) and "render" (LR crops and HR windows, not overlapping) replace
        "decoder"."""
        lat = {}
        for name, tile in (("condition", self.condition_tile), ("unet", self.latent_tile),
                           ("latent", self.latent_tile)):  # fmt: skip
            tile = 0 if name in whole else tile
            grid = tile_grid(geo.latent, (tile,) * 2, (self.latent_overlap,) * 2, align=8)
            lat[name] = [(grow(w, self.latent_context, geo.latent), w) for w in grid]
        if "sr" in whole:
            step = self.tile or max(geo.lr)
            axes = [[(a, min(a + step, n)) for a in range(0, n, step)] for n in geo.lr]
            render = decoder_tiles(geo, axes, RENDER_CONTEXT)
            return {**lat, "sr": [((0, geo.lr[0]), (0, geo.lr[1]))], "render": render}
        lr_axes = [split_axis(n, self.tile, self.overlap if self.tile < n else 0) for n in geo.lr]
        return {**lat, "decoder": decoder_tiles(geo, lr_axes, self.context)}

    # --------------------------------------------------------------------------------- stages
    def condition(self, model, lr: torch.Tensor, geo: Geometry, plan) -> torch.Tensor:
        """The stage-2 condition `encode_upsampled(bicubic_up(lr))` on latent tiles."""
        lr_crop = lambda size, rows, cols: resize_crop(lr, size, rows, cols, "bicubic")  # noqa: E731
        chain = model.condition_stages()
        return self.encode(model, model.encode_upsampled, lr_crop, geo, plan, chain)

    def encode(self, model, encoder, crop_input, geo: Geometry, plan, chain) -> torch.Tensor:
        """`encoder` (`model`'s condition encoder, or its posterior mode) on the "condition"
        tiles of `plan` -> [B, C, *latent]. `crop_input(size, rows, cols)` is the crop rows x
        cols of the encoder's input for an output of `size` (the scene's, or a downscaled one
        whose whole input gives the reference statistics); `chain` the encoder as (stage, halo,
        stride), streamed by bands when it is tiled under a budget."""
        tiles = plan["condition"]

        def tile(box) -> torch.Tensor:
            rows, cols = (
                (8 * a, m if b == n else 8 * b) for (a, b), n, m in zip(box, geo.latent, geo.out)
            )
            out = encoder(crop_input(geo.out, rows, cols))  # [B, C, *latent crop]
            self.bar.update()
            return out

        def reference() -> None:
            size = shrink(geo.out, self.stats_pixels)
            encoder(crop_input(size, (0, size[0]), (0, size[1])))

        stats = SceneStatistics([model], (nn.GroupNorm,))
        if len(tiles) > 1 and self.budget:  # too large to run whole: stream by bands
            x = crop_input(geo.out, (0, geo.out[0]), (0, geo.out[1]))  # [B, in, H, W]
            per_pixel = model.stage_bytes((1, 1), (1, 1))["condition"]
            band = self.budget // (16 * per_pixel)  # ~1/16 of the budget
            out = stream_chain(chain, x, stats, band, self.budget // 4)
            for _ in tiles:
                self.bar.update()
            return out
        return self.tiled(tile, tiles, geo.latent, stats, reference)

    def denoiser(self, denoise, tiles):
        """`denoise(x_t, cond, t)` (the model's, bound to the scene's scale and height) blended
        over latent tiles. The UNet's GroupNorm and attention see one tile and its context."""

        def tiled(x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if len(tiles) == 1:
                self.bar.update()
                return denoise(x_t, cond, t)
            eps = torch.zeros_like(x_t)
            for crop, win in tiles:
                accumulate(eps, trim(denoise(cut(x_t, crop), cut(cond, crop), t), crop, win), win)
                self.bar.update()
            return eps

        return tiled

    def decode(self, autoencoder, z, lr: torch.Tensor, geo: Geometry, plan) -> torch.Tensor:
        """Latent [B, embed, *latent] (None without latent) -> [B, 3, *target] in model space,
        unclamped: the latent features on latent tiles, then decoder (or render) tiles."""
        feats = None
        if z is not None:

            def reference_latent() -> None:
                size = shrink(geo.latent, self.stats_pixels)
                autoencoder.latent_features(F.interpolate(z, size=size, mode="area"))

            def run_latent(crop):
                out = autoencoder.latent_features(cut(z, crop))  # h_k [B, ch, *crop]
                self.bar.update()
                return out

            stats = SceneStatistics([autoencoder], (nn.GroupNorm,))
            feats = self.tiled(run_latent, plan["latent"], geo.latent, stats, reference_latent)
        if "render" in plan:
            return self.render(autoencoder, lr, feats, geo, plan["render"])

        def reference_sr() -> None:
            size = shrink(geo.lr, self.stats_pixels // 4)  # 48 IMD modules per LR pixel
            small = lr if size == geo.lr else F.interpolate(lr, size=size, mode="area")
            near = None if feats is None else [F.interpolate(f, size=size) for f in feats]
            autoencoder.sr_branch(small, near, geo.scale)

        def run_tile(crop, win):
            out = self.decode_tile(autoencoder, lr, feats, geo, crop, win)
            self.bar.update()
            return out

        stats = SceneStatistics([autoencoder], (ContrastChannelAttention,))
        return self.tiled(run_tile, plan["decoder"], geo.target, stats, reference_sr, True)

    def render(self, autoencoder, lr, feats, geo: Geometry, tiles) -> torch.Tensor:
        """SR branch on the whole LR image (the untiled run's statistics), then `render` on
        `tiles` of it -> [B, 3, *target]; a tile's crop holds its window's receptive field."""
        near = None if feats is None else [F.interpolate(f, size=geo.lr) for f in feats]
        del feats
        x = autoencoder.sr_branch(lr, near, geo.scale)  # [B, ch, h, w], channels last
        del near
        self.bar.update()
        if len(tiles) == 1:  # the whole output, or a block's window, in one call
            out = autoencoder.render(x, lr, geo.scene_out, geo.window)
            self.bar.update()
            return out

        def run_tile(crop, win):
            (r0, r1), (c0, c1) = crop
            window = geo.output_window((r0, c0), win.rows, win.cols)
            x_c = cut(x, crop, torch.channels_last)
            out = autoencoder.render(x_c, lr[..., r0:r1, c0:c1], window.out_size, window)
            self.bar.update()
            return out

        return self.tiled(run_tile, tiles, geo.target, None, None, True)

    def decode_tile(self, autoencoder, lr, feats, geo: Geometry, crop, win) -> torch.Tensor:
        """SR branch on the LR `crop`, rendered on the HR window `win` -> [B, 3, rows, cols]."""
        (r0, r1), (c0, c1) = crop
        near = None
        if feats is not None:  # h_k resized (nearest) to the scene's LR grid, on the crop
            maps = [axis_map(zn, n, "nearest", *ax) for zn, n, ax in zip(geo.latent, geo.lr, crop)]
            spans = [m.span for m in maps]
            near = [resize_window(cut(f, spans), maps, (spans[0][0], spans[1][0])) for f in feats]
        lr_c = lr[..., r0:r1, c0:c1]
        x = autoencoder.sr_branch(lr_c, near, geo.scale)
        window = geo.output_window((r0, c0), win.rows, win.cols)
        return autoencoder.render(x, lr_c, window.out_size, window)

    # -------------------------------------------------------------------------------- helpers
    def tiled(self, run, tiles, size, stats, reference, windowed: bool = False):
        """Blend `run(crop)` (with `windowed`, `run(crop, window)`, which returns the window
        itself) over `tiles` into zero-initialised float32 tensors of `size`; one tile is
        `run` itself. With several tiles and `stats_pixels`, `reference()` first records the
        stage's normalisation statistics."""
        if len(tiles) == 1:
            return run(*tiles[0]) if windowed else run(tiles[0][0])
        shared = self.stats_pixels > 0 and stats is not None
        if shared:
            with stats.collect():
                reference()
        totals = None
        with stats.apply() if shared else contextlib.nullcontext():
            for crop, win in tiles:
                out = run(crop, win) if windowed else run(crop)
                several = isinstance(out, list)
                parts = out if several else [out]
                if totals is None:
                    totals = [torch.zeros(*p.shape[:2], *size, device=p.device) for p in parts]
                for total, part in zip(totals, parts):
                    accumulate(total, part if windowed else trim(part, crop, win), win)
                del out, parts
                if not self.keep_heap:
                    release_memory()
        return totals if several else totals[0]

    @contextlib.contextmanager
    def progress_bar(self, total: int):
        """`self.bar` counts `total` tiles (shown with `progress`) inside the block."""
        self.bar = tqdm(total=total, desc="tiles", unit="tile", disable=not self.progress)
        try:
            yield
        finally:
            self.bar.close()
            self.bar = tqdm(disable=True)
