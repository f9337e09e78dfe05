"""Stage-1 training loss: L1 + LPIPS(VGG) reconstruction NLL, KL, and a PatchGAN hinge loss.

Re-implements latent-diffusion's ``LPIPSWithDiscriminator`` (``contperceptual.py``) and taming's
``NLayerDiscriminator`` without taming-transformers (docs/method.md, "Stage 1 loss").
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class ActNorm(nn.Module):
    """taming's activation normalisation: per-channel affine, data-initialised on the first batch.

    Args:
        num_features: channels C of the [B, C, H, W] input.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.initialized.item() == 0:
            with torch.no_grad():
                flat = x.transpose(0, 1).reshape(x.shape[1], -1)  # [C, B*H*W]
                self.loc.copy_(-flat.mean(1).view(1, -1, 1, 1))
                self.scale.copy_(1 / (flat.std(1).view(1, -1, 1, 1) + 1e-6))
            self.initialized.fill_(1)
        return self.scale * (x + self.loc)


class NLayerDiscriminator(nn.Module):
    """pix2pix PatchGAN discriminator (taming's layer layout, so keys are ``main.{i}.*``).

    Args:
        input_nc: input channels.
        ndf: filters of the first conv.
        n_layers: >= 1; n_layers - 1 stride-2 blocks after the first conv, then a stride-1
            block (3 in the paper).
        use_actnorm: ActNorm instead of BatchNorm (then the convs have biases).

    Input [B, input_nc, H, W] -> logits [B, 1, H/8 - 2, W/8 - 2] for n_layers=3 (one per patch).
    """

    def __init__(
        self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False
    ):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"NLayerDiscriminator needs n_layers >= 1, got {n_layers}")
        norm_layer = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm  # BatchNorm has its own affine shift
        layers = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):  # n_layers - 1 stride-2 blocks, then one stride-1 block
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=use_bias),
                norm_layer(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)  # name kept: checkpoint keys `discriminator.main.*`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def weights_init(m: nn.Module) -> None:
    """pix2pix init (apply with ``module.apply``): conv weights ~ N(0, 0.02) (conv biases keep
    PyTorch's default), BatchNorm weights ~ N(1, 0.02) and biases 0."""
    name = m.__class__.__name__
    if "Conv" in name:
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.constant_(m.bias, 0.0)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))))`` -> scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating BCE: ``0.5 * (mean(softplus(-D(x))) + mean(softplus(D(x_hat))))``."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """Return ``value`` while ``global_step < threshold``, else ``weight`` (GAN warm-up gate)."""
    return value if global_step < threshold else weight


def _drop_lins_alias(net: nn.Module) -> None:
    """Make an lpips.LPIPS' state-dict keys those of taming's LPIPS (the authors' checkpoints).

    lpips registers its heads twice, as ``lin{k}`` and as the alias ``lins.{k}``; taming only has
    ``lin{k}``. Keeping ``lins`` as a plain list leaves exactly
    ``perceptual_loss.{scaling_layer,net.slice*,lin*}.*``.
    """
    lins = getattr(net, "lins", None)
    if isinstance(lins, nn.ModuleList) and all(
        m is getattr(net, f"lin{k}", None) for k, m in enumerate(lins)
    ):
        del net.lins
        net.lins = list(lins)  # forward indexes net.lins[k]; the params stay under lin{k}


class LPIPSWithDiscriminator(nn.Module):
    """Stage-1 loss of latent-diffusion's ``contperceptual.py`` (docs/method.md, "Stage 1 loss").

    Generator (``optimizer_idx=0``), with x, x_hat in [-1, 1] of shape [B, 3, H, W]:
    ``rec = |x - x_hat| + perceptual_weight * LPIPS(x, x_hat)`` (per pixel, LPIPS broadcast),
    ``nll = sum(rec / exp(logvar) + logvar) / B``, ``kl = sum(posterior.kl()) / B``,
    ``g = -mean(D(x_hat))``, ``loss = nll + kl_weight * kl + d_weight * disc_factor * g``.
    Discriminator (``optimizer_idx=1``): ``disc_factor * disc_loss(D(x), D(x_hat))``.

    The perceptual net's weights are frozen. Like the authors' ``LPIPS().eval()``, which
    Lightning's ``.train()`` switches back to train mode, it follows the loss module's mode: the
    dropout in front of the LPIPS linear heads is active during training and off in validation.
    ``lpips_eval_mode=True`` (our option) keeps it in eval mode, i.e. a deterministic LPIPS.

    Args:
        disc_start: first step (``global_step`` of ``forward``) at which the GAN terms are on.
        logvar_init: initial value of the scalar parameter ``logvar``. Whether an optimiser
            trains it is the autoencoder's ``learn_logvar`` (default no, as the authors').
        kl_weight: weight of the KL term (paper 1e-6).
        pixelloss_weight: stored for config compatibility; unused, as in latent-diffusion.
        disc_num_layers, disc_in_channels, use_actnorm: discriminator architecture.
        disc_factor: GAN weight once ``global_step >= disc_start``.
        disc_weight: multiplier of the adaptive weight (paper 0.5).
        perceptual_weight: LPIPS weight (0 skips LPIPS).
        disc_conditional: the discriminator also sees ``cond`` (channel-concatenated).
        disc_loss: "hinge" or "vanilla".
        build_perceptual: builds the perceptual net, an LPIPS-like module
            ``(x, x_hat) -> [B, 1, 1, 1]``, called once when ``perceptual_weight > 0``. The
            stage-1 model passes ``lpips.LPIPS(net="vgg")`` with its weight-file handling
            (``utils.weights.build_lpips``); tests pass small random nets.
        lpips_eval_mode: keep the perceptual net in eval mode also while training (no dropout);
            False (the authors') lets it follow ``.train()`` / ``.eval()``.
    """

    def __init__(
        self,
        disc_start: int,
        logvar_init: float = 0.0,
        kl_weight: float = 1.0,
        pixelloss_weight: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        use_actnorm: bool = False,
        disc_conditional: bool = False,
        disc_loss: str = "hinge",
        build_perceptual: Callable[[], nn.Module] | None = None,
        lpips_eval_mode: bool = False,
    ):
        super().__init__()
        losses: dict[str, Callable] = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
        if disc_loss not in losses:
            raise ValueError(f"disc_loss must be 'hinge' or 'vanilla', got {disc_loss!r}")
        self.kl_weight = kl_weight
        self.lpips_eval_mode = lpips_eval_mode
        self.pixel_weight = pixelloss_weight
        self.perceptual_weight = perceptual_weight
        # Attribute names below are the authors' (checkpoint keys `loss.perceptual_loss.*`,
        # `loss.logvar`, `loss.discriminator.main.*`).
        if perceptual_weight > 0:  # perceptual_weight 0 needs (and downloads) nothing
            if build_perceptual is None:
                raise ValueError(
                    f"perceptual_weight {perceptual_weight} needs build_perceptual (a function "
                    "returning the LPIPS net); set perceptual_weight: 0 to train without LPIPS"
                )
            self.perceptual_loss = build_perceptual()
            _drop_lins_alias(self.perceptual_loss)
            self.perceptual_loss.requires_grad_(False)
        self.logvar = nn.Parameter(torch.ones(()) * logvar_init)
        self.discriminator = NLayerDiscriminator(
            disc_in_channels, n_layers=disc_num_layers, use_actnorm=use_actnorm
        ).apply(weights_init)
        self.discriminator_iter_start = disc_start
        self.disc_loss = losses[disc_loss]
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_conditional = disc_conditional
        self.train(self.training)  # lpips.LPIPS starts in eval mode; follow ours (or the option)

    def train(self, mode: bool = True) -> "LPIPSWithDiscriminator":
        """Sets the mode; the perceptual net follows it unless ``lpips_eval_mode``."""
        super().train(mode)
        if self.lpips_eval_mode and hasattr(self, "perceptual_loss"):
            self.perceptual_loss.eval()
        return self

    def calculate_adaptive_weight(
        self, nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor
    ) -> torch.Tensor:
        """``clamp(|grad_last nll| / (|grad_last g| + 1e-4), 0, 1e4) * disc_weight`` (detached).

        Args:
            nll_loss, g_loss: scalar losses whose graphs reach ``last_layer``.
            last_layer: the decoder's last weight (``fuse``'s last conv weight).
        """
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        return torch.clamp(d_weight, 0.0, 1e4).detach() * self.discriminator_weight

    def _logits(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if (cond is not None) != self.disc_conditional:
            raise ValueError(
                f"disc_conditional={self.disc_conditional} but cond is "
                f"{'given' if cond is not None else 'None'}: pass cond iff disc_conditional"
            )
        return self.discriminator(x if cond is None else torch.cat((x, cond), dim=1))

    def forward(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posteriors,
        optimizer_idx: int,
        global_step: int,
        last_layer: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        split: str = "train",
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute the generator (idx 0) or discriminator (idx 1) loss.

        Args:
            inputs: x, [B, 3, H, W] in [-1, 1].
            reconstructions: x_hat, same shape.
            posteriors: object with ``kl() -> [B]`` (the diagonal Gaussian posterior).
            optimizer_idx: 0 = autoencoder step, 1 = discriminator step.
            global_step: the caller's **batch** counter: the LightningModule passes its own, because
                Lightning's ``global_step`` counts both optimisers' steps in manual optimisation.
            last_layer: decoder's last weight, needed for the adaptive weight when training.
            cond: extra discriminator input when ``disc_conditional``.
            split: log-key prefix ("train", "val").

        Returns:
            (scalar loss, dict of detached scalars keyed ``{split}/...``).
        """
        inputs, reconstructions = inputs.contiguous(), reconstructions.contiguous()
        disc_factor = adopt_weight(self.disc_factor, global_step, self.discriminator_iter_start)
        if optimizer_idx == 1:
            logits_real = self._logits(inputs.detach(), cond)
            logits_fake = self._logits(reconstructions.detach(), cond)
            d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
            return d_loss, {
                f"{split}/disc_loss": d_loss.clone().detach().mean(),
                f"{split}/logits_real": logits_real.detach().mean(),
                f"{split}/logits_fake": logits_fake.detach().mean(),
            }
        if optimizer_idx != 0:
            raise ValueError(f"optimizer_idx must be 0 or 1, got {optimizer_idx}")

        rec_loss = torch.abs(inputs - reconstructions)  # [B, 3, H, W]
        if self.perceptual_weight > 0:
            rec_loss = rec_loss + self.perceptual_weight * self.perceptual_loss(
                inputs, reconstructions
            )  # + [B, 1, 1, 1]
        nll_loss = rec_loss / torch.exp(self.logvar) + self.logvar
        nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
        kl_loss = posteriors.kl()
        kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]

        g_loss = -torch.mean(self._logits(reconstructions, cond))
        d_weight = torch.tensor(0.0, device=inputs.device)
        if self.disc_factor > 0.0 and last_layer is not None:
            try:
                d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer)
            except RuntimeError:
                if self.training:  # only evaluation (no autograd graph) may skip it
                    raise
        elif self.disc_factor > 0.0 and self.training:
            raise ValueError("training the generator needs last_layer (the decoder's last weight)")
        loss = nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        return loss, {
            f"{split}/total_loss": loss.clone().detach().mean(),
            f"{split}/logvar": self.logvar.detach(),
            f"{split}/kl_loss": kl_loss.detach().mean(),
            f"{split}/nll_loss": nll_loss.detach().mean(),
            f"{split}/rec_loss": rec_loss.detach().mean(),
            f"{split}/d_weight": d_weight.detach(),
            f"{split}/disc_factor": torch.tensor(float(disc_factor)),
            f"{split}/g_loss": g_loss.detach().mean(),
        }
