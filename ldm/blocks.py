"""Building blocks of the stage-1 GAP autoencoder (docs/method.md, "Stage 1: GAP decoder").

ResnetBlock / Downsample as in latent-diffusion's autoencoder; the IMD module, contrast-aware
channel attention and FRU from IMDN; the scale-conditioned feature modulation of the GAP decoder.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ldm.chain import Stage, run_chain


def normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm(32, eps=1e-6) of the autoencoder (the UNet uses PyTorch's default eps)."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """x * sigmoid(x); `inplace` overwrites x (only for a fresh tensor outside autograd)."""
    return F.silu(x, inplace=True) if inplace else x * torch.sigmoid(x)


def lean() -> bool:
    """True outside autograd (inference): temporaries may then be overwritten in place."""
    return not torch.is_grad_enabled()


def inference_layout(x: torch.Tensor) -> torch.Tensor:
    """x in channels-last memory outside autograd (faster CPU convolutions), unchanged otherwise."""
    return x.contiguous(memory_format=torch.channels_last) if lean() and x.dim() == 4 else x


def like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t contiguous in the memory format of x (a channel slice of a channels-last tensor would
    send the next convolution to PyTorch's slow fallback)."""
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return t.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """1x1 convolution of x [B, C, H, W] with weight [O, C, 1, 1] (may be a slice of a larger
    weight) -> [B, O, H, W].

    Outside autograd a channels-last float32 x on CPU goes straight to oneDNN's convolution:
    PyTorch sends a single-threaded 1x1 convolution of a batch below 16 to a generic kernel, and
    oneDNN also beats a matrix product on the rows of pixels (1.8 against 2.4 ms for 64 -> 64
    channels on 150x150; 86 against 97 ms for 256 -> 256 on 65400 pixels; one thread).
    """
    weight = like(weight, x)
    direct = (
        lean()
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and not torch.is_autocast_enabled("cpu")
        and torch.backends.mkldnn.is_available()
    )
    if direct:
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, [0, 0], [1, 1], [1, 1], 1)
    return F.conv2d(x, weight, bias)


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and population variance over H, W of x [B, C, H, W]: [B, C, 1, 1] each.

    A channels-last x is reduced as rows of pixels in two passes (mean, then mean of squared
    deviations, as IMDN's `stdv_channels`): ~3x faster on CPU than `var_mean` on that layout.
    """
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        rows = x.permute(0, 2, 3, 1).flatten(1, 2)  # [B, H*W, C], a view
        mean = rows.mean(1, keepdim=True)  # [B, 1, C]
        dev = rows - mean
        var = (dev.mul_(dev) if lean() else dev * dev).mean(1)  # [B, C]
        return mean[:, 0, :, None, None], var[:, :, None, None]
    var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
    return mean, var


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
        return self.second(*self.first(x))

    def stages(self) -> list[Stage]:
        """The block as two stages (`ldm.chain`), each starting at a GroupNorm (so that
        measuring its statistics needs no convolution twice) and reading one row around."""
        return [Stage(self.first, 1), Stage(self.second, 1, take=2)]

    # Outside autograd the norm outputs and the conv output are fresh: SiLU and the residual
    # run in place (3 instead of ~6 full-size temporaries).
    def first(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> (x, conv1(swish(norm1(x))))."""
        return x, self.conv1(swish(self.norm1(x), lean()))

    def second(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """(x, h) -> shortcut(x) + conv2(dropout(swish(norm2(h))))."""
        inplace = lean()
        h = self.conv2(self.dropout(swish(self.norm2(h), inplace)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return h.add_(skip) if inplace else skip + h


class Downsample(nn.Module):
    """Zero-pad right/bottom by 1, then conv3x3 stride 2: n -> floor((n - 2) / 2) + 1."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class ContrastChannelAttention(nn.Module):
    """IMDN's contrast-aware channel attention: x * sigmoid(MLP(std(x) + mean(x))).

    The statistics are per channel over H, W; the std is the population std. `reweight` applies
    the attention with given statistics (tiles of a scene share the whole scene's).
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
        mean, var = channel_moments(x)
        return self.reweight(x, mean, var)

    def reweight(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] times the attention of per-channel moments mean, var [B, C, 1, 1]."""
        return x * self.conv_du(var.sqrt() + mean)


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
        return self.merge(*self.features(x))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The distillation convolutions (4 rows around): x -> (x, cat[d1, d2, d3, c4(r)])."""
        d1, r = self.distill(self.c1, x)
        d2, r = self.distill(self.c2, r)
        d3, r = self.distill(self.c3, r)
        return x, torch.cat([d1, d2, d3, self.c4(r)], dim=1)  # [B, 4d, h, w]

    def merge(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The channel attention (statistics over the whole map) and 1x1 fusion, plus x."""
        return pointwise(self.cca(out), self.c5.weight, self.c5.bias) + x

    def distill(self, conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """act(conv(x)) split into its distilled and remaining channels, both contiguous.

        A channels-last x gets one convolution per part (the same math): a channel slice of a
        channels-last map would have to be copied before the next convolution, which costs more.
        """
        d = self.distilled
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            weight, bias = conv.weight, conv.bias
            return tuple(
                self.act(F.conv2d(x, like(weight[part], x), bias[part], padding=conv.padding))
                for part in (slice(None, d), slice(d, None))
            )
        distilled, remaining = torch.split(self.act(conv(x)), (d, self.remaining), dim=1)
        return distilled, like(remaining, x)


class FRU(nn.Module):
    """Feature refinement unit: n IMD modules, their outputs concatenated, fused, plus a skip.

    The 1x1 fusion of the n concatenated outputs is computed as the sum of its n channel blocks
    applied module by module (same math, no n*nf-channel concatenation).

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
        return run_chain(self.stages(), x)[0]

    def stages(self) -> list[Stage]:
        """The unit as a chain of stages (`ldm.chain`) on the stack [x, fused, h]: IMD module
        j's convolutions (4 rows around) push their concatenated output on top of h; its
        channel attention (whole-map statistics) and 1x1 fusion then give h' and add block j
        of the unit's 1x1 fusion of h' to `fused`; the tail reads (x, fused, h). The attention
        starts a stage of its own, so that measuring its statistics needs no convolution
        twice."""
        chain = []
        for j, block in enumerate(self.IMDB):
            chain += [Stage(block.features, 4), Stage(partial(self.refine, j), take=2 + (j > 0))]
        return chain + [Stage(self.tail, 1, take=3)]

    def refine(self, j: int, *maps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """IMD module j's merge and its share of the fusion: (x, cat) -> (x, fused, h') for
        j = 0, (fused, h, cat) -> (fused + part, h') after."""
        fusion, h, cat = self.c[0], maps[-2], maps[-1]
        out = self.IMDB[j].merge(h, cat)  # [B, nf, h, w]
        nf = out.shape[1]
        weight = fusion.weight[:, j * nf : (j + 1) * nf]  # block j of the 1x1 conv
        part = pointwise(out, weight, fusion.bias if j == 0 else None)
        return (h, part, out) if j == 0 else (maps[0].add_(part), out)

    def tail(self, x: torch.Tensor, fused: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """LR_conv(lrelu(fused)) + x."""
        return self.LR_conv(self.c[1](fused)) + x


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
        return F.leaky_relu(x * a + h * b, 0.01, inplace=lean())
