"""Stage 2 of LDCSR: 4-step conditional latent diffusion on a frozen GAP autoencoder
(docs/method.md).

Training starts every sample at t = T-1 and unrolls the whole reverse chain with gradients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import contextmanager, nullcontext

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ldm.diffusion import GaussianDiffusion, draw_noise
from ldm.ema import LitEma
from models.autoencoder import save_validation_grid
from models.geometry import Geometry, check_output_size
from models.guard import NonFiniteLossGuard
from models.memory import peak_bytes
from models.pipeline import run
from models.uncertainty import sample_spread
from utils.checkpoint import load_weights
from utils.config import ConfigError, instantiate_from_config, to_plain
from utils.metrics import psnr, ssim


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model` (the authors' key prefix `model.diffusion_model.*`)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.diffusion_model = unet


def check_temperature(value: float) -> float:
    """`value` as a float if it is a valid `LDCSR.sampling_temperature`, else ValueError."""
    if not 0 <= float(value) <= 1:
        raise ValueError(
            f"must be in [0, 1] (1: the authors' sampler, 0.5: the demo's), got {value}"
        )
    return float(value)


def check_options(sampling_temperature: float, scale_by_std_input: str) -> None:
    """Raises ConfigError unless `sampling_temperature` is valid (`check_temperature`) and
    `scale_by_std_input` is "hr_hr" or "hr_lr"."""
    try:
        check_temperature(sampling_temperature)
    except ValueError as err:
        raise ConfigError(f"model.params.sampling_temperature: {err}") from None
    if scale_by_std_input not in ("hr_hr", "hr_lr"):
        raise ConfigError(
            f"scale_by_std_input must be 'hr_hr' (the authors') or 'hr_lr', "
            f"got {scale_by_std_input!r}"
        )


def frozen_first_stage(config: Mapping) -> tuple[nn.Module, str | None]:
    """The stage-1 `AutoencoderKL` of `config` (LDCSR's `first_stage_config`, `{target,
    params}`), in eval mode and without gradients, initialised from its `params.ckpt_path` when
    that is set (not None, "" or "???"; the loss's weights are not loaded) -> (the model, that
    path or None)."""
    params = dict(config.get("params") or {})
    ckpt = params.pop("ckpt_path", None)
    ckpt = None if ckpt in (None, "", "???") else ckpt
    model = instantiate_from_config({"target": config["target"], "params": params})
    if ckpt:
        load_weights(model, ckpt, ignore_prefixes=("loss.",))
    model.eval().requires_grad_(False)
    return model, ckpt


def latent_scale(first_stage: nn.Module, batch: Mapping, encoder_input: str) -> torch.Tensor:
    """The `scale_by_std` estimate 1 / std(z), a scalar tensor: z a posterior sample of the
    frozen `first_stage` on the dataset `batch` (hr [B, 3, H, W], lr [B, 3, h, w] in [0, 1]),
    encode(hr, hr) for `encoder_input` "hr_hr" (the authors') or encode(hr, lr) for "hr_lr".
    Under torch.distributed every rank gets rank 0's estimate."""
    hr, lr = batch["hr"] * 2 - 1, batch["lr"] * 2 - 1
    second = hr if encoder_input == "hr_hr" else lr  # bicubic_up(hr) is hr itself
    with torch.no_grad():
        z = first_stage.encode(hr, second).sample()
    std = z.flatten().std()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast(std, src=0)  # one scale_factor on every rank
    return 1.0 / std


class LDCSR(pl.LightningModule):
    """Frozen stage 1 + trainable condition encoder + UNet denoiser + DDPM chain + EMA.

    Public inference: `super_resolve(lr, out_size)`; `super_resolve_condition` decodes the
    condition alone (the authors' `sr_kd`).

    Args:
        first_stage_config: `{target, params}` of the stage-1 AutoencoderKL; its `ckpt_path` is
            required to *train* (checked at fit start), not to build or to load a stage-2
            checkpoint, which carries the stage-1 weights.
        cond_stage_config: `{target, params}` of the condition encoder (GAP encoder, in 3).
        unet_config: `{target, params}` of the UNet.
        timesteps, linear_start, linear_end: the schedule (T = 4, 0.1 -> 0.99, linear in sqrt).
        sampling_temperature: factor on the ancestral step noises when sampling in eval mode
            (inference and validation; training's unrolled chain always uses 1). 1 is the
            authors' sampler; below 1 (our option) trades generated detail for fidelity, 0
            keeps only x_T random.
        scale_by_std: set `scale_factor = 1 / std(z)` on the first batch of a fresh run, z a
            posterior sample of the frozen first stage.
        scale_by_std_input: the encoder inputs of that estimate. "hr_hr" (the authors'; the
            released `scale_factor` came from it): the HR image as both inputs, i.e.
            encode(hr, hr); "hr_lr" (our option): encode(hr, lr), the pair training encodes.
        scale_factor: initial latent scale (overwritten by `scale_by_std` or a checkpoint).
        l_kd_weight: weight of `mse(cond, x0)`, which pulls the condition towards the latent.
        ema_decay: EMA decay of the UNet weights (sampling uses the EMA weights).
        ckpt_path: optional stage-2 checkpoint to initialise from (fine-tuning).
        max_skipped_batches: stop after this many consecutive batches with a non-finite loss
            (each is skipped: no weight or EMA update).
    """

    def __init__(
        self,
        first_stage_config: Mapping,
        cond_stage_config: Mapping,
        unet_config: Mapping,
        timesteps: int = 4,
        linear_start: float = 0.1,
        linear_end: float = 0.99,
        sampling_temperature: float = 1.0,
        scale_by_std: bool = True,
        scale_factor: float = 1.0,
        scale_by_std_input: str = "hr_hr",
        l_kd_weight: float = 1.0,
        ema_decay: float = 0.9999,
        ckpt_path: str | None = None,
        max_skipped_batches: int = 20,
    ):
        super().__init__()
        first_stage_config, cond_stage_config, unet_config = map(
            to_plain, (first_stage_config, cond_stage_config, unet_config)
        )
        self.save_hyperparameters()
        # Names `first_stage_model`, `cond_stage_model`, `model.diffusion_model`, `model_ema`,
        # `scale_factor` and the schedule buffers are the authors' checkpoint keys.
        self.first_stage_model, self.first_stage_ckpt = frozen_first_stage(first_stage_config)
        self.cond_stage_model = instantiate_from_config(cond_stage_config)
        self.model = DiffusionWrapper(instantiate_from_config(unet_config))
        self.model_ema = LitEma(self.model, decay=ema_decay)
        self.diffusion = GaussianDiffusion(timesteps, linear_start, linear_end)
        check_options(sampling_temperature, scale_by_std_input)
        self.sampling_temperature = float(sampling_temperature)
        for name, buf in self.diffusion.named_buffers():  # persistent copies: authors' keys
            self.register_buffer(name, buf.clone())
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        self.scale_by_std = scale_by_std
        self.scale_by_std_input = scale_by_std_input
        self.l_kd_weight = l_kd_weight
        self.guard = NonFiniteLossGuard(max_skipped_batches)
        self._skip_ema = False
        self.learning_rate = 1.0e-5 * 8  # the paper's rate at batch 8; train.py sets the real one
        if ckpt_path:
            load_weights(self, ckpt_path)

    # ----------------------------------------------------------------------------- inference API
    @torch.no_grad()
    def super_resolve(
        self,
        lr: torch.Tensor,
        out_size: Sequence[int],
        generator: torch.Generator | None = None,
        use_ema: bool = True,
        window=None,
        **tiling,
    ) -> torch.Tensor:
        """LR batch [B, 3, h, w] in [0, 1] -> SR batch [B, 3, *out_size] in [0, 1] (float32).

        Runs the stages through `models.pipeline` (the networks' inference-mode forwards):
        untiled when the estimated activation memory (`models.memory.peak_bytes`) fits
        `max_memory` GB, else tiled with one noise field and shared normalisation statistics for
        the whole scene. `generator` (a CPU `torch.Generator`) makes the result identical on CPU
        and GPU, tiled or not.

        Args:
            lr: LR images in [0, 1].
            out_size: (H, W) of the output.
            generator: seeds x_T and the step noises.
            use_ema: sample with the EMA weights of the UNet (the paper's setting).
            window: a block of a larger scene (`models.tiling.OutputWindow`'s fields): `lr` is
                the scene's LR crop at `window.offset`, `out_size` the scene's output size, and
                the result the window rows x cols of the scene's output grid. The latent stages
                see the crop (at its share of `out_size`) with the scene's scale and height.
            **tiling: `max_memory` (GB; default "auto": 3/4 of the available memory; None =
                never tile), `tile` (LR pixels; None = automatic, 0 = untiled),
                `precision` ("fp32", "bf16", "fp16") and `progress`, as in
                `models.pipeline.run`.
        """
        check_output_size(self, out_size)
        # NCHW whatever the caller's layout (a PIL image's tensor is channels-last), so that the
        # result does not depend on it: the layout picks the convolutions' summation order.
        lr = lr.contiguous() * 2 - 1
        geo = Geometry.of(lr.shape[-2:], out_size, window)
        stages = lambda p: p.super_resolve(self, lr, geo, generator).add_(1).div_(2)  # noqa: E731
        with self.ema_scope(use_ema):
            return run(stages, peak_bytes(self, geo.lr, geo.out, lr.shape[0]), geo, lr, **tiling)

    @torch.no_grad()
    def super_resolve_condition(
        self, lr: torch.Tensor, out_size: Sequence[int], **tiling
    ) -> torch.Tensor:
        """The authors' `sr_kd`: the condition encoding decoded as if it were the sampled latent,
        [0, 1] in and out; through the same pipeline (`tiling` as in `super_resolve`)."""
        check_output_size(self, out_size)
        lr = lr.contiguous() * 2 - 1
        geo = Geometry.of(lr.shape[-2:], out_size)
        stages = lambda p: p.decode_condition(self, lr, geo).add_(1).div_(2)  # noqa: E731
        return run(stages, peak_bytes(self, geo.lr, geo.out, lr.shape[0]), geo, lr, **tiling)

    def super_resolve_samples(self, lr, out_size, seeds: Sequence[int], **options):
        """`super_resolve` once per seed -> (the sample of `seeds[0]` [B, 3, *out_size], the
        uncertainty map [B, 1, *out_size]: per-pixel std over the samples, mean over channels),
        both in [0, 1] (`models.uncertainty.sample_spread`); `options` as in `super_resolve`."""
        draw = lambda g: self.super_resolve(lr, out_size, generator=g, **options)  # noqa: E731
        return sample_spread(draw, seeds)

    @contextmanager
    def ema_scope(self, enabled: bool = True):
        """Temporarily swaps the EMA weights into the UNet."""
        with self.model_ema.average_parameters(self.model) if enabled else nullcontext():
            yield

    # ---------------------------------------------------------------------- inference stages
    def encode_condition(self, lr: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
        """lr [B, 3, h, w] in [-1, 1] -> condition c = CondEncoder(bicubic_up(lr, out_size)),
        [B, C, H/f, W/f] (f = 8 in the paper)."""
        lr_up = F.interpolate(lr, size=tuple(out_size), mode="bicubic", align_corners=False)
        return self.encode_upsampled(lr_up)

    def encode_upsampled(self, lr_up: torch.Tensor) -> torch.Tensor:
        """The condition encoder on bicubic_up(lr) or a crop of it: [B, 3, H, W] in [-1, 1] ->
        [B, C, H/f, W/f]."""
        return self.cond_stage_model(lr_up)

    def condition_stages(self) -> list:
        """`encode_upsampled` as a chain of stages (`GAPEncoder.stages`), which
        the pipeline streams by bands of rows when the scene is too large to encode whole."""
        return self.cond_stage_model.stages()

    @property
    def timesteps(self) -> int:
        """T, the number of sampling steps."""
        return self.diffusion.num_timesteps

    def draw_noise(self, shape, generator: torch.Generator | None = None):
        """x_T [*shape] and the T step noises [T, *shape] in the sampler's order
        (`ldm.diffusion.draw_noise`), on this model's device in float32."""
        betas = self.diffusion.betas
        return draw_noise(tuple(shape), self.timesteps, generator, betas.device, betas.dtype)

    def denoiser(self, scale: float, out_height: int, batch: int):
        """Returns `eps(x_t, cond, t)` for the UNet, with the scale (H / h of the scene) and
        output-height embeddings bound: x_t, cond [B, C, h_z, w_z], t [B] -> eps like x_t."""
        scale = torch.full((batch,), scale, device=self.device)
        out_height = torch.full((batch,), int(out_height), device=self.device)

        def denoise(x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.model.diffusion_model(torch.cat([x_t, cond], dim=1), t, scale, out_height)

        return denoise

    def denoiser_stages(self, scale: float, out_height: int, batch: int):
        """`denoiser` as a chain of stages: returns `stages(x_t, cond, t) -> (chain, x)`, the
        UNet's chain (`UNetModel.stages`, embeddings bound) and its input x, cat[x_t, cond]
        padded; the chain's output cropped to x_t's size is eps."""
        scale = torch.full((batch,), scale, device=self.device)
        out_height = torch.full((batch,), int(out_height), device=self.device)

        def stages(x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor):
            x = torch.cat([x_t, cond], dim=1)
            return self.model.diffusion_model.stages(x, t, scale, out_height)

        return stages

    def sample(self, denoise, x_T: torch.Tensor, cond, noises=None, generator=None):
        """The T-step reverse chain from x_T [B, C, h_z, w_z] with `denoise(x_t, cond, t)` ->
        z0 [B, C, h_z, w_z] (scaled latent space); differentiable. In eval mode the step
        noises are scaled by `sampling_temperature` (drawn as usual, so the generator's
        stream and x_T do not depend on it)."""
        temperature = 1.0 if self.training else self.sampling_temperature
        return self.diffusion.sample(
            denoise, x_T, cond, noises, generator, cond.shape, temperature=temperature
        )

    def sample_latent(self, lr, out_size, generator=None, x_T=None, noises=None, cond=None):
        """Runs the T-step chain for `lr` [B, 3, h, w] in [-1, 1] -> z0 (scaled latent space)."""
        geo = Geometry.of(lr.shape[-2:], out_size)
        cond = self.encode_condition(lr, geo.out) if cond is None else cond
        denoise = self.denoiser(geo.scale, geo.out[0], lr.shape[0])
        return self.sample(denoise, x_T, cond, noises, generator)

    def unscale(self, z0: torch.Tensor) -> torch.Tensor:
        """Scaled latent z0 -> the first stage's latent z0 / scale_factor."""
        return z0 / self.scale_factor

    def decode_latent(self, z0: torch.Tensor, lr: torch.Tensor, out_size) -> torch.Tensor:
        """Scaled latent -> image in [-1, 1] (clamped), via the frozen stage-1 decoder."""
        return self.first_stage_model.decode(self.unscale(z0), lr, out_size).clamp(-1, 1)

    def min_output_side(self) -> int:
        """Smallest output side: that of a 2-px condition (`GAPEncoder.min_input_side`)."""
        return self.cond_stage_model.min_input_side()

    # ------------------------------------------------------------------------------- training
    def on_fit_start(self) -> None:
        if self.first_stage_ckpt is None and self.trainer.ckpt_path is None:
            raise ConfigError(
                "stage 2 needs the stage-1 weights: set "
                "model.params.first_stage_config.params.ckpt_path=<stage-1 checkpoint>"
            )

    def on_train_batch_start(self, batch: Mapping, batch_idx: int) -> None:
        """`scale_by_std` on the first batch of a fresh run: `scale_factor = 1 / std(z)`
        (`latent_scale`)."""
        resumed = self._trainer is not None and self.trainer.ckpt_path is not None
        if not (self.scale_by_std and self.global_step == 0 and not resumed and batch_idx == 0):
            return
        scale = latent_scale(self.first_stage_model, batch, self.scale_by_std_input)
        self.scale_factor.copy_(scale)
        if self._trainer is not None:
            self.log("train/scale_factor", self.scale_factor, rank_zero_only=True)

    def training_losses(self, batch: Mapping) -> dict[str, torch.Tensor]:
        """Unrolled-chain loss: mse(chain(x_T), x0) + l_kd_weight * mse(cond, x0)."""
        hr, lr = batch["hr"] * 2 - 1, batch["lr"] * 2 - 1
        out_size = hr.shape[-2:]
        with torch.no_grad():
            x0 = self.scale_factor * self.first_stage_model.encode(hr, lr).sample()
        cond = self.encode_condition(lr, out_size)
        t_start = self.timesteps - 1
        x_T = self.diffusion.q_sample(x0, t_start, torch.randn_like(x0))
        x0_pred = self.sample_latent(lr, out_size, x_T=x_T, cond=cond)
        # Per-sample mean over C, H, W, divided by exp(logvar_t) = 1 plus logvar_t = 0 (fixed).
        loss_simple = (x0_pred - x0).pow(2).mean(dim=(1, 2, 3)).mean()
        loss_kd = F.mse_loss(cond, x0)
        loss = loss_simple + self.l_kd_weight * loss_kd
        return {"loss": loss, "loss_simple": loss_simple, "loss_kd": loss_kd}

    def training_step(self, batch: Mapping, batch_idx: int) -> torch.Tensor | None:
        losses = self.training_losses(batch)
        self._skip_ema = not self.guard.ok(self, self._trainer, losses["loss"])
        if self._skip_ema:
            return None  # Lightning skips backward and the optimiser step
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True)
        self.log("train/scale", float(batch["scale"][0]))
        return losses["loss"]

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if not self._skip_ema:  # skipped batches leave the EMA untouched too
            self.model_ema(self.model)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["nonfinite_guard"] = self.guard.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "nonfinite_guard" in checkpoint:
            self.guard.load_state_dict(checkpoint["nonfinite_guard"])

    def validation_step(self, batch: Mapping, batch_idx: int) -> None:
        hr = batch["hr"]
        sr = self.super_resolve(batch["lr"], hr.shape[-2:])
        border = math.ceil(float(batch["scale"][0]))
        n = hr.shape[0]
        self.log("val/psnr", float(psnr(sr, hr, border).mean()), sync_dist=True, batch_size=n)
        self.log("val/ssim", float(ssim(sr, hr, border).mean()), sync_dist=True, batch_size=n)
        if batch_idx == 0:
            save_validation_grid(self, batch["lr"], sr, hr, self.global_step)

    def configure_optimizers(self):
        params = [*self.model.parameters(), *self.cond_stage_model.parameters()]
        return torch.optim.AdamW(params, lr=self.learning_rate)

    def train(self, mode: bool = True):
        """Keeps the frozen first stage in eval mode whatever Lightning asks."""
        super().train(mode)
        self.first_stage_model.eval()
        return self
