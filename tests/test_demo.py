"""demo.py end to end on a budget of a few batches: generated scenes and a user folder, the table
and figure, reuse of trained stages on a rerun, and its refusals."""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

import demo
from data.synthetic import write_scenes

# A few batches per stage, tiny images, one scale: the pipeline, not the learning (README).
FAST = [
    "--stage1-steps", "2", "--stage2-steps", "2", "--num-train", "4", "--scene-size", "96",
    "--num-eval", "2", "--eval-size", "48", "--scales", "2", "4", "--metrics", "psnr,ssim",
    "--threads", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    demo.main([*FAST, "--out", str(out)])
    return out


def test_demo_trains_evaluates_and_draws_the_figure(demo_run):
    rows = json.loads((demo_run / "summary.json").read_text())["rows"]
    found = {(r["method"], r["scale"]) for r in rows}
    methods = ("LDCSR", "LDCSR (sr_kd)", "Bicubic", "LDCSR stage 1")
    assert found == {(m, s) for m in methods for s in (2.0, 4.0)}
    assert all(r["images"] == 2 and r["psnr"] > 10 for r in rows)
    x4 = demo_run / "eval" / "scenes_heldout" / "x4"
    assert len(list((x4 / "uncertainty").glob("*_uncertainty.tif"))) == 2  # the largest scale
    assert not (demo_run / "eval" / "scenes_heldout" / "x2" / "uncertainty").exists()
    assert len(list((x4 / "reconstruction").glob("*.png"))) == 2
    for stage in ("stage1", "stage2"):
        assert (demo_run / stage / "checkpoints" / "last.ckpt").is_file()
    assert len(list((demo_run / "data" / "scenes_train").glob("*.png"))) == 4
    sr = sorted((demo_run / "eval" / "scenes_heldout" / "x4" / "sr").glob("*.png"))
    assert len(sr) == 2 and Image.open(sr[0]).size == (48, 48)
    figure = Image.open(demo_run / "comparison.png")
    assert figure.width >= 7 * 48 and figure.height >= 2 * 48  # 7 panels, 2 image blocks
    table = (demo_run / "summary.md").read_text()
    for label in ("Bicubic", "sr_kd (condition", "LDCSR (4 steps)", "stage-1 reconstruction"):
        assert table.count(f"| {label}") == 2, label  # one row per scale
    assert "(upper bound" in table
    hf = [float(line.split("|")[-2]) for line in table.splitlines() if line.startswith("| x4")]
    assert len(hf) == 4 and all(0 < v < 10 for v in hf)  # high-frequency energy over the HR's


def test_quick_and_long_settings_fill_the_budgets_that_no_flag_gives():
    quick = demo.parse_args([])
    assert (quick.stage1_minutes, quick.stage2_minutes) == (5.0, 3.0)
    assert quick.stage1_steps is None and quick.stage2_steps is None
    long = demo.parse_args(["--long", "--stage2-steps", "10"])
    assert (long.stage1_steps, long.stage2_steps) == (demo.LONG["stage1_steps"], 10)
    assert (long.stage1_minutes, long.stage2_minutes) == (60.0, 60.0)


def test_rerun_reuses_the_trained_stages(demo_run, caplog):
    ckpts = {s: demo_run / s / "checkpoints" / "last.ckpt" for s in ("stage1", "stage2")}
    before = {s: p.stat().st_mtime_ns for s, p in ckpts.items()}
    with caplog.at_level(logging.INFO, logger="demo"):
        demo.main([*FAST, "--out", str(demo_run)])
    assert {s: p.stat().st_mtime_ns for s, p in ckpts.items()} == before
    assert sum("reusing" in r.getMessage() for r in caplog.records) == 2


def test_other_data_settings_in_the_same_folder_are_refused(demo_run):
    with pytest.raises(demo.DemoError, match="--retrain"):
        demo.main([*FAST, "--out", str(demo_run), "--num-train", "5"])


def test_a_user_folder_is_split_and_cropped(tmp_path):
    images = tmp_path / "mine"
    write_scenes(images / "a", 3, 112, seed=5)
    write_scenes(images / "b", 2, 96, seed=6)
    out = tmp_path / "out"
    demo.main([*FAST, "--out", str(out), "--data", str(images), "--eval-fraction", "0.4"])
    held_out = sorted((out / "data" / "mine_heldout").glob("*.png"))
    train = (out / "data" / "train.txt").read_text().split()
    assert len(held_out) == 2 and len(train) == 3  # 40% of 5 held out, never trained on
    assert all(Image.open(p).size == (48, 48) for p in held_out)
    assert set(train) < {f"{d}/scene_{i:04d}.png" for d in "ab" for i in range(3)}
    assert (out / "comparison.png").is_file()


def test_bad_data_folder_and_foreign_output_folder_are_refused(tmp_path):
    with pytest.raises(demo.DemoError, match="not a folder"):
        demo.main([*FAST, "--out", str(tmp_path / "out"), "--data", str(tmp_path / "nowhere")])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(demo.DemoError, match="no demo.json"):
        demo.main([*FAST, "--out", str(foreign)])
    assert (foreign / "notes.txt").read_text() == "mine"  # nothing deleted


def test_threads_follow_the_idle_cores(monkeypatch):
    assert demo.pick_threads(3) == 3
    cores = demo.os.cpu_count() or 1
    monkeypatch.setattr(demo, "busy_cores", lambda: 0.2)
    assert demo.pick_threads(0) == cores
    monkeypatch.setattr(demo, "busy_cores", lambda: cores + 1.0)
    assert demo.pick_threads(0) == 1


def test_high_frequency_energy_ratio_of_blurred_and_sharpened_images():
    import torch
    import torch.nn.functional as F

    from evaluation.spectrum import hf_energy_ratio, radial_power

    hr = torch.rand(3, 64, 48, generator=torch.Generator().manual_seed(0))
    blurred = F.avg_pool2d(hr[None], 3, stride=1, padding=1, count_include_pad=False)[0]
    assert hf_energy_ratio(hr, hr) == pytest.approx(1.0)
    assert hf_energy_ratio(blurred, hr) < 0.5 < 1.5 < hf_energy_ratio(hr, blurred)
    assert hf_energy_ratio(hr + 0.3, hr) == pytest.approx(1.0)  # brightness is not detail
    power, radius = radial_power(hr)
    assert power.shape == radius.shape == (64, 25) and radius.max() == pytest.approx(0.5**0.5)
