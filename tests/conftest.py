"""Shared test fixtures: the repo on sys.path, ../shared paths, tiny configs, and no network: the
suite is offline, so a test process that connects a socket (or resolves a name) beyond the
loopback interface gets `NetworkBlockedError`."""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


SUBPROCESS_TIMEOUT = 900  # s: generous, for a busy 2-core machine; never a speed check


class NetworkBlockedError(ConnectionError):
    """A test tried to reach the network (the suite must run offline)."""


def is_loopback(host) -> bool:
    """True for a local name or address: "localhost", 127.0.0.0/8, ::1, or no host at all."""
    if host in (None, "", "localhost", b"localhost"):
        return True
    try:
        return ipaddress.ip_address(host.decode() if isinstance(host, bytes) else host).is_loopback
    except ValueError:  # a host name other than localhost
        return False


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test runs offline: connecting to, or resolving, a non-loopback address raises
    `NetworkBlockedError` (Unix sockets and loopback stay usable)."""
    connect, connect_ex, getaddrinfo = (
        socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
    )  # fmt: skip

    def check(address) -> None:
        if isinstance(address, tuple) and not is_loopback(address[0]):
            raise NetworkBlockedError(f"the test suite is offline: a test tried to reach {address}")

    def guarded_connect(sock, address):
        check(address)
        return connect(sock, address)

    def guarded_connect_ex(sock, address):
        check(address)
        return connect_ex(sock, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        check((host, 0))
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)


@pytest.fixture
def one_thread():
    """One torch thread for the test (small tensors, where OpenMP synchronisation would dominate;
    and the arithmetic of launched processes run with OMP_NUM_THREADS=1). Modules ask for it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or pytest.skip naming what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (needs the project's ../shared folder beside the repo)")
    return path


@pytest.fixture(scope="session")
def conformance():
    """The authors' reference traces: tests/fixtures/conformance_compact.pt with its stage-2
    state dict regenerated (see tests/conformance_weights.py); needs nothing outside the repo."""
    from tests.conformance_weights import load_conformance

    return load_conformance()


def tiny_config(stage: int, *overrides: str):
    """configs/tiny/{first,second}_stage.yaml as an OmegaConf config, with dotlist overrides."""
    from omegaconf import OmegaConf

    name = "first_stage.yaml" if stage == 1 else "second_stage.yaml"
    config = OmegaConf.load(ROOT / "configs" / "tiny" / name)
    config.merge_with_dotlist(list(overrides))
    return config


@pytest.fixture(scope="session")
def tiny_sr_checkpoint(tmp_path_factory):
    """A tiny stage-2 checkpoint in train.py's format (random weights, scale_factor 1/std), with
    its run folder layout `<run>/checkpoints/last.ckpt` + `<run>/configs/second_stage.yaml`."""
    from omegaconf import OmegaConf

    from utils.config import instantiate_from_config

    torch.manual_seed(0)
    config = tiny_config(2)
    model = instantiate_from_config(config.model)  # ckpt_path ??? is fine to build
    model.scale_factor.fill_(0.8)
    run = tmp_path_factory.mktemp("tiny_run")
    (run / "checkpoints").mkdir()
    (run / "configs").mkdir()
    OmegaConf.save(config, run / "configs" / "second_stage.yaml")
    plain = OmegaConf.to_container(config, resolve=True, throw_on_missing=False)
    path = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": model.state_dict(), "config": plain, "epoch": 0}, path)
    return path


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """Small crops of holdout images (generated scenes without ../shared) as prepared datasets
    HOLD and ONE (`tests.evaluation_cases.make_data_root`)."""
    from tests.evaluation_cases import make_data_root

    return make_data_root(tmp_path_factory.mktemp("dataset"))


@pytest.fixture(scope="session")
def e2e(tiny_sr_checkpoint, data_root, tmp_path_factory):
    """A run at scales 2, 3.7 and 8 (batch 2, sr_kd on) and a second one with the same seed at
    3.7 alone (batch b of every scale draws with seed + b)."""
    from tests import evaluation_cases as cases

    first, second = (tmp_path_factory.mktemp("run") / "res" for _ in range(2))
    args = ("--metrics", "psnr,ssim", "--batch-size", "2", "--sr-kd")
    ckpt = tiny_sr_checkpoint
    rows = cases.run_cli(ckpt, data_root, first, "--scales", "2,3.7", "8", *args, dataset="HOLD")
    cases.run_cli(ckpt, data_root, second, "--scales", "3.7", *args, dataset="HOLD")
    return first, second, rows


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty TORCH_HOME; every download fails."""

    def blocked(*args, **kwargs):
        raise OSError("downloads are blocked in tests")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", blocked)
    return tmp_path / "torch_home"
