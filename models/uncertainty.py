"""Per-pixel uncertainty of LDCSR: the spread of several diffusion samples of one input.

The map is the standard deviation over N samples (population std, i.e. divided by N) of the
[0, 1] outputs, averaged over the colour channels. Sample k is drawn with the CPU generator seeded
`seeds[k]`, exactly as a separate run with that seed, so tiled scenes give the same map as
untiled ones (`LDCSR.super_resolve` draws one noise field per scene, shared by its tiles).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def seeds_from(seed: int, samples: int) -> list[int]:
    """`samples` seeds seed, seed + 1, ..., seed + samples - 1 (samples >= 2)."""
    if samples < 2:
        raise ValueError(f"an uncertainty map needs at least 2 samples, got {samples}")
    return [seed + k for k in range(samples)]


def sample_spread(
    draw: Callable[[torch.Generator], torch.Tensor], seeds: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws one sample per seed and returns (the first sample, the uncertainty map).

    Memory stays at three images whatever the number of samples (Welford's running mean and
    sum of squared deviations).

    Args:
        draw: `draw(generator) -> [B, 3, H, W]` in [0, 1], one sample seeded by `generator`.
        seeds: the generators' seeds; the first one's sample is returned as the output.

    Returns:
        sample: [B, 3, H, W] float32, the sample of `seeds[0]`.
        uncertainty: [B, 1, H, W] float32, `std_k(sample_k)` per pixel and channel, averaged
            over the channels.
    """
    if len(seeds) < 2:
        raise ValueError(f"an uncertainty map needs at least 2 seeds, got {list(seeds)}")
    first = mean = m2 = None
    for k, seed in enumerate(seeds):
        x = draw(torch.Generator().manual_seed(int(seed))).float()
        if first is None:
            first, mean, m2 = x, x.clone(), torch.zeros_like(x)
            continue
        delta = x - mean
        mean += delta / (k + 1)
        m2 += delta * (x - mean)
    std = (m2 / len(seeds)).clamp_(min=0).sqrt_()
    return first, std.mean(dim=1, keepdim=True)
