"""The paper's metrics (docs/method.md, "Evaluation protocol"): PSNR, SSIM, LPIPS and FID.

Two protocols (docs/departures.md, "Evaluation protocols"). SR and HR are float images in
[0, 1], quantised to uint8 values (``round(clamp(x, 0, 1) * 255)``) by both.
``test-script`` (the authors' test.py): ``psnr``/``ssim`` crop ``ceil(scale)`` pixels from every
border and use RGB (or BT.601 Y with ``test_y=True``), in float64 like BasicSR's
``calculate_psnr`` and ``calculate_ssim``. ``paper`` (the authors' benchmark script, which scores
with pyiqa): ``psnr_pyiqa``/``ssim_pyiqa``, no border crop, as pyiqa's ``psnr`` (RGB) and
``ssim`` (YIQ luma) metrics. LPIPS and Inception networks are injected (``utils/weights.py``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from pytorch_fid.fid_score import (
    IMAGE_EXTENSIONS,
    calculate_frechet_distance,
    compute_statistics_of_path,
    get_activations,
)
from scipy import ndimage
from torch import nn

from utils.distributed import World
from utils.weights import build_inception

FIDStatistics = tuple[np.ndarray, np.ndarray]  # (mu [dims], sigma [dims, dims]), float64


def crop_border_for(scale: float) -> int:
    """Border crop of the paper protocol: ``ceil(scale)`` pixels."""
    return math.ceil(scale)


def quantize(x01: torch.Tensor) -> torch.Tensor:
    """``round(clamp(x, 0, 1) * 255)`` as uint8 (round half to even), any shape."""
    return torch.round(x01.detach().clamp(0, 1) * 255).to(torch.uint8)


def _check_pair(sr: torch.Tensor, hr: torch.Tensor) -> None:
    """ValueError unless sr and hr are RGB images of one shape, [3, H, W] or [B, 3, H, W]."""
    if sr.shape != hr.shape or sr.dim() not in (3, 4) or sr.shape[-3] != 3:
        raise ValueError(
            f"sr and hr must both be [3, H, W] or [B, 3, H, W]; got {tuple(sr.shape)} and "
            f"{tuple(hr.shape)}"
        )


def _prepare(sr: torch.Tensor, hr: torch.Tensor, crop_border: int, test_y: bool) -> torch.Tensor:
    """Quantise, crop and optionally convert to Y: -> float64 [2, B, C, H', W'] in [0, 255]."""
    _check_pair(sr, hr)
    if crop_border < 0 or 2 * crop_border >= min(sr.shape[-2:]):
        raise ValueError(f"crop_border={crop_border} is invalid for images of {tuple(sr.shape)}")
    x = torch.stack([quantize(sr), quantize(hr.to(sr.device))]).double()
    x = x if x.dim() == 5 else x.unsqueeze(1)  # [2, B, 3, H, W]
    if crop_border > 0:
        x = x[..., crop_border:-crop_border, crop_border:-crop_border]
    if test_y:  # BT.601 luma in [16, 235] (BasicSR's rgb2ycbcr(y_only=True), not rounded)
        coef = x.new_tensor([65.481, 128.553, 24.966]).view(3, 1, 1) / 255.0
        x = (x * coef).sum(dim=-3, keepdim=True) + 16.0  # [2, B, 1, H', W']
    return x


def psnr(
    sr: torch.Tensor, hr: torch.Tensor, crop_border: int, test_y: bool = False
) -> torch.Tensor:
    """PSNR in dB on uint8-quantised images: ``10 log10(255^2 / mean((sr - hr)^2))``.

    Args:
        sr, hr: float [3, H, W] or [B, 3, H, W] in [0, 1] (quantised here).
        crop_border: pixels cropped from each border (``crop_border_for(scale)``).
        test_y: compare BT.601 Y instead of all RGB values.

    Returns:
        float64 tensor, [] or [B] (per image); inf for identical images.
    """
    x = _prepare(sr, hr, crop_border, test_y)
    mse = ((x[0] - x[1]) ** 2).mean(dim=(1, 2, 3))  # [B]
    out = 10.0 * torch.log10(255.0**2 / mse)
    return out if sr.dim() == 4 else out[0]


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """1-D MATLAB/cv2 Gaussian window (float64, sums to 1); the 2-D window is its outer product."""
    g = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    sr: torch.Tensor, hr: torch.Tensor, crop_border: int, test_y: bool = False
) -> torch.Tensor:
    """MATLAB-style SSIM (Wang et al. 2004) on uint8-quantised images, averaged over channels.

    Gaussian window 11x11, sigma 1.5, 'valid' filtering (no padding), ``C1 = (0.01*255)^2``,
    ``C2 = (0.03*255)^2``, float64; per channel the mean of the SSIM map, then the mean over
    the channels (RGB) — BasicSR's ``calculate_ssim`` (its 2-D filter is applied here as two
    separable 1-D passes on the CPU, equal up to ~1e-13 rounding).

    Args:
        sr, hr: float [3, H, W] or [B, 3, H, W] in [0, 1] (quantised here).
        crop_border: pixels cropped from each border before SSIM (``crop_border_for(scale)``).
        test_y: compare BT.601 Y instead of RGB.

    Returns:
        float64 tensor, [] or [B] (per image).
    """
    x = _prepare(sr, hr, crop_border, test_y).cpu().numpy()  # [2, B, C, H', W']
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels after cropping, got {x.shape[-2:]}")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    window = _gaussian_window()

    def filt(t: np.ndarray) -> np.ndarray:  # [B, C, H', W'] -> 'valid' [B, C, H'-10, W'-10]
        t = ndimage.correlate1d(ndimage.correlate1d(t, window, axis=-2), window, axis=-1)
        return t[..., 5:-5, 5:-5]  # drop every position whose window reaches the padding

    img1, img2 = x[0], x[1]
    mu1, mu2 = filt(img1), filt(img2)
    sigma1_sq = filt(img1 * img1) - mu1**2
    sigma2_sq = filt(img2 * img2) - mu2**2
    sigma12 = filt(img1 * img2) - mu1 * mu2
    ssim_map = ((2 * mu1 * mu2 + c1) * (2 * sigma12 + c2)) / (
        (mu1**2 + mu2**2 + c1) * (sigma1_sq + sigma2_sq + c2)
    )
    out = torch.from_numpy(ssim_map.mean(axis=(2, 3)).mean(axis=1))  # per channel, then mean: [B]
    return out if sr.dim() == 4 else out[0]


PYIQA_EPS = 1e-8  # pyiqa's psnr adds it to the MSE: identical images give 80 dB, not inf
_YIQ = ((0.299, 0.587, 0.114), (0.5959, -0.2746, -0.3213), (0.2115, -0.5227, 0.3112))


def _uint8_pair(sr: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images quantised and as [B, 3, H, W] float32 in [0, 1] (pyiqa's input, k / 255)."""
    _check_pair(sr, hr)
    a, b = (quantize(t.cpu()).float() / 255.0 for t in (sr, hr))
    return (a, b) if sr.dim() == 4 else (a[None], b[None])


