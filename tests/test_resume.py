"""Exact resume from wherever a run stops: mid-epoch at max_steps, at max_steps on an epoch's end,
and after SIGTERM mid-epoch, for both stages, without passing --seed again."""

from __future__ import annotations

import os
import signal

import pytest
from pytorch_lightning.callbacks import Callback

import train
from tests.test_reliability import _assert_same_training_state, _ckpt
from tests.test_training import _train, image_dir, stage1_run  # noqa: F401 - fixtures
from training.record import read_run_record

BATCHES = 4  # straight run: 2 epochs of 2 batches (data_length 8 of the 11 training images)
COMMON = (
    "data.params.data_length=8",
    "lightning.trainer.limit_val_batches=0",
    "lightning.trainer.enable_progress_bar=false",
)


def _stage_args(stage: int, image_dir, stage1_run) -> tuple[str, int, tuple[str, ...]]:  # noqa: F811
    """(config, optimiser steps per batch, overrides) of a tiny run of `stage`."""
    if stage == 1:  # manual optimisation: global_step counts 2 optimiser steps per batch
        return "configs/tiny/first_stage.yaml", 2, ("data.params.train.params.max_scale=3.0",)
    ckpt = f"model.params.first_stage_config.params.ckpt_path={stage1_run}/checkpoints/last.ckpt"
    return "configs/tiny/second_stage.yaml", 1, (ckpt, "data.params.train.params.hr_size=64")


class _SigtermAt(Callback):
    """Sends this process `sig` (SIGTERM; SIGINT is Ctrl-C) at the end of training batch number
    `batch` (1-based)."""

    def __init__(self, batch: int, steps_per_batch: int, sig: int = signal.SIGTERM):
        self.step, self.sig = batch * steps_per_batch, sig

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.sig)


@pytest.fixture(scope="module", params=[1, 2])
def stage(request, tmp_path_factory, image_dir, stage1_run):  # noqa: F811
    """(stage, its config/overrides, and the last.ckpt of an uninterrupted run)."""
    config, per_batch, args = _stage_args(request.param, image_dir, stage1_run)
    args = (*args, f"data.params.data_root={image_dir}", *COMMON)
    tmp = tmp_path_factory.mktemp(f"straight{request.param}")
    run = _train(tmp, config, *args, f"lightning.trainer.max_steps={BATCHES * per_batch}")
    return request.param, config, per_batch, args, _ckpt(run)


def _resume_and_compare(run, stage, straight: dict) -> None:
    number, _, per_batch, _, _ = stage
    train.main(["--resume", str(run), f"lightning.trainer.max_steps={BATCHES * per_batch}"])
    resumed = _ckpt(run)
    _assert_same_training_state(straight, resumed)
    assert resumed["epoch"] == straight["epoch"] and resumed["seed"] == 1
    record = read_run_record(run)
    assert record["seed"] == 1 and len(record["runs"]) == 2  # first start + this resume
    assert record["runs"][1]["resumed_from"].endswith(("last.ckpt", "interrupted.ckpt"))
    assert not (run / "checkpoints" / "interrupted.ckpt").exists()  # removed by a clean end
    if number == 1:
        assert resumed["batches_seen"] == straight["batches_seen"] == BATCHES
    else:
        assert resumed["state_dict"]["model_ema.num_updates"] == BATCHES


@pytest.mark.parametrize("stop_batch", [3, 2], ids=["mid_epoch", "epoch_end"])
def test_resume_after_max_steps_is_exact(tmp_path, stage, stop_batch):
    _, config, per_batch, args, straight = stage
    run = _train(tmp_path, config, *args, f"lightning.trainer.max_steps={stop_batch * per_batch}")
    stopped = _ckpt(run)
    assert stopped["global_step"] == stop_batch * per_batch
    loader = stopped["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (loader["epoch"], loader["batches"]) == ((1, 1) if stop_batch == 3 else (0, 2))
    _resume_and_compare(run, stage, straight)


def test_resume_after_sigterm_mid_epoch_is_exact(tmp_path, stage, monkeypatch):
    _, config, per_batch, args, straight = stage
    build = train.build_callbacks
    monkeypatch.setattr(
        train,
        "build_callbacks",
        lambda config, run_dir, **kw: [*build(config, run_dir, **kw), _SigtermAt(3, per_batch)],
    )
    with pytest.raises(SystemExit):
        _train(tmp_path, config, *args, f"lightning.trainer.max_steps={BATCHES * per_batch}")
    monkeypatch.undo()
    (run,) = (tmp_path / "logs").glob("*/*")
    assert _ckpt(run)["global_step"] == 3 * per_batch
    _resume_and_compare(run, stage, straight)


@pytest.mark.parametrize("interrupt", ["ctrl_c", "num_workers_2"])
def test_resume_after_ctrl_c_or_with_workers_is_exact(tmp_path, stage, monkeypatch, interrupt):
    """Stage 1: Ctrl-C (SIGINT) mid-epoch, or data loading in 2 worker processes (stopped and
    resumed at max_steps), resumes to the uninterrupted single-process run's exact state."""
    number, config, per_batch, args, straight = stage
    if number != 1:
        pytest.skip("stage 1 covers the data loading and interrupt path; stage 2 adds nothing")
    if interrupt == "ctrl_c":
        build = train.build_callbacks
        sigint = _SigtermAt(3, per_batch, signal.SIGINT)
        monkeypatch.setattr(
            train,
            "build_callbacks",
            lambda config, run_dir, **kw: [*build(config, run_dir, **kw), sigint],
        )
        with pytest.raises((SystemExit, KeyboardInterrupt)):
            _train(tmp_path, config, *args, f"lightning.trainer.max_steps={BATCHES * per_batch}")
        monkeypatch.undo()
        (run,) = (tmp_path / "logs").glob("*/*")
        assert (run / "checkpoints" / "interrupted.ckpt").exists()
    else:
        args = (*args, "data.params.num_workers=2")
        run = _train(tmp_path, config, *args, f"lightning.trainer.max_steps={3 * per_batch}")
    assert _ckpt(run)["global_step"] == 3 * per_batch
    _resume_and_compare(run, stage, straight)


def test_resume_rejects_a_different_seed(tmp_path, image_dir):  # noqa: F811
    from utils.config import ConfigError

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run / "configs").mkdir()
    (run / "configs" / "first_stage.yaml").write_text("model: {}\n")
    (run / "run.yaml").write_text("seed: 1\n")
    with pytest.raises(ConfigError, match="--seed 2 differs from the seed 1"):
        train.main(["--resume", str(run), "--seed", "2"])


def test_overrides_and_options_in_any_order():
    args = train.parse_args(["a=1", "--config", "c.yaml", "b=2", "--run-dir", "d", "c=3"])
    assert args.config == ["c.yaml"] and args.overrides == ["a=1", "b=2", "c=3"]
    assert args.run_dir == "d" and args.seed is None
