"""Tests of ldm/diffusion.py: schedule golden values, DDPM identities, noise order, gradients and
conformance of the whole sampling chain (with the EMA UNet) against the authors' traces."""

import math

import pytest
import torch

from ldm.diffusion import GaussianDiffusion, draw_noise, make_beta_schedule
from ldm.unet import UNetModel
from tests.helpers import sample_trajectory

TOL = 1e-4


@pytest.fixture(scope="module")
def reference(conformance):
    """The authors' traces from the shipped fixture (tests/conftest.py)."""
    return conformance


@pytest.fixture(scope="module")
def ema_unet(reference):
    """The reduced UNet carrying the EMA weights (``model_ema.<name without dots>``)."""
    unet = UNetModel(**reference["config"]["model"]["params"]["unet_config"]["params"]).eval()
    by_nodots = {name.replace(".", ""): name for name in unet.state_dict()}
    prefix = "model_ema.diffusion_model"
    ema = {
        by_nodots[k[len(prefix) :]]: v
        for k, v in reference["state_dict"].items()
        if k.startswith(prefix)
    }
    unet.load_state_dict(ema, strict=True)
    return unet


def _toy_denoiser(scale=0.3):
    weight = torch.nn.Parameter(torch.tensor(scale))

    def denoise_fn(x_t, cond, t):
        return weight * x_t + cond + 0.01 * t.float()[:, None, None, None]

    return denoise_fn, weight


def test_schedule_golden_values():
    expected = [
        (math.sqrt(0.1) + i * (math.sqrt(0.99) - math.sqrt(0.1)) / 3) ** 2 for i in range(4)
    ]
    betas = make_beta_schedule(4, 0.1, 0.99)
    assert betas.dtype == torch.float64
    assert torch.allclose(betas, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(betas.float(), torch.tensor([0.1, 0.294285, 0.590952, 0.99]), atol=1e-6)
    d = GaussianDiffusion()
    assert d.betas.dtype == torch.float32
    assert torch.allclose(d.alphas_cumprod, torch.cumprod(1 - betas, 0).float())
    assert d.alphas_cumprod_prev[0] == 1 and d.alphas_cumprod[0] == pytest.approx(0.9)
    assert d.posterior_variance[0] == 0
    assert d.posterior_log_variance_clipped[0] == pytest.approx(math.log(1e-20))
    assert d.posterior_mean_coef1[0] == pytest.approx(1) and d.posterior_mean_coef2[0] == 0
    # beta_t (1 - abar_{t-1}) / (1 - abar_t) at t = 3
    ab = torch.cumprod(1 - betas, 0)
    assert d.posterior_variance[3] == pytest.approx(float(betas[3] * (1 - ab[2]) / (1 - ab[3])))
    assert d.state_dict() == {}  # non-persistent: the LightningModule decides about keys


def test_schedule_matches_conformance(reference):
    params = reference["config"]["model"]["params"]
    d = GaussianDiffusion(params["timesteps"], params["linear_start"], params["linear_end"])
    for name, value in reference["schedule"].items():
        assert torch.allclose(getattr(d, name), value, atol=1e-7, rtol=0), name


def test_q_sample_predict_x0_round_trip():
    torch.manual_seed(0)
    d = GaussianDiffusion()
    x0, noise = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6)
    t = torch.tensor([0, 2, 3])
    x_t = d.q_sample(x0, t, noise)
    ab = d.alphas_cumprod[t][:, None, None, None]
    assert torch.allclose(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * noise, atol=1e-6)
    assert torch.allclose(d.predict_x0(x_t, t, noise), x0, atol=1e-4)


def test_q_posterior_and_last_step_is_noiseless():
    torch.manual_seed(0)
    d = GaussianDiffusion()
    x0, x_t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    mean, var, log_var = d.q_posterior(x0, x_t, 2)
    expected = d.posterior_mean_coef1[2] * x0 + d.posterior_mean_coef2[2] * x_t
    assert torch.allclose(mean, expected) and var.shape == (2, 1, 1, 1)
    assert torch.allclose(log_var.exp(), var)
    fn, _ = _toy_denoiser()
    cond = torch.randn_like(x_t)
    a = d.p_sample(fn, x_t, cond, 0, torch.randn_like(x_t))
    b = d.p_sample(fn, x_t, cond, 0, torch.randn_like(x_t))
    assert torch.equal(a, b)
    assert torch.allclose(a, d.predict_x0(x_t, 0, fn(x_t, cond, torch.zeros(2).long())))


