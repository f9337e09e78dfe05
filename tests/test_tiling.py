"""Tiled whole-scene inference: window geometry, exact crop resampling, networks streamed by
bands with exact statistics, the public path (`LDCSR.super_resolve`, tiled, streamed or not)
equal to the modules' plain forward and to the untiled run, on generated and holdout images."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from data.synthetic import generate_scene
from ldm.gap import GAPDecoder
from ldm.upsampler import ScaleAwareUpsampler
from models.geometry import Geometry
from models.memory import glibc_library, render_bytes, stage_bytes
from models.pipeline import RENDER_CONTEXT, Pipeline
from models.tiling import MIN_TILE
from tests.conftest import ROOT, shared_path, tiny_config
from tests.helpers import lively
from utils.config import instantiate_from_config
from utils.image_io import load_image, to_tensor01
from utils.resample import axis_map, resize_window

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return lively(instantiate_from_config(tiny_config(2).model))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / (a - b).pow(2).mean()))


# ------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic"])
@pytest.mark.parametrize("n_in,n_out", [(37, 130), (150, 600), (1200, 600), (20, 9), (75, 75)])
def test_resize_window_equals_a_window_of_the_global_resize(mode, n_in, n_out):
    x = torch.randn(1, 2, n_in, n_in + 3)
    corners = None if mode == "nearest" else False
    full = F.interpolate(x, size=(n_out, n_out + 5), mode=mode, align_corners=corners)
    rows, cols = (n_out // 3, n_out - 2), (1, n_out // 2)
    maps = (axis_map(n_in, n_out, mode, *rows), axis_map(n_in + 3, n_out + 5, mode, *cols))
    (a, b), (c, d) = maps[0].span, maps[1].span
    crop = x[..., max(0, a - 2) : b + 1, max(0, c - 1) : d]
    out = resize_window(crop, maps, (max(0, a - 2), max(0, c - 1)))
    assert (out - full[..., slice(*rows), slice(*cols)]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="misses"):
        resize_window(x[..., a + 1 :, :], maps, (a + 1, 0))


# ---------------------------------------------------------------------------------- public path
CASES = {  # LR size -> output size: x4, x2 (folded 8x level), non-integer + asymmetric, x8
    "x4": ((16, 20), (64, 80)),
    "x2": ((16, 20), (32, 40)),
    "x2.8,x4.2": ((13, 17), (37, 71)),
    "x8": ((12, 12), (96, 96)),
}


def plain_forward(model, lr: torch.Tensor, out_size, seed: int) -> torch.Tensor:
    """The modules' plain forward with autograd on (their training-time branches): condition,
    sampling chain, decode; [0, 1] in and out."""
    with torch.enable_grad(), model.ema_scope():
        lr = lr * 2 - 1
        z0 = model.sample_latent(lr, out_size, generator=torch.Generator().manual_seed(seed))
        return ((model.decode_latent(z0, lr, out_size) + 1) / 2).detach()


def sr(model, lr, out_size, seed: int, **tiling) -> torch.Tensor:
    return model.super_resolve(
        lr, out_size, generator=torch.Generator().manual_seed(seed), **tiling
    )


@pytest.fixture(scope="module")
def references(model):
    """The plain forward on each case, seed 3."""
    out = {}
    for name, (lr_size, out_size) in CASES.items():
        lr = torch.rand(1, 3, *lr_size, generator=torch.Generator().manual_seed(0))
        out[name] = (lr, plain_forward(model, lr, out_size, 3))
    return out


@pytest.mark.parametrize("case", CASES)
def test_public_path_equals_the_plain_forward_tiled_and_untiled(model, references, case):
    lr, ref = references[case]
    out_size = CASES[case][1]
    untiled = sr(model, lr, out_size, 3)
    tiled = sr(model, lr, out_size, 3, tile=16)  # 2 x 2 decoder tiles
    assert untiled.shape == ref.shape and (untiled - ref).abs().max() <= 1e-4
    assert tiled.shape == ref.shape and (tiled - ref).abs().max() <= 1e-4


def test_untiled_is_the_plan_with_one_tile_per_stage(model):
    """tile=0: every stage whole and one render call: the same floats as the networks' public
    stages called in a row (no crop or resampling work added)."""
    geo = Geometry.of((16, 20), (64, 80))
    pipeline = Pipeline(budget=None)
    assert pipeline.whole_stages(model, geo, 1) == {"condition", "unet", "latent", "sr"}
    assert len(pipeline.render_tiles(model.first_stage_model, geo, 1)) == 1
    lr = torch.rand(1, 3, 16, 20)
    with torch.inference_mode(), model.ema_scope():
        lr_m = lr * 2 - 1
        cond = model.encode_condition(lr_m, geo.out)
        x_T, noises = model.draw_noise(cond.shape, torch.Generator().manual_seed(3))
        z0 = model.sample(model.denoiser(geo.scale, geo.out[0], 1), x_T, cond, noises)
        ref = (model.decode_latent(z0, lr_m, geo.out) + 1) / 2
    assert torch.equal(sr(model, lr, geo.out, 3, tile=0), ref)


def test_condition_decode_tiled_and_untiled_equals_the_plain_forward(model):
    """The authors' sr_kd (`test.py --sr-kd`) runs in bounded memory like the SR itself."""
    lr, out_size = torch.rand(1, 3, 24, 28), (96, 112)
    with torch.no_grad():
        lr_m = lr * 2 - 1
        ref = (model.decode_latent(model.encode_condition(lr_m, out_size), lr_m, out_size) + 1) / 2
    untiled = model.super_resolve_condition(lr, out_size, tile=0)
    tiled = model.super_resolve_condition(lr, out_size, tile=16)  # 2 x 2 tiles
    assert untiled.shape == tiled.shape == ref.shape
    assert (untiled - ref).abs().max() <= 1e-4 and (tiled - ref).abs().max() <= 1e-4


