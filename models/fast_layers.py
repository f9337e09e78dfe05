"""Leaner evaluation of GAP encoder / decoder layers (§2) for inference, same math as `ldm/`.

`encode` runs a GAP encoder with in-place activations (fewer full-size temporaries);
`fast_fru` runs an FRU without its n*nf-channel concat (the 1x1 fusion is summed module by
module) and with contiguous IMD splits (channels-last convs on a channel slice fall back to a slow
kernel); `shuffle_resample` folds PixelShuffle(2) and an exact 2:1 or 4:1 bilinear resize into
the conv; `fuse_levels` runs the upsampler's 1x1 MLP as matrix products on chunks of pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def encode(encoder, x: torch.Tensor) -> torch.Tensor:
    """`GAPEncoder.forward` with `resnet_block` (x*sigmoid(x) as an in-place SiLU)."""
    h = encoder.conv_in(x)
    for level in encoder.down:
        for block in level.block:
            h = resnet_block(block, h)
        if hasattr(level, "downsample"):
            h = level.downsample(h)
    h = resnet_block(encoder.mid.block_2, resnet_block(encoder.mid.block_1, h))
    return encoder.conv_out(F.silu(encoder.norm_out(h), inplace=True))


def resnet_block(block, x: torch.Tensor) -> torch.Tensor:
    """`ResnetBlock.forward` (eval): the norm outputs are fresh tensors, so SiLU runs in place
    and the residual is added in place; 3 instead of ~6 full-size temporaries."""
    h = block.conv1(F.silu(block.norm1(x), inplace=True))
    h = block.conv2(block.dropout(F.silu(block.norm2(h), inplace=True)))
    return h.add_(block.nin_shortcut(x) if hasattr(block, "nin_shortcut") else x)


def fast_fru(fru, x: torch.Tensor) -> torch.Tensor:
    """`FRU.forward` (same math): the 1x1 fusion of the n concatenated IMD outputs is summed
    module by module (no n*nf-channel concat), and the IMD channel splits are made contiguous."""
    weight, nf, fused = fru.c[0].weight, x.shape[1], None
    h = x
    for j, imd in enumerate(fru.IMDB):
        h = _imd(imd, h)
        part = F.conv2d(
            h, _like(weight[:, j * nf : (j + 1) * nf], h), fru.c[0].bias if j == 0 else None
        )
        fused = part if fused is None else fused.add_(part)
    return fru.LR_conv(fru.c[1](fused)) + x


def _imd(imd, x: torch.Tensor) -> torch.Tensor:
    """`IMDModule.forward` with contiguous splits (a channels-last channel slice would send the
    next conv to PyTorch's slow fallback)."""
    split = (imd.distilled, imd.remaining)
    d1, r = torch.split(imd.act(imd.c1(x)), split, dim=1)
    d2, r = torch.split(imd.act(imd.c2(_like(r, x))), split, dim=1)
    d3, r = torch.split(imd.act(imd.c3(_like(r, x))), split, dim=1)
    out = torch.cat([d1, d2, d3, imd.c4(_like(r, x))], dim=1)  # [B, 4d, h, w]
    return imd.c5(imd.cca(out)) + x


def _like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`t` contiguous in the memory format of `x`."""
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return t.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def shuffle_resample(conv: nn.Conv2d, x: torch.Tensor, factor: int) -> torch.Tensor:
    """bilinear(PixelShuffle(2)(conv(x)), 1/factor) for factor 2 or 4, without the 4x channels.

    PixelShuffle puts sub-pixel filter (dy, dx) of output channel c at (2r + dy, 2q + dx); an
    exact 1/factor bilinear resize (align_corners=False) then averages fixed taps:
      factor 2 (x4 SR): all four sub-pixels of every position -> one conv with the four filters
        averaged, on x's grid;
      factor 4 (x2 SR): sub-pixel (1, 1) of (2i, 2j), (1, 0) of (2i, 2j+1), (0, 1) of (2i+1, 2j)
        and (0, 0) of (2i+1, 2j+1) -> four stride-2 convs of one filter each, averaged.

    Args:
        conv: Conv2d(nf -> 4 nf, 3x3, padding 1) followed by PixelShuffle(2) in the model.
        x: [B, nf, h, w] input (h, w even for factor 4).

    Returns:
        [B, nf, 2h/factor, 2w/factor], the resized pixel-shuffled output.
    """
    weight = conv.weight.view(-1, 4, *conv.weight.shape[1:])  # [nf, 4 sub-pixels, nf, 3, 3]
    bias = conv.bias.view(-1, 4)
    cl = x.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if cl else torch.contiguous_format
    if factor == 2:
        return F.conv2d(x, weight.mean(1).contiguous(memory_format=fmt), bias.mean(1), padding=1)
    if factor != 4:
        raise ValueError(f"shuffle_resample: factor must be 2 or 4, got {factor}")
    padded = F.pad(x, (1, 1, 1, 1))
    out = None
    for a in (0, 1):
        for b in (0, 1):
            sub = (1 - a) * 2 + (1 - b)  # the sub-pixel read at position (2i + a, 2j + b)
            w = weight[:, sub].contiguous(memory_format=fmt)
            y = F.conv2d(padded[..., a:, b:], w, bias[:, sub], stride=2)
            out = y if out is None else out.add_(y)
    return out.mul_(0.25)


def fuse_levels(
    fuse, levels: list[torch.Tensor], gates: torch.Tensor, dtype=None, chunk_pixels: int = 1 << 16
) -> torch.Tensor:
    """`fuse(cat_l(gate_l * level_l))` of the upsampler, channels last.

    Args:
        fuse: the upsampler's 1x1-conv MLP (`nn.Sequential` of Conv2d and ReLU).
        levels: L tensors [B, rows, cols, nf] (the resized pyramid levels).
        gates: [L] level weights, folded into the first conv's weight.
        dtype: compute dtype of the matrix products (default float32).
        chunk_pixels: pixels per matrix product; two buffers are reused across chunks
            (fresh large allocations cost page faults).

    Returns:
        [B, rows, cols, out_channels] float32.
    """
    convs = [m for m in fuse if isinstance(m, nn.Conv2d)]
    dtype = dtype or torch.float32
    nf = levels[0].shape[-1]
    first = convs[0].weight.flatten(1).view(-1, len(levels), nf) * gates[None, :, None]
    layers = [(first.flatten(1), convs[0].bias)]
    layers += [(c.weight.flatten(1), c.bias) for c in convs[1:]]
    layers = [(w.t().to(dtype), b.to(dtype)) for w, b in layers]  # [in, out], [out]
    b, rows, cols = levels[0].shape[:3]
    out = torch.empty(b, rows, cols, convs[-1].out_channels, device=levels[0].device)
    step = max(1, chunk_pixels // cols)
    size = b * min(step, rows) * cols * max(w.shape[0] for w, _ in layers)
    bufs = [torch.empty(size, dtype=dtype, device=levels[0].device) for _ in range(2)]
    for r in range(0, rows, step):
        chunk = [t[:, r : r + step] for t in levels]
        m = chunk[0].shape[0] * chunk[0].shape[1] * cols  # pixels in the chunk
        hid = bufs[0][: m * len(levels) * nf].view(*chunk[0].shape[:3], -1)
        hid = torch.cat(chunk, dim=-1, out=hid).view(m, -1)  # [pixels, L * nf]
        for i, (weight, bias) in enumerate(layers[:-1]):
            dst = bufs[(i + 1) % 2][: m * weight.shape[1]].view(m, -1)
            hid = torch.addmm(bias, hid.relu_() if i else hid, weight, out=dst)
        weight, bias = layers[-1]
        hid = torch.addmm(bias, hid.relu_(), weight)  # [pixels, out_ch]
        out[:, r : r + step] = hid.view(b, -1, cols, hid.shape[-1]).float()
    return out
