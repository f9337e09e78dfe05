"""Peak memory of streamed GeoTIFF super-resolution against the scene size (not a test).

Writes 4-band uint16 GeoTIFFs of each --sizes LR size, then super-resolves each at --scale in a
fresh process (scenes.scene_io.super_resolve_raster) and prints its peak RSS (ru_maxrss) and wall
time as a markdown table. --model bicubic is a bicubic `sr_fn`; --model tiny is
configs/tiny/second_stage.yaml with random weights through `LDCSR.super_resolve`.

    python -m benchmarks.raster_memory --sizes 1000 2000 --model bicubic
    python -m benchmarks.raster_memory --sizes 1000 2000 --model tiny --threads 1
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.transform import from_origin
from rasterio.windows import Window

from scenes.scene_io import super_resolve_raster
from utils.cli import HelpFormatter
from utils.resample import resize_crop

ROOT = Path(__file__).resolve().parents[1]


def write_scene(path: Path, size: int) -> None:
    """A size x size 4-band uint16 GeoTIFF (12-bit values, 10 m pixels), written in strips."""
    profile = dict(driver="GTiff", width=size, height=size, count=4, dtype="uint16",
                   crs="EPSG:32633", transform=from_origin(500000, 4200000, 10, 10), nodata=0,
                   tiled=True, blockxsize=256, blockysize=256, compress="deflate")  # fmt: skip
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", **profile) as dst:
        for top in range(0, size, 256):
            rows = min(256, size - top)
            cols = np.linspace(0, 8 * np.pi, size)
            base = 2000 + 1500 * np.sin(cols)[None, None] * np.ones((4, rows, 1))
            noise = rng.integers(0, 300, (4, rows, size))
            dst.write((base + noise).astype(np.uint16), window=Window(0, top, size, rows))


def sr_function(model: str):
    if model == "bicubic":  # the block's window of the scene's bicubic output
        return lambda lr, w: resize_crop(lr, w.out_size, w.rows, w.cols, "bicubic", w.offset,
                                         w.lr_size)  # fmt: skip
    from omegaconf import OmegaConf

    from utils.config import instantiate_from_config

    torch.manual_seed(0)
    config = OmegaConf.load(ROOT / "configs" / "tiny" / "second_stage.yaml")
    net = instantiate_from_config(config.model).eval()

    def run(lr, window):
        with torch.inference_mode():
            return net.super_resolve(lr, window.out_size, window=window,
                                     generator=torch.Generator().manual_seed(0))  # fmt: skip

    return run


def child(args) -> None:
    """One scene in this process: prints {"rss_mib", "seconds"} as JSON."""
    if args.threads:
        torch.set_num_threads(args.threads)
    sr_fn = sr_function(args.model)
    with rasterio.open(args.child) as src:
        size = (round(src.height * args.scale), round(src.width * args.scale))
    start = time.perf_counter()
    super_resolve_raster(args.child, Path(args.output), sr_fn, size, cog=args.cog)
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"rss_mib": rss, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000], help="LR sizes")
    parser.add_argument("--scale", type=float, default=2.0, help="output / input size")
    parser.add_argument("--model", choices=("bicubic", "tiny"), default="bicubic", help="sr_fn")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--cog", action="store_true", help="write Cloud-Optimized GeoTIFFs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    print("| LR size | output | model | peak RSS (MiB) | time (s) |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            src, dst = Path(tmp) / f"lr{size}.tif", Path(tmp) / f"sr{size}.tif"
            write_scene(src, size)
            cmd = [sys.executable, "-m", "benchmarks.raster_memory", "--child", str(src),
                   "--output", str(dst),
                   "--scale", str(args.scale), "--model", args.model,
                   "--threads", str(args.threads)] + ["--cog"] * args.cog  # fmt: skip
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                               cwd=ROOT).stdout.splitlines()[-1])  # fmt: skip
            out = round(size * args.scale)
            print(f"| {size}x{size} | {out}x{out} | {args.model} | {result['rss_mib']:.0f} | "
                  f"{result['seconds']:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
