"""Evaluation loop of the paper protocol (docs/method.md, "Evaluation protocol"), shared by
test.py and demo.py.

`evaluate` runs every method on the batches `evaluation.pairs` plans for one dataset at several
scales, under `torch.inference_mode()`, scores them with `evaluation.scoring` under the run's
protocol (FID: HR statistics once per scale) and writes PNGs and a per-image CSV
(`evaluation.tables`). A method may also read existing SR images (`evaluation.sr_folders`).
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
from evaluation.scoring import Metrics, load_metrics, parse_metrics, score_batch  # noqa: F401
from evaluation.sr_folders import SROutputs
from evaluation.tables import IMAGE_COLUMNS, memory_kind, write_csv
from evaluation.uncertainty import UncertaintyReport, sample_with_uncertainty
from models.geometry import min_output_side
from utils.atomic import atomic_output
from utils.cli import check_writable_folder
from utils.distributed import World
from utils.image_io import load_image, to_tensor01
from utils.metrics import fid_statistics, fid_statistics_sharded, frechet_distance, quantize

try:
    import resource  # peak RSS on CPU (Unix only)
except ImportError:  # pragma: no cover - Windows
    resource = None

log = logging.getLogger(__name__)


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
    run: Callable[..., torch.Tensor] | None
    outputs: SROutputs | None = None  # existing SR images (--sr-dir) instead of `run`


def folder_methods(sr_dirs: dict[str, Path], dataset: str) -> list[Method]:
    """One row per `--sr-dir` method, reading `<folder>/<dataset>/x<s>/` (`sr_folders`)."""
    return [Method(name, "", None, SROutputs(root, dataset)) for name, root in sr_dirs.items()]


def build_methods(
    model: nn.Module,
    sr_kd: bool = False,
    bicubic: bool = True,
    tiling: dict | None = None,
    samples: int = 1,
) -> list[Method]:
    """LDCSR (+ its sr_kd decode) for a stage-2 model, the reconstruction for a stage-1 one;
    `tiling` (`max_memory`, `tile`) bounds their memory; with `samples` >= 2
    LDCSR also returns the uncertainty map of that many samples."""
    if hasattr(model, "super_resolve"):  # models.ldcsr.LDCSR
        sr = partial(sample_with_uncertainty, samples=samples) if samples >= 2 else _sr
        methods = [Method("LDCSR", "sr", partial(sr, model, tiling=tiling))]
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


def _timed(method: Method, lr, hr, out_size, generator, device: torch.device):
    """Runs a method -> (sr on the CPU, wall seconds, peak memory MiB or None)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    sr = method.run(lr, hr, out_size, generator)
    sr, unc = sr if isinstance(sr, tuple) else (sr, None)  # (sample, uncertainty) with samples
    if cuda:
        torch.cuda.synchronize(device)
    seconds, peak = time.perf_counter() - start, None
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    elif resource is not None:  # ru_maxrss: KiB on Linux, bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = rss / 2 ** (20 if sys.platform == "darwin" else 10)
    return sr.float().cpu().contiguous(), seconds, peak, unc  # as read back from a PNG


def _save(images: torch.Tensor | None, batch: Sequence[Item], folder: Path | None) -> None:
    for x, item in zip(images if folder is not None and images is not None else (), batch):
        with atomic_output(folder / item.name) as tmp:  # a stop leaves no truncated PNG
            _to_pil(x).save(tmp, format="PNG")


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
    samples: int = 1
    world: World = World()  # this process's shard of the batches (utils.distributed)
    skip_existing: bool = False  # batches whose PNGs exist are read back, not run


def _read(folder: Path, batch: Sequence[Item]) -> torch.Tensor:
    """The PNGs an earlier, stopped run saved for `batch` -> [B, 3, H, W] in [0, 1]."""
    return torch.stack([to_tensor01(load_image(folder / item.name)) for item in batch])


