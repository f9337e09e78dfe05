"""train.py end to end on tiny configs, and the stage-2 objective's gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import train
from tests.conftest import ROOT, tiny_config
from tests.helpers import randomize_zero_init
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
    best = torch.load(stage1_run / "checkpoints" / "best.ckpt", weights_only=False)  # stable name
    assert "val/psnr" in str(best["callbacks"])  # kept by the config's monitor
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
        f"model.params.first_stage_config.params.ckpt_path={stage1_run}/checkpoints/best.ckpt",
        f"data.params.data_root={image_dir}",
        "data.params.train.params.hr_size=64",
        "lightning.trainer.max_steps=2",
        *FAST,
    )
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    state = ckpt["state_dict"]
    assert state["scale_factor"].item() != 1.0  # scale_by_std ran on the first batch
    assert state["model_ema.num_updates"].item() == 2
    stage1 = torch.load(stage1_run / "checkpoints" / "best.ckpt", weights_only=False)["state_dict"]
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


def test_train_py_sets_and_logs_the_lr_rule(caplog, tmp_path, image_dir):
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
    assert "not counted: model.scale_lr_by_devices" in line  # the authors' rule by default


def test_lr_rule_is_the_authors_batch_x_accumulation_unless_scale_lr_by_devices():
    from types import SimpleNamespace

    from training.trainer import set_learning_rate

    trainer = SimpleNamespace(
        accumulate_grad_batches=2, num_devices=4, num_nodes=3, is_global_zero=False
    )
    model = SimpleNamespace()
    for name in ("first_stage_kl_v6.yaml", "second_stage_van_v4.yaml"):
        config = OmegaConf.load(ROOT / "configs" / name)
        base, batch = config.model.base_learning_rate, config.data.params.batch_size
        assert config.model.scale_lr_by_devices is False  # the paper configs: the authors' rule
        assert set_learning_rate(model, config, trainer) == pytest.approx(base * batch * 2)
        config.model.scale_lr_by_devices = True  # ours: linear in the global batch
        lr = set_learning_rate(model, config, trainer)
        assert lr == pytest.approx(base * batch * 2 * 4 * 3) == model.learning_rate


# ------------------------------------------- stage 1 trains as the authors' code did (issue 12)
class _Recorder:
    """Spies on one stage-1 fit: the RNG state at each forward, the reconstruction and step each
    loss call gets, and the mode of every perceptual-net Dropout in each phase."""

    def __init__(self, model):
        self.forward_rng, self.loss_calls, self.dropout, self.phase = [], [], [], None
        forward, loss_forward = model.forward, model.loss.forward

        def spy_forward(*args, **kwargs):
            self.forward_rng.append(torch.get_rng_state())
            return forward(*args, **kwargs)

        def spy_loss(inputs, rec, posterior, idx, step, *args, **kwargs):
            self.loss_calls.append((self.phase, idx, step, rec.detach().clone()))
            return loss_forward(inputs, rec, posterior, idx, step, *args, **kwargs)

        model.forward, model.loss.forward = spy_forward, spy_loss
        for phase in ("training_step", "validation_step"):
            setattr(model, phase, self._in_phase(phase, getattr(model, phase)))
        for m in model.loss.perceptual_loss.modules():
            if isinstance(m, torch.nn.Dropout):
                m.register_forward_hook(
                    lambda mod, i, o: self.dropout.append((self.phase, mod.training))
                )

    def _in_phase(self, phase, fn):
        def wrapped(*args, **kwargs):
            self.phase = phase
            return fn(*args, **kwargs)

        return wrapped

    def train_calls(self, idx):
        return [c for c in self.loss_calls if c[0] == "training_step" and c[1] == idx]


class _Perceptual(torch.nn.Module):
    """An LPIPS stand-in for the tiny model: a frozen conv, then taming's Dropout + 1x1 head."""

    def __init__(self):
        super().__init__()
        self.conv, self.drop, self.lin = (
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.Dropout(),
            torch.nn.Conv2d(8, 1, 1, bias=False),
        )

    def forward(self, a, b):
        diff = (self.conv(a) - self.conv(b)) ** 2
        return self.lin(self.drop(diff)).mean(dim=(1, 2, 3), keepdim=True)


def _stage1_batch(n=2, size=32):
    g = torch.Generator().manual_seed(3)
    hr = torch.rand(n, 3, size, size, generator=g)
    lr = torch.nn.functional.interpolate(hr, scale_factor=0.5, mode="bicubic", antialias=True)
    return {"hr": hr, "lr": lr.clamp(0, 1), "scale": torch.full((n,), 2.0)}


