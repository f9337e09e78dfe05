"""No lost work: exact resume, non-finite losses skipped, atomic checkpoints, DDP on CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from models.guard import NonFiniteLossGuard
from tests.conftest import ROOT, SUBPROCESS_TIMEOUT, tiny_config
from tests.test_training import FAST, _train, image_dir, stage1_run  # noqa: F401 - fixtures
from training.checkpoints import AtomicCheckpointIO
from training.folders import resolve_resume
from utils.config import instantiate_from_config


def _ckpt(run):
    """The checkpoint `--resume <run>` continues from (last.ckpt, or a newer interrupted.ckpt)."""
    return torch.load(resolve_resume(run)[1], weights_only=False)


def _assert_same_training_state(a: dict, b: dict) -> None:
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for pid, state in opt_a["state"].items():
            for name, value in state.items():
                assert torch.equal(
                    torch.as_tensor(value), torch.as_tensor(opt_b["state"][pid][name])
                )
    assert a["global_step"] == b["global_step"]


def _resume(tmp_path, run, *overrides):
    import train

    train.main(["--resume", str(run), "--seed", "1", *overrides])


STAGE1 = ("data.params.train.params.max_scale=3.0", "lightning.trainer.limit_val_batches=0")


def _two_epochs_straight_and_resumed(tmp_path, config: str, *common: str) -> tuple[dict, dict]:
    """Checkpoints of 2 epochs straight, and of 1 epoch + `--resume` + 1 epoch."""
    common = (*common, "lightning.trainer.enable_progress_bar=false")
    straight = _train(tmp_path / "a", config, *common, "lightning.trainer.max_epochs=2")
    half = _train(tmp_path / "b", config, *common, "lightning.trainer.max_epochs=1")
    _resume(tmp_path, half, "lightning.trainer.max_epochs=2")
    return _ckpt(straight), _ckpt(half)


def test_stage1_resume_is_exact(tmp_path, image_dir):  # noqa: F811
    a, b = _two_epochs_straight_and_resumed(
        tmp_path, "configs/tiny/first_stage.yaml", f"data.params.data_root={image_dir}", *STAGE1
    )
    assert a["batches_seen"] == b["batches_seen"] == 4
    _assert_same_training_state(a, b)


def test_stage2_resume_is_exact(tmp_path, stage1_run, image_dir):  # noqa: F811
    a, b = _two_epochs_straight_and_resumed(
        tmp_path,
        "configs/tiny/second_stage.yaml",
        f"model.params.first_stage_config.params.ckpt_path={stage1_run}/checkpoints/last.ckpt",
        f"data.params.data_root={image_dir}",
        "data.params.train.params.hr_size=64",
        "lightning.trainer.limit_val_batches=0",
    )
    assert a["state_dict"]["model_ema.num_updates"] == 4
    _assert_same_training_state(a, b)


class _NaNOnce:
    """Wraps LDCSR.training_losses to return NaN losses for the first `n` calls."""

    def __init__(self, fn, n):
        self.fn, self.n = fn, n

    def __call__(self, batch):
        losses = self.fn(batch)
        if self.n > 0:
            self.n -= 1
            losses = {k: v * float("nan") for k, v in losses.items()}
        return losses


def _tiny_stage2():
    torch.manual_seed(0)
    return instantiate_from_config(tiny_config(2, "model.params.max_skipped_batches=2").model)


def test_nan_loss_leaves_weights_and_ema_untouched():
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    model = _tiny_stage2()
    model.training_losses = _NaNOnce(model.training_losses, 1)
    model.scale_by_std = False
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = {
        "hr": torch.rand(2, 3, 32, 32),
        "lr": torch.rand(2, 3, 16, 16),
        "scale": torch.tensor([2.0, 2.0]),
    }
    loader = DataLoader([batch], batch_size=None)
    model.on_fit_start = lambda: None  # no stage-1 checkpoint needed here
    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
    )
    trainer.fit(model, train_dataloaders=loader)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a NaN batch changed the weights"
    assert model.guard.total == 1 and trainer.callback_metrics["train/skipped_batches"] == 1


def test_nan_losses_in_a_row_stop_with_a_clear_message():
    guard = NonFiniteLossGuard(max_in_a_row=2)

    class Module:
        def log(self, *args, **kwargs):
            pass

    assert guard.ok(Module(), None, torch.tensor(1.0))
    assert not guard.ok(Module(), None, torch.tensor(float("inf")))
    with pytest.raises(FloatingPointError, match="non-finite losses in a row"):
        guard.ok(Module(), None, torch.tensor(float("nan")))


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    def broken_save(obj, f):
        f.write(b"partial")  # the process dies halfway through writing
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


DDP_SCRIPT = r"""
import sys, torch, train
from pytorch_lightning.callbacks import Callback
import training.trainer

