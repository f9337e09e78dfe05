"""Data pipeline: image reading, transforms, datasets, the one-scale-per-batch sampler and
the DataModule (data/prepare_split.py: tests/test_prepare_split.py)."""

from __future__ import annotations

import os
import pickle
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data.datamodule import DataModule
from data.datasets import FixedScaleDataset, ImageFolder, MultiScaleTrainDataset
from data.sampler import ScaleBatchSampler
from data.splits import load_split_pickle, seeded_split
from data.transforms import augment, lr_size, resize_bicubic
from tests.helpers import write_rgb
from utils.image_io import ImageReadError, list_images, load_image, to_tensor01, verify_image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def write_png16_rgb(path: Path, arr: np.ndarray) -> None:
    """Minimal 16-bit RGB PNG writer (Pillow cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(tag + data))
        return struct.pack(">I", len(data)) + tag + data + crc

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


# ---------------------------------------------------------------- image io


def test_load_image_converts_every_mode(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(grey, mode="L").save(tmp_path / "l.png")
    Image.fromarray(grey, mode="L").convert("LA").save(tmp_path / "la.png")
    rgba = np.dstack([grey, grey // 2, grey // 3, np.zeros_like(grey)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(grey, mode="L").convert("P").save(tmp_path / "p.png")
    Image.new("CMYK", (4, 3), (0, 255, 0, 0)).save(tmp_path / "cmyk.tif")
    g16 = np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000
    Image.fromarray(g16).save(tmp_path / "g16.png")
    Image.fromarray(g16).save(tmp_path / "g16.tif")
    write_png16_rgb(tmp_path / "rgb16.png", np.dstack([g16, g16, g16]))
    Image.fromarray(np.full((3, 4), 0.5, np.float32)).save(tmp_path / "f.tif")

    for name in ("l.png", "la.png", "p.png"):
        out = np.asarray(load_image(tmp_path / name))
        assert out.shape == (3, 4, 3) and out.dtype == np.uint8, name
        np.testing.assert_array_equal(out[..., 1], grey, err_msg=name)
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "rgba.png")), rgba[..., :3])
    assert tuple(np.asarray(load_image(tmp_path / "cmyk.tif"))[0, 0]) == (255, 0, 255)
    for name in ("g16.png", "g16.tif", "rgb16.png"):  # 16-bit grey and colour agree: v >> 8
        np.testing.assert_array_equal(np.asarray(load_image(tmp_path / name))[..., 2], g16 >> 8)
    assert np.asarray(load_image(tmp_path / "f.tif")).max() == 128


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_unreadable_image_names_the_file(tmp_path, content):
    path = tmp_path / "bad.jpg"
    if content == "truncated":
        write_rgb(path, 64, 64)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    with pytest.raises(ImageReadError, match="bad.jpg.*remove it"):
        load_image(path)
    if content != "truncated":  # the header check needs no decode, so cannot see truncation
        with pytest.raises(ImageReadError, match="bad.jpg"):
            verify_image(path)
    with pytest.raises(ImageReadError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_list_images_and_to_tensor(tmp_path):
    for rel in ("b/x.PNG", "a.jpg", "c.TIFF", "b/y.jpeg", ".hidden.png", "notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert list_images(tmp_path) == ["a.jpg", "b/x.PNG", "b/y.jpeg", "c.TIFF"]
    assert list_images(tmp_path, recursive=False) == ["a.jpg", "c.TIFF"]
    x = to_tensor01(load_image(write_rgb(tmp_path / "img.png", 5, 7)))
    assert x.shape == (3, 5, 7) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1


# ---------------------------------------------------------------- transforms


def test_resize_and_lr_size_keep_height_and_width():
    img = Image.new("RGB", (50, 30))  # Pillow size is (w, h)
    assert resize_bicubic(img, (10, 20)).size == (20, 10)
    assert lr_size((601, 450), 3.5) == (171, 128)  # truncation
    with pytest.raises(ValueError, match="image 5x40 too small for scale 8"):
        lr_size((5, 40), 8)


def test_augment_draws_the_eight_symmetries():
    arr = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    img = Image.fromarray(arr)
    seen = {np.asarray(augment(img, torch.Generator().manual_seed(s))).tobytes() for s in range(64)}
    assert len(seen) == 8
    a = augment(img, torch.Generator().manual_seed(3))
    assert np.array_equal(np.asarray(a), np.asarray(augment(img, torch.Generator().manual_seed(3))))


# ---------------------------------------------------------------- datasets


def test_fixed_scale_dataset_non_square(tmp_path):
    path = write_rgb(tmp_path / "hr" / "wide.png", 45, 70)
    item = FixedScaleDataset(tmp_path / "hr", scale=4)[0]
    assert item["hr"].shape == (3, 45, 70) and item["lr"].shape == (3, 11, 17)
    assert item["scale"].dtype == torch.float32 and item["scale"].item() == pytest.approx(45 / 11)
    expected = Image.open(path).resize((17, 11), Image.Resampling.BICUBIC)
    assert torch.equal(item["lr"], to_tensor01(expected)) and item["file_name"] == "wide.png"


@pytest.mark.parametrize("stage", [1, 2])
def test_multiscale_crops_and_lr(tmp_path, stage):
    write_rgb(tmp_path / "a.png", 80, 100)
    kwargs = {"lr_size": 8} if stage == 1 else {"hr_size": 40}
    ds = MultiScaleTrainDataset(tmp_path, max_scale=4.0, **kwargs)
    torch.manual_seed(0)
    item = ds[(0, 3.3)]
    hr_side, lr_side = (26, 8) if stage == 1 else (40, 12)  # int(8*3.3), int(40/3.3)
    assert item["hr"].shape == (3, hr_side, hr_side) and item["lr"].shape == (3, lr_side, lr_side)
    assert item["scale"].item() == pytest.approx(hr_side / lr_side)
    hr = Image.fromarray((item["hr"] * 255).round().byte().permute(1, 2, 0).numpy())
    assert torch.equal(item["lr"], to_tensor01(resize_bicubic(hr, (lr_side, lr_side))))
    with pytest.raises(TypeError, match="ScaleBatchSampler"):
        ds[0]


def test_loader_batches_share_one_scale_and_shapes(tmp_path):
    for i in range(5):
        write_rgb(tmp_path / f"{i}.png", 64, 72, seed=i)
    ds = MultiScaleTrainDataset(tmp_path, min_scale=1.0, max_scale=4.0, lr_size=12)
    sampler = ScaleBatchSampler(len(ds), 2, 1.0, 4.0, seed=1)
    for batch in DataLoader(ds, batch_sampler=sampler):
        assert batch["lr"].shape[1:] == (3, 12, 12) and batch["hr"].shape[0] == 2
        assert torch.all(batch["scale"] == batch["scale"][0])
        assert batch["hr"].shape[-1] == int(12 * batch["scale"][0].item() + 1e-6)


def test_image_folder_split_files(tmp_path):
    raw = tmp_path / "raw"
    for rel in ("Park/park_1.jpg", "Park/park_2.jpg", "Port/port_1.jpg"):
        write_rgb(raw / rel, 16, 16)
    pkl = tmp_path / "split.pkl"
    pkl.write_bytes(pickle.dumps({"train": ["Park/park_1.jpg", "Port/port_1.jpg"], "test": []}))
    ds = ImageFolder(raw, split_file=pkl, split="train")
    assert [ds[i][1] for i in range(len(ds))] == ["Park/park_1.jpg", "Port/port_1.jpg"]
    txt = tmp_path / "list.txt"
    txt.write_text("# comment\nPark/park_2.jpg\n\n")
    assert ImageFolder(raw, split_file=txt, split="val").files == ["Park/park_2.jpg"]
    assert len(ImageFolder(raw, repeat=3)) == 9 and ImageFolder(raw, first_k=1).files == [
        "Park/park_1.jpg"
    ]
    assert ImageFolder(raw, cache="memory")[1][0].size == (16, 16)
    with pytest.raises(ValueError, match="'val' not in split file .*split.pkl"):
        ImageFolder(raw, split_file=pkl, split="val")
    pkl.write_bytes(
        pickle.dumps({"train": ["Park/park_1.jpg"] + [f"Gone/g{i}.jpg" for i in range(9)]})
    )
    with pytest.raises(FileNotFoundError, match=r"9 of 10 files .*Gone/g0.jpg"):
        ImageFolder(raw, split_file=pkl, split="train")
    pkl.write_bytes(pickle.dumps({"train": [os.system]}))  # a pickle that could run code
    with pytest.raises(ValueError, match="not a valid split pickle"):
        load_split_pickle(pkl)


def test_seeded_split_is_deterministic_and_disjoint(tmp_path):
    for i in range(20):
        write_rgb(tmp_path / f"{i:02d}.png", 4, 4)
    files = list_images(tmp_path)
    splits = seeded_split(files, (0.7, 0.2, 0.1), seed=3)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [14, 4, 2]
    assert sorted(sum(splits.values(), [])) == files
    assert splits == seeded_split(files[::-1], (0.7, 0.2, 0.1), seed=3)
    assert splits != seeded_split(files, (0.7, 0.2, 0.1), seed=4)
    ds = ImageFolder(tmp_path, split="val", val_fraction=0.2, test_fraction=0.1, split_seed=3)
    assert ds.files == splits["val"]


def test_bad_folders_and_images_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        ImageFolder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found in .*empty"):
        ImageFolder(tmp_path / "empty")
    root = tmp_path / "imgs"
    write_rgb(root / "good.png", 40, 40)
    write_rgb(root / "small.png", 20, 30)
    (root / "zero.png").write_bytes(b"")
    (root / "corrupt.png").write_bytes(b"\x89PNG garbage")
    ds = MultiScaleTrainDataset(root, max_scale=4.0, lr_size=8)  # needs 32 px crops
    with pytest.raises(ImageReadError) as err:
        ds.validate()
    assert all(name in str(err.value) for name in ("zero.png", "corrupt.png", "small.png is 20x30"))
    assert "good.png" not in str(err.value)
    with pytest.raises(ImageReadError, match="zero.png is an empty"):
        ds[(3, 2.0)]
    with pytest.raises(ValueError, match=r"small.png is 20x30.*32x32 HR crop.*lower max_scale"):
        ds[(2, 4.0)]
    with pytest.raises(ValueError, match="small.png.*too small for scale 25"):
        FixedScaleDataset(root, scale=25, first_k=3)[2]


def test_worker_errors_keep_the_message(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"nope")
    loader = DataLoader(FixedScaleDataset(tmp_path, scale=2), num_workers=1)
    with pytest.raises(ImageReadError, match="broken.png"):
        next(iter(loader))


# ---------------------------------------------------------------- sampler


def test_sampler_is_deterministic_and_resumable():
    sampler = ScaleBatchSampler(50, 4, 1.0, 8.0, seed=7)
    first = list(sampler)
    assert len(first) == len(sampler) == 12 and all(len(b) == 4 for b in first)
    assert all(len({s for _, s, _ in b}) == 1 and 1.0 <= b[0][1] <= 8.0 for b in first)
    assert list(ScaleBatchSampler(50, 4, 1.0, 8.0, seed=7)) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(i for b in second for i, _, _ in b) != list(range(48))
    resumed = ScaleBatchSampler(50, 4, 1.0, 8.0, seed=0)
    resumed.load_state_dict(sampler.state_dict())
    assert resumed.state_dict() == {"epoch": 1, "seed": 7} and list(resumed) == second
    resumed.start_at(5)  # mid-epoch: the remaining batches, same indices, scales and seeds
    assert list(resumed) == second[5:] and list(resumed) == second  # start_at is one-shot
    assert len(ScaleBatchSampler(50, 4, 1.0, 2.0, drop_last=False)) == 13


def test_sampler_shards_indices_but_shares_scales_across_ranks():
    ranks = [ScaleBatchSampler(21, 3, 1.0, 8.0, seed=5, rank=r, num_replicas=2) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(2)
    batches = [list(s) for s in ranks]
    assert len(batches[0]) == len(batches[1]) == 3
    indices = [{i for b in rank for i, _, _ in b} for rank in batches]
    assert not indices[0] & indices[1] and len(indices[0] | indices[1]) == 18
    scales = [[b[0][1] for b in rank] for rank in batches]
    assert scales[0] == scales[1] and len(set(scales[0])) == 3
    seeds = [{seed for b in rank for _, _, seed in b} for rank in batches]
    assert len(seeds[0] | seeds[1]) == 18  # every item of the epoch has its own crop seed


@pytest.mark.parametrize("dataset_len", [12, 9000])
def test_data_length_gives_a_fixed_epoch_of_fresh_subsets(dataset_len):
    sampler = ScaleBatchSampler(dataset_len, 4, 1.0, 8.0, seed=3, data_length=4000)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 1000 and all(len(b) == 4 for b in batches)
        assert all(len({s for _, s, _ in b}) == 1 for b in batches)
        epochs.append([i for b in batches for i, _, _ in b])
    counts = np.bincount(epochs[0], minlength=dataset_len)
    if dataset_len > 4000:  # a random subset: no image twice, different images each epoch
        assert counts.max() == 1 and set(epochs[0]) != set(epochs[1])
    else:  # whole permutations repeated: every image 333 or 334 times
        assert counts.min() == 333 and counts.max() == 334 and epochs[0] != epochs[1]
    ranks = [
        ScaleBatchSampler(
            dataset_len, 4, 1.0, 8.0, seed=3, data_length=4000, rank=r, num_replicas=2
        )
        for r in (0, 1)
    ]
    assert [len(r) for r in ranks] == [500, 500]  # data_length counts samples over all ranks
    assert [b[0][1] for b in ranks[0]] == [b[0][1] for b in ranks[1]]


def test_item_seed_fixes_the_crop(tmp_path):
    write_rgb(tmp_path / "a.png", 64, 64)
    ds = MultiScaleTrainDataset(tmp_path, max_scale=4.0, lr_size=8)
    torch.manual_seed(0)
    a = ds[(0, 3.0, 123)]["hr"]
    torch.manual_seed(1)
    assert torch.equal(a, ds[(0, 3.0, 123)]["hr"]) and not torch.equal(a, ds[(0, 3.0, 124)]["hr"])


# ---------------------------------------------------------------- datamodule


def test_datamodule_resolves_roots_and_reports_bad_files(tmp_path):
    for i in range(4):
        write_rgb(tmp_path / "AID" / "train" / f"{i}.png", 48, 56, seed=i)
    write_rgb(tmp_path / "AID" / "val" / "v.png", 30, 41)
    target = "data.datasets."
    dm = DataModule(
        batch_size=2,
        train={
            "target": target + "MultiScaleTrainDataset",
            "params": {"root": "train", "lr_size": 8, "max_scale": 4},
        },
        validation={"target": target + "FixedScaleDataset", "params": {"root": "val", "scale": 3}},
        data_root=str(tmp_path / "AID"),
    )
    dm.setup("fit")
    train = dm.train_dataloader()
    assert isinstance(train.batch_sampler, ScaleBatchSampler) and len(train) == 2
    batch = next(iter(train))
    assert batch["lr"].shape == (2, 3, 8, 8) and len(batch["file_name"]) == 2
    val = next(iter(dm.val_dataloader()))
    assert val["hr"].shape == (1, 3, 30, 41) and val["lr"].shape == (1, 3, 10, 13)
    dm.train_sampler.set_epoch(3)
    fresh = DataModule(batch_size=2, train=dm.configs["train"], data_root=str(tmp_path / "AID"))
    fresh.load_state_dict(dm.state_dict())
    assert fresh.train_dataloader().batch_sampler.epoch == 3
    fresh.trainer = SimpleNamespace(  # Lightning under DDP, as far as the check looks
        world_size=2, _accelerator_connector=SimpleNamespace(use_distributed_sampler=True)
    )
    with pytest.raises(ValueError, match="use_distributed_sampler=False"):
        fresh.train_dataloader()
    (tmp_path / "AID" / "train" / "3.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match="3.png is an empty"):
        DataModule(batch_size=2, train=dm.configs["train"], data_root=str(tmp_path / "AID")).setup(
            "fit"
        )
    # the datasets hand ImageFolder its arguments, and it refuses a misspelt one
    bad = {
        "target": target + "FixedScaleDataset",
        "params": {"root": "val", "scale": 3, "frist_k": 1},
    }
    with pytest.raises(
        TypeError, match="FixedScaleDataset: .*unexpected keyword argument 'frist_k'"
    ):
        DataModule(batch_size=2, validation=bad, data_root=str(tmp_path / "AID")).setup("validate")


def test_dataset_configs_take_image_folder_arguments_as_overrides():
    """The datasets hand ImageFolder its arguments (**folder) and declare them in their
    signatures, against which utils.config checks an override of a key the file lacks."""
    from utils.config import ConfigError, load_config

    tiny = [str(REPO / "configs" / "tiny" / "first_stage.yaml")]
    config = load_config(tiny, ["data.params.train.params.split_seed=5"])
    assert config.data.params.train.params.split_seed == 5
    with pytest.raises(ConfigError, match="unknown config key .*frist_k.*'first_k', 'repeat'"):
        load_config(tiny, ["data.params.train.params.frist_k=5"])


@pytest.mark.parametrize(
    ("config", "images"),
    [("first_stage_kl_v6", 12), ("first_stage_kl_v6", 9000), ("second_stage_van_v4", 12)],
)
def test_paper_configs_train_1000_batches_per_epoch(tmp_path, config, images):
    """The authors' epoch: data_length samples (4000 / 8000), 1000 batches whatever the folder."""
    from omegaconf import OmegaConf

    from utils.config import instantiate_from_config

    for i in range(3):  # 3 images, repeated to `images` items
        write_rgb(tmp_path / f"{i}.png", 384, 384, seed=i)
    cfg = OmegaConf.load(REPO / "configs" / f"{config}.yaml")
    cfg.merge_with_dotlist([
        f"data.params.data_root={tmp_path}", "data.params.train.params.root=.",
        "data.params.validation.params.root=.",
        f"data.params.train.params.repeat={images // 3}", "data.params.num_workers=0",
    ])  # fmt: skip
    dm = instantiate_from_config(cfg.data)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(dm.datasets["train"]) == images and len(loader) == 1000
    subsets = []
    for epoch in range(2):
        loader.batch_sampler.set_epoch(epoch)
        batches = list(loader.batch_sampler)
        assert len(batches) == 1000 and {len(b) for b in batches} == {cfg.data.params.batch_size}
        subsets.append([i for b in batches for i, _, _ in b])
    assert subsets[0] != subsets[1]


