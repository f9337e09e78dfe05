"""One-command demo of LDCSR on the CPU: data, tiny stage 1 and stage 2, evaluation, a figure.

    python demo.py                                   # generated aerial scenes, ~9 min on 2 cores
    python demo.py --data my_images/                 # your images; a seeded 10% is held out
    python demo.py --stage1-minutes 2 --stage2-minutes 1 --out quick_demo
    python demo.py --long --out long_demo            # the longer setting, ~45 min on one core
    python demo.py --retrain                         # train again instead of reusing checkpoints

Trains configs/tiny/first_stage.yaml + demo_first_stage.yaml, then configs/tiny/second_stage.yaml
+ demo_second_stage.yaml (a 4x latent, placed centre-aligned; sampling at temperature 0.5) with
train.py for a time budget (and optionally a batch count) each, then evaluates the held-out images
at --scales with test.py's code: bicubic, the condition decoded alone (sr_kd: what a regression
gives), LDCSR's 4-step samples (at the largest scale with an uncertainty map of --samples samples)
and the stage-1 reconstruction from the HR's own latent (an upper bound: it sees the HR), each
with the energy of its spectrum above a quarter of the Nyquist frequency over the HR's. Writes to
--out: data/ (scenes, train list, held-out images), stage1/ and stage2/ (train.py run folders),
eval/ and eval_stage1/ (images, uncertainty maps, per-image CSVs), summary.md (that table),
summary.{csv,json} and comparison.png. A rerun in the same folder reuses the trained stages.
This is a tiny CPU demo of the pipeline, not the paper's models or numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from data.synthetic import write_scenes
from evaluation.demo import (
    hf_ratio,
    save_center_crops,
    split_folder,
    story_table,
    time_limit,
    write_comparison,
)
from evaluation.runner import evaluate, load_metrics
from evaluation.tables import write_summary
from models import load_first_stage_model, load_sr_model
from utils.cli import HelpFormatter, check_writable_folder
from utils.image_io import list_images
from utils.weights import weights_available, weights_path

ROOT = Path(__file__).resolve().parent
log = logging.getLogger("demo")
QUICK = {"stage1_minutes": 5.0, "stage2_minutes": 3.0}  # the default budgets
# The longer setting of docs/results.md: fixed batch counts (the same model on any machine),
# with wall-clock limits far above what they take (~25 + 13 minutes on one core).
LONG = {"stage1_steps": 2975, "stage2_steps": 1569, "stage1_minutes": 60.0, "stage2_minutes": 60.0}


class DemoError(RuntimeError):
    """A demo setting or output folder problem; the message says how to fix it."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--data", default=None, help="folder of your images (default: generated aerial scenes)")
    add("--out", default="demo_output", help="output folder (a rerun reuses its checkpoints)")
    add("--retrain", action="store_true", help="delete the demo's earlier results and retrain")
    add(
        "--stage1-minutes",
        type=float,
        default=None,
        help="stage-1 training budget, wall clock (default 5; 60 with --long)",
    )
    add(
        "--stage2-minutes",
        type=float,
        default=None,
        help="stage-2 training budget, wall clock (default 3; 60 with --long)",
    )
    add("--stage1-steps", type=int, default=None, help="also stop stage 1 after this many batches")
    add("--stage2-steps", type=int, default=None, help="also stop stage 2 after this many batches")
    long_help = "the longer setting: " + ", ".join(
        f"--{k.replace('_', '-')} {v:g}" for k, v in LONG.items()
    )
    add("--long", action="store_true", help=long_help + " (flags given as well win)")
    add("--num-train", type=int, default=48, help="generated training scenes")
    add("--scene-size", type=int, default=256, help="side of the generated training scenes (px)")
    add("--num-eval", type=int, default=8, help="generated held-out scenes")
    add("--eval-size", type=int, default=192, help="held-out image side (user images: centre crop)")
    add("--eval-fraction", type=float, default=0.1, help="share of --data images held out")
    add("--scales", type=float, nargs="+", default=[2.0, 3.5, 4.0], help="evaluation scales")
    add("--metrics", default="psnr,ssim,lpips", help="metrics; LPIPS/FID only if weights cached")
    add(
        "--samples",
        type=int,
        default=4,
        help="samples of the uncertainty map at the largest scale (< 2: no map)",
    )
    add("--threads", type=int, default=0, help="CPU threads (0: the idle cores)")
    add("--seed", type=int, default=23, help="seed of the scenes, the split and the training")
    return parser