class Dump(Callback):
    def on_train_end(self, trainer, pl_module):
        torch.save({k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
                   f"{sys.argv[1]}/rank{trainer.global_rank}.pt")

build = training.trainer.build_callbacks
train.build_callbacks = lambda config, run_dir, **kw: [*build(config, run_dir, **kw), Dump()]
train.main(sys.argv[2:])
"""


@pytest.mark.parametrize("stage", [1, 2])
def test_ddp_two_processes_on_cpu(tmp_path, stage, stage1_run, image_dir):  # noqa: F811
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    args = [
        f"data.params.data_root={image_dir}",
        "lightning.trainer.accelerator=cpu",
        "lightning.trainer.devices=2",
        "lightning.trainer.strategy=ddp",
        "lightning.trainer.max_epochs=1",
        "lightning.trainer.limit_val_batches=1",
        "lightning.trainer.enable_progress_bar=false",
    ]
    if stage == 1:
        args = [
            "--config",
            "configs/tiny/first_stage.yaml",
            "data.params.train.params.max_scale=3.0",
            *args,
        ]
    else:
        args = [
            "--config",
            "configs/tiny/second_stage.yaml",
            f"model.params.first_stage_config.params.ckpt_path={stage1_run}/checkpoints/last.ckpt",
            "data.params.train.params.hr_size=64",
            *args,
        ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), *args, "--logdir", str(tmp_path / "logs")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key, value in rank0.items():
        if "running_" in key or "num_batches_tracked" in key:
            # The discriminator's BatchNorm statistics are per-rank batch statistics (used only
            # by the validation-time GAN loss); lightning.trainer.sync_batchnorm=true syncs them.
            continue
        assert torch.equal(value, rank1[key]), f"ranks disagree on {key}"
    (run,) = (tmp_path / "logs").glob("*/*")
    assert [p.name for p in (run / "checkpoints").iterdir()].count("last.ckpt") == 1
    assert len(list((run / "configs").glob("*.yaml"))) == 1


def test_sigterm_saves_a_resumable_checkpoint(tmp_path, image_dir):  # noqa: F811
    """SIGTERM mid-run (e.g. a SLURM time limit) leaves a checkpoint that --resume continues."""
    import signal
    import time

    logdir = tmp_path / "logs"
    args = [
        sys.executable, "train.py", "--config", "configs/tiny/first_stage.yaml",
        f"data.params.data_root={image_dir}", "data.params.train.params.max_scale=3.0",
        "data.params.train.params.repeat=50", "lightning.trainer.limit_val_batches=0",
        "lightning.trainer.enable_progress_bar=false", "--logdir", str(logdir),
    ]  # fmt: skip
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = None
    deadline = time.time() + SUBPROCESS_TIMEOUT
    while time.time() < deadline and proc.poll() is None:  # wait until a few batches have run
        found = list(logdir.glob("*/*/csv/metrics.csv"))
        if found and found[0].stat().st_size > 0 or list(logdir.glob("*/*/tensorboard/*")):
            metrics = True
            time.sleep(3)
            break
        time.sleep(0.5)
    assert metrics and proc.poll() is None, "training did not start"
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=SUBPROCESS_TIMEOUT)[0].decode()
    (run,) = logdir.glob("*/*")
    # Lightning's OnExceptionCheckpoint file, which --resume <run> picks (newer than last.ckpt)
    ckpt = torch.load(run / "checkpoints" / "interrupted.ckpt", weights_only=True)
    assert ckpt["global_step"] > 0, output[-2000:]
    assert resolve_resume(run)[1].name == "interrupted.ckpt"
    assert f"--resume {run}" in output
