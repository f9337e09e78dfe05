"""The conformance fixture's weight recipe: deterministic, and equal bit for bit to the full
reference file where the project's reference folder is present."""

from __future__ import annotations

import pytest
import torch

from tests.conformance_weights import (
    EMA_COUNTERS,
    FIXTURE,
    SCHEDULE_BUFFERS,
    ema_name,
    regenerate_state_dict,
    seeded_tensor,
)
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def compact() -> dict:
    return torch.load(FIXTURE, map_location="cpu", weights_only=False)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def test_fixture_holds_cases_and_recipe_but_no_weights(compact):
    assert "state_dict" not in compact
    assert compact["weights"]["recipe"] == "seeded-v1"
    assert len(compact["cases"]) >= 3


def test_regenerated_state_dict_covers_every_stored_key(compact):
    state_dict = regenerate_state_dict(compact)
    expected = {k for k, _ in compact["key_shapes"]} - SCHEDULE_BUFFERS - EMA_COUNTERS
    assert set(state_dict) == expected
    assert state_dict["scale_factor"].item() == pytest.approx(0.9)
    for key, shape in compact["key_shapes"]:
        if key in state_dict:
            assert tuple(state_dict[key].shape) == tuple(shape), key
            assert state_dict[key].dtype == torch.float32, key
    # EMA weights are close to, but not equal to, the raw ones (sampling must pick the EMA ones).
    key = "model.diffusion_model.out.2.weight"
    diff = (state_dict[ema_name(key)] - state_dict[key]).abs().max().item()
    assert 0 < diff < 0.1


def test_recipe_rules():
    weight = seeded_tensor("x.conv.weight", (8, 4, 3, 3), seed=7)
    assert torch.equal(weight, seeded_tensor("x.conv.weight", (8, 4, 3, 3), seed=7))
    assert not torch.equal(weight, seeded_tensor("x.conv.weight", (8, 4, 3, 3), seed=8))
    assert weight.std().item() == pytest.approx(1 / 6, rel=0.2)  # randn / sqrt(4 * 3 * 3)
    norm_scale, bias = seeded_tensor("n.weight", (512,), 7), seeded_tensor("n.bias", (512,), 7)
    assert norm_scale.mean().item() == pytest.approx(1, abs=0.03)
    assert norm_scale.std().item() == pytest.approx(0.1, rel=0.2)
    assert bias.mean().item() == pytest.approx(0, abs=0.03)
    assert bias.std().item() == pytest.approx(0.1, rel=0.2)
    assert ema_name("model.diffusion_model.out.2.weight") == "model_ema.diffusion_modelout2weight"


def test_unknown_recipe_is_refused(compact):
    with pytest.raises(ValueError, match="seeded-v1"):
        regenerate_state_dict({**compact, "weights": {**compact["weights"], "recipe": "v2"}})


def test_regenerated_equals_full_reference_bit_for_bit(compact):
    full = torch.load(
        shared_path("reference", "conformance_small.pt"), map_location="cpu", weights_only=False
    )
    state_dict = regenerate_state_dict(compact)
    assert set(state_dict) == set(full["state_dict"])
    for key, value in full["state_dict"].items():
        assert state_dict[key].shape == value.shape, key
        assert torch.equal(_bits(state_dict[key]), _bits(value)), f"{key} differs"
    assert compact["config"] == full["config"]
    for got, want in zip(compact["cases"], full["cases"], strict=True):
        for field, value in want.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[field], value), field
            else:
                assert got[field] == value, field
