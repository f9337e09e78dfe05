"""Shared cases of the test.py end-to-end tests (test_evaluate.py, test_protocols.py): test.py
loaded as a module, small crops of holdout images laid out as data/prepare_split.py writes them
(generated aerial scenes of the same sizes in a clone without ../shared), and one seeded run over
them (the session fixtures `data_root` and `e2e` of tests/conftest.py)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
from PIL import Image

from data.synthetic import generate_scene
from data.transforms import lr_size, resize_bicubic
from tests.conftest import ROOT, SHARED
from utils.image_io import load_image

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


def make_data_root(root: Path) -> Path:
    """<root>/HOLD (a, b, c) and <root>/ONE (c) as data/prepare_split.py writes them: crops of
    holdout images, or generated scenes of the same sizes where ../shared is absent."""
    holdout = SHARED / "data" / "holdout"
    for dataset, names in (("HOLD", ["a.png", "b.png", "c.png"]), ("ONE", ["c.png"])):
        hr_dir, lr_dir = root / dataset / "test" / "HR", root / dataset / "test" / "LR" / "X2"
        hr_dir.mkdir(parents=True)
        lr_dir.mkdir(parents=True)
        for name in names:
            hr = _hr_image(holdout, name)
            hr.save(hr_dir / name)
            resize_bicubic(hr, lr_size((hr.height, hr.width), 2)).save(lr_dir / name)
    return root


def run_cli(ckpt, data_root, out, *args, dataset="ONE"):
    """test.py's main() on `dataset` of `data_root`, writing to `out`."""
    argv = ["--checkpoint", str(ckpt), "--data-root", str(data_root), "--out-dir", str(out)]
    return cli.main([*argv, "--datasets", dataset, *args])


def check_run_outputs(out: Path, dataset: str, sizes: dict, min_psnr: float) -> dict:
    """Asserts what a run over three images at x2, x3.7 and x8 with --sr-kd wrote under `out`:
    each method's PNGs at their Pillow `sizes` {name: (W, H)}, 9 ok rows per scale, and a
    summary row per method and scale with PSNR > `min_psnr`. Returns summary.json."""
    for scale in ("2", "3.7", "8"):
        folder = out / dataset / f"x{scale}"
        for method in ("sr", "sr_kd", "bicubic"):
            for name, size in sizes.items():
                assert Image.open(folder / method / name).size == size
        with (folder / "per_image.csv").open() as f:
            per_image = list(csv.DictReader(f))
        assert len(per_image) == 9 and all(r["status"] == "ok" and r["ssim"] for r in per_image)
    summary = json.loads((out / "summary.json").read_text())
    methods = {(r["method"], r["scale"]) for r in summary["rows"]}
    assert methods == {(m, s) for m in ("LDCSR", "LDCSR (sr_kd)", "Bicubic") for s in (2, 3.7, 8)}
    rows = summary["rows"]
    assert all(r["psnr"] > min_psnr and 0 < r["ssim"] <= 1 and r["images"] == 3 for r in rows)
    return summary


def png(path) -> np.ndarray:
    """An image file as a numpy array, as stored."""
    return np.asarray(Image.open(path))


def _hr_image(holdout: Path, name: str) -> Image.Image:
    """The HR test image `name`: its holdout crop, else a generated scene of its size."""
    width, height = SIZES[name]
    source, box = CROPS[name]
    if (holdout / source).is_file():
        return load_image(holdout / source).crop(box).resize((width, height), Image.BICUBIC)
    return generate_scene((height, width), seed=(11, list(CROPS).index(name)))
