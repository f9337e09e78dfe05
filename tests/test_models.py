"""Checkpoint format of the paper configs, and the checkpoint loaders."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from models import load_first_stage_model, load_sr_model
from tests.conftest import ROOT, tiny_config
from tests.helpers import official_keys
from utils.checkpoint import read_checkpoint, read_state_dict
from utils.config import ConfigError, instantiate_from_config, translate_authors_config


def _shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def _paper(name: str, *overrides: str):
    config = OmegaConf.load(ROOT / "configs" / name)
    config.merge_with_dotlist(list(overrides))
    return config


def test_paper_stage1_state_dict_is_the_authors():
    config = _paper("first_stage_kl_v6.yaml", "model.params.lossconfig=null")
    model = instantiate_from_config(config.model)
    assert _shapes(model) == official_keys("first_stage")
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params / 1e6 - 12.89) < 0.01


def test_paper_stage2_state_dict_is_the_authors():
    config = _paper("second_stage_van_v4.yaml")
    model = instantiate_from_config(config.model)  # ckpt_path ??? is fine to build
    assert _shapes(model) == official_keys("second_stage")


def test_stage1_block_of_stage2_config_matches_stage1_config():
    stage1 = _paper("first_stage_kl_v6.yaml").model.params
    inner = _paper("second_stage_van_v4.yaml").model.params.first_stage_config.params
    for key in ("embed_dim", "encoder_config", "decoder_config"):
        assert inner[key] == stage1[key], key


@pytest.mark.parametrize("overlay", [None, "demo_"], ids=["tiny", "tiny+demo"])
def test_stage1_block_of_tiny_stage2_config_matches_tiny_stage1_config(overlay):
    """The tiny stage-2 config repeats the tiny stage-1 model (and the demo's overlays repeat
    their stage-1 changes), so that stage 2 builds the autoencoder its checkpoint came from; the
    condition encoder downsamples as far as the stage-1 encoder, to the latent's size."""
    folder = ROOT / "configs" / "tiny"

    def load(name):
        names = [name] + ([f"{overlay}{name}"] if overlay else [])
        return OmegaConf.merge(*(OmegaConf.load(folder / n) for n in names)).model.params

    stage1, stage2 = load("first_stage.yaml"), load("second_stage.yaml")
    inner = stage2.first_stage_config.params
    for key in ("embed_dim", "encoder_config", "decoder_config"):
        assert inner[key] == stage1[key], key
    encoder_mult = stage1.encoder_config.params.ch_mult
    assert len(stage2.cond_stage_config.params.ch_mult) == len(encoder_mult)


@pytest.fixture(scope="module")
def authors_ckpt(tmp_path_factory, conformance):
    """A checkpoint file in the authors' format (Lightning 1.x dict) + their YAML."""
    folder = tmp_path_factory.mktemp("authors")
    path = folder / "authors.ckpt"
    torch.save({"state_dict": conformance["state_dict"], "epoch": 1}, path)
    yaml = folder / "authors.yaml"
    OmegaConf.save(OmegaConf.create(conformance["config"]), yaml)
    return path, yaml, conformance


def test_load_sr_model_from_authors_checkpoint_and_yaml(authors_ckpt):
    path, yaml, conformance = authors_ckpt
    model = load_sr_model(path, yaml)
    assert not model.training and not model.first_stage_model.training
    case = conformance["cases"][1]
    sr = model.super_resolve(
        case["lr_01"], case["out_size"], generator=torch.Generator().manual_seed(case["seed"])
    )
    assert (sr - case["sr_01"]).abs().max() <= 1e-4


def test_load_sr_model_rejects_stage1_checkpoint(tmp_path, authors_ckpt):
    _, yaml, conformance = authors_ckpt
    prefix = "first_stage_model."
    state = {
        k.removeprefix(prefix): v
        for k, v in conformance["state_dict"].items()
        if k.startswith(prefix)
    }
    path = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ConfigError, match="not a stage-2"):
        load_sr_model(path, yaml)


def test_load_first_stage_from_stage2_checkpoint(authors_ckpt):
    path, yaml, conformance = authors_ckpt
    ae = load_first_stage_model(path, yaml)
    case = conformance["cases"][0]
    lr, hr = case["lr_01"] * 2 - 1, case["hr_01"] * 2 - 1
    with torch.no_grad():
        mean = ae.encode(hr, lr).mean
    assert (mean - case["stage1_posterior_mean"]).abs().max() <= 1e-4


