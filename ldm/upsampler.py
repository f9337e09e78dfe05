"""The scale-aware multi-level upsampler of the GAP decoder (ARCHITECTURE.md §2, "Upsampler").

Features at the LR size are pixel-shuffled to 2x, 4x and 8x; every level is resized (bilinear) to
the output size, weighted by a scale-dependent gate and fused by a 1x1-conv MLP to RGB.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ScaleAwareUpsampler(nn.Module):
    """Multi-level upsampler conditioned on the inverse scale `h_lr / H_out`.

    Args:
        channels: feature width nf of the SR branch.
        out_channels: output image channels.
        num_levels: pyramid levels including the LR-size level (the paper uses 4: 1x, 2x, 4x, 8x).
        hidden: width of the fusion MLP.
    """

    def __init__(
        self, channels: int, out_channels: int = 3, num_levels: int = 4, hidden: int = 256
    ):
        super().__init__()
        # Attribute names are the authors' (checkpoint compatibility).
        self.UPNet_x2_list = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, 4 * channels, 3, padding=1), nn.PixelShuffle(2))
            for _ in range(num_levels - 1)
        )
        self.scale_aware_layer = nn.Sequential(
            nn.Linear(1, 64), nn.ReLU(inplace=True), nn.Linear(64, num_levels), nn.Sigmoid()
        )
        layers: list[nn.Module] = [nn.Conv2d(num_levels * channels, hidden, 1), nn.ReLU(True)]
        for _ in range(3):
            layers += [nn.Conv2d(hidden, hidden, 1), nn.ReLU(True)]
        layers.append(nn.Conv2d(hidden, out_channels, 1))
        self.fuse = nn.Sequential(*layers)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the last fusion conv (the adaptive GAN weight's reference layer)."""
        return self.fuse[-1].weight

    def level_weights(self, lr_height: int, out_height: int, like: torch.Tensor) -> torch.Tensor:
        """Sigmoid gate per level from the inverse scale; returns [1, num_levels]."""
        inv_scale = torch.tensor([[lr_height / out_height]], dtype=like.dtype, device=like.device)
        return self.scale_aware_layer(inv_scale)

    def forward(self, x: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """x: [B, nf, h, w] SR features at the LR size -> [B, out_channels, *out_size]."""
        weights = self.level_weights(x.shape[-2], out_size[0], x)  # [1, L]
        levels = [x]
        for up in self.UPNet_x2_list:
            levels.append(up(levels[-1]))  # [B, nf, 2^l h, 2^l w]
        resized = [
            F.interpolate(feat, size=tuple(out_size), mode="bilinear", align_corners=False)
            * weights[:, i, None, None, None]
            for i, feat in enumerate(levels)
        ]
        return self.fuse(torch.cat(resized, dim=1))
