"""Evaluation loop of the paper protocol (ARCHITECTURE.md section 4), shared by test.py and demo.py.

`evaluate` runs one dataset at several scales: inputs per datatype, batches of equal-size images,
every method under `torch.inference_mode()`, metrics from `utils.metrics`, PNGs and a per-image
CSV per scale. `write_summary` writes the run's table as `summary.csv`, `.json` and `.md`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath

import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from data.prepare_split import flat_names
from data.transforms import resize_bicubic
from utils.image_io import ImageReadError, list_images, load_image, to_tensor01, verify_image
from utils.metrics import crop_border_for, fid_from_folders, lpips_distance, psnr, quantize, ssim
from utils.weights import MissingWeightsError, build_inception, build_lpips

try:
    import resource  # peak RSS on CPU (Unix only)
except ImportError:  # pragma: no cover - Windows
    resource = None

log = logging.getLogger(__name__)

DATATYPES = ("hr-downsample", "paired", "lr", "hr-input")
REFERENCE_DATATYPES = ("hr-downsample", "paired")  # the datatypes with an HR target
METRICS = ("psnr", "ssim", "lpips", "fid")
SUMMARY_COLUMNS = (
    "method", "dataset", "scale", "psnr", "ssim", "lpips", "fid", "runtime_s_per_image",
    "peak_memory_mib", "memory", "images", "failed", "datatype",
)  # fmt: skip
IMAGE_COLUMNS = (
    "method", "file", "scale", "lr_height", "lr_width", "out_height", "out_width", "psnr", "ssim",
    "lpips", "runtime_s", "status",
)  # fmt: skip
_MARKDOWN = (
    ("Method", "method", "{}"), ("Dataset", "dataset", "{}"), ("Scale", "scale", "{:g}"),
    ("PSNR", "psnr", "{:.2f}"), ("SSIM", "ssim", "{:.4f}"), ("LPIPS", "lpips", "{:.4f}"),
    ("FID", "fid", "{:.2f}"), ("Runtime (s/img)", "runtime_s_per_image", "{:.3f}"),
    ("Peak mem (MiB)", "peak_memory_mib", "{:.0f}"), ("Images", "images", "{}"),
)  # fmt: skip
_MEMORY_NOTES = {
    "cuda_max_allocated": "torch.cuda.max_memory_allocated during the call",
    "process_peak_rss": "peak resident memory of the whole process so far (CPU run)",
}


class EvaluationError(ValueError):
    """Bad evaluation input (dataset, scale, datatype, output folder); the message says the fix."""


def parse_datatype(text: str) -> str:
    """`hr-downsample`, `paired`, `lr` or `hr-input` (underscores and upper case accepted)."""
    name = text.strip().lower().replace("_", "-")
    if name not in DATATYPES:
        raise EvaluationError(f"unknown datatype {text!r}; choose one of {', '.join(DATATYPES)}")
    return name


def parse_scales(values: Sequence[str | float]) -> list[float]:
    """`["2,2.5", "4"]` -> `[2.0, 2.5, 4.0]`; raises EvaluationError unless all are numbers > 0."""
    parts = [p for v in values for p in re.split(r"[,\s]+", str(v).strip()) if p]
    for part in parts or ["(none)"]:
        try:
            ok = math.isfinite(float(part)) and float(part) > 0
        except ValueError:
            ok = False
        if not ok:
            raise EvaluationError(f"scale {part!r} is not a number > 0; e.g. --scales 2,2.5,4")
    return list(dict.fromkeys(float(p) for p in parts))


@dataclass(frozen=True)
class Source:
    """A dataset: `images` = HR folder (lr, hr-input: the inputs); `lr_root` = the folder of the
    `X<s>` LR folders that data/prepare_split.py writes (None for a plain folder)."""

    name: str
    images: Path
    lr_root: Path | None = None


def source_from_folder(folder: str | Path, name: str | None = None) -> Source:
    """A split folder with `HR/` (+ `LR/`), an `HR` folder beside `LR/`, or a plain folder."""
    folder = Path(folder)
    if (folder / "HR").is_dir() or (folder / "LR").is_dir():
        images, lr_root = folder / "HR", folder / "LR"
    elif folder.name.lower() == "hr":
        images, lr_root = folder, folder.parent / "LR"
    else:
        images, lr_root = folder, None
    parts = [p for p in folder.resolve().parts[1:] if p.lower() not in ("hr", "lr", "test")]
    return Source(
        name or re.sub(r"[^\w.-]+", "_", parts[-1] if parts else "images"), images, lr_root
    )


def resolve_dataset(name: str, data_root: str | Path = "dataset") -> Source:
    """`<data_root>/<name>/test` (or `Test`) as prepare_split.py writes it, else a folder path."""
    root = Path(data_root)
    for folder in (root / name, Path(name)):  # a dataset folder holding test/ or Test/
        for split in ("test", "Test"):
            if (folder / split).is_dir():
                return source_from_folder(folder / split)
    if Path(name).is_dir():
        return source_from_folder(name)
    known = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    found = f"datasets under {root}: {', '.join(known)}" if known else f"{root} holds no dataset"
    raise EvaluationError(
        f"unknown dataset {name!r}: neither {root / name}/test/HR nor a folder {name} exists "
        f"({found}); write it with data/prepare_split.py, set --data-root, or pass a folder path"
    )


def input_folders(source: Source, datatype: str, scale: float) -> tuple[Path, Path | None]:
    """(folder listed: HR, or LR/X<s> for lr; the paired LR folder or None)."""
    lr_dir = source.lr_root / f"X{scale:g}" if source.lr_root is not None else None
    if datatype == "paired" and (lr_dir is None or not lr_dir.is_dir()):
        raise EvaluationError(
            f"--datatype paired needs the LR folder {lr_dir or 'LR/X' + format(scale, 'g')} beside "
            f"{source.images} (write it with data/prepare_split.py --scales {scale:g})"
        )
    folder = lr_dir if datatype == "lr" and lr_dir is not None else source.images
    if not folder.is_dir():
        raise EvaluationError(f"image folder {folder} does not exist (dataset {source.name})")
    return folder, lr_dir if datatype == "paired" else None


@dataclass(frozen=True)
class Item:
    """One image: output PNG name, input file(s), LR and output sizes (h, w)."""

    name: str
    path: Path  # the HR (hr-downsample, paired) or the input image (lr, hr-input)
    lr_path: Path | None
    lr_hw: tuple[int, int]
    out_hw: tuple[int, int]


def _item(name: str, path: Path, lr_path, datatype: str, scale: float, min_side: int) -> Item:
    height, width = verify_image(path)
    if datatype == "hr-downsample":  # truncation as data.transforms.lr_size
        lr_hw, out_hw = (int(height / scale), int(width / scale)), (height, width)
    elif datatype == "paired":
        lr_hw, out_hw = verify_image(lr_path), (height, width)
    else:
        lr_hw, out_hw = (height, width), (round(height * scale), round(width * scale))
    if min(lr_hw) < 1 or min(out_hw) < min_side:
        raise EvaluationError(
            f"{path} ({height}x{width}) is too small for scale {scale:g}: LR "
            f"{lr_hw[0]}x{lr_hw[1]}, output {out_hw[0]}x{out_hw[1]}; the model needs an LR side "
            f">= 1 px and an output side >= {min_side} px"
        )
    return Item(name, path, lr_path, lr_hw, out_hw)


def plan_items(source: Source, datatype: str, scale: float, min_side: int = 1):
    """Reads image headers -> (items, failed rows); unusable images are logged, not raised."""
    folder, lr_dir = input_folders(source, datatype, scale)
    files = list_images(folder)
    if not files:
        raise EvaluationError(
            f"no images in {folder} (png/jpg/jpeg/tif/tiff, searched recursively)"
        )
    stem = lambda f: PurePosixPath(f).with_suffix("")  # noqa: E731 - paired files match by stem
    lr_files = {stem(f): lr_dir / f for f in list_images(lr_dir)} if lr_dir else {}
    names, items, failed = flat_names(files), [], []
    for f in files:
        try:
            if lr_dir and stem(f) not in lr_files:
                raise EvaluationError(f"{folder / f} has no LR image of the same name in {lr_dir}")
            args = (names[f], folder / f, lr_files.get(stem(f)), datatype, scale, min_side)
            items.append(_item(*args))
        except (EvaluationError, ImageReadError) as err:
            log.warning("image skipped: %s", err)
            failed.append({"file": names[f], "scale": scale, "status": f"failed: {err}"})
    return items, failed


def make_batches(items: Sequence[Item], batch_size: int) -> list[list[Item]]:
    """Batches of <= `batch_size` items with equal LR and output sizes, in listing order."""
    groups: dict[tuple, list[Item]] = {}
    for item in items:
        groups.setdefault((item.lr_hw, item.out_hw), []).append(item)
    return [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def load_batch(batch: Sequence[Item], datatype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> LR [B, 3, h, w], HR [B, 3, H, W] (None without HR) in [0, 1], on the CPU."""
    lrs, hrs = [], []
    for item in batch:
        img = load_image(item.path)
        if datatype == "hr-downsample":  # Pillow bicubic of the uint8 HR (section 1)
            lrs.append(to_tensor01(resize_bicubic(img, item.lr_hw)))
        else:
            lrs.append(to_tensor01(load_image(item.lr_path) if datatype == "paired" else img))
        hrs += [to_tensor01(img)] if datatype in REFERENCE_DATATYPES else []
    return torch.stack(lrs), torch.stack(hrs) if hrs else None