def test_inference_branches_of_the_modules_equal_their_autograd_branches(model):
    """ResnetBlock / encoder / FRU / upsampler: the lean inference code = the training code."""
    dec = model.first_stage_model.decoder
    x, image = torch.randn(2, 32, 12, 14), torch.randn(2, 3, 40, 48)
    x_cl = x.contiguous(memory_format=torch.channels_last)  # as `GAPDecoder.sr_branch` runs it
    nets = [
        (model.cond_stage_model, (image,)),
        (dec.FRUList[0], (x,)),
        (dec.FRUList[0], (x_cl,)),
        (dec.upsampler, (x_cl, (48, 56))),
        (dec.upsampler, (x, (37, 45))),  # no fold
        (dec.upsampler, (x, (48, 56))),  # x4: 8x level folded
        (dec.upsampler, (x, (24, 28))),  # x2: 8x level folded
    ]
    for net, args in nets:
        with torch.enable_grad():
            train = net(*args).detach()
        with torch.inference_mode():
            lean = net(*args)
        assert (lean - train).abs().max() < 1e-4
    up = dec.upsampler.UPNet_x2_list[2]
    with torch.no_grad():
        for factor in (2, 4):
            size = (24 // factor, 28 // factor)
            pooled = F.interpolate(up(x), size=size, mode="bilinear", align_corners=False)
            folded = ScaleAwareUpsampler.shuffle_resample(up[0], x, factor)
            assert (folded - pooled).abs().max() < 1e-5


RETAINED_HEAP_CHECK = """
import os
import torch
from models.memory import retained_heap

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

base = rss()
with retained_heap(torch.device("cpu")):
    block = torch.ones(1 << 26)  # 256 MiB, touched
    del block
    kept = rss() - base  # freed, but still resident for reuse
    again = torch.ones(3 << 24)  # 192 MiB
    del again
    reused = rss() - base  # the second block reused the first one's pages
returned = rss() - base
print(kept >> 20, reused >> 20, returned >> 20)
"""


def test_retained_heap_keeps_freed_memory_for_reuse_and_returns_it_on_exit():
    """In a fresh process: inside the block a freed 256 MiB activation stays resident and the next
    (smaller) one reuses its pages; on exit the memory goes back to the OS."""
    if glibc_library() is None or not Path("/proc/self/statm").exists():
        pytest.skip("needs glibc and /proc (Linux)")
    out = subprocess.run(
        [sys.executable, "-c", RETAINED_HEAP_CHECK],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    kept, reused, returned = map(int, out.split())
    assert kept >= 250 and reused < kept + 16, (kept, reused)
    assert returned < 32, returned


def test_result_does_not_depend_on_the_inputs_memory_layout(model):
    """A PIL image's tensor is channels-last; the output must equal that of the NCHW copy."""
    lr = torch.rand(1, 3, 12, 14)
    cl = lr.contiguous(memory_format=torch.channels_last)
    runs = [model.super_resolve(x, (48, 56), torch.Generator().manual_seed(0)) for x in (lr, cl)]
    assert torch.equal(*runs)


def test_render_tiles_are_as_large_as_the_budget_allows(model):
    """Automatic render tiles grow with the budget (the whole output when it fits) and hold
    their windows' receptive field; the windows cover the output once."""
    ae, geo = model.first_stage_model, Geometry((200, 200), (800, 800))
    budgets = [mib << 20 for mib in (120, 240, 2000)]
    sides = [Pipeline(None, budget=b).render_tile(ae, geo, 1) for b in budgets]
    assert MIN_TILE <= sides[0] < sides[1] < 200 and sides[2] == 0  # 0: the whole output
    room = (240 << 20) // 2 - 4 * 6 * 800 * 800
    side = sides[1] + 2 * RENDER_CONTEXT
    assert render_bytes(ae, (side, side), (4 * side, 4 * side)) <= room
    geo = Geometry((61, 47), (213, 188))  # x3.49 height, x4 width
    tiles = Pipeline(20).render_tiles(ae, geo, 1)
    cover = torch.zeros(213, 188)
    for ((r0, r1), _), win in tiles:
        cover[slice(*win.rows), slice(*win.cols)] += 1
        a, b = (n * 61 / 213 for n in win.rows)  # the window on the LR grid
        assert r0 <= max(0, a - RENDER_CONTEXT + 1) and r1 >= min(61, b + RENDER_CONTEXT - 1)
    assert len(tiles) == 12 and torch.equal(cover, torch.ones(213, 188))


def test_bf16_autocast_runs_close_to_fp32(model):
    lr = torch.rand(1, 3, 16, 20)
    ref = sr(model, lr, (64, 80), 0)
    out = sr(model, lr, (64, 80), 0, precision="bf16")
    assert out.dtype == torch.float32 and psnr(out, ref) > 25


# --------------------------------------------------------------------------------------- tiling
def scene_image(source: str) -> torch.Tensor:
    """[1, 3, h, w] in [0, 1]: a holdout image (skipped without ../shared) or a generated one,
    so that every clone runs the test."""
    if source == "holdout":
        return to_tensor01(load_image(shared_path("data", "holdout", "airplane00.tif")))[None]
    return to_tensor01(generate_scene((192, 192), seed=3))[None]


@pytest.mark.parametrize("source", ["generated", "holdout"])
def test_tiles_and_streamed_stages_give_the_untiled_result_at_any_budget(model, source):
    """A 192 x 192 output in 3 x 3 render tiles of 16 LR px, under budgets from "every stage
    whole" down to "every stage streamed by bands of a few rows, most maps in files" (the
    condition encoder, the UNet at every step, the latent and SR branches): the untiled
    result, up to float rounding."""
    hr = scene_image(source)
    lr = F.interpolate(hr, size=(48, 48), mode="bicubic", antialias=True).clamp(0, 1)
    ref = sr(model, lr, (192, 192), 5, tile=0)
    geo = Geometry((48, 48), (192, 192))
    stages = stage_bytes(model, geo.lr, geo.out)
    for budget, whole in ((64 << 20, 4), (sorted(stages.values())[1] + (1 << 20), 2), (1 << 18, 0)):
        tiler = Pipeline(16, budget=budget)
        assert len(tiler.whole_stages(model, geo, 1)) == whole
        assert len(tiler.render_tiles(model.first_stage_model, geo, 1)) == 9
        with model.ema_scope():
            out = tiler.super_resolve(model, lr * 2 - 1, geo, torch.Generator().manual_seed(5))
        assert ((out + 1) / 2 - ref).abs().max() < 1e-5, budget


def test_public_path_over_the_budget_streams_and_equals_the_untiled_run(model):
    """`max_memory` far below the scene: streamed stages, automatic render tiles; the sr_kd
    path and stage 1's reconstruction too."""
    lr, out_size = torch.rand(1, 3, 40, 36), (160, 144)
    ae, hr = model.first_stage_model, torch.rand(1, 3, 160, 144)
    small = dict(max_memory=4 / 1024)  # 4 MiB
    assert (
        sr(model, lr, out_size, 1, **small) - sr(model, lr, out_size, 1, tile=0)
    ).abs().max() < 1e-5
    cond = model.super_resolve_condition(lr, out_size, **small)
    assert (cond - model.super_resolve_condition(lr, out_size, tile=0)).abs().max() < 1e-5
    assert (ae.reconstruct(lr, hr, **small) - ae.reconstruct(lr, hr, tile=0)).abs().max() < 1e-5


def test_stages_run_whole_only_where_their_estimate_fits_the_budget(model):
    geo = Geometry((48, 48), (192, 192))
    stages = stage_bytes(model, geo.lr, geo.out)
    assert set(stages) == {"condition", "unet", "latent", "sr"} and min(stages.values()) > 0
    held = 4 * 6 * 192 * 192  # result and blending totals
    cut_off = sorted(stages.values())[1] + held  # the two smallest estimates fit
    whole = Pipeline(budget=cut_off).whole_stages(model, geo, 1)
    assert whole == {k for k, v in stages.items() if v + held <= cut_off} and len(whole) == 2
    assert Pipeline(budget=None).whole_stages(model, geo, 1) == set(stages)
    assert Pipeline(budget=0).whole_stages(model, geo, 1) == set()  # every stage streams


def test_automatic_memory_budget_follows_the_available_memory(monkeypatch):
    import models.memory as inference
    from utils.cli import memory_size

    if Path("/proc/meminfo").exists():  # Linux: MemAvailable
        assert inference.available_memory(torch.device("cpu")) > 0
    monkeypatch.setattr(inference, "available_memory", lambda device: 8 * 2**30)
    assert inference.memory_budget("auto", torch.device("cpu")) == 6.0  # 3/4 of it
    assert inference.memory_budget(2, torch.device("cpu")) == 2.0
    assert inference.memory_budget(None, torch.device("cpu")) is None
    monkeypatch.setattr(inference, "available_memory", lambda device: None)
    assert inference.memory_budget("auto", torch.device("cpu")) == 2.0
    assert memory_size("auto") == "auto" and memory_size("1.5") == 1.5
    with pytest.raises(Exception, match="GB > 0"):
        memory_size("-1")


def test_bad_tiles_are_rejected(model):
    with pytest.raises(ValueError, match="tile 8"):
        sr(model, torch.rand(1, 3, 16, 16), (64, 64), 0, tile=8)
    with pytest.raises(ValueError, match="too small"):
        model.super_resolve(torch.rand(1, 3, 4, 4), (6, 6))


# ------------------------------------------------------------------------ latent_resize option
@pytest.mark.parametrize("n_in,n_out", [(11, 12), (15, 40), (37, 130), (20, 9)])
def test_axis_map_nearest_exact_equals_a_window_of_the_global_resize(n_in, n_out):
    x = torch.randn(1, 2, n_in, n_in + 3)
    full = F.interpolate(x, size=(n_out, n_out + 5), mode="nearest-exact")
    rows, cols = (n_out // 3, n_out - 1), (1, n_out // 2)
    maps = (
        axis_map(n_in, n_out, "nearest-exact", *rows),
        axis_map(n_in + 3, n_out + 5, "nearest-exact", *cols),
    )
    (a, b), (c, d) = maps[0].span, maps[1].span
    out = resize_window(x[..., a:b, c:d], maps, (a, c))
    assert torch.equal(out, full[..., slice(*rows), slice(*cols)])


def test_latent_resize_nearest_exact_reads_the_latent_pixel_under_each_lr_centre_at_11_12():
    """m / l = 11 / 12: the centre-aligned rule reads the latent pixel that holds LR pixel i's
    centre (i for the first half, i - 1 for the second: symmetric about the middle); the
    authors' legacy rule reads the one under its top-left corner, i - 1 for every i >= 1 (the
    latent shifted by up to a latent pixel towards the end). The decoder's resized h_k follow
    the rule it is built with."""
    exact = axis_map(11, 12, "nearest-exact").index[0]
    legacy = axis_map(11, 12, "nearest").index[0]
    centres = ((torch.arange(12) + 0.5) * 11 / 12).floor().long()
    assert exact.tolist() == centres.tolist() == [*range(6), *range(5, 11)]
    assert legacy.tolist() == [0, *range(11)]
    z, lr = torch.randn(1, 4, 11, 11), torch.rand(1, 3, 12, 12) * 2 - 1
    for mode, index in (("nearest", legacy), ("nearest-exact", exact)):
        torch.manual_seed(0)
        dec = GAPDecoder(32, 3, (1, 1), 1, 4, 3, (2, 2), latent_resize=mode).eval()
        assert dec.latent_resize == mode
        seen = []
        dec.sr_branch = lambda lr, feats, scale, seen=seen: (
            seen.append(feats) or lr.new_zeros(lr.shape[0], 32, *lr.shape[-2:])
        )
        with torch.no_grad():
            dec(z, lr, (24, 24))
            for h, near in zip(dec.latent_features(z), seen[0]):
                assert torch.equal(near, h[..., index, :][..., index])


def test_latent_resize_refuses_unknown_modes():
    with pytest.raises(ValueError, match="'nearest', 'nearest-exact'"):
        GAPDecoder(32, 3, (1, 1), 1, 4, 3, (2, 2), latent_resize="bilinear")


@pytest.mark.parametrize("overlay", [None, "demo_second_stage.yaml"], ids=["8x", "demo, 4x"])
def test_latent_resize_nearest_exact_streams_and_tiles_as_the_untiled_run(model, overlay):
    """With `latent_resize: nearest-exact` (at LR / latent = 40 / 15, where it differs from the
    legacy rule; and in the demo's overlay, with a 4x latent: 40 / 30) stage 1's `reconstruct`
    and stage 2's `super_resolve`, tiled or streamed under a tiny `max_memory`, give the
    untiled result, and that the modules' plain forward (the decoder's own resize)."""
    key = "model.params.first_stage_config.params.decoder_config.params.latent_resize"
    config = tiny_config(2, f"{key}=nearest-exact")
    if overlay:
        config = OmegaConf.merge(config, OmegaConf.load(ROOT / "configs" / "tiny" / overlay))
    torch.manual_seed(0)
    model4 = lively(instantiate_from_config(config.model))
    ae, factor = model4.first_stage_model, 4 if overlay else 8
    assert ae.latent_resize == "nearest-exact"
    assert model4.cond_stage_model.downsampling() == ae.encoder.downsampling() == factor
    unet = [stage_bytes(m, (40, 36), (120, 108))["unet"] for m in (model4, model)]
    assert (unet[0] > 2 * unet[1]) == (factor == 4)  # the estimates follow the latent's size
    model = model4
    lr, out_size, hr = torch.rand(1, 3, 40, 36), (120, 108), torch.rand(1, 3, 120, 108)
    small = dict(max_memory=4 / 1024)  # 4 MiB
    untiled = sr(model, lr, out_size, 1, tile=0)
    assert (untiled - plain_forward(model, lr, out_size, 1)).abs().max() <= 1e-4  # the decoder's
    for tiling in (small, dict(tile=16)):
        assert (sr(model, lr, out_size, 1, **tiling) - untiled).abs().max() < 1e-5
    rec = ae.reconstruct(lr, hr, tile=0)
    for tiling in (small, dict(tile=16)):
        assert (ae.reconstruct(lr, hr, **tiling) - rec).abs().max() < 1e-5
    with torch.no_grad():  # the option is in effect: the legacy rule gives another output
        ae.decoder.latent_resize = "nearest"
        assert (ae.reconstruct(lr, hr, tile=0) - rec).abs().max() > 1e-4
