"""Test inputs of the evaluation protocol (docs/method.md, "Evaluation protocol"): which images
a dataset holds for a datatype and scale, their output names, LR and output sizes, batches of
equal-size images, and the LR/HR tensors. `evaluation.runner.evaluate` runs the methods and
metrics on what this module loads.

Datatypes: `hr-downsample` (LR = Pillow bicubic of the uint8 HR), `paired` (LR from `LR/X<s>`),
`lr` (LR images only) and `hr-input` (the images themselves are the LR); the first two have HR.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import torch

from data.splits import flat_names
from data.transforms import lr_size, resize_bicubic
from utils.image_io import ImageReadError, list_images, load_image, to_tensor01, verify_image

log = logging.getLogger(__name__)

DATATYPES = ("hr-downsample", "paired", "lr", "hr-input")
REFERENCE_DATATYPES = ("hr-downsample", "paired")  # the datatypes with an HR target


class EvaluationError(ValueError):
    """Bad evaluation input (dataset, scale, datatype, output folder); the message says the fix."""


def parse_datatype(text: str) -> str:
    """Normalise a datatype name (underscores and upper case accepted).

    Returns:
        One of `DATATYPES`: `hr-downsample`, `paired`, `lr` or `hr-input`.

    Raises:
        EvaluationError: for any other name.
    """
    return parse_choice(text, DATATYPES, "datatype")


def parse_choice(text: str, choices: Sequence[str], what: str) -> str:
    """`text` as one of `choices` (underscores and upper case accepted), else EvaluationError
    naming `what` and the choices."""
    name = text.strip().lower().replace("_", "-")
    if name not in choices:
        raise EvaluationError(f"unknown {what} {text!r}; choose one of {', '.join(choices)}")
    return name


def parse_scales(values: Sequence[str | float]) -> list[float]:
    """Scales from command-line values: `["2,2.5", "4"]` -> `[2.0, 2.5, 4.0]` (duplicates dropped).

    Raises:
        EvaluationError: unless every value is a finite number > 0 (and there is at least one).
    """
    parts = [p for v in values for p in re.split(r"[,\s]+", str(v).strip()) if p]
    for part in parts or ["(none)"]:
        try:
            ok = math.isfinite(float(part)) and float(part) > 0
        except ValueError:
            ok = False
        if not ok:
            raise EvaluationError(f"scale {part!r} is not a number > 0; e.g. --scales 2,2.5,4")
    return list(dict.fromkeys(float(p) for p in parts))


@dataclass(frozen=True)
class Source:
    """A test dataset.

    Attributes:
        name: dataset name (output folder and summary rows).
        images: HR folder (datatypes lr, hr-input: the folder of the inputs).
        lr_root: folder of the `X<s>` LR folders data/prepare_split.py writes (None: plain folder).
    """

    name: str
    images: Path
    lr_root: Path | None = None


def source_from_folder(folder: str | Path, name: str | None = None) -> Source:
    """`Source` of a split folder with `HR/` (+ `LR/`), an `HR` folder beside `LR/`, or a plain
    folder of images; `name` defaults to the last path part other than HR, LR or test."""
    folder = Path(folder)
    if (folder / "HR").is_dir() or (folder / "LR").is_dir():
        images, lr_root = folder / "HR", folder / "LR"
    elif folder.name.lower() == "hr":
        images, lr_root = folder, folder.parent / "LR"
    else:
        images, lr_root = folder, None
    parts = [p for p in folder.resolve().parts[1:] if p.lower() not in ("hr", "lr", "test")]
    return Source(
        name or re.sub(r"[^\w.-]+", "_", parts[-1] if parts else "images"), images, lr_root
    )


def resolve_dataset(name: str, data_root: str | Path = "dataset") -> Source:
    """`Source` of `<data_root>/<name>/test` (or `Test`) as prepare_split.py writes it, else of
    the folder `name`.

    Raises:
        EvaluationError: naming the datasets under `data_root` when neither exists.
    """
    root = Path(data_root)
    for folder in (root / name, Path(name)):  # a dataset folder holding test/ or Test/
        for split in ("test", "Test"):
            if (folder / split).is_dir():
                return source_from_folder(folder / split)
    if Path(name).is_dir():
        return source_from_folder(name)
    known = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    found = f"datasets under {root}: {', '.join(known)}" if known else f"{root} holds no dataset"
    raise EvaluationError(
        f"unknown dataset {name!r}: neither {root / name}/test/HR nor a folder {name} exists "
        f"({found}); write it with data/prepare_split.py, set --data-root, or pass a folder path"
    )


def input_folders(source: Source, datatype: str, scale: float) -> tuple[Path, Path | None]:
    """`(folder to list, paired LR folder or None)`: the HR folder, or `LR/X<s>` for datatype
    `lr`; the LR folder only for `paired` (EvaluationError when it or the listed one is missing)."""
    lr_dir = source.lr_root / f"X{scale:g}" if source.lr_root is not None else None
    if datatype == "paired" and (lr_dir is None or not lr_dir.is_dir()):
        raise EvaluationError(
            f"--datatype paired needs the LR folder {lr_dir or 'LR/X' + format(scale, 'g')} beside "
            f"{source.images} (write it with data/prepare_split.py --scales {scale:g})"
        )
    folder = lr_dir if datatype == "lr" and lr_dir is not None else source.images
    if not folder.is_dir():
        raise EvaluationError(f"image folder {folder} does not exist (dataset {source.name})")
    return folder, lr_dir if datatype == "paired" else None


def _list_inputs(folder: Path) -> list[str]:
    """The images under `folder` (`list_images`); EvaluationError when there is none."""
    files = list_images(folder)
    if not files:
        raise EvaluationError(
            f"no images in {folder} (png/jpg/jpeg/tif/tiff, searched recursively)"
        )
    return files


def output_names(files: Sequence[str], folder: Path) -> dict[str, str]:
    """`data.splits.flat_names` with extensions kept (`x.jpg`, `x.tif` -> `x_jpg.png`,
    `x_tif.png`).

    Raises:
        EvaluationError: listing the files of `folder` whose names still collide, before any
            work is done.
    """
    try:
        return flat_names(files, keep_extension=True)
    except ValueError as err:
        raise EvaluationError(f"in {folder}: {err}") from None


def check_inputs(source: Source, datatype: str, scales: Sequence[float]) -> int:
    """Checks, from file names only, that `source` has images for every scale and that their
    output names are unique; returns the number of input files of the first scale.

    Raises:
        EvaluationError: for a missing folder, an empty one, or clashing output names.
    """
    counts = []
    for scale in scales:
        folder, _ = input_folders(source, datatype, scale)
        files = _list_inputs(folder)
        output_names(files, folder)
        counts.append(len(files))
    return counts[0] if counts else 0


@dataclass(frozen=True)
class Item:
    """One test image: output PNG name, input file(s), LR and output sizes `(h, w)` in pixels."""

    name: str
    path: Path  # the HR (hr-downsample, paired) or the input image (lr, hr-input)
    lr_path: Path | None
    lr_hw: tuple[int, int]
    out_hw: tuple[int, int]
    file: str = ""  # the input's path relative to its folder: what a failed row names


def _item(name: str, path: Path, lr_path, datatype: str, scale: float, min_side: int) -> Item:
    height, width = verify_image(path)
    if datatype == "hr-downsample":
        try:
            lr_hw, out_hw = lr_size((height, width), scale), (height, width)
        except ValueError as err:  # an LR side of 0
            raise EvaluationError(f"{path}: {err}") from None
    elif datatype == "paired":
        lr_hw, out_hw = verify_image(lr_path), (height, width)
    else:
        lr_hw, out_hw = (height, width), (round(height * scale), round(width * scale))
    if min(lr_hw) < 1 or min(out_hw) < min_side:
        raise EvaluationError(
            f"{path} ({height}x{width}) is too small for scale {scale:g}: LR "
            f"{lr_hw[0]}x{lr_hw[1]}, output {out_hw[0]}x{out_hw[1]}; the model needs an LR side "
            f">= 1 px and an output side >= {min_side} px"
        )
    return Item(name, path, lr_path, lr_hw, out_hw)


def plan_items(
    source: Source, datatype: str, scale: float, min_side: int = 1
) -> tuple[list[Item], list[dict]]:
    """The images of `source` at `scale`, from their headers only (nothing is decoded).

    Args:
        source, datatype, scale: what to test (`datatype` as `parse_datatype` returns it).
        min_side: smallest output side in pixels the model accepts.

    Returns:
        `(items, failed)`: `Item`s in listing order, and per-image CSV rows (`file`, `scale`,
        `status`) of the unreadable or too small images, which are logged, not raised.

    Raises:
        EvaluationError: if the folder is missing or holds no image.
    """
    folder, lr_dir = input_folders(source, datatype, scale)
    files = _list_inputs(folder)
    stem = lambda f: PurePosixPath(f).with_suffix("")  # noqa: E731 - paired files match by stem
    lr_files = {stem(f): lr_dir / f for f in list_images(lr_dir)} if lr_dir else {}
    names, items, failed = output_names(files, folder), [], []
    for f in files:
        try:
            if lr_dir and stem(f) not in lr_files:
                raise EvaluationError(f"{folder / f} has no LR image of the same name in {lr_dir}")
            args = (names[f], folder / f, lr_files.get(stem(f)), datatype, scale, min_side)
            items.append(replace(_item(*args), file=f))
        except (EvaluationError, ImageReadError) as err:
            log.warning("image skipped: %s", err)
            failed.append(failed_row(f, scale, str(err)))
    return items, failed


def failed_row(name: str, scale: float, reason: str) -> dict:
    """The per_image.csv row of an image that could not be evaluated, with the reason."""
    return {"file": name, "scale": scale, "status": f"failed: {reason}"}


def make_batches(items: Sequence[Item], batch_size: int) -> list[list[Item]]:
    """Batches of <= `batch_size` items with equal LR and output sizes, in listing order."""
    groups: dict[tuple, list[Item]] = {}
    for item in items:
        groups.setdefault((item.lr_hw, item.out_hw), []).append(item)
    return [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def load_batch(
    batch: Sequence[Item], datatype: str
) -> tuple[list[Item], torch.Tensor | None, torch.Tensor | None, list[tuple[Item, str]]]:
    """Decode a batch of equal-size items (`make_batches`); an image that fails to decode (e.g.
    a truncated JPEG, whose header `plan_items` accepted) is left out, not raised.

    Returns:
        `(items, lr, hr, failed)`: the decoded items, LR [B, 3, h, w] and HR [B, 3, H, W] (None
        for lr, hr-input; both None when no item decoded), float in [0, 1] on the CPU, and
        `(item, reason)` for each image left out.
    """
    items, lrs, hrs, failed = [], [], [], []
    for item in batch:
        try:
            img = load_image(item.path)
            if datatype == "hr-downsample":  # Pillow bicubic of the uint8 HR (section 1)
                lr = to_tensor01(resize_bicubic(img, item.lr_hw))
            else:
                lr = to_tensor01(load_image(item.lr_path) if datatype == "paired" else img)
        except ImageReadError as err:
            log.warning("image skipped: %s", err)
            failed.append((item, str(err)))
            continue
        items.append(item)
        lrs.append(lr)
        hrs += [to_tensor01(img)] if datatype in REFERENCE_DATATYPES else []
    lr = torch.stack(lrs) if lrs else None
    return items, lr, torch.stack(hrs) if hrs else None, failed
