"""Upsamplers the paper's ablation compares with its scale-aware one (ARCHITECTURE.md §2).

`LocalImplicitUpsampler`: LIIF-style continuous upsampling (Chen et al., CVPR 2021) without the
local ensemble; `PixelShuffleUpsampler`: the fixed-scale x4 baseline (conv + PixelShuffle).
Both share the interface of `ScaleAwareUpsampler`: `(features, out_size) -> image`, `last_layer`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LocalImplicitUpsampler(nn.Module):
    """RGB(q) = MLP(f(nearest LR cell of q), q - centre of that cell, cell size), per output pixel.

    Coordinates are in [-1, 1] (align_corners=False); the relative coordinate is measured in LR
    pixels and the cell size in LR pixels too, so one MLP serves every scale. The MLP is a stack of
    1x1 convolutions over the output grid.

    Args:
        channels: feature width of the SR branch.
        out_channels: output image channels.
        hidden: MLP width.
        depth: number of hidden layers.
    """

    def __init__(self, channels: int, out_channels: int = 3, hidden: int = 256, depth: int = 4):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels + 4, hidden, 1), nn.ReLU(True)]
        for _ in range(depth - 1):
            layers += [nn.Conv2d(hidden, hidden, 1), nn.ReLU(True)]
        layers.append(nn.Conv2d(hidden, out_channels, 1))
        self.mlp = nn.Sequential(*layers)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.mlp[-1].weight

    def forward(self, x: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
        """x: [B, C, h, w] -> [B, out_channels, *out_size]."""
        (b, _, h, w), (oh, ow) = x.shape, (int(out_size[0]), int(out_size[1]))
        ys = (torch.arange(oh, device=x.device, dtype=x.dtype) + 0.5) / oh * 2 - 1  # [oh]
        xs = (torch.arange(ow, device=x.device, dtype=x.dtype) + 0.5) / ow * 2 - 1  # [ow]
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # [oh, ow, 2] (x, y)
        grid = grid.unsqueeze(0).expand(b, -1, -1, -1)
        feat = F.grid_sample(x, grid, mode="nearest", align_corners=False)  # [B, C, oh, ow]
        # Centre of the nearest LR cell, in [-1, 1], then the offset in LR pixels.
        size = torch.tensor([w, h], device=x.device, dtype=x.dtype)
        centre = (torch.floor((grid + 1) / 2 * size).clamp(max=size - 1) + 0.5) / size * 2 - 1
        rel = ((grid - centre) * size / 2).permute(0, 3, 1, 2)  # [B, 2, oh, ow]
        cell = torch.tensor([w / ow, h / oh], device=x.device, dtype=x.dtype)
        cell = cell.view(1, 2, 1, 1).expand(b, -1, oh, ow)
        return self.mlp(torch.cat([feat, rel, cell], dim=1))


class PixelShuffleUpsampler(nn.Module):
    """Fixed x4 upsampler: conv3x3 (C -> 16·out) + PixelShuffle(4).

    Another output size is reached the way fixed-scale baselines are run at arbitrary scales in
    continuous-SR comparisons: the x4 result is resized (bicubic) to `out_size`.

    Args:
        channels: feature width of the SR branch.
        out_channels: output image channels.
    """

    def __init__(self, channels: int, out_channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(channels, 16 * out_channels, 3, padding=1)
        self.shuffle = nn.PixelShuffle(4)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.conv.weight

    def forward(self, x: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
        out = self.shuffle(self.conv(x))  # [B, out, 4h, 4w]
        out_size = (int(out_size[0]), int(out_size[1]))
        if out.shape[-2:] != out_size:
            out = F.interpolate(out, size=out_size, mode="bicubic", align_corners=False)
        return out