# ---------------------------------------------------------------- real images


def test_real_images_from_train_pool():
    pool = SHARED / "data" / "train_pool"
    if not pool.is_dir():
        pytest.skip(f"{pool} is absent (shared data not available)")
    ds = FixedScaleDataset(pool, scale=3.5, first_k=3)
    ds.validate()
    for i in range(len(ds)):
        item = ds[i]
        _, h, w = item["hr"].shape
        assert item["lr"].shape == (3, int(h / 3.5), int(w / 3.5))
    train = MultiScaleTrainDataset(pool, hr_size=64, first_k=3)
    batch = next(iter(DataLoader(train, batch_sampler=ScaleBatchSampler(3, 3, 1.0, 8.0))))
    assert batch["hr"].shape == (3, 3, 64, 64) and batch["lr"].shape[-1] == int(
        64 / batch["scale"][0]
    )


@pytest.mark.parametrize(
    "config,folder", [("first_stage_kl_v6", "train"), ("second_stage_van_v4", "val")]
)
def test_paper_configs_validate_on_the_authors_two_images(tmp_path, config, folder):
    """Stage 1 validated on the first 2 *training* images at x4, stage 2 on the first 2
    validation images; the kept checkpoint (best.ckpt) depends on it."""
    from omegaconf import OmegaConf

    from utils.config import instantiate_from_config

    for split in ("train", "val"):
        for i in (1, 2, 10, 11):  # natural order 1, 2, 10, 11; string order 1, 10, 11, 2
            write_rgb(tmp_path / split / "HR" / f"{split}_{i}.png", 384, 384, seed=i)
    cfg = OmegaConf.load(REPO / "configs" / f"{config}.yaml")
    cfg.merge_with_dotlist([f"data.params.data_root={tmp_path}", "data.params.num_workers=0"])
    dm = instantiate_from_config(cfg.data)
    dm.setup("fit")
    val = dm.datasets["validation"]
    assert [str(f) for f in val.images.files] == [f"{folder}_1.png", f"{folder}_2.png"]
    assert val.scale == 4.0
    cfg.merge_with_dotlist(["data.params.validation.params.file_order=string"])  # our old order
    dm = instantiate_from_config(cfg.data)
    dm.setup("fit")
    files = dm.datasets["validation"].images.files
    assert [str(f) for f in files] == [f"{folder}_1.png", f"{folder}_10.png"]


