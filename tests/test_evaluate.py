"""test.py and evaluation/runner.py end to end on tiny checkpoints and small holdout crops."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from data.transforms import lr_size, resize_bicubic
from evaluation import runner
from evaluation.runner import EvaluationError, parse_scales, prepare_out_dir
from models import load_sr_model
from tests.conftest import ROOT, SUBPROCESS_TIMEOUT, shared_path, tiny_config
from tests.helpers import write_random_weights
from utils.config import ConfigError, instantiate_from_config
from utils.image_io import load_image, to_tensor01
from utils.metrics import fid_from_folders, fid_statistics, psnr, quantize, ssim
from utils.weights import MissingPackageError, MissingWeightsError, build_inception

_spec = importlib.util.spec_from_file_location("ldcsr_test_cli", ROOT / "test.py")
cli = importlib.util.module_from_spec(_spec)  # `import test` could give the stdlib package
_spec.loader.exec_module(cli)

# name -> (holdout file, crop box); crops are resized to SIZES = 40x40, 40x40, 32x40 (H x W)
CROPS = {
    "a.png": ("agricultural00.tif", (0, 0, 160, 160)),
    "b.png": ("airplane00.tif", (32, 32, 72, 72)),
    "c.png": ("P1888.png", (100, 100, 164, 151)),
}
SIZES = {"a.png": (40, 40), "b.png": (40, 40), "c.png": (40, 32)}  # Pillow (W, H)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """<root>/HOLD (a, b, c) and <root>/ONE (c) as data/prepare_split.py writes them."""
    holdout = shared_path("data", "holdout")
    root = tmp_path_factory.mktemp("dataset")
    for dataset, names in (("HOLD", ["a.png", "b.png", "c.png"]), ("ONE", ["c.png"])):
        hr_dir, lr_dir = root / dataset / "test" / "HR", root / dataset / "test" / "LR" / "X2"
        hr_dir.mkdir(parents=True)
        lr_dir.mkdir(parents=True)
        for name in names:
            source, box = CROPS[name]
            hr = load_image(holdout / source).crop(box).resize(SIZES[name], Image.BICUBIC)
            hr.save(hr_dir / name)
            resize_bicubic(hr, lr_size((hr.height, hr.width), 2)).save(lr_dir / name)
    return root


def _run(ckpt, data_root, out, *args, dataset="ONE"):
    argv = ["--checkpoint", str(ckpt), "--data-root", str(data_root), "--out-dir", str(out)]
    return cli.main([*argv, "--datasets", dataset, *args])


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def e2e(tiny_sr_checkpoint, data_root, tmp_path_factory):
    """A run at scales 2, 3.7 and 8 (batch 2, sr_kd on) and a second one with the same seed at
    3.7 alone (batch b of every scale draws with seed + b)."""
    first, second = (tmp_path_factory.mktemp("run") / "res" for _ in range(2))
    args = ("--metrics", "psnr,ssim", "--batch-size", "2", "--sr-kd")
    ckpt = tiny_sr_checkpoint
    rows = _run(ckpt, data_root, first, "--scales", "2,3.7", "8", *args, dataset="HOLD")
    _run(ckpt, data_root, second, "--scales", "3.7", *args, dataset="HOLD")
    return first, second, rows


def test_end_to_end_writes_all_outputs_at_hr_size(e2e):
    out, _, rows = e2e
    for scale in ("2", "3.7", "8"):
        folder = out / "HOLD" / f"x{scale}"
        for method in ("sr", "sr_kd", "bicubic"):
            for name, size in SIZES.items():
                assert Image.open(folder / method / name).size == size
        with (folder / "per_image.csv").open() as f:
            per_image = list(csv.DictReader(f))
        assert len(per_image) == 9 and all(r["status"] == "ok" and r["ssim"] for r in per_image)
    summary = json.loads((out / "summary.json").read_text())
    methods = {(r["method"], r["scale"]) for r in summary["rows"]}
    assert methods == {(m, s) for m in ("LDCSR", "LDCSR (sr_kd)", "Bicubic") for s in (2, 3.7, 8)}
    assert all(r["psnr"] > 5 and 0 < r["ssim"] <= 1 and r["images"] == 3 for r in summary["rows"])
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


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty TORCH_HOME; every download fails."""

    def blocked(*args, **kwargs):
        raise OSError("downloads are blocked in tests")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", blocked)
    return tmp_path / "torch_home"


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
    model, hr_dir = build_inception(64), data_root / "HOLD" / "test" / "HR"
    for row in rows:  # the HR copies are pixel-identical PNGs of the same names
        sr_dir = out / "HOLD" / f"x{row['scale']:g}" / names[row["method"]]
        assert abs(row["fid"] - fid_from_folders(sr_dir, hr_dir, model, 1, "cpu", 64)) < 1e-6


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
    tiled = _run(ckpt, data_root, tmp_path / "t", *extra, "--tile", "16", "--tile-overlap", "4")
    folder = "reconstruction" if first_stage else "sr"
    a, b = (_png(tmp_path / run / "ONE/x4" / folder / "c.png").astype(int) for run in "ut")
    assert np.abs(a - b).max() <= 1
    assert tiled[0]["runtime_s_per_image"] > 0 and tiled[0]["peak_memory_mib"] > 0
    with pytest.raises(SystemExit):  # a tile below the minimum is refused before any work
        _run(ckpt, data_root, tmp_path / "bad", *extra, "--tile", "8")