def _done(batch: Sequence[Item], dirs: dict, run: _Run) -> bool:
    """With `skip_existing`: every method's PNG of every image of `batch` is on disk."""
    folders = [dirs[m.name] for m in run.methods if m.run is not None]
    exist = all(f is not None and (f / i.name).is_file() for f in folders for i in batch)
    return run.skip_existing and exist


def _run_batches(items, scale: float, dirs: dict, run: _Run, report=None) -> tuple:
    """Every batch through every method -> per-image rows, {method: [seconds, peak MiB]}, and
    the rows of images that failed to decode (left out, the run goes on). A method that returns
    an uncertainty map gives it to `report` (`evaluation.uncertainty.UncertaintyReport`).
    Batch b runs on rank b mod world size; every rank returns the rows of all batches, in
    batch order, as one process would."""
    chunks, totals = [], {m.name: [0.0, 0.0] for m in run.methods}
    batches = run.world.shard(list(enumerate(pairs.make_batches(items, run.batch_size))))
    for index, batch in tqdm(batches, desc=f"x{scale:g}", unit="batch", leave=False):
        batch, lr, hr, bad = pairs.load_batch(batch, run.datatype)
        rows, failed = [], [pairs.failed_row(item.file or item.name, scale, r) for item, r in bad]
        chunks.append((rows, failed))
        if not batch:
            continue
        if run.world.size > 1:  # which rank ran what (a run's log shows each image once)
            names = ", ".join(i.name for i in batch)
            log.info("rank %d: x%g batch %d: %s", run.world.rank, scale, index, names)
        done = _done(batch, dirs, run)
        _save(hr, batch, dirs["hr"])
        inputs = (lr.to(run.device), hr.to(run.device) if hr is not None else None, batch[0].out_hw)
        for method in run.methods:
            generator = torch.Generator().manual_seed(run.seed + index)  # CPU: same on any device
            if method.outputs is not None:  # existing SR images: nothing to run or time
                sr, seconds, peak, unc = method.outputs(scale, batch), 0.0, None, None
            elif done:  # saved by a stopped run: scored as saved (uint8), not timed
                sr, seconds, peak, unc = _read(dirs[method.name], batch), 0.0, None, None
            else:
                sr, seconds, peak, unc = _timed(method, *inputs, generator, run.device)
            totals[method.name][0] += seconds
            totals[method.name][1] = max(totals[method.name][1], peak or 0.0)
            _save(None if done else sr, batch, dirs[method.name])
            scores = score_batch(sr, hr, scale, run.metrics, run.test_y, [i.name for i in batch])
            if unc is not None and report is not None:
                rhos = report.add(sr, unc, hr, [i.name for i in batch], key=index)
                for score, rho in zip(scores, rhos):
                    score["unc_err_spearman"] = rho
            for item, score in zip(batch, scores):
                row = dict(zip(IMAGE_COLUMNS, (method.name, item.name, scale, *item.lr_hw)))
                row.update(out_height=item.out_hw[0], out_width=item.out_hw[1], **score)
                runtime = None if method.outputs is not None or done else seconds / len(batch)
                row.update(protocol=run.metrics.protocol, runtime_s=runtime, status="ok")
                rows.append(row)
    parts = run.world.all_gather((chunks, totals))
    chunks = run.world.unshard([c for c, _ in parts])  # batch order
    for name, total in totals.items():
        total[:] = sum(t[name][0] for _, t in parts), max(t[name][1] for _, t in parts)
    return [r for c in chunks for r in c[0]], totals, [r for c in chunks for r in c[1]]


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None and not math.isnan(r[key])]
    return sum(values) / len(values) if values else None


def _fit(options: tuple, folder: Path):
    return fid_statistics(folder, *options)


