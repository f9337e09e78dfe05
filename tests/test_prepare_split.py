"""data/prepare_split.py and the flat output names it gives a split's images."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.prepare_split import main as prepare_main
from data.splits import flat_names, load_split_pickle
from tests.conftest import SUBPROCESS_TIMEOUT
from tests.helpers import write_rgb
from utils.image_io import load_image

REPO = Path(__file__).resolve().parents[1]


def make_raw(root: Path) -> Path:
    for rel in ("Park/a_1.jpg", "Park/same.jpg", "Port/same.png", "Port/b_2.tif"):
        write_rgb(root / rel, 30, 44)
    split = root.parent / "split.pkl"
    train, test = ["Park/a_1.jpg", "Park/same.jpg"], ["Port/same.png", "Port/b_2.tif"]
    split.write_bytes(pickle.dumps({"train": train, "val": [], "test": test}))
    return split


def test_prepare_split_writes_hr_and_lr(tmp_path, capsys):
    split = make_raw(tmp_path / "raw")
    out = tmp_path / "AID"
    args = [
        "--split_file",
        str(split),
        "--data_path",
        str(tmp_path / "raw"),
        "--output_path",
        str(out),
    ]
    assert prepare_main([*args, "--scales", "4", "2.5"]) == 0
    assert sorted(p.name for p in (out / "train" / "HR").iterdir()) == ["Park_same.png", "a_1.png"]
    assert sorted(p.name for p in (out / "test" / "LR" / "X4").iterdir()) == [
        "Port_same.png",
        "b_2.png",
    ]
    hr = Image.open(out / "test" / "HR" / "b_2.png")
    assert hr.size == (44, 30)
    assert np.array_equal(np.asarray(hr), np.asarray(load_image(tmp_path / "raw" / "Port/b_2.tif")))
    assert Image.open(out / "test" / "LR" / "X2.5" / "b_2.png").size == (17, 12)
    assert (out / "val" / "HR").is_dir() and not any((out / "val" / "HR").iterdir())
    with pytest.raises(SystemExit):
        prepare_main(args)
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert prepare_main([*args, "--overwrite"]) == 0


def test_prepare_split_make_split_and_script_entry(tmp_path):
    make_raw(tmp_path / "raw")
    out_pkl = tmp_path / "mine.pkl"
    assert (
        prepare_main(
            [
                "--data_path",
                str(tmp_path / "raw"),
                "--make-split",
                str(out_pkl),
                "--ratios",
                "0.5,0.25,0.25",
            ]
        )
        == 0
    )
    splits = load_split_pickle(out_pkl)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [2, 1, 1]
    cmd = [sys.executable, "data/prepare_split.py", "--split_file", str(out_pkl)]
    cmd += ["--data_path", str(tmp_path / "raw"), "--output_path", str(tmp_path / "out")]
    result = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "out").rglob("*.png"))) == 8


def test_flat_names_join_colliding_paths_and_refuse_what_still_collides():
    files = ["a/x.png", "b/x.png", "y.jpg", "c/Z.tif", "d/z.png"]
    assert flat_names(files) == {
        "a/x.png": "a_x.png",
        "b/x.png": "b_x.png",
        "y.jpg": "y.png",
        "c/Z.tif": "c_Z.png",
        "d/z.png": "d_z.png",
    }
    same_folder = ["x.jpg", "x.tif"]
    assert flat_names(same_folder, keep_extension=True) == {
        "x.jpg": "x_jpg.png",
        "x.tif": "x_tif.png",
    }
    with pytest.raises(ValueError, match="2 images would be written under the same name: x.jpg"):
        flat_names(same_folder)  # both would be x.png
