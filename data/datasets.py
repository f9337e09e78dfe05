"""Datasets of the LDCSR data protocol (docs/method.md, "Data protocol").

`ImageFolder` lists and reads HR images (optionally through the authors' split pickle);
`MultiScaleTrainDataset` makes the random-scale training crops of stage 1 and stage 2;
`FixedScaleDataset` makes the uncropped HR/LR pairs of evaluation. Items are dicts
`{"lr": [3, h, w], "hr": [3, H, W], "scale": float32 scalar H/h, "file_name": str}` in [0, 1].
"""

from __future__ import annotations

import math
import pickle
from collections import Counter
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data.transforms import augment as augment_image
from data.transforms import lr_size as make_lr_size
from data.transforms import resize_bicubic
from utils.image_io import ImageReadError, list_images, load_image, to_tensor01, verify_image

SPLITS = ("train", "val", "test")
# The split pickle holds plain dicts/lists/strings (possibly numpy arrays of strings); nothing else
# is unpickled, so a split file cannot run code.
_PICKLE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _SplitUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"split pickles may not hold {module}.{name}")
        return super().find_class(module, name)


def seeded_split(files: list[str], ratios: tuple[float, float, float], seed: int) -> dict:
    """Split a file list into train/val/test with a seeded shuffle.

    The sorted list is permuted by `numpy.random.default_rng(seed)`; the first
    `round(n * ratios[2])` files are test, the next `round(n * ratios[1])` val, the rest train.

    Returns:
        `{"train": [...], "val": [...], "test": [...]}`, each list sorted.
    """
    if min(ratios) < 0 or not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
        raise ValueError(f"split ratios (train, val, test) must be >= 0 and sum to 1, got {ratios}")
    files = sorted(files)
    order = np.random.default_rng(seed).permutation(len(files))
    n_test, n_val = round(len(files) * ratios[2]), round(len(files) * ratios[1])
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val]}
    parts["train"] = order[n_test + n_val :]
    return {name: sorted(files[i] for i in parts[name]) for name in SPLITS}


def load_split_pickle(split_file: str | Path) -> dict[str, list[str]]:
    """Read the authors' split pickle `{"train": [...], "val": [...], "test": [...]}`.

    Only dicts, lists, strings and numpy arrays are unpickled, so a split file cannot run code.

    Returns:
        Split name -> paths relative to the raw dataset root, with "/" separators.
    """
    split_file = Path(split_file)
    if not split_file.is_file():
        raise FileNotFoundError(f"split file {split_file} does not exist")
    try:
        with split_file.open("rb") as f:
            splits = _SplitUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"split file {split_file} is not a valid split pickle: {err}") from err
    if not isinstance(splits, dict):
        raise ValueError(f"split file {split_file} holds a {type(splits).__name__}, not a dict")
    return {str(k): [str(p).replace("\\", "/") for p in v] for k, v in splits.items()}


def read_split_file(split_file: str | Path, split: str | None) -> list[str]:
    """Relative image paths of one split from a split pickle or a text file (one path per line).

    The pickle is the authors' `{"train": [...], "val": [...], "test": [...]}`; a text file
    (any other suffix) is the split itself and `split` is ignored. Blank and `#` lines are skipped.
    """
    split_file = Path(split_file)
    if not split_file.is_file():
        raise FileNotFoundError(f"split file {split_file} does not exist")
    if split_file.suffix.lower() not in (".pkl", ".pickle"):
        lines = (line.strip() for line in split_file.read_text().splitlines())
        return [line.replace("\\", "/") for line in lines if line and not line.startswith("#")]
    splits = load_split_pickle(split_file)
    if split not in splits:
        raise ValueError(
            f"split {split!r} not in split file {split_file} (it holds {list(splits)})"
        )
    return splits[split]


