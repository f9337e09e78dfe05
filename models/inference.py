"""Tiled whole-scene inference for LDCSR and its autoencoder: tiles, shared noise and statistics.

`SceneTiler` only orchestrates; every network runs its own (inference-mode) forward methods:

1. encoder (stage-2 condition, or the stage-1 posterior): on latent tiles; a latent tile
   [i0, i1) reads HR rows [8 i0, 8 i1) of its input (bicubic_up(lr) computed from an LR crop on
   the scene's grid), so every tile's latent is aligned with the scene's; tiles carry
   `latent_context` extra latent pixels (discarded) and cross-fade over `latent_overlap`;
2. sampling: x_T and the T step noises are drawn once for the whole latent (CPU generator, the
   sampler's order: the numbers of the untiled run); each step's eps is blended from latent tiles
   whose starts are multiples of 8 (the UNet's downsampling grid), all conditioned on the scene's
   scale H/h and height H;
3. the decoder's latent branch (`GAPDecoder.latent_features`) on latent tiles;
4. decoder tiles in LR pixels (`tile`, `overlap`, `context`): `GAPDecoder.sr_branch` on the LR
   crop, then `GAPDecoder.render` on the tile's HR window of the scene's grid
   (`models.tiling.OutputWindow`: any scale), cross-faded on HR windows [round(y0 H/h), ...);
4'. or, when the SR branch fits the budget, `sr_branch` on the whole LR image and `render` on
   non-overlapping tiles of it.

Under a memory budget (`budget`, from `run_tiled`'s `max_memory`) every stage with scene-wide
statistics (GroupNorm, IMD channel attention) that fits runs whole, so its statistics are the
untiled run's; the decoder then runs its SR branch whole and renders tiles of it (4'., context
`RENDER_CONTEXT`, no overlap). An encoder over the budget (condition, or stage 1's) streams
through its chain of stages by bands of rows with exact statistics (`models.stream`). The other
stages, when they do not fit, normalise every tile with statistics recorded in one untiled
reference pass (`models.scene_stats`; downscaled to `stats_pixels` when larger: then they are
estimates, but shared, so tiles agree); the UNet's attention, and then its GroupNorm, see one
tile and its context.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ldm.blocks import ContrastChannelAttention
from ldm.diffusion import draw_noise
from ldm.distributions import DiagonalGaussianDistribution
from models.geometry import Geometry
from models.memory import memory_budget, release_memory, retained_heap
from models.scene_stats import SceneStatistics
from models.stream import stream_chain
from models.tiling import (
    accumulate,
    grow,
    shrink,
    split_axis,
    tile_grid,
    to_output_window,
    trim,
    windows_from,
)
from utils.resample import axis_map, cut, resize_crop, resize_window

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MIN_TILE = 16  # LR pixels
# LR pixels around a render tile: the upsampler's 3x3 convolutions on the 1x, 2x and 4x grids
# reach 1 + 1/2 + 1/4 LR pixels, its bilinear taps 1 pixel of the finest grid, the bicubic skip 2.
RENDER_CONTEXT = 3
log = logging.getLogger(__name__)


def choose_tile(peak_bytes: int, max_memory: float | None, scale: float, overlap: int) -> int:
    """Decoder tile in LR pixels: 0 (untiled) when `peak_bytes` fits `max_memory` GB (None =
    never tile), else about 512 output pixels (at most 128 LR pixels)."""
    if max_memory is None or peak_bytes <= max_memory * 2**30:
        return 0
    return max(MIN_TILE, 2 * overlap, min(128, round(512 / scale)))


def check_tile(tile: int, overlap: int, context: int = 8) -> None:
    """Raises ValueError naming the fix for an impossible tile / overlap / context."""
    if tile < 0 or tile and (tile < max(MIN_TILE, 2 * overlap) or overlap < 0 or context < 2):
        raise ValueError(
            f"tile {tile} must be 0 (untiled) or >= {MIN_TILE} and >= 2 * overlap ({overlap}); "
            f"context {context} >= 2 (the bicubic skip reads 2 LR pixels beyond a tile)"
        )


def autocast(precision: str, like: torch.Tensor):
    """Autocast context for "bf16" / "fp16" (a no-op for "fp32")."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} not in {sorted(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(like.device.type, dtype)


