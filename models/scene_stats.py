"""Whole-scene normalisation statistics for streamed inference (GroupNorm, IMDN channel attention).

GroupNorm (condition encoder, UNet, decoder latent branch) and the contrast-aware channel
attention of the IMD modules (decoder SR branch) normalise with statistics of their whole input.
A band of rows alone would use its own statistics, and a layer's statistics cannot be gathered
band by band in one pass, since they depend on how the earlier layers normalised. Streamed stage
by stage (`models.stream`), `SceneStatistics.measure` gathers the exact statistics of the
untiled run: each layer's float64 sums over the bands' own pixels, with every earlier layer
already normalised with its finished statistics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from functools import partial

import torch
from torch import nn

from ldm.blocks import ContrastChannelAttention

TYPES = (nn.GroupNorm, ContrastChannelAttention)


class StopStage(Exception):
    """Ends a forward inside `SceneStatistics.measure` once the measured layer has its sums."""


class SceneStatistics:
    """Measures the input statistics of normalisation layers over a scene, band by band, and
    normalises with them.

    Args:
        modules: modules to search for normalisation layers.
        types: the layer types measured (`nn.GroupNorm`, `ContrastChannelAttention`).
    """

    def __init__(self, modules: Iterable[nn.Module], types: tuple = TYPES):
        self.layers = [m for module in modules for m in module.modules() if isinstance(m, types)]
        self.moments: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> mean, var [B, C]
        self.sums: dict[int, list] = {}  # id -> [count, sum [B, C], sum of squares [B, C]]

    @contextlib.contextmanager
    def measure(self, box):
        """Layers with moments normalise with them; the first one reached without adds the
        per-channel count, sum and sum of squares (float64) of its input's pixels in `box`
        ((r0, r1), (c0, c1): the band's own pixels) to its totals and stops the forward
        (`StopStage`, which the caller catches)."""
        for layer in self.layers:
            method = self._group_norm if isinstance(layer, nn.GroupNorm) else self._attention
            layer.forward = partial(method, layer)  # shadows the class method
            if id(layer) not in self.moments:
                layer.forward = partial(self._add_sums, layer, box)
        try:
            yield
        finally:
            for layer in self.layers:
                layer.__dict__.pop("forward", None)

    def settle(self) -> bool:
        """Moments from the sums that `measure` gathered over the whole scene; False if none
        were (every layer reached had its moments)."""
        for key, (count, total, squares) in self.sums.items():
            mean = total / count
            self.moments[key] = (mean, (squares / count - mean * mean).clamp(min=0))
        settled, self.sums = bool(self.sums), {}
        return settled

    def _add_sums(self, layer: nn.Module, box, x: torch.Tensor) -> None:
        (r0, r1), (c0, c1) = box
        own = x[..., r0:r1, c0:c1].double()
        sums = [own[0, 0].numel(), own.sum((-2, -1)), own.square().sum((-2, -1))]
        old = self.sums.get(id(layer))
        self.sums[id(layer)] = sums if old is None else [a + b for a, b in zip(old, sums)]
        raise StopStage

    def _moments(self, layer: nn.Module, groups: int = 0):
        """Measured mean and variance [B, C] (per group of channels with `groups`)."""
        mean, var = self.moments[id(layer)]
        if groups:  # groups hold equally many pixels: average the per-channel moments
            b = mean.shape[0]
            second = (var + mean * mean).view(b, groups, -1).mean(-1)
            mean = mean.view(b, groups, -1).mean(-1)
            var = (second - mean * mean).clamp(min=0)
        return mean, var

    def _group_norm(self, layer: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        mean, var = self._moments(layer, layer.num_groups)  # [B, G]
        b, g = mean.shape
        rstd = (var + layer.eps).rsqrt()
        scale = layer.weight.double().view(1, g, -1) * rstd[..., None]  # [B, G, C/G]
        shift = layer.bias.double().view(1, g, -1) - mean[..., None] * scale
        scale, shift = (t.view(b, -1, 1, 1).float() for t in (scale, shift))
        return torch.addcmul(shift, x.float(), scale).to(x.dtype)

    def _attention(self, layer, x: torch.Tensor) -> torch.Tensor:
        mean, var = (m[..., None, None].to(x.dtype) for m in self._moments(layer))  # [B, C, 1, 1]
        return layer.reweight(x, mean, var)
