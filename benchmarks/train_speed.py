"""Training throughput of both stages: seconds per training batch and peak memory, plain and with
the options a GPU user reaches for, each against the plain run in the same process.

    python -m benchmarks.train_speed                                 # paper + tiny, both stages
    python -m benchmarks.train_speed --configs tiny --steps 4 --repeats 2
    python -m benchmarks.train_speed --configs paper --stages 1 --batch-size 1 --steps 1 \\
        --warmup 1 --repeats 1 --options plain                       # a CPU smoke run
    python -m benchmarks.train_speed --device cuda --repeats 3      # all options on a GPU

Each run builds the config's model from --seed (random weights), trains it with a Lightning
Trainer (as train.py: manual optimisation for stage 1, EMA for stage 2) on --warmup + --steps
fixed random batches at the config's batch size (or --batch-size) and crop at --scale: stage 1
LR lr_size x lr_size, HR int(lr_size s); stage 2 HR hr_size, LR int(hr_size / s). Stage 1 runs
with disc_start 0, so every batch has the GAN generator term and the discriminator step. Without
the VGG16 file LPIPS gets a random VGG trunk (same work, different loss values).

Seconds per batch: median time between consecutive batch starts after the warm-up batches
(forward, backward, every optimiser step, EMA, logging; CUDA synchronised), as wall time and as
the process's CPU time (all threads; on a CPU shared with other jobs the steadier of the two).
Peak memory: CUDA max allocated, or the process's peak RSS (VmHWM, reset per run). Loss: the
stage's training loss (train/aeloss, train/loss) after the last batch; every option starts from
the same seed (weights, batches, noise), so |loss - plain| / |plain| shows whether it changes
what is learned.

Options (--options; runs interleave: repeat r of every option, in an order rotated by r,
before repeat r + 1):
  plain          fp32, NCHW, eager, the configs' Adam/AdamW (the authors' training)
  bf16-mixed     Trainer(precision="bf16-mixed"): autocast to bfloat16, fp32 weights
  channels-last  model.to(memory_format=torch.channels_last)
  compile        trainer.fit(torch.compile(model)); compilation falls in the warm-up batches
  fused-adam     the same optimisers with fused=True
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import models.autoencoder
from benchmarks.speed import PeakMemory
from utils.cli import HelpFormatter
from utils.config import instantiate_from_config
from utils.weights import weights_available, weights_path

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    ("paper", 1): "configs/first_stage_kl_v6.yaml",
    ("paper", 2): "configs/second_stage_van_v4.yaml",
    ("tiny", 1): "configs/tiny/first_stage.yaml",
    ("tiny", 2): "configs/tiny/second_stage.yaml",
}
OPTIONS = ("plain", "bf16-mixed", "channels-last", "compile", "fused-adam")
LOSS_KEY = {1: "train/aeloss", 2: "train/loss"}
log = logging.getLogger("train_speed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--configs", nargs="+", default=["paper", "tiny"], choices=("paper", "tiny"), help="sets")
    add("--stages", nargs="+", type=int, default=[1, 2], choices=(1, 2), help="which stages")
    options_help = f"comma list of {', '.join(OPTIONS)}; default: all (CPU: all but compile)"
    add("--options", default=None, help=options_help)
    add("--batch-size", type=int, default=None, help="default: the config's (paper: 4 and 8)")
    add("--scale", type=float, default=4.0, help="SR factor of the training crops")
    add("--steps", type=int, default=5, help="timed batches per run")
    add("--warmup", type=int, default=2, help="untimed batches first (compile happens here)")
    add("--repeats", type=int, default=2, help="runs per option (median of their medians)")
    add("--device", default="cpu", choices=("cpu", "cuda"), help="where to train")
    add("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    add("--seed", type=int, default=0, help="weights, batches and noise of every run")
    return parser


class BatchClock(pl.Callback):
    """Wall and process CPU times between consecutive batch starts (the last one ends at the end
    of training)."""

    def __init__(self, device: torch.device):
        self.device, self.marks = device, []

    def _mark(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.marks.append((time.perf_counter(), time.process_time()))

    def on_train_batch_start(self, *args) -> None:
        self._mark()

    def on_train_end(self, *args) -> None:
        self._mark()

    def seconds(self, warmup: int, clock: int = 0) -> list[float]:
        """Per timed batch: wall seconds (`clock` 0) or CPU seconds of all threads (1)."""
        return [b[clock] - a[clock] for a, b in zip(self.marks, self.marks[1:])][warmup:]


def load_config(name: str, stage: int, folder: Path):
    """The config, stage 1 with disc_start 0 (the discriminator step and the generator's GAN
    term from the first batch), stage 2 with a random stage-1 checkpoint written to `folder`."""
    config = OmegaConf.load(ROOT / CONFIGS[(name, stage)])
    if stage == 1:
        config.model.params.lossconfig.params.disc_start = 0
    else:
        first_stage = instantiate_from_config(config.model).first_stage_model
        path = folder / f"{name}_first_stage.ckpt"
        torch.save({"state_dict": first_stage.state_dict()}, path)
        config.model.params.first_stage_config.params.ckpt_path = str(path)
    return config


def make_batches(config, stage: int, count: int, batch_size: int, scale: float, seed: int):
    """`count` random training batches {"lr", "hr", "scale", "file_name"} in [0, 1]."""
    train = config.data.params.train.params
    if stage == 1:
        lr_side = train.lr_size
        hr_side = int(lr_side * scale)
    else:
        hr_side = train.hr_size
        lr_side = int(hr_side / scale)
    gen, batches = torch.Generator().manual_seed(seed), []
    for _ in range(count):
        hr = torch.rand(batch_size, 3, hr_side, hr_side, generator=gen)
        lr = F.interpolate(hr, (lr_side, lr_side), mode="bicubic", antialias=True).clamp(0, 1)
        scales = torch.full((batch_size,), hr_side / lr_side)
        batches.append({"lr": lr, "hr": hr, "scale": scales, "file_name": ["x"] * batch_size})
    return batches


def fuse_optimisers(model: pl.LightningModule) -> None:
    """`configure_optimizers` returns the same optimisers (classes, groups) with fused=True."""
    configure = model.configure_optimizers

    def fused():
        out = configure()
        optimisers = out if isinstance(out, list | tuple) else [out]
        rebuilt = []
        for opt in optimisers:
            groups = [{**group, "fused": True, "foreach": None} for group in opt.param_groups]
            rebuilt.append(type(opt)(groups, fused=True))
        return rebuilt if isinstance(out, list | tuple) else rebuilt[0]

    model.configure_optimizers = fused


def train_once(config, stage: int, option: str, args, batches) -> dict:
    """One Trainer.fit with `option` -> seconds per batch, peak memory and the final loss."""
    pl.seed_everything(args.seed, verbose=False)
    model = instantiate_from_config(config.model)
    model.learning_rate = config.model.base_learning_rate * batches[0]["hr"].shape[0]
    if option == "channels-last":
        model = model.to(memory_format=torch.channels_last)
    if option == "fused-adam":
        fuse_optimisers(model)
    clock, device = BatchClock(torch.device(args.device)), torch.device(args.device)
    trainer = pl.Trainer(
        accelerator=args.device, devices=1, max_epochs=1, limit_train_batches=len(batches),
        precision="bf16-mixed" if option == "bf16-mixed" else "32-true", callbacks=[clock],
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    with PeakMemory(device) as memory:
        trainer.fit(torch.compile(model) if option == "compile" else model, loader)
    loss = trainer.callback_metrics.get(LOSS_KEY[stage])
    return {
        "seconds": statistics.median(clock.seconds(args.warmup)),
        "cpu_seconds": statistics.median(clock.seconds(args.warmup, clock=1)),
        "peak_mib": memory.peak / 2**20, "loss": None if loss is None else float(loss),
    }  # fmt: skip


def random_lpips_trunk_if_missing() -> None:
    """Stage 1's LPIPS with a random VGG16 trunk when the file is absent (no download)."""
    if weights_available("vgg16"):
        return
    import lpips

    log.warning("%s is missing: LPIPS uses a random VGG16 trunk", weights_path("vgg16"))
    # the builder AutoencoderKL hands its loss (utils.weights.build_lpips)
    models.autoencoder.build_lpips = lambda net: lpips.LPIPS(net=net, pnet_rand=True, verbose=False)


