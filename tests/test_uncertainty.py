"""Uncertainty maps: the spread of several seeded samples, through the API, super_resolve.py
(PNG and GeoTIFF, tiled and untiled) and test.py (rank correlation with the error, calibration)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image
from rasterio.transform import from_origin

import super_resolve
import test as evaluate_cli
from evaluation.uncertainty import Calibration, spearman
from models import load_sr_model
from models.uncertainty import sample_spread, seeds_from
from scenes.uncertainty_maps import colour_map, uncertainty_paths
from tests.helpers import randomize_zero_init

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def spread_checkpoint(tiny_sr_checkpoint, tmp_path_factory):
    """The tiny checkpoint with a UNet that predicts non-zero noise and a small `scale_factor`,
    so that samples differ by well over the uint8 rounding (mean std ~0.01)."""
    model = load_sr_model(tiny_sr_checkpoint)
    torch.manual_seed(0)
    randomize_zero_init(model, std=0.5)
    model.scale_factor.fill_(0.2)
    checkpoint = torch.load(tiny_sr_checkpoint, weights_only=False)
    checkpoint["state_dict"] = model.state_dict()
    run_dir = tmp_path_factory.mktemp("spread_run")
    (run_dir / "checkpoints").mkdir()
    path = run_dir / "checkpoints" / "last.ckpt"
    torch.save(checkpoint, path)
    return path


def run(*args) -> int:
    return super_resolve.main([str(a) for a in args])


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float64).transpose(2, 0, 1) / 255  # [3, H, W]


def read_band(path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def test_sample_spread_is_the_population_std_over_seeds_averaged_over_channels():
    def draw(generator):
        return torch.rand(2, 3, 5, 7, generator=generator)

    first, unc = sample_spread(draw, seeds_from(3, 4))
    stack = torch.stack([draw(torch.Generator().manual_seed(s)) for s in (3, 4, 5, 6)])
    assert torch.equal(first, stack[0])
    expected = stack.std(dim=0, unbiased=False).mean(dim=1, keepdim=True)
    assert unc.shape == (2, 1, 5, 7) and torch.allclose(unc, expected, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        seeds_from(0, 1)


def test_api_returns_the_seed_sample_and_a_map_that_tiling_does_not_change(spread_checkpoint):
    model = load_sr_model(spread_checkpoint)
    lr = torch.rand(1, 3, 24, 20, generator=torch.Generator().manual_seed(1))
    sr, unc = model.super_resolve_samples(lr, (48, 40), [7, 8, 9], tile=0)
    alone = model.super_resolve(lr, (48, 40), generator=torch.Generator().manual_seed(7), tile=0)
    assert torch.equal(sr, alone) and unc.shape == (1, 1, 48, 40)
    assert float(unc.mean()) > 5e-3  # the samples differ
    _, tiled = model.super_resolve_samples(lr, (48, 40), [7, 8, 9], tile=16)
    assert torch.allclose(tiled, unc, atol=1e-5)


def test_cli_map_equals_the_std_of_separate_seeded_runs_tiled_or_not(spread_checkpoint, tmp_path):
    src = tmp_path / "scene.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(src)
    args = ["--checkpoint", spread_checkpoint, "--scale", "2", "--no-progress"]
    assert run(src, "-o", tmp_path / "n", *args, "--samples", "4", "--seed", "10") == 0
    tiled = ["--tile", "16"]
    assert run(src, "-o", tmp_path / "t", *args, *tiled, "--samples", "4", "--seed", "10") == 0
    for seed in range(10, 14):
        assert run(src, "-o", tmp_path / f"s{seed}", *args, "--seed", str(seed)) == 0
    runs = np.stack([read_png(tmp_path / f"s{s}" / "scene.png") for s in range(10, 14)])
    expected = runs.std(axis=0).mean(axis=0)  # [H, W]
    tif, png = uncertainty_paths(tmp_path / "n" / "scene.png")
    assert tif.name == "scene_uncertainty.tif" and png.name == "scene_uncertainty.png"
    with rasterio.open(tif) as f:
        assert f.dtypes[0] == "float32" and (f.height, f.width) == (48, 40)
    got = read_band(tif)
    assert expected.mean() > 5e-3 and np.abs(got - expected).max() <= 0.5 / 255 + 1e-6
    assert np.abs(read_band(tmp_path / "t" / "scene_uncertainty.tif") - got).max() < 1e-5
    assert np.array_equal(read_png(tmp_path / "n" / "scene.png"), runs[0])  # output unchanged
    preview = Image.open(png)
    assert preview.mode == "RGB" and preview.size == (40, 48)
    assert run(src, "-o", tmp_path / "n", *args, "--samples", "4", "--seed", "10") == 1  # exists
    assert run(src, "-o", tmp_path / "x", *args, "--samples", "0") == 2


def test_geotiff_map_keeps_the_georeference_and_equals_separate_runs(spread_checkpoint, tmp_path):
    src = tmp_path / "geo.tif"
    transform = from_origin(500000, 4200000, 10.0, 10.0)
    profile = dict(driver="GTiff", width=20, height=16, count=4, dtype="float32", crs="EPSG:32633")
    profile["transform"] = transform
    with rasterio.open(src, "w", **profile) as dst:
        dst.write(np.random.default_rng(0).uniform(0, 3000, (4, 16, 20)).astype(np.float32))
    args = ["--checkpoint", spread_checkpoint, "--scale", "2", "--no-progress"]
    args += ["--bands", "3,2,1", "--value-range", "0,3000"]
    assert run(src, "-o", tmp_path / "n", *args, "--samples", "3", "--seed", "5") == 0
    for seed in (5, 6, 7):
        assert run(src, "-o", tmp_path / f"s{seed}", *args, "--seed", str(seed)) == 0
    samples = []
    for seed in (5, 6, 7):
        with rasterio.open(tmp_path / f"s{seed}" / "geo.tif") as f:
            samples.append(f.read([3, 2, 1]).astype(np.float64) / 3000)
    expected = np.stack(samples).std(axis=0).mean(axis=0)
    with rasterio.open(tmp_path / "n" / "geo_uncertainty.tif") as f:
        assert f.dtypes[0] == "float32" and f.count == 1 and (f.height, f.width) == (32, 40)
        assert f.crs.to_epsg() == 32633 and f.transform.a == pytest.approx(5.0)
        assert (f.transform.c, f.transform.f) == (500000, 4200000)
        got = f.read(1)
    assert expected.mean() > 5e-3 and np.abs(got - expected).max() < 1e-5
    assert (tmp_path / "n" / "geo_uncertainty.png").is_file()
    assert [p.name for p in (tmp_path / "n").iterdir() if p.name.startswith(".")] == []


def test_spearman_and_calibration_bins():
    rng = np.random.default_rng(0)
    unc = rng.uniform(0, 1, 5000)
    assert spearman(unc, 2 * unc + 1) == pytest.approx(1.0)
    assert spearman(unc, -unc) == pytest.approx(-1.0)
    assert abs(spearman(unc, rng.uniform(0, 1, 5000))) < 0.05
    assert np.isnan(spearman(np.zeros(10), unc[:10]))  # constant map: undefined
    calibration = Calibration(bins=5)
    calibration.add(unc, unc / 2)
    bins = calibration.bins()
    assert len(bins) == 5 and sum(b["pixels"] for b in bins) == 5000
    assert all(b["mae"] == pytest.approx(b["uncertainty"] / 2) for b in bins)
    assert [b["uncertainty"] for b in bins] == sorted(b["uncertainty"] for b in bins)


def test_colour_map_ends_and_nan():
    rgb = colour_map(np.array([[0.0, 0.5, 1.0, np.nan]]), vmax=0.5)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
    assert tuple(rgb[0, 0]) == (68, 1, 84) and tuple(rgb[0, 1]) == tuple(rgb[0, 2]) == (
        253,
        231,
        37,
    )
    assert tuple(rgb[0, 3]) == (0, 0, 0)


def test_test_py_samples_writes_maps_correlation_and_calibration(spread_checkpoint, tmp_path):
    data = tmp_path / "imgs"
    data.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            data / f"{name}.png"
        )
    out = tmp_path / "res"
    evaluate_cli.main(["--checkpoint", str(spread_checkpoint), "--datasets", str(data),
                       "--scales", "2", "--metrics", "psnr", "--samples", "3",
                       "--out-dir", str(out)])  # fmt: skip
    scale_dir = out / "imgs" / "x2"
    with (scale_dir / "per_image.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["method"] == "LDCSR"]
    values = [float(r["unc_err_spearman"]) for r in rows]
    assert len(values) == 2 and all(-1 <= v <= 1 for v in values)
    for name in ("a", "b"):
        assert read_band(scale_dir / "uncertainty" / f"{name}_uncertainty.tif").shape == (32, 32)
        assert (scale_dir / "uncertainty" / f"{name}_uncertainty.png").is_file()
    assert (scale_dir / "calibration.png").is_file() and (scale_dir / "calibration.csv").is_file()
    with (out / "summary.csv").open() as f:
        summary = {r["method"]: r for r in csv.DictReader(f)}
    assert float(summary["LDCSR"]["unc_err_spearman"]) == pytest.approx(np.mean(values), abs=1e-6)
    assert summary["Bicubic"]["unc_err_spearman"] == ""
