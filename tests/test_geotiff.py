"""GeoTIFF scenes (scenes/raster.py, scenes/scene_io.py): georeferencing, bands, radiometry, nodata,
streaming, COG and clear errors, on rasters the tests write, with a bicubic `sr_fn`."""

from __future__ import annotations

import os

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from PIL import Image
from rasterio.control import GroundControlPoint
from rasterio.transform import from_origin

import scenes.scene_io as scene_io
from data.synthetic import generate_scene
from scenes.raster import parse_bands, parse_value_range, raster_size
from scenes.scene_io import BlockWindow, read_scene, super_resolve_raster, write_scene
from tests.conftest import SHARED
from utils.atomic import RasterWriteError
from utils.image_io import ImageReadError
from utils.resample import resize_crop

ORIGIN = from_origin(500000.0, 4200000.0, 10.0, 10.0)  # 10 m pixels, UTM 33N


def upsample(x: torch.Tensor, out_size) -> torch.Tensor:
    return F.interpolate(x, size=out_size, mode="bicubic", align_corners=False).clamp(0, 1)


def bicubic(lr: torch.Tensor, window: BlockWindow) -> torch.Tensor:
    """The `sr_fn` of a bicubic model: the block's window of the scene's bicubic output."""
    out = resize_crop(lr, window.out_size, window.rows, window.cols, "bicubic", window.offset,
                      window.lr_size)  # fmt: skip
    return out.clamp(0, 1)


def write_tif(path, arr: np.ndarray, **profile) -> None:
    """[C, h, w] array -> GeoTIFF (UTM 33N, 10 m) unless `profile` overrides it."""
    profile = dict(driver="GTiff", count=arr.shape[0], height=arr.shape[1], width=arr.shape[2],
                   dtype=arr.dtype.name, crs="EPSG:32633", transform=ORIGIN) | profile  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(arr)


