"""Whole-scene normalisation statistics for tiled inference (GroupNorm, IMDN channel attention).

GroupNorm (condition encoder, decoder latent branch) and the contrast-aware channel attention of
the IMD modules (decoder SR branch) normalise with statistics of their whole input. A tile alone
would use its own statistics: neighbouring tiles would disagree and seams would show (and a
layer's statistics cannot be gathered tile by tile, since they depend on how the earlier layers
normalised). `SceneStatistics` records every layer's statistics in one untiled reference pass
(`collect()`: the scene itself when it fits in memory, else a downscaled copy of it) and then
normalises every tile with them (`apply()`), so all tiles compute the same function. Streamed
stage by stage (`measure()`), it gathers the exact statistics of the untiled run instead: each
layer's sums over the tiles' own pixels, with every earlier layer already normalised exactly.
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
    """Records the input statistics of normalisation layers and replays them.

    Args:
        modules: modules to search for normalisation layers.
        types: the layer types to share statistics for (`nn.GroupNorm`,
            `ContrastChannelAttention`).
    """

    def __init__(self, modules: Iterable[nn.Module], types: tuple = TYPES):
        self.layers = [m for module in modules for m in module.modules() if isinstance(m, types)]
        self.moments: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> mean, var [B, C]
        self.sums: dict[int, list] = {}  # id -> [count, sum [B, C], sum of squares [B, C]]

    @contextlib.contextmanager
    def collect(self):
        """Usual normalisation; records each layer's per-channel mean and variance [B, C]."""
        self.moments = {}
        with self._patched(collect=True):
            yield

    @contextlib.contextmanager
    def apply(self):
        """Normalisation with the statistics recorded by the last `collect`."""
        with self._patched(collect=False):
            yield

    @contextlib.contextmanager
    def measure(self, box):
        """Layers with moments normalise with them; the first one reached without adds the
        per-channel count, sum and sum of squares (float64) of its input's pixels in `box`
        ((r0, r1), (c0, c1): the tile's own pixels) to its totals and stops the forward
        (`StopStage`, which the caller catches)."""
        with self._patched(collect=False, box=box):
            yield

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

    @contextlib.contextmanager
    def _patched(self, collect: bool, box=None):
        for layer in self.layers:
            method = self._group_norm if isinstance(layer, nn.GroupNorm) else self._attention
            layer.forward = partial(method, layer, collect)  # shadows the class method
            if box is not None and id(layer) not in self.moments:
                layer.forward = partial(self._add_sums, layer, box)
        try:
            yield
        finally:
            for layer in self.layers:
                layer.__dict__.pop("forward", None)

    def _record(self, layer: nn.Module, x: torch.Tensor) -> None:
        var, mean = torch.var_mean(x.float(), dim=(-2, -1), correction=0)  # [B, C]
        self.moments[id(layer)] = (mean.double(), var.double())

    def _moments(self, layer: nn.Module, groups: int = 0):
        """Recorded mean and variance [B, C] (per group of channels with `groups`)."""
        if id(layer) not in self.moments:
            raise RuntimeError("SceneStatistics.apply: run a reference pass under collect() first")
        mean, var = self.moments[id(layer)]
        if groups:  # groups hold equally many pixels: average the per-channel moments
            b = mean.shape[0]
            second = (var + mean * mean).view(b, groups, -1).mean(-1)
            mean = mean.view(b, groups, -1).mean(-1)
            var = (second - mean * mean).clamp(min=0)
        return mean, var

    def _group_norm(self, layer: nn.GroupNorm, collect: bool, x: torch.Tensor) -> torch.Tensor:
        if collect:
            self._record(layer, x)
            return type(layer).forward(layer, x)
        mean, var = self._moments(layer, layer.num_groups)  # [B, G]
        b, g = mean.shape
        rstd = (var + layer.eps).rsqrt()
        scale = layer.weight.double().view(1, g, -1) * rstd[..., None]  # [B, G, C/G]
        shift = layer.bias.double().view(1, g, -1) - mean[..., None] * scale
        scale, shift = (t.view(b, -1, 1, 1).float() for t in (scale, shift))
        return torch.addcmul(shift, x.float(), scale).to(x.dtype)

    def _attention(self, layer, collect: bool, x: torch.Tensor) -> torch.Tensor:
        if collect:
            self._record(layer, x)
            return type(layer).forward(layer, x)
        mean, var = (m[..., None, None].to(x.dtype) for m in self._moments(layer))  # [B, C, 1, 1]
        return layer.reweight(x, mean, var)
