"""Evaluate LDCSR (or its stage-1 autoencoder) with the paper's protocol at any scale.

    python test.py --checkpoint path/to/checkpoint.ckpt --datasets AID --scales 4
    python test.py --checkpoint logs/second_stage_van_v4/<run>/checkpoints/last.ckpt \\
        --datasets AID DOTA DIOR NWPU --scales 2,2.5,3.4,4,6,8,10,12
    python test.py --checkpoint authors.ckpt --config configs/second_stage_van_v4.yaml \\
        --datasets AID --scales 4
    python test.py --checkpoint stage1.ckpt --first-stage --datasets AID --scales 4
    python test.py --checkpoint CKPT --datasets my_scenes/ --datatype hr-input --scales 4

Datasets: a name NAME is <data-root>/NAME/test/HR (or Test/HR), as data/prepare_split.py writes
it; anything else must be a folder of images. --datatype (underscores accepted):
  hr-downsample  (default) LR = Pillow bicubic of the uint8 HR to (int(H/s), int(W/s)); target HR.
  paired         LR from <dataset>/test/LR/X<s> (prepare_split.py), same names as the HR images.
  lr             LR images only (<dataset>/test/LR/X<s>, or a folder of them): output size
                 (round(s*h), round(s*w)); no metrics.
  hr-input       super-resolve the images themselves by s (real-world use); no metrics.

Protocol (docs/method.md, "Evaluation protocol"): SR saved as uint8 PNG; PSNR/SSIM on RGB
(--test-y: Y) with a ceil(s) border crop; LPIPS AlexNet v0.1; FID pytorch-fid 2048-d, SR folder
vs HR folder. Batch b of a scale samples with torch.Generator().manual_seed(seed + b), so a run is
reproducible for a given --batch-size (only equal-size images share a batch). A Bicubic row
(Pillow) is added.
Offline metric weights: $TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth (LPIPS) and
pt_inception-2015-12-05-6726825d.pth (FID); the lpips package ships its linear layers. Missing
files are downloaded when online; otherwise the default metrics skip LPIPS/FID with a warning
naming the file, while metrics named in --metrics stop the run before any SR work.

Outputs (--out-dir, default results/<run or checkpoint name>): <dataset>/x<s>/sr/*.png (also
sr_kd/, reconstruction/, bicubic/), <dataset>/x<s>/per_image.csv, and summary.csv, summary.json,
summary.md for the whole run. Scenes of any size run in bounded memory: those whose untiled run
would need more than --max-memory GB are tiled (--tile, --tile-overlap; see super_resolve.py).
Runtime = wall time of the SR call per image (CUDA synchronised);
peak memory = torch.cuda.max_memory_allocated on CUDA, the process peak RSS on CPU. A non-empty
--out-dir is refused unless --overwrite. Output names are the input stems; where two inputs share
a stem (x.jpg, x.tif) the extension is kept (x_jpg.png, x_tif.png). Unreadable, truncated or too
small images are listed as failed in per_image.csv with the reason and the run goes on (exit code
1 if any failed); bad arguments and paths stop it with a one-line message (exit code 2) before any
model or metric weights are loaded.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import sys
from pathlib import Path

import torch

from evaluation.pairs import (
    REFERENCE_DATATYPES,
    EvaluationError,
    check_inputs,
    parse_datatype,
    parse_scales,
    resolve_dataset,
)
from evaluation.runner import check_out_dir, evaluate, load_metrics, parse_metrics, prepare_out_dir
from evaluation.tables import write_summary
from models import load_first_stage_model, load_sr_model
from models.inference import check_tile
from utils.cli import HelpFormatter, pick_device
from utils.config import ConfigError
from utils.image_io import ImageReadError
from utils.weights import MissingWeightsError

log = logging.getLogger("test")
ERRORS = (ConfigError, EvaluationError, ImageReadError, MissingWeightsError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--checkpoint", required=True, help="our checkpoint (train.py) or the authors'")
    config_help = "model YAML (ours or the authors'); default: the checkpoint's or <run>/configs/"
    add("--config", "-c", default=None, help=config_help)
    add("--datasets", nargs="+", required=True, help="dataset names under --data-root, or folders")
    add("--data-root", default="dataset", help="folder holding <NAME>/test/HR")
    add("--scales", nargs="+", default=["4"], help="e.g. 2,2.5,3.4,4 or 2 2.5 3.4 4")
    add("--datatype", default="hr-downsample", help="hr-downsample, paired, lr or hr-input")
    metrics_help = "comma list of psnr,ssim,lpips,fid, or 'none'; unset: all four, LPIPS/FID "
    add(
        "--metrics",
        default=None,
        help=metrics_help + "skipped with a warning if weights are missing",
    )
    add("--fid-dims", type=int, default=2048, help="FID feature size (2048 = paper; 64 for smoke)")
    add("--test-y", action="store_true", help="PSNR/SSIM on the BT.601 Y channel instead of RGB")
    add("--first-stage", action="store_true", help="evaluate stage-1 reconstructions (needs HR)")
    add("--sr-kd", action="store_true", help="also evaluate the decode of the condition alone")
    add("--seed", type=int, default=0, help="batch b samples with seed + b")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the model runs")
    add("--batch-size", type=int, default=1, help="images per batch (equal-size images only)")
    add("--max-memory", type=float, default=2.0, help="GB an untiled run may use (auto tiling)")
    add("--tile", type=int, default=None, help="LR tile size; 0 = off; default: auto")
    add("--tile-overlap", type=int, default=16, help="LR overlap of neighbouring tiles")
    add("--save-images", action=argparse.BooleanOptionalAction, default=True, help="keep PNGs")
    add("--out-dir", default=None, help="run folder (default results/<run or checkpoint name>)")
    add("--overwrite", action="store_true", help="write into a non-empty --out-dir")
    return parser


def default_out_dir(checkpoint: str | Path) -> Path:
    """results/<run> for <run>/checkpoints/last.ckpt (<run>_<stem> for others), else the stem."""
    path = Path(checkpoint)
    if path.parent.name == "checkpoints":
        run = path.parent.parent.resolve().name
        return Path("results") / (run if path.stem == "last" else f"{run}_{path.stem}")
    return Path("results") / path.stem


def load_model(args: argparse.Namespace, device: torch.device):
    """The stage-2 LDCSR, or the stage-1 autoencoder with --first-stage, in eval mode."""
    load = load_first_stage_model if args.first_stage else load_sr_model
    try:
        return load(args.checkpoint, args.config, map_location=device)
    except ConfigError:
        raise
    except (ValueError, pickle.UnpicklingError, EOFError) as err:  # not a checkpoint, wrong config
        raise ConfigError(f"cannot load {args.checkpoint}: {err}") from err


def main(argv: list[str] | None = None) -> list[dict]:
    """Runs the evaluation; returns the summary rows (also written to --out-dir)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        scales, datatype = parse_scales(args.scales), parse_datatype(args.datatype)
    except EvaluationError as err:
        parser.error(str(err))
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        check_tile(args.tile or 0, args.tile_overlap)
    except ValueError as err:
        parser.error(f"--tile / --tile-overlap: {err}")
    if args.first_stage and (args.sr_kd or datatype not in REFERENCE_DATATYPES):
        parser.error("--first-stage needs HR images (hr-downsample or paired) and no --sr-kd")
    for flag, path in (("--checkpoint", args.checkpoint), ("--config", args.config)):
        if path is not None and not Path(path).is_file():
            raise EvaluationError(f"{flag} {path} is not a file")
    device = pick_device(args.device, EvaluationError)
    sources = [resolve_dataset(name, args.data_root) for name in args.datasets]
    if len({source.name for source in sources}) < len(sources):
        parser.error(f"--datasets {args.datasets} give two datasets the same result folder name")
    for source in sources:  # folders, images and their output names, from file names only
        check_inputs(source, datatype, scales)
    reference = datatype in REFERENCE_DATATYPES
    parse_metrics(args.metrics, reference)
    out_dir = check_out_dir(args.out_dir or default_out_dir(args.checkpoint), args.overwrite)
    # Everything above reads no weights: a bad argument fails before any download or model load.
    metrics = load_metrics(args.metrics, reference, device, args.fid_dims)
    model = load_model(args, device)
    prepare_out_dir(out_dir, args.overwrite)
    log.info("device %s, metrics %s, writing to %s", device, list(metrics.names), out_dir)
    options = dict(datatype=datatype, metrics=metrics, seed=args.seed, test_y=args.test_y)
    options.update(batch_size=args.batch_size, save_images=args.save_images, sr_kd=args.sr_kd)
    options["tiling"] = dict(
        max_memory=args.max_memory, tile=args.tile, tile_overlap=args.tile_overlap
    )
    rows = []
    for source in sources:
        rows += evaluate(model, source, scales, out_dir, overwrite=args.overwrite, **options)
    settings = {**vars(args), "scales": scales, "datatype": datatype, "device": str(device)}
    table = write_summary(rows, out_dir, {**settings, "metrics": list(metrics.names)})
    sys.stdout.write(table)
    if not any(row["images"] for row in rows):
        raise EvaluationError(f"no image could be evaluated; see {out_dir}/*/x*/per_image.csv")
    return rows


def report_failures(rows: list[dict]) -> int:
    """Exit code of a finished run: 1 (with a message) when any image failed, else 0."""
    failed = sum(r["failed"] for r in rows if r["method"] == rows[0]["method"]) if rows else 0
    if failed:
        sys.stderr.write(f"test.py: {failed} image(s) failed; their reasons are in per_image.csv\n")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(report_failures(main()))
    except ERRORS as err:
        sys.stderr.write(f"test.py: error: {err}\n")
        sys.exit(2)
