"""README promises as a user meets them, each asserted so that it fails when the promise breaks:
the suite runs offline; a GeoTIFF gives the pixels of the same image as PNG (streamed blocks on
the scene's output grid, at any scale); the CLI writes the Python API's pixels (8 bit, 16 bit,
alpha); scenes too large for --max-memory are tiled automatically; streaming memory does not grow
with the scene; a seed gives the same output on CPU and GPU (marked gpu: skipped without CUDA)."""

from __future__ import annotations

import socket
import tracemalloc
import urllib.request

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image

import super_resolve
from data.synthetic import generate_scene
from models import load_sr_model
from models.pipeline import Pipeline
from scenes.scene_io import read_scene, super_resolve_raster
from utils.resample import resize_crop

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(*args) -> int:
    return super_resolve.main([str(a) for a in (*args, "--no-progress")])


def scene_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """[h, w, 3] uint8 generated aerial scene (every clone has it)."""
    return np.asarray(generate_scene((h, w), seed=seed))


def write_geotiff(path, rgb: np.ndarray) -> None:
    """[h, w, 3] uint8 -> a 3-band GeoTIFF without georeferencing (the pixels are what count)."""
    h, w = rgb.shape[:2]
    with rasterio.open(path, "w", driver="GTiff", count=3, height=h, width=w, dtype="uint8") as dst:
        dst.write(np.moveaxis(rgb, -1, 0))


# ------------------------------------------------------------------------------------- offline
def test_the_suite_is_offline():
    """conftest's autouse `no_network`: nothing in a test reaches beyond the loopback."""
    # conftest's NetworkBlockedError (a ConnectionError; pytest imports conftest under its own
    # module name, so the class is matched by its base and message)
    with pytest.raises(ConnectionError, match="the test suite is offline"):
        socket.create_connection(("203.0.113.7", 443), timeout=1)
    with pytest.raises(OSError, match="offline"):  # a weight download (urllib's URLError)
        urllib.request.urlopen("https://download.pytorch.org/models/alexnet.pth", timeout=1)
    with socket.socket() as server:  # loopback stays usable (DDP, local servers)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass


# ------------------------------------------------------------------------ GeoTIFF = PNG pixels
def png_and_geotiff(checkpoint, tmp_path, rgb: np.ndarray, *args) -> tuple[np.ndarray, ...]:
    """super_resolve.py on `rgb` saved as PNG and as GeoTIFF -> the two outputs [H, W, 3]."""
    Image.fromarray(rgb).save(tmp_path / "scene.png")
    write_geotiff(tmp_path / "scene.tif", rgb)
    out = tmp_path / "out"
    for name in ("scene.png", "scene.tif"):
        assert cli(tmp_path / name, "--checkpoint", checkpoint, "-o", out, *args) == 0
    png = np.asarray(Image.open(out / "scene.png"), dtype=int)
    with rasterio.open(out / "scene.tif") as dst:
        return png, np.moveaxis(dst.read(), 0, -1).astype(int)


@pytest.mark.parametrize(
    "scale,max_memory", [("2", "2"), ("2.5", "2"), ("3.7", "2"), ("2.5x1.75", "2"), ("2.5", "1e-4")]
)
def test_geotiff_gives_the_pixels_of_the_same_png(tiny_sr_checkpoint, tmp_path, scale, max_memory):
    """super_resolve.py on the same pixels as PNG and as GeoTIFF, same seed: the same output to
    1 level at integer, non-integer and asymmetric scales, untiled or tiled (--max-memory 1e-4),
    so a user gets the same image whatever the file format."""
    png, tif = png_and_geotiff(tiny_sr_checkpoint, tmp_path, scene_rgb(80, 88), "--scale", scale,
                               "--seed", "3", "--max-memory", max_memory)  # fmt: skip
    assert png.shape == tif.shape and np.abs(png - tif).max() <= 1