# --- protocols, scoring existing SR folders (--sr-dir), paper tables, no-reference metrics ---


def _csv(path) -> list[dict]:
    with Path(path).open() as f:
        return list(csv.DictReader(f))


def _pyiqa_metric(name, **options):
    """pyiqa's own metric when pyiqa is installed (it is optional), else None."""
    if importlib.util.find_spec("pyiqa") is None:
        return None
    import pyiqa

    return pyiqa.create_metric(name, device="cpu", **options)


def test_paper_protocol_psnr_equals_pyiqa_on_saved_files(e2e, data_root):
    """Default protocol `paper`: per-image PSNR of each saved uint8 SR PNG against its HR file is
    pyiqa's psnr (RGB, no crop) on those files, within 1e-3 dB; SSIM is pyiqa's ssim."""
    out, _, rows = e2e
    assert {r["protocol"] for r in rows} == {"paper"}
    assert json.loads((out / "summary.json").read_text())["settings"]["protocol"] == "paper"
    pyiqa_psnr, pyiqa_ssim = _pyiqa_metric("psnr"), _pyiqa_metric("ssim")
    folders = {"LDCSR": "sr", "LDCSR (sr_kd)": "sr_kd", "Bicubic": "bicubic"}
    checked = 0
    for scale in ("2", "3.7", "8"):
        for row in _csv(out / "HOLD" / f"x{scale}" / "per_image.csv"):
            sr_path = out / "HOLD" / f"x{scale}" / folders[row["method"]] / row["file"]
            hr_path = data_root / "HOLD" / "test" / "HR" / row["file"]
            sr, hr = (_png(p).astype(np.float64) / 255 for p in (sr_path, hr_path))
            plain = 10 * np.log10(1 / (np.mean((sr - hr) ** 2) + 1e-8))  # pyiqa's formula
            assert abs(float(row["psnr"]) - plain) <= 1e-3
            if pyiqa_psnr is not None:  # pyiqa reads the two files itself
                assert (
                    abs(float(row["psnr"]) - pyiqa_psnr(str(sr_path), str(hr_path)).item()) <= 1e-3
                )
                assert (
                    abs(float(row["ssim"]) - pyiqa_ssim(str(sr_path), str(hr_path)).item()) < 1e-5
                )
            checked += 1
    assert checked == 27