def test_file_order_natural_is_natsort_and_string_is_sorted(tmp_path):
    import natsort

    names = ["airport_10.png", "airport_2.png", "Park/park_1.png", "airport_1.png", "b_03.png"]
    for i, name in enumerate(names):
        write_rgb(tmp_path / name, 8, 8, seed=i)
    natural = ImageFolder(tmp_path).files
    assert natural == natsort.natsorted(names)  # the authors' order (their data/base.py)
    assert natural[:3] == ["Park/park_1.png", "airport_1.png", "airport_2.png"]
    assert ImageFolder(tmp_path, file_order="string").files == sorted(names)
    assert ImageFolder(tmp_path, first_k=2).files == natural[:2]
    with pytest.raises(ValueError, match="file_order"):
        ImageFolder(tmp_path, file_order="natsort")


@pytest.mark.parametrize("cache", ["none", "memory"])
def test_swap_rb_exchanges_red_and_blue_for_the_authors_prepared_data(tmp_path, cache):
    write_rgb(tmp_path / "a.png", 20, 16)
    plain = FixedScaleDataset(tmp_path, scale=2, cache=cache)[0]
    swapped = FixedScaleDataset(tmp_path, scale=2, cache=cache, swap_rb=True)[0]
    for key in ("hr", "lr"):
        assert not torch.equal(plain[key], swapped[key])
        assert torch.equal(plain[key].flip(0), swapped[key])  # R <-> B, G kept
    train = MultiScaleTrainDataset(tmp_path, lr_size=4, max_scale=2.0, swap_rb=True)
    assert train.images.swap_rb and not MultiScaleTrainDataset(tmp_path, lr_size=4).images.swap_rb