@pytest.mark.parametrize("scale", ["2.5", "3.7", "2.5x1.75"])
def test_streamed_blocks_render_on_the_scene_grid(tiny_sr_checkpoint, tmp_path, monkeypatch, scale):
    """A GeoTIFF streamed in 3 x 3 blocks of 32 LR pixels (a scene over the block budget): each
    block renders the scene's output grid, so all but a few pixels agree with the PNG to 1 level;
    what remains is the diffusion noise, which each block draws itself (as much as two seeds
    differ: <= 2 levels, < 0.04 % of pixels over 1). A block grid off by a fraction of a pixel
    fails this."""

    def in_blocks(*args, **kwargs):
        return super_resolve_raster(*args, **{**kwargs, "block": 32, "overlap": 8})

    monkeypatch.setattr(super_resolve, "super_resolve_raster", in_blocks)
    png, tif = png_and_geotiff(tiny_sr_checkpoint, tmp_path, scene_rgb(80, 88), "--scale", scale,
                               "--seed", "3")  # fmt: skip
    diff = np.abs(png - tif)
    assert png.shape == tif.shape and diff.max() <= 2 and (diff > 1).mean() < 1e-3


# -------------------------------------------------------------------------- CLI = Python API
def api_output(checkpoint, src, out_size, seed: int) -> torch.Tensor:
    """[3, H, W] in [0, 1]: what `LDCSR.super_resolve` gives for the file `src`."""
    model = load_sr_model(checkpoint)
    lr = read_scene(src).rgb[None]
    return model.super_resolve(lr, out_size, generator=torch.Generator().manual_seed(seed))[0]


def nearest(mask: np.ndarray, size) -> np.ndarray:
    """The input pixel under each output pixel centre (how alpha is resized)."""
    rows = ((np.arange(size[0]) + 0.5) * mask.shape[0] / size[0]).astype(int)
    cols = ((np.arange(size[1]) + 0.5) * mask.shape[1] / size[1]).astype(int)
    return mask[rows][:, cols]


@pytest.mark.parametrize("kind", ["rgb8", "grey16", "rgba8"])
def test_cli_writes_the_python_apis_pixels(tiny_sr_checkpoint, tmp_path, kind):
    """The written PNG holds the API's output in the input's layout: 8-bit RGB as is, 16-bit
    grey as the channel mean x 65535, RGBA with the colour where alpha > 0 and the alpha
    resized nearest (swapped channels, a dropped bit depth or a shifted alpha fail)."""
    rgb = scene_rgb(36, 44, seed=1)
    src = tmp_path / f"{kind}.png"
    if kind == "rgb8":
        Image.fromarray(rgb).save(src)
    elif kind == "grey16":
        grey = rgb.mean(axis=-1) * 257 + np.linspace(0, 200, 44)  # uses the low byte too
        Image.fromarray(grey.astype(np.uint16)).save(src)
    else:
        alpha = np.full((36, 44), 255, np.uint8)
        alpha[5:20, 10:30] = 0
        alpha[25:, :] = 128
        Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(src)
    assert cli(src, "--checkpoint", tiny_sr_checkpoint, "-o", tmp_path / "out", "--scale", "2.5",
               "--seed", "5") == 0  # fmt: skip
    got = np.asarray(Image.open(tmp_path / "out" / src.name)).astype(int)
    sr = api_output(tiny_sr_checkpoint, src, (90, 110), 5).clamp(0, 1)
    if kind == "grey16":
        expected = (sr.mean(dim=0) * 65535).round().numpy()
        assert Image.open(tmp_path / "out" / src.name).mode.startswith("I;16")
        assert np.abs(got - expected).max() <= 1
        return
    expected = (sr * 255).round().permute(1, 2, 0).numpy()
    if kind == "rgb8":
        assert got.shape == (90, 110, 3) and np.abs(got - expected).max() <= 1
        return
    alpha_out = nearest(alpha, (90, 110))
    assert got.shape == (90, 110, 4) and np.array_equal(got[..., 3], alpha_out)
    seen = alpha_out > 0
    assert np.abs(got[..., :3][seen] - expected[seen]).max() <= 1


