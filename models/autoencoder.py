"""Stage 1 of LDCSR: the GAP KL-autoencoder trained with L1 + LPIPS + KL + PatchGAN
(docs/method.md, "Stage 1 loss").

Manual optimisation alternates the autoencoder and discriminator Adam optimisers on every batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_only
from torch import nn
from torchvision.utils import save_image

from ldm.chain import Stage
from ldm.distributions import DiagonalGaussianDistribution
from models.geometry import Geometry, check_output_size
from models.guard import NonFiniteLossGuard
from models.memory import peak_bytes
from models.pipeline import run
from utils.checkpoint import load_weights
from utils.config import instantiate_from_config, to_plain
from utils.metrics import psnr
from utils.weights import build_lpips

log = logging.getLogger(__name__)


class AutoencoderKL(pl.LightningModule):
    """GAP KL-autoencoder: `encode(hr, lr)` -> posterior, `decode(z, lr, out_size)` -> HR.

    All images are in model space [-1, 1]. What `disc_start` (in the loss config) counts is
    `disc_start_counts` (docs/method.md, "When the GAN starts").

    Args:
        encoder_config: `{target, params}` of the GAP encoder (in_channels 6, double_z True).
        decoder_config: `{target, params}` of the GAP decoder.
        embed_dim: latent channels after `quant_conv`.
        lossconfig: `{target, params}` of the training loss; None builds an inference-only model
            that downloads nothing.
        ckpt_path: optional checkpoint (ours or the authors') to initialise from.
        ignore_keys: state-dict key prefixes to drop when loading `ckpt_path`.
        monitor: metric name for checkpointing (read by train.py).
        learn_logvar: our option: optimise the loss's scalar log-variance with the autoencoder.
            False (the authors'): latent-diffusion registers it as a parameter but puts it in no
            optimiser, so it stays at `logvar_init` (0) and nll = rec.
        shared_disc_forward: our option: the discriminator step reuses the generator step's
            reconstruction (one forward pass less per batch). False (the authors'): it runs a
            new forward, with a new posterior sample, through the autoencoder just updated.
        val_sample_posterior: decode a posterior sample in validation (the authors'); False
            decodes the posterior mean (deterministic validation metrics).
        max_skipped_batches: stop after this many consecutive batches with a non-finite loss
            (each is skipped without touching the weights).
        encoder_input: ablation switch. "hr_lr" (paper): the encoder sees cat[bicubic_up(LR), HR]
            (in_channels 6); "hr": HR only (in_channels 3).
        disc_start_counts: what `disc_start` is compared with (`loss_step`): "batches"
            (Lightning <= 1.5's `global_step`) or "optimizer_steps" (>= 1.6's: two per batch).
        posterior_logvar_init: our option (initialisation only): the bias of `quant_conv`'s
            log-variance half, e.g. -10 (posterior std ~0.007 at the start). None (the authors'):
            PyTorch's default, log-variance ~0: the training latent starts as unit noise around a
            mean of ~0.1 and, with a KL weight of 1e-6, stays about that noisy for thousands of
            steps (docs/results.md, "Does the demo's decoder use its latent?").

    The SR-only baseline (no latent at all) is `encoder_config: null` with the decoder's
    `use_latent: false`: the decoder is then trained as a plain continuous-scale SR network.

    `learning_rate` is set by train.py from `model.base_learning_rate` (training/trainer.py).
    """

    def __init__(
        self,
        encoder_config: Mapping,
        decoder_config: Mapping,
        embed_dim: int,
        lossconfig: Mapping | None = None,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        monitor: str | None = None,
        learn_logvar: bool = False,
        max_skipped_batches: int = 20,
        encoder_input: str = "hr_lr",
        shared_disc_forward: bool = False,
        val_sample_posterior: bool = True,
        disc_start_counts: str = "batches",
        posterior_logvar_init: float | None = None,
    ):
        super().__init__()
        encoder_config, decoder_config = to_plain(encoder_config), to_plain(decoder_config)
        lossconfig, ignore_keys = to_plain(lossconfig), list(to_plain(ignore_keys))
        self.save_hyperparameters()
        self.automatic_optimization = False
        # Attribute names are the authors' (checkpoint keys `encoder.*`, `quant_conv.*`, ...).
        self.encoder_input, self.disc_start_counts = encoder_input, disc_start_counts
        self.decoder = instantiate_from_config(decoder_config)
        self.use_latent = encoder_config is not None
        if self.use_latent != self.decoder.use_latent:
            raise ValueError(
                "the SR-only baseline needs both encoder_config: null and the decoder's "
                "use_latent: false (or neither)"
            )
        if self.use_latent:
            self.encoder = instantiate_from_config(encoder_config)
            z_channels = decoder_config["params"]["z_channels"]
            self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
            self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
            if posterior_logvar_init is not None:
                nn.init.constant_(self.quant_conv.bias[embed_dim:], posterior_logvar_init)
        # The loss's LPIPS(VGG), with the weight-file handling of utils.weights (not in ldm/)
        vgg_lpips = partial(build_lpips, "vgg")
        self.loss = (
            instantiate_from_config(lossconfig, build_perceptual=vgg_lpips) if lossconfig else None
        )
        self.monitor = monitor
        self.shared_disc_forward = shared_disc_forward
        self.val_sample_posterior = val_sample_posterior
        self.learning_rate = 4.5e-6 * 4  # the paper's rate at batch 4, one device
        self.batches_seen = 0  # drives disc_start; saved in the checkpoint
        self.guard = NonFiniteLossGuard(max_skipped_batches)
        check_options(self)
        self.register_load_state_dict_pre_hook(drop_authors_unused)
        if ckpt_path:
            ignore = tuple(ignore_keys) + (() if self.loss is not None else ("loss.",))
            load_weights(self, ckpt_path, ignore_prefixes=ignore)

    def authors_unused_keys(self) -> list[str]:
        """State-dict keys that the authors' module of this ablation holds but never reads (not
        built here; dropped by name on loading, `drop_authors_unused`): the decoder's and, for
        the SR-only baseline, `encoder.conv_out`, `quant_conv`, `post_quant_conv`."""
        convs = () if self.use_latent else ("encoder.conv_out", "quant_conv", "post_quant_conv")
        keys = [f"decoder.{k}" for k in self.decoder.authors_unused_keys()]
        return keys + [f"{conv}.{p}" for conv in convs for p in ("weight", "bias")]

    # ----------------------------------------------------------------------------- inference API
    @torch.no_grad()
    def reconstruct(self, lr: torch.Tensor, hr: torch.Tensor, **tiling) -> torch.Tensor:
        """Stage-1 reconstruction `decode(mode(encode(hr, lr)), lr, hr size)`: LR [B, 3, h, w]
        and HR [B, 3, H, W] in [0, 1] -> [B, 3, H, W] in [0, 1], through `models.pipeline`.

        `tiling`: `max_memory`, `tile`, `precision`, `progress` as in
        `models.pipeline.run` (tiled when the estimated memory exceeds `max_memory` GB).
        """
        check_output_size(self, hr.shape[-2:])
        lr, hr = lr.contiguous() * 2 - 1, hr.contiguous() * 2 - 1  # NCHW: see LDCSR.super_resolve
        geo = Geometry.of(lr.shape[-2:], hr.shape[-2:])
        stages = lambda p: p.reconstruct(self, lr, hr, geo).add_(1).div_(2)  # noqa: E731
        return run(stages, peak_bytes(self, geo.lr, geo.out, lr.shape[0]), geo, lr, **tiling)

    def encode(self, hr: torch.Tensor, lr: torch.Tensor) -> DiagonalGaussianDistribution:
        """hr: [B, 3, H, W], lr: [B, 3, h, w] in [-1, 1] -> posterior over [B, embed, H/f, W/f]
        (f: the encoder's `downsampling()`, 8 in the paper)."""
        lr_up = F.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False)
        return self.posterior(self.build_encoder_input(hr, lr_up))

    def decode(self, z: torch.Tensor, lr: torch.Tensor, out_size: Sequence[int], window=None):
        """z: [B, embed, h_z, w_z], lr: [B, 3, h, w] in [-1, 1] -> [B, 3, *out_size], unclamped
        (with `window`, a block's window of a larger scene: see `GAPDecoder.forward`)."""
        return self.decoder(self.post_quant_conv(z), lr, out_size, window)

    # ---------------------------------------------------------------------- inference stages
    def build_encoder_input(self, hr: torch.Tensor, lr_up: torch.Tensor) -> torch.Tensor:
        """The encoder's input from HR and bicubic_up(LR) (same size): cat[lr_up, hr] or hr."""
        return hr if self.encoder_input == "hr" else torch.cat([lr_up, hr], dim=1)  # LR first

    def posterior(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Encoder input [B, C, H, W] -> posterior over [B, embed, H/f, W/f]."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def encode_mode(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder input [B, C, H, W] -> the posterior's mode [B, embed, H/f, W/f]."""
        return self.posterior(x).mode()

    def encode_mode_stages(self) -> list[Stage]:
        """`encode_mode` as a chain of stages (`GAPEncoder.stages`, then the 1x1 `quant_conv`
        and the mode), which the pipeline streams by bands of rows."""
        mode = lambda h: DiagonalGaussianDistribution(self.quant_conv(h)).mode()  # noqa: E731
        return [*self.encoder.stages(), Stage(mode)]

    def latent_features(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Latent [B, embed, h_z, w_z] -> the decoder's h_k [B, ch, h_z, w_z] per level
        (`post_quant_conv`, then `GAPDecoder.latent_features`)."""
        return self.decoder.latent_features(self.post_quant_conv(z))

    @property
    def latent_resize(self) -> str:
        """`F.interpolate` mode of the decoder's resize of h_k to the LR size
        (`GAPDecoder.latent_resize`)."""
        return self.decoder.latent_resize

    def latent_stages(self) -> list[Stage]:
        """`latent_features` as a chain of stages (`ldm.chain`): the 1x1 `post_quant_conv`, then
        `GAPDecoder.latent_stages` (z -> [h_0, .., h_k, h]; the last map is not a feature)."""
        return [Stage(self.post_quant_conv), *self.decoder.latent_stages()]

    def sr_stages(self, scale: float, with_latent: bool = True) -> list[Stage]:
        """`sr_branch` as a chain of stages (`GAPDecoder.sr_stages`) on the stack
        [h_{L-1}, .., h_0, lr] ([lr] without latent) -> [features]."""
        return self.decoder.sr_stages(scale, with_latent)

    def sr_branch(self, lr: torch.Tensor, feats, scale: float) -> torch.Tensor:
        """The decoder's SR branch (`GAPDecoder.sr_branch`): lr [B, 3, h, w] in [-1, 1], h_k
        [B, ch, h, w] (at the LR size; None without latent), scale H / h of the scene ->
        features [B, ch, h, w]."""
        return self.decoder.sr_branch(lr, feats, scale)

    def render(self, x: torch.Tensor, lr: torch.Tensor, out_size, window=None) -> torch.Tensor:
        """The decoder's output (`GAPDecoder.render`): SR features [B, ch, h, w] and lr
        [B, 3, h, w] -> [B, 3, *out_size] in model space, unclamped (with `window`, a tile's
        output window of the scene's grid)."""
        return self.decoder.render(x, lr, out_size, window)

    def min_output_side(self) -> int:
        """Smallest output side: that of a 2-px latent (`GAPEncoder.min_input_side`); 1 for the
        SR-only baseline."""
        return self.encoder.min_input_side() if self.use_latent else 1

    def forward(self, hr: torch.Tensor, lr: torch.Tensor, sample_posterior: bool = True):
        if not self.use_latent:  # SR-only baseline: a zero-KL stand-in posterior
            posterior = DiagonalGaussianDistribution(hr.new_zeros(hr.shape[0], 2, 1, 1), True)
            return self.decoder(None, lr, hr.shape[-2:]), posterior
        posterior = self.encode(hr, lr)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z, lr, hr.shape[-2:]), posterior

    def get_last_layer(self) -> torch.Tensor:
        return self.decoder.last_layer

    @staticmethod
    def get_input(batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        """Dataset batch in [0, 1] -> (hr, lr) in [-1, 1]."""
        return batch["hr"] * 2 - 1, batch["lr"] * 2 - 1

    # ------------------------------------------------------------------------------- training
    def training_step(self, batch: Mapping, batch_idx: int) -> None:
        """One batch: the autoencoder (generator) step, then the discriminator step.

        As in the authors' two-optimiser Lightning 1.x loop, the discriminator step runs a new
        forward (a new posterior sample) through the autoencoder just updated, unless
        `shared_disc_forward`. A non-finite generator loss skips the whole batch.
        """
        opt_ae, opt_disc = self.optimizers()
        hr, lr = self.get_input(batch)
        rec, posterior = self(hr, lr)
        ae_loss, log_ae, stepped = self._optimizer_step(opt_ae, 0, hr, rec, posterior)
        if not stepped:
            return
        if not self.shared_disc_forward:
            with torch.no_grad():  # the step only needs D's gradients
                rec, posterior = self(hr, lr)
        disc_loss, log_disc, _ = self._optimizer_step(opt_disc, 1, hr, rec.detach(), posterior)
        self.batches_seen += 1
        self.log("train/aeloss", ae_loss, prog_bar=True)
        self.log("train/discloss", disc_loss, prog_bar=True)
        self.log("train/scale", float(batch["scale"][0]))
        self.log_dict({**log_ae, **log_disc})

    def on_train_start(self) -> None:
        """The whole module in train mode, as Lightning 1.x (the authors') set it when training
        started; 2.x keeps each submodule's mode, which would leave LPIPS as built. In train mode
        the dropout in front of the LPIPS heads is active, unless the loss's `lpips_eval_mode`."""
        self.train()

    def _optimizer_step(self, opt, optimizer_idx: int, hr, rec, posterior):
        """Loss `optimizer_idx` (0 autoencoder, 1 discriminator) and, if finite, one step of `opt`.

        `disc_start` is compared with `loss_step(optimizer_idx)`. Returns (loss, log dict,
        whether the step was taken).
        """
        self.toggle_optimizer(opt)
        loss, log_dict = self.loss(
            hr, rec, posterior, optimizer_idx, self.loss_step(optimizer_idx), self.get_last_layer()
        )
        stepped = self.guard.ok(self, self._trainer, loss)
        if stepped:
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        self.untoggle_optimizer(opt)
        return loss, log_dict, stepped

    def loss_step(self, optimizer_idx: int) -> int:
        """The step the loss compares with `disc_start` at batch b (`batches_seen`): b, or with
        "optimizer_steps" 2b (autoencoder step) and 2b + 1 (discriminator step)."""
        if self.disc_start_counts == "batches":
            return self.batches_seen
        return 2 * self.batches_seen + optimizer_idx

    def validation_step(self, batch: Mapping, batch_idx: int) -> None:
        hr, lr = self.get_input(batch)
        rec, posterior = self(hr, lr, sample_posterior=self.val_sample_posterior)
        scale = float(batch["scale"][0])
        rec01, border, n = (rec.clamp(-1, 1) + 1) / 2, math.ceil(scale), hr.shape[0]
        bicubic = F.interpolate(batch["lr"], hr.shape[-2:], mode="bicubic", align_corners=False)
        for key, img in (("val/psnr", rec01), ("val/psnr_bicubic", bicubic)):
            value = float(psnr(img, batch["hr"], border).mean())
            self.log(key, value, sync_dist=True, batch_size=n)
        if self.loss is not None:  # both parts, as the authors log them
            for idx in (0, 1):
                _, log_val = self.loss(
                    hr, rec, posterior, idx, self.loss_step(idx), self.get_last_layer(), split="val"
                )
                self.log_dict(log_val, sync_dist=True, batch_size=n)
        if batch_idx == 0:
            save_validation_grid(self, (lr + 1) / 2, (rec + 1) / 2, (hr + 1) / 2, self.batches_seen)

    def configure_optimizers(self):
        ae_params = [
            p for name, p in self.named_parameters() if not name.startswith("loss.")
        ]  # encoder, decoder, quant_conv, post_quant_conv
        # The authors' logvar is in no optimiser; frozen here so that it gathers no gradient.
        self.loss.logvar.requires_grad_(bool(self.hparams.learn_logvar))
        if self.hparams.learn_logvar:
            ae_params.append(self.loss.logvar)
        ae_params = [p for p in ae_params if p.requires_grad]
        opt_ae = torch.optim.Adam(ae_params, lr=self.learning_rate, betas=(0.5, 0.9))
        opt_disc = torch.optim.Adam(
            self.loss.discriminator.parameters(), lr=self.learning_rate, betas=(0.5, 0.9)
        )
        return [opt_ae, opt_disc]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["batches_seen"] = self.batches_seen
        checkpoint["nonfinite_guard"] = self.guard.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.batches_seen = int(checkpoint.get("batches_seen", 0))
        if "nonfinite_guard" in checkpoint:
            self.guard.load_state_dict(checkpoint["nonfinite_guard"])


def check_options(autoencoder: AutoencoderKL) -> None:
    """Raises ValueError unless `autoencoder`'s `encoder_input` and `disc_start_counts` are among
    their choices and its encoder's in_channels fit `encoder_input` (the authors' "no SR branch"
    config keeps the paper's 6 and crashes in `encode`)."""
    for name, choices in (
        ("encoder_input", ("hr_lr", "hr")),
        ("disc_start_counts", ("batches", "optimizer_steps")),
    ):
        value = getattr(autoencoder, name)
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    expected = 3 if autoencoder.encoder_input == "hr" else 6
    got = autoencoder.encoder.conv_in.in_channels if autoencoder.use_latent else expected
    if got != expected:
        raise ValueError(
            f"encoder_input {autoencoder.encoder_input!r} feeds the encoder {expected} channels: "
            f"set encoder_config.params.in_channels: {expected} (got {got})"
        )


def drop_authors_unused(module: AutoencoderKL, state_dict: dict, prefix: str, *args) -> None:
    """`load_state_dict` pre-hook of `AutoencoderKL`: removes `module.authors_unused_keys()`
    (by name, under `prefix`) from `state_dict`."""
    keys = [prefix + k for k in module.authors_unused_keys()]
    dropped = [k for k in keys if state_dict.pop(k, None) is not None]
    if dropped:
        log.info("dropped keys the authors' module never reads: %s", dropped)


@rank_zero_only
def save_validation_grid(
    module: pl.LightningModule, lr: torch.Tensor, out: torch.Tensor, hr: torch.Tensor, step: int
) -> None:
    """Writes `<run>/images/val_<step>.png`: rows of LR-bicubic | output | HR for up to 4 images
    (lr [B, 3, h, w], out and hr [B, 3, H, W], all in [0, 1])."""
    bicubic = F.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False)
    rows = torch.cat([bicubic[:4], out[:4], hr[:4]], dim=-1).clamp(0, 1)
    path = Path(module.trainer.default_root_dir) / "images" / f"val_{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(rows, path, nrow=1)
