"""Gaussian diffusion (DDPM, epsilon-parameterised) used by LDCSR stage 2: schedule and sampler.

The denoiser is passed in as ``denoise_fn(x_t, cond, t) -> eps``; this module knows nothing about
the UNet, the condition or the embeddings. Equations refer to Ho et al., 2020 (DDPM).
"""

import torch
from torch import nn


def make_beta_schedule(timesteps: int, linear_start: float, linear_end: float) -> torch.Tensor:
    """Latent-diffusion's "linear" schedule: linear in sqrt(beta), then squared.

    Args:
        timesteps: number of steps T.
        linear_start: beta_0.
        linear_end: beta_{T-1}.

    Returns:
        [T] float64 betas, e.g. T=4, 0.1 -> 0.99 gives [0.1, 0.2943, 0.5910, 0.99].
    """
    sqrt_betas = torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64)
    return sqrt_betas**2


def draw_noise(shape, timesteps: int, generator=None, device=None, dtype=torch.float32):
    """Draw ``x_T`` and the per-step noises in the sampler's order.

    With a CPU ``generator`` the draws are ``torch.randn(shape, generator=g)`` on the CPU, x_T first
    and then one tensor per step for t = T-1, ..., 0, moved to ``device``/``dtype`` afterwards, so a
    seed gives the same numbers on every device. Without one, the global RNG of ``device`` is used.

    Returns:
        (x_T [*shape], noises [T, *shape]); ``noises[i]`` belongs to step t = T-1-i.
    """
    draws = [_randn(shape, generator, device, dtype) for _ in range(timesteps + 1)]
    return draws[0], torch.stack(draws[1:])