def flat_names(files: Sequence[str], keep_extension: bool = False) -> dict[str, str]:
    """Output PNG name of each relative path: its stem, or, where stems collide (compared
    case-insensitively, for case-insensitive file systems), the whole path joined by "_"
    (`a/x.png` -> `a_x.png`); with `keep_extension` the extension is joined too, so that `x.jpg`
    and `x.tif` of one folder become `x_jpg.png` and `x_tif.png`.

    Raises:
        ValueError: naming the files whose output names still collide.
    """
    stems = Counter(PurePosixPath(f).stem.casefold() for f in files)
    names = {}
    for f in files:
        path = PurePosixPath(f)
        extension = [path.suffix.lstrip(".").lower()] if keep_extension else []
        long = "_".join((*path.parent.parts, path.stem, *extension))
        names[f] = (path.stem if stems[path.stem.casefold()] == 1 else long) + ".png"
    taken = Counter(n.casefold() for n in names.values())
    clashes = sorted(f"{f} -> {n}" for f, n in names.items() if taken[n.casefold()] > 1)
    if clashes:
        raise ValueError(
            f"{len(clashes)} images would be written under the same name: "
            f"{'; '.join(clashes[:10])}; rename or move them"
        )
    return names


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
    ) -> None:
        self.root = Path(root)
        if cache not in ("none", "memory"):
            raise ValueError(f"cache must be 'none' or 'memory', got {cache!r}")
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {self.root} does not exist; set the dataset root (or "
                f"data.params.data_root) to a folder of png/jpg/tif images"
            )
        ratios = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
        files = _select_files(self.root, split_file, split, ratios, split_seed)
        self.files = files[:first_k] if first_k is not None else files
        if not self.files:
            raise ValueError(
                f"no images found in {self.root} (split={split!r}, split_file={split_file}); "
                f"expected png/jpg/jpeg/tif/tiff files (searched recursively)"
            )
        self.repeat = repeat
        self.cache = None
        if cache == "memory":  # decoded uint8 arrays, [H, W, 3] each
            self.cache = [np.asarray(load_image(self.root / f)) for f in self.files]

    def __len__(self) -> int:
        return len(self.files) * self.repeat

    def __getitem__(self, i: int) -> tuple[Image.Image, str]:
        i = i % len(self.files)
        if self.cache is not None:
            return Image.fromarray(self.cache[i]), self.files[i]
        return load_image(self.root / self.files[i]), self.files[i]

    def validate(self, min_size: int = 1) -> None:
        """Check every image header (cheap, no decode) and its size, before training starts.

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
        if problems:
            raise ImageReadError(
                f"{len(problems)} bad image(s) under {self.root}; re-export them or remove them "
                f"from the folder/split:\n  " + "\n  ".join(problems)
            )


def _item(lr: Image.Image, hr: Image.Image, file_name: str) -> dict:
    return {
        "lr": to_tensor01(lr),  # [3, h, w]
        "hr": to_tensor01(hr),  # [3, H, W]
        "scale": torch.tensor(hr.height / lr.height, dtype=torch.float32),
        "file_name": file_name,
    }


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
        root, split_file, split, first_k, repeat, cache, val_fraction, test_fraction,
            split_seed: see `ImageFolder`.
        min_scale, max_scale: scale range, read by the DataModule to build the batch sampler.
        lr_size: stage-1 LR crop size (paper: 48).
        hr_size: stage-2 HR crop size (paper: 256).
        augment: apply the random flips/rotation.
    """

    def __init__(
        self,
        root: str | Path,
        min_scale: float = 1.0,
        max_scale: float = 8.0,
        lr_size: int | None = None,
        hr_size: int | None = None,
        augment: bool = True,
        split_file: str | Path | None = None,
        split: str | None = None,
        first_k: int | None = None,
        repeat: int = 1,
        cache: str = "none",
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        split_seed: int = 0,
    ) -> None:
        self._set_crops(min_scale, max_scale, lr_size, hr_size, augment)
        self.images = ImageFolder(
            root, split_file, split, first_k, repeat, cache, val_fraction, test_fraction, split_seed
        )

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


class FixedScaleDataset(Dataset):
    """Evaluation pairs at one scale: the uncropped HR and its Pillow-bicubic LR.

    LR size is `(int(H / s), int(W / s))`, so the item's `scale` is the effective `H / h`.

    Args:
        root, split_file, split, first_k, repeat, cache, val_fraction, test_fraction,
            split_seed: see `ImageFolder`.
        scale: SR factor s >= 1.
    """

    def __init__(
        self,
        root: str | Path,
        scale: float,
        split_file: str | Path | None = None,
        split: str | None = None,
        first_k: int | None = None,
        repeat: int = 1,
        cache: str = "none",
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        split_seed: int = 0,
    ) -> None:
        self._set_scale(scale)
        self.images = ImageFolder(
            root, split_file, split, first_k, repeat, cache, val_fraction, test_fraction, split_seed
        )

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
