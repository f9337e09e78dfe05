"""Runs that behave like the field's tools, driven through the command lines: loggers and
callbacks from the config, the run record across a resume, no folder after a failed start,
stage-2 validation images, and test.py on a folder of good and broken images."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import train
from tests.conftest import ROOT, SUBPROCESS_TIMEOUT, tiny_config
from tests.test_training import image_dir  # noqa: F401 - fixture
from training.record import read_run_record
from utils.config import ConfigError, instantiate_from_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
STAGE1 = (
    "--config",
    "configs/tiny/first_stage.yaml",
    "data.params.train.params.max_scale=3.0",
    "lightning.trainer.limit_val_batches=0",
    "lightning.trainer.enable_progress_bar=false",
    "lightning.trainer.enable_model_summary=false",
)
EXTRA = """
lightning:
  logger:
    target: pytorch_lightning.loggers.CSVLogger
    params: {version: mine}
  callbacks:
    - target: pytorch_lightning.callbacks.LearningRateMonitor
      params: {logging_interval: step, log_momentum: true}
"""


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, name, *map(str, args)]
    return subprocess.run(
        cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT
    )


def test_config_loggers_callbacks_and_a_run_record_that_survives_resume(tmp_path, image_dir):  # noqa: F811
    extra = tmp_path / "csv_only.yaml"
    extra.write_text(EXTRA)
    logdir, data = tmp_path / "logs", f"data.params.data_root={image_dir}"
    args = (
        *STAGE1,
        extra,
        data,
        "lightning.trainer.max_steps=4",
        "lightning.trainer.log_every_n_steps=1",
    )
    proc = _script("train.py", *args, "--seed", "5", "--logdir", logdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = logdir.glob("*/*")
    assert not (run / "tensorboard").exists()  # lightning.logger replaced the default loggers
    with open(run / "mine" / "metrics.csv") as f:
        columns = next(csv.reader(f))
    assert any("momentum" in c for c in columns), columns  # the config's LearningRateMonitor
    record = read_run_record(run)
    first = record["runs"][0]
    assert record["seed"] == 5 and first["world_size"] == 1 and first["resumed_from"] is None
    assert "--seed 5" in first["command"] and first["torch"] == str(torch.__version__)
    assert {"git_commit", "git_dirty", "python", "lightning", "host"} <= first.keys()

    # A resume (no --seed) keeps the seed and appends an entry.
    proc = _script("train.py", "--resume", run, "lightning.trainer.max_steps=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    record = read_run_record(run)
    assert record["seed"] == 5 and len(record["runs"]) == 2
    assert record["runs"][1]["resumed_from"] == str(run / "checkpoints" / "last.ckpt")
    assert "lightning.trainer.max_steps=8" in record["runs"][1]["command"]


def test_a_failed_start_leaves_no_run_folder(tmp_path):
    logdir = tmp_path / "logs"
    proc = _script(
        "train.py", *STAGE1, f"data.params.data_root={tmp_path / 'nowhere'}", "--logdir", logdir
    )
    assert proc.returncode != 0 and "nowhere" in proc.stderr
    assert "removed its folder" in proc.stderr  # it got as far as making one
    assert not list(logdir.glob("*/*")), "a run folder was left behind"


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "lightning.trainer.max_stepz=1",
            "'lightning.trainer.max_stepz'; valid keys under lightning.trainer: .*'max_steps'",
        ),
        ("lightning.logger.target=pytorch_lightning.loggers.CSVLogger", None),
        ("lightning.trainer.callbacks=[]", "lightning.callbacks"),
        (
            "lightning.loggers.x=1",
            "valid keys under lightning: \\['callbacks', 'logger', 'trainer'\\]",
        ),
    ],
)
def test_lightning_keys_are_checked(tmp_path, override, message):
    argv = ["--config", "configs/tiny/first_stage.yaml", override, "--logdir", str(tmp_path)]
    if message is None:  # a known target with a misspelt parameter, caught when the run is built
        argv += ["lightning.logger.params.verzion=3", "data.params.data_root=nowhere"]
        message = "'lightning.logger.params.verzion'; valid keys under lightning.logger.params"
    with pytest.raises(ConfigError, match=message):
        train.main(argv)
    assert not list(tmp_path.glob("*/*"))


def test_stage2_writes_validation_images(tmp_path, image_dir):  # noqa: F811
    torch.manual_seed(0)
    stage1 = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": instantiate_from_config(tiny_config(1).model).state_dict()}, stage1)
    train.main([
        "--config", "configs/tiny/second_stage.yaml", "--logdir", str(tmp_path / "logs"),
        f"model.params.first_stage_config.params.ckpt_path={stage1}",
        f"data.params.data_root={image_dir}", "data.params.train.params.hr_size=64",
        "lightning.trainer.max_steps=1", "lightning.trainer.limit_val_batches=1",
        "lightning.trainer.enable_progress_bar=false", "lightning.trainer.logger=false",
    ])  # fmt: skip
    (run,) = (tmp_path / "logs").glob("*/*")
    (grid,) = (run / "images").glob("val_*.png")  # the sanity check's validation batch
    width, height = Image.open(grid).size
    assert width > 2 * height > 0  # rows of LR-bicubic | SR | HR


def _mixed_folder(folder):
    """Good a.png, x.jpg, x.tif (same stem); a truncated JPEG, an empty file, a 4x4 image."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    image = lambda size: Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))  # noqa: E731
    for name in ("a.png", "x.jpg", "x.tif", "cut.jpg"):
        image(48).save(folder / name)
    data = (folder / "cut.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    (folder / "empty.png").write_bytes(b"")
    image(4).save(folder / "tiny.png")


def test_test_py_lists_broken_images_and_fails_at_the_end(tmp_path, tiny_sr_checkpoint):
    _mixed_folder(tmp_path / "mixed")
    out = tmp_path / "out"
    proc = _script(
        "test.py", "--checkpoint", tiny_sr_checkpoint, "--datasets", tmp_path / "mixed",
        "--scales", "2", "--metrics", "psnr", "--out-dir", out,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "3 image(s) failed" in proc.stderr
    with open(out / "mixed" / "x2" / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    ok = sorted((r["method"], r["file"]) for r in rows if r["status"] == "ok")
    good = ("a.png", "x_jpg.png", "x_tif.png")
    assert ok == sorted((m, n) for m in ("Bicubic", "LDCSR") for n in good)
    failed = {r["file"]: r["status"] for r in rows if r["status"] != "ok"}
    assert "truncated" in failed["cut.jpg"] and "empty" in failed["empty.png"]  # input names
    assert "too small" in failed["tiny.png"]
    assert sorted(p.name for p in (out / "mixed" / "x2" / "sr").iterdir()) == list(good)


_spec = importlib.util.spec_from_file_location("ldcsr_test_cli_runs", ROOT / "test.py")
cli = importlib.util.module_from_spec(_spec)  # `import test` could give the stdlib package
_spec.loader.exec_module(cli)


def _no_weights(*args, **kwargs):
    raise AssertionError("weights were loaded before the arguments were checked")


@pytest.mark.parametrize("problem", ["out_dir_is_a_file", "clashing_names", "missing_config"])
def test_test_py_checks_arguments_before_loading_weights(
    tmp_path, monkeypatch, tiny_sr_checkpoint, problem
):
    monkeypatch.setattr(cli, "load_metrics", _no_weights)
    monkeypatch.setattr(cli, "load_model", _no_weights)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32)).save(images / "x.jpg")
    out, extra, match = tmp_path / "out", [], None
    if problem == "out_dir_is_a_file":
        out.write_text("")
        match = "output folder .* is a file"
    elif problem == "clashing_names":
        Image.new("RGB", (32, 32)).save(images / "x.JPG")
        match = "in .*: 2 images would be written under the same name: x.JPG -> x_jpg.png"
    else:
        extra, match = (
            ["--config", str(tmp_path / "none.yaml")],
            "--config .*none.yaml is not a file",
        )
    argv = [
        "--checkpoint",
        str(tiny_sr_checkpoint),
        "--datasets",
        str(images),
        "--out-dir",
        str(out),
    ]
    with pytest.raises(cli.EvaluationError, match=match):
        cli.main([*argv, *extra])
    if problem == "clashing_names":
        assert not out.exists()
