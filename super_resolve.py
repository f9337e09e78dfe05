"""Super-resolve images or whole scenes of any size with a trained LDCSR model.

    python super_resolve.py scene.tif --checkpoint logs/<run>/checkpoints/last.ckpt \\
        --output results/sr --scale 4
    python super_resolve.py photos/ "more/*.png" --checkpoint CKPT --output out/ --scale 3.5x2.5
    python super_resolve.py big.png --checkpoint authors.ckpt -c configs/second_stage_van_v4.yaml \\
        --output out/ --size 4000x4000 --tile 128
    python super_resolve.py s2_scene.tif --checkpoint CKPT --output out/ --scale 2 \\
        --bands 3,2,1 --value-range 0,3000 --cog

Inputs: files, folders (searched recursively, sub-folders kept under --output) or glob patterns.
Scale: --scale s, or sHxsW (e.g. 3.5x2.5) for different height and width factors; the output
size is (round(sH*h), round(sW*w)), or --size HxW. The model is conditioned on the height ratio
H/h only (scale and output-size embeddings, decoder modulation, upsampler gates), as in the
authors' model; the width factor only changes the output grid. Outputs are sampled with --seed
(the same numbers on CPU and GPU), tiled or not.

Inference is `LDCSR.super_resolve`: scenes whose untiled run would need more than --max-memory GB
(estimated from the loaded model's own widths; default auto: 3/4 of the memory available) are
tiled (--tile LR pixels, default: as large as the budget allows; 0 = never tile): the stages
with scene-wide normalisation statistics run whole where they fit the budget and stream by bands
of rows where they do not, with the statistics of the untiled run, and the output is rendered in
tiles; the diffusion noise is drawn once for the whole scene's latent, so a tiled scene is the
untiled output up to float rounding (docs/method.md, "Tiled inference").

Formats (scenes/scene_io.py): PNG/JPEG, 8/16-bit, grey/RGB with or without alpha, are written
as PNG with the input's bands and bit depth. TIFF/GeoTIFF of any size, band count and dtype are
streamed block by block from disk to disk (memory does not grow with the scene; a scene whose
output fits --max-memory is one block, so it gets the same pixels as the same image in PNG; the
blocks of a larger scene, or of --block, render the scene's output grid but draw their own noise,
seeded by their position) and written as
tiled GeoTIFF (--cog: Cloud-Optimized): CRS, per-axis pixel size (divided by the scale), bands,
dtype, nodata, masks and alpha (resized nearest, as masks) and tags (not GDAL's STATISTICS_*) are
kept. Three bands feed the model (--bands, default the first three; one number for a grey band),
mapped to [0, 1] by --value-range (finite) or per-scene 2-98 % percentiles; the other bands are
upsampled bicubically. Every output side must be >= the model's minimum (16 px for configs/tiny).

Uncertainty (--samples N, N >= 2): N samples with seeds --seed .. --seed+N-1 (the output is the
first, unchanged), and <name>_uncertainty.tif beside the output: per-pixel std of the samples'
[0, 1] outputs, mean over the colour channels, float32 (GeoTIFF inputs: the output's
georeferencing, NaN where it is masked), with a viridis <name>_uncertainty.png preview (0 to the
99th percentile). N samples cost N runs; tiled and untiled runs give the same map.

Outputs are named <input stem><--suffix>.png/.tif under --output. Existing outputs are never
overwritten without --overwrite; --skip-existing leaves them and goes on. Two inputs that would
write the same output are an error before any work. A file that fails is reported and the others
go on; the exit code is 1 if any file failed, 2 for bad arguments.

Several GPUs or nodes: `torchrun --nproc_per_node N super_resolve.py ...` or `srun --ntasks N
python super_resolve.py ...` (utils/distributed.py), on cuda:LOCAL_RANK: input k runs on rank k
mod N, except TIFFs of more than one block, whose blocks all ranks share (block k on rank k mod
N, one rank writing; scenes/blocks.py), so a single huge GeoTIFF keeps every process busy.
PNG/JPEG scenes are read whole and tiled inside the model, each in one process. Outputs equal
one process's; rank 0 lists every rank's failures. A stopped run finishes with --skip-existing
(outputs are written whole or not at all).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

from models import load_sr_model
from models.geometry import check_output_size
from models.ldcsr import check_temperature
from models.memory import memory_budget
from models.pipeline import PRECISIONS
from models.tiling import check_tile
from models.uncertainty import seeds_from
from scenes.blocks import BlockShare, SharedSceneError
from scenes.inputs import collect_inputs, output_paths
from scenes.raster import open_raster, parse_bands, parse_value_range, raster_size
from scenes.scene_io import (
    BLOCK,
    OVERLAP,
    is_raster,
    read_scene,
    super_resolve_raster,
    write_scene,
)
from scenes.uncertainty_maps import raster_uncertainty, uncertainty_paths, write_uncertainty
from utils.cli import HelpFormatter, check_writable_folder, checkpoint_load_errors, memory_size
from utils.config import ConfigError
from utils.distributed import init_world
from utils.image_io import ImageReadError

log = logging.getLogger("super_resolve")
SCENE_PLANES = 4  # float32 copies of a block's output that streaming holds (result, blend, ...)


class UsageError(ValueError):
    """A bad argument: reported in one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = parser.add_argument
    add("inputs", nargs="+", help="image files, folders or glob patterns")
    add("--output", "-o", required=True, help="output folder (created if missing)")
    add("--checkpoint", required=True, help="our checkpoint (train.py) or the authors'")
    add(
        "--config",
        "-c",
        default=None,
        help="model YAML (default: the checkpoint's own or <run>/configs/)",
    )
    add("--scale", default="4", help="s, or sHxsW for height x width factors (e.g. 3.5x2.5); > 0")
    add("--size", default=None, help="output size HxW instead of --scale, e.g. 4000x4000")
    add("--suffix", default="", help="appended to each output's file stem, e.g. _x4")
    add(
        "--bands",
        default=None,
        help="TIFF inputs: 1-based bands fed to the model as R,G,B, "
        "e.g. 3,2,1 (default: the first three; one number feeds a grey band); the other bands "
        "are upsampled bicubically",
    )
    add(
        "--value-range",
        default=None,
        help="TIFF inputs: MIN,MAX mapped to [0, 1] for the "
        "model (default: per-scene 2-98 %% percentiles of each model band; 8 bit: value / 255)",
    )
    add("--cog", action="store_true", help="write TIFF outputs as Cloud-Optimized GeoTIFFs")
    block_help = f"TIFF inputs: LR pixels per streamed block (>= {2 * OVERLAP}); default: the "
    block_help += f"whole scene if its output fits --max-memory, else {BLOCK}"
    add("--block", type=int, default=None, help=block_help)
    add("--seed", type=int, default=0, help="seed of the diffusion noise (CPU generator)")
    temperature_help = "scale of the sampler's step noises in [0, 1] (1: the authors' sampler)"
    add("--temperature", type=float, default=None, help=temperature_help + "; default: the model's")
    add(
        "--samples",
        type=int,
        default=1,
        help="N >= 2: also draw N samples (seeds seed..seed+N-1) and write their per-pixel std "
        "as <name>_uncertainty.tif (float32, georeferenced like a GeoTIFF output) and .png "
        "(preview); the output stays the --seed sample",
    )
    add("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the model runs")
    add("--tile", type=int, default=None, help="LR tile size; 0 = off (default: auto)")
    add(
        "--max-memory",
        type=memory_size,
        default="auto",
        help="GB a run may use before it tiles; auto: 3/4 of the memory available now",
    )
    add("--precision", default="auto", choices=("auto", *PRECISIONS), help="auto: bf16 on CUDA")
    add("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    existing.add_argument(
        "--skip-existing",
        action="store_true",
        help="leave existing outputs and go on (resume a long batch)",
    )
    add("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def parse_scale(text: str) -> tuple[float, float]:
    """`--scale`: "4" -> (4, 4); "3.5x2.5" -> (3.5, 2.5) (height, width factors)."""
    if "," in text:  # a list in test.py --scales; refused rather than guessed
        raise UsageError(
            f"--scale {text!r} is ambiguous: write {text.replace(',', 'x')} for "
            "height x width factors; super_resolve.py takes one scale per run"
        )
    try:
        values = [float(v) for v in text.lower().split("x")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(v > 0 for v in values):
        raise UsageError(
            f"--scale {text!r}: expected s or sHxsW with positive numbers, e.g. 4 or 3.5x2.5"
        )
    return (values[0], values[-1])


def parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) >= 8 for p in parts):
        raise UsageError(f"--size {text!r}: expected HxW with integers >= 8, e.g. 4000x4000")
    return int(parts[0]), int(parts[1])