def _randn(shape, generator, device, dtype) -> torch.Tensor:
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def _extract(buffer: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``buffer[t]`` reshaped to [B, 1, ..., 1] for broadcasting against an ``ndim``-D tensor."""
    return buffer[t].reshape(-1, *([1] * (ndim - 1)))


class GaussianDiffusion(nn.Module):
    """DDPM forward process q and ancestral reverse sampler (fixed, clipped posterior variance).

    All buffers are float32, computed in float64 first, and registered non-persistent: they derive
    from the constructor arguments, and the owning LightningModule decides what goes into a
    checkpoint. Buffer names are latent-diffusion's.

    Args:
        timesteps: T (4 in LDCSR).
        linear_start: first beta (0.1).
        linear_end: last beta (0.99).
    """

    def __init__(self, timesteps: int = 4, linear_start: float = 0.1, linear_end: float = 0.99):
        super().__init__()
        self.num_timesteps = timesteps
        betas = make_beta_schedule(timesteps, linear_start, linear_end)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # Posterior q(x_{t-1} | x_t, x_0) variance and mean coefficients (DDPM eq. 6-7).
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "log_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).log(),
            "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
            "posterior_variance": posterior_variance,
            # The variance is 0 at t = 0, hence the clamp before the log.
            "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev)
            * alphas.sqrt()
            / (1.0 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    def _t(self, t, x: torch.Tensor) -> torch.Tensor:
        """An int or [B] tensor of steps -> [B] long tensor on x's device."""
        t = torch.as_tensor(t, dtype=torch.long, device=x.device)
        return t.expand(x.shape[0]) if t.ndim == 0 else t

    def q_sample(self, x0, t, noise=None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (DDPM eq. 4).

        Args:
            x0: [B, C, h, w] clean latent.
            t: int or [B] long steps in [0, T).
            noise: [B, C, h, w] standard normal noise (drawn when None).

        Returns:
            [B, C, h, w] x_t.
        """
        noise = torch.randn_like(x0) if noise is None else noise
        t = self._t(t, x0)
        return (
            _extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
        )

    def predict_x0(self, x_t, t, eps) -> torch.Tensor:
        """Invert eq. 4 for x_0: x0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps (eq. 15).

        Args:
            x_t: [B, C, h, w]; t: int or [B] long steps; eps: [B, C, h, w] predicted noise.

        Returns:
            [B, C, h, w] x0 estimate, not clipped.
        """
        t = self._t(t, x_t)
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps
        )

    def q_posterior(self, x0, x_t, t):
        """Mean and variance of q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7).

        ``mean = coef1_t x0 + coef2_t x_t`` with ``coef1 = beta_t sqrt(abar_{t-1}) / (1 - abar_t)``
        and ``coef2 = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t)``.

        Returns:
            (mean [B, C, h, w], variance [B, 1, 1, 1], log variance clipped [B, 1, 1, 1]).
        """
        t = self._t(t, x_t)
        mean = (
            _extract(self.posterior_mean_coef1, t, x_t.ndim) * x0
            + _extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t
        )
        var = _extract(self.posterior_variance, t, x_t.ndim)
        log_var = _extract(self.posterior_log_variance_clipped, t, x_t.ndim)
        return mean, var, log_var

    def p_sample(self, denoise_fn, x_t, cond, t, noise=None) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1} (DDPM eq. 11 via x0, Algorithm 2).

        ``eps = denoise_fn(x_t, cond, t)``, ``x0 = predict_x0(x_t, t, eps)`` (no clipping),
        ``x_{t-1} = mean(x0, x_t) + exp(0.5 log_var_t) * noise``, without noise where t = 0.

        Args:
            denoise_fn: callable ``(x_t [B, C, h, w], cond, t [B] long) -> eps [B, C, h, w]``.
            x_t: [B, C, h, w]; cond: passed to ``denoise_fn`` untouched.
            t: int or [B] long steps.
            noise: [B, C, h, w] standard normal noise (drawn when None).

        Returns:
            [B, C, h, w] x_{t-1}.
        """
        t = self._t(t, x_t)
        eps = denoise_fn(x_t, cond, t)
        x0 = self.predict_x0(x_t, t, eps)
        mean, _, log_var = self.q_posterior(x0, x_t, t)
        noise = torch.randn_like(x_t) if noise is None else noise
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return mean + nonzero * (0.5 * log_var).exp() * noise

    def sample(
        self,
        denoise_fn,
        x_T=None,
        cond=None,
        noises=None,
        generator=None,
        shape=None,
        temperature: float = 1.0,
    ):
        """Run the reverse chain t = T-1, ..., 0 from x_T; differentiable (no ``no_grad`` inside).

        Noise: explicit ``x_T`` and/or ``noises`` are used as given; what is missing is drawn from
        ``generator`` (a CPU ``torch.Generator``, see :func:`draw_noise`: x_T first when it is
        not given, then one tensor per step, the t = 0 draw made and discarded) or, without a
        generator, from the global RNG of the buffers' device.

        Args:
            denoise_fn: callable ``(x_t, cond, t [B] long) -> eps`` (e.g. a closure over the UNet).
            x_T: [B, C, h, w] start point; drawn when None (then ``shape`` is required).
            cond: anything; passed to ``denoise_fn`` untouched.
            noises: [T, B, C, h, w] step noises, ``noises[i]`` for t = T-1-i.
            generator: optional CPU ``torch.Generator``.
            shape: (B, C, h, w) when ``x_T`` is None.
            temperature: factor on each step noise (1: DDPM's ancestral sampler); x_T and the
                draws themselves are unchanged.

        Returns:
            x_0 [B, C, h, w].
        """
        device, dtype = self.betas.device, self.betas.dtype
        if x_T is None:
            if shape is None:
                raise ValueError("GaussianDiffusion.sample: pass x_T or shape")
            x_T = _randn(tuple(shape), generator, device, dtype)
        if noises is not None and tuple(noises.shape) != (self.num_timesteps, *x_T.shape):
            raise ValueError(
                f"GaussianDiffusion.sample: noises must have shape "
                f"{(self.num_timesteps, *x_T.shape)}, got {tuple(noises.shape)}"
            )
        x = x_T
        for i, t in enumerate(reversed(range(self.num_timesteps))):
            if noises is None:
                noise = _randn(x.shape, generator, x.device, x.dtype)
            else:
                noise = noises[i]
            x = self.p_sample(
                denoise_fn, x, cond, t, noise if temperature == 1 else noise * temperature
            )
        return x