def test_one_checkpoint_reader_with_clear_errors(tmp_path):
    weights = {"w": torch.ones(2)}
    torch.save({"state_dict": weights, "config": {"model": {}}}, tmp_path / "ours.ckpt")
    torch.save(weights, tmp_path / "bare.pt")
    ours = read_checkpoint(tmp_path / "ours.ckpt")
    assert ours["config"] == {"model": {}} and torch.equal(ours["state_dict"]["w"], weights["w"])
    assert read_checkpoint(tmp_path / "bare.pt").keys() == {"state_dict"}
    assert torch.equal(read_state_dict(tmp_path / "bare.pt")["w"], weights["w"])
    torch.save([1, 2], tmp_path / "list.pt")
    torch.save({"epoch": 3}, tmp_path / "meta.pt")
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    cases = {
        "missing.ckpt": (FileNotFoundError, "checkpoint not found"),
        "text.ckpt": (ValueError, "not a readable PyTorch checkpoint"),
        "list.pt": (ValueError, "expected a dict, got list"),
        "meta.pt": (ValueError, "holds no state dict"),
    }
    for name, (error, message) in cases.items():
        with pytest.raises(error, match=message):
            read_checkpoint(tmp_path / name)
        with pytest.raises(error, match=message):  # the model loaders use the same reader
            load_first_stage_model(tmp_path / name)


