"""super_resolve.py, test.py and the scene I/O against awkward inputs as a user meets them:
alpha and masks carried through (PNG and GeoTIFF), corrupt rasters, stops mid-write, tiny
images, impossible value ranges and output folders. Bad input gets a one-line message naming the
file and the fix; the other inputs are still processed; nothing partial is left."""

from __future__ import annotations

import csv
import importlib.util
import logging
import os
import signal

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image

import super_resolve
from models import load_sr_model
from scenes.scene_io import read_scene, super_resolve_raster, write_scene
from tests.conftest import ROOT
from tests.helpers import write_rgb
from tests.test_geotiff import bicubic
from utils.atomic import atomic_output

pytestmark = [
    pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning"),
    pytest.mark.usefixtures("one_thread"),
]
_spec = importlib.util.spec_from_file_location("ldcsr_test_cli_reliability", ROOT / "test.py")
test_cli = importlib.util.module_from_spec(_spec)  # `import test` could give the stdlib package
_spec.loader.exec_module(test_cli)


def _sr(*args) -> int:
    return super_resolve.main([str(a) for a in args] + ["--no-progress"])


def _nearest(mask: np.ndarray, factor: int) -> np.ndarray:
    return np.repeat(np.repeat(mask, factor, 0), factor, 1)