def test_test_script_protocol_keeps_todays_numbers(e2e, tiny_sr_checkpoint, data_root, tmp_path):
    """`--protocol test-script`: the same images, scored as before (ceil(s) crop, RGB)."""
    first, _, paper_rows = e2e
    out = tmp_path / "res"
    args = ("--metrics", "psnr,ssim", "--batch-size", "2", "--sr-kd", "--no-report")
    rows = _run(
        tiny_sr_checkpoint, data_root, out, "--scales", "3.7", *args,
        "--protocol", "test-script", dataset="HOLD",
    )  # fmt: skip
    assert {r["protocol"] for r in rows} == {"test-script"}
    assert "Protocol: test-script" in (out / "summary.md").read_text()
    for row in _csv(out / "HOLD" / "x3.7" / "per_image.csv"):
        folder = {"LDCSR": "sr", "LDCSR (sr_kd)": "sr_kd", "Bicubic": "bicubic"}[row["method"]]
        sr_png = _png(out / "HOLD" / "x3.7" / folder / row["file"])
        assert np.array_equal(sr_png, _png(first / "HOLD" / "x3.7" / folder / row["file"]))
        sr, hr = (
            to_tensor01(Image.fromarray(a))
            for a in (sr_png, _png(data_root / "HOLD" / "test" / "HR" / row["file"]))
        )
        assert row["protocol"] == "test-script"
        assert float(row["psnr"]) == pytest.approx(psnr(sr, hr, 4).item(), abs=1e-9)
        assert float(row["ssim"]) == pytest.approx(ssim(sr, hr, 4).item(), abs=1e-9)
    paper = {(r["method"]): r["psnr"] for r in paper_rows if r["scale"] == 3.7}
    assert all(abs(r["psnr"] - paper[r["method"]]) > 1e-3 for r in rows)  # the crop matters