def _fid_scorer(hr_dir: Path | None, items: Sequence[Item], run: _Run) -> Callable:
    """`sr_dir -> FID against hr_dir` (None without HR, for < 2 images or a failed fit); the HR
    statistics are computed at the first call and reused for every method of the scale."""
    count = len(items)
    # pytorch-fid stacks images unresized: batches of 1 unless all have one size.
    batch_size = min(50, count) if len({i.out_hw for i in items}) == 1 else 1
    options = (run.metrics.inception, batch_size, run.device, run.metrics.fid_dims)
    fit = partial(_fit, options)
    if run.world.size > 1:  # each rank fits a share of the images; rank 0 gets the statistics
        fit = partial(fid_statistics_sharded, world=run.world, model=options[0],
                      batch_size=batch_size, device=run.device, dims=options[3])  # fmt: skip
    hr_statistics = cache(partial(fit, hr_dir))

    def score(sr_dir: Path | None) -> float | None:
        if hr_dir is None:
            return None
        if count < 2:
            log.warning("FID skipped for %s: it needs at least 2 images, got %d", sr_dir, count)
            return None
        try:  # several processes: all fit, rank 0 (the only one with statistics) scores
            sr_statistics, statistics = fit(sr_dir), hr_statistics()
            return None if sr_statistics is None else frechet_distance(sr_statistics, statistics)
        except ValueError as err:  # e.g. pytorch-fid's "Imaginary component" for tiny sets
            log.warning("FID of %s not computed: %s", sr_dir, err)
            return None

    return score


def _evaluate_scale(source: Source, scale: float, out_dir: Path, run: _Run, overwrite: bool):
    """One dataset at one scale -> summary rows; writes `<out_dir>/<dataset>/x<s>/`."""
    scale_dir = out_dir / source.name / f"x{scale:g}"
    earlier = scale_dir.exists() and any(scale_dir.iterdir())
    if earlier and not overwrite and not run.skip_existing:
        raise EvaluationError(
            f"{scale_dir} holds earlier results; pass --overwrite, or --skip-existing to finish "
            "a stopped run"
        )
    run.world.barrier()  # every rank has looked before rank 0 deletes or creates anything
    if earlier and overwrite and run.world.main:
        log.info("--overwrite: replacing %s", scale_dir)
        shutil.rmtree(scale_dir)
    items, failed = pairs.plan_items(source, run.datatype, scale, run.min_side)
    fid = "fid" in run.metrics.names and run.datatype in pairs.REFERENCE_DATATYPES
    dirs = {"hr": scale_dir / "hr" if fid else None}  # FID reads folders; removed afterwards
    for m in run.methods:  # --sr-dir methods are read, never written
        dirs[m.name] = scale_dir / m.folder if (run.save_images or fid) and m.run else None
    for folder in (d for d in dirs.values() if d is not None and run.world.main):
        folder.mkdir(parents=True, exist_ok=run.skip_existing)
        for partial_file in folder.glob(".*.partial*"):  # left by a killed run (atomic_output)
            partial_file.unlink()
    run.world.barrier()
    report = UncertaintyReport(scale_dir / "uncertainty", scale) if run.samples >= 2 else None
    with torch.inference_mode():
        rows, totals, unreadable = _run_batches(items, scale, dirs, run, report)
    if report is not None:
        report.finish(f"{source.name} x{scale:g}: uncertainty vs |error|", run.world)
    failed += unreadable
    items = [i for i in items if (i.file or i.name) not in {r["file"] for r in unreadable}]
    summary, score_fid = [], _fid_scorer(dirs["hr"], items, run)
    for method in run.methods:
        mine, (_, peak) = [r for r in rows if r["method"] == method.name], totals[method.name]
        n, read = len(mine), method.outputs is not None
        scores = ("psnr", "ssim", "lpips", "niqe", "brisque", "unc_err_spearman")
        summary.append({
            "method": method.name, "dataset": source.name, "scale": scale,
            **{k: _mean(mine, k) for k in scores},
            "fid": score_fid(method.outputs.folder(scale) if read else dirs[method.name]),
            "runtime_s_per_image": None if read else _mean(mine, "runtime_s"),  # timed only
            "peak_memory_mib": peak or None, "memory": None if read else memory_kind(run.device),
            "images": n, "failed": len(failed), "datatype": run.datatype,
            "protocol": run.metrics.protocol,
        })  # fmt: skip
    if not run.world.main:  # rank 0 writes the merged rows
        return summary
    temporary = [dirs["hr"]] + ([] if run.save_images else [dirs[m.name] for m in run.methods])
    for folder in (d for d in temporary if d is not None):
        shutil.rmtree(folder)
    scale_dir.mkdir(parents=True, exist_ok=True)
    write_csv(scale_dir / "per_image.csv", IMAGE_COLUMNS, rows + failed)
    return summary


