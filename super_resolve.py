"""Super-resolve images or whole scenes of any size with a trained LDCSR model.

    python super_resolve.py scene.tif --checkpoint logs/<run>/checkpoints/last.ckpt \\
        --output results/sr --scale 4
    python super_resolve.py photos/ "more/*.png" -c CKPT --output out/ --scale 3.5,2.5
    python super_resolve.py big.png -c authors.ckpt --config configs/second_stage_van_v4.yaml \\
        --output out/ --size 4000x4000 --tile 128 --tile-overlap 16

Inputs: files, folders (searched recursively, sub-folders kept under --output) or glob patterns.
Scale: --scale s, or "sH,sW" for different height and width factors; the output size is
(round(sH*h), round(sW*w)), or --size HxW. The model is conditioned on the height ratio H/h only
(scale and output-size embeddings, decoder modulation, upsampler gates), as in the authors' model;
the width factor only changes the output grid. Outputs are sampled with --seed (the same numbers
on CPU and GPU), tiled or not.

Tiling (models/inference.py): scenes whose untiled run would need more than --max-memory GB are
cut into overlapping LR tiles of --tile pixels (0 = never tile), cross-faded over --tile-overlap
pixels; the diffusion noise is drawn once for the whole scene's latent and every tile is
conditioned on the scene's scale and size, so tiles agree where they overlap.

Formats (utils/scene_io.py): PNG/JPEG/TIFF, 8/16-bit, grey/RGB with or without alpha; outputs keep
the input's bands and bit depth (PNG for PNG/JPEG, TIFF for TIFF). GeoTIFFs keep their
georeferencing, with the pixel size divided by the scale, when rasterio is installed.

Existing outputs are never overwritten without --overwrite. A file that fails is reported and the
others go on; the exit code is 1 if any file failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import glob
import logging
import pickle
import sys
import tempfile
from pathlib import Path

import torch

from models import load_sr_model
from models.inference import MIN_TILE, PRECISIONS, SceneSuperResolver, untiled_peak_bytes
from utils.cli import HelpFormatter, pick_device
from utils.config import ConfigError
from utils.image_io import IMAGE_EXTENSIONS, ImageReadError, list_images
from utils.scene_io import output_suffix, read_scene, write_scene

log = logging.getLogger("super_resolve")


class UsageError(ValueError):
    """A bad argument: reported in one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = parser.add_argument
    add("inputs", nargs="+", help="image files, folders or glob patterns")
    add("--output", "-o", required=True, help="output folder (created if missing)")
    add("--checkpoint", "-c", required=True, help="our checkpoint (train.py) or the authors'")
    add("--config", default=None, help="model YAML; default: the checkpoint's or <run>/configs/")
    add("--scale", default="4", help="s or sH,sW (height, width factors), > 0")
    add("--size", default=None, help="output size HxW instead of --scale, e.g. 4000x4000")
    add("--seed", type=int, default=0, help="seed of the diffusion noise (CPU generator)")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the model runs")
    add("--tile", type=int, default=None, help="LR tile size; 0 = off; default: auto")
    add("--tile-overlap", type=int, default=16, help="LR overlap of neighbouring tiles")
    add("--max-memory", type=float, default=2.0, help="GB an untiled run may use (auto tiling)")
    add("--precision", default="auto", choices=("auto", *PRECISIONS), help="auto: bf16 on CUDA")
    add("--compile", action="store_true", help="torch.compile the networks (slow first image)")
    add("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    add("--overwrite", action="store_true", help="replace existing output files")
    add("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def parse_scale(text: str) -> tuple[float, float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(v > 0 for v in values):
        raise UsageError(f"--scale {text!r}: expected s or sH,sW with positive numbers")
    return (values[0], values[-1])


def parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) >= 8 for p in parts):
        raise UsageError(f"--size {text!r}: expected HxW with integers >= 8, e.g. 4000x4000")
    return int(parts[0]), int(parts[1])


