"""Evaluate LDCSR (or its stage-1 autoencoder) with the paper's protocol at any scale.

    python test.py --checkpoint path/to/checkpoint.ckpt --datasets AID --scales 4
    python test.py --checkpoint logs/second_stage_van_v4/<run>/checkpoints/last.ckpt \\
        --datasets AID DOTA DIOR NWPU --scales 2,2.5,3.4,4,6,8,10,12
    python test.py --checkpoint authors.ckpt --config configs/second_stage_van_v4.yaml \\
        --datasets AID --scales 4
    python test.py --checkpoint stage1.ckpt --first-stage --datasets AID --scales 4
    python test.py --checkpoint CKPT --datasets my_scenes/ --datatype hr-input --scales 4
    python test.py --checkpoint CKPT --datasets AID DOTA DIOR --scales 2,2.6,3,3.4,4,6,8,10 \
        --sr-dir LIIF=results/liif HAT-L=results/hat --metrics psnr,ssim,lpips,fid,niqe,brisque
    python test.py --sr-dir LIIF=results/liif --datasets AID --scales 4   # score folders only

Datasets: a name NAME is <data-root>/NAME/test/HR (or Test/HR), as data/prepare_split.py writes
it; anything else must be a folder of images. --datatype (underscores accepted):
  hr-downsample  (default) LR = Pillow bicubic of the uint8 HR to (int(H/s), int(W/s)); target HR.
  paired         LR from <dataset>/test/LR/X<s> (prepare_split.py), same names as the HR images.
  lr             LR images only (<dataset>/test/LR/X<s>, or a folder of them): output size
                 (round(s*h), round(s*w)); no metrics.
  hr-input       super-resolve the images themselves by s (real-world use); no metrics.

Protocols (docs/departures.md, "Evaluation protocols"); SR saved as uint8 PNG and scored as
such. --protocol paper (default; the authors' benchmark script, which made the paper's tables):
PSNR on RGB (--test-y: YIQ luma) without a border crop and SSIM on the YIQ luma, as pyiqa's psnr
and ssim. --protocol test-script (the authors' test.py): PSNR/SSIM on RGB (--test-y: BT.601 Y)
with a ceil(s) border crop. Both: LPIPS AlexNet v0.1; FID pytorch-fid 2048-d, SR folder vs HR
folder; NIQE and BRISQUE (also without HR) by pyiqa, an optional package, when --metrics names
them: pip install --no-deps pyiqa==0.1.16 && pip install opencv-python-headless huggingface_hub.
--sr-dir [NAME=]FOLDER (repeatable) scores existing SR images of any method, one row each:
FOLDER/<dataset>/x<s>/<name>.png (x4 or x4.0), <name> = the HR image's output name, HR size;
every missing, extra or wrong-size file is listed before any scoring. Batch b of a scale samples
with torch.Generator().manual_seed(seed + b), so a run is reproducible for a given --batch-size
(only equal-size images share a batch). With --checkpoint a Bicubic row (Pillow) is added.
Offline metric weights: $TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth (LPIPS) and
pt_inception-2015-12-05-6726825d.pth (FID); the lpips package ships its linear layers. Missing
files are downloaded when online; otherwise the default metrics skip LPIPS/FID with a warning
naming the file, while metrics named in --metrics stop the run before any SR work.

Outputs (--out-dir, default results/<run or checkpoint name>): <dataset>/x<s>/sr/*.png (also sr_kd/,
reconstruction/, bicubic/), <dataset>/x<s>/per_image.csv, and summary.csv, summary.json, summary.md
for the whole run (each records the protocol), paper_tables/table1_x2_x4_x8,
table2_continuous_scales, table3_x4 .{md,csv,tex} (the paper's layouts; blank = not run), and
report.html (+ report_assets/, --no-report to skip): the tables and an image viewer that open
offline in a browser. Scenes of any size run in bounded memory: those whose untiled run would need
more than --max-memory GB are tiled (--tile; see super_resolve.py). With --samples N
(N >= 2) LDCSR also draws N samples per batch (seeds seed + b, ..., seed + b + N - 1; the scored
output is the first, as without it) and writes <dataset>/x<s>/uncertainty/<name>_uncertainty.tif
(float32 per-pixel std of the samples' [0, 1] outputs, mean over colour channels) and .png (viridis
preview), the per-image Spearman rank correlation of uncertainty and |SR - HR| (per_image.csv
`unc_err_spearman`, border crop ceil(s); its mean in the summary) and
<dataset>/x<s>/calibration.{csv,png} (pixels in 10 equal-count uncertainty bins against their mean
absolute error). Runtime = wall time of the SR call per image (CUDA synchronised); peak memory =
torch.cuda.max_memory_allocated on CUDA, the process peak RSS on CPU. A non-empty --out-dir is
refused unless --overwrite. Output names are the input stems; where two inputs share a stem (x.jpg,
x.tif) the extension is kept (x_jpg.png, x_tif.png). Unreadable, truncated or too small images are
listed as failed in per_image.csv with the reason and the run goes on (exit code 1 if any failed);
bad arguments and paths stop it with a one-line message (exit code 2) before any model or metric
weights are loaded.

Several GPUs or nodes: `torchrun --nproc_per_node N test.py ...` or `srun --ntasks N python
test.py ...` (utils/distributed.py): batch b of a scale runs on rank b mod N (same seeds, so the
same images and tables as one process), rank 0 merges per_image.csv, FID (Inception features of
all images), the --samples calibration (every rank's pixels), the summary and the report.
--skip-existing finishes a stopped run in --out-dir: batches whose PNGs are all saved are read
back and scored, the others are run.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from functools import partial
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
from evaluation.paper_tables import write_paper_tables
from evaluation.report import write_report
from evaluation.runner import (
    build_methods,
    check_out_dir,
    evaluate,
    load_metrics,
    parse_metrics,
    prepare_out_dir,
)
from evaluation.scoring import DEFAULT_PROTOCOL, PROTOCOLS
from evaluation.sr_folders import check_sr_dirs, parse_sr_dirs, scale_folder
from evaluation.tables import write_summary
from models import load_first_stage_model, load_sr_model
from models.ldcsr import check_temperature
from models.tiling import check_tile
from utils.cli import HelpFormatter, checkpoint_load_errors, memory_size
from utils.config import ConfigError
from utils.distributed import init_world
from utils.image_io import ImageReadError
from utils.weights import MissingPackageError, MissingWeightsError

log = logging.getLogger("test")
ERRORS = (ConfigError, EvaluationError, ImageReadError, MissingWeightsError, FileNotFoundError)
ERRORS += (MissingPackageError,)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--checkpoint", default=None, help="our checkpoint (train.py) or the authors'")
    sr_dir_help = "[NAME=]FOLDER of existing SR images (<dataset>/x<s>/*.png) to score as a row"
    add("--sr-dir", nargs="+", action="extend", default=[], help=sr_dir_help)
    protocol_help = "paper: the paper's tables (pyiqa, no crop); test-script: ceil(s) crop"
    add("--protocol", choices=PROTOCOLS, default=DEFAULT_PROTOCOL, help=protocol_help)
    config_help = "model YAML (ours or the authors'); default: the checkpoint's or <run>/configs/"
    add("--config", "-c", default=None, help=config_help)
    add("--datasets", nargs="+", required=True, help="dataset names under --data-root, or folders")
    add("--data-root", default="dataset", help="folder holding <NAME>/test/HR")
    add("--scales", nargs="+", default=["4"], help="e.g. 2,2.5,3.4,4 or 2 2.5 3.4 4")
    add("--datatype", default="hr-downsample", help="hr-downsample, paired, lr or hr-input")
    metrics_help = "comma list of psnr,ssim,lpips,fid,niqe,brisque, or 'none'; unset: the first "
    metrics_help += "four (none without HR), LPIPS/FID "
    add(
        "--metrics",
        default=None,
        help=metrics_help + "skipped with a warning if weights are missing",
    )
    add("--fid-dims", type=int, default=2048, help="FID feature size (2048 = paper; 64 for smoke)")
    test_y_help = "luma instead of RGB: PSNR on YIQ Y (paper; its SSIM is always on Y), PSNR/SSIM"
    add("--test-y", action="store_true", help=test_y_help + " on BT.601 Y (test-script)")
    add("--first-stage", action="store_true", help="evaluate stage-1 reconstructions (needs HR)")
    add("--sr-kd", action="store_true", help="also evaluate the decode of the condition alone")
    add("--seed", type=int, default=0, help="batch b samples with seed + b")
    temperature_help = "scale of the sampler's step noises in [0, 1] (1: the authors' sampler)"
    add("--temperature", type=float, default=None, help=temperature_help + "; default: the model's")
    add(
        "--samples",
        type=int,
        default=1,
        help="N >= 2: LDCSR also draws N samples (seeds seed + b ... seed + b + N - 1; the "
        "scored output stays the first) and writes their std as uncertainty/<name>_uncertainty"
        ".tif/.png, the rank correlation with |error| (unc_err_spearman) and calibration.png",
    )
    add("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the model runs")
    add("--batch-size", type=int, default=1, help="images per batch (equal-size images only)")
    add(
        "--max-memory",
        type=memory_size,
        default="auto",
        help="GB a run may use before it tiles; auto: 3/4 of the memory available now",
    )
    add("--tile", type=int, default=None, help="LR tile size; 0 = off; default: auto")
    add("--save-images", action=argparse.BooleanOptionalAction, default=True, help="keep PNGs")
    report_help = "write report.html: tables and an image viewer that opens offline (--no-report)"
    add("--report", action=argparse.BooleanOptionalAction, default=True, help=report_help)
    add("--out-dir", default=None, help="run folder (default results/<run or checkpoint name>)")
    add("--overwrite", action="store_true", help="write into a non-empty --out-dir")
    skip_help = "finish a stopped run in --out-dir: score saved PNGs, run the missing batches"
    add("--skip-existing", action="store_true", help=skip_help)
    return parser


def default_out_dir(checkpoint: str | Path | None, sr_dirs: dict | None = None) -> Path:
    """results/<run> for <run>/checkpoints/last.ckpt (<run>_<stem> for others), else the stem;
    without a checkpoint results/<--sr-dir names joined by "_">."""
    if checkpoint is None:
        return Path("results") / "_".join(re.sub(r"[^\w.-]+", "_", n) for n in sr_dirs or {})
    path = Path(checkpoint)
    if path.parent.name == "checkpoints":
        run = path.parent.parent.resolve().name
        return Path("results") / (run if path.stem == "last" else f"{run}_{path.stem}")
    return Path("results") / path.stem


def load_model(args: argparse.Namespace, device: torch.device):
    """The stage-2 LDCSR, or the stage-1 autoencoder with --first-stage, in eval mode."""
    load = load_first_stage_model if args.first_stage else load_sr_model
    with checkpoint_load_errors(args.checkpoint):
        model = load(args.checkpoint, args.config, map_location=device)
    if args.temperature is not None:
        model.sampling_temperature = args.temperature
    return model


def check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple:
    """`(scales, datatype)`; a bad flag or combination exits through `parser.error`."""
    try:
        scales, datatype = parse_scales(args.scales), parse_datatype(args.datatype)
    except EvaluationError as err:
        parser.error(str(err))
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.temperature is not None:
        try:
            check_temperature(args.temperature)
        except ValueError as err:
            parser.error(f"--temperature {err}")
        if args.first_stage:
            parser.error("--temperature is a stage-2 (LDCSR) setting; drop it with --first-stage")
    if args.samples < 1 or args.samples > 1 and args.first_stage:
        parser.error(f"--samples {args.samples}: 1, or N >= 2 for a stage-2 (LDCSR) model")
    try:
        check_tile(args.tile or 0)
    except ValueError as err:
        parser.error(f"--tile: {err}")
    if args.first_stage and (args.sr_kd or datatype not in REFERENCE_DATATYPES):
        parser.error("--first-stage needs HR images (hr-downsample or paired) and no --sr-kd")
    if args.skip_existing and (args.overwrite or not args.save_images):
        parser.error("--skip-existing reads the saved PNGs: drop --overwrite / --no-save-images")
    if args.checkpoint is None and (not args.sr_dir or args.first_stage or args.sr_kd):
        parser.error("give --checkpoint (a model to run), --sr-dir (outputs to score), or both")
    return scales, datatype


def write_tables(args: argparse.Namespace, rows: list[dict], out_dir: Path, run: dict) -> None:
    """summary.{csv,json,md} (with the run's settings) and the paper's tables; prints the table."""
    scales, datatype = parse_scales(args.scales), parse_datatype(args.datatype)
    settings = {**vars(args), "scales": scales, "datatype": datatype, **run}
    sys.stdout.write(write_summary(rows, out_dir, settings))
    write_paper_tables(rows, out_dir)


def main(argv: list[str] | None = None) -> list[dict]:
    """Runs the evaluation; returns the summary rows (also written to --out-dir)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    scales, datatype = check_flags(parser, args)
    sr_dirs = parse_sr_dirs(args.sr_dir)
    for flag, path in (("--checkpoint", args.checkpoint), ("--config", args.config)):
        if path is not None and not Path(path).is_file():
            raise EvaluationError(f"{flag} {path} is not a file")
    world, device = init_world(args.device, EvaluationError)  # torchrun / srun: one of several
    sources = [resolve_dataset(name, args.data_root) for name in args.datasets]
    if len({source.name for source in sources}) < len(sources):
        parser.error(f"--datasets {args.datasets} give two datasets the same result folder name")
    for source in sources:  # folders, images and their output names, from file names only
        check_inputs(source, datatype, scales)
    check_sr_dirs(sr_dirs, sources, datatype, scales)  # every problem in one message
    reference = datatype in REFERENCE_DATATYPES
    parse_metrics(args.metrics, reference)
    out = args.out_dir or default_out_dir(args.checkpoint, sr_dirs)
    out_dir = check_out_dir(out, args.overwrite or args.skip_existing)
    # Everything above reads no weights: a bad argument fails before any download or model load.
    metrics = load_metrics(args.metrics, reference, device, args.fid_dims, args.protocol)
    model = load_model(args, device) if args.checkpoint is not None else None
    world.barrier()  # every rank has checked --out-dir before any rank writes to it
    prepare_out_dir(out_dir, args.overwrite or args.skip_existing)
    log.info("device %s, metrics %s, writing to %s", device, list(metrics.names), out_dir)
    options = dict(datatype=datatype, metrics=metrics, seed=args.seed, test_y=args.test_y)
    options.update(batch_size=args.batch_size, save_images=args.save_images, sr_kd=args.sr_kd)
    options.update(samples=args.samples, sr_dirs=sr_dirs)
    options.update(world=world, skip_existing=args.skip_existing)
    options["tiling"] = dict(max_memory=args.max_memory, tile=args.tile)
    rows = []
    for source in sources:
        rows += evaluate(model, source, scales, out_dir, overwrite=args.overwrite, **options)
    if world.main:  # the merged rows; the other ranks only return them
        write_tables(args, rows, out_dir, {"device": str(device), "metrics": list(metrics.names)})
    if args.report and world.main:
        methods = build_methods(model, args.sr_kd) if model is not None else []
        folders = {method.name: method.folder for method in methods}
        folders |= {name: partial(scale_folder, root) for name, root in sr_dirs.items()}
        log.info("report: %s", write_report(out_dir, folders, sources, datatype))
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
