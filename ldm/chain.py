"""A network as a chain of stages on a stack of feature maps (docs/method.md, "Tiled inference").

A network's forward runs its chain (`run_chain`); tiled inference streams the same chain by bands
of rows. A stage takes the `take` maps on top of the stack (all on one grid), returns one map or a
tuple of maps, which are pushed in order. Several live maps (a UNet's skip connections, an FRU's
running fusion, the decoder's per-level features) are the maps below the top.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch


class Stage(NamedTuple):
    """One stage of a chain.

    Attributes:
        fn: `fn(*maps) -> map or tuple of maps`, maps [B, C, H, W].
        halo: input rows an output row reads beyond its own (3x3 convolutions: 1 each): output
            row i reads rows [s i - halo, s (i + 1) + halo) with stride s, or
            [i // up - halo, i // up + 1 + halo) with `up`; None: every row (a global stage,
            such as attention, which runs whole).
        stride: the output grid is `stride` times coarser (a strided convolution or pooling
            whose output row i starts at input row stride * i, padding included).
        up: the output grid is `up` times finer (nearest upsampling, then convolutions).
        take: maps popped from the stack (all on the stage's input grid).
    """

    fn: Callable
    halo: int | None = 0
    stride: int = 1
    up: int = 1
    take: int = 1


def run_chain(chain: list[Stage], *maps: torch.Tensor) -> list[torch.Tensor]:
    """`maps` (bottom first) through `chain` -> the final stack, bottom first."""
    stack = list(maps)
    for stage in chain:
        args = stack[len(stack) - stage.take :]
        del stack[len(stack) - stage.take :]
        out = stage.fn(*args)
        stack.extend(out if isinstance(out, tuple) else (out,))
    return stack
