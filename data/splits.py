"""Split files and file names of a dataset folder: the authors' split pickle (read safely), our
seeded split, and flat output names for nested relative paths."""

from __future__ import annotations

import math
import pickle
from collections import Counter
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np

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
