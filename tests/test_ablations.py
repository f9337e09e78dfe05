"""The paper's ablations as config overlays: each builds, trains a step, super-resolves x3.3 on a
non-square input, really changes the computation, and runs through the public inference path
(`LDCSR.super_resolve`, `AutoencoderKL.reconstruct`), tiled and untiled, as its plain forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import ROOT, tiny_config
from tests.helpers import randomize_zero_init
from tests.test_tiling import lively, plain_forward
from utils.config import instantiate_from_config

ABLATIONS = sorted((ROOT / "configs" / "ablations").glob("*.yaml"))


def _base_for(path: Path) -> int:
    return 1 if path.name.startswith("first_stage") else 2


def _build(stage: int, overlay: Path | None = None, seed: int = 0):
    config = tiny_config(
        stage, *(["model.params.lossconfig.params.disc_start=0"] if stage == 1 else [])
    )
    if overlay is not None:
        config = OmegaConf.merge(config, OmegaConf.load(overlay))
    torch.manual_seed(seed)
    model = instantiate_from_config(config.model)
    if stage == 2:  # zero-initialised UNet convs would hide the embeddings' effect
        randomize_zero_init(model)
    return model


def _batch(stage: int):
    g = torch.Generator().manual_seed(1)
    hr_hw, lr_hw = ((66, 53), (20, 16)) if stage == 1 else ((48, 40), (16, 13))
    return {
        "hr": torch.rand(2, 3, *hr_hw, generator=g),
        "lr": torch.rand(2, 3, *lr_hw, generator=g),
        "scale": torch.tensor([hr_hw[0] / lr_hw[0]] * 2),
    }


def _one_step(model, stage: int) -> None:
    batch = _batch(stage)
    if stage == 2:
        loss = model.training_losses(batch)["loss"]
    else:
        hr, lr = model.get_input(batch)
        rec, posterior = model(hr, lr)
        loss, _ = model.loss(hr, rec, posterior, 0, 0, model.get_last_layer())
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def _sr_x33(model, stage: int) -> torch.Tensor:
    lr = torch.rand(1, 3, 15, 11, generator=torch.Generator().manual_seed(2))
    out_size = (round(15 * 3.3), round(11 * 3.3))  # non-square, non-integer scale
    with torch.no_grad():
        if stage == 2:
            sr = model.super_resolve(lr, out_size, generator=torch.Generator().manual_seed(0))
        else:
            hr = torch.rand(1, 3, *out_size, generator=torch.Generator().manual_seed(3))
            sr = model(hr * 2 - 1, lr * 2 - 1, sample_posterior=False)[0]
    assert sr.shape[-2:] == out_size
    return sr


@pytest.mark.parametrize("overlay", ABLATIONS, ids=lambda p: p.stem)
def test_ablation_builds_trains_and_super_resolves(overlay):
    stage = _base_for(overlay)
    model = _build(stage, overlay)
    _one_step(model, stage)
    model.zero_grad()
    _sr_x33(model.eval(), stage)


@pytest.mark.parametrize("overlay", ABLATIONS, ids=lambda p: p.stem)
def test_ablation_changes_the_computation(overlay):
    stage = _base_for(overlay)
    paper, ablated = _build(stage), _build(stage, overlay)
    shapes = {k: v.shape for k, v in paper.state_dict().items()}
    other = {k: v.shape for k, v in ablated.state_dict().items()}
    if shapes != other:
        return  # a different parameter set is a different computation
    ablated.load_state_dict(paper.state_dict())  # same weights: only the switch differs
    paper.eval(), ablated.eval()
    if stage == 2 and ablated.l_kd_weight != paper.l_kd_weight:
        torch.manual_seed(0)
        loss_paper = paper.training_losses(_batch(2))["loss"]
        torch.manual_seed(0)
        loss_ablated = ablated.training_losses(_batch(2))["loss"]
        assert not torch.allclose(loss_paper, loss_ablated)
        return
    assert not torch.allclose(_sr_x33(paper, stage), _sr_x33(ablated, stage), atol=1e-5)


def test_paper_configs_are_untouched_by_the_overlays():
    for name in ("first_stage_kl_v6.yaml", "second_stage_van_v4.yaml"):
        text = (ROOT / "configs" / name).read_text()
        assert "ablation" not in text.lower()


# ------------------------------------------------- the public (fast, tiled) path, every overlay
def _stage2_with(overlay: Path):
    """A tiny stage-2 model with the overlay (a stage-1 one applies to its first stage)."""
    extra = OmegaConf.load(overlay)
    if _base_for(overlay) == 1:
        extra = OmegaConf.create({"model": {"params": {"first_stage_config": extra.model}}})
    torch.manual_seed(0)
    return lively(instantiate_from_config(OmegaConf.merge(tiny_config(2), extra).model))


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and (a - b).abs().max() <= 1e-4, (a - b).abs().max()


SR_OVERLAYS = [p for p in ABLATIONS if "no_latent" not in p.name]  # stage 2 needs a latent


@pytest.mark.parametrize("overlay", SR_OVERLAYS, ids=lambda p: p.stem)
def test_super_resolve_tiled_and_untiled_equals_the_plain_forward(overlay):
    model = _stage2_with(overlay)
    lr = torch.rand(1, 3, 16, 20, generator=torch.Generator().manual_seed(2))
    out_size = (53, 66)  # x3.3
    ref = plain_forward(model, lr, out_size, 0)
    _close(model.super_resolve(lr, out_size, generator=torch.Generator().manual_seed(0)), ref)
    tiled = model.super_resolve(
        lr, out_size, generator=torch.Generator().manual_seed(0), tile=16, tile_overlap=4
    )
    _close(tiled, ref)


@pytest.mark.parametrize(
    "overlay", [p for p in ABLATIONS if _base_for(p) == 1], ids=lambda p: p.stem
)
def test_reconstruct_tiled_and_untiled_equals_the_plain_forward(overlay):
    model = lively(_build(1, overlay)).eval()
    g = torch.Generator().manual_seed(2)
    lr, hr = torch.rand(1, 3, 16, 20, generator=g), torch.rand(1, 3, 53, 66, generator=g)
    with torch.enable_grad():
        ref = (
            model(hr * 2 - 1, lr * 2 - 1, sample_posterior=False)[0].detach().clamp(-1, 1) + 1
        ) / 2
    _close(model.reconstruct(lr, hr), ref)
    _close(model.reconstruct(lr, hr, tile=16, tile_overlap=4), ref)
