"""Stage-1 loss (ldm/losses.py): PatchGAN, GAN losses, adaptive weight, LPIPS key names."""

import urllib.error
from functools import partial

import pytest
import torch
from torch import nn

from ldm.losses import (
    LPIPSWithDiscriminator,
    NLayerDiscriminator,
    adopt_weight,
    hinge_d_loss,
    vanilla_d_loss,
    weights_init,
)
from tests.conftest import tiny_config
from tests.helpers import write_random_weights
from utils.config import instantiate_from_config
from utils.weights import MissingWeightsError, build_lpips


class TinyPerceptual(nn.Module):
    """LPIPS stand-in: (a, b) -> [B, 1, 1, 1], with a parameter and a dropout."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(0.5)

    def forward(self, a, b):
        return (self.drop(self.conv(a) - self.conv(b)) ** 2).mean(dim=(1, 2, 3), keepdim=True)


class Posterior:
    """Stand-in for the diagonal Gaussian posterior: only ``kl() -> [B]`` is used."""

    def __init__(self, kl):
        self._kl = kl

    def kl(self):
        return self._kl


def _setup(disc_start=10, **kwargs):
    torch.manual_seed(0)
    loss = LPIPSWithDiscriminator(disc_start, build_perceptual=TinyPerceptual, **kwargs)
    decoder = nn.Conv2d(3, 3, 3, padding=1)  # its weight plays the decoder's last layer
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    rec = decoder(x + 0.1 * torch.randn_like(x))
    posterior = Posterior(torch.rand(2, requires_grad=True) * 100)
    return loss, decoder, x, rec, posterior


def _blocked_download(*args, **kwargs):
    raise urllib.error.URLError("network disabled in tests")


def test_discriminator_layout_shape_and_init():
    torch.manual_seed(0)
    disc = NLayerDiscriminator().apply(weights_init)
    assert disc(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    # taming's layout: conv, lrelu, 2x (conv no bias, BN, lrelu), conv s1, BN, lrelu, conv
    shapes = {k: tuple(v.shape) for k, v in disc.state_dict().items()}
    assert shapes["main.0.weight"] == (64, 3, 4, 4) and "main.0.bias" in shapes
    assert shapes["main.2.weight"] == (128, 64, 4, 4) and "main.2.bias" not in shapes
    assert shapes["main.5.weight"] == (256, 128, 4, 4)
    assert shapes["main.8.weight"] == (512, 256, 4, 4)
    assert shapes["main.9.running_var"] == (512,)
    assert shapes["main.11.weight"] == (1, 512, 4, 4) and "main.11.bias" in shapes
    assert sum(p.numel() for p in disc.parameters()) == 2_765_633
    conv_w, bn = disc.main[8].weight, disc.main[9]
    assert abs(conv_w.mean().item()) < 1e-3 and abs(conv_w.std().item() - 0.02) < 5e-4
    assert abs(bn.weight.mean().item() - 1) < 5e-3 and abs(bn.weight.std().item() - 0.02) < 5e-3
    assert torch.all(bn.bias == 0)
    actnorm = NLayerDiscriminator(use_actnorm=True)
    assert "main.2.bias" in actnorm.state_dict() and "main.3.loc" in actnorm.state_dict()


def test_gan_losses_on_known_logits():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> 5/6; relu(1 + fake) = [0, 1, 2] -> 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    bce = nn.functional.binary_cross_entropy_with_logits
    expected = 0.5 * (bce(real, torch.ones(3)) + bce(fake, torch.zeros(3)))
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected.item())
    assert adopt_weight(1.0, 9, threshold=10) == 0.0 and adopt_weight(1.0, 10, threshold=10) == 1.0


def test_generator_loss_and_adaptive_weight_match_manual_autograd():
    loss_fn, decoder, x, rec, posterior = _setup(disc_start=0, kl_weight=1e-6, disc_weight=0.5)
    loss_fn.perceptual_loss.eval()  # deterministic LPIPS stand-in for the comparison
    loss, log = loss_fn(x, rec, posterior, 0, global_step=0, last_layer=decoder.weight)
    rec_loss = (x - rec).abs() + loss_fn.perceptual_loss(x, rec)
    nll = torch.sum(rec_loss / torch.exp(loss_fn.logvar) + loss_fn.logvar) / 2
    g = -loss_fn.discriminator(rec).mean()
    grad_nll = torch.autograd.grad(nll, decoder.weight, retain_graph=True)[0]
    grad_g = torch.autograd.grad(g, decoder.weight, retain_graph=True)[0]
    d_weight = (grad_nll.norm() / (grad_g.norm() + 1e-4)).clamp(0, 1e4) * 0.5
    kl = posterior.kl().sum() / 2
    assert log["train/d_weight"].item() == pytest.approx(d_weight.item(), rel=1e-5)
    assert loss.item() == pytest.approx((nll + 1e-6 * kl + d_weight * g).item(), rel=1e-5)
    assert log["train/nll_loss"].item() == pytest.approx(nll.item(), rel=1e-6)
    assert log["train/g_loss"].item() == pytest.approx(g.item(), rel=1e-6)
    expected = {"total_loss", "logvar", "kl_loss", "nll_loss", "rec_loss", "d_weight"}
    assert set(log) == {f"train/{k}" for k in expected | {"disc_factor", "g_loss"}}


def test_disc_factor_gated_by_disc_start():
    loss_fn, decoder, x, rec, posterior = _setup(disc_start=10)
    for step, factor in ((9, 0.0), (10, 1.0)):
        _, log = loss_fn(x, rec, posterior, 0, step, last_layer=decoder.weight, split="val")
        assert log["val/disc_factor"].item() == factor
        d_loss, log = loss_fn(x, rec, posterior, 1, step)
        assert (d_loss.item() == 0.0) == (factor == 0.0)
        assert set(log) == {"train/disc_loss", "train/logits_real", "train/logits_fake"}


def test_backward_reaches_logvar_and_discriminator_not_perceptual_net():
    loss_fn, decoder, x, rec, posterior = _setup(disc_start=0)
    loss_fn.train()
    assert loss_fn.perceptual_loss.training  # the authors': LPIPS follows .train()
    assert not any(p.requires_grad for p in loss_fn.perceptual_loss.parameters())
    loss, _ = loss_fn(x, rec, posterior, 0, 0, last_layer=decoder.weight)
    loss.backward()
    assert loss_fn.logvar.requires_grad and loss_fn.logvar.grad is not None
    d_loss, _ = loss_fn(x, rec, posterior, 1, 0)
    d_loss.backward()
    assert loss_fn.discriminator.main[0].weight.grad is not None
    with pytest.raises(ValueError, match="last_layer"):
        loss_fn(x, rec, posterior, 0, 0)
    loss_fn.eval()
    assert not loss_fn.perceptual_loss.training
    with torch.no_grad():  # validation: no graph, the adaptive weight falls back to 0
        _, log = loss_fn(x, rec, posterior, 0, 0, last_layer=decoder.weight, split="val")
    assert log["val/d_weight"].item() == 0.0


def test_default_perceptual_net_has_the_authors_key_names(tmp_path, monkeypatch):
    """The LPIPS(VGG) the stage-1 model passes (utils.weights.build_lpips) keeps taming's keys."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _blocked_download)
    write_random_weights(tmp_path, ["vgg16"])
    loss_fn = LPIPSWithDiscriminator(disc_start=0, build_perceptual=partial(build_lpips, "vgg"))
    keys = [k for k in loss_fn.state_dict() if k.startswith("perceptual_loss.")]
    vgg_convs = {1: (0, 2), 2: (5, 7), 3: (10, 12, 14), 4: (17, 19, 21), 5: (24, 26, 28)}
    taming = ["perceptual_loss.scaling_layer.shift", "perceptual_loss.scaling_layer.scale"]
    taming += [
        f"perceptual_loss.net.slice{s}.{i}.{p}"
        for s, idx in vgg_convs.items()
        for i in idx
        for p in ("weight", "bias")
    ]
    taming += [f"perceptual_loss.lin{k}.model.1.weight" for k in range(5)]
    assert keys == taming
    assert (
        "logvar" in loss_fn.state_dict() and "discriminator.main.0.weight" in loss_fn.state_dict()
    )
    loss_fn.load_state_dict(loss_fn.state_dict(), strict=True)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert loss_fn.perceptual_loss(x, y).shape == (2, 1, 1, 1)
    # taming's LPIPS has a dropout in front of each of the 5 linear heads (use_dropout=True)
    drops = [m for m in loss_fn.perceptual_loss.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 5 and all(d.p == 0.5 for d in drops)
    loss_fn.train()  # the authors' mode while training: the dropout is active
    torch.manual_seed(0)
    assert not torch.equal(loss_fn.perceptual_loss(x, y), loss_fn.perceptual_loss(x, y))
    loss_fn.eval()
    assert torch.equal(loss_fn.perceptual_loss(x, y), loss_fn.perceptual_loss(x, y))


def test_missing_vgg_weights_message(tmp_path, monkeypatch):
    """A stage-1 model with the LPIPS term and no VGG16 file offline says what to place where."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert torch.hub.get_dir() == str(tmp_path / "hub")
    # torchvision binds load_state_dict_from_url at import, so block the download itself
    monkeypatch.setattr(torch.hub, "download_url_to_file", _blocked_download)
    config = tiny_config(1, "model.params.lossconfig.params.perceptual_weight=1.0")
    with pytest.raises(MissingWeightsError) as info:
        instantiate_from_config(config.model)
    message = str(info.value)
    assert "'vgg16-397923af.pth'" in message and "stage-1 perceptual loss" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message


def test_perceptual_weight_needs_a_perceptual_net():
    with pytest.raises(ValueError, match="perceptual_weight 1.0 needs build_perceptual"):
        LPIPSWithDiscriminator(disc_start=0)
    loss_fn = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0)  # builds nothing
    assert not hasattr(loss_fn, "perceptual_loss")


def test_lpips_eval_mode_option_keeps_the_perceptual_net_deterministic():
    loss_fn, *_ = _setup(lpips_eval_mode=True)
    loss_fn.train()
    assert loss_fn.training and loss_fn.discriminator.training
    assert not loss_fn.perceptual_loss.training
    default, *_ = _setup()
    assert default.train().perceptual_loss.training and not default.eval().perceptual_loss.training


@pytest.mark.parametrize("step", [9, 10])  # disc_start 10: one step before, one at the start
def test_losses_match_the_authors_formulas_around_disc_start(step):
    """Every logged part re-derived from latent-diffusion's formulas, before and after
    disc_start, with a non-zero logvar and disc_factor 0.7."""
    kw = dict(kl_weight=1e-3, disc_weight=0.5, perceptual_weight=0.8, disc_factor=0.7)
    loss_fn, decoder, x, rec, posterior = _setup(disc_start=10, logvar_init=0.3, **kw)
    loss_fn.train()
    loss_fn.perceptual_loss.eval()  # deterministic LPIPS on both sides of the comparison
    loss, log = loss_fn(x, rec, posterior, 0, step, decoder.weight, split="train")

    lv, batch = 0.3, x.shape[0]
    rec_px = (x - rec).abs() + 0.8 * loss_fn.perceptual_loss(x, rec)  # [B, 3, H, W]
    nll_px = rec_px / torch.exp(torch.tensor(lv)) + lv
    nll = nll_px.sum() / batch
    kl = posterior.kl().sum() / batch
    g = -loss_fn.discriminator(rec).mean()
    grads = [torch.autograd.grad(t, decoder.weight, retain_graph=True)[0] for t in (nll, g)]
    d_weight = torch.clamp(grads[0].norm() / (grads[1].norm() + 1e-4), 0.0, 1e4) * 0.5
    factor = 0.0 if step < 10 else 0.7
    expected = {
        "total_loss": nll + 1e-3 * kl + d_weight * factor * g,
        "logvar": torch.tensor(lv),
        "kl_loss": kl,
        "nll_loss": nll,
        "rec_loss": rec_px.mean(),
        "d_weight": d_weight,
        "disc_factor": torch.tensor(factor),
        "g_loss": g,
    }
    assert set(log) == {f"train/{k}" for k in expected}
    for key, value in expected.items():
        assert log[f"train/{key}"].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key
    assert loss.item() == pytest.approx(expected["total_loss"].item(), rel=1e-5)
    assert loss.requires_grad and not log["train/d_weight"].requires_grad  # d_weight detached

    d_loss, log = loss_fn(x, rec, posterior, 1, step, decoder.weight, split="val")
    real, fake = loss_fn.discriminator(x), loss_fn.discriminator(rec.detach())
    hinge = 0.5 * (torch.relu(1 - real).mean() + torch.relu(1 + fake).mean())
    assert set(log) == {"val/disc_loss", "val/logits_real", "val/logits_fake"}
    assert d_loss.item() == pytest.approx(factor * hinge.item(), rel=1e-5, abs=1e-7)
    assert log["val/disc_loss"].item() == pytest.approx(factor * hinge.item(), rel=1e-5, abs=1e-7)
    assert log["val/logits_real"].item() == pytest.approx(real.mean().item(), rel=1e-5)
    assert log["val/logits_fake"].item() == pytest.approx(fake.mean().item(), rel=1e-5)
