"""Test helpers: random stand-ins for pretrained files, the authors' key lists, random images.
Never imported by library code or benchmarks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from benchmarks.random_weights import randomize_zero_init  # noqa: F401 - for the tests
from utils.weights import WEIGHTS


def sample_trajectory(diffusion, denoise_fn, *args, **kwargs):
    """`diffusion.sample(denoise_fn, *args, **kwargs)` -> (x_0, trajectory [T, B, C, h, w]: every
    x_{t-1}, t = T-1 .. 0), the intermediate x_t read off the denoiser's inputs."""
    seen = []

    def recording(x_t, cond, t):
        seen.append(x_t)
        return denoise_fn(x_t, cond, t)

    x0 = diffusion.sample(recording, *args, **kwargs)
    return x0, torch.stack([*seen[1:], x0])


def _skeleton(name: str) -> nn.Module:
    """The module whose state dict the official file holds (built on the meta device)."""
    import torchvision

    with torch.device("meta"):
        if name == "alexnet":
            return torchvision.models.alexnet()
        if name == "vgg16":
            return torchvision.models.vgg16()
        # pytorch-fid's FID blocks subclass torchvision's and keep their parameter names.
        return torchvision.models.inception_v3(
            num_classes=1008, aux_logits=False, init_weights=False, weights=None
        )


def _random_tensors(module: nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in module.named_parameters(recurse=False):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            out[key] = torch.ones(t.shape) if key == "weight" else torch.zeros(t.shape)
        elif isinstance(module, nn.Linear):  # unused classifier heads: a broadcast 0 (tiny file)
            out[key] = torch.zeros(()).expand(t.shape)
        elif key == "weight":  # He init keeps activations O(1) through the trunk
            out[key] = torch.randn(t.shape, generator=gen) * (2.0 / t[0].numel()) ** 0.5
        else:
            out[key] = 0.01 * torch.randn(t.shape, generator=gen)
    for key, t in module.named_buffers(recurse=False):
        fill = torch.ones if key == "running_var" else torch.zeros
        out[key] = fill(t.shape, dtype=t.dtype)
    return out


def write_random_weights(
    torch_home: str | os.PathLike, names=("alexnet", "vgg16", "inception"), seed: int = 0
) -> list[Path]:
    """Write randomly initialised stand-ins for the official files (offline tests, smoke runs).

    Each file holds a state dict with the official keys and shapes under the official name in
    ``<torch_home>/hub/checkpoints/``, so the normal builders load it as if downloaded
    (``TORCH_HOME`` must point at ``torch_home``). Convs get He-normal weights, BatchNorms are the
    identity, and Linear layers (classifier heads LPIPS/FID never use) a broadcast zero to keep
    the files small (VGG16 ~59 MB, InceptionV3 ~87 MB, AlexNet ~10 MB). Metrics computed with
    them are meaningless; only use them to exercise code.

    Args:
        torch_home: folder used as ``$TORCH_HOME``.
        names: keys of ``WEIGHTS``.
        seed: seed of the random weights.

    Returns:
        The written paths.
    """
    folder = Path(torch_home) / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(names) - set(WEIGHTS))
    if unknown:
        raise KeyError(f"unknown pretrained files {unknown}; known: {sorted(WEIGHTS)}")
    gen, paths = torch.Generator().manual_seed(seed), []
    for name in names:
        state = {}
        for prefix, module in _skeleton(name).named_modules():
            for key, t in _random_tensors(module, gen).items():
                state[f"{prefix}.{key}" if prefix else key] = t
        paths.append(folder / WEIGHTS[name].file_name)
        torch.save(state, paths[-1])
    return paths


FIXTURES = Path(__file__).resolve().parent / "fixtures"


def official_keys(stage: str, prefix: str = "") -> dict[str, list[int]]:
    """The authors' state-dict names and shapes for the paper config of `stage` ("first_stage" or
    "second_stage"; tests/fixtures/official_keys_<stage>.tsv), restricted to names starting with
    `prefix`, which is removed."""
    rows = (FIXTURES / f"official_keys_{stage}.tsv").read_text().splitlines()
    pairs = (row.split("\t") for row in rows)
    return {k[len(prefix) :]: json.loads(v) for k, v in pairs if k.startswith(prefix)}


def write_rgb(path: Path, h: int, w: int, seed: int = 0) -> Path:
    """A random RGB PNG (or JPEG, by suffix) of size h x w."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def lively(model, seed: int = 0):
    """Random weights under which every part of LDCSR matters: He-scaled convolutions (the
    zero-initialised UNet outputs included) with damped residual branches, so activations stay
    O(1), eps ~ N(0, 1) and the upsampler adds ~0.2 of structure to the bicubic image. With
    PyTorch's default init the upsampler's output is nearly constant and a random UNet outputs
    zeros, which would hide any tiling error."""
    g = torch.Generator().manual_seed(seed)
    damped = ("c5", "LR_conv", "conv2", "out_layers.3", "proj_out")
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, (nn.Conv2d, nn.Conv1d, nn.Linear)):
                gain = 0.3 if name.endswith(damped) else 1.0
                std = gain * (2.0 / mod.weight[0].numel()) ** 0.5
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std)
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.05)
        getattr(model, "first_stage_model", model).decoder.last_layer.mul_(0.01)
        if hasattr(model, "model_ema"):  # stage 2: EMA weights = these weights
            shadow = dict(model.model_ema.named_buffers())
            for name, p in model.model.named_parameters():
                shadow[model.model_ema.m_name2s_name[name]].copy_(p)
    return model.eval()