def evaluate(
    model: nn.Module | None,
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
    samples: int = 1,
    sr_dirs: dict[str, Path] | None = None,
    world: World | None = None,
    skip_existing: bool = False,
) -> list[dict]:
    """Evaluates one dataset at every scale -> summary rows (keys `SUMMARY_COLUMNS`).

    `model`: `LDCSR` (rows LDCSR [+ LDCSR (sr_kd)]) or a stage-1 `AutoencoderKL` (row "LDCSR
    stage 1", needs HR), in eval mode on its device; None scores `sr_dirs` alone. `sr_dirs`:
    {method: folder} of existing SR images (`evaluation.sr_folders`, checked beforehand with
    `check_sr_dirs`), one more row each. `images`: a `Source` or a folder. Writes
    `<out_dir>/<dataset>/x<s:g>/{sr,sr_kd,reconstruction,bicubic}/*.png` and `per_image.csv`.
    `metrics` comes from `load_metrics` (default PSNR + SSIM, paper protocol). Batch b of a
    scale samples with `torch.Generator().manual_seed(seed + b)`; batches hold images of equal
    size only.
    `overwrite` replaces an earlier `<dataset>/x<s>` folder instead of refusing. `tiling`
    (`max_memory` GB, `tile`) is passed to `super_resolve` / `reconstruct`,
    which tile scenes whose untiled run would exceed the memory budget. `samples` >= 2: LDCSR's
    uncertainty maps, their error correlation and calibration (`evaluation.uncertainty`).
    `world` (`utils.distributed`): batch b runs on rank b mod size, rank 0 merges the rows,
    FID, per_image.csv and the calibration curve (every rank's pixels, in batch order); every
    rank returns the same rows. `skip_existing` finishes a stopped run: batches whose PNGs all
    exist are read back and scored, not run again.
    """
    source = images if isinstance(images, Source) else pairs.source_from_folder(images)
    datatype = parse_datatype(datatype)
    stage1 = model is not None and not hasattr(model, "super_resolve")
    if stage1 and datatype not in pairs.REFERENCE_DATATYPES:
        raise EvaluationError("stage-1 reconstructions need HR: use hr-downsample or paired data")
    if metrics is None:
        metrics = Metrics(("psnr", "ssim") if datatype in pairs.REFERENCE_DATATYPES else ())
    methods = build_methods(model, sr_kd, bicubic, tiling, samples) if model is not None else []
    methods += folder_methods(sr_dirs or {}, source.name)
    device = next(model.parameters()).device if model is not None else torch.device("cpu")
    min_side = min_output_side(model) if model is not None else 1
    options = (datatype, seed, batch_size, test_y, save_images, device, min_side)
    options += (samples if model is not None and not stage1 else 1,)
    world = world or World()
    if skip_existing and not save_images:
        raise EvaluationError("--skip-existing reads the saved PNGs: drop --no-save-images")
    run = _Run(methods, metrics, *options, world=world, skip_existing=skip_existing)
    rows = []
    for scale in tqdm(parse_scales(scales), desc=source.name, unit="scale"):
        rows += _evaluate_scale(source, scale, Path(out_dir), run, overwrite)
    return world.broadcast(rows)  # rank 0's, with FID


def check_out_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Refuses a run folder that is a file, or non-empty unless `overwrite`; creates nothing."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EvaluationError(f"output folder {out} is a file; choose another --out-dir")
    check_writable_folder(out, "--out-dir", EvaluationError)
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
