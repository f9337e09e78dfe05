"""The pretrained files behind LPIPS (AlexNet, VGG16) and FID (pytorch-fid's InceptionV3).

They live in ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``). The builders
raise ``MissingWeightsError`` saying which file to place where when a file is missing offline;
``write_random_weights`` writes random stand-ins under the official names for offline tests.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


class MissingWeightsError(RuntimeError):
    """A pretrained file is neither cached nor downloadable (the message says how to place it)."""


@dataclass(frozen=True)
class WeightsFile:
    """One pretrained file: its official name, download URL and what uses it."""

    file_name: str
    url: str
    used_by: str


FID_WEIGHTS_URL = (  # = pytorch_fid.inception.FID_WEIGHTS_URL (checked by a test)
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
WEIGHTS = {
    "alexnet": WeightsFile(
        "alexnet-owt-7be5be79.pth",
        "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        "LPIPS (AlexNet trunk, evaluation metric)",
    ),
    "vgg16": WeightsFile(
        "vgg16-397923af.pth",
        "https://download.pytorch.org/models/vgg16-397923af.pth",
        "LPIPS (VGG16 trunk, stage-1 perceptual loss)",
    ),
    "inception": WeightsFile(
        FID_WEIGHTS_URL.rsplit("/", 1)[1], FID_WEIGHTS_URL, "FID (pytorch-fid InceptionV3)"
    ),
}
LPIPS_TRUNKS = {"alex": "alexnet", "vgg": "vgg16"}  # lpips' `net` argument -> WEIGHTS key


def _entry(name: str) -> WeightsFile:
    if name not in WEIGHTS:
        raise KeyError(f"unknown pretrained file {name!r}; known: {sorted(WEIGHTS)}")
    return WEIGHTS[name]


def weights_path(name: str) -> Path:
    """Where torch.hub looks for ``name``'s file: ``torch.hub.get_dir()/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / _entry(name).file_name


def weights_available(name: str) -> bool:
    """True if ``name``'s file ("alexnet", "vgg16", "inception") is in the torch.hub cache."""
    return weights_path(name).is_file()


def missing_weights_message(name: str) -> str:
    """Explain which file ``name`` needs, where it goes and how to get it there."""
    entry, path = _entry(name), weights_path(name)
    state = "is unreadable" if path.is_file() else "is missing"
    return (
        f"{entry.used_by} needs the pretrained file '{entry.file_name}', which {state} in "
        f"{path.parent} ($TORCH_HOME/hub/checkpoints/) and could not be downloaded. On a machine "
        f"with internet download {entry.url} and copy it to {path}, or set TORCH_HOME to a "
        f"folder whose hub/checkpoints/ holds it."
    )


def _build(name: str, build):
    try:
        with warnings.catch_warnings():  # lpips uses torchvision's deprecated `pretrained=`
            warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*")
            return build()
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a corrupt file a RuntimeError
        raise MissingWeightsError(
            f"{missing_weights_message(name)} ({type(err).__name__}: {err})"
        ) from err


def build_lpips(net: str = "alex") -> nn.Module:
    """``lpips.LPIPS(net=net)`` v0.1 in eval mode with frozen weights (paper metric: "alex").

    Raises:
        MissingWeightsError: the trunk's torchvision file is missing and cannot be downloaded.
    """
    import lpips

    if net not in LPIPS_TRUNKS:
        raise ValueError(f"LPIPS net must be one of {sorted(LPIPS_TRUNKS)}, got {net!r}")
    model = _build(LPIPS_TRUNKS[net], lambda: lpips.LPIPS(net=net, verbose=False))
    return model.eval().requires_grad_(False)


def build_inception(dims: int = 2048) -> nn.Module:
    """pytorch-fid's ``InceptionV3`` returning the ``dims``-d block (2048 = pool3, the FID one).

    Raises:
        MissingWeightsError: ``pt_inception-2015-12-05-6726825d.pth`` is missing offline.
    """
    from pytorch_fid.inception import InceptionV3

    if dims not in InceptionV3.BLOCK_INDEX_BY_DIM:
        known = sorted(InceptionV3.BLOCK_INDEX_BY_DIM)
        raise ValueError(f"FID dims must be one of {known}, got {dims}")
    block = InceptionV3.BLOCK_INDEX_BY_DIM[dims]
    return _build("inception", lambda: InceptionV3([block])).eval()


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
    gen, paths = torch.Generator().manual_seed(seed), []
    for name in names:
        state = {}
        for prefix, module in _skeleton(name).named_modules():
            for key, t in _random_tensors(module, gen).items():
                state[f"{prefix}.{key}" if prefix else key] = t
        paths.append(folder / _entry(name).file_name)
        torch.save(state, paths[-1])
    return paths
