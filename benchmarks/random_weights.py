"""Random weights that exercise the whole network: a fresh LDCSR's zero-initialised convs given
the small non-zero weights training would give them (used by the benchmarks and the tests)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # annotation only
    from models.ldcsr import LDCSR


def randomize_zero_init(model: LDCSR, std: float = 0.02) -> None:
    """Give the UNet's zero-initialised convs (its output conv and every ResBlock's last conv)
    N(0, std) weights, as training would, and copy them to the EMA (sampling uses it). For tests
    and benchmarks with random weights: a fresh UNet predicts eps = 0 exactly, which would hide
    its embeddings and the sampling chain from any comparison."""
    with torch.no_grad():
        for name, param in model.model.named_parameters():
            if param.dim() > 1 and not param.any():
                nn.init.normal_(param, std=std)
                getattr(model.model_ema, model.model_ema.m_name2s_name[name]).copy_(param)