def _fit(model, tmp_path, batches=1):
    """Fits `model` on `batches` copies of one batch, then one validation batch."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    batch = _stage1_batch()
    recorder = _Recorder(model)
    trainer = pl.Trainer(
        max_steps=2 * batches,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        default_root_dir=str(tmp_path),
    )
    train_loader = DataLoader([batch] * batches, batch_size=None)
    trainer.fit(model, train_loader, DataLoader([batch], batch_size=None))
    return recorder, batch


@pytest.fixture(scope="module")
def paper_stage1(tmp_path_factory):
    """The stage-1 paper config (LPIPS on random VGG weights), fitted on one batch."""
    from tests.conftest import ROOT
    from tests.helpers import write_random_weights

    tmp = tmp_path_factory.mktemp("paper_stage1")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp))
        write_random_weights(tmp, ["vgg16"])
        torch.manual_seed(0)
        model = instantiate_from_config(
            OmegaConf.load(ROOT / "configs/first_stage_kl_v6.yaml").model
        )
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    recorder, batch = _fit(model, tmp)
    return model, initial, recorder, batch


def test_paper_stage1_logvar_is_in_no_optimiser_and_unchanged(paper_stage1):
    model, initial, _, _ = paper_stage1
    params = [p for opt in model.trainer.optimizers for g in opt.param_groups for p in g["params"]]
    assert all(p is not model.loss.logvar for p in params)
    assert model.loss.logvar.item() == initial["loss.logvar"].item() == 0.0
    assert not torch.equal(model.decoder.last_layer, initial["decoder.upsampler.fuse.8.weight"])


def test_paper_stage1_lpips_dropout_on_in_training_off_in_validation(paper_stage1):
    dropout = paper_stage1[2].dropout
    train = [mode for phase, mode in dropout if phase == "training_step"]
    val = [mode for phase, mode in dropout if phase == "validation_step"]
    assert len(train) == 5 and all(train)  # one generator loss, 5 LPIPS heads
    assert val and not any(val)


def test_paper_stage1_discriminator_sees_a_new_forward_of_the_updated_autoencoder(paper_stage1):
    model, initial, recorder, batch = paper_stage1
    (gen,), (disc,) = recorder.train_calls(0), recorder.train_calls(1)
    assert len(recorder.forward_rng) == 3  # generator, discriminator, validation
    hr, lr = model.get_input(batch)

    def replay(state, rng):
        model.load_state_dict(state)
        torch.set_rng_state(rng)
        with torch.no_grad():
            return model(hr, lr)[0]

    updated = {k: v.clone() for k, v in model.state_dict().items()}
    assert torch.allclose(replay(updated, recorder.forward_rng[1]), disc[3], atol=1e-6)
    assert torch.allclose(replay(initial, recorder.forward_rng[0]), gen[3], atol=1e-6)
    stale = replay(initial, recorder.forward_rng[1])  # new sample, weights before the update
    assert not torch.allclose(stale, disc[3], atol=1e-4)
    model.load_state_dict(updated)
    assert model.hparams.val_sample_posterior  # validation decoded a sample (third forward)


def _tiny_stage1(*overrides):
    torch.manual_seed(0)
    model = instantiate_from_config(tiny_config(1, *overrides).model)
    model.loss.perceptual_loss, model.loss.perceptual_weight = _Perceptual(), 1.0
    model.loss.perceptual_loss.requires_grad_(False)
    return model


def test_stage1_options_shared_forward_learned_logvar_lpips_eval(tmp_path):
    model = _tiny_stage1(
        "model.params.shared_disc_forward=true",
        "model.params.learn_logvar=true",
        "model.params.lossconfig.params.lpips_eval_mode=true",
    )
    recorder, _ = _fit(model, tmp_path, batches=2)
    gens, discs = recorder.train_calls(0), recorder.train_calls(1)
    for gen, disc in zip(gens, discs, strict=True):  # the generator step's reconstruction
        assert torch.equal(gen[3], disc[3])
    assert [c[2] for c in gens] == [0, 1]  # disc_start counts batches, not optimiser steps
    assert len(recorder.forward_rng) == 3  # one forward per batch, plus validation
    assert model.loss.logvar.item() != 0.0  # optimised with the autoencoder
    assert recorder.dropout and not any(mode for _, mode in recorder.dropout)


@pytest.mark.parametrize(
    "counts, gen_steps, disc_steps",
    [("batches", [0, 1], [0, 1]), ("optimizer_steps", [0, 2], [1, 3])],
)
def test_disc_start_counts_batches_by_default_optimizer_steps_as_option(
    tmp_path, counts, gen_steps, disc_steps
):
    overrides = [] if counts == "batches" else [f"model.params.disc_start_counts={counts}"]
    model = _tiny_stage1("model.params.shared_disc_forward=true", *overrides)
    assert model.disc_start_counts == counts
    recorder, _ = _fit(model, tmp_path, batches=2)
    assert [c[2] for c in recorder.train_calls(0)] == gen_steps  # the step disc_start sees
    assert [c[2] for c in recorder.train_calls(1)] == disc_steps
    paper = OmegaConf.load(ROOT / "configs" / "first_stage_kl_v6.yaml").model.params
    assert paper.disc_start_counts == "batches"


def test_stage1_default_takes_two_forwards_and_validates_on_a_sample(tmp_path):
    model = _tiny_stage1()
    recorder, batch = _fit(model, tmp_path)
    gen, disc = recorder.train_calls(0)[0], recorder.train_calls(1)[0]
    assert not torch.equal(gen[3], disc[3]) and len(recorder.forward_rng) == 3
    hr, lr = model.get_input(batch)
    torch.set_rng_state(recorder.forward_rng[2])
    with torch.no_grad():
        sample = model(hr, lr)[0]
        mode = model(hr, lr, sample_posterior=False)[0]
    val = [c for c in recorder.loss_calls if c[0] == "validation_step"][0][3]
    assert torch.allclose(val, sample, atol=1e-6) and not torch.allclose(val, mode, atol=1e-5)
    deterministic = _tiny_stage1("model.params.val_sample_posterior=false")
    recorder, _ = _fit(deterministic, tmp_path / "mode")
    val = [c for c in recorder.loss_calls if c[0] == "validation_step"][0][3]
    with torch.no_grad():
        assert torch.allclose(val, deterministic(hr, lr, sample_posterior=False)[0], atol=1e-6)
