"""Evaluation loop of the paper protocol (docs/method.md, "Evaluation protocol"), shared by
test.py and demo.py.

`evaluate` runs every method on the batches `evaluation.pairs` plans for one dataset at several
scales, under `torch.inference_mode()`, scores them with `utils.metrics` (FID: HR statistics once
per scale) and writes PNGs and a per-image CSV (`evaluation.tables`).
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from data.transforms import resize_bicubic
from evaluation import pairs
from evaluation.pairs import EvaluationError, Item, Source, parse_datatype, parse_scales
from evaluation.tables import IMAGE_COLUMNS, memory_kind, write_csv
from utils.image_io import to_tensor01
from utils.metrics import (
    crop_border_for,
    fid_statistics,
    frechet_distance,
    lpips_distance,
    psnr,
    quantize,
    ssim,
)
from utils.weights import MissingWeightsError, build_inception, build_lpips

try:
    import resource  # peak RSS on CPU (Unix only)
except ImportError:  # pragma: no cover - Windows
    resource = None

log = logging.getLogger(__name__)

METRICS = ("psnr", "ssim", "lpips", "fid")


def _to_pil(x01: torch.Tensor) -> Image.Image:
    return Image.fromarray(quantize(x01).permute(1, 2, 0).cpu().numpy())  # [3, H, W] -> uint8


def bicubic_upscale(lr, hr, out_size, generator=None) -> torch.Tensor:
    """Baseline: Pillow bicubic of the uint8 LR [B, 3, h, w] to out_size (as the LR was made)."""
    return torch.stack([to_tensor01(resize_bicubic(_to_pil(x), tuple(out_size))) for x in lr])


def reconstruct(autoencoder: nn.Module, lr, hr, out_size, generator=None, tiling=None):
    """Stage-1 reconstruction (`AutoencoderKL.reconstruct`), [0, 1] in and out."""
    return autoencoder.reconstruct(lr, hr, **(tiling or {}))


def _sr(model, lr, hr, out_size, generator, tiling=None):
    return model.super_resolve(lr, out_size, generator=generator, **(tiling or {}))


def _sr_kd(model, lr, hr, out_size, generator, tiling=None):
    return model.super_resolve_condition(lr, out_size, **(tiling or {}))


@dataclass(frozen=True)
class Method:
    """A table row: `run(lr, hr, out_size, generator) -> sr`, all [B, 3, ., .] in [0, 1]."""

    name: str
    folder: str  # image folder under <dataset>/x<s>/
    run: Callable[..., torch.Tensor]


def build_methods(
    model: nn.Module, sr_kd: bool = False, bicubic: bool = True, tiling: dict | None = None
) -> list[Method]:
    """LDCSR (+ its sr_kd decode) for a stage-2 model, the reconstruction for a stage-1 one;
    `tiling` (`max_memory`, `tile`, `tile_overlap`) bounds their memory."""
    if hasattr(model, "super_resolve"):  # models.ldcsr.LDCSR
        methods = [Method("LDCSR", "sr", partial(_sr, model, tiling=tiling))]
        methods += (
            [Method("LDCSR (sr_kd)", "sr_kd", partial(_sr_kd, model, tiling=tiling))]
            if sr_kd
            else []
        )
    elif sr_kd:
        raise EvaluationError("sr_kd decodes the stage-2 condition: drop it for a stage-1 model")
    else:  # models.autoencoder.AutoencoderKL
        methods = [
            Method("LDCSR stage 1", "reconstruction", partial(reconstruct, model, tiling=tiling))
        ]
    return methods + ([Method("Bicubic", "bicubic", bicubic_upscale)] if bicubic else [])


def min_output_side(model: nn.Module) -> int:
    """`2**levels` px: a 2-px latent (the encoder halves levels-1 times; a 1-px latent breaks
    GroupNorm in narrow configs, where a group holds one channel)."""
    encoder = getattr(model, "cond_stage_model", None) or getattr(model, "encoder", None)
    levels = len(getattr(encoder, "down", ()))
    return 2**levels if levels else 1


@dataclass(frozen=True)
class Metrics:
    """Metrics to compute and their networks (None where not needed)."""

    names: tuple[str, ...] = ()
    lpips_net: nn.Module | None = None
    inception: nn.Module | None = None
    fid_dims: int = 2048


def parse_metrics(requested=None, reference: bool = True) -> list[str]:
    """Metric names from `--metrics` (None: all four; a list or comma string; "none": none),
    checked without loading anything.

    Raises:
        EvaluationError: for an unknown name, or named metrics on a datatype without HR images.
    """
    explicit = requested is not None
    if isinstance(requested, str):
        requested = [] if requested.strip().lower() == "none" else requested.split(",")
    names = [n.strip().lower() for n in (METRICS if requested is None else requested) if n.strip()]
    if unknown := sorted(set(names) - set(METRICS)):
        raise EvaluationError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
    if not reference and explicit and names:
        raise EvaluationError(f"metrics {names} need HR images, which this datatype lacks")
    return names


def load_metrics(requested=None, reference: bool = True, device="cpu", fid_dims: int = 2048):
    """Builds the metric networks before any SR work; returns `Metrics`.

    `requested`: None = the default `psnr,ssim,lpips,fid`, else names (list or comma string,
    "none" = no metric). A default metric whose pretrained file cannot be found or downloaded is
    skipped with a warning naming the file and where to place it; a requested one raises
    `MissingWeightsError`. `reference`: the datatype has HR images (else no metric applies).
    """
    explicit, names = requested is not None, parse_metrics(requested, reference)
    if not reference:
        return Metrics()
    nets = {}
    builders = {"lpips": partial(build_lpips, "alex"), "fid": partial(build_inception, fid_dims)}
    for name in [n for n in names if n in builders]:
        try:
            nets[name] = builders[name]().to(device)
        except MissingWeightsError as err:
            if explicit:
                raise
            log.warning("%s skipped: %s", name.upper(), err)
            names.remove(name)
    return Metrics(tuple(dict.fromkeys(names)), nets.get("lpips"), nets.get("fid"), fid_dims)


def score_batch(sr, hr, scale: float, metrics: Metrics, test_y: bool, files) -> list[dict]:
    """Per-image PSNR/SSIM (border ceil(scale)) and LPIPS of the uint8 SR; a metric that fails
    (e.g. an image too small for SSIM after the crop) is logged and left empty."""
    rows, border = [{} for _ in range(sr.shape[0])], crop_border_for(scale)
    compute = {
        "psnr": lambda: psnr(sr, hr, border, test_y),
        "ssim": lambda: ssim(sr, hr, border, test_y),
        "lpips": lambda: lpips_distance(quantize(sr) / 255.0, hr, metrics.lpips_net),
    }
    for name in [n for n in metrics.names if n in compute and hr is not None]:
        try:
            values = compute[name]().tolist()
        except (ValueError, RuntimeError) as err:
            log.warning("%s not computed for %s: %s", name.upper(), ", ".join(files), err)
            values = [None] * len(rows)
        for row, value in zip(rows, values):
            row[name] = value
    return rows


def _timed(method: Method, lr, hr, out_size, generator, device: torch.device):
    """Runs a method -> (sr on the CPU, wall seconds, peak memory MiB or None)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    sr = method.run(lr, hr, out_size, generator)
    if cuda:
        torch.cuda.synchronize(device)
    seconds, peak = time.perf_counter() - start, None
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    elif resource is not None:  # ru_maxrss: KiB on Linux, bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = rss / 2 ** (20 if sys.platform == "darwin" else 10)
    return sr.float().cpu(), seconds, peak


