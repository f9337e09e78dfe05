"""Networks streamed by bands of rows with exact statistics (`models/stream.py`): each streamed
network and every decoder ablation equals its forward, with maps in memory and in files; bands
stay within their budget; the fused channel moments and 1x1 convolutions equal the plain ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm.blocks import ContrastChannelAttention, channel_moments, pointwise
from ldm.chain import Stage
from ldm.gap import GAPDecoder
from models.scene_stats import SceneStatistics
from models.stream import WORK, Nearest, Store, stream_chain
from tests.conftest import tiny_config
from tests.helpers import lively
from utils.config import instantiate_from_config

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return lively(instantiate_from_config(tiny_config(2).model))


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
