"""Whole-scene LDCSR inference (§3 sampling, §2 decoder): the fast path and seamless tiling.

`SceneSuperResolver(model)(lr, out_size, generator)` computes what `LDCSR.super_resolve` does, in
stages over the whole scene's latent (H//8 x W//8, small enough to keep in memory):

1. condition: the condition encoder on latent tiles; a latent tile [i0, i1) reads HR rows
   [8 i0, 8 i1) of bicubic_up(lr) (computed from an LR crop on the scene's grid), so every tile's
   latent is exactly aligned with the scene's; tiles carry `latent_context` extra latent pixels
   (discarded) and cross-fade over `latent_overlap`;
2. sampling: x_T and the T step noises are drawn once for the whole latent (CPU generator, the
   sampler's order: same numbers as the untiled run); each step's eps is blended from latent
   tiles whose starts are multiples of 8 (the UNet's downsampling grid), all conditioned on the
   scene's scale H/h and height H;
3. the decoder's latent branch on latent tiles (h_k kept at latent size; a_k, b_k of the scene);
4. decoder tiles in LR pixels (`tile`, `overlap`, `context`): SR branch on the LR crop, then the
   upsampler and the bicubic skip evaluated on the scene's HR grid (`utils.tiling.resize_window`,
   any scale), cross-faded on HR windows [round(y0 H/h), round(y1 H/h)).

When a stage has several tiles, its GroupNorm / IMD channel-attention layers normalise every tile
with statistics recorded in one untiled reference pass over the scene (`utils.scene_stats`;
downscaled to `stats_pixels` when larger: then they are estimates, but shared, so tiles still
agree). What stays per tile: the UNet's attention and GroupNorm (only for latents larger than
`latent_tile`) and each tile's finite context. With one tile per stage the result equals
`LDCSR.super_resolve` up to float rounding.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ldm.diffusion import draw_noise
from models.fast_layers import encode, fast_fru, fuse_levels, resnet_block, shuffle_resample
from utils.scene_stats import SceneStatistics
from utils.tiling import (
    Window,
    accumulate,
    axis_map,
    cut,
    grow,
    resize_crop,
    resize_window,
    shrink,
    split_axis,
    tile_grid,
    to_output_window,
    trim,
    windows_from,
)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MIN_TILE = 16  # LR pixels


@dataclass(frozen=True)
class Geometry:
    """Sizes of one scene: LR (h, w), output (H, W), latent (H//8, W//8); scale = H / h."""

    lr: tuple[int, int]
    out: tuple[int, int]

    @property
    def latent(self) -> tuple[int, int]:
        return self.out[0] // 8, self.out[1] // 8

    @property
    def scale(self) -> float:
        return self.out[0] / self.lr[0]


def untiled_peak_bytes(lr_size, out_size) -> int:
    """Rough fp32 peak of an untiled run: the 8x pyramid level and the conv output it is shuffled
    from, plus four 64-channel HR activations of the condition encoder."""
    return 4 * (2 * 64 * 64 * lr_size[0] * lr_size[1] + 4 * 64 * out_size[0] * out_size[1])


class SceneSuperResolver:
    """Fast, optionally tiled super-resolution of whole scenes with an `LDCSR` model.

    Args:
        model: an `LDCSR` in eval mode (sampling uses its EMA weights).
        tile: decoder tile in LR pixels (>= 16 and >= 2 * overlap); 0 = the whole image.
        overlap: LR overlap of neighbouring decoder tiles (cross-faded).
        context: LR pixels computed around a decoder tile and discarded (>= 2).
        condition_tile: condition-encoder tile in latent pixels (8 HR pixels each; 0 = whole).
        latent_tile: tile of the UNet and of the decoder's latent branch, in latent pixels.
        latent_overlap, latent_context: overlap and context of latent tiles. All latent sizes are
            multiples of 8.
        stats_pixels: pixels of the untiled reference pass that records the normalisation
            statistics of a tiled stage (its input is downscaled to fit; a quarter of it for the
            SR branch, which is costlier per pixel); 0 = per-tile statistics.
        precision: "fp32", or "bf16"/"fp16" autocast (tiles are accumulated in fp32).
        channels_last: convert the convolutional networks to channels-last (faster on CPU).
        compile: `torch.compile` the networks (slow first call; tiles of new shapes recompile).
        chunk_pixels: HR pixels per matrix product of the upsampler's 1x1 fusion MLP.
        resize_pixels: HR pixels per block of the upsampler (bounds its memory).
        progress: show a progress bar over tiles.
    """

    def __init__(
        self,
        model,
        tile: int = 0,
        overlap: int = 16,
        context: int = 8,
        condition_tile: int = 96,
        latent_tile: int = 256,
        latent_overlap: int = 16,
        latent_context: int = 16,
        stats_pixels: int = 1 << 19,
        precision: str = "fp32",
        channels_last: bool = True,
        compile: bool = False,
        chunk_pixels: int = 1 << 16,
        resize_pixels: int = 1 << 19,
        progress: bool = False,
    ):
        if tile < 0 or tile and (tile < max(MIN_TILE, 2 * overlap) or overlap < 0 or context < 2):
            raise ValueError(
                f"tile {tile} must be >= {MIN_TILE} and >= 2 * overlap ({overlap}); context "
                f"{context} >= 2 (the bicubic skip reads 2 LR pixels beyond a tile)"
            )
        lat = (condition_tile, latent_tile, latent_overlap, latent_context)
        if any(v % 8 or v < 0 for v in lat) or any(0 < t < 2 * latent_overlap for t in lat[:2]):
            raise ValueError(f"latent tiles/overlap/context {lat}: multiples of 8, >= 2 * overlap")
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} not in {sorted(PRECISIONS)}")
        self.model, self.tile, self.overlap, self.context = model, tile, overlap, context
        self.condition_tile, self.latent_tile = condition_tile, latent_tile
        self.latent_overlap, self.latent_context = latent_overlap, latent_context
        self.dtype, self.progress, self.stats_pixels = PRECISIONS[precision], progress, stats_pixels
        self.chunk_pixels, self.resize_pixels = chunk_pixels, resize_pixels
        dec = self.decoder = model.first_stage_model.decoder
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            for net in (model.cond_stage_model, model.model, dec):
                net.to(memory_format=torch.channels_last)
        run = torch.compile if compile else (lambda m: m)
        self.cond_net = run(partial(encode, model.cond_stage_model))
        self.unet = run(model.model.diffusion_model)
        self.frus = [run(partial(fast_fru, f)) for f in dec.FRUList]
        self.stats = {
            "condition": SceneStatistics([model.cond_stage_model]),
            "latent": SceneStatistics([dec.conv_in, dec.mid, dec.up]),
            "decoder": SceneStatistics([dec.FRUList]),
        }
        self._bar = None

    # --------------------------------------------------------------------------------- public
    def __call__(self, lr: torch.Tensor, out_size, generator=None, use_ema: bool = True):
        """LR [B, 3, h, w] in [0, 1] -> SR [B, 3, *out_size] in [0, 1] (float32).

        `generator` (CPU) seeds x_T and the step noises exactly as `LDCSR.super_resolve` does.
        """
        model = self.model
        geo = Geometry(tuple(lr.shape[-2:]), (int(out_size[0]), int(out_size[1])))
        if min(geo.latent) < 1:
            raise ValueError(f"output size {geo.out} is too small: each side must be >= 8 px")
        lr = lr.to(model.device, torch.float32) * 2 - 1
        lr = lr.contiguous(memory_format=self.memory_format)
        plan, steps = self.plan(geo), model.diffusion.num_timesteps
        total = sum(len(v) for v in plan.values()) + len(plan["unet"]) * (steps - 1)
        with model.ema_scope(use_ema), torch.inference_mode(), self._progress(total):
            cond = self.condition(lr, geo, plan["condition"])
            x_T, noises = draw_noise(cond.shape, steps, generator, cond.device, cond.dtype)
            denoise = self.denoiser(geo, plan["unet"])
            z0 = model.diffusion.sample(denoise, x_T=x_T, cond=cond, noises=noises)
            # in place (the scene may be large), inside inference_mode (sr is an inference tensor)
            return self.decode(z0, lr, geo, plan).clamp_(-1, 1).add_(1).div_(2)

    def plan(self, geo: Geometry) -> dict[str, list]:
        """Tiles of each stage as (crop, window) pairs: `crop` ((r0, r1), (c0, c1)) is what a tile
        computes, the `Window` what it contributes. "condition", "unet" and "latent" are on the
        latent grid (starts at multiples of 8); "decoder" has LR crops and HR windows."""
        lat = []
        for tile in (self.condition_tile, self.latent_tile):
            grid = tile_grid(geo.latent, (tile,) * 2, (self.latent_overlap,) * 2, align=8)
            lat.append([(grow(w, self.latent_context, geo.latent), w) for w in grid])
        lr_axes = [split_axis(n, self.tile, self.overlap if self.tile < n else 0) for n in geo.lr]
        hr_axes = [
            [to_output_window(a, n, m) for a in ax] for ax, n, m in zip(lr_axes, geo.lr, geo.out)
        ]
        decoder = [
            (grow(lw, self.context, geo.lr), hw)
            for lw, hw in zip(
                windows_from(*lr_axes, geo.lr),
                windows_from(*hr_axes, geo.out),
            )
        ]
        return {"condition": lat[0], "unet": lat[1], "latent": lat[1], "decoder": decoder}

    # --------------------------------------------------------------------------------- stages
    def condition(self, lr: torch.Tensor, geo: Geometry, tiles) -> torch.Tensor:
        """c = CondEncoder(bicubic_up(lr, out)) on latent tiles -> [B, 4, *latent]."""

        def encode(crop) -> torch.Tensor:
            rows, cols = (
                (8 * a, m if b == n else 8 * b) for (a, b), n, m in zip(crop, geo.latent, geo.out)
            )
            lr_up = resize_crop(lr, geo.out, rows, cols, "bicubic")  # HR crop of bicubic_up(lr)
            return self._run(self.cond_net, lr_up).float()  # [B, 4, *latent crop]

        def reference() -> None:
            size = shrink(geo.out, self.stats_pixels)
            self.cond_net(F.interpolate(lr, size=size, mode="bicubic", align_corners=False))

        return self._tiled(encode, tiles, geo.latent, "condition", reference)

    def denoiser(self, geo: Geometry, tiles):
        """eps(x_t, cond, t) over latent tiles, conditioned on the whole scene's scale and H.
        The UNet's GroupNorm and attention see one tile (its context included)."""

        def denoise(x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            b = x_t.shape[0]
            scale = torch.full((b,), geo.scale, device=x_t.device)
            out_height = torch.full((b,), geo.out[0], device=x_t.device)
            eps = torch.zeros_like(x_t)
            for crop, win in tiles:
                x = torch.cat([cut(x_t, crop), cut(cond, crop)], dim=1)
                e = self._run(
                    self.unet, x.contiguous(memory_format=self.memory_format), t, scale, out_height
                )
                accumulate(eps, trim(e.float(), crop, win), win)
            return eps

        return denoise

    def decode(self, z0: torch.Tensor, lr: torch.Tensor, geo: Geometry, plan) -> torch.Tensor:
        """Scaled latent [B, 4, *latent] -> image [B, 3, *out] in model space, unclamped."""
        z = self.model.first_stage_model.post_quant_conv(z0 / self.model.scale_factor)
        z = z.contiguous(memory_format=self.memory_format)
        dec = self.decoder
        s = torch.tensor([[geo.scale]], device=z.device)
        mods = [
            (dec.up[i].condition_scale1(s), dec.up[i].condition_scale2(s)) for i in _levels(dec)
        ]

        def reference_latent() -> None:
            size = shrink(geo.latent, self.stats_pixels)
            self._latent_branch(
                F.interpolate(z, size=size, mode="area") if size != geo.latent else z
            )

        run = lambda crop: self._run(self._latent_branch, cut(z, crop))  # noqa: E731
        feats = self._tiled(run, plan["latent"], geo.latent, "latent", reference_latent)

        def reference_sr() -> None:
            size = shrink(geo.lr, self.stats_pixels // 4)  # 48 IMD modules per LR pixel
            small = lr if size == geo.lr else F.interpolate(lr, size=size, mode="area")
            self._sr_branch(
                small, [F.interpolate(f, size=size, mode="nearest") for f in feats], mods
            )

        def run_tile(crop, win):
            return self.decode_tile(lr, feats, mods, geo, crop, win)

        return self._tiled(run_tile, plan["decoder"], geo.out, "decoder", reference_sr)

    def decode_tile(self, lr, feats, mods, geo: Geometry, crop, win: Window) -> torch.Tensor:
        """SR branch on the LR `crop`, upsampler and bicubic skip on the HR window `win`
        -> [B, 3, rows, cols] in model space, unclamped."""
        (r0, r1), (c0, c1) = crop
        lr_c = lr[..., r0:r1, c0:c1]
        nearest = [axis_map(zn, n, "nearest", *ax) for zn, n, ax in zip(geo.latent, geo.lr, crop)]
        spans = [m.span for m in nearest]
        offset = (spans[0][0], spans[1][0])
        x = self._sr_branch(
            lr_c, [resize_window(cut(f, spans), nearest, offset) for f in feats], mods
        )
        out = self.upsample(x.float(), crop, geo, win)
        self._tick()
        return out + resize_crop(lr_c, geo.out, win.rows, win.cols, "bicubic", (r0, c0), geo.lr)

    def _sr_branch(self, lr: torch.Tensor, feats, mods) -> torch.Tensor:
        """head, then per level ScaleModulation(x, a_k, b_k, h_k) and FRU k (h_k at LR size)."""
        dec = self.decoder
        with self._autocast(lr):
            x = dec.head(lr)
            for fru, f, (a, b) in zip(self.frus, feats, mods):
                x = fru(dec.style(x, a, b, f.to(x.dtype)))
        return x

    def upsample(self, x: torch.Tensor, crop, geo: Geometry, win: Window) -> torch.Tensor:
        """The scale-aware upsampler on the HR window `win` from SR features of the LR `crop`.

        Same math as `ScaleAwareUpsampler.forward`, in blocks of output rows (memory bound): each
        level is resized (bilinear, on the scene's grid) to the block, and the 1x1 fusion MLP runs
        as matrix products, channels last, with the level gates folded into its first layer.
        When the output is exactly 4x or 2x the LR, the 8x level is only ever read through an
        exact 2:1 or 4:1 bilinear resize: it is computed directly at the output grid
        (`shuffle_resample`, 4x fewer FLOPs for that conv; same result).
        """
        ups = self.decoder.upsampler
        gates = ups.level_weights(geo.lr[0], geo.out[0], x)[0]  # [L]
        ratios = {8 * n / m for n, m in zip(geo.lr, geo.out)}
        fold = int(ratios.pop()) if len(ratios) == 1 and ratios & {2.0, 4.0} == ratios else 0
        levels, shifts = [x], [0]  # level features and log2 of their grid's scale
        with self._autocast(x):
            for i, up in enumerate(ups.UPNet_x2_list):
                if fold and i == len(ups.UPNet_x2_list) - 1:  # [B, nf, 8 h_c / fold, ...]
                    levels.append(shuffle_resample(up[0], levels[-1], fold))
                    shifts.append(shifts[-1] + 2 - fold.bit_length())  # - log2(fold) + 1
                else:
                    levels.append(up(levels[-1]))  # [B, nf, 2^l h_c, 2^l w_c]
                    shifts.append(shifts[-1] + 1)
        (r0, r1), cols = win.rows, win.cols
        out = torch.empty(x.shape[0], 3, r1 - r0, cols[1] - cols[0], device=x.device)
        step = max(1, self.resize_pixels // (cols[1] - cols[0]))
        for a in range(r0, r1, step):
            rows, resized = (a, min(a + step, r1)), []
            for feat, k in zip(levels, shifts):
                scaled = (geo.lr[0] << k, geo.lr[1] << k)
                offset = (crop[0][0] << k, crop[1][0] << k)
                r = resize_crop(feat.float(), geo.out, rows, cols, "bilinear", offset, scaled)
                resized.append(r.permute(0, 2, 3, 1))  # [B, rows, cols, nf], channels last
            fused = fuse_levels(ups.fuse, resized, gates, self.dtype, self.chunk_pixels)
            out[:, :, a - r0 : rows[1] - r0] = fused.permute(0, 3, 1, 2)
        return out

    def _latent_branch(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Decoder latent branch before the nearest resize: h_k [B, ch, *z] per level."""
        dec, out = self.decoder, []
        h = resnet_block(dec.mid.block_2, resnet_block(dec.mid.block_1, dec.conv_in(z)))
        for i in _levels(dec):
            for block in dec.up[i].block:
                h = resnet_block(block, h)
            out.append(dec.up[i].transfer(h).float())
        return out

    # -------------------------------------------------------------------------------- helpers
    def _tiled(self, run, tiles, size, stage: str, reference):
        """Blend `run(crop)` (or `run(crop, window)` for the decoder, which returns the window
        itself) over `tiles` into zero-initialised tensors of `size`. With several tiles and
        `stats_pixels`, `reference()` first records the stage's normalisation statistics."""
        shared = len(tiles) > 1 and self.stats_pixels > 0
        if shared:
            with self.stats[stage].collect():
                reference()
        totals = None
        with self.stats[stage].apply() if shared else contextlib.nullcontext():
            for crop, win in tiles:
                out = run(crop, win) if stage == "decoder" else run(crop)
                several = isinstance(out, list)
                parts = out if several else [out]
                if totals is None:
                    totals = [torch.zeros(*p.shape[:2], *size, device=p.device) for p in parts]
                for total, part in zip(totals, parts):
                    accumulate(total, part if stage == "decoder" else trim(part, crop, win), win)
                del out, parts
                if len(tiles) > 1:
                    release_memory()
        return totals if several else totals[0]

    def _run(self, net, *args):
        with self._autocast(args[0]):
            out = net(*args)
        self._tick()
        return out

    def _autocast(self, like: torch.Tensor):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(like.device.type, dtype=self.dtype)

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


def release_memory() -> None:
    """Return freed heap memory to the OS (glibc `malloc_trim`; a no-op elsewhere), so that the
    resident size of a long tiled run follows what is alive rather than its fragmented high-water
    marks."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def _levels(decoder) -> list[int]:
    """Decoder level indices in processing order (L-1 ... 0)."""
    return list(reversed(range(len(decoder.up))))