def output_size(args, lr_size) -> tuple[int, int]:
    if args.size:
        return parse_size(args.size)
    size = tuple(round(s * n) for s, n in zip(parse_scale(args.scale), lr_size))
    if min(size) < 8:
        raise ValueError(f"output {size[0]}x{size[1]} is too small (>= 8 px per side)")
    return size


def collect_inputs(patterns: list[str]) -> list[tuple[Path, Path]]:
    """(input file, output path relative to --output) for files, folders and globs."""
    found = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found += [(path / rel, Path(rel)) for rel in list_images(path)]
        elif path.is_file():
            found.append((path, Path(path.name)))
        else:
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
            files = [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
            if not files:
                raise UsageError(f"no image matches {pattern!r} (a file, folder or glob pattern)")
            found += [(p, Path(p.name)) for p in files]
    return found


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UsageError(f"output folder {folder} is not writable: {err}") from err


def auto_tile(args, lr_size, out_size) -> int:
    """--tile, or (auto) 0 when an untiled run fits --max-memory, else ~512 HR pixels."""
    if args.tile is not None:
        return args.tile
    if untiled_peak_bytes(lr_size, out_size) <= args.max_memory * 2**30:
        return 0
    scale = max(o / n for o, n in zip(out_size, lr_size))
    return max(MIN_TILE, 2 * args.tile_overlap, min(128, round(512 / scale)))


def run_one(resolver, args, src: Path, dst: Path) -> None:
    scene = read_scene(src)
    out_size = output_size(args, scene.size)
    resolver.tile = auto_tile(args, scene.size, out_size)
    log.info("%s: %dx%d -> %dx%d, tile %d", src, *scene.size, *out_size, resolver.tile)
    generator = torch.Generator().manual_seed(args.seed)
    sr = resolver(scene.rgb[None], out_size, generator=generator)
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_scene(dst, scene, sr[0].cpu())


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit code: 0 ok, 1 some files failed, 2 bad arguments."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (UsageError, ConfigError, FileNotFoundError) as err:
        sys.stderr.write(f"super_resolve.py: error: {err}\n")
        return 2


def run(args: argparse.Namespace) -> int:
    """Checks the arguments, loads the model and super-resolves every input."""
    if args.size is None:
        parse_scale(args.scale)
    else:
        parse_size(args.size)
    if args.tile is not None and args.tile and args.tile < max(MIN_TILE, 2 * args.tile_overlap):
        raise UsageError(
            f"--tile {args.tile} is below the minimum {max(MIN_TILE, 2 * args.tile_overlap)} "
            f"(>= {MIN_TILE} and >= 2 x --tile-overlap); use 0 to disable tiling"
        )
    if args.tile_overlap < 0:
        raise UsageError("--tile-overlap must be >= 0")
    out_dir = Path(args.output)
    jobs = collect_inputs(args.inputs)
    check_writable(out_dir)
    device = pick_device(args.device, UsageError)
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    try:
        model = load_sr_model(args.checkpoint, args.config, map_location=device)
    except (ValueError, pickle.UnpicklingError, EOFError) as err:
        raise ConfigError(f"cannot load {args.checkpoint}: {err}") from err
    resolver = SceneSuperResolver(
        model, overlap=args.tile_overlap, precision=precision, compile=args.compile,
        progress=not args.no_progress,
    )  # fmt: skip
    failed, written = [], set()
    for src, rel in jobs:
        dst = (out_dir / rel).with_suffix(output_suffix(src))
        try:
            if dst in written:
                raise FileExistsError(f"{dst} was already written from another input of this run")
            if dst.exists() and not args.overwrite:
                raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
            run_one(resolver, args, src, dst)
            written.add(dst)
            log.info("wrote %s", dst)
        except (ImageReadError, FileExistsError, OSError, ValueError, RuntimeError) as err:
            log.error("%s: %s", src, err)
            failed.append((src, err))
    for src, err in failed:
        log.error("failed: %s (%s)", src, err)
    log.info("%d of %d images written to %s", len(jobs) - len(failed), len(jobs), out_dir)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