def bench(name: str, stage: int, options: list[str], args) -> list[dict]:
    """Interleaved repeats of every option on one config -> one result row per option."""
    with tempfile.TemporaryDirectory() as folder:
        config = load_config(name, stage, Path(folder))
        return _bench(config, name, stage, options, args)


def _bench(config, name: str, stage: int, options: list[str], args) -> list[dict]:
    batch_size = args.batch_size or config.data.params.batch_size
    count = args.warmup + args.steps
    batches = make_batches(config, stage, count, batch_size, args.scale, args.seed)
    runs = {option: [] for option in options}
    for repeat in range(args.repeats):  # rotated, so no option is always first or last
        for option in options[repeat % len(options) :] + options[: repeat % len(options)]:
            runs[option].append(train_once(config, stage, option, args, batches))
    plain = runs.get("plain")
    rows = []
    for option, results in runs.items():
        row = {"config": name, "stage": stage, "option": option, "batch": batch_size}
        row["hr"] = batches[0]["hr"].shape[-1]
        row["seconds"] = statistics.median(r["seconds"] for r in results)
        row["cpu_seconds"] = statistics.median(r["cpu_seconds"] for r in results)
        row["peak_mib"] = max(r["peak_mib"] for r in results)
        row["loss"] = results[0]["loss"]
        if plain:
            base = statistics.median(r["seconds"] for r in plain)
            row["speedup"] = base / row["seconds"]
            row["cpu_speedup"] = (
                statistics.median(r["cpu_seconds"] for r in plain) / (row["cpu_seconds"])
            )
            ref = plain[0]["loss"]
            same = row["loss"] is not None and ref
            row["loss_change"] = abs(row["loss"] - ref) / abs(ref) if same else None
        rows.append(row)
        log.info("%s", row)
    return rows


