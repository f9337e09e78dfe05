"""test.py and evaluation/runner.py end to end on tiny checkpoints and small holdout crops."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from data.transforms import resize_bicubic
from evaluation import runner
from evaluation.runner import EvaluationError, parse_scales, prepare_out_dir
from models import load_sr_model
from tests.conftest import ROOT, SUBPROCESS_TIMEOUT, tiny_config
from tests.evaluation_cases import SIZES, check_run_outputs, cli
from tests.evaluation_cases import png as _png
from tests.evaluation_cases import run_cli as _run
from tests.helpers import write_random_weights
from utils.config import ConfigError, instantiate_from_config
from utils.image_io import load_image, to_tensor01
from utils.metrics import fid_statistics, frechet_distance, quantize
from utils.weights import MissingWeightsError, build_inception


def test_end_to_end_writes_all_outputs_at_hr_size(e2e):
    out, _, rows = e2e
    check_run_outputs(out, "HOLD", SIZES, min_psnr=5)
    assert all(r["runtime_s_per_image"] > 0 and r["peak_memory_mib"] > 0 for r in rows)
    with (out / "summary.csv").open() as f:
        assert sum(r["method"] == "Bicubic" for r in csv.DictReader(f)) == 3
    table = (out / "summary.md").read_text()
    assert "| Method | Dataset | Scale | PSNR | SSIM | LPIPS | FID |" in table
    assert "| Bicubic | HOLD | 3.7 |" in table and "peak resident memory" in table


def test_same_seed_gives_identical_images(e2e):
    first, second, _ = e2e
    pngs = sorted(second.glob("HOLD/x*/sr*/*.png"))
    assert len(pngs) == 6
    for path in pngs:
        assert np.array_equal(_png(path), _png(first / path.relative_to(second)))


def test_authors_checkpoint_and_yaml(tmp_path, conformance, data_root):
    ckpt, yaml = tmp_path / "authors.ckpt", tmp_path / "authors.yaml"
    torch.save({"state_dict": conformance["state_dict"], "epoch": 1}, ckpt)
    OmegaConf.save(OmegaConf.create(conformance["config"]), yaml)
    out = tmp_path / "out"
    rows = _run(ckpt, data_root, out, "--config", str(yaml), "--scales", "4", "--metrics", "psnr")
    assert [r["method"] for r in rows] == ["LDCSR", "Bicubic"] and rows[0]["images"] == 1
    # The saved PNG is the model's output with batch 0's generator (seed 0 + 0).
    hr = load_image(data_root / "ONE" / "test" / "HR" / "c.png")
    lr = to_tensor01(resize_bicubic(hr, (8, 10)))[None]
    sr = load_sr_model(ckpt, yaml).super_resolve(lr, (32, 40), torch.Generator().manual_seed(0))
    expected = quantize(sr[0]).permute(1, 2, 0).numpy()
    assert np.array_equal(_png(out / "ONE" / "x4" / "sr" / "c.png"), expected)


def test_offline_default_metrics_skip_lpips_and_fid(
    offline, tiny_sr_checkpoint, data_root, tmp_path, caplog
):
    out = tmp_path / "out"
    rows = _run(tiny_sr_checkpoint, data_root, out, "--scales", "4", "--no-save-images")
    assert rows[0]["psnr"] is not None and rows[0]["lpips"] is None and rows[0]["fid"] is None
    assert "LPIPS skipped" in caplog.text and "alexnet-owt-7be5be79.pth" in caplog.text
    assert "FID skipped" in caplog.text and "pt_inception-2015-12-05-6726825d.pth" in caplog.text
    assert str(offline / "hub" / "checkpoints") in caplog.text
    assert not (out / "ONE" / "x4" / "sr").exists() and (out / "ONE/x4/per_image.csv").is_file()


def test_offline_explicit_metric_fails_before_sr(offline, tiny_sr_checkpoint, data_root, tmp_path):
    with pytest.raises(MissingWeightsError, match=r"alexnet-owt-7be5be79\.pth.*hub/checkpoints"):
        _run(tiny_sr_checkpoint, data_root, tmp_path / "out", "--metrics", "psnr,lpips")
    assert not (tmp_path / "out").exists()  # stopped before the output folder and any SR


def test_lpips_and_fid_with_placed_weights(offline, tiny_sr_checkpoint, data_root, tmp_path):
    write_random_weights(offline, ["alexnet", "inception"])
    args = ("--scales", "4", "--metrics", "psnr,lpips,fid", "--fid-dims", "64")
    rows = _run(tiny_sr_checkpoint, data_root, tmp_path / "out", *args, dataset="HOLD")
    assert all(r["lpips"] is not None and r["fid"] is not None for r in rows)
    assert not (tmp_path / "out" / "HOLD" / "x4" / "hr").exists()  # FID's HR copies are removed


def test_fid_fits_each_hr_folder_once(
    offline, tiny_sr_checkpoint, data_root, tmp_path, monkeypatch
):
    """All rows of a scale (LDCSR, sr_kd, Bicubic) reuse one HR fit, and get the folder FID."""
    write_random_weights(offline, ["inception"])
    out, fitted = tmp_path / "out", []

    def spy(folder, *args):
        fitted.append(Path(folder).relative_to(out).as_posix())
        return fid_statistics(folder, *args)

    monkeypatch.setattr(runner, "fid_statistics", spy)
    args = ("--scales", "2,4", "--metrics", "fid", "--fid-dims", "64", "--sr-kd", "--device", "cpu")
    rows = _run(tiny_sr_checkpoint, data_root, out, *args, dataset="HOLD")
    folders = ("hr", "sr", "sr_kd", "bicubic")
    assert sorted(fitted) == sorted(f"HOLD/x{s}/{f}" for s in (2, 4) for f in folders)
    names = {"LDCSR": "sr", "LDCSR (sr_kd)": "sr_kd", "Bicubic": "bicubic"}
    model = build_inception(64)
    # the HR copies are pixel-identical PNGs of the same names: fit the originals
    hr_fit = fid_statistics(data_root / "HOLD" / "test" / "HR", model, 1, "cpu", 64)
    for row in rows:
        sr_dir = out / "HOLD" / f"x{row['scale']:g}" / names[row["method"]]
        sr_fit = fid_statistics(sr_dir, model, 1, "cpu", 64)
        assert abs(row["fid"] - frechet_distance(sr_fit, hr_fit)) < 1e-6


@pytest.mark.parametrize(
    ("datatype", "size"), [("paired", (40, 32)), ("lr", (40, 32)), ("hr_input", (80, 64))]
)
def test_datatypes(datatype, size, tiny_sr_checkpoint, data_root, tmp_path):
    metrics = "psnr" if datatype == "paired" else "none"
    args = ("--scales", "2", "--datatype", datatype, "--metrics", metrics)
    rows = _run(tiny_sr_checkpoint, data_root, tmp_path / "out", *args)
    assert rows[0]["images"] == 1 and (rows[0]["psnr"] is not None) == (datatype == "paired")
    assert Image.open(tmp_path / "out" / "ONE" / "x2" / "sr" / "c.png").size == size


def test_first_stage_checkpoint(tmp_path, data_root):
    config = tiny_config(1, "model.params.lossconfig=null")
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    ckpt = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": model.state_dict(), "config": OmegaConf.to_container(config)}, ckpt)
    rows = _run(ckpt, data_root, tmp_path / "out", "--first-stage", "--metrics", "psnr,ssim")
    assert [r["method"] for r in rows] == ["LDCSR stage 1", "Bicubic"]
    assert rows[0]["psnr"] is not None and rows[0]["images"] == 1
    assert Image.open(tmp_path / "out/ONE/x4/reconstruction/c.png").size == (40, 32)
    with pytest.raises(ConfigError, match="not a stage-2"):  # the same file without --first-stage
        _run(ckpt, data_root, tmp_path / "out2")


def test_bad_inputs_give_clear_messages(tiny_sr_checkpoint, data_root, tmp_path, capsys):
    ckpt = ["--checkpoint", str(tiny_sr_checkpoint)]
    with pytest.raises(EvaluationError, match=r"unknown dataset 'NOPE'.*under .*: HOLD, ONE"):
        cli.main([*ckpt, "--datasets", "NOPE", "--data-root", str(data_root)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match="no images in"):
        cli.main([*ckpt, "--datasets", str(tmp_path / "empty"), "--out-dir", str(tmp_path / "o")])
    for bad in ("0", "-2", "abc", "4,nan"):
        with pytest.raises(SystemExit) as exit_info:
            _run(tiny_sr_checkpoint, data_root, tmp_path / "out", "--scales", bad)
        assert exit_info.value.code == 2 and "is not a number > 0" in capsys.readouterr().err
    with pytest.raises(EvaluationError, match="is not a number"):
        parse_scales(["2,x"])
    for bad, message in (
        (["--temperature", "2"], "--temperature must be in [0, 1]"),
        (["--temperature", "0.5", "--first-stage"], "stage-2 (LDCSR) setting"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            _run(tiny_sr_checkpoint, data_root, tmp_path / "out", *bad)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    bare = tmp_path / "bare.ckpt"  # no config inside, no <run>/configs beside it
    state = torch.load(tiny_sr_checkpoint, weights_only=False)["state_dict"]
    torch.save({"state_dict": state}, bare)
    with pytest.raises(ConfigError, match="no config"):
        _run(bare, data_root, tmp_path / "out_bare")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.txt").write_text("x")
    with pytest.raises(EvaluationError, match="not empty.*--overwrite"):
        prepare_out_dir(tmp_path / "full")


def test_too_small_image_is_recorded_and_the_rest_go_on(
    tiny_sr_checkpoint, data_root, tmp_path, caplog
):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.open(data_root / "ONE" / "test" / "HR" / "c.png").save(folder / "big.png")
    Image.new("RGB", (12, 10)).save(folder / "tiny.png")
    args = ["--datasets", str(folder), "--scales", "2", "--metrics", "psnr"]
    rows = cli.main(
        ["--checkpoint", str(tiny_sr_checkpoint), "--out-dir", str(tmp_path / "o"), *args]
    )
    assert rows[0]["images"] == 1 and rows[0]["failed"] == 1
    assert f"{folder / 'tiny.png'} (10x12) is too small for scale 2" in caplog.text
    with (tmp_path / "o" / "mixed" / "x2" / "per_image.csv").open() as f:
        status = {r["file"]: r["status"] for r in csv.DictReader(f)}
    assert status["tiny.png"].startswith("failed: ") and status["big.png"] == "ok"
    with pytest.raises(EvaluationError, match="not empty"):  # never replaced silently
        cli.main(["--checkpoint", str(tiny_sr_checkpoint), "--out-dir", str(tmp_path / "o"), *args])
    again = ["--checkpoint", str(tiny_sr_checkpoint), "--out-dir", str(tmp_path / "o"), "--test-y"]
    rows_y = cli.main([*again, "--overwrite", *args])
    assert rows_y[0]["images"] == 1 and rows_y[0]["psnr"] != rows[0]["psnr"]


def test_cli_exits_with_code_2_and_one_line(tmp_path):
    (tmp_path / "x.ckpt").write_bytes(b"")  # checked before the dataset: it must exist
    ckpt = str(tmp_path / "x.ckpt")
    cmd = [sys.executable, str(ROOT / "test.py"), "--checkpoint", ckpt, "--datasets", "NOPE"]
    proc = subprocess.run(
        [*cmd, "--data-root", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("test.py: error: unknown dataset 'NOPE'")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("first_stage", [False, True])
def test_tiled_runs_match_untiled_and_report_runtime_and_memory(
    first_stage, tiny_sr_checkpoint, data_root, tmp_path
):
    """--tile (bounded memory, any scene size) gives the untiled images up to uint8 rounding."""
    ckpt, extra = tiny_sr_checkpoint, ["--metrics", "psnr", "--scales", "4"]
    if first_stage:
        config = tiny_config(1, "model.params.lossconfig=null")
        torch.manual_seed(0)
        model = instantiate_from_config(config.model)
        ckpt = tmp_path / "stage1.ckpt"
        state = {"state_dict": model.state_dict(), "config": OmegaConf.to_container(config)}
        torch.save(state, ckpt)
        extra.append("--first-stage")
    _run(ckpt, data_root, tmp_path / "u", *extra, "--tile", "0")
    tiled = _run(ckpt, data_root, tmp_path / "t", *extra, "--tile", "16")
    folder = "reconstruction" if first_stage else "sr"
    a, b = (_png(tmp_path / run / "ONE/x4" / folder / "c.png").astype(int) for run in "ut")
    assert np.abs(a - b).max() <= 1
    assert tiled[0]["runtime_s_per_image"] > 0 and tiled[0]["peak_memory_mib"] > 0
    with pytest.raises(SystemExit):  # a tile below the minimum is refused before any work
        _run(ckpt, data_root, tmp_path / "bad", *extra, "--tile", "8")