def _save(images: torch.Tensor | None, batch: Sequence[Item], folder: Path | None) -> None:
    for x, item in zip(images if folder is not None and images is not None else (), batch):
        _to_pil(x).save(folder / item.name)


@dataclass(frozen=True)
class _Run:
    methods: list[Method]
    metrics: Metrics
    datatype: str
    seed: int
    batch_size: int
    test_y: bool
    save_images: bool
    device: torch.device
    min_side: int


def failed_row(name: str, scale: float, reason: str) -> dict:
    """The per_image.csv row of an image that could not be evaluated, with the reason."""
    return {"file": name, "scale": scale, "status": f"failed: {reason}"}


def _run_batches(items, scale: float, dirs: dict, run: _Run) -> tuple[list[dict], dict, list]:
    """Every batch through every method -> per-image rows, {method: [seconds, peak MiB]}, and
    the rows of images that failed to decode (left out, the run goes on)."""
    rows, totals, failed = [], {m.name: [0.0, 0.0] for m in run.methods}, []
    batches = pairs.make_batches(items, run.batch_size)
    for index, batch in enumerate(tqdm(batches, desc=f"x{scale:g}", unit="batch", leave=False)):
        batch, lr, hr, bad = pairs.load_batch(batch, run.datatype)
        failed += [failed_row(item.name, scale, reason) for item, reason in bad]
        if not batch:
            continue
        _save(hr, batch, dirs["hr"])
        inputs = (lr.to(run.device), hr.to(run.device) if hr is not None else None, batch[0].out_hw)
        for method in run.methods:
            generator = torch.Generator().manual_seed(run.seed + index)  # CPU: same on any device
            sr, seconds, peak = _timed(method, *inputs, generator, run.device)
            totals[method.name][0] += seconds
            totals[method.name][1] = max(totals[method.name][1], peak or 0.0)
            _save(sr, batch, dirs[method.name])
            scores = score_batch(sr, hr, scale, run.metrics, run.test_y, [i.name for i in batch])
            for item, score in zip(batch, scores):
                row = dict(zip(IMAGE_COLUMNS, (method.name, item.name, scale, *item.lr_hw)))
                row.update(out_height=item.out_hw[0], out_width=item.out_hw[1], **score)
                rows.append({**row, "runtime_s": seconds / len(batch), "status": "ok"})
    return rows, totals, failed


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None and not math.isnan(r[key])]
    return sum(values) / len(values) if values else None


