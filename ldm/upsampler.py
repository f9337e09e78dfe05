"""The scale-aware multi-level upsampler of the GAP decoder (docs/method.md, "Stage 1: GAP
decoder").

Features at the LR size are pixel-shuffled to 2x, 4x and 8x; every level is resized (bilinear) to
the output size, weighted by a scale-dependent gate and fused by a 1x1-conv MLP to RGB.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.blocks import lean, like, pointwise

CHUNK_PIXELS = 1 << 14  # pixels per chunk of the inference-time fusion MLP (16 MiB per layer)


def resize_to(out_size: Sequence[int]):
    """`resize(feat, mode, factor)` onto the whole output grid (the untiled case of `window`)."""

    def resize(feat: torch.Tensor, mode: str, factor: int = 1) -> torch.Tensor:
        if tuple(feat.shape[-2:]) == tuple(out_size):  # bilinear/nearest 1:1 is the identity
            return feat
        corners = None if mode == "nearest" else False
        return F.interpolate(feat, size=tuple(out_size), mode=mode, align_corners=corners)

    return resize


class ScaleAwareUpsampler(nn.Module):
    """Multi-level upsampler conditioned on the inverse scale `h_lr / H_out`.

    Outside autograd (inference) two exact shortcuts apply: when the output is exactly 2x or 4x
    the LR on both axes, the 8x level is only read through an exact 4:1 or 2:1 bilinear
    average, so it is computed directly on that coarser grid (`shuffle_resample`); and the 1x1
    fusion MLP runs on chunks of pixel rows, channels last, with the level gates folded into its
    first layer (`fuse_lean`).

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
        self.channels, self.hidden = channels, hidden

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the last fusion conv (the adaptive GAN weight's reference layer)."""
        return self.fuse[-1].weight

    def level_weights(self, lr_height: int, out_height: int, like: torch.Tensor) -> torch.Tensor:
        """Sigmoid gate per level from the inverse scale; returns [1, num_levels]."""
        inv_scale = torch.tensor([[lr_height / out_height]], dtype=like.dtype, device=like.device)
        return self.scale_aware_layer(inv_scale)

    def forward(self, x: torch.Tensor, out_size: Sequence[int], window=None) -> torch.Tensor:
        """x: [B, nf, h, w] SR features at the LR size -> [B, out_channels, *out_size].

        `window` (tiled inference) describes a tile: x is then the crop of the scene's features
        at `window.offset`, `window.lr_size` the scene's LR size, and `window.resize(feat, mode,
        factor)` resamples a crop of a map on the `factor`x LR grid onto the tile's output
        window of the scene's grid; the result is that window.
        """
        out_size = (int(out_size[0]), int(out_size[1]))
        lr_size = tuple(window.lr_size) if window is not None else tuple(x.shape[-2:])
        resize = window.resize if window is not None else resize_to(out_size)
        weights = self.level_weights(lr_size[0], out_size[0], x)  # [1, L]
        fold = self.fold_factor(lr_size, out_size) if lean() else 0
        resized = [resize(feat, "bilinear", k) for feat, k in self.pyramid(x, fold)]
        if lean():
            return self.fuse_lean(resized, weights[0])
        gated = [feat * weights[:, i, None, None, None] for i, feat in enumerate(resized)]
        return self.fuse(torch.cat(gated, dim=1))

    def peak_elements(self, lr_size: Sequence[int], out_size: Sequence[int], batch: int = 1):
        """Rough count of the float activations alive at once in `forward` (inference): the
        pyramid (with its largest conv output) and the resized levels; the fusion runs in
        chunks."""
        lr_px, out_px = int(lr_size[0]) * int(lr_size[1]), int(out_size[0]) * int(out_size[1])
        nf, levels = self.channels, len(self.UPNet_x2_list) + 1
        top = 4 ** (levels - 1) * lr_px  # pixels of the finest level
        pyramid = nf * sum(4**i * lr_px for i in range(levels - 1))
        pyramid += 2 * nf * (out_px if self.fold_factor(lr_size, out_size) else top)
        return batch * (pyramid + (levels + 1) * nf * out_px) + 2 * self.hidden * CHUNK_PIXELS

    @staticmethod
    def fold_factor(lr_size: Sequence[int], out_size: Sequence[int]) -> int:
        """2 (x4) or 4 (x2) when the 8x level is resized by exactly that factor on both axes."""
        ratios = {8 * n / m for n, m in zip(lr_size, out_size)}
        return int(ratios.pop()) if len(ratios) == 1 and ratios <= {2.0, 4.0} else 0

    def pyramid(self, x: torch.Tensor, fold: int = 0) -> list[tuple[torch.Tensor, int]]:
        """Levels (features [B, nf, k h, k w], grid factor k): k = 1, 2, 4, 8; with `fold` the
        last level is its exact bilinear 1/fold resize, on the 8/fold grid."""
        levels = [(x, 1)]
        for i, up in enumerate(self.UPNet_x2_list):
            feat, k = levels[-1]
            if fold and i == len(self.UPNet_x2_list) - 1:
                levels.append((self.shuffle_resample(up[0], feat, fold), 2 * k // fold))
            else:
                levels.append((up(feat), 2 * k))  # [B, nf, 2k h, 2k w]
        return levels

    @staticmethod
    def shuffle_resample(conv: nn.Conv2d, x: torch.Tensor, factor: int) -> torch.Tensor:
        """bilinear(PixelShuffle(2)(conv(x)), 1/factor) for factor 2 or 4, without the 4x map.

        PixelShuffle puts sub-pixel filter (dy, dx) of output channel c at (2r + dy, 2q + dx); an
        exact 1/factor bilinear resize (align_corners=False) averages fixed taps:
          factor 2 (x4 SR): the four sub-pixels of every position -> one conv with the four
            filters averaged, on x's grid;
          factor 4 (x2 SR): sub-pixel (1, 1) of (2i, 2j), (1, 0) of (2i, 2j+1), (0, 1) of
            (2i+1, 2j) and (0, 0) of (2i+1, 2j+1); the four 3x3 filters, shifted by their
            offsets, add up to one 4x4 filter -> one stride-2 conv (padding 1).

        Args:
            conv: Conv2d(nf -> 4 nf, 3x3, padding 1) of one of this upsampler's levels.
            x: [B, nf, h, w] input (h, w even for factor 4).

        Returns:
            [B, nf, 2h/factor, 2w/factor].
        """
        weight = conv.weight.view(-1, 4, *conv.weight.shape[1:])  # [nf, 4 sub-pixels, nf, 3, 3]
        bias = conv.bias.view(-1, 4).mean(1)
        if factor == 2:
            return F.conv2d(x, like(weight.mean(1), x), bias, padding=1)
        if factor != 4:
            raise ValueError(f"shuffle_resample: factor must be 2 or 4, got {factor}")
        kernel = weight.new_zeros(*weight.shape[:1], *weight.shape[2:3], 4, 4)
        for a in (0, 1):
            for b in (0, 1):
                sub = (1 - a) * 2 + (1 - b)  # the sub-pixel read at position (2i + a, 2j + b)
                kernel[..., a : a + 3, b : b + 3] += weight[:, sub]
        return F.conv2d(x, like(kernel.mul_(0.25), x), bias, stride=2, padding=1)

    def fuse_lean(self, levels: list[torch.Tensor], gates: torch.Tensor) -> torch.Tensor:
        """`fuse(cat_l(gate_l * level_l))` on chunks of pixel rows, channels last, with the level
        gates folded into the first conv's weight (no gated copies of the levels).

        Args:
            levels: L tensors [B, nf, H, W] (the resized pyramid levels).
            gates: [L] level weights.

        Returns:
            [B, out_channels, H, W] (a channels-last view).
        """
        convs = [m for m in self.fuse if isinstance(m, nn.Conv2d)]
        dtype, nf, n = levels[0].dtype, self.channels, len(levels)
        first = convs[0].weight.view(-1, n, nf, 1, 1) * gates[None, :, None, None, None]
        layers = [(first.flatten(1, 2), convs[0].bias)]
        layers += [(c.weight, c.bias) for c in convs[1:]]
        layers = [(w.to(dtype), b.to(dtype)) for w, b in layers]
        views = [feat.permute(0, 2, 3, 1) for feat in levels]  # [B, H, W, nf]
        (b, rows, cols), channels = views[0].shape[:3], convs[-1].out_channels
        out = levels[0].new_empty(b, rows, cols, channels)
        step = max(1, CHUNK_PIXELS // cols)
        # One concatenation buffer reused across chunks (fresh large blocks cost page faults).
        buf = levels[0].new_empty(b * min(step, rows) * cols * n * nf)
        for r in range(0, rows, step):
            chunk = [t[:, r : r + step] for t in views]
            hid = torch.cat(
                chunk, dim=-1, out=buf[: chunk[0].numel() * n].view(*chunk[0].shape[:3], -1)
            )
            hid = hid.permute(0, 3, 1, 2)  # [B, L * nf, step, W], channels last
            for i, (weight, bias) in enumerate(layers):
                hid = pointwise(hid.relu_() if i else hid, weight, bias)
            out[:, r : r + step] = hid.permute(0, 2, 3, 1)
        return out.permute(0, 3, 1, 2)