def _to_pil(x01: torch.Tensor) -> Image.Image:
    return Image.fromarray(quantize(x01).permute(1, 2, 0).cpu().numpy())  # [3, H, W] -> uint8


def bicubic_upscale(lr, hr, out_size, generator=None) -> torch.Tensor:
    """Baseline: Pillow bicubic of the uint8 LR [B, 3, h, w] to out_size (as the LR was made)."""
    return torch.stack([to_tensor01(resize_bicubic(_to_pil(x), tuple(out_size))) for x in lr])


def reconstruct(autoencoder: nn.Module, lr, hr, out_size, generator=None) -> torch.Tensor:
    """Stage-1 reconstruction `decode(mode(encode(hr, lr)), lr, out_size)`, [0, 1] in and out."""
    lr, hr = lr * 2 - 1, hr * 2 - 1
    return (
        autoencoder.decode(autoencoder.encode(hr, lr).mode(), lr, out_size).clamp(-1, 1) + 1
    ) / 2


def _sr(model, lr, hr, out_size, generator):
    return model.super_resolve(lr, out_size, generator=generator)


def _sr_kd(model, lr, hr, out_size, generator):
    return model.super_resolve_condition(lr, out_size)


@dataclass(frozen=True)
class Method:
    """A table row: `run(lr, hr, out_size, generator) -> sr`, all [B, 3, ., .] in [0, 1]."""

    name: str
    folder: str  # image folder under <dataset>/x<s>/
    run: Callable[..., torch.Tensor]


