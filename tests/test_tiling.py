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
from torch import nn

from data.synthetic import generate_scene
from ldm.blocks import ContrastChannelAttention, channel_moments, pointwise
from ldm.chain import Stage
from ldm.gap import GAPDecoder
from ldm.upsampler import ScaleAwareUpsampler
from models.geometry import Geometry
from models.memory import glibc_library
from models.pipeline import RENDER_CONTEXT, Pipeline
from models.scene_stats import SceneStatistics
from models.stream import WORK, Nearest, Store, stream_chain
from models.tiling import MIN_TILE
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


# ------------------------------------------------------------------------------- streaming
def test_measured_statistics_are_the_whole_input_statistics_band_by_band():
    """A chain with GroupNorm and the IMD channel attention streamed in bands of 3 rows (maps
    in files): the whole map's statistics, and not those of a band."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32),
                        ContrastChannelAttention(32), nn.Conv2d(32, 8, 3, padding=1))  # fmt: skip
    x = torch.randn(2, 3, 40, 30) * torch.linspace(0.2, 3, 40)[:, None]  # non-stationary
    chain = [Stage(net[0], 1), Stage(net[1:3]), Stage(net[3], 1)]
    with torch.no_grad():
        ref = net(x)
        out = stream_chain(chain, [x], SceneStatistics([net]), 3 * WORK * 4 * 2 * 3 * 30, Store(0))
        assert (out[0].whole() - ref).abs().max() < 1e-5
        assert (net(x[..., :3, :]) - ref[..., :3, :]).abs().max() > 1e-2  # a band alone
    assert "forward" not in net[1].__dict__  # the layers are restored


def stream(net, chain, maps, band_bytes: int, limit: int) -> list[torch.Tensor]:
    with torch.inference_mode():
        stats = SceneStatistics([net])
        return [m.whole() for m in stream_chain(chain, maps, stats, band_bytes, Store(limit))]


@pytest.mark.parametrize("limit", [1 << 40, 0], ids=["in memory", "in files"])
def test_each_streamed_network_equals_its_forward(model, limit):
    """Condition encoder, UNet (skips, attention whole), decoder latent branch (h_k of every
    level) and SR branch (FRU running fusion, channel attention) streamed in bands of a few
    rows = their forward, within 1e-5."""
    enc, unet = model.cond_stage_model, model.model.diffusion_model
    ae = model.first_stage_model
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, 128, 104, generator=g) * torch.linspace(0.2, 2, 104)
    x = torch.randn(1, 8, 45, 38, generator=g)  # padded to 48 x 40 inside
    z, lr = torch.randn(1, 4, 30, 26, generator=g), torch.rand(1, 3, 60, 52, generator=g) * 2 - 1
    band = 40_000  # bytes: bands of 1 to a few rows
    with torch.inference_mode():
        t, scale, height = torch.tensor([2]), torch.tensor([4.0]), torch.tensor([360])
        chain, padded = unet.stages(x, t, scale, height)
        eps = stream(unet, chain, [padded], band, limit)[0][..., :45, :38]
        assert (eps - unet(x, t, scale, height)).abs().max() < 1e-5
        assert (stream(enc, enc.stages(), [image], band, limit)[0] - enc(image)).abs().max() < 1e-5
        feats = ae.latent_features(z)
        streamed = stream(ae, ae.latent_stages(), [z], band, limit)[:-1]
        assert len(streamed) == len(feats) == 4
        assert max((a - b).abs().max() for a, b in zip(streamed, feats)) < 1e-5
        near = [F.interpolate(f, size=(60, 52)) for f in feats]
        maps = [Nearest(f, (60, 52)) for f in feats[::-1]]
        x_sr = stream(ae, ae.sr_stages(4.0), [*maps, lr], band, limit)[0]
        assert (x_sr - ae.sr_branch(lr, near, 4.0)).abs().max() < 1e-5


@pytest.mark.parametrize(
    "option",
    [dict(fusion="add"), dict(refinement="none"), dict(use_sr_branch=False),
     dict(use_latent=False)],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)  # fmt: skip
def test_streamed_sr_branch_of_each_decoder_ablation_equals_its_forward(option):
    torch.manual_seed(0)
    dec = GAPDecoder(32, 3, (1, 1), 1, 4, 3, (2, 2), **option).eval()
    z, lr = torch.randn(1, 4, 12, 10), torch.rand(1, 3, 24, 20) * 2 - 1
    with torch.inference_mode():
        feats = dec.latent_features(z) if dec.use_latent else None
        near = None if feats is None else [F.interpolate(f, size=(24, 20)) for f in feats]
        maps = [] if feats is None else [Nearest(f, (24, 20)) for f in feats[::-1]]
        x = stream(dec, dec.sr_stages(2.0, feats is not None), [*maps, lr], 20_000, 0)[0]
        assert (x - dec.sr_branch(lr, near, 2.0)).abs().max() < 1e-5


def test_streamed_stages_read_bands_within_the_band_budget(model):
    """The working set of a streamed stage is bounded: every call of a (non-global) stage
    reads bands of at most ~3x the rows the band budget allows (halo rows), never the whole
    map; maps beyond the in-memory limit go to files."""
    unet = model.model.diffusion_model
    x, band = torch.randn(1, 8, 96, 80), 600_000
    with torch.inference_mode():
        chain, padded = unet.stages(x, torch.tensor([1]), torch.tensor([4.0]), torch.tensor([768]))
    reads = []

    def watched(stage):
        def fn(*maps):
            reads.append((stage.halo, sum(m.numel() * 4 for m in maps), maps[0].shape[-2]))
            return stage.fn(*maps)

        return stage._replace(fn=fn)

    out = stream(unet, [watched(st) for st in chain], [padded], band, 1 << 20)[0]
    assert out.shape == (1, 4, 96, 80)
    streamed = [(b, rows) for halo, b, rows in reads if halo is not None]
    assert max(b for b, _ in streamed) <= 3 * band / WORK
    assert max(rows for _, rows in streamed) < 96 // 2  # never the whole map (96 rows)
    assert len(streamed) > 10 * len(chain)


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


def test_render_tiles_are_as_large_as_the_budget_allows(model):
    """Automatic render tiles grow with the budget (the whole output when it fits) and hold
    their windows' receptive field; the windows cover the output once."""
    ae, geo = model.first_stage_model, Geometry((200, 200), (800, 800))
    budgets = [mib << 20 for mib in (120, 240, 2000)]
    sides = [Pipeline(None, budget=b).render_tile(ae, geo, 1) for b in budgets]
    assert MIN_TILE <= sides[0] < sides[1] < 200 and sides[2] == 0  # 0: the whole output
    room = (240 << 20) // 2 - 4 * 6 * 800 * 800
    side = sides[1] + 2 * RENDER_CONTEXT
    assert ae.render_bytes((side, side), (4 * side, 4 * side)) <= room
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
    stages = model.stage_bytes(geo.lr, geo.out)
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
    stages = model.stage_bytes(geo.lr, geo.out)
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


def test_latent_resize_nearest_exact_streams_and_tiles_as_the_untiled_run():
    """With `latent_resize: nearest-exact` (at LR / latent = 40 / 15, where it differs from the
    legacy rule) stage 1's `reconstruct` and stage 2's `super_resolve`, tiled or streamed under
    a tiny `max_memory`, give the untiled result, and that the modules' plain forward (the
    decoder's own resize)."""
    key = "model.params.first_stage_config.params.decoder_config.params.latent_resize"
    torch.manual_seed(0)
    model = lively(instantiate_from_config(tiny_config(2, f"{key}=nearest-exact").model))
    ae = model.first_stage_model
    assert ae.latent_resize == "nearest-exact"
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