def _rgba_tif(path, dtype: str, size: int = 40):
    """RGBA GeoTIFF: left 15 columns transparent, a soft (half) alpha column, the rest opaque."""
    top = np.iinfo(dtype).max
    rgb = np.random.default_rng(0).integers(0, top // 2, (3, size, size)).astype(dtype)
    alpha = np.full((size, size), top, dtype)
    alpha[:, :15], alpha[:, 15] = 0, top // 2
    with rasterio.open(path, "w", driver="GTiff", height=size, width=size, count=4, dtype=dtype,
                       photometric="RGB", alpha="YES") as dst:  # fmt: skip
        dst.write(np.concatenate([rgb, alpha[None]]))
        dst.update_tags(1, STATISTICS_MEAN="5", STATISTICS_MAXIMUM="9", KEEP="me")
    return alpha


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_rgba_geotiff_keeps_its_mask(tmp_path, dtype):
    alpha = _rgba_tif(tmp_path / "in.tif", dtype)
    super_resolve_raster(
        tmp_path / "in.tif", tmp_path / "out.tif", bicubic, (80, 80), block=16, overlap=4
    )  # fmt: skip (several blocks: the mask crosses their seams)
    with rasterio.open(tmp_path / "out.tif") as out:
        arr, mask = out.read(), out.dataset_mask()
        assert out.colorinterp[3].name == "alpha" and out.dtypes[3] == dtype
        assert out.tags(1) == {**out.tags(1), "KEEP": "me"}
        assert not any(k.startswith("STATISTICS_") for k in out.tags(1))
    expected = _nearest(alpha, 2)
    assert np.array_equal(arr[3], expected), "alpha is resized as a mask (nearest)"
    assert np.array_equal(mask == 0, expected == 0), "transparent stays transparent"
    assert not arr[:3][:, expected == 0].any(), "no invented colour under transparent pixels"
    assert arr[:3][:, expected > 0].any()


def test_rgba_geotiff_through_the_command_line(tmp_path, tiny_sr_checkpoint):
    alpha = _rgba_tif(tmp_path / "in.tif", "uint16", size=24)
    assert _sr(tmp_path / "in.tif", "--checkpoint", tiny_sr_checkpoint, "-o", tmp_path / "out",
               "--scale", "2") == 0  # fmt: skip
    with rasterio.open(tmp_path / "out" / "in.tif") as out:
        assert np.array_equal(out.read(4), _nearest(alpha, 2))
        assert np.array_equal(out.dataset_mask() == 0, _nearest(alpha, 2) == 0)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P+tRNS"])
def test_png_alpha_round_trip_keeps_the_mask(tmp_path, tiny_sr_checkpoint, mode):
    rng = np.random.default_rng(1)
    alpha = np.full((16, 20), 255, np.uint8)
    alpha[:, :6], alpha[:, 6] = 0, 100
    if mode == "P+tRNS":  # palette index 0 transparent: alpha in a tRNS chunk
        index = rng.integers(1, 255, (16, 20), dtype=np.uint8)
        index[:, :7] = 0
        img = Image.fromarray(index, mode="P")
        img.putpalette(list(rng.integers(0, 256, 768, dtype=np.uint8)))
        img.info["transparency"] = 0
        alpha = np.where(index == 0, 0, 255).astype(np.uint8)
    else:
        colour = rng.integers(0, 256, (16, 20, 3 if mode == "RGBA" else 1), dtype=np.uint8)
        img = Image.fromarray(np.dstack([colour, alpha]).squeeze(), mode=mode)
    img.save(tmp_path / "in.png", transparency=0) if mode == "P+tRNS" else img.save(
        tmp_path / "in.png"
    )
    assert _sr(tmp_path / "in.png", "--checkpoint", tiny_sr_checkpoint, "-o", tmp_path / "out",
               "--scale", "2") == 0  # fmt: skip
    out = Image.open(tmp_path / "out" / "in.png")
    arr = np.asarray(out)
    assert out.mode == ("LA" if mode == "LA" else "RGBA")
    assert np.array_equal(arr[..., -1], _nearest(alpha, 2)), "alpha resized as a mask"
    assert not arr[..., :-1][_nearest(alpha, 2) == 0].any()


def test_scene_alpha_keeps_exactly_its_levels(tmp_path):
    """write_scene on its own: an alpha with soft edges gets no new (or out-of-range) levels."""
    rgba = np.random.default_rng(2).integers(0, 256, (9, 7, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "in.png")
    write_scene(tmp_path / "out.png", read_scene(tmp_path / "in.png"), torch.rand(3, 27, 21))
    written = np.asarray(Image.open(tmp_path / "out.png"))[..., 3]
    assert np.array_equal(written, _nearest(rgba[..., 3], 3))


@pytest.mark.parametrize("text", ["0,inf", "-inf,1", "nan,4", "0,1e999"])
def test_infinite_value_range_is_refused(tmp_path, capsys, text):
    write_rgb(tmp_path / "in.png", 16, 16)
    code = _sr(tmp_path / "in.png", "--checkpoint", "none.ckpt", "-o", tmp_path / "out",
               f"--value-range={text}")  # fmt: skip
    assert code == 2 and "finite MIN,MAX" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _corrupt_tif(path):
    profile = dict(driver="GTiff", height=300, width=300, count=3, dtype="uint16", tiled=True,
                   blockxsize=64, blockysize=64, compress="deflate")  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.random.default_rng(0).integers(0, 4000, (3, 300, 300)).astype("uint16"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_tiff_is_a_read_error_and_the_others_go_on(tmp_path, tiny_sr_checkpoint, caplog):
    _corrupt_tif(tmp_path / "cut.tif")
    write_rgb(tmp_path / "good.png", 16, 16)
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        code = _sr(tmp_path / "cut.tif", tmp_path / "good.png", "--checkpoint", tiny_sr_checkpoint,
                   "-o", out, "--scale", "2")  # fmt: skip
    assert code == 1
    assert "cut.tif" in caplog.text and "truncated or corrupt" in caplog.text
    assert "writable" not in caplog.text, "a read error reported as a write error"
    assert sorted(p.name for p in out.iterdir()) == ["good.png"], "partial files left"


def test_sigterm_while_a_tiff_is_written_leaves_nothing(tmp_path):
    _rgba_tif(tmp_path / "in.tif", "uint8")
    previous = signal.getsignal(signal.SIGTERM)

    def killed(lr, window):  # the batch system's time limit arrives mid-write
        os.kill(os.getpid(), signal.SIGTERM)
        return bicubic(lr, window)

    with pytest.raises(SystemExit) as stop:
        super_resolve_raster(tmp_path / "in.tif", tmp_path / "out.tif", killed, (80, 80))
    assert stop.value.code == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]
    assert signal.getsignal(signal.SIGTERM) == previous
    with pytest.raises(SystemExit):  # the PNGs of super_resolve.py, test.py, prepare_split.py
        with atomic_output(tmp_path / "x.png") as tmp:
            tmp.write_bytes(b"half a PNG")
            os.kill(os.getpid(), signal.SIGTERM)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]


def test_tiny_image_gets_the_same_minimum_everywhere(tmp_path, tiny_sr_checkpoint, caplog):
    """5x7 at x2 used to pass super_resolve.py's size check and die inside GroupNorm."""
    images = tmp_path / "images"
    write_rgb(images / "tiny.png", 5, 7)
    write_rgb(images / "ok.png", 12, 12)
    with caplog.at_level(logging.ERROR):
        code = _sr(
            images, "--checkpoint", tiny_sr_checkpoint, "-o", tmp_path / "sr", "--scale", "2"
        )
    assert code == 1 and "tiny.png" in caplog.text
    assert "10x14 is too small for this model: each side must be >= 16 px" in caplog.text
    assert [p.name for p in (tmp_path / "sr").iterdir()] == ["ok.png"]
    model = load_sr_model(tiny_sr_checkpoint)
    with pytest.raises(ValueError, match="each side must be >= 16 px"):
        model.super_resolve(torch.rand(1, 3, 5, 7), (10, 14))  # the Python API says the same
    rows = test_cli.main(["--checkpoint", str(tiny_sr_checkpoint), "--datasets", str(images),
                          "--datatype", "hr-input", "--scales", "2", "--metrics", "none",
                          "--out-dir", str(tmp_path / "test")])  # fmt: skip
    assert rows[0]["images"] == 1 and rows[0]["failed"] == 1
    failed = _failed_rows(tmp_path / "test" / "images" / "x2")
    assert "output side >= 16 px" in failed["tiny.png"]


def _failed_rows(scale_dir) -> dict[str, str]:
    with open(scale_dir / "per_image.csv") as f:
        return {r["file"]: r["status"] for r in csv.DictReader(f) if r["status"] != "ok"}


def test_failed_rows_name_the_input_file(tmp_path, tiny_sr_checkpoint):
    images = tmp_path / "images"
    write_rgb(images / "good.png", 32, 32)
    write_rgb(images / "truncated.jpg", 32, 32, seed=1)
    data = (images / "truncated.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(data[: len(data) // 2])
    test_cli.main(
        [
            "--checkpoint",
            str(tiny_sr_checkpoint),
            "--datasets",
            str(images),
            "--scales",
            "2",
            "--metrics",
            "psnr",
            "--out-dir",
            str(tmp_path / "out"),
        ]
    )
    failed = _failed_rows(tmp_path / "out" / "images" / "x2")
    assert list(failed) == ["truncated.jpg"] and "truncated" in failed["truncated.jpg"]


@pytest.mark.parametrize("where", ["under_a_file", "read_only"])
def test_unwritable_out_dir_is_refused_before_any_work(tmp_path, tiny_sr_checkpoint, where):
    write_rgb(tmp_path / "images" / "x.png", 32, 32)
    if where == "under_a_file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "results"
    else:
        out = _read_only_folder()
    argv = ["--checkpoint", str(tiny_sr_checkpoint), "--datasets", str(tmp_path / "images"),
            "--metrics", "psnr", "--out-dir", str(out)]  # fmt: skip
    with pytest.raises(test_cli.EvaluationError, match="--out-dir .*(is a file|not writable)"):
        test_cli.main(argv)
    code = _sr(tmp_path / "images", "--checkpoint", tiny_sr_checkpoint, "-o", out)
    assert code == 2


def _read_only_folder():
    path = ROOT.anchor + "sys/ldcsr-write-check"  # sysfs refuses new folders, even to root
    try:
        os.mkdir(path)
        os.rmdir(path)
        pytest.skip("/sys accepts new folders here")
    except OSError:
        return path


def test_output_that_would_replace_its_input(tmp_path, capsys):
    write_rgb(tmp_path / "x.png", 16, 16)
    code = _sr(tmp_path / "x.png", "--checkpoint", "none.ckpt", "-o", tmp_path, "--overwrite")
    assert code == 2 and "would replace the input itself" in capsys.readouterr().err


def test_empty_input_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = _sr(tmp_path / "empty", "--checkpoint", "none.ckpt", "-o", tmp_path / "out")
    assert code == 2 and "no images in folder" in capsys.readouterr().err


def test_nan_and_inf_in_a_float_raster_stay_where_they_were(tmp_path):
    """A float scene without a nodata value but with NaN (no data) and inf pixels: they neither
    poison the statistics nor spread into their neighbours, and come back nearest."""
    arr = np.random.default_rng(3).uniform(100, 900, (3, 32, 32)).astype(np.float32)
    arr[:, 4:10, 4:10], arr[1, 20, 20] = np.nan, np.inf
    with rasterio.open(tmp_path / "in.tif", "w", driver="GTiff", height=32, width=32, count=3,
                       dtype="float32") as dst:  # fmt: skip
        dst.write(arr)
    super_resolve_raster(tmp_path / "in.tif", tmp_path / "out.tif", bicubic, (64, 64), block=16,
                         overlap=4)  # fmt: skip
    with rasterio.open(tmp_path / "out.tif") as out:
        got = out.read()
        assert out.tags()["LDCSR_STRETCH"].startswith("percentile")
    expected = np.stack([_nearest(band, 2) for band in arr])
    odd = ~np.isfinite(expected)
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    assert np.array_equal(np.isinf(got), np.isinf(expected))
    assert np.isfinite(got[~odd]).all() and 50 < np.median(got[~odd]) < 950


@pytest.mark.parametrize(
    "kind, message",
    [
        ("folder", "is a folder; give the .ckpt file"),
        ("truncated", "is not a readable PyTorch checkpoint"),
        ("stage1_config", "is not a stage-2 config"),
        ("another_model", "is not a stage-2 (diffusion) checkpoint"),
        ("bare_state_dict", "stores none and no <run>/configs/*.yaml is beside it"),
    ],
)
def test_checkpoints_that_do_not_fit(tmp_path, tiny_sr_checkpoint, capsys, kind, message):
    write_rgb(tmp_path / "x.png", 16, 16)
    ckpt, extra = tmp_path / "model.ckpt", []
    if kind == "folder":
        ckpt = tiny_sr_checkpoint.parent.parent
    elif kind == "truncated":
        data = tiny_sr_checkpoint.read_bytes()
        ckpt.write_bytes(data[: len(data) // 2])
    elif kind == "stage1_config":
        ckpt, extra = tiny_sr_checkpoint, ["-c", str(ROOT / "configs/tiny/first_stage.yaml")]
    elif kind == "another_model":
        torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "epoch": 3}, ckpt)
    else:
        torch.save(torch.load(tiny_sr_checkpoint)["state_dict"], ckpt)
    code = _sr(tmp_path / "x.png", "--checkpoint", ckpt, *extra, "-o", tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_first_stage_loader_refuses_another_models_weights(tmp_path):
    from models import load_first_stage_model
    from utils.config import ConfigError

    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.ckpt")
    with pytest.raises(ConfigError, match="holds none of the stage-1 autoencoder's weights"):
        load_first_stage_model(tmp_path / "other.ckpt", ROOT / "configs/tiny/first_stage.yaml")


def test_huge_png_is_pointed_to_the_streamed_path(
    tmp_path, tiny_sr_checkpoint, monkeypatch, caplog
):
    write_rgb(tmp_path / "huge.png", 40, 40)
    write_rgb(tmp_path / "ok.png", 8, 8)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # 40x40 > 2 x the limit: a "bomb"
    with caplog.at_level(logging.ERROR):
        code = _sr(tmp_path / "huge.png", tmp_path / "ok.png", "--checkpoint", tiny_sr_checkpoint,
                   "-o", tmp_path / "out", "--scale", "2")  # fmt: skip
    assert code == 1 and "convert it to GeoTIFF (gdal_translate huge.png huge.tif)" in caplog.text
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["ok.png"]