def output_size(args, lr_size) -> tuple[int, int]:
    if args.size:
        return parse_size(args.size)
    return tuple(round(s * n) for s, n in zip(parse_scale(args.scale), lr_size))


def prepare(model, args, src: Path, dst: Path) -> tuple:
    """Checks an input before it runs (its outputs exist only with --overwrite, its output size
    fits the model) -> (PNG/JPEG `Scene` or None for a TIFF, LR size, output size)."""
    maps = uncertainty_paths(dst) if args.samples >= 2 else ()
    for path in (p for p in (dst, *maps) if p.exists() and not args.overwrite):
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it or "
                              "--skip-existing to keep it")  # fmt: skip
    dst.parent.mkdir(parents=True, exist_ok=True)
    scene = None if is_raster(src) else read_scene(src)
    lr_size = raster_size(src) if scene is None else scene.size
    out_size = output_size(args, lr_size)
    check_output_size(model, out_size)
    kind = " (TIFF, streamed)" if scene is None else ""
    log.info("%s: %dx%d -> %dx%d%s", src, *lr_size, *out_size, kind)
    return scene, lr_size, out_size


def run_one(model, args, src: Path, dst: Path, block=None, share=None) -> None:
    """One input into `dst`; a (Geo)TIFF in LR blocks of `block` (None: `raster_block`), its
    blocks shared by the processes of `share` (`scenes.blocks.BlockShare`, all ranks call)."""
    share = share or BlockShare()
    prepared, error = share.attempt(prepare, model, args, src, dst)
    share.agree(error)  # with several processes: every rank goes on, or none
    scene, _, out_size = prepared
    if scene is None:  # a (Geo)TIFF, streamed block by block, whatever the scene's size
        block = block or raster_block(args, src, out_size)
        if args.samples < 2:
            stream_raster(model, args, src, dst, out_size, args.seed, block, share)
            return
        temporary = tempfile.TemporaryDirectory(dir=dst.parent, prefix=".samples_")
        with temporary if share.writes else nullcontext(dst.parent) as tmp:
            samples = [dst] + [Path(tmp) / f"sample{k}.tif" for k in range(1, args.samples)]
            for k, path in enumerate(samples):  # sample k = a separate run with seed + k
                stream_raster(model, args, src, path, out_size, args.seed + k, block, share)
            if share.writes:
                bands, value_range = parse_bands(args.bands), parse_value_range(args.value_range)
                raster_uncertainty(src, samples, bands, value_range)
        return
    lr = scene.rgb[None].to(model.device)
    if args.samples < 2:
        generator = torch.Generator().manual_seed(args.seed)
        sr = model.super_resolve(lr, out_size, generator=generator, **args.tiling)
    else:
        seeds = seeds_from(args.seed, args.samples)
        sr, uncertainty = model.super_resolve_samples(lr, out_size, seeds, **args.tiling)
    write_scene(dst, scene, sr[0].cpu())
    if args.samples >= 2:
        write_uncertainty(dst, uncertainty[0, 0].cpu().numpy())


