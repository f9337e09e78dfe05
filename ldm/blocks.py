"""Building blocks of the stage-1 GAP autoencoder (ARCHITECTURE.md §2).

ResnetBlock / Downsample as in latent-diffusion's autoencoder; the IMD module, contrast-aware
channel attention and FRU from IMDN; the scale-conditioned feature modulation of the GAP decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm(32, eps=1e-6) of the autoencoder (the UNet uses PyTorch's default eps)."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> dropout -> conv3x3, plus a (1x1) shortcut.

    Args:
        in_channels: input channels.
        out_channels: output channels (defaults to `in_channels`).
        dropout: dropout probability before the second convolution.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            # Name kept from latent-diffusion for checkpoint compatibility.
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Zero-pad right/bottom by 1, then conv3x3 stride 2: n -> floor((n - 2) / 2) + 1."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class ContrastChannelAttention(nn.Module):
    """IMDN's contrast-aware channel attention: x * sigmoid(MLP(std(x) + mean(x))).

    The statistics are per channel over H, W; the std is the population std.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        # `conv_du` is the authors' (IMDN's) name.
        self.conv_du = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // reduction, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(2, 3), keepdim=True)  # [B, C, 1, 1]
        std = (x - mean).pow(2).mean(dim=(2, 3), keepdim=True).sqrt()
        return x * self.conv_du(std + mean)


class IMDModule(nn.Module):
    """Information multi-distillation module (IMDN): three distillation splits + cca + 1x1 fusion.

    Args:
        channels: feature width nf; d = int(0.25 nf) channels are distilled at each split.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.distilled = int(channels * 0.25)
        self.remaining = channels - self.distilled
        self.c1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.c2 = nn.Conv2d(self.remaining, channels, 3, padding=1)
        self.c3 = nn.Conv2d(self.remaining, channels, 3, padding=1)
        self.c4 = nn.Conv2d(self.remaining, self.distilled, 3, padding=1)
        self.act = nn.LeakyReLU(0.05, inplace=True)
        self.c5 = nn.Conv2d(self.distilled * 4, channels, 1)
        self.cca = ContrastChannelAttention(self.distilled * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = (self.distilled, self.remaining)
        d1, r = torch.split(self.act(self.c1(x)), split, dim=1)
        d2, r = torch.split(self.act(self.c2(r)), split, dim=1)
        d3, r = torch.split(self.act(self.c3(r)), split, dim=1)
        out = torch.cat([d1, d2, d3, self.c4(r)], dim=1)  # [B, 4d, h, w]
        return self.c5(self.cca(out)) + x


class FRU(nn.Module):
    """Feature refinement unit: n IMD modules, their outputs concatenated, fused, plus a skip.

    Args:
        channels: feature width nf.
        num_modules: number n of IMD modules.
    """

    def __init__(self, channels: int, num_modules: int):
        super().__init__()
        # `IMDB`, `c`, `LR_conv` are the authors' names (checkpoint compatibility).
        self.IMDB = nn.ModuleList([IMDModule(channels) for _ in range(num_modules)])
        self.c = nn.Sequential(
            nn.Conv2d(channels * num_modules, channels, 1), nn.LeakyReLU(0.05, inplace=True)
        )
        self.LR_conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs, h = [], x
        for block in self.IMDB:
            h = block(h)
            outs.append(h)
        return self.LR_conv(self.c(torch.cat(outs, dim=1))) + x


class ScaleModulation(nn.Module):
    """Scale-conditioned fusion of SR features x with latent features h (the authors' StyleMod).

    `out = lrelu_0.01(x * a/n + h * b/n)` with `n = sqrt(a^2 + b^2 + 1e-8)`, a and b per channel.
    The authors' module holds one unused parameter `weight` of shape [1]; it is kept so their
    checkpoints load strictly; it is frozen so that DDP does not see an unused trainable parameter.
    """

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1), requires_grad=False)

    def forward(
        self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, h: torch.Tensor
    ) -> torch.Tensor:
        """x, h: [B, C, H, W]; a, b: [B or 1, C]."""
        norm = torch.sqrt(a * a + b * b + 1e-8)
        a = (a / norm)[:, :, None, None]
        b = (b / norm)[:, :, None, None]
        return F.leaky_relu(x * a + h * b, 0.01)