def build_methods(model: nn.Module, sr_kd: bool = False, bicubic: bool = True) -> list[Method]:
    """LDCSR (+ its sr_kd decode) for a stage-2 model, the reconstruction for a stage-1 one."""
    if hasattr(model, "super_resolve"):  # models.ldcsr.LDCSR
        methods = [Method("LDCSR", "sr", partial(_sr, model))]
        methods += [Method("LDCSR (sr_kd)", "sr_kd", partial(_sr_kd, model))] if sr_kd else []
    elif sr_kd:
        raise EvaluationError("sr_kd decodes the stage-2 condition: drop it for a stage-1 model")
    else:  # models.autoencoder.AutoencoderKL
        methods = [Method("LDCSR stage 1", "reconstruction", partial(reconstruct, model))]
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


def load_metrics(requested=None, reference: bool = True, device="cpu", fid_dims: int = 2048):
    """Builds the metric networks before any SR work; returns `Metrics`.

    `requested`: None = the default `psnr,ssim,lpips,fid`, else names (list or comma string,
    "none" = no metric). A default metric whose pretrained file cannot be found or downloaded is
    skipped with a warning naming the file and where to place it; a requested one raises
    `MissingWeightsError`. `reference`: the datatype has HR images (else no metric applies).
    """
    explicit = requested is not None
    if isinstance(requested, str):
        requested = [] if requested.strip().lower() == "none" else requested.split(",")
    names = [n.strip().lower() for n in (METRICS if requested is None else requested) if n.strip()]
    if unknown := sorted(set(names) - set(METRICS)):
        raise EvaluationError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
    if not reference:
        if explicit and names:
            raise EvaluationError(f"metrics {names} need HR images, which this datatype lacks")
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


