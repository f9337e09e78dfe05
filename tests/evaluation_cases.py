"""Shared cases of the test.py end-to-end tests (test_evaluate.py, test_protocols.py): test.py
loaded as a module, small crops of holdout images laid out as data/prepare_split.py writes them
(generated aerial scenes of the same sizes in a clone without ../shared), and one seeded run over
them (the session fixtures `data_root` and `e2e` of tests/conftest.py)."""

from __future__ import annotations

import importlib.util
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