class SceneTiler:
    """Tiled super-resolution (LDCSR, and its condition decoded alone: `sr_kd`) or reconstruction
    (stage 1) of whole scenes.

    Args:
        tile: decoder tile in LR pixels (>= 16 and >= 2 * overlap); 0 = the whole image.
        overlap: LR overlap of neighbouring decoder tiles (cross-faded).
        context: LR pixels computed around a decoder tile and discarded (>= 2).
        condition_tile: encoder tile in latent pixels (8 HR pixels each; 0 = whole).
        latent_tile: tile of the UNet and of the decoder's latent branch, in latent pixels.
        latent_overlap, latent_context: overlap and context of latent tiles. All latent sizes are
            multiples of 8.
        stats_pixels: pixels of the reference pass that records the normalisation statistics of
            a tiled stage (its input is downscaled to fit; a quarter of it for the SR branch,
            which is costlier per pixel); 0 = per-tile statistics.
        progress: show a progress bar over tiles.
        budget: bytes of activations a stage may use (None: unbounded). A stage whose statistics
            span the scene (condition encoder, UNet, decoder latent and SR branches) runs whole
            when its estimate (the model's `stage_bytes`) fits, so its statistics are the untiled
            run's; the decoder then renders `tile`-sized windows of the whole SR features with
            `RENDER_CONTEXT`, without overlap. 0: every stage on its tiles.
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
        self.keep_heap = False  # set by `run_tiled` inside `retained_heap`
        self._bar = None

    # --------------------------------------------------------------------------------- public
    def super_resolve(self, model, lr, out_size, generator=None, window=None) -> torch.Tensor:
        """LDCSR sampling: lr [B, 3, h, w] in [-1, 1] -> [B, 3, *out_size] in [-1, 1] (clamped).
        Call it under `model.ema_scope()`; `generator` (CPU) seeds x_T and the step noises, and
        `window` makes it a block of a larger scene, as in `LDCSR.super_resolve`."""
        geo = self.geometry(lr, out_size, window)
        plan = self.plan(geo, self.whole_stages(model, geo, lr.shape[0]))
        steps = model.diffusion.num_timesteps
        total = sum(len(v) for v in plan.values()) + len(plan["unet"]) * (steps - 1)
        with torch.inference_mode(), self._progress(total):
            cond = self.condition(model, lr, geo, plan)
            x_T, noises = draw_noise(cond.shape, steps, generator, cond.device, cond.dtype)
            bound = model.denoiser(geo.scene_lr[0], geo.scene[1], lr.shape[0])
            denoise = self.denoiser(bound, plan["unet"])
            z0 = model.diffusion.sample(denoise, x_T=x_T, cond=cond, noises=noises)
            ae = model.first_stage_model
            return self.decode(ae, z0 / model.scale_factor, lr, geo, plan).clamp_(-1, 1)

    def decode_condition(self, model, lr: torch.Tensor, out_size) -> torch.Tensor:
        """The authors' `sr_kd` (`LDCSR.super_resolve_condition`): the condition encoding
        decoded as the latent, lr [B, 3, h, w] in [-1, 1] -> [B, 3, *out_size] in [-1, 1]
        (clamped)."""
        geo = self.geometry(lr, out_size)
        plan = self.plan(geo, self.whole_stages(model, geo, lr.shape[0]) - {"unet"})
        plan.pop("unet")
        total = sum(len(v) for v in plan.values())
        with torch.inference_mode(), self._progress(total):
            cond = self.condition(model, lr, geo, plan)
            ae = model.first_stage_model
            return self.decode(ae, cond / model.scale_factor, lr, geo, plan).clamp_(-1, 1)

    def reconstruct(self, autoencoder, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        """Stage 1: decode(mode(encode(hr, lr)), lr, hr size), [-1, 1] in, [-1, 1] out
        (clamped)."""
        geo = self.geometry(lr, hr.shape[-2:])
        plan = self.plan(geo, self.whole_stages(autoencoder, geo, lr.shape[0]))
        with torch.inference_mode(), self._progress(sum(len(v) for v in plan.values())):
            z = None
            if autoencoder.use_latent:

                def crop(size, rows, cols):
                    lr_up = resize_crop(lr, size, rows, cols, "bicubic")
                    small = hr if size == geo.out else F.interpolate(hr, size=size, mode="area")
                    return autoencoder.build_encoder_input(cut(small, (rows, cols)), lr_up)

                z = self.encode(autoencoder, crop, geo, plan["condition"], posterior=True)
            return self.decode(autoencoder, z, lr, geo, plan).clamp_(-1, 1)

    def geometry(self, lr: torch.Tensor, out_size, window=None) -> Geometry:
        geo = Geometry(tuple(lr.shape[-2:]), (int(out_size[0]), int(out_size[1])), window)
        if min(geo.latent) < 1:
            raise ValueError(f"output size {geo.out} is too small: each side must be >= 8 px")
        return geo

    def whole_stages(self, model, geo: Geometry, batch: int) -> frozenset[str]:
        """The stages of `model.stage_bytes` whose whole-scene run fits `budget` next to the
        result and the blending totals (6 output-sized float maps)."""
        if self.budget == 0:
            return frozenset()
        held = 4 * 6 * batch * geo.target[0] * geo.target[1]
        stages = model.stage_bytes(geo.lr, geo.out, batch)
        fits = lambda v: self.budget is None or v + held <= self.budget  # noqa: E731
        return frozenset(k for k, v in stages.items() if fits(v))

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
            render = self.decoder_tiles(geo, axes, RENDER_CONTEXT)
            return {**lat, "sr": [((0, geo.lr[0]), (0, geo.lr[1]))], "render": render}
        lr_axes = [split_axis(n, self.tile, self.overlap if self.tile < n else 0) for n in geo.lr]
        return {**lat, "decoder": self.decoder_tiles(geo, lr_axes, self.context)}

    @staticmethod
    def decoder_tiles(geo: Geometry, lr_axes, context: int) -> list:
        """(LR crop: window grown by `context`, HR window) pairs of the LR windows `lr_axes`."""
        (lr_n, out_n), offsets = geo.scene, (0, 0) if geo.window is None else geo.window.offset
        hr_axes = [
            [to_output_window((a + o, b + o), n, m) for a, b in ax]
            for ax, o, n, m in zip(lr_axes, offsets, lr_n, out_n)
        ]
        if geo.window is not None:  # a block: the scene's windows cut to the block's window
            for k, (start, stop) in enumerate((geo.window.rows, geo.window.cols)):
                cut_to = [(max(c, start) - start, min(d, stop) - start) for c, d in hr_axes[k]]
                kept = [(lw, hw) for lw, hw in zip(lr_axes[k], cut_to) if hw[1] > hw[0]]
                lr_axes[k], hr_axes[k] = [lw for lw, _ in kept], [hw for _, hw in kept]
        lr_windows, hr_windows = windows_from(*lr_axes, geo.lr), windows_from(*hr_axes, geo.target)
        return [(grow(lw, context, geo.lr), hw) for lw, hw in zip(lr_windows, hr_windows)]

    # --------------------------------------------------------------------------------- stages
    def condition(self, model, lr: torch.Tensor, geo: Geometry, plan) -> torch.Tensor:
        """The stage-2 condition `CondEncoder(bicubic_up(lr))` on latent tiles."""
        lr_crop = lambda size, rows, cols: resize_crop(lr, size, rows, cols, "bicubic")  # noqa: E731
        return self.encode(model.cond_stage_model, lr_crop, geo, plan["condition"])

    def encode(self, net, crop_input, geo: Geometry, tiles, posterior: bool = False):
        """`net` (a GAP encoder, or with `posterior` an autoencoder's posterior mode) on latent
        tiles -> [B, C, *latent]. `crop_input(size, rows, cols)` is the crop rows x cols of the
        encoder's input for an output of `size` (the scene's, or a downscaled one whose whole
        input gives the reference statistics)."""
        run = (lambda x: net.posterior(x).mode()) if posterior else net  # noqa: E731
        encoder = net.encoder if posterior else net

        def tile(box) -> torch.Tensor:
            rows, cols = (
                (8 * a, m if b == n else 8 * b) for (a, b), n, m in zip(box, geo.latent, geo.out)
            )
            out = run(crop_input(geo.out, rows, cols)).float()  # [B, C, *latent crop]
            self._tick()
            return out

        def reference() -> None:
            size = shrink(geo.out, self.stats_pixels)
            encoder(crop_input(size, (0, size[0]), (0, size[1])))

        stats = SceneStatistics([encoder], (nn.GroupNorm,))
        if len(tiles) > 1 and self.budget:  # too large to run whole: stream by bands
            x = crop_input(geo.out, (0, geo.out[0]), (0, geo.out[1]))  # [B, in, H, W]
            band = self.budget // (64 * encoder.peak_elements((1, 1)))  # ~1/16 of the budget
            chain = net.posterior_stages() if posterior else net.stages()
            out = stream_chain(chain, x, stats, band, self.budget // 4)
            for _ in tiles:
                self._tick()
            return DiagonalGaussianDistribution(out).mode() if posterior else out
        return self._tiled(tile, tiles, geo.latent, stats, reference)

    def denoiser(self, denoise, tiles):
        """`denoise(x_t, cond, t)` (the model's, bound to the scene's scale and height) blended
        over latent tiles. The UNet's GroupNorm and attention see one tile and its context."""

        def tiled(x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if len(tiles) == 1:
                self._tick()
                return denoise(x_t, cond, t)
            eps = torch.zeros_like(x_t)
            for crop, win in tiles:
                accumulate(eps, trim(denoise(cut(x_t, crop), cut(cond, crop), t), crop, win), win)
                self._tick()
            return eps

        return tiled

    def decode(self, autoencoder, z, lr: torch.Tensor, geo: Geometry, plan) -> torch.Tensor:
        """Latent [B, embed, *latent] (None without latent) -> [B, 3, *out] in model space,
        unclamped: the decoder's latent branch on latent tiles, then decoder tiles."""
        dec, feats = autoencoder.decoder, None
        if z is not None:
            z = autoencoder.post_quant_conv(z)

            def reference_latent() -> None:
                size = shrink(geo.latent, self.stats_pixels)
                dec.latent_features(F.interpolate(z, size=size, mode="area"))

            def run_latent(crop):
                out = [f.float() for f in dec.latent_features(cut(z, crop))]
                self._tick()
                return out

            stats = SceneStatistics([dec], (nn.GroupNorm,))
            feats = self._tiled(run_latent, plan["latent"], geo.latent, stats, reference_latent)
        if "render" in plan:
            return self.render(dec, lr, feats, geo, plan["render"])

        def reference_sr() -> None:
            size = shrink(geo.lr, self.stats_pixels // 4)  # 48 IMD modules per LR pixel
            small = lr if size == geo.lr else F.interpolate(lr, size=size, mode="area")
            near = None if feats is None else [F.interpolate(f, size=size) for f in feats]
            dec.sr_branch(small, near, geo.scale)

        def run_tile(crop, win):
            out = self.decode_tile(dec, lr, feats, geo, crop, win)
            self._tick()
            return out

        stats = SceneStatistics([dec], (ContrastChannelAttention,))
        return self._tiled(run_tile, plan["decoder"], geo.target, stats, reference_sr, True)

    def render(self, dec, lr, feats, geo: Geometry, tiles) -> torch.Tensor:
        """SR branch on the whole LR image (the untiled run's statistics), then `dec.render` on
        `tiles` of it -> [B, 3, *target]; a tile's crop holds its window's receptive field."""
        near = None if feats is None else [F.interpolate(f, size=geo.lr) for f in feats]
        x = dec.sr_branch(lr, near, geo.scale)  # [B, ch, h, w], channels last
        del near, feats
        self._tick()

        def run_tile(crop, win):
            (r0, r1), (c0, c1) = crop
            window = geo.output_window((r0, c0), win.rows, win.cols)
            x_c = cut(x, crop, torch.channels_last)
            out = dec.render(x_c, lr[..., r0:r1, c0:c1], window.out_size, window).float()
            self._tick()
            return out

        return self._tiled(run_tile, tiles, geo.target, None, None, True)

    def decode_tile(self, dec, lr, feats, geo: Geometry, crop, win) -> torch.Tensor:
        """SR branch on the LR `crop`, rendered on the HR window `win` -> [B, 3, rows, cols]."""
        (r0, r1), (c0, c1) = crop
        near = None
        if feats is not None:  # h_k resized (nearest) to the scene's LR grid, on the crop
            maps = [axis_map(zn, n, "nearest", *ax) for zn, n, ax in zip(geo.latent, geo.lr, crop)]
            spans = [m.span for m in maps]
            near = [resize_window(cut(f, spans), maps, (spans[0][0], spans[1][0])) for f in feats]
        lr_c = lr[..., r0:r1, c0:c1]
        x = dec.sr_branch(lr_c, near, geo.scale)
        window = geo.output_window((r0, c0), win.rows, win.cols)
        return dec.render(x, lr_c, window.out_size, window).float()

    # -------------------------------------------------------------------------------- helpers
    def _tiled(self, run, tiles, size, stats, reference, windowed: bool = False):
        """Blend `run(crop)` (with `windowed`, `run(crop, window)`, which returns the window
        itself) over `tiles` into zero-initialised tensors of `size`. With several tiles and
        `stats_pixels`, `reference()` first records the stage's normalisation statistics."""
        if len(tiles) == 1:
            return run(*tiles[0]) if windowed else run(tiles[0][0])
        shared = len(tiles) > 1 and self.stats_pixels > 0 and stats is not None
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
                if len(tiles) > 1 and not self.keep_heap:
                    release_memory()
        return totals if several else totals[0]

    def _tick(self) -> None:
        if self._bar is not None:
            self._bar.update()

    @contextlib.contextmanager
    def _progress(self, total: int):
        self._bar = tqdm(total=total, desc="tiles", unit="tile", disable=not self.progress)
        try:
            yield
        finally:
            self._bar.close()
            self._bar = None


def run_tiled(
    untiled,
    tiled,
    peak_bytes: int,
    scale: float,
    like: torch.Tensor,
    max_memory: float | str | None = "auto",
    tile: int | None = None,
    tile_overlap: int = 16,
    precision: str = "fp32",
    progress: bool = False,
) -> torch.Tensor:
    """`untiled()` when the untiled run's `peak_bytes` fits the memory budget (or `tile` is 0),
    else `tiled(SceneTiler(tile, tile_overlap, budget=...))`, whose stages run whole where they
    fit the budget; under `torch.inference_mode()` and autocast `precision` ("fp32", "bf16",
    "fp16"). Returns the result in float32.

    Args:
        untiled, tiled: the two ways to compute the result.
        peak_bytes: the model's estimate of the untiled run's activation memory.
        scale: output / LR height (sets the automatic tile size).
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
        tile = choose_tile(peak_bytes, budget, scale, tile_overlap)
    check_tile(tile, tile_overlap)
    bound = "unbounded" if budget is None else f"{budget:.2f} GB"
    log.info("memory budget %s (%s): %s", bound, max_memory, f"tile {tile}" if tile else "untiled")
    with autocast(precision, like), torch.inference_mode():
        if tile == 0:  # fits the budget: reuse freed memory rather than map it afresh
            with retained_heap(like.device):
                return untiled().float()
        # Tiles return freed memory to the OS between them (`release_memory`): a heap kept
        # across a large scene's stages fragments (peak RSS 3.2 -> 4.0 GB, measured). Where the
        # untiled run fits the budget (tiles asked for), the heap is kept as untiled.
        limit = None if budget is None else int(budget * 2**30)
        tiler = SceneTiler(tile, tile_overlap, progress=progress, budget=limit)
        tiler.keep_heap = limit is None or peak_bytes <= limit
        with retained_heap(like.device) if tiler.keep_heap else contextlib.nullcontext():
            return tiled(tiler).float()
