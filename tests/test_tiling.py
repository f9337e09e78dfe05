"""Tiled whole-scene inference: window geometry, exact crop resampling, shared statistics, the
public path (`LDCSR.super_resolve`, tiled or not) equal to the modules' plain forward, and
seamless tiles on holdout images."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from data.synthetic import generate_scene
from ldm.blocks import ContrastChannelAttention, channel_moments, pointwise
from ldm.diffusion import draw_noise
from ldm.upsampler import ScaleAwareUpsampler
from models.geometry import Geometry
from models.memory import choose_tile, glibc_library
from models.pipeline import Pipeline
from models.scene_stats import SceneStatistics
from models.stream import stream_chain
from models.tiling import axis_weights, split_axis, tile_grid
from tests.conftest import ROOT, shared_path, tiny_config
from utils.config import instantiate_from_config
from utils.image_io import load_image, to_tensor01
from utils.resample import axis_map, resize_window


def lively(model, seed: int = 0):
    """Random weights under which every part of LDCSR matters: He-scaled convolutions (the
    zero-initialised UNet outputs included) with damped residual branches, so activations stay
    O(1), eps ~ N(0, 1) and the upsampler adds ~0.2 of structure to the bicubic image. With
    PyTorch's default init the upsampler's output is nearly constant and a random UNet outputs
    zeros, which would hide any tiling error."""
    g = torch.Generator().manual_seed(seed)
    damped = ("c5", "LR_conv", "conv2", "out_layers.3", "proj_out")
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, (nn.Conv2d, nn.Conv1d, nn.Linear)):
                gain = 0.3 if name.endswith(damped) else 1.0
                std = gain * (2.0 / mod.weight[0].numel()) ** 0.5
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std)
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.05)
        getattr(model, "first_stage_model", model).decoder.last_layer.mul_(0.01)
        if hasattr(model, "model_ema"):  # stage 2: EMA weights = these weights
            shadow = dict(model.model_ema.named_buffers())
            for name, p in model.model.named_parameters():
                shadow[model.model_ema.m_name2s_name[name]].copy_(p)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors: one thread avoids OpenMP synchronisation (slow on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return lively(instantiate_from_config(tiny_config(2).model))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / (a - b).pow(2).mean()))


# ------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize(
    "length,tile,overlap,align", [(100, 32, 8, 1), (75, 16, 8, 8), (9, 4, 2, 1)]
)
def test_split_axis_covers_with_aligned_overlapping_windows(length, tile, overlap, align):
    windows = split_axis(length, tile, overlap, align)
    assert windows[0][0] == 0 and windows[-1][1] == length
    for (a0, b0), (a1, b1) in zip(windows, windows[1:]):
        assert a1 % align == 0 and a0 < a1 and b0 - a1 >= overlap and b1 > b0
    assert all(tile <= b - a < tile + align for a, b in windows)


def test_split_axis_single_window_and_errors():
    assert split_axis(10, 0, 0) == [(0, 10)] and split_axis(10, 16, 4) == [(0, 10)]
    with pytest.raises(ValueError, match="multiples"):
        split_axis(100, 32, 20)


def test_blend_weights_are_a_smooth_partition_of_unity():
    windows = split_axis(100, 32, 12)
    total = torch.zeros(100, dtype=torch.float64)
    for (a, b), w in zip(windows, axis_weights(windows, 100)):
        total[a:b] += w
        assert (w > 0).all() and (w.diff().abs() < 0.2).all()  # no jump inside a window
    assert torch.allclose(total, torch.ones(100, dtype=torch.float64))
    grid = tile_grid((50, 70), (32, 32), (8, 8))
    weight = torch.zeros(50, 70)
    for win in grid:
        weight[slice(*win.rows), slice(*win.cols)] += win.weight(weight)[0, 0]
    assert torch.allclose(weight, torch.ones(50, 70))


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


# ----------------------------------------------------------------------------- shared statistics
def test_scene_statistics_replay_the_whole_input_statistics_on_crops():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 1), nn.GroupNorm(8, 32), ContrastChannelAttention(32))
    x = torch.randn(2, 3, 40, 30) * torch.linspace(0.2, 3, 40)[:, None]  # non-stationary
    stats = SceneStatistics([net])
    with torch.no_grad(), stats.collect():
        full = net(x)
    with torch.no_grad(), stats.apply():
        crop = net(x[..., 5:25, 10:30])  # pointwise layers: the crop of the full output
    assert (crop - full[..., 5:25, 10:30]).abs().max() < 1e-4
    with torch.no_grad():
        assert (net(x[..., 5:25, 10:30]) - full[..., 5:25, 10:30]).abs().max() > 1e-2
    assert "forward" not in net[1].__dict__  # the layers are restored


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
    tiled = sr(model, lr, out_size, 3, tile=16, tile_overlap=4)  # 2 x 2 decoder tiles
    assert untiled.shape == ref.shape and (untiled - ref).abs().max() <= 1e-4
    assert tiled.shape == ref.shape and (tiled - ref).abs().max() <= 1e-4


def test_untiled_is_the_plan_with_one_tile_per_stage(model):
    """tile=0: one tile per stage, each stage called once on the whole image: the same floats as
    the networks' public stages called in a row (no crop or resampling work added)."""
    geo = Geometry.of((16, 20), (64, 80))
    pipeline = Pipeline(budget=None)
    plan = pipeline.plan(geo, pipeline.whole_stages(model, geo, 1))
    assert {k: len(v) for k, v in plan.items()} == dict.fromkeys(
        ("condition", "unet", "latent", "sr", "render"), 1
    )
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
    tiled = model.super_resolve_condition(lr, out_size, tile=16, tile_overlap=4)  # 2 x 2 tiles
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