def _yiq_luma(x: torch.Tensor) -> torch.Tensor:
    """pyiqa's ``to_y_channel(x, 255, 'yiq')``: [B, 3, H, W] in [0, 1] -> rounded Y [B, 1, H, W]
    in [0, 255] (float32 matmul in pyiqa's order, so the rounding agrees)."""
    weights = torch.tensor(_YIQ).t()  # [3, 3]
    y = torch.matmul(x.permute(0, 2, 3, 1), weights).permute(0, 3, 1, 2)[:, :1]
    return (y * 255).round()


def psnr_pyiqa(sr: torch.Tensor, hr: torch.Tensor, test_y: bool = False) -> torch.Tensor:
    """PSNR of the ``paper`` protocol: pyiqa's ``psnr`` (``psnry`` with ``test_y``), no crop.

    ``10 log10(1 / (mse + 1e-8))`` on the uint8 images scaled to [0, 1] (data range 1), over
    RGB, or over the YIQ luma ``0.299 R + 0.587 G + 0.114 B`` (not rounded) with ``test_y``;
    in float64 (pyiqa: float32, equal to ~1e-5 dB).

    Args:
        sr, hr: float [3, H, W] or [B, 3, H, W] in [0, 1] (quantised here).
        test_y: compare the YIQ luma instead of all RGB values.

    Returns:
        float64 tensor, [] or [B] (per image); 80 dB for identical images.
    """
    a, b = _uint8_pair(sr, hr)
    a, b = a.double(), b.double()
    if test_y:
        weights = a.new_tensor(_YIQ[0]).view(1, 3, 1, 1)
        a, b = (a * weights).sum(1, keepdim=True), (b * weights).sum(1, keepdim=True)
    out = 10.0 * torch.log10(1.0 / (((a - b) ** 2).mean(dim=(1, 2, 3)) + PYIQA_EPS))
    return out if sr.dim() == 4 else out[0]