def pick_threads(requested: int) -> int:
    """`requested`, or the cores that other processes leave idle (at least one): busy-waiting
    OpenMP threads on cores another job is using run several times slower than fewer threads.
    The current use is sampled over half a second (an install that just finished does not count,
    as it would in the 1-minute load average)."""
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    return max(1, cores - round(busy_cores()))


def busy_cores(seconds: float = 0.5) -> float:
    """Cores in use by other processes now, from two reads of /proc/stat (Linux), else from the
    1-minute load average, else 0."""

    def read() -> list[int]:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]

    try:
        before = read()
        time.sleep(seconds)
        after = read()
    except (OSError, ValueError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    delta = [b - a for a, b in zip(before, after)]
    idle = delta[3] + (delta[4] if len(delta) > 4 else 0)  # idle + iowait
    return (os.cpu_count() or 1) * (1 - idle / max(1, sum(delta)))


def prepare_out(out: Path, settings: dict, retrain: bool) -> None:
    """Create `out`, or check that it holds a demo made with the same data `settings`."""
    record = out / "demo.json"
    if out.exists() and any(out.iterdir()) and not record.is_file():
        raise DemoError(f"{out} is not empty and holds no demo.json; choose another --out")
    if record.is_file() and retrain:
        log.info("--retrain: deleting the earlier demo results in %s", out)
        for name in ("data", "stage1", "stage2", "eval"):
            shutil.rmtree(out / name, ignore_errors=True)
    elif record.is_file() and json.loads(record.read_text()) != settings:
        raise DemoError(
            f"{out} holds a demo made with other data settings ({record}); pass --retrain to "
            "replace it or choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings, indent=2) + "\n")


def prepare_data(args: argparse.Namespace, data_dir: Path) -> tuple[list[str], Path]:
    """-> (train.py data overrides, folder of held-out HR images)."""
    if args.data is None:
        train_dir, eval_dir = data_dir / "scenes_train", data_dir / "scenes_heldout"
        for folder, num, size, seed in (
            (train_dir, args.num_train, args.scene_size, args.seed),
            (eval_dir, args.num_eval, args.eval_size, args.seed + 1),  # unseen scenes
        ):
            if len(list_images(folder) if folder.is_dir() else []) != num:
                write_scenes(folder, num, size, seed, overwrite=True)
        num_train, overrides = args.num_train, [f"data.params.data_root={train_dir}"]
    else:
        source = Path(args.data).resolve()
        if not source.is_dir():
            raise DemoError(f"--data {args.data} is not a folder of images")
        train, held_out = split_folder(source, args.eval_fraction, args.seed)
        eval_dir = data_dir / f"{source.name}_heldout"
        if len(list_images(eval_dir) if eval_dir.is_dir() else []) != len(held_out):
            save_center_crops(source, held_out, args.eval_size, eval_dir)
        (data_dir / "train.txt").write_text("\n".join(train) + "\n")
        num_train = len(train)
        overrides = [
            f"data.params.data_root={source}",
            f"data.params.train.params.split_file={data_dir / 'train.txt'}",
        ]
    log.info("training images: %d; held-out images: %s", num_train, eval_dir)
    repeat = max(1, round(800 / num_train))  # epochs (checkpoints) of about 100 batches
    return overrides + [f"data.params.train.params.repeat={repeat}"], eval_dir


def train_stage(stage: int, run: Path, overrides: list[str], args, threads: int):
    """Run train.py for one stage into `run` unless a finished run is there.

    Returns:
        (last.ckpt, whether it was trained now).
    """
    ckpt, done = run / "checkpoints" / "last.ckpt", run / "done.json"
    if done.is_file() and ckpt.is_file():
        log.info("stage %d: reusing %s %s(--retrain trains again)", stage, ckpt, done.read_text())
        return ckpt, False
    if run.exists():
        log.info("stage %d: %s holds an unfinished run; training it again", stage, run)
        shutil.rmtree(run)
    name = "first_stage" if stage == 1 else "second_stage"
    minutes, steps = getattr(args, f"stage{stage}_minutes"), getattr(args, f"stage{stage}_steps")
    overrides = overrides + [f"lightning.trainer.max_time={time_limit(minutes)}"]
    if steps is not None:  # stage 1 makes two optimiser steps (autoencoder, discriminator) a batch
        overrides.append(f"lightning.trainer.max_steps={steps * (2 if stage == 1 else 1)}")
    configs = [str(ROOT / "configs" / "tiny" / f"{p}{name}.yaml") for p in ("", "demo_")]
    log.info("stage %d: training for at most %g min on %d thread(s)", stage, minutes, threads)
    # A subprocess: the entry points are not imported (layering), and the thread count must be
    # set before torch starts.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, str(ROOT / "train.py"), "--config", *configs]
    command += ["--run-dir", str(run), "--seed", str(args.seed), *overrides]
    if subprocess.run(command, env=env, cwd=ROOT).returncode != 0 or not ckpt.is_file():
        raise DemoError(f"stage-{stage} training failed (see the messages above); run folder {run}")
    done.write_text(json.dumps({"minutes": minutes, "max_batches": steps}) + "\n")
    return ckpt, True


def evaluate_demo(stage1: Path, ckpt: Path, eval_dir: Path, out: Path, args, threads: int):
    """Evaluate bicubic, the stage-2 checkpoint (LDCSR, and its condition decoded alone: sr_kd;
    at the largest scale with `--samples` uncertainty maps) and the stage-1 reconstruction from
    the HR's latent (an upper bound) on `eval_dir` -> summary rows with `hf_ratio`."""
    torch.set_num_threads(threads)
    needs = {"lpips": "alexnet", "fid": "inception"}  # no downloads in a demo
    names = [n.strip().lower() for n in args.metrics.split(",") if n.strip()]
    for name in [n for n in names if n in needs and not weights_available(needs[n])]:
        path = weights_path(needs[name])
        log.warning("%s skipped: %s is not cached (demo.py downloads nothing)", name.upper(), path)
        names.remove(name)
    if (out / "eval").exists():
        log.info("re-evaluating: replacing the results in %s", out / "eval")
    metrics, top = load_metrics(names), max(args.scales)
    options = dict(metrics=metrics, seed=args.seed, batch_size=4, overwrite=True)
    model, rows = load_sr_model(ckpt), []
    for scales, samples in (([s for s in args.scales if s != top], 1), ([top], args.samples)):
        if scales:
            rows += evaluate(model, eval_dir, scales, out / "eval", sr_kd=True, samples=samples,
                             **options)  # fmt: skip
    first = load_first_stage_model(stage1)
    rows += evaluate(first, eval_dir, args.scales, out / "eval_stage1", bicubic=False, **options)
    folders = {"LDCSR": "sr", "LDCSR (sr_kd)": "sr_kd", "Bicubic": "bicubic"}
    for row in rows:
        scale_dir = f"{row['dataset']}/x{row['scale']:g}"
        if row["method"] == "LDCSR stage 1":  # beside the others, for the figure
            src = out / "eval_stage1" / scale_dir / "reconstruction"
            shutil.copytree(src, out / "eval" / scale_dir / "reconstruction", dirs_exist_ok=True)
        folder = folders.get(row["method"], "reconstruction")
        row["hf_ratio"] = hf_ratio(eval_dir, out / "eval" / scale_dir, folder)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the budgets of the quick (default) or `--long` setting filled in
    where no flag gave them."""
    args = build_parser().parse_args(argv)
    for key, value in (LONG if args.long else QUICK).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out).resolve()
    if args.data is not None and not Path(args.data).is_dir():  # before anything is written
        raise DemoError(f"--data {args.data} is not a folder of images")
    check_writable_folder(out, "--out", DemoError)
    keys = ("num_train", "scene_size", "num_eval", "eval_size", "eval_fraction", "seed")
    settings = {"data": str(Path(args.data).resolve()) if args.data else "generated scenes"}
    prepare_out(out, {**settings, **{k: getattr(args, k) for k in keys}}, args.retrain)
    threads = pick_threads(args.threads)
    overrides, eval_dir = prepare_data(args, out / "data")
    first, fresh = train_stage(1, out / "stage1", overrides, args, threads)
    if fresh:  # a stage 2 trained on an earlier stage 1 no longer fits
        shutil.rmtree(out / "stage2", ignore_errors=True)
    stage2 = overrides + [f"model.params.first_stage_config.params.ckpt_path={first}"]
    second, _ = train_stage(2, out / "stage2", stage2, args, threads)
    rows = evaluate_demo(first, second, eval_dir, out, args, threads)
    write_summary(rows, out, {**settings, "stage1": str(first), "stage2": str(second)})
    table = story_table(rows)
    (out / "summary.md").write_text(table)
    dataset, scale = rows[0]["dataset"], max(args.scales)
    figure = write_comparison(
        eval_dir, out / "eval" / dataset / f"x{scale:g}", scale, out / "comparison.png"
    )
    print(f"\nTiny CPU demo (not the paper's numbers), held-out images of {dataset}:\n\n{table}")
    print(f"Figure: {figure}\nTable: {out / 'summary.md'}")
    return out


if __name__ == "__main__":
    try:
        main()
    except (DemoError, FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
