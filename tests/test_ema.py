"""Tests of ldm/ema.py: the authors' ``model_ema.*`` key names, the update rule, swap/restore."""

import pytest
import torch
from torch import nn

from ldm.ema import LitEma
from ldm.unet import UNetModel
from tests.helpers import official_keys


class Wrapper(nn.Module):
    """Stands for the stage-2 module's ``self.model`` (the UNet under ``.diffusion_model``)."""

    def __init__(self, unet):
        super().__init__()
        self.diffusion_model = unet


def test_names_match_official_keys():
    official = set(official_keys("second_stage", "model_ema."))
    unet = UNetModel(64, 8, 64, 4, 2, [8], channel_mult=[1, 2, 2, 4], num_head_channels=32)
    assert set(LitEma(Wrapper(unet)).state_dict()) == official
    assert "diffusion_modeltime_embed0weight" in official


def test_conformance_ema_loads_without_decay_and_num_updates(conformance):
    ref = conformance
    model = Wrapper(UNetModel(**ref["config"]["model"]["params"]["unet_config"]["params"]))
    ema = LitEma(model)
    sd = {
        k[len("model_ema.") :]: v
        for k, v in ref["state_dict"].items()
        if k.startswith("model_ema.")
    }
    missing, unexpected = ema.load_state_dict(sd, strict=False)
    assert sorted(missing) == ["decay", "num_updates"] and unexpected == []
    ema.copy_to(model)
    for name, p in model.named_parameters():
        assert torch.equal(p, ref["state_dict"]["model_ema." + name.replace(".", "")])


def test_update_math():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model[1].bias.requires_grad_(False)
    ema = LitEma(model, decay=0.9999)
    assert "1bias" not in dict(ema.named_buffers())
    assert ema.num_updates.dtype == torch.int and int(ema.num_updates) == 0
    shadow = model[0].weight.detach().clone()
    for n in (1, 2, 3):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        ema(model)
        d = min(0.9999, (1 + n) / (10 + n))  # n counts this update
        shadow = d * shadow + (1 - d) * model[0].weight.detach()
        assert int(ema.num_updates) == n
        assert torch.allclose(getattr(ema, "0weight"), shadow, atol=1e-6)

    fixed = LitEma(model, decay=0.5, use_num_updates=False)
    before = getattr(fixed, "0weight").clone()
    with torch.no_grad():
        model[0].weight.add_(2.0)
    fixed.update(model)
    assert int(fixed.num_updates) == -1
    assert torch.allclose(getattr(fixed, "0weight"), 0.5 * before + 0.5 * model[0].weight)


def test_copy_to_store_restore():
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    ema = LitEma(model)
    with torch.no_grad():
        ema.weight.fill_(7.0)
    original = [p.detach().clone() for p in model.parameters()]
    with ema.average_parameters(model):
        assert torch.all(model.weight == 7.0)
    assert all(torch.equal(a, b) for a, b in zip(original, model.parameters()))
    ema.store(model.parameters())
    ema.copy_to(model)
    ema.restore(model.parameters())
    assert torch.equal(model.weight, original[0])


def test_bad_decay_fails_clearly():
    with pytest.raises(ValueError, match="decay"):
        LitEma(nn.Linear(1, 1), decay=1.5)