def _fid_scorer(hr_dir: Path | None, items: Sequence[Item], run: _Run) -> Callable:
    """`sr_dir -> FID against hr_dir` (None without HR, for < 2 images or a failed fit); the HR
    statistics are computed at the first call and reused for every method of the scale."""
    count = len(items)
    # pytorch-fid stacks images unresized: batches of 1 unless all have one size.
    batch_size = min(50, count) if len({i.out_hw for i in items}) == 1 else 1
    options = (run.metrics.inception, batch_size, run.device, run.metrics.fid_dims)
    hr_statistics = cache(partial(fid_statistics, hr_dir, *options))

    def score(sr_dir: Path | None) -> float | None:
        if hr_dir is None:
            return None
        if count < 2:
            log.warning("FID skipped for %s: it needs at least 2 images, got %d", sr_dir, count)
            return None
        try:
            return frechet_distance(fid_statistics(sr_dir, *options), hr_statistics())
        except ValueError as err:  # e.g. pytorch-fid's "Imaginary component" for tiny sets
            log.warning("FID of %s not computed: %s", sr_dir, err)
            return None

    return score


def _evaluate_scale(source: Source, scale: float, out_dir: Path, run: _Run, overwrite: bool):
    """One dataset at one scale -> summary rows; writes `<out_dir>/<dataset>/x<s>/`."""
    scale_dir = out_dir / source.name / f"x{scale:g}"
    if scale_dir.exists() and any(scale_dir.iterdir()):
        if not overwrite:
            raise EvaluationError(f"{scale_dir} holds earlier results; pass --overwrite")
        log.info("--overwrite: replacing %s", scale_dir)
        shutil.rmtree(scale_dir)
    items, failed = pairs.plan_items(source, run.datatype, scale, run.min_side)
    fid = "fid" in run.metrics.names and run.datatype in pairs.REFERENCE_DATATYPES
    dirs = {"hr": scale_dir / "hr" if fid else None}  # FID reads folders; removed afterwards
    for m in run.methods:
        dirs[m.name] = scale_dir / m.folder if run.save_images or fid else None
    for folder in (d for d in dirs.values() if d is not None):
        folder.mkdir(parents=True)
    with torch.inference_mode():
        rows, totals, unreadable = _run_batches(items, scale, dirs, run)
    failed += unreadable
    items = [i for i in items if i.name not in {r["file"] for r in unreadable}]
    summary, score_fid = [], _fid_scorer(dirs["hr"], items, run)
    for method in run.methods:
        mine, (seconds, peak) = [r for r in rows if r["method"] == method.name], totals[method.name]
        n = len(mine)
        summary.append({
            "method": method.name, "dataset": source.name, "scale": scale,
            **{k: _mean(mine, k) for k in ("psnr", "ssim", "lpips")},
            "fid": score_fid(dirs[method.name]),
            "runtime_s_per_image": seconds / n if n else None, "peak_memory_mib": peak or None,
            "memory": memory_kind(run.device), "images": n, "failed": len(failed),
            "datatype": run.datatype,
        })  # fmt: skip
    temporary = [dirs["hr"]] + ([] if run.save_images else [dirs[m.name] for m in run.methods])
    for folder in (d for d in temporary if d is not None):
        shutil.rmtree(folder)
    scale_dir.mkdir(parents=True, exist_ok=True)
    write_csv(scale_dir / "per_image.csv", IMAGE_COLUMNS, rows + failed)
    return summary


