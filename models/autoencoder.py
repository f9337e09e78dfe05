"""Stage 1 of LDCSR: the GAP KL-autoencoder trained with L1 + LPIPS + KL + PatchGAN (§2).

Manual optimisation alternates the autoencoder and discriminator Adam optimisers on every batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_only
from torch import nn
from torchvision.utils import save_image

from ldm.distributions import DiagonalGaussianDistribution
from models.guard import NonFiniteLossGuard
from utils.checkpoint import load_weights
from utils.config import instantiate_from_config, to_plain
from utils.metrics import psnr

log = logging.getLogger(__name__)


class AutoencoderKL(pl.LightningModule):
    """GAP KL-autoencoder: `encode(hr, lr)` -> posterior, `decode(z, lr, out_size)` -> HR.

    All images are in model space [-1, 1]. `disc_start` (in the loss config) counts **training
    batches**, not Lightning's `global_step`, which in manual optimisation advances once per
    optimiser step, i.e. twice per batch here.

    Args:
        encoder_config: `{target, params}` of the GAP encoder (in_channels 6, double_z True).
        decoder_config: `{target, params}` of the GAP decoder.
        embed_dim: latent channels after `quant_conv`.
        lossconfig: `{target, params}` of the training loss; None builds an inference-only model
            that downloads nothing.
        ckpt_path: optional checkpoint (ours or the authors') to initialise from.
        ignore_keys: state-dict key prefixes to drop when loading `ckpt_path`.
        monitor: metric name for checkpointing (read by train.py).
        learn_logvar: optimise the loss's log-variance with the autoencoder (the method calls it
            learnable; latent-diffusion's code leaves it out of the optimiser, which keeps it at 0).
        max_skipped_batches: stop after this many consecutive batches with a non-finite loss
            (each is skipped without touching the weights).
        encoder_input: ablation switch. "hr_lr" (paper): the encoder sees cat[bicubic_up(LR), HR]
            (in_channels 6); "hr": HR only (in_channels 3).

    The SR-only baseline (no latent at all) is `encoder_config: null` with the decoder's
    `use_latent: false`: the decoder is then trained as a plain continuous-scale SR network.

    `learning_rate` is set by train.py from `model.base_learning_rate` (see utils/config.py).
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
        learn_logvar: bool = True,
        max_skipped_batches: int = 20,
        encoder_input: str = "hr_lr",
    ):
        super().__init__()
        encoder_config, decoder_config = to_plain(encoder_config), to_plain(decoder_config)
        lossconfig, ignore_keys = to_plain(lossconfig), list(to_plain(ignore_keys))
        self.save_hyperparameters()
        self.automatic_optimization = False
        # Attribute names are the authors' (checkpoint keys `encoder.*`, `quant_conv.*`, ...).
        if encoder_input not in ("hr_lr", "hr"):
            raise ValueError(f"encoder_input must be 'hr_lr' or 'hr', got {encoder_input!r}")
        self.encoder_input = encoder_input
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
        self.loss = instantiate_from_config(lossconfig) if lossconfig else None
        self.monitor = monitor
        self.learning_rate = 4.5e-6 * 4  # the paper's rate at batch 4, one device
        self.batches_seen = 0  # drives disc_start; saved in the checkpoint
        self.guard = NonFiniteLossGuard(max_skipped_batches)
        if ckpt_path:
            ignore = tuple(ignore_keys) + (() if self.loss is not None else ("loss.",))
            load_weights(self, ckpt_path, ignore_prefixes=ignore)

    # ----------------------------------------------------------------------------- inference API
    def encode(self, hr: torch.Tensor, lr: torch.Tensor) -> DiagonalGaussianDistribution:
        """hr: [B, 3, H, W], lr: [B, 3, h, w] in [-1, 1] -> posterior over [B, embed, H/8, W/8]."""
        if self.encoder_input == "hr":
            x = hr
        else:
            lr_up = F.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False)
            x = torch.cat([lr_up, hr], dim=1)  # LR first
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor, lr: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
        """z: [B, embed, h_z, w_z], lr: [B, 3, h, w] in [-1, 1] -> [B, 3, *out_size], unclamped."""
        return self.decoder(self.post_quant_conv(z), lr, out_size)

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
        opt_ae, opt_disc = self.optimizers()
        hr, lr = self.get_input(batch)
        rec, posterior = self(hr, lr)

        self.toggle_optimizer(opt_ae)
        ae_loss, log_ae = self.loss(
            hr, rec, posterior, 0, self.batches_seen, self.get_last_layer(), split="train"
        )
        if not self.guard.ok(self, ae_loss):
            self.untoggle_optimizer(opt_ae)
            return
        opt_ae.zero_grad()
        self.manual_backward(ae_loss)
        opt_ae.step()
        self.untoggle_optimizer(opt_ae)

        self.toggle_optimizer(opt_disc)
        disc_loss, log_disc = self.loss(
            hr, rec.detach(), posterior, 1, self.batches_seen, self.get_last_layer(), split="train"
        )
        if self.guard.ok(self, disc_loss):
            opt_disc.zero_grad()
            self.manual_backward(disc_loss)
            opt_disc.step()
        self.untoggle_optimizer(opt_disc)

        self.batches_seen += 1
        self.log("train/aeloss", ae_loss, prog_bar=True)
        self.log("train/discloss", disc_loss, prog_bar=True)
        self.log("train/scale", float(batch["scale"][0]))
        self.log_dict({**log_ae, **log_disc})

    def validation_step(self, batch: Mapping, batch_idx: int) -> None:
        hr, lr = self.get_input(batch)
        rec, posterior = self(hr, lr, sample_posterior=False)
        scale = float(batch["scale"][0])
        rec01 = (rec.clamp(-1, 1) + 1) / 2
        border = math.ceil(scale)
        bicubic = F.interpolate(
            batch["lr"], size=hr.shape[-2:], mode="bicubic", align_corners=False
        )
        n = hr.shape[0]
        self.log(
            "val/psnr", float(psnr(rec01, batch["hr"], border).mean()), sync_dist=True, batch_size=n
        )
        self.log(
            "val/psnr_bicubic",
            float(psnr(bicubic, batch["hr"], border).mean()),
            sync_dist=True,
            batch_size=n,
        )
        if self.loss is not None:
            _, log_ae = self.loss(
                hr, rec, posterior, 0, self.batches_seen, self.get_last_layer(), split="val"
            )
            self.log_dict(log_ae, sync_dist=True, batch_size=hr.shape[0])
        if batch_idx == 0:
            self._save_grid(lr, rec, hr)

    @rank_zero_only
    def _save_grid(self, lr: torch.Tensor, rec: torch.Tensor, hr: torch.Tensor) -> None:
        """Writes LR-bicubic | reconstruction | HR for the first validation batch."""
        bicubic = F.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False)
        rows = torch.cat([bicubic[:4], rec[:4], hr[:4]], dim=-1).clamp(-1, 1)
        path = Path(self.trainer.default_root_dir) / "images" / f"val_{self.batches_seen:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image((rows + 1) / 2, path, nrow=1)

    def configure_optimizers(self):
        ae_params = [
            p for name, p in self.named_parameters() if not name.startswith("loss.")
        ]  # encoder, decoder, quant_conv, post_quant_conv
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
