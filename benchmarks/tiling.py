"""Tiled against untiled whole-scene super-resolution: time, peak memory, PSNR between the two.

    python -m benchmarks.tiling                                  # x4, 1200x1200 output, tile 128
    python -m benchmarks.tiling --sizes 1200 2000 --contents smooth noise --threads 2
    python -m benchmarks.tiling --sizes 4000 --methods tiled --max-memory 2 --tile auto
    python -m benchmarks.tiling --max-memory 0.07 --tile auto   # every stage streamed

The paper config with seeded random weights (seed 0, the UNet's zero-initialised convs given
N(0, 0.02) weights as in benchmarks.speed), one LR image of side size / scale per size and
content ("smooth": bicubic-upsampled random noise of 1/8 the side; "noise": uniform noise), the
same sampling seed for both methods, through the public API `LDCSR.super_resolve`:

  untiled  tile=0 (the plain inference-mode forward of each network);
  tiled    tile=--tile LR pixels ("auto": as large as the budget allows) under --max-memory
           (default auto: 3/4 of the available memory): the stages with scene-wide statistics
           run whole where they fit the budget and stream by bands (exact statistics) where
           not.

The two methods alternate within each repeat (the order flips every repeat), so that a loaded
machine slows both alike. Printed per size and content: wall and CPU seconds (median of
--repeats; CPU time, summed over threads, is less sensitive to other processes), the
process's peak RSS rise over the RSS before the call (the kernel's high-water mark, reset per
call), the memory budget the tiled run reported, and the PSNR of tiled against untiled on the
[0, 1] outputs. The load average is printed too.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from benchmarks.random_weights import randomize_zero_init
from benchmarks.speed import PeakMemory
from models.memory import memory_budget
from utils.cli import HelpFormatter, memory_size
from utils.config import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmark")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--config", default=str(ROOT / "configs" / "second_stage_van_v4.yaml"), help="model YAML")
    add("--sizes", type=int, nargs="+", default=[1200], help="output sides in pixels")
    add("--scale", type=int, default=4, help="SR factor (integer: LR side = size / scale)")
    add("--contents", nargs="+", default=["smooth"], choices=("smooth", "noise"), help="LR")
    add("--tile", type=render_tile, default=128, help="LR render tile of the tiled run, or auto")
    add("--max-memory", type=memory_size, default="auto", help="GB budget of the tiled run")
    add("--methods", nargs="+", default=["untiled", "tiled"], help="subset of untiled, tiled")
    add("--repeats", type=int, default=1, help="timed runs per method (median)")
    add("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    return parser


def render_tile(value: str) -> int | None:
    """`--tile` values: LR pixels, or "auto" (None: sized from the budget)."""
    return None if value == "auto" else int(value)


def make_lr(content: str, side: int) -> torch.Tensor:
    """[1, 3, side, side] in [0, 1], seed 0."""
    g = torch.Generator().manual_seed(0)
    if content == "noise":
        return torch.rand(1, 3, side, side, generator=g)
    coarse = torch.rand(1, 3, max(2, side // 8), max(2, side // 8), generator=g)
    return F.interpolate(coarse, size=(side, side), mode="bicubic").clamp_(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a - b).double().pow(2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1 / mse)).item()


def run_case(model, lr: torch.Tensor, size: int, args) -> dict:
    options = {"untiled": dict(tile=0), "tiled": dict(tile=args.tile, max_memory=args.max_memory)}
    times, cpu = {m: [] for m in args.methods}, {m: [] for m in args.methods}
    peaks, outs = {}, {}
    for r in range(args.repeats):
        for method in args.methods if r % 2 == 0 else args.methods[::-1]:
            with PeakMemory(lr.device) as mem:
                start, start_cpu = time.perf_counter(), time.process_time()
                g = torch.Generator().manual_seed(1)
                outs[method] = model.super_resolve(lr, (size, size), g, **options[method])
                times[method].append(time.perf_counter() - start)
                cpu[method].append(time.process_time() - start_cpu)
            peaks[method] = max(peaks.get(method, 0), mem.peak - mem.base)
    row = {m: (statistics.median(t), statistics.median(cpu[m]), peaks[m] / 2**30) for m, t in
           times.items()}  # fmt: skip
    if len(outs) == 2:
        row["psnr"] = psnr(outs["tiled"], outs["untiled"])
    return row


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.load(args.config).model).eval()
    randomize_zero_init(model)
    budget = memory_budget(args.max_memory, torch.device("cpu"))
    log.info(
        "threads %d, load average %s, tiled budget %s GB (--max-memory %s)",
        torch.get_num_threads(),
        " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "unbounded" if budget is None else f"{budget:.2f}",
        args.max_memory,
    )
    log.info("| output | content | method | wall s | CPU s | peak RSS rise GB | PSNR |")
    log.info("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for content in args.contents:
            row = run_case(model, make_lr(content, size // args.scale), size, args)
            for method in args.methods:
                sec, cpu, peak = row[method]
                quality = f"{row['psnr']:.1f} dB" if "psnr" in row and method == "tiled" else ""
                log.info(f"| {size}x{size} | {content} | {method} | {sec:.1f} | {cpu:.1f} | "
                         f"{peak:.2f} | {quality} |")  # fmt: skip
            if len(row) == 3:
                wall, cpu = (row["tiled"][k] / row["untiled"][k] for k in (0, 1))
                log.info(f"|  |  | tiled / untiled | {wall:.2f}x | {cpu:.2f}x |  |  |")
    log.info("load average after: %s", " ".join(f"{x:.1f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
