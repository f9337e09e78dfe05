"""The one inference pipeline of LDCSR and its autoencoder (docs/method.md, "Tiled inference"):
condition encoding, sampling, latent features, SR branch, render; untiled is every stage whole
and the output rendered in one call. `LDCSR.super_resolve`, `super_resolve_condition` and
`AutoencoderKL.reconstruct` all run through `run`.

`Pipeline` only orchestrates, calling the public stage methods of the model it is given
(`LDCSR`: `encode_upsampled`, `condition_stages`, `draw_noise`, `denoiser`, `denoiser_stages`,
`sample`, `unscale`; its `first_stage_model`, an `AutoencoderKL`: `build_encoder_input`,
`encode_mode`, `encode_mode_stages`, `latent_features`, `latent_stages`, `sr_branch`,
`sr_stages`, `render`), and sizes its plan with the estimates of `models.memory`.

The stages with scene-wide statistics (GroupNorm, IMD channel attention: the condition encoder
or stage 1's encoder, the UNet at every sampling step, the decoder's latent branch and its SR
branch) run whole where their estimate (`stage_bytes`) fits the memory budget; otherwise they
stream by bands of rows with the untiled run's statistics, exactly (`models.stream`). The
output is rendered from the SR features in non-overlapping windows of `tile` LR pixels (by
default as large as the budget allows), each read with `RENDER_CONTEXT` LR pixels around it.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from tqdm import tqdm

from models.geometry import Geometry
from models.memory import (
    memory_budget,
    output_bytes,
    release_memory,
    render_bytes,
    retained_heap,
    stage_bytes,
)
from models.scene_stats import SceneStatistics
from models.stream import Nearest, Rows, Store, stream_chain
from models.tiling import MIN_TILE, check_tile, decoder_tiles, place
from utils.resample import cut, resize_crop

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
    precision: str = "fp32",
    progress: bool = False,
) -> torch.Tensor:
    """`stages(pipeline)` on the `Pipeline` that the memory budget calls for, under
    `torch.inference_mode()` and autocast `precision`; returns the result in float32.

    Untiled (every stage whole, one render call) when the untiled run's `peak_bytes` fits the
    budget or `tile` is 0; else each stage with scene-wide statistics runs whole where it fits
    the budget and streams by bands (exact statistics) where not, and the output is rendered in
    tiles of `tile` LR pixels. Tiled or not, the result is the untiled run's (up to float
    rounding).

    Args:
        stages: `stages(pipeline) -> tensor`, e.g. `lambda p: p.super_resolve(model, lr, geo)`.
        peak_bytes: the estimate of the untiled run's activation memory
            (`models.memory.peak_bytes`).
        geo: the scene's geometry.
        like: a tensor on the device and of the dtype of the computation.
        max_memory: memory budget in GB (None: unbounded, never tile automatically; "auto":
            `MEMORY_MARGIN` of the memory available now, `memory_budget`).
        tile: render tile in LR pixels; None = automatic (untiled when the run fits, else as
            large as the budget allows), 0 = untiled.
        precision: autocast precision.
        progress: show a progress bar over stages and tiles.
    """
    budget = memory_budget(max_memory, like.device)
    limit = None if budget is None else int(budget * 2**30)
    if tile is None and (limit is None or peak_bytes <= limit):
        tile = 0
    if tile is not None:
        check_tile(tile)
    bound = "unbounded" if budget is None else f"{budget:.2f} GB"
    plan = "untiled" if tile == 0 else f"render tile {tile or 'auto'}"
    log.info("memory budget %s (%s): %s", bound, max_memory, plan)
    pipeline = Pipeline(tile, progress=progress, budget=None if tile == 0 else limit)
    # Tiles return freed memory to the OS between them (`release_memory`): a heap kept across a
    # large scene's stages fragments (peak RSS 3.2 -> 4.0 GB, measured). Where the untiled run
    # fits the budget, freed memory is reused rather than mapped afresh.
    pipeline.keep_heap = limit is None or peak_bytes <= limit
    with autocast(precision, like), torch.inference_mode():
        with retained_heap(like.device) if pipeline.keep_heap else contextlib.nullcontext():
            return stages(pipeline).float()


class Pipeline:
    """Super-resolution (LDCSR, and its condition decoded alone: `sr_kd`) or reconstruction
    (stage 1) of whole scenes, each stage whole or streamed by bands, rendered by tiles.

    Args:
        tile: render tile in LR pixels (>= `MIN_TILE`); 0 = the whole output in one call;
            None = as large as `budget` allows (`render_tile`).
        progress: show a progress bar over stages and tiles.
        budget: bytes of activations a stage may use: a stage of `STAGES` runs whole when its
            estimate (`models.memory.stage_bytes`) fits next to the output, else it streams by
            bands (`models.stream`) with spills to files over a quarter of it. None: every
            stage whole.
    """

    def __init__(self, tile: int | None = 0, progress: bool = False, budget: int | None = None):
        if tile is not None:
            check_tile(tile)
        self.tile, self.progress, self.budget = tile, progress, budget
        # The streamed stages' maps: in memory up to a quarter of the budget together.
        self.store = None if budget is None else Store(budget // 4)
        self.keep_heap = False  # set by `run`: keep freed memory in the heap between tiles
        self.bar = tqdm(disable=True)  # stages and tiles done (`progress_bar`)

    # --------------------------------------------------------------------------------- entries
    def super_resolve(self, model, lr: torch.Tensor, geo: Geometry, generator=None):
        """LDCSR sampling: lr [B, 3, *geo.lr] in [-1, 1] -> [B, 3, *geo.target] in [-1, 1]
        (clamped). Call it under `model.ema_scope()`; `generator` (CPU) seeds x_T and the step
        noises."""
        ae, batch = model.first_stage_model, lr.shape[0]
        whole, tiles = self.whole_stages(model, geo, batch), self.render_tiles(ae, geo, batch)
        with torch.inference_mode(), self.progress_bar(3 + model.timesteps + len(tiles)):
            cond = self.condition(model, lr, geo, whole)  # [B, C, out / downsampling]
            x_T, noises = model.draw_noise(cond.shape, generator)
            z0 = model.sample(self.denoiser(model, geo, batch, whole), x_T, cond, noises)
            return self.decode(ae, model.unscale(z0), lr, geo, whole, tiles).clamp_(-1, 1)

    def decode_condition(self, model, lr: torch.Tensor, geo: Geometry) -> torch.Tensor:
        """The authors' `sr_kd`: the condition encoding decoded as the latent, lr [B, 3, *geo.lr]
        in [-1, 1] -> [B, 3, *geo.out] in [-1, 1] (clamped)."""
        ae, batch = model.first_stage_model, lr.shape[0]
        whole, tiles = self.whole_stages(model, geo, batch), self.render_tiles(ae, geo, batch)
        with torch.inference_mode(), self.progress_bar(3 + len(tiles)):
            cond = self.condition(model, lr, geo, whole)
            return self.decode(ae, model.unscale(cond), lr, geo, whole, tiles).clamp_(-1, 1)

    def reconstruct(self, autoencoder, lr, hr, geo: Geometry) -> torch.Tensor:
        """Stage 1: decode(mode(encode(hr, lr)), lr, hr size), [-1, 1] in, [-1, 1] out
        (clamped)."""
        whole = self.whole_stages(autoencoder, geo, lr.shape[0])
        tiles = self.render_tiles(autoencoder, geo, lr.shape[0])
        with torch.inference_mode(), self.progress_bar(3 + len(tiles)):
            z = None
            if autoencoder.use_latent:

                def rows(r0, r1):
                    cols = (0, geo.out[1])
                    lr_up = resize_crop(lr, geo.out, (r0, r1), cols, "bicubic")
                    return autoencoder.build_encoder_input(cut(hr, ((r0, r1), cols)), lr_up)

                chain = autoencoder.encode_mode_stages()
                z = self.encode(autoencoder, autoencoder.encode_mode, rows, geo, whole, chain)
            return self.decode(autoencoder, z, lr, geo, whole, tiles).clamp_(-1, 1)

    # ------------------------------------------------------------------------------------ plan
    def whole_stages(self, model, geo: Geometry, batch: int) -> frozenset[str]:
        """The `STAGES` whose whole-scene run (`models.memory.stage_bytes`) fits `budget` next
        to the output maps (`output_bytes`); all of them when unbounded."""
        if self.budget is None:
            return frozenset(STAGES)
        held = output_bytes(geo.target, batch)
        stages = stage_bytes(model, geo.lr, geo.out, batch)
        return frozenset(k for k, v in stages.items() if v + held <= self.budget)

    def render_tiles(self, autoencoder, geo: Geometry, batch: int) -> list:
        """Render tiles as (LR crop, HR window): windows of `tile` LR pixels (`render_tile` when
        None) that do not overlap, each crop holding `RENDER_CONTEXT` LR pixels around its
        window (the upsampler's receptive field); one tile: the whole output."""
        step = self.render_tile(autoencoder, geo, batch) if self.tile is None else self.tile
        step = step or max(geo.lr)
        axes = [[(a, min(a + step, n)) for a in range(0, n, step)] for n in geo.lr]
        return decoder_tiles(geo, axes, RENDER_CONTEXT)

    def render_tile(self, autoencoder, geo: Geometry, batch: int) -> int:
        """The largest square render tile (LR pixels; 0 = the whole output) whose rendering
        (`render_bytes`, with its context) fits half the budget next to the output maps."""
        if self.budget is None:
            return 0
        room = self.budget // 2 - output_bytes(geo.target, batch)
        # The estimate is affine in the pixels (fixed chunk buffers): its slope from two sides.
        sides = [geo.scale * n for n in (64, 128)]
        small, large = (render_bytes(autoencoder, (n, n), (s, s), batch) for n, s in
                        zip((64, 128), sides))  # fmt: skip
        per_pixel = (large - small) / (128**2 - 64**2)
        fixed = small - per_pixel * 64**2
        side = int(max(0, (room - fixed) / per_pixel) ** 0.5) - 2 * RENDER_CONTEXT
        return 0 if side >= max(geo.lr) else max(MIN_TILE, side)

    # --------------------------------------------------------------------------------- stages
    def condition(self, model, lr: torch.Tensor, geo: Geometry, whole) -> torch.Tensor:
        """The stage-2 condition `encode_upsampled(bicubic_up(lr))` -> [B, C, *latent]."""
        rows = lambda r0, r1: resize_crop(lr, geo.out, (r0, r1), (0, geo.out[1]), "bicubic")  # noqa: E731
        chain = model.condition_stages()
        return self.encode(model, model.encode_upsampled, rows, geo, whole, chain)

    def encode(self, model, encoder, rows, geo: Geometry, whole, chain) -> torch.Tensor:
        """`encoder` (`model`'s condition encoder, or its posterior mode) on its input, whose
        rows [r0, r1) are `rows(r0, r1)` -> [B, C, *latent]: whole, or over the budget its
        `chain` streamed by bands of the input computed band by band."""
        if "condition" in whole:
            out = encoder(rows(0, geo.out[0]))  # [B, C, *latent]
        else:
            first = rows(0, 1)
            source = Rows((*first.shape[:2], geo.out[0], first.shape[-1]), rows)
            out = self.whole(self.stream(model, chain, [source])[0])
        self.done()
        return out

    def denoiser(self, model, geo: Geometry, batch: int, whole):
        """`eps(x_t, cond, t)` with the scene's scale and height: the model's `denoiser`, or
        over the budget its UNet streamed by bands (exact statistics; attention whole)."""
        if "unet" in whole:
            denoise = model.denoiser(geo.scale, geo.scene_out[0], batch)
        else:
            stages = model.denoiser_stages(geo.scale, geo.scene_out[0], batch)

            def denoise(x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                chain, x = stages(x_t, cond, t)
                eps = self.whole(self.stream(model, chain, [x])[0])
                return eps[..., : x_t.shape[-2], : x_t.shape[-1]]

        def counted(x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            eps = denoise(x_t, cond, t)
            self.done()
            return eps

        return counted

    def decode(self, autoencoder, z, lr, geo: Geometry, whole, tiles) -> torch.Tensor:
        """Latent [B, embed, *latent] (None without latent) -> [B, 3, *target] in model space,
        unclamped: the latent features, the SR branch (each whole or streamed), the render."""
        feats = None
        if z is not None and "latent" in whole:
            feats = autoencoder.latent_features(z)  # h_k [B, ch, *latent]
        elif z is not None:
            *feats, h = self.stream(autoencoder, autoencoder.latent_stages(), [z])
            self.store.close(h)
        self.done()
        if "sr" in whole:
            near = None
            if feats is not None:  # h_k resized (nearest, `latent_resize`) to the LR size
                mode = autoencoder.latent_resize
                near = [Nearest(f, geo.lr, mode).read(0, geo.lr[0]) for f in feats]
            x = autoencoder.sr_branch(lr, near, geo.scale)  # [B, ch, h, w], channels last
        else:  # h_k held in the store (counted against its limit) and read band by band
            feats = None if feats is None else [self.keep(f) for f in feats]
            mode = autoencoder.latent_resize
            maps = [] if feats is None else [Nearest(f, geo.lr, mode) for f in feats[::-1]]
            chain = autoencoder.sr_stages(geo.scale, feats is not None)
            x = self.stream(autoencoder, chain, [*maps, lr])[0]
            for f in feats or []:
                self.store.close(f)
        del feats
        self.done()
        out = self.render(autoencoder, lr, x, geo, tiles)
        if not torch.is_tensor(x):
            self.store.close(x)
        return out

    def render(self, autoencoder, lr, x, geo: Geometry, tiles) -> torch.Tensor:
        """`render` of the SR features x (a tensor or a `Spill`) on `tiles` -> [B, 3, *target];
        a tile's crop holds its window's receptive field."""
        if len(tiles) == 1:  # the whole output, or a block's window, in one call
            x = x if torch.is_tensor(x) else x.whole()
            out = autoencoder.render(x, lr, geo.scene_out, geo.window)
            self.done()
            return out
        total = None
        for crop, win in tiles:
            (r0, r1), (c0, c1) = crop
            window = geo.output_window((r0, c0), win.rows, win.cols)
            rows = x[..., r0:r1, :] if torch.is_tensor(x) else x.read(r0, r1)
            x_c = rows[..., c0:c1].contiguous(memory_format=torch.channels_last)
            out = autoencoder.render(x_c, lr[..., r0:r1, c0:c1], window.out_size, window)
            if total is None:
                total = out.new_empty(*out.shape[:2], *geo.target, dtype=torch.float32)
            place(total, out, win)
            del out, x_c, rows
            self.done()
        return total

    # -------------------------------------------------------------------------------- helpers
    def stream(self, model, chain, maps) -> list:
        """`chain` on `maps` streamed by bands (`models.stream.stream_chain`) with the exact
        statistics of `model`'s normalisation layers: bands of ~1/8 of the budget, spills
        in memory up to 1/4 of it (`self.store`, shared by the stages of the run) -> the final
        stack (`Spill`s)."""
        stats = SceneStatistics([model])
        return stream_chain(chain, maps, stats, self.budget // 8, self.store)

    def whole(self, spill) -> torch.Tensor:
        """A streamed stage's output spill as a tensor; the spill is released."""
        out = spill.whole()
        self.store.close(spill)
        return out

    def keep(self, t):
        """A whole stage's output as a spill of the store (a streamed stage's already is)."""
        return self.store.keep(t) if torch.is_tensor(t) else t

    def done(self) -> None:
        """A stage or tile is done: count it and, unless the run keeps its heap, return the
        freed memory to the OS (a heap kept across stages fragments and grows the peak)."""
        self.bar.update()
        if not self.keep_heap:
            release_memory()

    @contextlib.contextmanager
    def progress_bar(self, total: int):
        """`self.bar` counts `total` stages and tiles (shown with `progress`) inside the block."""
        self.bar = tqdm(total=total, desc="tiles", unit="tile", disable=not self.progress)
        try:
            yield
        finally:
            self.bar.close()
            self.bar = tqdm(disable=True)
