"""super_resolve.py: inputs (files, folders, globs), formats and bit depths, sizes, tiling flags,
no silent overwrite, per-file failures and clear errors for bad arguments."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image
from rasterio.transform import from_origin

import super_resolve
from models import load_sr_model
from scenes.scene_io import read_scene
from utils.image_io import load_image, to_tensor01

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def images(tmp_path):
    """A folder with RGB, 16-bit grey, RGBA and single-band 8-bit images, plus a corrupt one."""
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / "rgb.png")
    Image.fromarray(rng.integers(0, 65536, (16, 18), dtype=np.uint16)).save(folder / "g16.png")
    rgba = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(folder / "sub" / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (16, 20), dtype=np.uint8)).save(folder / "grey.jpg")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def run(*args: str) -> int:
    return super_resolve.main([str(a) for a in args])


def test_folder_keeps_layout_bands_and_bit_depth_and_reports_failures(
    tiny_sr_checkpoint, images, tmp_path, caplog
):
    out = tmp_path / "out"
    assert (
        run(images, "--checkpoint", tiny_sr_checkpoint, "-o", out, "--scale", "2", "--no-progress")
        == 1
    )
    assert "broken.png" in caplog.text  # the failure is reported, the others are written
    rgb, g16 = Image.open(out / "rgb.png"), Image.open(out / "g16.png")
    assert rgb.mode == "RGB" and rgb.size == (48, 40)
    assert g16.mode.startswith("I;16") and g16.size == (36, 32)
    assert np.asarray(g16).max() > 255  # 16-bit values, not an 8-bit image
    rgba = Image.open(out / "sub" / "rgba.png")
    assert rgba.mode == "RGBA" and rgba.size == (32, 32)
    grey = Image.open(out / "grey.png")  # JPEG in, lossless PNG out
    assert grey.mode == "L" and grey.size == (40, 32)


def test_seeded_output_and_sizes(tiny_sr_checkpoint, images, tmp_path):
    src = images / "rgb.png"
    a, b = tmp_path / "a", tmp_path / "b"
    assert (
        run(src, "--checkpoint", tiny_sr_checkpoint, "-o", a, "--scale", "2.5x1.5", "--no-progress")
        == 0
    )
    assert Image.open(a / "rgb.png").size == (36, 50)  # (W, H) = (round(1.5*24), round(2.5*20))
    assert (
        run(src, "--checkpoint", tiny_sr_checkpoint, "-o", b, "--size", "50x36", "--no-progress")
        == 0
    )
    same = np.asarray(Image.open(a / "rgb.png")) == np.asarray(Image.open(b / "rgb.png"))
    assert same.all()  # same size and seed -> same pixels
    tiled = tmp_path / "tiled"
    args = ["--size", "50x36", "--tile", "16", "--no-progress"]
    assert run(src, "--checkpoint", tiny_sr_checkpoint, "-o", tiled, *args) == 0
    diff = np.abs(
        np.asarray(Image.open(tiled / "rgb.png"), dtype=int) - np.asarray(Image.open(b / "rgb.png"))
    )
    assert diff.max() <= 1  # tiled = untiled to 1 level (docs/results.md)


def test_temperature_flag_sets_the_models_sampling_temperature(
    tiny_sr_checkpoint, images, tmp_path
):
    """`--temperature 0.5` gives the Python API's output with `sampling_temperature = 0.5`,
    which differs from the checkpoint's own (1)."""
    src, out, default = images / "rgb.png", tmp_path / "half", tmp_path / "default"
    common = ["--checkpoint", tiny_sr_checkpoint, "--scale", "2", "--seed", "3", "--no-progress"]
    assert run(src, *common, "-o", out, "--temperature", "0.5") == 0
    assert run(src, *common, "-o", default) == 0
    model = load_sr_model(tiny_sr_checkpoint)
    model.sampling_temperature = 0.5
    lr = to_tensor01(load_image(src)).unsqueeze(0)
    sr = model.super_resolve(lr, (40, 48), generator=torch.Generator().manual_seed(3))
    expected = (sr[0].permute(1, 2, 0) * 255).round().byte().numpy()
    got = np.asarray(Image.open(out / "rgb.png"), dtype=int)
    assert np.abs(got - expected).max() <= 1
    assert (got != np.asarray(Image.open(default / "rgb.png"))).any()


def test_never_overwrites_without_flag(tiny_sr_checkpoint, images, tmp_path):
    src, out = images / "rgb.png", tmp_path / "out"
    out.mkdir()
    (out / "rgb.png").write_bytes(b"keep me")
    assert run(src, "--checkpoint", tiny_sr_checkpoint, "-o", out, "--no-progress") == 1
    assert (out / "rgb.png").read_bytes() == b"keep me"
    assert (
        run(src, "--checkpoint", tiny_sr_checkpoint, "-o", out, "--overwrite", "--no-progress") == 0
    )
    assert Image.open(out / "rgb.png").size == (96, 80)  # default x4