@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_moments_and_pointwise_equal_the_plain_ops(channels_last):
    x = torch.randn(2, 32, 9, 11) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(16, 48, 1, 1), torch.randn(16)
    var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            m, v = channel_moments(x)
            assert m.shape == v.shape == (2, 32, 1, 1)
            assert (m - mean).abs().max() < 1e-5 and (v - var).abs().max() < 1e-4
            for b in (bias, None):
                out = pointwise(x, weight[:, 8:40], b)  # a slice of a larger 1x1 weight
                assert (out - F.conv2d(x, weight[:, 8:40], b)).abs().max() < 1e-5
                assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


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


def test_auto_tiling_follows_the_models_own_memory(model):
    """The tiny model at x4 on 256x256 fits the default budget; the paper widths would not."""
    assert model.peak_bytes((256, 256), (1024, 1024)) < 2 * 2**30
    assert choose_tile(model.peak_bytes((256, 256), (1024, 1024)), 2.0, 4.0, 16) == 0
    assert choose_tile(model.peak_bytes((2000, 2000), (8000, 8000)), 2.0, 4.0, 16) == 128


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
def test_tiles_agree_with_the_untiled_run_on_a_scene(model, source):
    """Tiles much smaller than the image, same seed: >= 45 dB to the untiled output (4x4 LR
    tiles of 16 px on 48 px, 2x2 condition tiles); per-tile statistics do much worse."""
    hr = scene_image(source)
    lr = F.interpolate(hr, size=(48, 48), mode="bicubic", antialias=True).clamp(0, 1)
    ref = sr(model, lr, (192, 192), 5)
    tiles = dict(tile=16, overlap=4, context=4, condition_tile=16, latent_overlap=8)
    lr_m, g = lr * 2 - 1, torch.Generator

    def tiled(**options):
        with model.ema_scope():
            geo = Geometry.of(lr.shape[-2:], (192, 192))
            out = Pipeline(**tiles, **options).super_resolve(model, lr_m, geo, g().manual_seed(5))
        return (out + 1) / 2

    assert psnr(tiled(), ref) >= 45  # measured 75 dB
    assert psnr(tiled(stats_pixels=0), ref) < psnr(tiled(), ref) - 10  # measured 56 dB


