"""train.py against bad input as a user meets it: broken images, stray checkpoints given to
--resume, impossible --logdir, typos and wrong types in overlay files. Each gets a one-line
message naming the file or key and the fix, exit code 2, and nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from data.datasets import ImageFolder
from utils.image_io import ImageReadError

TINY1 = "configs/tiny/first_stage.yaml"


def _tree(folder):
    """Every path under `folder` (what a failed start must leave unchanged)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _cli(capsys, *argv) -> tuple[int, str]:
    """train.py as the shell runs it: its exit code and its error line."""
    code = train.cli([str(a) for a in argv])
    lines = capsys.readouterr().err.strip().splitlines()
    return code, lines[-1] if lines else ""


@pytest.fixture
def folder_with_broken_images(tmp_path):
    """4 good 96x112 PNGs, a truncated JPEG and a PNG that is text."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        small = rng.integers(0, 256, (14, 12, 3), dtype=np.uint8)
        Image.fromarray(small).resize((96, 112), Image.BICUBIC).save(folder / f"ok_{i}.png")
    Image.fromarray(rng.integers(0, 256, (112, 96, 3), dtype=np.uint8)).save(folder / "cut.jpg")
    data = (folder / "cut.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    (folder / "text.png").write_text("not an image")
    return folder


def test_truncated_jpeg_stops_the_run_before_it_starts(tmp_path, capsys, folder_with_broken_images):
    """cache: none (the paper configs' default) used to accept the truncated JPEG and die at the
    step that first read it; now the pre-flight check lists it before any folder is made."""
    logdir = tmp_path / "logs"
    code = train.cli([
        "--config", TINY1, f"data.params.data_root={folder_with_broken_images}",
        "data.params.train.params.max_scale=3.0", "--logdir", str(logdir),
    ])  # fmt: skip
    message = capsys.readouterr().err
    assert code == 2 and "train.py: error: 2 bad image(s)" in message
    assert "cut.jpg" in message and "truncated" in message
    assert "text.png" in message and "ok_0" not in message
    assert not list(logdir.glob("*/*")), "a run folder was left behind"


def test_cache_memory_lists_every_unreadable_image(folder_with_broken_images):
    with pytest.raises(ImageReadError, match=r"2 bad image\(s\)") as info:
        ImageFolder(folder_with_broken_images, cache="memory")
    assert "cut.jpg" in str(info.value) and "text.png" in str(info.value)


def _fake_run(root, checkpoint: dict):
    """A run folder of train.py's layout whose last.ckpt holds `checkpoint`."""
    (root / "checkpoints").mkdir(parents=True)
    (root / "configs").mkdir()
    (root / "configs" / "first_stage.yaml").write_text(Path(TINY1).read_text())
    torch.save(checkpoint, root / "checkpoints" / "last.ckpt")
    return root / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("with_config", [True, False])
def test_resume_from_a_stray_checkpoint_file(tmp_path, capsys, with_config):
    """A checkpoint outside a run folder (a download, the authors' release): refused by name,
    and nothing is written beside it (it used to get run.yaml and logger folders)."""
    ckpt = tmp_path / "downloads" / "weights" / "model.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(1)}}, ckpt)
    before = _tree(tmp_path)
    config = ["--config", TINY1] if with_config else []
    code, line = _cli(capsys, "--resume", ckpt, *config, "--logdir", tmp_path / "logs")
    assert code == 2 and str(ckpt) in line
    assert "not a checkpoint of a train.py run folder" in line and "ckpt_path=" in line
    assert _tree(tmp_path) == before


@pytest.mark.parametrize(
    "content, message",
    [
        ({"state_dict": {"w": torch.zeros(1)}}, "holds no training state"),
        (b"truncated", "not a readable checkpoint"),
        (
            {"state_dict": {"other.w": torch.zeros(1)}, "optimizer_states": [], "loops": {}},
            "trained with another model or config",
        ),
    ],
    ids=["weights_only", "truncated", "another_model"],
)
def test_resume_refuses_a_checkpoint_it_cannot_continue(tmp_path, capsys, content, message):
    run = tmp_path / "run"
    ckpt = _fake_run(run, {})
    if isinstance(content, bytes):
        ckpt.write_bytes(content)
    else:
        torch.save(content, ckpt)
    before = _tree(tmp_path)
    code, line = _cli(capsys, "--resume", run)
    assert code == 2 and message in line and str(ckpt) in line
    assert _tree(tmp_path) == before, "the run folder was written to"


def test_resume_of_a_folder_that_is_no_run(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    torch.save({}, tmp_path / "checkpoints" / "last.ckpt")
    code, line = _cli(capsys, "--resume", tmp_path)
    assert code == 2 and "no configs/ folder" in line


def test_logdir_under_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code, line = _cli(capsys, "--config", TINY1, "--logdir", tmp_path / "file" / "logs")
    assert code == 2 and "--logdir" in line and "choose a writable folder" in line
    assert _tree(tmp_path) == ["file"]


def test_run_dir_under_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code, line = _cli(capsys, "--config", TINY1, "--run-dir", tmp_path / "file" / "run")
    assert code == 2 and "--run-dir" in line and str(tmp_path / "file" / "run") in line
    assert _tree(tmp_path) == ["file"]


def test_logdir_that_cannot_be_written(tmp_path, capsys):
    readonly = Path("/sys/ldcsr-write-check")  # sysfs refuses new folders, even to root
    try:
        readonly.mkdir()
        readonly.rmdir()
        pytest.skip("/sys accepts new folders here")
    except OSError:
        pass
    code, line = _cli(capsys, "--config", TINY1, "--logdir", readonly)
    assert code == 2 and "--logdir" in line and str(readonly) in line


@pytest.mark.parametrize(
    "overlay, message",
    [
        ("model:\n  params:\n    embd_dim: 4\n", "unknown config key 'model.params.embd_dim'"),
        (
            "model:\n  params:\n    decoder_config:\n      params:\n        upsamplr: liif\n",
            "unknown config key 'model.params.decoder_config.params.upsamplr'",
        ),
        ("model:\n  params:\n    embed_dim: four\n", "must be a number like 4, got 'four'"),
        ("data:\n  params:\n    batch_size: [2]\n", "must be a number"),
        ("- a list\n", "must hold `section: ...` mappings"),
        ("model: {params: [1\n", "is not valid YAML"),
    ],
    ids=["typo", "deep_typo", "wrong_type", "list_for_number", "not_a_mapping", "bad_yaml"],
)
def test_overlay_file_is_checked_like_an_override(tmp_path, capsys, overlay, message):
    path = tmp_path / "overlay.yaml"
    path.write_text(overlay)
    code, line = _cli(capsys, "--config", TINY1, path, "--logdir", tmp_path / "logs")
    assert code == 2 and message in line
    assert str(path) in line or "overlay" not in message
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.params.embed_dim=x", "must be a number like 4, got 'x'"),
        ("model.params.encoder_config.params.double_z=1", "must be true or false"),
        ("data.params.batch_size=2.5", "must be a whole number"),
    ],
)
def test_override_of_the_wrong_type(tmp_path, capsys, override, message):
    code, line = _cli(capsys, "--config", TINY1, override, "--logdir", tmp_path / "logs")
    assert code == 2 and message in line and override.partition("=")[0] in line


