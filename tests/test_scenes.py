"""Procedural aerial scenes: determinism, sizes, fine detail, dataset/config use and the command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image, ImageFilter

from data.datamodule import DataModule
from data.datasets import MultiScaleTrainDataset
from data.sampler import ScaleBatchSampler
from data.synthetic import GeneratedScenes, SceneEvalDataset, generate_scene
from data.synthetic.__main__ import main
from tests.conftest import SUBPROCESS_TIMEOUT
from utils.config import instantiate_from_config
from utils.image_io import list_images, load_image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Mean gradient energy (mean of dx^2 + dy^2 of grey levels in [0, 255]) that an image with fine
# detail exceeds. Calibrated on ../shared/data/train_pool: 71 of its 76 real aerial images pass
# (median 308; the 5 below are open sea and airfields), none passes after a Gaussian blur of
# radius 2 (max 80); generated 512 px scenes (40 seeds): min 110, median 300; blurred max 60.
MIN_GRADIENT_ENERGY = 100.0


def gradient_energy(img: Image.Image) -> float:
    grey = np.asarray(img.convert("L"), dtype=np.float64)
    dx, dy = np.diff(grey, axis=1)[:-1], np.diff(grey, axis=0)[:, :-1]
    return float(np.mean(dx**2 + dy**2))


def test_scenes_are_deterministic_per_seed():
    first = np.asarray(generate_scene(96, seed=3))
    assert np.array_equal(first, np.asarray(generate_scene(96, seed=3)))
    assert np.array_equal(
        np.asarray(generate_scene(96, (0, 2))), np.asarray(generate_scene(96, (0, 2)))
    )
    others = [np.asarray(generate_scene(96, s)) for s in (4, (3, 1), (0, 3))]
    assert all(np.abs(first.astype(int) - o).mean() > 5 for o in others)


@pytest.mark.parametrize("size", [64, (48, 80), (80, 48), (8, 8), (8, 40)])
def test_scene_sizes(size):
    img = generate_scene(size, seed=1)
    h, w = (size, size) if isinstance(size, int) else size
    assert img.mode == "RGB" and img.size == (w, h)


@pytest.mark.parametrize("size", [0, 7, (16,), (16, 16, 3), 16.0, "16"])
def test_bad_size_is_refused(size):
    with pytest.raises(ValueError, match="scene size"):
        generate_scene(size)


def test_scenes_have_fine_detail_that_blur_removes():
    for i in range(4):
        scene = generate_scene(256, (0, i))
        assert gradient_energy(scene) > MIN_GRADIENT_ENERGY, f"scene (0, {i}) lacks fine detail"
        blurred = scene.filter(ImageFilter.GaussianBlur(2))
        assert gradient_energy(blurred) < MIN_GRADIENT_ENERGY, f"blurred scene (0, {i}) passes"
    assert gradient_energy(Image.new("RGB", (64, 64), (90, 110, 70))) == 0.0


def test_detail_threshold_matches_real_aerial_images():
    pool = SHARED / "data" / "train_pool"
    if not pool.is_dir():
        pytest.skip(f"{pool} is missing (shared real aerial images)")
    images = [load_image(pool / f) for f in list_images(pool)]
    energies = np.array([gradient_energy(img) for img in images])
    assert len(energies) >= 20 and np.mean(energies > MIN_GRADIENT_ENERGY) >= 0.9
    blurred = [gradient_energy(img.filter(ImageFilter.GaussianBlur(2))) for img in images[::4]]
    assert max(blurred) < MIN_GRADIENT_ENERGY


def test_scene_datasets_work_from_a_config():
    config = OmegaConf.create(
        """
        batch_size: 2
        train:
          target: data.synthetic.SceneTrainDataset
          params: {num_images: 3, size: 48, seed: 0, lr_size: 8, max_scale: 4}
        validation:
          target: data.synthetic.SceneEvalDataset
          params: {num_images: 2, size: [40, 56], seed: 1, scale: 4}
        """
    )
    dm = instantiate_from_config({"target": "data.datamodule.DataModule", "params": config})
    dm.setup("fit")
    train = dm.train_dataloader()
    assert isinstance(dm.datasets["train"], MultiScaleTrainDataset)
    assert isinstance(train.batch_sampler, ScaleBatchSampler)
    batch = next(iter(train))
    assert batch["lr"].shape == (2, 3, 8, 8) and batch["hr"].shape[-1] == batch["hr"].shape[-2]
    assert 0 <= batch["hr"].min() and batch["hr"].max() <= 1 and batch["hr"].std() > 0.02
    val = next(iter(dm.val_dataloader()))
    assert val["hr"].shape == (1, 3, 40, 56) and val["lr"].shape == (1, 3, 10, 14)
    assert val["file_name"] == ["scene_0000.png"] and float(val["scale"]) == 4.0
    with pytest.raises(ValueError, match="48x48, smaller than the 64 px"):
        DataModule(
            batch_size=2,
            train={
                **dm.configs["train"],
                "params": {**dm.configs["train"]["params"], "max_scale": 8},
            },
        ).setup("fit")
    with pytest.raises(ValueError, match="scale must be >= 1"):
        SceneEvalDataset(num_images=1, scale=0.5)


def test_command_writes_the_dataset_images_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "scenes"
    main(["--output", str(out), "--num", "2", "--size", "32", "48", "--seed", "5"])
    assert sorted(p.name for p in out.iterdir()) == ["scene_0000.png", "scene_0001.png"]
    written = np.asarray(Image.open(out / "scene_0001.png"))
    assert np.array_equal(written, np.asarray(GeneratedScenes(2, (32, 48), seed=5)[1][0]))
    stamp = (out / "scene_0000.png").stat().st_mtime_ns
    with pytest.raises(SystemExit):
        main(["--output", str(out), "--num", "3", "--size", "32"])
    assert "--overwrite" in capsys.readouterr().err and not (out / "scene_0002.png").exists()
    assert (out / "scene_0000.png").stat().st_mtime_ns == stamp
    main(["--output", str(out), "--num", "1", "--size", "16", "--overwrite"])
    assert Image.open(out / "scene_0000.png").size == (16, 16)


def test_command_runs_as_a_module(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "data.synthetic",
        "--output",
        str(tmp_path),
        "--num",
        "1",
        "--size",
        "24",
    ]
    result = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "scene_0000.png").is_file()