@pytest.mark.parametrize(
    "args,message",
    [
        (["--scale", "0"], "positive"),
        (["--scale", "-2"], "positive"),
        (["--scale", "2x"], "positive"),
        (["--scale", "2.5,1.5"], "ambiguous: write 2.5x1.5"),
        (["--bands", "3,2"], "three 1-based band numbers"),
        (["--value-range", "5,1"], "MIN < MAX"),
        (["--suffix", "a/b"], "path separator"),
        (["--size", "3x5"], ">= 8"),
        (["--tile", "8"], "below the minimum"),
        (["--tile", "-1"], "below the minimum"),
        (["--temperature", "1.5"], "--temperature must be in [0, 1]"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    tiny_sr_checkpoint, images, tmp_path, capsys, args, message
):
    code = run(images / "rgb.png", "--checkpoint", tiny_sr_checkpoint, "-o", tmp_path / "o", *args)
    assert code == 2 and message in capsys.readouterr().err


def test_missing_input_unwritable_output_and_bad_checkpoint(
    tiny_sr_checkpoint, images, tmp_path, capsys
):
    assert (
        run(tmp_path / "nothing*.png", "--checkpoint", tiny_sr_checkpoint, "-o", tmp_path / "o")
        == 2
    )
    assert "no image matches" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run(images / "rgb.png", "--checkpoint", tiny_sr_checkpoint, "-o", blocker / "out") == 2
    assert "not writable" in capsys.readouterr().err
    assert (
        run(images / "rgb.png", "--checkpoint", tmp_path / "missing.ckpt", "-o", tmp_path / "o")
        == 2
    )
    assert "checkpoint not found" in capsys.readouterr().err


def test_unsupported_and_unreadable_files_fail_alone(tiny_sr_checkpoint, images, tmp_path, caplog):
    float_tif = images / "float.tif"
    Image.fromarray(np.ones((16, 16), dtype=np.float32)).save(float_tif)
    out = tmp_path / "out"
    code = run(float_tif, images / "broken.png", images / "rgb.png", "-o", out,
               "--checkpoint", tiny_sr_checkpoint, "--no-progress")  # fmt: skip
    assert code == 1 and (out / "rgb.png").exists()
    assert "has 1 band" in caplog.text and "cannot read image" in caplog.text


def test_scene_reader_scales_16_bit_to_unit_range(images):
    scene = read_scene(images / "g16.png")
    raw = np.asarray(Image.open(images / "g16.png"), dtype=np.float32) / 65535
    assert scene.bits == 16 and scene.bands == 1
    assert (
        torch.allclose(scene.rgb[0], torch.from_numpy(raw)) and (scene.rgb[0] == scene.rgb[2]).all()
    )


def test_geotiff_keeps_georeference_with_pixel_size_divided_by_the_scale(
    tiny_sr_checkpoint, tmp_path
):
    src = tmp_path / "geo.tif"
    profile = dict(driver="GTiff", width=20, height=16, count=4, dtype="uint16", crs="EPSG:32633",
                   transform=from_origin(500000, 4200000, 10.0, 10.0))  # fmt: skip
    with rasterio.open(src, "w", **profile) as dst:
        dst.write(np.random.default_rng(0).integers(0, 4000, (4, 16, 20), dtype=np.uint16))
    args = ["--checkpoint", tiny_sr_checkpoint, "--scale", "2", "--no-progress"]
    assert run(src, "-o", tmp_path / "out", *args) == 0
    assert run(src, "-o", tmp_path / "cog", *args, "--bands", "3,2,1", "--cog") == 0
    for folder in ("out", "cog"):
        with rasterio.open(tmp_path / folder / "geo.tif") as out:
            assert (out.width, out.height, out.count, out.dtypes[0]) == (40, 32, 4, "uint16")
            assert out.crs.to_epsg() == 32633 and out.transform.a == pytest.approx(5.0)
            assert (out.transform.c, out.transform.f) == (500000, 4200000)
            assert out.tags()["LDCSR_MODEL_BANDS"] == ("1,2,3" if folder == "out" else "3,2,1")
    with rasterio.open(tmp_path / "cog" / "geo.tif") as out:
        assert out.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"


def test_suffix_skip_existing_and_output_clashes(tiny_sr_checkpoint, images, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out, args = tmp_path / "out", ["--checkpoint", tiny_sr_checkpoint, "--no-progress"]
    assert run(images / "rgb.png", "-o", out, "--suffix", "_x2", "--scale", "2", *args) == 0
    assert Image.open(out / "rgb_x2.png").size == (48, 40) and not (out / "rgb.png").exists()
    (out / "grey_x2.png").write_bytes(b"keep me")  # an output of an earlier, interrupted batch
    code = run(images / "rgb.png", images / "grey.jpg", "-o", out, "--suffix", "_x2",
               "--skip-existing", *args)  # fmt: skip
    assert code == 0 and (out / "grey_x2.png").read_bytes() == b"keep me"
    assert Image.open(out / "rgb_x2.png").size == (48, 40)  # skipped too: not rewritten at x4
    assert "2 of 2 outputs exist already" in caplog.text
    (images / "rgb.jpg").write_bytes((images / "grey.jpg").read_bytes())
    code = run(images / "rgb.png", images / "rgb.jpg", "-o", tmp_path / "clash", *args)
    assert code == 2 and not (tmp_path / "clash" / "rgb.png").exists()
