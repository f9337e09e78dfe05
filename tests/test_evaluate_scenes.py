"""test.py end to end on generated aerial scenes (data/synthetic), so every clone checks the
evaluation CLI and the PSNR/SSIM code against scikit-image without ../shared (the holdout-image
versions in test_evaluate.py and test_metrics.py run in addition where ../shared exists)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import metrics as skimage_metrics

from data.synthetic import generate_scene
from data.transforms import lr_size, resize_bicubic
from tests.evaluation_cases import check_run_outputs, cli
from utils.metrics import crop_border_for, psnr, quantize, ssim

SIZES = {"a.png": (40, 40), "b.png": (40, 40), "c.png": (32, 40)}  # (H, W)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """<root>/GEN/test/{HR, LR/X2}: three generated scenes, laid out as prepare_split writes."""
    root = tmp_path_factory.mktemp("generated")
    hr_dir, lr_dir = root / "GEN" / "test" / "HR", root / "GEN" / "test" / "LR" / "X2"
    hr_dir.mkdir(parents=True)
    lr_dir.mkdir(parents=True)
    for k, (name, size) in enumerate(SIZES.items()):
        hr = generate_scene(size, seed=(7, k))
        hr.save(hr_dir / name)
        resize_bicubic(hr, lr_size(size, 2)).save(lr_dir / name)
    return root


@pytest.fixture(scope="module")
def runs(tiny_sr_checkpoint, data_root, tmp_path_factory):
    """test.py at scales 2, 3.7 and 8 (batch 2, sr_kd on), and again at 3.7 with the same seed."""
    first, second = (tmp_path_factory.mktemp("run") / "res" for _ in range(2))
    common = ["--checkpoint", str(tiny_sr_checkpoint), "--data-root", str(data_root), "--sr-kd",
              "--datasets", "GEN", "--metrics", "psnr,ssim", "--batch-size", "2"]  # fmt: skip
    rows = cli.main([*common, "--out-dir", str(first), "--scales", "2,3.7", "8"])
    cli.main([*common, "--out-dir", str(second), "--scales", "3.7"])
    return first, second, rows


def test_test_py_writes_every_output_and_table_on_generated_scenes(runs):
    out, _, rows = runs
    check_run_outputs(out, "GEN", {name: (w, h) for name, (h, w) in SIZES.items()}, min_psnr=10)
    assert all(r["runtime_s_per_image"] > 0 for r in rows)
    assert "| Bicubic | GEN | 3.7 |" in (out / "summary.md").read_text()


def test_test_py_bicubic_row_is_the_psnr_of_its_images(runs, data_root):
    """The table's Bicubic PSNR at x2 is the mean PSNR of the written images against the HR
    scenes (RGB, computed here with numpy under both border conventions, one must match)."""
    out, _, _ = runs
    with (out / "GEN" / "x2" / "per_image.csv").open() as f:
        rows = {(r["method"], r["file"]): float(r["psnr"]) for r in csv.DictReader(f)}
    for name in SIZES:
        hr = np.asarray(Image.open(data_root / "GEN" / "test" / "HR" / name), dtype=np.float64)
        sr = np.asarray(Image.open(out / "GEN" / "x2" / "bicubic" / name), dtype=np.float64)
        recorded = rows[("Bicubic", name)]
        candidates = []
        for border in (0, crop_border_for(2)):
            cut = (slice(border, -border or None),) * 2
            mse = ((hr[cut] - sr[cut]) ** 2).mean()
            candidates.append(10 * np.log10(255**2 / mse))
        assert min(abs(recorded - c) for c in candidates) < 0.01


def test_same_seed_gives_identical_images_on_generated_scenes(runs):
    first, second, _ = runs
    pngs = sorted(second.glob("GEN/x*/sr*/*.png"))
    assert len(pngs) == 6
    for path in pngs:
        assert np.array_equal(np.asarray(Image.open(path)),
                              np.asarray(Image.open(first / path.relative_to(second))))  # fmt: skip


@pytest.mark.parametrize("test_y", [False, True])
def test_psnr_ssim_match_scikit_image_on_generated_scenes(test_y):
    """utils.metrics against scikit-image on generated scenes and their bicubic copies at x3.5."""
    border = crop_border_for(3.5)
    for seed in range(3):
        hr_img = generate_scene((150, 201), seed=(11, seed))
        sr_img = hr_img.resize((57, 42), Image.BICUBIC).resize((201, 150), Image.BICUBIC)
        sr, hr = (torch.from_numpy(np.array(im)).permute(2, 0, 1) / 255 for im in (sr_img, hr_img))
        sr_u8, hr_u8 = (
            quantize(x).permute(1, 2, 0).numpy()[border:-border, border:-border] for x in (sr, hr)
        )
        if test_y:  # BT.601 Y in [16, 235], BasicSR's rgb2ycbcr(y_only=True)
            weights = np.array([65.481, 128.553, 24.966]) / 255.0
            hr_ref, sr_ref = (16.0 + u8.astype(np.float64) @ weights for u8 in (hr_u8, sr_u8))
            axis = None
        else:
            hr_ref, sr_ref, axis = hr_u8, sr_u8, 2
        ref_psnr = skimage_metrics.peak_signal_noise_ratio(hr_ref, sr_ref, data_range=255)
        ref_ssim = skimage_metrics.structural_similarity(
            hr_ref, sr_ref, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
            data_range=255, channel_axis=axis,
        )  # fmt: skip
        assert abs(psnr(sr, hr, border, test_y).item() - ref_psnr) < 1e-6
        assert abs(ssim(sr, hr, border, test_y).item() - ref_ssim) < 1e-6
        assert 15 < ref_psnr < 45 and 0.1 < ref_ssim < 1.0  # a real degradation, not a no-op
