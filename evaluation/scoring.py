"""Per-image scores of the evaluation under a named protocol (docs/departures.md, "Evaluation
protocols"): which metrics a run computes, their networks, and the scores of one batch.

`paper` (default): the authors' benchmark script, which made the paper's tables with pyiqa —
PSNR on RGB without a border crop, pyiqa's SSIM (YIQ luma), LPIPS, FID, NIQE, BRISQUE.
`test-script`: the authors' test.py — PSNR/SSIM on RGB (or Y) with a `ceil(scale)` border crop.
LPIPS and FID are the same under both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

from torch import nn

from evaluation.pairs import EvaluationError, parse_choice
from utils.metrics import (
    crop_border_for,
    lpips_distance,
    psnr,
    psnr_pyiqa,
    quantize,
    ssim,
    ssim_pyiqa,
)
from utils.weights import (
    MissingWeightsError,
    build_inception,
    build_lpips,
    build_pyiqa_metric,
    check_pyiqa,
)

log = logging.getLogger(__name__)

PROTOCOLS = ("paper", "test-script")
DEFAULT_PROTOCOL = "paper"  # the protocol of the paper's tables (docs/departures.md)
REFERENCE_METRICS = ("psnr", "ssim", "lpips", "fid")  # need HR; the default set
NO_REFERENCE_METRICS = ("niqe", "brisque")  # pyiqa; only when asked for
METRICS = REFERENCE_METRICS + NO_REFERENCE_METRICS


def parse_protocol(text: str) -> str:
    """`paper` or `test-script` (underscores and upper case accepted).

    Raises:
        EvaluationError: for any other name.
    """
    return parse_choice(text, PROTOCOLS, "protocol")


@dataclass(frozen=True)
class Metrics:
    """Metrics to compute, their networks (None where not needed) and the protocol."""

    names: tuple[str, ...] = ()
    lpips_net: nn.Module | None = None
    inception: nn.Module | None = None
    fid_dims: int = 2048
    protocol: str = DEFAULT_PROTOCOL
    no_reference: dict[str, nn.Module] = field(default_factory=dict)  # pyiqa NIQE, BRISQUE


def parse_metrics(requested=None, reference: bool = True) -> list[str]:
    """Metric names from `--metrics` (None: psnr, ssim, lpips, fid with HR, else none; a list
    or comma string; "none": none), checked without loading anything.

    Raises:
        EvaluationError: for an unknown name, or reference metrics on a datatype without HR.
        MissingPackageError: NIQE/BRISQUE asked for without pyiqa (names the install command).
    """
    explicit = requested is not None
    if isinstance(requested, str):
        requested = [] if requested.strip().lower() == "none" else requested.split(",")
    default = REFERENCE_METRICS if reference else ()
    names = [n.strip().lower() for n in (default if requested is None else requested) if n.strip()]
    names = list(dict.fromkeys(names))
    if unknown := sorted(set(names) - set(METRICS)):
        raise EvaluationError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
    needs_hr = [n for n in names if n in REFERENCE_METRICS]
    if not reference and explicit and needs_hr:
        raise EvaluationError(
            f"metrics {needs_hr} need HR images, which this datatype lacks; no-reference "
            f"metrics: {', '.join(NO_REFERENCE_METRICS)}"
        )
    if no_reference := [n for n in names if n in NO_REFERENCE_METRICS]:
        check_pyiqa(no_reference)
    return names


def load_metrics(
    requested=None,
    reference: bool = True,
    device="cpu",
    fid_dims: int = 2048,
    protocol: str = DEFAULT_PROTOCOL,
) -> Metrics:
    """Builds the metric networks before any SR work; returns `Metrics`.

    `requested`: as `parse_metrics`. A default metric whose pretrained file cannot be found or
    downloaded is skipped with a warning naming the file and where to place it; a requested one
    raises `MissingWeightsError`. `reference`: the datatype has HR images.
    """
    explicit, names = requested is not None, parse_metrics(requested, reference)
    nets = {}
    builders = {
        "lpips": partial(build_lpips, "alex"),
        "fid": partial(build_inception, fid_dims),
        **{n: partial(build_pyiqa_metric, n) for n in NO_REFERENCE_METRICS},
    }
    for name in [n for n in list(names) if n in builders]:
        try:
            nets[name] = builders[name]().to(device)
        except MissingWeightsError as err:
            if explicit:
                raise
            log.warning("%s skipped: %s", name.upper(), err)
            names.remove(name)
    no_reference = {n: nets[n] for n in NO_REFERENCE_METRICS if n in nets}
    options = dict(protocol=parse_protocol(protocol), no_reference=no_reference)
    return Metrics(tuple(names), nets.get("lpips"), nets.get("fid"), fid_dims, **options)


def score_batch(sr, hr, scale: float, metrics: Metrics, test_y: bool, files) -> list[dict]:
    """Per-image PSNR/SSIM (by `metrics.protocol`), LPIPS, NIQE and BRISQUE of the uint8 SR;
    a metric that fails (e.g. an image too small for SSIM) is logged and left empty."""
    rows, border = [{} for _ in range(sr.shape[0])], crop_border_for(scale)
    sr01 = quantize(sr).float() / 255.0  # the saved uint8 image, as the scripts read it
    if metrics.protocol == "paper":
        compute = {"psnr": lambda: psnr_pyiqa(sr, hr, test_y), "ssim": lambda: ssim_pyiqa(sr, hr)}
    else:
        compute = {
            "psnr": lambda: psnr(sr, hr, border, test_y),
            "ssim": lambda: ssim(sr, hr, border, test_y),
        }
    compute["lpips"] = lambda: lpips_distance(sr01, hr, metrics.lpips_net)
    names = [n for n in metrics.names if n in compute and hr is not None]
    for name, net in metrics.no_reference.items():
        compute[name] = partial(lambda net: net(sr01).flatten().cpu(), net)  # pyiqa moves it
        names.append(name)
    for name in names:
        try:
            values = compute[name]().tolist()
        except (ValueError, RuntimeError, AssertionError) as err:  # pyiqa checks with assert
            log.warning("%s not computed for %s: %s", name.upper(), ", ".join(files), err)
            values = [None] * len(rows)
        for row, value in zip(rows, values):
            row[name] = value
    return rows
