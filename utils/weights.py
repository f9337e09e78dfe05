"""The pretrained files behind LPIPS (AlexNet, VGG16), FID (pytorch-fid's InceptionV3) and the
no-reference metrics NIQE and BRISQUE (pyiqa, an optional package).

They live in ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``), pyiqa's in
``torch.hub.get_dir()/pyiqa``. The builders raise ``MissingWeightsError`` saying which file to
place where when a file is missing offline, ``MissingPackageError`` when pyiqa is not installed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


class MissingWeightsError(RuntimeError):
    """A pretrained file is neither cached nor downloadable (the message says how to place it)."""


class MissingPackageError(RuntimeError):
    """An optional package a requested metric needs is not installed (the message says how)."""


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


PYIQA_INSTALL = (
    "pip install --no-deps pyiqa==0.1.16 && pip install opencv-python-headless huggingface_hub"
)
PYIQA_WEIGHTS_URL = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/"
PYIQA_FILES = {  # metric -> the parameter file pyiqa's default metric loads
    "niqe": "niqe_modelparameters.mat",
    "brisque": "brisque_svm_weights.pth",
}


def check_pyiqa(metrics: list[str]) -> None:
    """Raises ``MissingPackageError`` (with the install command) unless pyiqa can be imported;
    reads no file and imports nothing."""
    import importlib.util

    if importlib.util.find_spec("pyiqa") is None:
        raise MissingPackageError(
            f"metric(s) {', '.join(metrics)} are computed by pyiqa, which is not installed; "
            f"install it without its unused dependencies: {PYIQA_INSTALL}"
        )


def pyiqa_weights_path(metric: str) -> Path:
    """``torch.hub.get_dir()/pyiqa/<file>``: where pyiqa caches ``metric``'s parameter file."""
    return Path(torch.hub.get_dir()) / "pyiqa" / PYIQA_FILES[metric]


def build_pyiqa_metric(metric: str, device: str | torch.device = "cpu") -> nn.Module:
    """pyiqa's default ``metric`` ("niqe", "brisque") with its parameter file from
    ``pyiqa_weights_path`` (downloaded there when missing and online), in eval mode.

    Raises:
        MissingPackageError: pyiqa is not installed.
        MissingWeightsError: the parameter file is missing and cannot be downloaded.
    """
    check_pyiqa([metric])
    path = pyiqa_weights_path(metric)
    if not path.is_file():
        url = PYIQA_WEIGHTS_URL + path.name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), progress=False)
        except OSError as err:
            raise MissingWeightsError(
                f"{metric.upper()} (pyiqa) needs the parameter file '{path.name}', which is "
                f"missing in {path.parent} ($TORCH_HOME/hub/pyiqa/) and could not be downloaded. "
                f"On a machine with internet download {url} and copy it to {path} "
                f"({type(err).__name__}: {err})"
            ) from err
    import pyiqa

    model = pyiqa.create_metric(
        metric, device=torch.device(device), pretrained_model_path=str(path)
    )
    return model.eval()