def test_missing_config_file_and_folder_as_config(tmp_path, capsys):
    code, line = _cli(capsys, "--config", tmp_path / "none.yaml")
    assert code == 2 and "config file not found" in line
    code, line = _cli(capsys, "--config", tmp_path)
    assert code == 2 and "config file is a folder" in line


def test_prepare_split_checks_every_image_before_writing(tmp_path, folder_with_broken_images):
    from data.prepare_split import main as prepare_split

    out = tmp_path / "prepared"
    with pytest.raises(SystemExit) as stop:
        prepare_split(["--make-split", str(tmp_path / "split.pkl"), "--data_path",
                       str(folder_with_broken_images), "--output_path", str(out)])  # fmt: skip
    assert stop.value.code == 2
    assert not list(out.rglob("*.png")), "images were written before the broken ones were found"


@pytest.mark.parametrize("problem", ["output_inside_data", "bad_ratios"])
def test_prepare_split_refuses_bad_paths_and_ratios(tmp_path, capsys, problem):
    from data.prepare_split import main as prepare_split

    raw = tmp_path / "raw"
    raw.mkdir()
    Image.new("RGB", (16, 16)).save(raw / "a.png")
    if problem == "output_inside_data":
        argv, message = ["--split_file", "s.pkl", "--output_path", str(raw / "out")], "inside"
    else:
        argv, message = ["--make-split", str(tmp_path / "s.pkl"), "--ratios", "a,b,c"], "--ratios"
    with pytest.raises(SystemExit) as stop:
        prepare_split(["--data_path", str(raw), *argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert _tree(raw) == ["a.png"] and not (tmp_path / "s.pkl").exists()


@pytest.mark.parametrize("problem", ["missing_data", "out_under_a_file"])
def test_demo_refuses_bad_folders_before_writing(tmp_path, problem):
    import demo

    (tmp_path / "file").write_text("")
    if problem == "missing_data":
        argv, match = (
            ["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")],
            "--data",
        )
    else:
        argv, match = ["--out", str(tmp_path / "file" / "out")], "--out .* not writable"
    with pytest.raises(demo.DemoError, match=match):
        demo.main(argv)
    assert _tree(tmp_path) == ["file"]


@pytest.mark.parametrize(
    "overlay, message",
    [
        ("model:\n  params:\n    ckpt_path: ???\n", "have no value (??? in the YAML)"),
        (
            "model:\n  params:\n    encoder_config:\n      target: ldm.blocks.ResnetBlock\n",
            "while building ldm.blocks.ResnetBlock",
        ),
    ],
    ids=["required_value", "constructor_refuses"],
)
def test_missing_values_and_params_a_constructor_refuses(tmp_path, capsys, overlay, message):
    path = tmp_path / "overlay.yaml"
    path.write_text(overlay)
    code, line = _cli(capsys, "--config", TINY1, path, "--logdir", tmp_path / "logs")
    assert code == 2 and message in line and not (tmp_path / "logs").exists()


def test_data_root_that_is_a_file(tmp_path, capsys):
    (tmp_path / "images.zip").write_bytes(b"PK")
    logdir = tmp_path / "logs"
    code, line = _cli(capsys, "--config", TINY1, f"data.params.data_root={tmp_path / 'images.zip'}",
                      "--logdir", logdir)  # fmt: skip
    assert code == 2 and "images.zip is a file, not a folder" in line
    assert not list(logdir.glob("*/*")), "a run folder was left behind"
