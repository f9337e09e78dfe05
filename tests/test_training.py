"""train.py end to end on tiny configs, and the stage-2 objective's gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import train
from models.ldcsr import randomize_zero_init
from tests.conftest import tiny_config
from utils.config import ConfigError, instantiate_from_config


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """12 smooth random RGB images of 112x96 (large enough for x3 crops of 32 px LR)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(12):
        small = rng.integers(0, 256, (14, 12, 3), dtype=np.uint8)
        Image.fromarray(small).resize((96, 112), Image.BICUBIC).save(folder / f"img_{i:02d}.png")
    return folder


def _train(tmp_path, config: str, *overrides: str):
    train.main(["--config", config, "--logdir", str(tmp_path / "logs"), "--seed", "1", *overrides])
    (run,) = (tmp_path / "logs").glob("*/*")
    return run


FAST = ("lightning.trainer.limit_val_batches=1", "lightning.trainer.enable_progress_bar=false")


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory, image_dir):
    tmp = tmp_path_factory.mktemp("stage1")
    return _train(
        tmp,
        "configs/tiny/first_stage.yaml",
        f"data.params.data_root={image_dir}",
        "data.params.train.params.max_scale=3.0",
        "lightning.trainer.max_steps=4",  # manual optimisation: 2 optimiser steps per batch
        *FAST,
    )


def test_stage1_run_folder(stage1_run):
    assert (stage1_run / "checkpoints" / "last.ckpt").is_file()
    saved = OmegaConf.load(stage1_run / "configs" / "first_stage.yaml")
    assert saved.data.params.train.params.max_scale == 3.0
    ckpt = torch.load(stage1_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["batches_seen"] == 2 and ckpt["config"]["model"]["target"].endswith("AutoencoderKL")
    assert (stage1_run / "csv" / "metrics.csv").is_file()
    assert list((stage1_run / "images").glob("*.png"))


def test_stage2_trains_on_a_stage1_checkpoint(tmp_path, stage1_run, image_dir):
    run = _train(
        tmp_path,
        "configs/tiny/second_stage.yaml",
        f"model.params.first_stage_config.params.ckpt_path={stage1_run}/checkpoints/last.ckpt",
        f"data.params.data_root={image_dir}",
        "data.params.train.params.hr_size=64",
        "lightning.trainer.max_steps=2",
        *FAST,
    )
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    state = ckpt["state_dict"]
    assert state["scale_factor"].item() != 1.0  # scale_by_std ran on the first batch
    assert state["model_ema.num_updates"].item() == 2
    stage1 = torch.load(stage1_run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    key = "decoder.head.weight"
    assert torch.equal(state[f"first_stage_model.{key}"], stage1[key])  # frozen, loaded


def test_stage2_without_stage1_checkpoint_is_a_clear_error(tmp_path, image_dir):
    with pytest.raises(ConfigError, match="first_stage_config.params.ckpt_path"):
        _train(
            tmp_path,
            "configs/tiny/second_stage.yaml",
            f"data.params.data_root={image_dir}",
            "lightning.trainer.max_steps=1",
            *FAST,
        )


def test_unknown_override_key_names_it(tmp_path):
    with pytest.raises(ConfigError, match="model.params.embed_dimm"):
        train.main(["--config", "configs/tiny/first_stage.yaml", "model.params.embed_dimm=4"])


def test_gradient_reaches_unet_and_condition_encoder_through_all_steps():
    torch.manual_seed(0)
    model = instantiate_from_config(tiny_config(2).model)
    randomize_zero_init(model)  # a fresh UNet's zero output conv passes no gradient inward
    unet = model.model.diffusion_model
    outputs = []
    unet.register_forward_hook(lambda m, args, out: outputs.append(out))
    batch = {"hr": torch.rand(2, 3, 64, 48), "lr": torch.rand(2, 3, 21, 16)}
    losses = model.training_losses(batch)
    for out in outputs:
        out.retain_grad()
    losses["loss"].backward()
    assert len(outputs) == model.diffusion.num_timesteps == 4
    for step, out in enumerate(outputs):  # every unrolled step receives a gradient
        assert out.grad is not None and out.grad.abs().sum() > 0, f"step {step}"
    assert unet.input_blocks[0][0].weight.grad.abs().sum() > 0
    assert model.cond_stage_model.conv_in.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.first_stage_model.parameters())


def test_lr_rule_counts_batch_devices_accumulation(caplog, tmp_path, image_dir):
    caplog.set_level("INFO")
    _train(
        tmp_path,
        "configs/tiny/first_stage.yaml",
        f"data.params.data_root={image_dir}",
        "data.params.train.params.max_scale=3.0",
        "lightning.trainer.max_steps=2",
        "lightning.trainer.limit_val_batches=0",
        "lightning.trainer.enable_progress_bar=false",
    )
    line = next(r.getMessage() for r in caplog.records if "learning rate" in r.getMessage())
    assert "4.00e-04 = 1.00e-04 (base) x 4 (batch) x 1 (devices)" in line