def ssim_pyiqa(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """SSIM of the ``paper`` protocol: pyiqa's ``ssim`` metric (its defaults), no crop.

    On the rounded YIQ luma in [0, 255] (``_yiq_luma``), float64: 11x11 Gaussian window
    (sigma 1.5, 'valid'), ``C1 = (0.01*255)^2``, ``C2 = (0.03*255)^2``, the contrast-structure
    term clipped at 0 (pyiqa's ``relu``), mean of the map; no downsampling.

    Args:
        sr, hr: float [3, H, W] or [B, 3, H, W] in [0, 1] (quantised here).

    Returns:
        float64 tensor, [] or [B] (per image).
    """
    a, b = (_yiq_luma(t).double() for t in _uint8_pair(sr, hr))
    if min(a.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels, got {tuple(a.shape[-2:])}")
    window = torch.from_numpy(np.outer(_gaussian_window(), _gaussian_window()))
    window = window.float().double()[None, None]  # pyiqa keeps its window in float32

    def filt(t: torch.Tensor) -> torch.Tensor:  # 'valid': [B, 1, H-10, W-10]
        return torch.nn.functional.conv2d(t, window)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = filt(a), filt(b)
    sigma1_sq, sigma2_sq = filt(a * a) - mu1**2, filt(b * b) - mu2**2
    sigma12 = filt(a * b) - mu1 * mu2
    cs_map = torch.relu((2 * sigma12 + c2) / (sigma1_sq + sigma2_sq + c2))
    out = (((2 * mu1 * mu2 + c1) / (mu1**2 + mu2**2 + c1)) * cs_map).mean(dim=(1, 2, 3))
    return out if sr.dim() == 4 else out[0]


def lpips_distance(sr: torch.Tensor, hr: torch.Tensor, net: nn.Module) -> torch.Tensor:
    """LPIPS with an injected ``lpips.LPIPS`` net (paper: AlexNet v0.1, ``build_lpips("alex")``).

    Args:
        sr, hr: float [3, H, W] or [B, 3, H, W] in [0, 1]; mapped to [-1, 1] here. Pass
            ``quantize(x) / 255`` to measure the saved uint8 images.
        net: LPIPS module ``(a, b) -> [B, 1, 1, 1]`` with inputs in [-1, 1].

    Returns:
        float tensor on the CPU, [] or [B] (per image); computed without gradients.
    """
    if sr.shape != hr.shape or sr.dim() not in (3, 4):
        raise ValueError(f"sr and hr must have the same [B,] 3, H, W shape: {sr.shape}, {hr.shape}")
    device = next(net.parameters()).device
    a, b = (t.unsqueeze(0) if t.dim() == 3 else t for t in (sr, hr))
    with torch.no_grad():
        out = net(a.to(device) * 2 - 1, b.to(device) * 2 - 1).flatten().cpu()  # [B]
    return out if sr.dim() == 4 else out[0]


def _check_image_folder(folder: str | os.PathLike) -> str:
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"FID image folder {path} does not exist")
    if not any(p.suffix[1:] in IMAGE_EXTENSIONS for p in path.iterdir()):
        raise FileNotFoundError(
            f"FID image folder {path} holds no image with a lower-case extension in "
            f"{sorted(IMAGE_EXTENSIONS)} (pytorch-fid only reads those)"
        )
    return str(path)


def fid_statistics(
    folder: str | os.PathLike,
    model: nn.Module | None = None,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    dims: int = 2048,
    num_workers: int = 0,
) -> FIDStatistics:
    """Gaussian fit of a folder's Inception features (pytorch-fid's ``compute_statistics_of_path``).

    Compute it once for a reference folder and pass it to ``frechet_distance`` with each folder
    compared against it.

    Args:
        folder: folder of images (pytorch-fid's extensions, read as RGB in [0, 1]).
        model: pytorch-fid ``InceptionV3`` returning the ``dims``-d block; default
            ``utils.weights.build_inception(dims)`` (2048-d pool3 with the TF-Inception weights).
        batch_size, device, dims, num_workers: as in pytorch-fid.

    Returns:
        ``(mu, sigma)``: float64 mean [dims] and covariance [dims, dims] of the features.
    """
    path = _check_image_folder(folder)
    model = (build_inception(dims) if model is None else model).to(device)
    return compute_statistics_of_path(path, model, batch_size, dims, device, num_workers)


def fid_statistics_sharded(
    folder: str | os.PathLike,
    world: World,
    model: nn.Module,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    dims: int = 2048,
) -> FIDStatistics | None:
    """``fid_statistics`` computed by all ranks of ``world`` together (``utils.distributed``).

    The folder's files in pytorch-fid's order and batches; batch k runs on rank k mod size and
    rank 0 fits the features of all images in file order, so the result equals
    ``fid_statistics(folder, model, batch_size, device, dims)``. Every rank must call it.

    Returns:
        ``(mu, sigma)`` on rank 0, None on the other ranks.
    """
    path = Path(_check_image_folder(folder))
    files = sorted(file for ext in IMAGE_EXTENSIONS for file in path.glob(f"*.{ext}"))
    size = min(batch_size, len(files))  # as pytorch-fid's get_activations
    chunks = [files[i : i + size] for i in range(0, len(files), size)]
    model = model.to(device)
    mine = [get_activations(c, model, len(c), dims, device, 0) for c in world.shard(chunks)]
    shards = world.gather(mine)
    if shards is None:
        return None
    features = np.concatenate(world.unshard(shards))  # [N, dims] in file order
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(stats_a: FIDStatistics, stats_b: FIDStatistics) -> float:
    """FID of two ``fid_statistics`` fits (pytorch-fid's ``calculate_frechet_distance``):
    ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``."""
    return float(calculate_frechet_distance(*stats_a, *stats_b))