def memory_kind(device: torch.device) -> str:
    """What the peak memory column measures on `device` (see `_MEMORY_NOTES`)."""
    return "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss"


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


def _run_batches(items, scale: float, dirs: dict, run: _Run) -> tuple[list[dict], dict]:
    """Every batch through every method -> per-image rows, {method: [seconds, peak MiB]}."""
    rows, totals = [], {m.name: [0.0, 0.0] for m in run.methods}
    batches = make_batches(items, run.batch_size)
    for index, batch in enumerate(tqdm(batches, desc=f"x{scale:g}", unit="batch", leave=False)):
        lr, hr = load_batch(batch, run.datatype)
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
    return rows, totals


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None and not math.isnan(r[key])]
    return sum(values) / len(values) if values else None


def _fid(sr_dir: Path | None, hr_dir: Path | None, items, run: _Run) -> float | None:
    count = len(items)
    if hr_dir is None:
        return None
    if count < 2:
        log.warning("FID skipped for %s: it needs at least 2 images, got %d", sr_dir, count)
        return None
    try:
        model, dims = run.metrics.inception, run.metrics.fid_dims
        # pytorch-fid stacks images unresized: batches of 1 unless all have one size.
        batch_size = min(50, count) if len({i.out_hw for i in items}) == 1 else 1
        return fid_from_folders(sr_dir, hr_dir, model, batch_size, run.device, dims)
    except ValueError as err:  # e.g. pytorch-fid's "Imaginary component" for tiny sets
        log.warning("FID of %s not computed: %s", sr_dir, err)
        return None


