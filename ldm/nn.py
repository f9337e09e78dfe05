"""Stage-2 UNet helpers: sinusoidal embeddings, zero-initialisation and float32 GroupNorm.

They follow improved-diffusion / latent-diffusion's ``nn.py`` so that the authors' weights load.
"""

import math

import torch
from torch import nn


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding of (possibly non-integer) positions, as in improved-diffusion.

    ``emb = [cos(t * f_i), sin(t * f_i)]`` with ``f_i = max_period^(-i / (dim // 2))``, computed in
    float32 (cos half first, as the authors' weights expect).

    Args:
        timesteps: [B] tensor of positions (int or float): timesteps, scales or output sizes.
        dim: embedding width; an odd width gets one zero column appended.
        max_period: controls the lowest frequency.

    Returns:
        [B, dim] float32 tensor.
    """
    if timesteps.ndim != 1:
        raise ValueError(
            f"timestep_embedding expects a 1-D tensor [B], got {tuple(timesteps.shape)}"
        )
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=timesteps.device)
        / half
    )
    args = timesteps[:, None].float() * freqs[None]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of ``module`` in place and return it (used for residual output convs)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back to the input dtype (stable under fp16/bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The UNet's norm layer: 32 groups, PyTorch's default eps 1e-5 (the autoencoder uses 1e-6)."""
    return GroupNorm32(32, channels)