def _copy_images(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for path in source.glob("*.png"):
        shutil.copy(path, target / path.name)
    return target


def test_sr_dir_reproduces_the_runs_own_rows(offline, tiny_sr_checkpoint, data_root, tmp_path):
    """Folders holding test.py's Bicubic and LDCSR outputs (test.py's x4 and the authors' x4.0
    naming) score to the run's own rows, every metric; methods become rows of one table."""
    write_random_weights(offline, ["alexnet", "inception"])
    metrics = ("--metrics", "psnr,ssim,lpips,fid", "--fid-dims", "64", "--no-report")
    run = _run(tiny_sr_checkpoint, data_root, tmp_path / "run", "--scales", "4", *metrics,
               dataset="HOLD")  # fmt: skip
    bicubic = _copy_images(tmp_path / "run/HOLD/x4/bicubic", tmp_path / "bic" / "HOLD" / "x4")
    _copy_images(tmp_path / "run/HOLD/x4/sr", tmp_path / "ours" / "HOLD" / "x4.0")
    argv = ["--sr-dir", f"Bicubic={bicubic.parents[1]}", "--sr-dir", f"LDCSR={tmp_path / 'ours'}"]
    argv += ["--datasets", "HOLD", "--data-root", str(data_root), "--scales", "4", *metrics]
    rows = cli.main([*argv, "--out-dir", str(tmp_path / "scored")])
    assert [r["method"] for r in rows] == ["Bicubic", "LDCSR"]
    expected = {r["method"]: r for r in run}
    for row in rows:
        for key in ("psnr", "ssim", "lpips", "images", "protocol"):
            assert row[key] == expected[row["method"]][key], key
        assert row["fid"] == pytest.approx(expected[row["method"]]["fid"], abs=1e-6)
        assert row["runtime_s_per_image"] is None and row["peak_memory_mib"] is None
    assert not (tmp_path / "scored" / "HOLD" / "x4" / "hr").exists()
    assert sorted(p.name for p in bicubic.iterdir()) == ["a.png", "b.png", "c.png"]  # untouched
    table3 = (tmp_path / "scored" / "paper_tables" / "table3_x4.md").read_text()
    bic = expected["Bicubic"]
    assert (
        f"| HOLD | Bicubic | {bic['psnr']:.2f} | {bic['ssim']:.4f} | {bic['fid']:.2f} |" in table3
    )
    both = _run(  # a model and a folder in one run, with its report
        tiny_sr_checkpoint, data_root, tmp_path / "both", "--scales", "4", "--metrics", "psnr",
        "--sr-dir", f"Bicubic (folder)={bicubic.parents[1]}", dataset="HOLD",
    )  # fmt: skip
    assert [r["method"] for r in both] == ["LDCSR", "Bicubic", "Bicubic (folder)"]
    assert both[2]["psnr"] == both[1]["psnr"] == expected["Bicubic"]["psnr"]
    assert (tmp_path / "both" / "report.html").is_file()


def test_sr_dir_names_every_problem_before_scoring(data_root, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "load_metrics", _fail_if_called)
    folder = tmp_path / "liif" / "HOLD" / "x2"
    folder.mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(folder / "a.png")
    Image.new("RGB", (20, 20)).save(folder / "b.png")  # wrong size; c.png is missing
    Image.new("RGB", (40, 40)).save(folder / "z.png")  # extra
    argv = ["--sr-dir", f"LIIF={tmp_path / 'liif'}", "--datasets", "HOLD", "--scales", "2"]
    argv += ["--data-root", str(data_root), "--out-dir", str(tmp_path / "out")]
    with pytest.raises(EvaluationError) as err:
        cli.main(argv)
    message = str(err.value)
    assert "3 problem(s), nothing was scored" in message and "\n" not in message
    assert f"LIIF: {folder} lacks c.png" in message
    assert f"LIIF: {folder} holds extra file(s) z.png" in message
    assert f"LIIF: {folder / 'b.png'} is 20x20, expected 40x40" in message
    assert not (tmp_path / "out").exists()
    with pytest.raises(EvaluationError, match="is not a folder"):
        cli.main([*argv[:1], str(tmp_path / "nope"), *argv[2:]])
    with pytest.raises(SystemExit):  # neither a model nor folders to score
        cli.main(argv[2:])


def _fail_if_called(*args, **kwargs):
    raise AssertionError("metric weights were loaded before the inputs were checked")


def test_no_reference_metrics_without_pyiqa_stop_first(
    tiny_sr_checkpoint, data_root, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # as if pyiqa were not installed
    monkeypatch.setattr(cli, "load_model", _fail_if_called)
    with pytest.raises(MissingPackageError, match=r"niqe.*pip install --no-deps pyiqa"):
        _run(tiny_sr_checkpoint, data_root, tmp_path / "out", "--metrics", "psnr,niqe")
    assert not (tmp_path / "out").exists()
    with pytest.raises(EvaluationError, match="need HR images.*no-reference metrics: niqe"):
        _run(
            tiny_sr_checkpoint,
            data_root,
            tmp_path / "o",
            "--datatype",
            "hr-input",
            "--metrics",
            "psnr",
        )


def _write_pyiqa_parameters(torch_home: Path) -> dict[str, Path]:
    """Locally generated NIQE/BRISQUE parameter files in pyiqa's formats (a 36-d Gaussian; 8
    support vectors of 36 features), seeded: the real ones are downloads. Scores made with them
    are not the published NIQE/BRISQUE values; they check that ours are pyiqa's computation."""
    import scipy.io

    folder, gen = torch_home / "hub" / "pyiqa", np.random.default_rng(0)
    folder.mkdir(parents=True)
    a = gen.normal(size=(36, 36))
    niqe = folder / "niqe_modelparameters.mat"
    scipy.io.savemat(niqe, {"mu_prisparam": gen.normal(size=(1, 36)), "cov_prisparam": a @ a.T})
    brisque = folder / "brisque_svm_weights.pth"
    torch.save(
        (torch.from_numpy(gen.normal(size=8)), torch.from_numpy(gen.random((8, 36)))), brisque
    )
    return {"niqe": niqe, "brisque": brisque}


def test_niqe_brisque_equal_pyiqa_on_the_same_files(offline, tmp_path):
    """Real-world setting (inputs without HR): a method's SR folder scored with NIQE and BRISQUE
    gives pyiqa's own values on the same files; with HR they are extra columns."""
    pytest.importorskip("pyiqa", reason="pyiqa is optional (see README, Evaluation)")
    holdout, files = shared_path("data", "holdout"), _write_pyiqa_parameters(offline)
    inputs, sr_dir = tmp_path / "World" / "test" / "HR", tmp_path / "bic" / "World" / "x4"
    inputs.mkdir(parents=True)
    sr_dir.mkdir(parents=True)
    for name, box in (("a", (0, 0, 224, 200)), ("b", (40, 40, 240, 264))):
        hr = load_image(holdout / CROPS[f"{name}.png"][0]).crop(box)
        hr.save(inputs / f"{name}.png")
        lr = hr.resize((hr.width // 4, hr.height // 4), Image.BICUBIC)
        lr.resize((lr.width * 4, lr.height * 4), Image.BICUBIC).save(sr_dir / f"{name}.png")
    lr_dir = tmp_path / "inputs" / "World"  # dataset name: World, as the SR folder's
    _copy_images(inputs, lr_dir)
    for path in lr_dir.iterdir():  # the inputs of the real-world setting: LR images only
        image = Image.open(path)
        image.resize((image.width // 4, image.height // 4), Image.BICUBIC).save(path)
    base = ["--sr-dir", f"Bicubic={tmp_path / 'bic'}", "--scales", "4", "--no-report"]
    real = cli.main([*base, "--datasets", str(lr_dir), "--datatype", "hr-input",
                     "--metrics", "niqe,brisque", "--out-dir", str(tmp_path / "real")])  # fmt: skip
    assert real[0]["niqe"] is not None and real[0]["psnr"] is None
    niqe = _pyiqa_metric("niqe", pretrained_model_path=str(files["niqe"]))
    brisque = _pyiqa_metric("brisque", pretrained_model_path=str(files["brisque"]))
    for row in _csv(tmp_path / "real" / "World" / "x4" / "per_image.csv"):
        path = str(sr_dir / row["file"])
        assert float(row["niqe"]) == pytest.approx(niqe(path).item(), rel=1e-9)
        assert float(row["brisque"]) == pytest.approx(brisque(path).item(), rel=1e-9)
    ref = cli.main([*base, "--datasets", str(tmp_path / "World"), "--metrics", "psnr,niqe,brisque",
                    "--out-dir", str(tmp_path / "ref")])  # fmt: skip
    assert ref[0]["psnr"] > 15 and ref[0]["niqe"] == pytest.approx(real[0]["niqe"], rel=1e-12)
    for run in ("real", "ref"):
        assert "| NIQE | BRISQUE |" in (tmp_path / run / "summary.md").read_text()


def test_paper_tables_from_a_small_run(e2e):
    """The three layouts of the run at x2, x3.7 and x8: filled where run, blank elsewhere."""
    out, _, rows = e2e
    folder = out / "paper_tables"
    names = ("table1_x2_x4_x8", "table2_continuous_scales", "table3_x4")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{n}.{e}" for n in names for e in ("md", "csv", "tex")
    )
    row = {(r["method"], r["scale"]): r for r in rows}
    table1 = _csv(folder / "table1_x2_x4_x8.csv")
    assert list(table1[0]) == ["Method", "Metric", "HOLD x2", "HOLD x4", "HOLD x8", "Protocol"]
    assert {r["Protocol"] for r in table1} == {"paper"}
    assert [(r["Method"], r["Metric"]) for r in table1[:3]] == [
        ("LDCSR", "PSNR"), ("LDCSR", "LPIPS"), ("LDCSR", "FID")
    ]  # fmt: skip
    assert table1[0]["HOLD x2"] == f"{row['LDCSR', 2.0]['psnr']:.2f}"
    assert table1[0]["HOLD x8"] == f"{row['LDCSR', 8.0]['psnr']:.2f}"
    assert table1[0]["HOLD x4"] == "" and table1[1]["HOLD x2"] == ""  # x4, LPIPS: not run
    table2 = _csv(folder / "table2_continuous_scales.csv")
    scales = ["x2.0", "x2.6", "x3.0", "x3.4", "x4.0", "x6.0", "x8.0", "x10.0"]
    assert list(table2[0])[3:-1] == scales
    assert len(table2) == 3 * 2 and all(r[k] == "" for r in table2 for k in scales)
    table3 = _csv(folder / "table3_x4.csv")
    metrics = ["PSNR", "SSIM", "FID", "LPIPS", "NIQE", "BRISQUE"]
    assert list(table3[0]) == ["Dataset", "Method", *metrics, "Protocol"]
    assert [r["Method"] for r in table3] == ["LDCSR", "LDCSR (sr_kd)", "Bicubic"]
    assert all(r[k] == "" for r in table3 for k in metrics)  # x4 was not run
    markdown = (folder / "table1_x2_x4_x8.md").read_text()
    assert f"| LDCSR | PSNR | {row['LDCSR', 2.0]['psnr']:.2f} |  | " in markdown
    assert "Protocol: paper; blank: not run." in markdown
    tex = (folder / "table1_x2_x4_x8.tex").read_text()
    assert "\\begin{tabular}{lllll}" in tex and "LDCSR (sr\\_kd) & PSNR & " in tex


def test_paper_tables_order_and_fill_from_summary_rows():
    """Datasets in the paper's order, methods as run, each value in its cell, blanks elsewhere."""
    from evaluation.paper_tables import paper_tables, to_latex

    rows = [
        {"method": "LIIF", "dataset": "DIOR", "scale": 2.6, "fid": 30.5, "lpips": 0.21},
        {"method": "LDCSR", "dataset": "Mine", "scale": 4.0, "psnr": 27.191, "niqe": 5.5},
        {
            "method": "LDCSR",
            "dataset": "AID",
            "scale": 4.0,
            "psnr": 27.19,
            "ssim": 0.7,
            "fid": 18.37,
        },
    ]
    tables = paper_tables(rows)
    header1, body1 = tables["table1_x2_x4_x8"]
    assert header1[2:5] == ["AID x2", "AID x4", "AID x8"] and header1[5] == "DIOR x2"
    assert header1[-1] == "Mine x8" and [r[:2] for r in body1][:3] == [
        ["LIIF", "PSNR"], ["LIIF", "LPIPS"], ["LIIF", "FID"]
    ]  # fmt: skip
    ldcsr_psnr = body1[3]
    assert ldcsr_psnr[3] == "27.19" and ldcsr_psnr[2] == "" and ldcsr_psnr[-2] == "27.19"
    header2, body2 = tables["table2_continuous_scales"]
    liif_dior = [r for r in body2 if r[:2] == ["DIOR", "LIIF"]]
    assert [r[header2.index("x2.6")] for r in liif_dior] == ["30.50", "0.2100"]
    assert all(
        v == "" for r in liif_dior for i, v in enumerate(r) if header2[i] != "x2.6" and i > 2
    )
    header3, body3 = tables["table3_x4"]
    assert ["AID", "LDCSR", "27.19", "0.7000", "18.37", "", "", ""] in body3
    assert ["Mine", "LDCSR", "27.19", "", "", "", "5.5000", ""] in body3
    assert ["DIOR", "LDCSR", "", "", "", "", "", ""] in body3  # not run: blank, not 0
    assert "\\toprule" in to_latex(tables["table3_x4"]) and "\\_" not in to_latex(
        tables["table3_x4"]
    )
