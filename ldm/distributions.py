"""Diagonal Gaussian posterior of the stage-1 KL autoencoder (docs/method.md)."""

from __future__ import annotations

import torch


class DiagonalGaussianDistribution:
    """N(mean, exp(logvar)) over latents, built from the encoder's 2·C-channel output.

    Args:
        parameters: [B, 2C, h, w]; split into mean and log-variance along channels.
        deterministic: if True the variance is zero (sample == mode).
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * N(0, I); the noise is drawn on the generator's device, then moved."""
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device)
        return self.mean + self.std * noise.to(self.mean)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL to N(0, I) summed over C, H, W: 0.5·Σ(mean² + var − 1 − logvar); shape [B]."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
