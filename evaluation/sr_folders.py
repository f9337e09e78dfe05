"""Scoring SR images that already exist (`test.py --sr-dir`): any method's outputs, read from
folders and scored like LDCSR's, one table row per method.

Layout of a method's folder: `<FOLDER>/<dataset>/x<s>/<name>.<ext>`, `x<s>` as test.py writes
it (`x4`, `x2.6`) or as the authors' benchmark folders (`x4.0`); `<name>` is the output name
test.py gives the HR image (its stem; `x_jpg` where two HR files share a stem), any image
extension. Every SR image has the size of its HR image (of round(s*h) x round(s*w) for the
datatypes without HR).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import torch

from evaluation import pairs
from evaluation.pairs import EvaluationError, Item, Source
from utils.image_io import ImageReadError, list_images, load_image, to_tensor01, verify_image


def parse_sr_dirs(values: Sequence[str]) -> dict[str, Path]:
    """`["LIIF=runs/liif", "runs/hat"]` -> `{"LIIF": runs/liif, "hat": runs/hat}` (a bare folder
    is named after itself), in the given order.

    Raises:
        EvaluationError: for a folder that does not exist or a name given twice.
    """
    methods: dict[str, Path] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        name, folder = (name.strip(), Path(folder)) if sep else (Path(value).name, Path(value))
        if not folder.is_dir():
            raise EvaluationError(f"--sr-dir {value}: {folder} is not a folder")
        if not name or name in methods:
            raise EvaluationError(
                f"--sr-dir {value}: method name {name!r} is empty or given twice; "
                "name each folder as NAME=FOLDER"
            )
        methods[name] = folder
    return methods


def scale_folder(root: Path, dataset: str, scale: float) -> Path:
    """`<root>/<dataset>/x<s:g>`, or the authors' `x<s:.1f>` when only that one exists."""
    ours, theirs = (root / dataset / f"x{s}" for s in (format(scale, "g"), f"{scale:.1f}"))
    return theirs if not ours.is_dir() and theirs.is_dir() else ours


def _stem(relative: str) -> str:
    return PurePosixPath(relative).with_suffix("").as_posix()


def _problems(name: str, folder: Path, items: Sequence[Item]) -> list[str]:
    """What is wrong with one method's folder for one dataset and scale (empty: nothing)."""
    if not folder.is_dir():
        return [f"{name}: folder {folder} is missing ({len(items)} images expected)"]
    found: dict[str, list[str]] = {}
    for f in list_images(folder):
        found.setdefault(_stem(f), []).append(f)
    expected = {_stem(item.name): item for item in items}
    problems = []
    if missing := sorted(set(expected) - set(found)):
        problems.append(f"{name}: {folder} lacks {', '.join(expected[s].name for s in missing)}")
    if extra := sorted(f for s in set(found) - set(expected) for f in found[s]):
        problems.append(f"{name}: {folder} holds extra file(s) {', '.join(extra)}")
    for stem in sorted(set(found) & set(expected)):
        files, item = found[stem], expected[stem]
        if len(files) > 1:
            problems.append(f"{name}: {folder} holds {' and '.join(files)} for {item.name}")
            continue
        try:
            size = verify_image(folder / files[0])
        except ImageReadError as err:
            problems.append(f"{name}: {err}")
            continue
        if size != item.out_hw:
            problems.append(
                f"{name}: {folder / files[0]} is {size[0]}x{size[1]}, expected "
                f"{item.out_hw[0]}x{item.out_hw[1]} (the HR size of {item.path.name})"
            )
    return problems


def check_sr_dirs(
    methods: dict[str, Path], sources: Sequence[Source], datatype: str, scales: Sequence[float]
) -> None:
    """Checks every method's folder against the test images, from headers only, before any
    scoring: one SR image per test image, by name, of the right size.

    Raises:
        EvaluationError: listing every missing, extra, ambiguous, unreadable or wrong-size file.
    """
    problems = []
    for source in sources:
        for scale in scales:
            items, _ = pairs.plan_items(source, datatype, scale)
            for name, root in methods.items():
                problems += _problems(name, scale_folder(root, source.name, scale), items)
    if problems:
        count = len(problems)
        raise EvaluationError(
            f"--sr-dir: {count} problem(s), nothing was scored: " + "; ".join(problems) + ". "
            "Each folder must hold <dataset>/x<s>/<name>.png with one image per test image, "
            "named and sized as its HR image"
        )


class SROutputs:
    """The SR images of one method for one dataset: `(scale, items) -> [B, 3, H, W]` in [0, 1]."""

    def __init__(self, root: Path, dataset: str):
        self.root, self.dataset = Path(root), dataset

    def __call__(self, scale: float, items: Sequence[Item]) -> torch.Tensor:
        folder = scale_folder(self.root, self.dataset, scale)
        files = {_stem(f): f for f in list_images(folder)}
        images = [load_image(folder / files[_stem(item.name)]) for item in items]
        return torch.stack([to_tensor01(img) for img in images])

    def folder(self, scale: float) -> Path:
        """Where the images of `scale` are (FID reads this folder)."""
        return scale_folder(self.root, self.dataset, scale)