def evaluate(
    model: nn.Module,
    images: str | Path | Source,
    scales: Sequence[float],
    out_dir: str | Path,
    *,
    datatype: str = "hr-downsample",
    metrics: Metrics | None = None,
    seed: int = 0,
    batch_size: int = 1,
    test_y: bool = False,
    save_images: bool = True,
    sr_kd: bool = False,
    bicubic: bool = True,
    overwrite: bool = False,
    tiling: dict | None = None,
) -> list[dict]:
    """Evaluates one dataset at every scale -> summary rows (keys `SUMMARY_COLUMNS`).

    `model`: `LDCSR` (rows LDCSR [+ LDCSR (sr_kd)]) or a stage-1 `AutoencoderKL` (row "LDCSR
    stage 1", needs HR), in eval mode on its device. `images`: a `Source` or a folder. Writes
    `<out_dir>/<dataset>/x<s:g>/{sr,sr_kd,reconstruction,bicubic}/*.png` and `per_image.csv`.
    `metrics` comes from `load_metrics` (default PSNR + SSIM). Batch b of a scale samples with
    `torch.Generator().manual_seed(seed + b)`; batches hold images of equal size only.
    `overwrite` replaces an earlier `<dataset>/x<s>` folder instead of refusing. `tiling`
    (`max_memory` GB, `tile`, `tile_overlap`) is passed to `super_resolve` / `reconstruct`,
    which tile scenes whose untiled run would exceed the memory budget.
    """
    source = images if isinstance(images, Source) else pairs.source_from_folder(images)
    datatype = parse_datatype(datatype)
    if not hasattr(model, "super_resolve") and datatype not in pairs.REFERENCE_DATATYPES:
        raise EvaluationError("stage-1 reconstructions need HR: use hr-downsample or paired data")
    if metrics is None:
        metrics = Metrics(("psnr", "ssim") if datatype in pairs.REFERENCE_DATATYPES else ())
    methods, device = build_methods(model, sr_kd, bicubic, tiling), next(model.parameters()).device
    options = (datatype, seed, batch_size, test_y, save_images, device, min_output_side(model))
    run = _Run(methods, metrics, *options)
    rows = []
    for scale in tqdm(parse_scales(scales), desc=source.name, unit="scale"):
        rows += _evaluate_scale(source, scale, Path(out_dir), run, overwrite)
    return rows


def check_out_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Refuses a run folder that is a file, or non-empty unless `overwrite`; creates nothing."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EvaluationError(f"output folder {out} is a file; choose another --out-dir")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise EvaluationError(
            f"output folder {out} exists and is not empty (earlier results?); pass --overwrite "
            "to replace the results this run writes, or choose another --out-dir"
        )
    return out


def prepare_out_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Creates the run folder after `check_out_dir`."""
    out = check_out_dir(out_dir, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    return out