def markdown(rows: list[dict]) -> str:
    head = "| Config | Stage | Option | Batch | HR crop | s/batch | Speed-up | CPU s/batch | "
    lines = [head + "CPU speed-up | Peak MiB | Loss | rel. loss change |", "|" + "---|" * 12]
    for r in rows:
        speedup = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        cpu_speedup = f"{r['cpu_speedup']:.2f}x" if r.get("cpu_speedup") else "-"
        change = f"{r['loss_change']:.1e}" if r.get("loss_change") is not None else "-"
        loss = f"{r['loss']:.5f}" if r["loss"] is not None else "-"
        lines.append(
            f"| {r['config']} | {r['stage']} | {r['option']} | {r['batch']} | {r['hr']} | "
            f"{r['seconds']:.3f} | {speedup} | {r['cpu_seconds']:.3f} | {cpu_speedup} | "
            f"{r['peak_mib']:.0f} | {loss} | {change} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec).*")
    default = list(OPTIONS) if args.device == "cuda" else [o for o in OPTIONS if o != "compile"]
    options = [o.strip() for o in args.options.split(",") if o.strip()] if args.options else default
    if unknown := sorted(set(options) - set(OPTIONS)):
        raise SystemExit(f"unknown --options {unknown}; choose from {', '.join(OPTIONS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    random_lpips_trunk_if_missing()
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads")
    rows = [row for name in args.configs for stage in args.stages
            for row in bench(name, stage, options, args)]  # fmt: skip
    sys.stdout.write(markdown(rows))


if __name__ == "__main__":
    main()