def test_render_tiles_within_the_budget_give_the_untiled_result_above_the_stats_threshold(model):
    """A 192 x 192 output in 3 x 3 render tiles of 16 LR px, the statistics threshold lowered far
    below the scene (the reference pass would be an estimate): the stages with scene-wide
    statistics fit the budget and run whole, so tiled = untiled up to float rounding. Without
    a budget for them (budget 0) the decoder tiles carry estimated statistics and differ."""
    lr = F.interpolate(scene_image("generated"), size=(48, 48), mode="area")
    ref = sr(model, lr, (192, 192), 5, tile=0)
    geo = Geometry((48, 48), (192, 192))

    def tiled(budget):
        tiler = Pipeline(16, 4, condition_tile=16, stats_pixels=1024, budget=budget, **UNET_TILES)
        with model.ema_scope():
            out = tiler.super_resolve(model, lr * 2 - 1, geo, torch.Generator().manual_seed(5))
        return (out + 1) / 2, tiler.plan(geo, tiler.whole_stages(model, geo, 1))

    out, plan = tiled(budget=64 << 20)
    assert len(plan["render"]) == 9 and "decoder" not in plan
    assert all(len(plan[k]) == 1 for k in ("condition", "unet", "latent", "sr"))
    assert (out - ref).abs().max() < 1e-5
    out, plan = tiled(budget=0)
    assert min(len(plan[k]) for k in ("decoder", "condition", "unet")) > 1
    assert (out - ref).abs().max() > 1e-4


def test_a_condition_encoder_over_the_budget_streams_with_exact_statistics(model):
    """Over its budget the condition encoder streams by bands of rows (activations spilled to a
    file when over the limit): the untiled statistics, exactly, where the reference pass of
    per-tile runs would estimate them."""
    enc = model.cond_stage_model
    x = torch.randn(1, 3, 200, 168) * torch.linspace(0.2, 2, 168)  # [1, 3, H, W] non-stationary
    with torch.inference_mode():
        ref = enc(x)
        for limit in (1 << 40, 0):  # in memory; every activation in a file
            stats = SceneStatistics([enc], (nn.GroupNorm,))
            out = stream_chain(enc.stages(), x, stats, 2000, limit)  # bands of ~10 rows
            assert out.shape == ref.shape and (out - ref).abs().max() < 1e-5
        lr, geo = torch.rand(1, 3, 48, 48) * 2 - 1, Geometry((48, 48), (192, 192))
        tiler = Pipeline(16, 4, condition_tile=16, latent_overlap=8, budget=1 << 20)
        plan = tiler.plan(geo, frozenset())
        cond = tiler.condition(model, lr, geo, plan)
        assert (cond - model.encode_condition(lr, (192, 192))).abs().max() < 1e-5
        ae, hr = model.first_stage_model, torch.rand(1, 3, 192, 192) * 2 - 1  # stage 1: posterior
        lr_up = F.interpolate(lr, size=(192, 192), mode="bicubic", align_corners=False)
        crop = lambda size, rows, cols: ae.build_encoder_input(hr, lr_up)  # noqa: E731 (whole)
        z = tiler.encode(ae, ae.encode_mode, crop, geo, plan, ae.encode_mode_stages())
        assert (z - ae.encode(hr, lr).mode()).abs().max() < 1e-5


