"""test.py's scoring protocols (`--protocol paper` / `test-script`), scoring existing SR folders
(`--sr-dir`), the paper's table layouts and the no-reference metrics (pyiqa, optional)."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.runner import EvaluationError
from tests.conftest import shared_path
from tests.evaluation_cases import CROPS, cli
from tests.evaluation_cases import png as _png
from tests.evaluation_cases import run_cli as _run
from tests.helpers import write_random_weights
from utils.image_io import load_image, to_tensor01
from utils.metrics import psnr, ssim
from utils.weights import MissingPackageError


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
