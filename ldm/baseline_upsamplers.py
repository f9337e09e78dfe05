"""Upsamplers that ablations put in place of the scale-aware one (README, "Ablations").

The paper's ablations (the authors' modules): `NearestMLPUpsampler` ("w/o CSUM": nearest LR
feature + relative coordinate -> 2-layer MLP) and `FixedScaleUpsampler` (the fixed x4 baseline:
two conv + PixelShuffle(2) stages, PReLU, conv). Our own variants: `LocalImplicitUpsampler`
(LIIF-style, Chen et al., CVPR 2021, without the local ensemble) and `PixelShuffleUpsampler`
(one conv + PixelShuffle(4)). All share the interface of `ScaleAwareUpsampler`:
`(features, out_size, window=None) -> image`, `last_layer`, `peak_elements`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.blocks import lean
from ldm.upsampler import CHUNK_PIXELS


def _output_spans(x: torch.Tensor, out_size: tuple[int, int], window=None):
    """(LR size, output row and column spans, LR offset) that `forward` computes: the whole
    output, or the window of a tile (`ScaleAwareUpsampler.forward` describes `window`)."""
    if window is None:
        return x.shape[-2:], ((0, out_size[0]), (0, out_size[1])), (0, 0)
    return window.lr_size, (window.rows, window.cols), window.offset


class LocalImplicitUpsampler(nn.Module):
    """RGB(q) = MLP(f(LR cell of q), q - centre of that cell, cell size), per output pixel.

    The LR cell of q is the one it lies in (the floor of its LR coordinate). Coordinates are in
    [-1, 1] (align_corners=False); the relative coordinate is measured in LR pixels and the cell
    size in LR pixels too, so one MLP serves every scale. The MLP is a stack of 1x1 convolutions
    over the output grid (run on chunks of rows outside autograd).

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

    def peak_elements(self, lr_size: Sequence[int], out_size: Sequence[int], batch: int = 1):
        """Rough count of the float activations alive at once in `forward` (inference)."""
        out_px = int(out_size[0]) * int(out_size[1])
        width = self.mlp[0].in_channels
        return batch * 2 * width * out_px + 2 * self.mlp[0].out_channels * CHUNK_PIXELS

    def forward(self, x: torch.Tensor, out_size: Sequence[int], window=None) -> torch.Tensor:
        """x: [B, C, h, w] -> [B, out_channels, *out_size] (or the output window of a tile: see
        `ScaleAwareUpsampler.forward`)."""
        out_size = (int(out_size[0]), int(out_size[1]))
        lr_size, spans, offset = _output_spans(x, out_size, window)
        (rows, rel_y), (cols, rel_x) = (
            _cells(n, m, span, x) for n, m, span in zip(lr_size, out_size, spans)
        )
        feat = x.index_select(2, rows - offset[0]).index_select(3, cols - offset[1])
        b, (nr, nc) = x.shape[0], feat.shape[-2:]
        rel = torch.stack([rel_x[None, :].expand(nr, nc), rel_y[:, None].expand(nr, nc)])
        cell = torch.tensor([lr_size[1] / out_size[1], lr_size[0] / out_size[0]], dtype=x.dtype)
        cell = cell.to(x.device).view(2, 1, 1).expand(2, nr, nc)
        query = torch.cat([feat, torch.cat([rel, cell])[None].expand(b, -1, -1, -1)], dim=1)
        if not lean():
            return self.mlp(query)
        step = max(1, CHUNK_PIXELS // nc)  # bounded MLP activations: rows in chunks
        return torch.cat([self.mlp(query[:, :, r : r + step]) for r in range(0, nr, step)], 2)


def _cells(n: int, m: int, span, like: torch.Tensor):
    """Along one axis of n LR / m output pixels, outputs [a, b): the LR cell each lies in
    (floor((i + 0.5) n / m)) and its offset from that cell's centre in LR pixels."""
    q = (torch.arange(*span, device=like.device, dtype=like.dtype) + 0.5) / m * 2 - 1  # [-1, 1]
    index = torch.floor((q + 1) / 2 * n).clamp(max=n - 1)
    centre = (index + 0.5) / n * 2 - 1
    return index.long(), (q - centre) * n / 2


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

    def peak_elements(self, lr_size: Sequence[int], out_size: Sequence[int], batch: int = 1):
        """Rough count of the float activations alive at once in `forward` (inference)."""
        lr_px, out_px = int(lr_size[0]) * int(lr_size[1]), int(out_size[0]) * int(out_size[1])
        return batch * 2 * (self.conv.out_channels * lr_px + 3 * out_px)

    def forward(self, x: torch.Tensor, out_size: Sequence[int], window=None) -> torch.Tensor:
        """x: [B, C, h, w] -> [B, out_channels, *out_size] (or a tile's output window: see
        `ScaleAwareUpsampler.forward`)."""
        out = self.shuffle(self.conv(x))  # [B, out, 4h, 4w]
        if window is not None:
            return window.resize(out, "bicubic", 4)
        out_size = (int(out_size[0]), int(out_size[1]))
        if out.shape[-2:] != out_size:
            out = F.interpolate(out, size=out_size, mode="bicubic", align_corners=False)
        return out


class NearestMLPUpsampler(nn.Module):
    """RGB(q) = f_transfer(cat[f(nearest LR pixel of q), (q - its centre) * (h, w)]) per output
    pixel q (the authors' `MLP_Interpolate`: no feature unfolding, cell input or ensemble).

    Coordinates are pixel centres in [-1, 1] (align_corners=False); the nearest LR pixel is the
    one `grid_sample(mode="nearest")` picks (ties round half to even), found per axis with the
    sampler itself so that it is that pixel on every input size; the relative coordinate is
    (row, column), scaled by the LR height and width.

    Args:
        channels: feature width of the SR branch.
        out_channels: output image channels.
    """

    def __init__(self, channels: int, out_channels: int = 3):
        super().__init__()
        # `f_transfer` is the authors' name (checkpoint compatibility).
        self.f_transfer = nn.Sequential(
            nn.Linear(channels + 2, channels), nn.ReLU(True), nn.Linear(channels, out_channels)
        )

    @property
    def last_layer(self) -> torch.Tensor:
        return self.f_transfer[-1].weight

    def peak_elements(self, lr_size: Sequence[int], out_size: Sequence[int], batch: int = 1):
        """Rough count of the float activations alive at once in `forward` (inference)."""
        out_px = int(out_size[0]) * int(out_size[1])
        return batch * 2 * self.f_transfer[0].in_features * out_px

    def forward(self, x: torch.Tensor, out_size: Sequence[int], window=None) -> torch.Tensor:
        """x: [B, C, h, w] -> [B, out_channels, *out_size] (or the output window of a tile: see
        `ScaleAwareUpsampler.forward`)."""
        out_size = (int(out_size[0]), int(out_size[1]))
        lr_size, spans, offset = _output_spans(x, out_size, window)
        (rows, rel_y), (cols, rel_x) = (
            _nearest_cells(int(n), m, span, x.device)
            for n, m, span in zip(lr_size, out_size, spans)
        )
        feat = x.index_select(2, rows - offset[0]).index_select(3, cols - offset[1])
        feat = feat.permute(0, 2, 3, 1)  # [B, rows, cols, C]
        b, nr, nc = feat.shape[:3]
        rel = torch.stack([rel_y[:, None].expand(nr, nc), rel_x[None, :].expand(nr, nc)], -1)
        query = torch.cat([feat, rel.to(feat.dtype)[None].expand(b, -1, -1, -1)], dim=-1)
        step = max(1, CHUNK_PIXELS // nc) if lean() else nr  # bounded activations: row chunks
        out = torch.cat([self.f_transfer(query[:, r : r + step]) for r in range(0, nr, step)], 1)
        return out.permute(0, 3, 1, 2)  # [B, out_channels, rows, cols]


def _centres(n: int, device) -> torch.Tensor:
    """The n pixel centres of an axis in [-1, 1], float32 (latent-diffusion's `make_coord`)."""
    r = 1.0 / n
    return -1 + r + (2 * r) * torch.arange(n, device=device).float()


def _nearest_cells(n: int, m: int, span, device):
    """Along one axis of n LR / m output pixels, outputs [a, b): the LR pixel `grid_sample`
    (nearest, align_corners=False) reads for each, and the output's offset from that pixel's
    centre times n."""
    q = _centres(m, device)[span[0] : span[1]]
    grid = torch.stack([q, torch.zeros_like(q)], -1).view(1, 1, -1, 2)  # x = q, y = the one row
    index_map = torch.arange(n, device=device, dtype=torch.float32).view(1, 1, 1, n)
    index = F.grid_sample(index_map, grid, mode="nearest", align_corners=False).view(-1).long()
    return index, (q - _centres(n, device)[index]) * n


class FixedScaleUpsampler(nn.Sequential):
    """The fixed x4 baseline: [conv3x3 (C -> 4C), PixelShuffle(2)] x 2, PReLU(C), conv3x3 (C ->
    out), as the authors' `PixShuffleUpsampler(scale=4)` (keys `0`, `2`, `4`, `5`).

    It exists at x4 only: any other output size raises a ValueError naming x4.

    Args:
        channels: feature width of the SR branch.
        out_channels: output image channels.
    """

    SCALE = 4

    def __init__(self, channels: int, out_channels: int = 3):
        super().__init__(
            nn.Conv2d(channels, 4 * channels, 3, padding=1),
            nn.PixelShuffle(2),
            nn.Conv2d(channels, 4 * channels, 3, padding=1),
            nn.PixelShuffle(2),
            nn.PReLU(channels),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )

    @property
    def last_layer(self) -> torch.Tensor:
        return self[-1].weight

    def peak_elements(self, lr_size: Sequence[int], out_size: Sequence[int], batch: int = 1):
        """Rough count of the float activations alive at once in `forward` (inference)."""
        lr_px = int(lr_size[0]) * int(lr_size[1])
        return batch * 3 * self[0].out_channels * 4 * lr_px

    def forward(self, x: torch.Tensor, out_size: Sequence[int], window=None) -> torch.Tensor:
        """x: [B, C, h, w] -> [B, out_channels, 4h, 4w] (or a tile's output window: see
        `ScaleAwareUpsampler.forward`).

        Raises:
            ValueError: when `out_size` is not exactly 4x the LR size on both axes.
        """
        lr_size = tuple(window.lr_size) if window is not None else tuple(x.shape[-2:])
        out_size = (int(out_size[0]), int(out_size[1]))
        if out_size != (self.SCALE * lr_size[0], self.SCALE * lr_size[1]):
            raise ValueError(
                f"the fixed-scale upsampler supports x{self.SCALE} only: the output size must be "
                f"{self.SCALE} x the LR size {list(lr_size)}, got {list(out_size)}"
            )
        out = super().forward(x)  # [B, out, 4h, 4w]
        return out if window is None else window.resize(out, "nearest", self.SCALE)