def test_missing_config_is_a_clear_error(tmp_path, authors_ckpt):
    path, _, _ = authors_ckpt
    with pytest.raises(ConfigError, match="no config"):
        load_sr_model(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_sr_model(path, tmp_path / "nope.yaml")


def test_authors_unsupported_option_is_rejected(conformance):
    config = {**conformance["config"]}
    config["model"] = {**config["model"], "params": {**config["model"]["params"]}}
    config["model"]["params"]["parameterization"] = "x0"
    with pytest.raises(ConfigError, match="parameterization"):
        translate_authors_config(config)


def test_identity_modulation_init_starts_the_fusion_as_the_sr_branch():
    decoder_config = tiny_config(1).model.params.decoder_config
    torch.manual_seed(0)
    build = {
        init: instantiate_from_config(
            OmegaConf.merge(decoder_config, {"params": {"modulation_init": init}})
        )
        for init in ("default", "identity")
    }
    assert _shapes(build["default"]) == _shapes(build["identity"])  # checkpoints unaffected
    g = torch.Generator().manual_seed(0)
    x, h = torch.randn(2, 32, 5, 6, generator=g), torch.randn(2, 32, 5, 6, generator=g)
    norm = (1 + 0.1**2) ** 0.5
    for scale in (1.0, 3.7, 8.0):
        s = torch.tensor([[scale]])
        for level in build["identity"].up:
            a, b = level.condition_scale1(s), level.condition_scale2(s)
            assert torch.equal(a, torch.ones(1, 32)) and torch.allclose(b, torch.full((1, 32), 0.1))
            expected = torch.nn.functional.leaky_relu((x + 0.1 * h) / norm, 0.01)
            assert torch.allclose(build["identity"].style(x, a, b, h), expected, atol=1e-6)
        # the authors' default init: random-signed a_k, so some SR channels enter negated
        a = build["default"].up[0].condition_scale1(s)
        assert (a < 0).any()
    with pytest.raises(ValueError, match="modulation_init"):
        instantiate_from_config(
            OmegaConf.merge(decoder_config, {"params": {"modulation_init": "zeros"}})
        )


def _fixed_posterior_noise(monkeypatch) -> list[torch.Tensor]:
    """Makes every posterior sample `mean + std * noise` with a recorded, seeded noise."""
    from ldm.distributions import DiagonalGaussianDistribution

    noises = []

    def sample(self, generator=None):
        g = torch.Generator().manual_seed(100 + len(noises))
        noises.append(torch.randn(self.mean.shape, generator=g))
        return self.mean + self.std * noises[-1]

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", sample)
    return noises


def test_paper_scale_factor_is_one_over_std_of_an_hr_hr_posterior_sample(monkeypatch):
    from ldm.distributions import DiagonalGaussianDistribution

    torch.manual_seed(0)
    model = instantiate_from_config(_paper("second_stage_van_v4.yaml").model)
    assert model.scale_by_std and model.scale_by_std_input == "hr_hr"
    g = torch.Generator().manual_seed(1)
    batch = {
        "hr": torch.rand(2, 3, 64, 64, generator=g),
        "lr": torch.rand(2, 3, 16, 16, generator=g),
    }
    hr, lr = batch["hr"] * 2 - 1, batch["lr"] * 2 - 1
    noises = _fixed_posterior_noise(monkeypatch)
    fs = model.first_stage_model

    def expected(encoder_input: torch.Tensor, noise: torch.Tensor) -> float:
        with torch.no_grad():
            post = DiagonalGaussianDistribution(fs.quant_conv(fs.encoder(encoder_input)))
        return (1 / (post.mean + post.std * noise).flatten().std()).item()

    model.on_train_batch_start(batch, 0)  # first batch of a fresh run (no trainer: fresh)
    assert len(noises) == 1
    hr_hr = expected(torch.cat([hr, hr], dim=1), noises[0])  # the HR image as both inputs
    assert model.scale_factor.item() == pytest.approx(hr_hr, rel=1e-6)

    model.scale_by_std_input = "hr_lr"  # our option: the (bicubic_up(LR), HR) pair of training
    model.on_train_batch_start(batch, 0)
    lr_up = torch.nn.functional.interpolate(lr, size=(64, 64), mode="bicubic", align_corners=False)
    hr_lr = expected(torch.cat([lr_up, hr], dim=1), noises[1])
    assert model.scale_factor.item() == pytest.approx(hr_lr, rel=1e-6)
    assert abs(hr_lr - hr_hr) > 1e-3 * hr_hr  # the two estimates differ
    before = model.scale_factor.clone()
    model.on_train_batch_start(batch, 1)  # not the first batch: left alone
    assert torch.equal(model.scale_factor, before) and len(noises) == 2
    with pytest.raises(ConfigError, match="scale_by_std_input"):
        instantiate_from_config(
            _paper("second_stage_van_v4.yaml", "model.params.scale_by_std_input=hr").model
        )


def test_sampling_temperature_applies_in_eval_mode_only():
    """Our option (docs/departures.md): 1 by default, as the authors' sampler; in eval mode
    (inference, validation) the step noises are scaled, in training's unrolled chain never; a
    value outside [0, 1] is a config error naming the key."""
    assert instantiate_from_config(tiny_config(2).model).sampling_temperature == 1.0
    torch.manual_seed(0)
    model = instantiate_from_config(tiny_config(2, "model.params.sampling_temperature=0.5").model)
    x_T, noises = model.draw_noise((1, 4, 6, 6), torch.Generator().manual_seed(0))
    cond = torch.randn(1, 4, 6, 6)

    def denoise(x, c, t):
        return 0.3 * x + 0.2 * c  # any eps function will do

    chain = model.diffusion.sample
    model.eval()
    assert torch.equal(
        model.sample(denoise, x_T, cond, noises), chain(denoise, x_T, cond, noises * 0.5)
    )
    model.train()
    assert torch.equal(model.sample(denoise, x_T, cond, noises), chain(denoise, x_T, cond, noises))
    with pytest.raises(ConfigError, match="model.params.sampling_temperature: must be in"):
        instantiate_from_config(tiny_config(2, "model.params.sampling_temperature=1.5").model)


def test_posterior_logvar_init_sets_only_the_log_variance_bias():
    """Our option (docs/departures.md): the posterior starts nearly deterministic; default as the
    authors' (PyTorch's init, log-variance ~0: training samples are mostly unit noise)."""
    params = tiny_config(1).model.params
    torch.manual_seed(0)
    default = instantiate_from_config(
        {"target": "models.autoencoder.AutoencoderKL", "params": params}
    )
    torch.manual_seed(0)
    params = OmegaConf.merge(params, {"posterior_logvar_init": -10.0})
    sharp = instantiate_from_config(
        {"target": "models.autoencoder.AutoencoderKL", "params": params}
    )
    embed = params.embed_dim
    assert torch.equal(sharp.quant_conv.bias[embed:], torch.full((embed,), -10.0))
    assert torch.equal(sharp.quant_conv.bias[:embed], default.quant_conv.bias[:embed])
    assert default.quant_conv.bias.abs().max() < 1  # the authors' init: log-variance near 0
    hr = torch.rand(1, 3, 32, 32) * 2 - 1
    lr = torch.nn.functional.interpolate(hr, size=(16, 16), mode="area")
    with torch.no_grad():
        assert sharp.encode(hr, lr).std.max() < 0.05 < default.encode(hr, lr).std.min()


def test_lr_feature_dropout_zeroes_whole_samples_in_training_only():
    decoder_config = tiny_config(1).model.params.decoder_config
    torch.manual_seed(0)
    build = lambda p: instantiate_from_config(  # noqa: E731
        OmegaConf.merge(decoder_config, {"params": {"lr_feature_dropout": p}})
    )
    full, plain = build(1.0), build(0.0)
    plain.load_state_dict(full.state_dict())
    g = torch.Generator().manual_seed(0)
    z, lr = torch.randn(4, 4, 3, 3, generator=g), torch.rand(4, 3, 12, 12, generator=g) * 2 - 1
    with torch.no_grad():
        assert torch.equal(full.eval()(z, lr, (24, 24)), plain.eval()(z, lr, (24, 24)))
        full.train()
        dropped = full(z, lr, (24, 24))  # every sample: the LR reaches it only by the skip
        lr_other = torch.rand(4, 3, 12, 12, generator=g) * 2 - 1
        skip = lambda x: torch.nn.functional.interpolate(x, (24, 24), mode="bicubic")  # noqa: E731
        moved = full(z, lr_other, (24, 24)) - skip(lr_other)
        assert torch.allclose(dropped - skip(lr), moved, atol=1e-5)
        assert not torch.allclose(plain.train()(z, lr, (24, 24)), dropped, atol=1e-3)
