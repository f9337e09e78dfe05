"""High-frequency energy of super-resolved images against their HR: how much of the fine detail
an output has, whatever its position (a regression output is blurred: ratio < 1; a generative one
can restore energy there without matching the HR pixel for pixel).
"""

from __future__ import annotations

import torch


def radial_power(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Power spectrum of an image's luminance (mean over channels, mean removed).

    Args:
        img: [3, H, W] or [H, W] in [0, 1].

    Returns:
        power [H, W // 2 + 1] (`|rfft2|^2`) and the radial frequency of each bin in cycles per
        pixel (0 .. sqrt(2) / 2; the Nyquist frequency is 0.5).
    """
    grey = img.float().mean(dim=0) if img.dim() == 3 else img.float()
    power = torch.fft.rfft2(grey - grey.mean()).abs().pow(2)
    fy = torch.fft.fftfreq(grey.shape[0])[:, None]
    fx = torch.fft.rfftfreq(grey.shape[1])[None, :]
    return power, (fy**2 + fx**2).sqrt()


def high_frequency_energy(img: torch.Tensor, cutoff: float = 0.25) -> float:
    """Spectral energy above `cutoff` x Nyquist (radial frequency > cutoff / 2 cycles/pixel)."""
    power, radius = radial_power(img)
    return float(power[radius > cutoff * 0.5].sum())


def hf_energy_ratio(sr: torch.Tensor, hr: torch.Tensor, cutoff: float = 0.25) -> float:
    """Energy of `sr` above `cutoff` x Nyquist over that of `hr` (1 = as much detail as the HR;
    bicubic and regression outputs are below 1). sr, hr: [3, H, W] in [0, 1]."""
    return high_frequency_energy(sr, cutoff) / max(high_frequency_energy(hr, cutoff), 1e-12)
