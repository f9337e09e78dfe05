"""Datasets of the LDCSR data protocol (docs/method.md, "Data protocol").

`ImageFolder` lists and reads HR images (optionally through the authors' split pickle);
`MultiScaleTrainDataset` makes the random-scale training crops of stage 1 and stage 2;
`FixedScaleDataset` makes the uncropped HR/LR pairs of evaluation. Items are dicts
`{"lr": [3, h, w], "hr": [3, H, W], "scale": float32 scalar H/h, "file_name": str}` in [0, 1].
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import natsort
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data.splits import SPLITS, read_split_file, seeded_split
from data.transforms import augment as augment_image
from data.transforms import lr_size as make_lr_size
from data.transforms import resize_bicubic
from utils.image_io import ImageReadError, list_images, load_image, to_tensor01, verify_image

# The order of a split's files (what `first_k` keeps): the authors' natural sort, or strings.
# natsort itself rather than a look-alike key: it is the function their loaders call, so the
# order is theirs for every name (leading zeros, case, non-ASCII digits), not only tested ones.
FILE_ORDERS = {"natural": natsort.natsorted, "string": sorted}


def _select_files(
    root: Path, split_file: str | Path | None, split: str | None, ratios: tuple, seed: int
) -> list[str]:
    """Relative paths of the images of a split: from the split file, or a seeded split."""
    if split_file is None:
        files = list_images(root)
        return files if split is None else seeded_split(files, ratios, seed)[split]
    files = read_split_file(split_file, split)
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(files)} files named by split file {split_file} are "
            f"missing under {root}, e.g. {missing[:5]}; check root and split_file"
        )
    return files


class ImageFolder(Dataset):
    """HR images under a folder, optionally restricted to one split.

    Args:
        root: folder searched recursively for png/jpg/jpeg/tif/tiff images.
        split_file: the authors' split pickle (paths relative to `root`, e.g. `Park/park_1.jpg`)
            or a text file with one relative path per line (then `split` is ignored).
        split: "train", "val" or "test". Without `split_file`, a seeded split of the sorted file
            list is made (see `seeded_split`; train gets what val and test do not take).
        first_k: keep only the first k images of the split (quick runs).
        repeat: the dataset length is `repeat * number of images` (longer epochs).
        cache: "none" reads files on access; "memory" decodes all images once at construction.
        val_fraction, test_fraction: split fractions used without a split file.
        split_seed: seed of that split.
        file_order: order of the split's files, which decides what `first_k` keeps (e.g. the
            two stage-1 validation images that pick best.ckpt). "natural" (the authors'
            `natsort.natsorted`: airport_2 before airport_10); "string": plain string order
            (ours before this option existed: airport_10 before airport_2).
        swap_rb: exchange the red and blue channels of every image read. The authors' prepared
            PNGs hold R and B swapped (their prepare_split converts BGR to RGB, then writes with
            OpenCV, which expects BGR) and their loaders read them back as stored, so their
            networks were trained on (B, G, R) of the scene. Off: images as stored (our
            `data/prepare_split.py` output in true colours; the authors' folders as their
            loaders read them). On: our true-colour data in the channel order of the authors'
            released checkpoints (or the authors' folders in true colours).

    Items: `(RGB uint8 Pillow image, path relative to root with "/" separators)`.
    """

    def __init__(
        self,
        root: str | Path,
        split_file: str | Path | None = None,
        split: str | None = None,
        first_k: int | None = None,
        repeat: int = 1,
        cache: str = "none",
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        split_seed: int = 0,
        file_order: str = "natural",
        swap_rb: bool = False,
    ) -> None:
        self.root = Path(root)
        if file_order not in FILE_ORDERS:
            raise ValueError(f"file_order must be one of {tuple(FILE_ORDERS)}, got {file_order!r}")
        if cache not in ("none", "memory"):
            raise ValueError(f"cache must be 'none' or 'memory', got {cache!r}")
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
        if not self.root.is_dir():
            what = "is a file, not a folder" if self.root.exists() else "does not exist"
            raise FileNotFoundError(
                f"image folder {self.root} {what}; set the dataset root (or "
                f"data.params.data_root) to a folder of png/jpg/tif images"
            )
        ratios = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
        files = _select_files(self.root, split_file, split, ratios, split_seed)
        files = FILE_ORDERS[file_order](files)
        self.files = files[:first_k] if first_k is not None else files
        if not self.files:
            raise ValueError(
                f"no images found in {self.root} (split={split!r}, split_file={split_file}); "
                f"expected png/jpg/jpeg/tif/tiff files (searched recursively)"
            )
        self.repeat, self.swap_rb = repeat, swap_rb
        self.cache = None
        if cache == "memory":  # decoded uint8 arrays, [H, W, 3] each
            self.cache, problems = [], []
            for f in self.files:
                try:
                    self.cache.append(np.asarray(self._read(f)))
                except ImageReadError as err:  # go on: list every bad image at once
                    problems.append(str(err))
            _raise_bad_images(self.root, problems)

    def __len__(self) -> int:
        return len(self.files) * self.repeat

    def __getitem__(self, i: int) -> tuple[Image.Image, str]:
        i = i % len(self.files)
        if self.cache is not None:
            return Image.fromarray(self.cache[i]), self.files[i]
        return self._read(self.files[i]), self.files[i]

    def _read(self, name: str) -> Image.Image:
        img = load_image(self.root / name)
        return Image.merge("RGB", img.split()[::-1]) if self.swap_rb else img

    def validate(self, min_size: int = 1) -> None:
        """Check that every image decodes to its end (`verify_image`: a truncated JPEG fails
        here, not at the step that first reads it) and its size, before training starts.

        Raises:
            ImageReadError: listing every unreadable image and every one with a side < min_size.
        """
        problems = []
        for f in self.files:
            try:
                height, width = verify_image(self.root / f)
            except ImageReadError as err:
                problems.append(str(err))
                continue
            if min(height, width) < min_size:
                size = f"{height}x{width}"
                problems.append(f"image {self.root / f} is {size}, smaller than {min_size} px")
        _raise_bad_images(self.root, problems)


def _takes_folder_arguments(cls: type) -> type:
    """Class decorator for a dataset whose `__init__(self, ..., **folder)` hands `folder` to
    `ImageFolder`: its signature, which config overrides are checked against (`utils.config`),
    lists ImageFolder's arguments in place of `**folder`."""
    init = inspect.signature(cls.__init__)
    own = [p for p in init.parameters.values() if p.kind is not p.VAR_KEYWORD]
    folder = inspect.signature(ImageFolder).parameters.values()
    folder = [p.replace(kind=p.KEYWORD_ONLY) for p in folder if p.name != "root"]
    cls.__init__.__signature__ = init.replace(parameters=own + folder)
    return cls


def _raise_bad_images(root: Path, problems: list[str]) -> None:
    """One ImageReadError listing every bad image under `root` (none: nothing happens)."""
    if problems:
        raise ImageReadError(
            f"{len(problems)} bad image(s) under {root}; re-export them or remove them "
            f"from the folder/split:\n  " + "\n  ".join(problems)
        )


def _item(lr: Image.Image, hr: Image.Image, file_name: str) -> dict:
    return {
        "lr": to_tensor01(lr),  # [3, h, w]
        "hr": to_tensor01(hr),  # [3, H, W]
        "scale": torch.tensor(hr.height / lr.height, dtype=torch.float32),
        "file_name": file_name,
    }


@_takes_folder_arguments
class MultiScaleTrainDataset(Dataset):
    """Random-scale training crops (docs/method.md, "Data protocol").

    Exactly one of `lr_size` (stage 1: LR fixed at lr_size px, HR crop `int(lr_size * s)` px) or
    `hr_size` (stage 2: HR crop fixed at hr_size px, LR `int(hr_size / s)` px) is set. The crop is
    taken at a random position, augmented (flips, 90-degree rotation), and the LR is its Pillow
    bicubic resize.

    Items are indexed by `(index, scale, item_seed)` tuples, as `ScaleBatchSampler` yields them:
    the scale must be shared by the whole batch so that its tensors stack, which a per-item index
    cannot express, and the crop position and flips are drawn from a generator seeded with
    `item_seed`, so they do not depend on the DataLoader worker or on where a run was resumed.
    An `(index, scale)` pair draws them from torch's global RNG instead. `scale` in the item is
    the effective HR height / LR height.

    Args:
        root: folder of the HR images (`ImageFolder`).
        min_scale, max_scale: scale range, read by the DataModule to build the batch sampler.
        lr_size: stage-1 LR crop size (paper: 48).
        hr_size: stage-2 HR crop size (paper: 256).
        augment: apply the random flips/rotation.
        **folder: the other arguments of `ImageFolder` (split_file, split, first_k, repeat,
            cache, val_fraction, test_fraction, split_seed, file_order, swap_rb); it refuses
            any other name, so a config typo fails.
    """

    def __init__(
        self,
        root: str | Path,
        min_scale: float = 1.0,
        max_scale: float = 8.0,
        lr_size: int | None = None,
        hr_size: int | None = None,
        augment: bool = True,
        **folder: Any,
    ) -> None:
        self._set_crops(min_scale, max_scale, lr_size, hr_size, augment)
        self.images = ImageFolder(root, **folder)

    def _set_crops(
        self,
        min_scale: float,
        max_scale: float,
        lr_size: int | None,
        hr_size: int | None,
        augment: bool,
    ) -> None:
        """Check and store the crop settings; subclasses that bring their own `self.images`
        (an `ImageFolder` look-alike, e.g. `data.synthetic.SceneTrainDataset`) call it too."""
        if (lr_size is None) == (hr_size is None):
            raise ValueError("set exactly one of lr_size (stage 1) and hr_size (stage 2)")
        if not 1.0 <= min_scale <= max_scale:
            raise ValueError(f"need 1 <= min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.lr_size, self.hr_size, self.augment = lr_size, hr_size, augment

    def __len__(self) -> int:
        return len(self.images)

    def max_crop(self) -> int:
        """Largest HR crop side this dataset can ask for, in pixels."""
        return int(self.lr_size * self.max_scale) if self.lr_size is not None else self.hr_size

    def validate(self) -> None:
        """Check every image header and that every image fits the largest crop."""
        self.images.validate(min_size=self.max_crop())

    def __getitem__(self, item: tuple[int, float] | tuple[int, float, int]) -> dict:
        if not isinstance(item, tuple | list) or len(item) not in (2, 3):
            raise TypeError(
                f"MultiScaleTrainDataset is indexed by (index, scale[, item_seed]) tuples, got "
                f"{item!r}; load it with DataLoader(batch_sampler=ScaleBatchSampler(...))"
            )
        index, scale = item[:2]
        rng = torch.Generator().manual_seed(int(item[2])) if len(item) == 3 else None
        img, name = self.images[index]
        if self.lr_size is not None:
            crop, lr_hw = int(self.lr_size * scale), (self.lr_size, self.lr_size)
        else:
            crop, lr_hw = self.hr_size, make_lr_size((self.hr_size, self.hr_size), scale)
        if img.height < crop or img.width < crop:
            raise ValueError(
                f"image {self.images.root / name} is {img.height}x{img.width}, smaller than the "
                f"{crop}x{crop} HR crop needed at scale {scale:.3f}; lower max_scale "
                f"({self.max_scale}) or remove the image"
            )
        top = int(torch.randint(img.height - crop + 1, (), generator=rng))
        left = int(torch.randint(img.width - crop + 1, (), generator=rng))
        hr = img.crop((left, top, left + crop, top + crop))
        if self.augment:
            hr = augment_image(hr, rng)
        return _item(resize_bicubic(hr, lr_hw), hr, name)


@_takes_folder_arguments
class FixedScaleDataset(Dataset):
    """Evaluation pairs at one scale: the uncropped HR and its Pillow-bicubic LR.

    LR size is `(int(H / s), int(W / s))`, so the item's `scale` is the effective `H / h`.

    Args:
        root: folder of the HR images (`ImageFolder`).
        scale: SR factor s >= 1.
        **folder: the other arguments of `ImageFolder`, as for `MultiScaleTrainDataset`.
    """

    def __init__(
        self,
        root: str | Path,
        scale: float,
        **folder: Any,
    ) -> None:
        self._set_scale(scale)
        self.images = ImageFolder(root, **folder)

    def _set_scale(self, scale: float) -> None:
        """Check and store the scale; subclasses that bring their own `self.images` (an
        `ImageFolder` look-alike, e.g. `data.synthetic.SceneEvalDataset`) call it too."""
        if scale < 1:
            raise ValueError(f"scale must be >= 1, got {scale}")
        self.scale = float(scale)

    def __len__(self) -> int:
        return len(self.images)

    def validate(self) -> None:
        """Check every image header and that no LR side becomes 0."""
        self.images.validate(min_size=math.ceil(self.scale))

    def __getitem__(self, index: int) -> dict:
        hr, name = self.images[index]
        try:
            lr_hw = make_lr_size((hr.height, hr.width), self.scale)
        except ValueError as err:
            raise ValueError(f"image {self.images.root / name}: {err}") from err
        return _item(resize_bicubic(hr, lr_hw), hr, name)
