"""Exponential moving average of the stage-2 UNet weights (latent-diffusion's ``LitEma``).

Shadow weights are buffers named like the parameters with the dots removed, so a LightningModule
holding ``self.model_ema = LitEma(self.model)`` writes the authors' checkpoint keys
(``model_ema.diffusion_modeltime_embed0weight``, ``model_ema.decay``, ``model_ema.num_updates``).
"""

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


class LitEma(nn.Module):
    """EMA of a module's trainable parameters, stored as buffers.

    Each update applies ``shadow -= (1 - d) * (shadow - param)`` with the effective decay
    ``d = min(decay, (1 + n) / (10 + n))``, n being the number of updates so far including this one
    (warm-up), or ``d = decay`` when ``use_num_updates`` is False (``num_updates`` is then -1).

    A state dict without ``decay``/``num_updates`` (e.g. a reduced reference dict) loads with
    ``strict=False``; the constructor values are kept for the missing entries.

    Args:
        model: the module to track (its ``requires_grad`` parameters).
        decay: EMA decay in [0, 1] (0.9999 in LDCSR).
        use_num_updates: use the warm-up schedule above.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_updates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"LitEma: decay must be in [0, 1], got {decay}")
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer(
            "num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int)
        )
        self.m_name2s_name = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            s_name = name.replace(".", "")
            if s_name in self.m_name2s_name.values():
                raise ValueError(f"LitEma: parameter name {name!r} collides once dots are removed")
            self.m_name2s_name[name] = s_name
            self.register_buffer(s_name, p.detach().clone())
        self.collected_params: list[torch.Tensor] = []

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """Move the shadow weights towards ``model``'s current parameters (one EMA step)."""
        decay = self.decay  # 0-d float32 tensors throughout, as the authors' (no host sync)
        if self.num_updates >= 0:
            self.num_updates += 1
            decay = torch.minimum(decay, (1 + self.num_updates) / (10 + self.num_updates))
        one_minus_decay = 1.0 - decay
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if name not in self.m_name2s_name:
                raise KeyError(f"LitEma: parameter {name!r} was not tracked at construction")
            s = shadow[self.m_name2s_name[name]]
            s.sub_(one_minus_decay * (s - p.to(s.dtype)))

    update = forward

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s tracked parameters with the shadow weights."""
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(shadow[self.m_name2s_name[name]])

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Save a copy of ``parameters`` (to be restored after evaluating with EMA weights)."""
        self.collected_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Copy the parameters saved by :meth:`store` back into ``parameters``."""
        if not self.collected_params:
            raise RuntimeError("LitEma.restore: call store() first")
        for saved, p in zip(self.collected_params, parameters, strict=True):
            p.copy_(saved)

    @contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[None]:
        """Context manager: ``model`` holds the EMA weights inside, its own weights afterwards."""
        self.store(model.parameters())
        self.copy_to(model)
        try:
            yield
        finally:
            self.restore(model.parameters())