def test_stages_run_whole_only_where_their_estimate_fits_the_budget(model):
    geo = Geometry((48, 48), (192, 192))
    stages = model.stage_bytes(geo.lr, geo.out)
    assert set(stages) == {"condition", "unet", "latent", "sr"} and min(stages.values()) > 0
    held = 4 * 6 * 192 * 192  # result and blending totals
    cut_off = sorted(stages.values())[1] + held  # the two smallest estimates fit
    whole = Pipeline(budget=cut_off).whole_stages(model, geo, 1)
    assert whole == {k for k, v in stages.items() if v + held <= cut_off} and len(whole) == 2
    assert Pipeline(budget=None).whole_stages(model, geo, 1) == set(stages)
    assert Pipeline().whole_stages(model, geo, 1) == set()  # budget 0: the old tiling


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


def test_plan_aligns_latent_tiles_and_maps_lr_tiles_to_the_scene_grid():
    tiler = Pipeline(tile=20, overlap=6, condition_tile=16, latent_overlap=8)
    geo = Geometry((61, 47), (213, 188))  # x3.49 height, x4 width
    plan = tiler.plan(geo)
    assert all(win.rows[0] % 8 == 0 and win.cols[0] % 8 == 0 for _, win in plan["condition"])
    assert len(plan["condition"]) > 1 and len(plan["decoder"]) > 4
    rows = sorted({win.rows for _, win in plan["decoder"]})
    assert rows[0][0] == 0 and rows[-1][1] == 213
    for ((r0, r1), _), win in plan["decoder"]:  # HR window inside the LR crop (+ context)
        assert r0 * 213 / 61 <= win.rows[0] and win.rows[1] <= r1 * 213 / 61


def unet_chain(model, cond, lr_height: int, out_size, seed: int, tiler=None) -> torch.Tensor:
    """z0 of the sampling chain for `cond` with the x_T and noises of `seed`, the UNet untiled
    or on `tiler`'s latent tiles."""
    with torch.no_grad(), model.ema_scope():
        x_T, noises = draw_noise(cond.shape, model.diffusion.num_timesteps,
                                 torch.Generator().manual_seed(seed))  # fmt: skip
        denoise = model.denoiser(out_size[0] / lr_height, out_size[0], cond.shape[0])
        if tiler is not None:
            plan = tiler.plan(Geometry((lr_height, lr_height), out_size))["unet"]
            denoise = tiler.denoiser(denoise, plan)
        return model.sample(denoise, x_T, cond, noises)


UNET_TILES = dict(latent_tile=16, latent_overlap=8, latent_context=8)  # 5 x 5 tiles on 48 x 48


def test_unet_tiles_follow_the_untiled_chain(model):
    """A 48 x 48 latent in 5 x 5 UNet tiles whose crops (tile + context: at most 32 px) each
    miss part of it: the tiled chain's z0 stays much closer to the untiled chain's than another
    seed's does (measured 0.14 of it; per-tile GroupNorm and attention make it inexact). A tile
    offset by one latent pixel gives 0.60, each tile seeing its own noise (std 1) 0.31."""
    lr = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        cond = model.encode_condition(lr, (384, 384))  # [1, 4, 48, 48]
    tiler = Pipeline(**UNET_TILES)
    plan = tiler.plan(Geometry((96, 96), (384, 384)))["unet"]
    assert len(plan) == 25 and max(b - a for ((a, b), _), _ in plan) <= 32
    ref = unet_chain(model, cond, 96, (384, 384), 2)
    tiled = unet_chain(model, cond, 96, (384, 384), 2, tiler)
    other_seed = unet_chain(model, cond, 96, (384, 384), 3)
    assert (tiled - ref).abs().mean() < 0.2 * (other_seed - ref).abs().mean()


def test_bad_tiles_are_rejected(model):
    with pytest.raises(ValueError, match="tile 8"):
        sr(model, torch.rand(1, 3, 16, 16), (64, 64), 0, tile=8)
    with pytest.raises(ValueError, match="multiples of 8"):
        Pipeline(latent_tile=20)
    with pytest.raises(ValueError, match="too small"):
        model.super_resolve(torch.rand(1, 3, 4, 4), (6, 6))