def test_temperature_scales_the_step_noises_only():
    """`temperature` (our option, behind `LDCSR.sampling_temperature`): the chain with step
    noises n at temperature tau is the chain with noises tau * n; x_T and the generator's draws
    are unchanged, and at 0 the step noises have no effect."""
    d = GaussianDiffusion()
    fn, _ = _toy_denoiser()
    shape, cond = (2, 4, 5, 6), torch.randn(2, 4, 5, 6)
    x_T, noises = draw_noise(shape, 4, torch.Generator().manual_seed(3))
    half = d.sample(fn, x_T, cond, noises, temperature=0.5)
    assert torch.allclose(half, d.sample(fn, x_T, cond, noises * 0.5), atol=1e-6)
    assert (half - d.sample(fn, x_T, cond, noises)).abs().max() > 1e-3
    drawn = d.sample(fn, None, cond, generator=torch.Generator().manual_seed(3), shape=shape,
                     temperature=0.5)  # fmt: skip
    assert torch.equal(drawn, half)
    cold = [d.sample(fn, x_T, cond, n, temperature=0.0) for n in (noises, torch.randn_like(noises))]
    assert torch.equal(cold[0], cold[1])


def test_generator_draw_order_equals_explicit_noise():
    d = GaussianDiffusion()
    fn, _ = _toy_denoiser()
    shape, cond = (2, 4, 5, 6), torch.randn(2, 4, 5, 6)
    x_T, noises = draw_noise(shape, 4, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    expected = [torch.randn(shape, generator=g) for _ in range(5)]  # x_T, then t = 3, 2, 1, 0
    assert torch.equal(x_T, expected[0]) and torch.equal(noises, torch.stack(expected[1:]))
    explicit = sample_trajectory(d, fn, x_T, cond, noises=noises)
    g = torch.Generator().manual_seed(3)
    drawn = sample_trajectory(d, fn, None, cond, generator=g, shape=shape)
    assert torch.equal(explicit[0], drawn[0]) and torch.equal(explicit[1], drawn[1])
    # the t = 0 draw is made (and discarded): the generator advanced by exactly T + 1 draws
    g_ref = torch.Generator().manual_seed(3)
    for _ in range(5):
        torch.randn(shape, generator=g_ref)
    assert torch.equal(torch.randn(1, generator=g), torch.randn(1, generator=g_ref))


def test_sample_is_differentiable():
    d = GaussianDiffusion()
    fn, weight = _toy_denoiser()
    x_T = torch.randn(2, 4, 3, 3)
    z0 = d.sample(fn, x_T, torch.randn_like(x_T), generator=torch.Generator().manual_seed(0))
    z0.square().mean().backward()
    assert weight.grad is not None and weight.grad != 0


def test_bad_noise_shape_fails_clearly():
    fn, _ = _toy_denoiser()
    with pytest.raises(ValueError, match="noises must have shape"):
        GaussianDiffusion().sample(fn, torch.zeros(1, 4, 2, 2), 0.0, noises=torch.zeros(3, 1, 4))
    with pytest.raises(ValueError, match="x_T or shape"):
        GaussianDiffusion().sample(fn, None, 0.0)


def _case_inputs(case):
    b, h_lr = case["cond"].shape[0], case["lr_01"].shape[-2]
    scale = torch.full((b,), case["out_size"][0] / h_lr)  # H_out / h_lr, floored inside the UNet
    out_height = torch.full((b,), case["out_size"][0])
    return scale, out_height


def test_conformance_eps_and_embedding_inputs(reference, ema_unet):
    for case in reference["cases"]:
        scale, out_height = _case_inputs(case)
        assert torch.equal(scale.floor().long(), case["scale_embedding_input"])
        assert torch.equal(out_height, case["osize_embedding_input"])
        x_T, noises = draw_noise(case["x_T"].shape, 4, torch.Generator().manual_seed(case["seed"]))
        assert torch.equal(x_T, case["x_T"]) and torch.equal(noises, case["step_noises"])
        t = torch.full((x_T.shape[0],), 3)
        with torch.no_grad():
            eps = ema_unet(torch.cat([case["x_T"], case["cond"]], 1), t, scale, out_height)
        assert (eps - case["eps_at_T_minus_1"]).abs().max() <= TOL


@pytest.mark.parametrize("use_generator", [False, True])
def test_conformance_sampling_chain(reference, ema_unet, use_generator):
    d = GaussianDiffusion()
    for case in reference["cases"]:
        scale, out_height = _case_inputs(case)

        def denoise_fn(x_t, cond, t, scale=scale, out_height=out_height):
            return ema_unet(torch.cat([x_t, cond], dim=1), t, scale, out_height)

        if use_generator:
            noise = dict(generator=torch.Generator().manual_seed(case["seed"]))
            noise["shape"] = case["cond"].shape
        else:
            noise = dict(x_T=case["x_T"], noises=case["step_noises"])
        with torch.no_grad():
            z0, traj = sample_trajectory(d, denoise_fn, cond=case["cond"], **noise)
        assert (traj - case["trajectory"]).abs().max() <= TOL
        assert (z0 - case["z0"]).abs().max() <= TOL