def smooth(shape, lo, hi, seed=0) -> np.ndarray:
    """[C, h, w] smooth random field in [lo, hi] (uint16)."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((1, shape[0], shape[1] // 8, shape[2] // 8)))
    field = F.interpolate(coarse, size=shape[1:], mode="bilinear", align_corners=False)[0]
    return (lo + field.numpy() * (hi - lo)).astype(np.uint16)


@pytest.fixture
def scene4(tmp_path):
    """A 4-band (R, G, B, NIR) 12-bit uint16 GeoTIFF, 60x76, with tags and descriptions."""
    path = tmp_path / "scene.tif"
    write_tif(path, smooth((4, 60, 76), 100, 4000))
    with rasterio.open(path, "r+") as dst:
        dst.update_tags(SENSOR="test")
        dst.update_tags(4, WAVELENGTH="842")
        for band, name in enumerate(["red", "green", "blue", "nir"], 1):
            dst.set_band_description(band, name)
    return path


def test_georeference_bands_dtype_and_tags_are_kept(scene4, tmp_path):
    out = tmp_path / "out.tif"
    super_resolve_raster(scene4, out, bicubic, (120, 228))  # x2 in height, x3 in width
    with rasterio.open(out) as dst:
        assert (dst.count, dst.height, dst.width, dst.dtypes) == (4, 120, 228, ("uint16",) * 4)
        assert dst.crs.to_epsg() == 32633
        assert dst.transform.a == pytest.approx(10 / 3) and dst.transform.e == pytest.approx(-5)
        assert (dst.transform.c, dst.transform.f) == (500000.0, 4200000.0)
        assert dst.descriptions == ("red", "green", "blue", "nir")
        assert dst.tags()["SENSOR"] == "test" and dst.tags(4)["WAVELENGTH"] == "842"
        assert dst.tags()["LDCSR_STRETCH"] == "percentile 2-98"
        assert dst.profile["tiled"] and dst.block_shapes[0] == (256, 256)
        assert dst.compression.name == "deflate" and dst.overviews(1) == []


def test_model_bands_order_and_other_bands(tmp_path):
    """--bands 3,2,1: model channel c is band bands[c]; band 4 is bicubic in its own units."""
    src, out = tmp_path / "in.tif", tmp_path / "out.tif"
    arr = smooth((4, 40, 48), 0, 255).astype(np.uint8)
    write_tif(src, arr, photometric="minisblack")  # GDAL's default would make band 4 an alpha

    def darken_red(lr, window):  # channel 0 (R) -> 0: only band 3 may change
        sr = bicubic(lr, window)
        return torch.cat([torch.zeros_like(sr[:, :1]), sr[:, 1:]], dim=1)

    super_resolve_raster(src, out, darken_red, (80, 96), bands=(3, 2, 1))
    expected = upsample(torch.from_numpy(arr.astype(np.float32))[None] / 255, (80, 96))[0] * 255
    with rasterio.open(out) as dst:
        got = dst.read().astype(float)
        assert dst.tags()["LDCSR_MODEL_BANDS"] == "3,2,1" and dst.tags(3)["LDCSR_STRETCH_MIN"]
    assert got[2].max() == 0  # band 3 fed channel R
    for band in (0, 1):
        assert np.abs(got[band] - expected[band].round().numpy()).max() <= 1
    nir = F.interpolate(torch.from_numpy(arr[3:].astype(np.float32))[None], (80, 96),
                        mode="bicubic", align_corners=False)[0, 0]  # fmt: skip
    assert np.abs(got[3] - nir.clamp(0, 255).round().numpy()).max() <= 1


def test_16_bit_stretch_is_per_scene_recorded_and_inverted(tmp_path):
    """Left half dark, right half bright: one stretch for the scene, not per block."""
    src = tmp_path / "in.tif"
    arr = smooth((3, 64, 128), 200, 1200)
    arr[:, :, 64:] += 2500  # 12-bit range, far below 65535
    write_tif(src, arr)
    seen = []

    def record(lr, window):
        seen.append(float(lr.median()))
        return bicubic(lr, window)

    super_resolve_raster(src, tmp_path / "out.tif", record, (128, 256), block=64, overlap=16)
    assert len(seen) == 2 and seen[0] < 0.3 and seen[1] > 0.7  # left block dark, right bright
    lo, hi = np.percentile(arr[0].astype(float), [2, 98])
    with rasterio.open(tmp_path / "out.tif") as dst:
        tags, out = dst.tags(1), dst.read().astype(float)
    assert float(tags["LDCSR_STRETCH_MIN"]) == pytest.approx(lo, rel=1e-5)
    assert float(tags["LDCSR_STRETCH_MAX"]) == pytest.approx(hi, rel=1e-5)
    assert out.mean() == pytest.approx(arr.mean(), rel=0.02)  # back in the input's units
    fixed = tmp_path / "fixed.tif"
    super_resolve_raster(src, fixed, bicubic, (128, 256), value_range=(0, 4095))
    with rasterio.open(fixed) as dst:
        assert dst.tags()["LDCSR_STRETCH"] == "value-range" and dst.tags(2)["LDCSR_STRETCH_MAX"]
        got = dst.read().astype(float)
    raw = torch.from_numpy(arr.astype(np.float32))[None]
    expected = F.interpolate(raw, (128, 256), mode="bicubic", align_corners=False)[0].numpy()
    assert np.abs(got - expected.clip(0, 4095).round()).max() <= 1  # linear map, no clipping


def test_nodata_is_excluded_from_statistics_and_kept(tmp_path):
    src, out = tmp_path / "in.tif", tmp_path / "out.tif"
    arr = smooth((4, 40, 50), 300, 3000)
    arr[:, 5:15, 10:30] = 65535  # nodata: would dominate a 98th percentile
    arr[3, 30:35, 0:5] = 65535  # a hole in band 4 only
    write_tif(src, arr, nodata=65535)
    super_resolve_raster(src, out, bicubic, (80, 100), block=24, overlap=8)
    with rasterio.open(out) as dst:
        assert dst.nodata == 65535 and float(dst.tags(1)["LDCSR_STRETCH_MAX"]) < 3001
        got = dst.read()
    expected = np.repeat(np.repeat(arr == 65535, 2, axis=1), 2, axis=2)  # nearest, x2
    assert np.array_equal(got == 65535, expected)
    assert got[~expected].max() <= 3000 + 200  # bicubic overshoot, no nodata bleeding in


def test_internal_mask_is_kept(tmp_path):
    src, out = tmp_path / "in.tif", tmp_path / "out.tif"
    write_tif(src, smooth((3, 32, 32), 0, 255).astype(np.uint8))
    with rasterio.open(src, "r+") as dst:
        mask = np.ones((32, 32), bool)
        mask[:8] = False
        dst.write_mask(mask)
    super_resolve_raster(src, out, bicubic, (64, 64))
    with rasterio.open(out) as dst:
        assert np.array_equal(dst.dataset_mask() > 0, np.repeat(np.repeat(mask, 2, 0), 2, 1))


def holdout_crop() -> np.ndarray:
    """[h, w, 3] uint8: a crop of a real holdout image, or a generated scene without ../shared."""
    path = SHARED / "data" / "holdout" / "P0706.png"
    if path.is_file():
        return np.asarray(Image.open(path).convert("RGB"))[300:396, 400:520].copy()
    return np.asarray(generate_scene((96, 120), seed=0))


def test_8_bit_geotiff_gives_the_png_pixels(tmp_path):
    rgb = holdout_crop()
    png, tif = tmp_path / "in.png", tmp_path / "in.tif"
    Image.fromarray(rgb).save(png)
    write_tif(tif, np.moveaxis(rgb, -1, 0).copy())
    scene = read_scene(png)
    write_scene(tmp_path / "out.png", scene, upsample(scene.rgb[None], (192, 240))[0])
    super_resolve_raster(tif, tmp_path / "out.tif", bicubic, (192, 240), block=48, overlap=16)
    from_png = np.asarray(Image.open(tmp_path / "out.png"), dtype=int)
    with rasterio.open(tmp_path / "out.tif") as dst:
        from_tif = np.moveaxis(dst.read(), 0, -1).astype(int)
        assert dst.tags()["LDCSR_STRETCH"] == "identity"
    assert np.abs(from_png - from_tif).max() <= 1


# x2 / x3, x2.5, x3.7, x2.5 / x1.75 (60 x 76 LR)
SCALES = [(120, 228), (150, 190), (222, 281), (150, 133)]


@pytest.mark.parametrize("out_size", SCALES)
def test_streaming_equals_one_block(scene4, tmp_path, out_size):
    """Blocks compute the scene's output grid: streamed = one block = the scene's bicubic, to
    rounding, at any scale (a block grid off by a fraction of a pixel breaks this)."""
    one, blocks = tmp_path / "one.tif", tmp_path / "blocks.tif"
    super_resolve_raster(scene4, one, bicubic, out_size, block=4096)
    super_resolve_raster(scene4, blocks, bicubic, out_size, block=20, overlap=8)
    with rasterio.open(scene4) as src, rasterio.open(one) as a, rasterio.open(blocks) as b:
        raw = torch.from_numpy(src.read(4).astype(np.float32))[None, None]
        nir = F.interpolate(raw, size=out_size, mode="bicubic", align_corners=False)[0, 0]
        assert np.abs(a.read().astype(int) - b.read().astype(int)).max() <= 1
        assert np.abs(b.read(4) - nir.clamp(0, 65535).round().numpy()).max() <= 1
    assert blocks.stat().st_size < 1.1 * one.stat().st_size  # no tile written twice


def test_seams_are_cross_faded(tmp_path):
    """Each block offset by its own constant: the output ramps between them, no step."""
    src = tmp_path / "in.tif"
    write_tif(src, np.full((3, 64, 64), 100, np.uint8))
    calls = []

    def offset(lr, window):
        calls.append(1)
        return (bicubic(lr, window) + 0.1 * (len(calls) % 2)).clamp(0, 1)

    super_resolve_raster(src, tmp_path / "out.tif", offset, (64, 128), block=32, overlap=16)
    with rasterio.open(tmp_path / "out.tif") as dst:
        row = dst.read(1)[0].astype(int)
    assert row[0] == 126 and row[-1] == 100  # block 1: +25.5 levels, block 2: +0
    assert np.abs(np.diff(row)).max() <= 2  # ramp over 16 LR = 32 output pixels


def test_cog_has_overviews_and_the_metadata(scene4, tmp_path):
    out = tmp_path / "out.tif"
    super_resolve_raster(scene4, out, bicubic, (960, 1216), cog=True, block=32, overlap=8)
    with rasterio.open(out) as dst:
        assert dst.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert dst.overviews(1) == [2, 4] and dst.block_shapes[0] == (512, 512)
        assert dst.crs.to_epsg() == 32633 and dst.descriptions[3] == "nir"
        assert dst.tags(1)["LDCSR_STRETCH_MIN"]
    assert sorted(os.listdir(tmp_path)) == ["out.tif", "scene.tif"]  # no temporary file left


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_gcps_are_scaled(tmp_path):
    src = tmp_path / "in.tif"
    gcps = [GroundControlPoint(row=10.0, col=20.0, x=15.0, y=45.0, z=0.0)]
    arr = smooth((3, 32, 40), 0, 255).astype(np.uint8)
    with rasterio.open(
        src, "w", driver="GTiff", count=3, height=32, width=40, dtype="uint8"
    ) as dst:
        dst.write(arr)
        dst.gcps = (gcps, rasterio.crs.CRS.from_epsg(4326))
    super_resolve_raster(src, tmp_path / "out.tif", bicubic, (64, 120))
    with rasterio.open(tmp_path / "out.tif") as dst:
        (gcp,), crs = dst.gcps
    assert (gcp.row, gcp.col, gcp.x, gcp.y) == (20.0, 60.0, 15.0, 45.0) and crs.to_epsg() == 4326


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_plain_tiff_without_georeference(tmp_path):
    src = tmp_path / "in.tif"
    Image.fromarray(smooth((3, 24, 32), 0, 255).astype(np.uint8).transpose(1, 2, 0)).save(src)
    super_resolve_raster(src, tmp_path / "out.tif", bicubic, (48, 64))
    with rasterio.open(tmp_path / "out.tif") as dst:
        assert dst.crs is None and dst.transform.is_identity and dst.count == 3


@pytest.mark.parametrize(
    "bands,count,message",
    [((1, 2, 5), 4, r"has 4 band\(s\) \(numbered 1..4\); --bands 1,2,5 is out of range"),
     (None, 2, r"has 2 band\(s\); the model needs three: pass --bands 1")],
)  # fmt: skip
def test_bad_bands_name_the_file_and_the_fix(tmp_path, bands, count, message):
    src = tmp_path / "in.tif"
    write_tif(src, np.zeros((count, 16, 16), np.uint8))
    with pytest.raises(ImageReadError, match=message) as err:
        super_resolve_raster(src, tmp_path / "out.tif", bicubic, (32, 32), bands=bands)
    assert str(src) in str(err.value) and not (tmp_path / "out.tif").exists()


def test_grey_band_feeds_all_three_channels(tmp_path):
    src = tmp_path / "in.tif"
    write_tif(src, smooth((1, 16, 16), 0, 1000))
    super_resolve_raster(src, tmp_path / "out.tif", bicubic, (32, 32), bands=parse_bands("1"))
    with rasterio.open(tmp_path / "out.tif") as dst:
        assert dst.count == 1 and dst.tags()["LDCSR_MODEL_BANDS"] == "1,1,1"


def test_non_raster_and_non_tiff_output_are_refused(scene4, tmp_path):
    assert raster_size(scene4) == (60, 76)
    fake = tmp_path / "fake.tif"
    fake.write_text("not a raster")
    with pytest.raises(ImageReadError, match="fake.tif as a raster"):
        raster_size(fake)
    with pytest.raises(ImageReadError, match="fake.tif as a raster.*gdal_translate"):
        super_resolve_raster(fake, tmp_path / "out.tif", bicubic, (32, 32))
    with pytest.raises(ValueError, match="written as .tif to keep their georeferencing"):
        super_resolve_raster(scene4, tmp_path / "out.png", bicubic, (120, 152))
    with pytest.raises(ImageReadError, match="TIFFs go through super_resolve_raster"):
        read_scene(scene4)
    png = tmp_path / "geo.png"
    Image.new("RGB", (8, 8)).save(png)
    (tmp_path / "geo.pgw").write_text("10\n0\n0\n-10\n500000\n4200000\n")
    with pytest.raises(ImageReadError, match="georeferenced by geo.pgw.*gdal_translate"):
        read_scene(png)


def test_write_failure_leaves_no_partial_file(scene4, tmp_path, monkeypatch):
    def full_disk(dst, arr, window):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(scene_io, "write_window", full_disk)
    out = tmp_path / "out" / "sr.tif"
    out.parent.mkdir()
    with pytest.raises(RasterWriteError, match=r"cannot write .*sr.tif: .*No space left.*free"):
        super_resolve_raster(scene4, out, bicubic, (120, 152))
    assert list(out.parent.iterdir()) == []
    with pytest.raises(RasterWriteError, match="missing"):
        super_resolve_raster(scene4, tmp_path / "missing" / "sr.tif", bicubic, (120, 152))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_folder(scene4, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    with pytest.raises(RasterWriteError, match="writable"):
        super_resolve_raster(scene4, folder / "sr.tif", bicubic, (120, 152))


def test_flag_parsers():
    assert parse_bands("3,2,1") == (3, 2, 1) and parse_bands("2") == (2, 2, 2)
    assert parse_bands(None) is None and parse_value_range(None) is None
    assert parse_value_range("0,4095") == (0.0, 4095.0)
    for text in ("3,2", "0,1,2", "a,b,c", "1,2,-3", ""):
        with pytest.raises(ValueError, match="--bands"):
            parse_bands(text)
    for text in ("5,5", "9,1", "x", "1"):
        with pytest.raises(KeyError, match="--value-range"):
            parse_value_range(text, error=KeyError)
