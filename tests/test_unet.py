"""Tests of ldm/unet.py: authors' key names/shapes, padding of any latent size, scale embedding."""

import pytest
import torch
import torch.nn.functional as F

from ldm.unet import UNetModel, pad_to_multiple
from tests.helpers import official_keys

PREFIX = "model.diffusion_model."

# The paper's stage-2 UNet (docs/method.md, "Stage 2: denoising UNet" and "Paper configurations").
PAPER = dict(
    image_size=64,
    in_channels=8,
    out_channels=4,
    model_channels=64,
    attention_resolutions=[8],
    num_res_blocks=2,
    channel_mult=[1, 2, 2, 4],
    num_head_channels=32,
)
# The reduced config of conformance_small.pt.
SMALL = dict(PAPER, model_channels=32, num_res_blocks=1)


def _randomised(**overrides) -> UNetModel:
    """Small UNet with every parameter random (the zero-initialised convs would hide bugs)."""
    torch.manual_seed(0)
    unet = UNetModel(**dict(SMALL, **overrides)).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.05)
    return unet


def test_paper_unet_matches_official_keys():
    official = official_keys("second_stage", PREFIX)
    unet = UNetModel(**PAPER)
    ours = {k: list(v.shape) for k, v in unet.state_dict().items()}
    assert ours == official
    n_params = sum(p.numel() for p in unet.parameters())
    assert round(n_params / 1e6, 2) == 18.37


def test_small_unet_matches_conformance_keys(conformance):
    ref = conformance
    cfg = ref["config"]["model"]["params"]["unet_config"]["params"]
    assert cfg == dict(SMALL, use_scale_embedding=True, use_osize_embedding=True)
    expected = {
        k[len(PREFIX) :]: v.shape for k, v in ref["state_dict"].items() if k.startswith(PREFIX)
    }
    ours = {k: v.shape for k, v in UNetModel(**cfg).state_dict().items()}
    assert ours == expected


def test_zero_initialised_output():
    unet = UNetModel(**SMALL)
    assert all(not p.any() for p in unet.out[2].parameters())
    out = unet(torch.randn(1, 8, 6, 7), torch.tensor([3]), torch.tensor([4.0]), torch.tensor([96]))
    assert out.shape == (1, 4, 6, 7) and not out.any()


@pytest.mark.parametrize("size", [(3, 5), (1, 1), (6, 7), (12, 10), (8, 16)])
def test_any_latent_size_runs_and_is_cropped_back(size):
    unet = _randomised()
    x = torch.randn(2, 8, *size)
    with torch.no_grad():
        out = unet(x, torch.tensor([3, 1]), torch.tensor([4.0, 2.5]), torch.tensor([96, 40]))
    assert out.shape == (2, 4, *size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("size", [(6, 7), (12, 10), (5, 6), (7, 7)])
def test_padding_equals_reflect_where_reflect_works(size):
    x = torch.randn(1, 3, *size)
    pad = ((-size[1]) % 8, (-size[0]) % 8)
    expected = F.pad(x, (0, pad[0], 0, pad[1]), mode="reflect")
    assert torch.equal(pad_to_multiple(x, 8), expected)


def test_padding_falls_back_to_replicate_for_tiny_sides():
    x = torch.randn(1, 2, 3, 5)  # h needs 5 (> 3: replicate), w needs 3 (< 5: reflect)
    y = pad_to_multiple(x, 8)
    assert y.shape == (1, 2, 8, 8)
    assert torch.equal(y[..., :3, :], F.pad(x, (0, 3, 0, 0), mode="reflect"))
    assert torch.equal(y[..., 3:, :], y[..., 2:3, :].expand(-1, -1, 5, -1))
    one = torch.randn(1, 2, 1, 1)
    assert torch.equal(pad_to_multiple(one, 8), one.expand(-1, -1, 8, 8))


def test_scale_embedding_floor_vs_float():
    floor, real = _randomised(), _randomised(scale_embedding="float")
    t, osize = torch.tensor([3]), torch.tensor([96])

    def embed(unet, scale):
        with torch.no_grad():
            return unet.embed(t, torch.tensor([scale]), osize)

    assert torch.equal(embed(floor, 3.7), embed(floor, 3.0))  # the authors' behaviour
    assert torch.equal(embed(real, 3.0), embed(floor, 3.0))
    assert not torch.allclose(embed(real, 3.7), embed(floor, 3.7))


def test_scalar_conditioning_is_broadcast():
    unet = _randomised()
    x = torch.randn(2, 8, 6, 7)
    with torch.no_grad():
        a = unet(x, 2, 4.0, 96)
        b = unet(x, torch.tensor([2, 2]), torch.tensor([4.0, 4.0]), torch.tensor([96, 96]))
    assert torch.allclose(a, b)


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="pad_multiple"):
        UNetModel(**dict(SMALL, pad_multiple=4))
    with pytest.raises(ValueError, match="scale_embedding"):
        UNetModel(**dict(SMALL, scale_embedding="round"))
    with pytest.raises(ValueError, match="scale"):
        UNetModel(**SMALL)(torch.randn(1, 8, 8, 8), torch.tensor([0]))
    with pytest.raises(TypeError):
        UNetModel(**dict(SMALL, use_checkpoint=True))


def test_optional_variants_run():
    unet = _randomised(resblock_updown=True, use_scale_shift_norm=True, conv_resample=False)
    with torch.no_grad():
        out = unet(
            torch.randn(1, 8, 5, 9), torch.tensor([1]), torch.tensor([3.5]), torch.tensor([40])
        )
    assert out.shape == (1, 4, 5, 9)
    plain = UNetModel(**dict(SMALL, use_scale_embedding=False, use_osize_embedding=False))
    assert not any(k.startswith(("scale_embed", "osize_embed")) for k in plain.state_dict())
    assert plain(torch.randn(1, 8, 4, 4), torch.tensor([0])).shape == (1, 4, 4, 4)
