"""The pretrained files behind LPIPS (AlexNet, VGG16) and FID (pytorch-fid's InceptionV3).

They live in ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``). The builders
raise ``MissingWeightsError`` saying which file to place where when a file is missing offline.
"""

from __future__ import annotations

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