# ----------------------------------------------------------------------- automatic tiling
def test_max_memory_tiles_the_scene_through_the_cli(tiny_sr_checkpoint, tmp_path, monkeypatch):
    """A scene over --max-memory is super-resolved in tiles (not untiled) and gives the
    untiled output to 1 level (the tolerance docs/results.md states)."""
    src = tmp_path / "scene.png"
    Image.fromarray(scene_rgb(40, 96, seed=2)).save(src)  # x8; over 0.001 GB every stage streams
    calls = []
    tiled_run = Pipeline.super_resolve

    def spy(self, *args, **kwargs):
        calls.append(self.tile)
        return tiled_run(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "super_resolve", spy)
    common = ("--checkpoint", tiny_sr_checkpoint, "--scale", "8", "--seed", "1")
    assert cli(src, *common, "-o", tmp_path / "untiled", "--max-memory", "100") == 0
    assert calls == [0]  # untiled: the same pipeline, one tile per stage
    assert cli(src, *common, "-o", tmp_path / "tiled", "--max-memory", "0.001") == 0
    assert calls == [0, None]  # automatic: render tiles sized from the budget, stages streamed
    untiled, tiled = (
        np.asarray(Image.open(tmp_path / run / "scene.png"), dtype=int)
        for run in ("untiled", "tiled")
    )
    assert np.abs(untiled - tiled).max() <= 1


# ---------------------------------------------------------------------- streaming memory
def bicubic(lr, window) -> torch.Tensor:
    out = resize_crop(lr, window.out_size, window.rows, window.cols, "bicubic", window.offset,
                      window.lr_size)  # fmt: skip
    return out.clamp(0, 1)


def streamed_peak(tmp_path, rows: int) -> int:
    """Peak Python-heap bytes (numpy arrays: blocks, blend strip, carries) of streaming a
    `rows` x 96 scene at x2 in blocks of 32."""
    src = tmp_path / f"in{rows}.tif"
    rgb = np.tile(scene_rgb(64, 96, seed=4), (rows // 64, 1, 1))
    write_geotiff(src, rgb)
    tracemalloc.start()
    try:
        super_resolve_raster(src, tmp_path / f"out{rows}.tif", bicubic, (2 * rows, 192),
                             block=32, overlap=8)  # fmt: skip
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streaming_memory_does_not_grow_with_the_scene(tmp_path):
    """An 8x taller scene streams with the same peak memory (a block, its carry and the blend
    strip): keeping blocks or the output in memory fails this."""
    small, large = streamed_peak(tmp_path, 64), streamed_peak(tmp_path, 512)
    out_bytes = 2 * 512 * 192 * 3 * 4  # the large scene's output as float32
    assert large < 1.25 * small and large - small < 0.1 * out_bytes


def test_streamed_blocks_read_only_their_block(tmp_path, monkeypatch):
    """What each block reads and computes is bounded by the block size, not the scene."""
    seen = []

    def record(lr, window):
        seen.append((tuple(lr.shape[-2:]), window.size))
        return bicubic(lr, window)

    src = tmp_path / "in.tif"
    write_geotiff(src, np.tile(scene_rgb(64, 96, seed=4), (4, 2, 1)))  # 256 x 192
    super_resolve_raster(src, tmp_path / "out.tif", record, (640, 480), block=32, overlap=8)
    assert len(seen) == 8 * 6
    assert max(max(lr) for lr, _ in seen) <= 32 + 2 * 8
    assert max(max(out) for _, out in seen) <= round(2.5 * (32 + 8)) + 1


# ------------------------------------------------------------------------------- CPU = GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_seed_gives_the_same_output_on_cpu_and_gpu(tiny_sr_checkpoint):
    """--seed draws the noise on the CPU, so CPU and GPU runs agree to float rounding."""
    lr = torch.from_numpy(scene_rgb(40, 48)).permute(2, 0, 1)[None].float() / 255
    outs = []
    for device in ("cpu", "cuda"):
        model = load_sr_model(tiny_sr_checkpoint, map_location=device)
        gen = torch.Generator().manual_seed(9)
        outs.append(model.super_resolve(lr.to(device), (100, 120), generator=gen).cpu())
    assert ((outs[0] - outs[1]).abs() * 255).max() <= 1