def stream_raster(model, args, src: Path, dst: Path, out_size, seed: int, block: int,
                  share=None) -> None:  # fmt: skip
    """One sample of a (Geo)TIFF scene, streamed block by block into `dst`."""

    def sr_fn(lr, window):  # each block seeded by its position: any order, any process
        generator = torch.Generator().manual_seed(window.seed(seed))
        return model.super_resolve(lr.to(model.device), window.out_size, generator=generator,
                                   window=window, **args.tiling).cpu()  # fmt: skip

    super_resolve_raster(
        src,
        dst,
        sr_fn,
        out_size,
        bands=parse_bands(args.bands),
        value_range=parse_value_range(args.value_range),
        cog=args.cog,
        block=block,
        share=share,
    )


def raster_block(args, src: Path, out_size) -> int:
    """LR block size of a streamed (Geo)TIFF: --block, or the whole scene when its float32
    output planes fit --max-memory, so that it runs as the same image as PNG would (one noise
    draw, tiled inside when the model's untiled run does not fit), else `BLOCK` (each block on
    the scene's output grid, drawing its own noise)."""
    if args.block:
        return args.block
    with open_raster(src) as raster:
        bands, lr_size = raster.count, (raster.height, raster.width)
    budget = memory_budget(args.tiling["max_memory"], torch.device("cpu"))  # host planes
    whole = SCENE_PLANES * (bands + 3) * 4 * out_size[0] * out_size[1]  # bytes
    return max(BLOCK, *lr_size) if budget is not None and whole <= budget * 2**30 else BLOCK


