"""Speed and memory of LDCSR super-resolution: the public API vs the plain module forward.

    python -m benchmarks.speed                         # CPU, x2 x4 x8 to 600x600, paper config
    python -m benchmarks.speed --scales 4 --repeats 3 --threads 1
    python -m benchmarks.speed --device cuda --repeats 5 --precision bf16

One LR image per scale (random content; the paper config with random weights, the UNet's
zero-initialised convs included (`randomize_zero_init`), which does not change the work done),
LR = int(600 / s), output 600x600, seed 0, run on the same machine in one process:

  reference+extras  the authors' SR path: the modules' plain forward (fp32, NCHW, their
                    autograd-mode branches, with frozen weights so no graph is built; untiled)
                    plus the authors' test-time extras: the HR encoding and two more decodes (the
                    reconstruction and the condition, "sr_kd");
  reference         that plain forward alone;
  ours              the public API `LDCSR.super_resolve` (the modules' inference-mode branches:
                    inference_mode, in-place activations, a channels-last decoder whose 1x1
                    convolutions (the upsampler's fusion MLP included) go straight to oneDNN,
                    the 8x level folded at x2 and x4, freed memory kept in the heap (glibc);
                    untiled at this size under the default memory budget).

Printed: seconds per image (median of --repeats; the methods alternate within each repeat, after
a warm-up on a 4x smaller image), peak memory during the call (CUDA: max allocated; CPU: the
kernel's peak-RSS mark, reset before the call, and its rise over the RSS before it), speed-ups,
max |ours - reference| on the [0, 1] output, model FLOPs (`torch.utils.flop_counter.FlopCounterMode`
on meta tensors) and the achieved fraction of this machine's fp32 matrix-multiply rate (a 4096^3
`torch.mm`, timed in every repeat, median). The load average is printed too: the numbers are
only comparable on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.random_weights import randomize_zero_init
from utils.cli import HelpFormatter
from utils.config import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmark")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--config", default=str(ROOT / "configs" / "second_stage_van_v4.yaml"), help="model YAML")
    add("--scales", type=float, nargs="+", default=[2.0, 4.0, 8.0], help="SR factors")
    add("--size", type=int, default=600, help="output side in pixels")
    add("--repeats", type=int, default=1, help="timed runs per method and scale (median)")
    add("--device", default="cpu", choices=("cpu", "cuda"), help="where to run")
    add("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    add("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="ours only")
    add("--methods", nargs="+", default=["ours", "reference", "reference+extras"], help="subset")
    return parser


class PeakMemory:
    """Peak memory during a block: CUDA max allocated, or the process's peak RSS.

    On Linux the kernel's high-water mark (VmHWM) is reset on entry (`/proc/self/clear_refs`)
    and read on exit; where that is not possible the RSS is sampled every 1 ms by a thread (which
    costs the timed code a little).
    """

    def __init__(self, device: torch.device):
        self.device, self.peak, self.base = device, 0, 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @staticmethod
    def reset_high_water_mark() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def high_water_mark() -> int:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        self.base = self.peak = self.rss()
        self._thread = None
        if not self.reset_high_water_mark():
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is None:
            self.peak = max(self.peak, self.high_water_mark())
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())


def reference_sr(model, lr, hr, out_size, generator, extras: bool = False) -> torch.Tensor:
    """The authors' SR path: the modules' plain forward (autograd-mode branches; the weights are
    frozen, so no graph is built), untiled. With `extras`, their test step's HR encoding and
    decodes of the reconstruction and of the condition (`sr_kd`). Returns the SR in [0, 1]."""
    with torch.enable_grad(), model.ema_scope():
        lr_m, hr_m = lr * 2 - 1, hr * 2 - 1
        cond = model.encode_condition(lr_m, out_size)
        z0 = model.sample_latent(lr_m, out_size, generator=generator, cond=cond)
        sr = model.decode_latent(z0, lr_m, out_size)
        if extras:
            posterior = model.first_stage_model.encode(hr_m, lr_m)
            model.first_stage_model.decode(posterior.sample(), lr_m, out_size)  # reconstruction
            model.decode_latent(cond, lr_m, out_size)  # sr_kd
    return (sr + 1) / 2


def methods(reference_model, our_model, precision: str) -> dict:
    reference_model.requires_grad_(False)
    return {
        "ours": lambda lr, hr, size, g: our_model.super_resolve(
            lr, size, generator=g, precision=precision
        ),
        "reference": lambda lr, hr, size, g: reference_sr(reference_model, lr, hr, size, g),
        "reference+extras": lambda lr, hr, size, g: reference_sr(
            reference_model, lr, hr, size, g, extras=True
        ),
    }


def count_flops(model, names, lr_size, size) -> dict[str, float]:
    """FLOPs of each method on meta tensors (no compute)."""
    meta = copy.deepcopy(model).to("meta")
    runs = methods(meta, copy.deepcopy(meta), "fp32")
    lr, hr = (
        torch.empty(1, 3, *lr_size, device="meta"),
        torch.empty(1, 3, size, size, device="meta"),
    )
    flops = {}
    for name in names:
        with FlopCounterMode(display=False) as counter:
            runs[name](lr, hr, (size, size), torch.Generator().manual_seed(0))
        flops[name] = counter.get_total_flops()
    return flops


def gemm_rate(device: torch.device, n: int = 4096) -> float:
    """fp32 torch.mm FLOP/s (best of 3)."""
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    torch.mm(a, b)
    best = float("inf")
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_methods(runs: dict, lr, hr, size, device, repeats: int) -> dict:
    """({name: (median seconds, (peak, base) bytes, output)}, median fp32 GEMM FLOP/s). The
    methods alternate within each repeat, which also times a GEMM (so a change of machine load
    hits all of them), after one warm-up each on a 4x smaller image (library initialisation;
    per-shape kernel set-up stays in the timing)."""
    small = torch.nn.functional.interpolate(lr, scale_factor=0.25)
    for run in runs.values():
        run(small, hr[..., ::4, ::4], (size // 4, size // 4), torch.Generator().manual_seed(0))
    times = {name: [] for name in runs}
    peaks, outs, rates = {name: (0, 0) for name in runs}, {}, []
    for _ in range(repeats):
        rates.append(gemm_rate(device))  # the machine's rate now (its load may change)
        for name, run in runs.items():
            with PeakMemory(device) as mem:
                start = time.perf_counter()
                outs[name] = run(lr, hr, (size, size), torch.Generator().manual_seed(0))
                sync(device)
                times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], (mem.peak, mem.base))
            log.info("%dx%d %s: %.2f s", *lr.shape[-2:], name, times[name][-1])
    results = {name: (statistics.median(times[name]), peaks[name], outs[name]) for name in runs}
    return results, statistics.median(rates)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.load(args.config).model).eval()
    randomize_zero_init(model)  # eps != 0, so the equality check covers the sampling chain
    ours_model = copy.deepcopy(model).to(device)
    model = model.to(device)
    runs = {
        k: v for k, v in methods(model, ours_model, args.precision).items() if k in args.methods
    }
    log.info(
        "device %s, threads %d, load %s, config %s", device, torch.get_num_threads(),
        os.getloadavg(), Path(args.config).name,
    )  # fmt: skip
    rows = []
    for scale in args.scales:
        lr_size = (int(args.size / scale),) * 2
        g = torch.Generator().manual_seed(1)
        lr = torch.rand(1, 3, *lr_size, generator=g).to(device)
        hr = torch.rand(1, 3, args.size, args.size, generator=g).to(device)
        flops = count_flops(model, list(runs), lr_size, args.size)
        results, rate = time_methods(runs, lr, hr, args.size, device, args.repeats)
        log.info("x%g fp32 GEMM %.1f GFLOP/s", scale, rate / 1e9)
        outs = {name: out for name, (_, _, out) in results.items()}
        for name, (seconds, (peak, base), _) in results.items():
            rows.append((scale, name, seconds, peak, base, flops[name], rate))
        if "ours" in outs and "reference" in outs:
            diff = (outs["ours"].float() - outs["reference"].float()).abs().max().item()
            log.info("x%g max |ours - reference| = %.2e", scale, diff)
    sys.stdout.write(table(rows, device) + "\n")
    log.info("load average at the end %s", os.getloadavg())


def table(rows, device: torch.device) -> str:
    memory = "max allocated" if device.type == "cuda" else "peak RSS (rise)"
    lines = [
        f"| scale | method | s/image | speed-up of ours | {memory} GB | GFLOP | GFLOP/s "
        "| % of fp32 GEMM rate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ours = {row[0]: row[2] for row in rows if row[1] == "ours"}
    for scale, name, seconds, peak, base, flops, rate in rows:
        speedup = f"{seconds / ours[scale]:.2f}x" if scale in ours else "-"
        mem = f"{peak / 2**30:.2f}" + (f" (+{(peak - base) / 2**30:.2f})" if base else "")
        lines.append(
            f"| x{scale:g} | {name} | {seconds:.2f} | {speedup} | {mem} | {flops / 1e9:.0f} "
            f"| {flops / seconds / 1e9:.1f} | {100 * flops / seconds / rate:.0f}% |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