def _evaluate_scale(source: Source, scale: float, out_dir: Path, run: _Run, overwrite: bool):
    """One dataset at one scale -> summary rows; writes `<out_dir>/<dataset>/x<s>/`."""
    scale_dir = out_dir / source.name / f"x{scale:g}"
    if scale_dir.exists() and any(scale_dir.iterdir()):
        if not overwrite:
            raise EvaluationError(f"{scale_dir} holds earlier results; pass --overwrite")
        log.info("--overwrite: replacing %s", scale_dir)
        shutil.rmtree(scale_dir)
    items, failed = plan_items(source, run.datatype, scale, run.min_side)
    fid = "fid" in run.metrics.names and run.datatype in REFERENCE_DATATYPES
    dirs = {"hr": scale_dir / "hr" if fid else None}  # FID reads folders; removed afterwards
    for m in run.methods:
        dirs[m.name] = scale_dir / m.folder if run.save_images or fid else None
    for folder in (d for d in dirs.values() if d is not None):
        folder.mkdir(parents=True)
    with torch.inference_mode():
        rows, totals = _run_batches(items, scale, dirs, run)
    summary = []
    for method in run.methods:
        mine, (seconds, peak) = [r for r in rows if r["method"] == method.name], totals[method.name]
        n = len(mine)
        summary.append({
            "method": method.name, "dataset": source.name, "scale": scale,
            **{k: _mean(mine, k) for k in ("psnr", "ssim", "lpips")},
            "fid": _fid(dirs[method.name], dirs["hr"], items if n else [], run),
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
) -> list[dict]:
    """Evaluates one dataset at every scale -> summary rows (keys `SUMMARY_COLUMNS`).

    `model`: `LDCSR` (rows LDCSR [+ LDCSR (sr_kd)]) or a stage-1 `AutoencoderKL` (row "LDCSR
    stage 1", needs HR), in eval mode on its device. `images`: a `Source` or a folder. Writes
    `<out_dir>/<dataset>/x<s:g>/{sr,sr_kd,reconstruction,bicubic}/*.png` and `per_image.csv`.
    `metrics` comes from `load_metrics` (default PSNR + SSIM). Batch b of a scale samples with
    `torch.Generator().manual_seed(seed + b)`; batches hold images of equal size only.
    `overwrite` replaces an earlier `<dataset>/x<s>` folder instead of refusing.
    """
    source = images if isinstance(images, Source) else source_from_folder(images)
    datatype = parse_datatype(datatype)
    if not hasattr(model, "super_resolve") and datatype not in REFERENCE_DATATYPES:
        raise EvaluationError("stage-1 reconstructions need HR: use hr-downsample or paired data")
    if metrics is None:
        metrics = Metrics(("psnr", "ssim") if datatype in REFERENCE_DATATYPES else ())
    methods, device = build_methods(model, sr_kd, bicubic), next(model.parameters()).device
    options = (datatype, seed, batch_size, test_y, save_images, device, min_output_side(model))
    run = _Run(methods, metrics, *options)
    rows = []
    for scale in tqdm(parse_scales(scales), desc=source.name, unit="scale"):
        rows += _evaluate_scale(source, scale, Path(out_dir), run, overwrite)
    return rows


def prepare_out_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Creates the run folder; refuses a non-empty one unless `overwrite`."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise EvaluationError(
            f"output folder {out} exists and is not empty (earlier results?); pass --overwrite "
            "to replace the results this run writes, or choose another --out-dir"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def _plain(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    """Rows as CSV with `columns` (missing values empty)."""
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: _plain(r.get(k)) for k in columns} for r in rows)


def markdown_table(rows: Sequence[dict]) -> str:
    """Method | Dataset | Scale | PSNR | SSIM | LPIPS | FID | runtime | peak memory | images."""
    cell = lambda v, fmt: "-" if _plain(v) is None else fmt.format(v)  # noqa: E731
    lines = ["| " + " | ".join(title for title, _, _ in _MARKDOWN) + " |"]
    lines.append("|" + "|".join("---" for _ in _MARKDOWN) + "|")
    lines += ["| " + " | ".join(cell(r.get(k), f) for _, k, f in _MARKDOWN) + " |" for r in rows]
    notes = "; ".join(_MEMORY_NOTES[k] for k in sorted({r.get("memory") for r in rows} - {None}))
    return "\n".join(lines) + (f"\n\nPeak memory: {notes}.\n" if notes else "\n")


def write_summary(rows: Sequence[dict], out_dir: str | Path, settings: dict | None = None) -> str:
    """Writes `summary.csv`, `summary.json` (`{"settings", "rows"}`) and `summary.md`; returns
    the Markdown table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "summary.csv", SUMMARY_COLUMNS, rows)
    plain = [{k: _plain(r.get(k)) for k in SUMMARY_COLUMNS} for r in rows]
    text = json.dumps({"settings": settings or {}, "rows": plain}, indent=2, default=str)
    (out / "summary.json").write_text(text + "\n")
    (out / "summary.md").write_text(table := markdown_table(rows))
    return table