def shared_blocks(args, jobs, world) -> dict[int, int]:
    """{input index: LR block size} of the (Geo)TIFFs whose blocks all ranks share: those of
    more than one block, decided on rank 0 (the memory budget is a machine's) for every rank.
    Each shared scene is written by rank n mod N (n = its place among them), so writing
    spreads too; PNG/JPEG and one-block scenes stay whole, input k on rank k mod N."""
    if world.size == 1:
        return {}
    plan = {}
    for k, (src, _) in enumerate(jobs if world.main else ()):
        if not is_raster(src):
            continue
        try:
            lr_size = raster_size(src)
            block = raster_block(args, src, output_size(args, lr_size))
        except (ImageReadError, OSError, ValueError):  # fails where it runs, reported there
            continue
        if block < max(lr_size):
            plan[k] = block
    return world.broadcast(plan)


def super_resolve_all(model, args, jobs, dsts, world) -> list[tuple[str, str]]:
    """Every input, shared scenes first (all ranks on each), then this rank's share of the rest;
    -> the failures of every rank, each once: (input, reason)."""
    shared = shared_blocks(args, jobs, world)
    rest = world.shard([k for k in range(len(jobs)) if k not in shared])  # k on rank k mod N
    failed = []
    for n, k in enumerate([*shared, *rest]):
        src, dst = jobs[k][0], dsts[k]
        share = BlockShare(world, n % world.size, str(src)) if k in shared else None
        try:
            run_one(model, args, src, dst, shared.get(k), share)
            if share is None or share.writes:
                log.info("wrote %s", dst)
        except SharedSceneError as err:  # raised on every rank, reported by the writer
            if err.recorded:
                log.error("%s: %s", src, err)
                failed.append((str(src), str(err)))
        except (ImageReadError, FileExistsError, OSError, ValueError, RuntimeError) as err:
            log.error("%s: %s", src, err)
            failed.append((str(src), str(err)))
    return [f for part in world.all_gather(failed) for f in part]


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
    try:
        check_tile(args.tile or 0)
    except ValueError as err:
        raise UsageError(f"--tile: {err}") from None
    if args.samples < 1:
        raise UsageError(f"--samples {args.samples}: use 1 (no uncertainty map) or N >= 2")
    if args.temperature is not None:
        try:
            check_temperature(args.temperature)
        except ValueError as err:
            raise UsageError(f"--temperature {err}") from None
    if args.block is not None and args.block < 2 * OVERLAP:
        raise UsageError(f"--block {args.block}: use >= {2 * OVERLAP} LR pixels (2 x overlap)")
    if "/" in args.suffix or "\\" in args.suffix:
        raise UsageError(f"--suffix {args.suffix!r} must not contain a path separator")
    parse_bands(args.bands, UsageError)
    parse_value_range(args.value_range, UsageError)
    out_dir = Path(args.output)
    jobs = collect_inputs(args.inputs, UsageError)
    dsts = output_paths(jobs, out_dir, args.suffix, UsageError)
    if args.skip_existing:
        kept = [(job, dst) for job, dst in zip(jobs, dsts) if not dst.exists()]
        if len(kept) < len(jobs):
            log.info("--skip-existing: %d of %d outputs exist already", len(jobs) - len(kept),
                     len(jobs))  # fmt: skip
        jobs, dsts = [job for job, _ in kept], [dst for _, dst in kept]
        if not jobs:
            return 0
    check_writable_folder(out_dir, "--output", UsageError)
    # torchrun / srun: every rank has listed the jobs before the group forms (no output yet).
    world, device = init_world(args.device, UsageError)
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    with checkpoint_load_errors(args.checkpoint):
        model = load_sr_model(args.checkpoint, args.config, map_location=device)
    if args.temperature is not None:
        model.sampling_temperature = args.temperature
    args.tiling = dict(
        max_memory=args.max_memory, tile=args.tile,
        precision=precision, progress=not args.no_progress,
    )  # fmt: skip
    failed = super_resolve_all(model, args, jobs, dsts, world)
    code = 1 if failed else 0  # the same on every rank
    if not world.main:
        log.info("rank %d: done, exit code %d (rank 0 lists the failures)", world.rank, code)
        return code
    for src, err in failed:
        log.error("failed: %s (%s)", src, err)
    log.info("%d of %d images written to %s", len(jobs) - len(failed), len(jobs), out_dir)
    return code


if __name__ == "__main__":
    sys.exit(main())
