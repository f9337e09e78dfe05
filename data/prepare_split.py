"""Prepare a dataset split as in the paper README: HR images and bicubic LR images per split.

    python data/prepare_split.py --split_file AID_split.pkl --data_path dataset/RawAID \\
        --output_path dataset/AID
    python -m data.prepare_split --make-split my_split.pkl --data_path dataset/MyRaw \\
        --ratios 0.8,0.1,0.1 --seed 0

Writes `<output_path>/<split>/HR/<name>.png` and `<output_path>/<split>/LR/X<s>/<name>.png` for
each split of the pickle and each `--scales` value. HR images are saved as PNG (RGB, converted as
`utils.image_io.load_image` does) so that no JPEG re-encoding loss is added; LR images are the
Pillow bicubic resize to `(int(H/s), int(W/s))` (docs/method.md). Names are flattened:
`Park/park_1.jpg` -> `park_1.png`, or `Park_park_1.png` when two source files share a base name.
`--make-split` writes a seeded split pickle for a dataset that has none (custom datasets, DOTA or
DIOR crops): the sorted file list is shuffled with `--seed` and cut by `--ratios`.
"""

from __future__ import annotations

import os
import sys


def _run_as_module() -> None:
    """Replaces this process with `python -m data.prepare_split <same arguments>`, the repository
    root importable: run as a file (the paper README's `python data/prepare_split.py`), data/ would
    head the import path and its modules (datasets.py, transforms.py) shadow other packages."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []  # not the working folder first
    argv = [sys.executable, *safe_path, "-m", "data.prepare_split", *sys.argv[1:]]
    os.execve(sys.executable, argv, {**os.environ, "PYTHONPATH": path})


if __name__ == "__main__" and __spec__ is None:  # run as a file path, not as a module
    _run_as_module()

import argparse
import logging
import pickle
from pathlib import Path

from tqdm import tqdm

from data.splits import flat_names, load_split_pickle, seeded_split
from data.transforms import lr_size, resize_bicubic
from utils.atomic import atomic_output
from utils.cli import HelpFormatter
from utils.image_io import ImageReadError, list_images, load_image, verify_image

log = logging.getLogger(__name__)


def check_output(output_path: Path, overwrite: bool) -> None:
    """Refuse a non-empty output folder unless `overwrite`, so no data is replaced silently."""
    if output_path.is_dir() and any(output_path.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output folder {output_path} is not empty; pass --overwrite to write into it "
            f"(existing files of the same name are replaced, others are kept)"
        )


def save_png(img, path: Path) -> None:
    """Save whole or not at all (`utils.atomic`): a stop (Ctrl-C, SIGTERM, a full disk) leaves
    no half-written PNG that a later run would take for a prepared image."""
    with atomic_output(path) as tmp:
        img.save(tmp, format="PNG")


def make_split(data_path: Path, out_file: Path, ratios: str, seed: int, overwrite: bool) -> None:
    """Write a seeded `{"train", "val", "test"}` split pickle of the images under `data_path`."""
    if out_file.exists() and not overwrite:
        raise FileExistsError(f"{out_file} exists; pass --overwrite to replace it")
    files = list_images(data_path)
    if not files:
        raise FileNotFoundError(f"no png/jpg/tif images under {data_path}")
    try:
        fractions = tuple(float(r) for r in ratios.split(","))
    except ValueError:
        fractions = ()
    if len(fractions) != 3 or not all(0 <= r <= 1 for r in fractions):
        raise ValueError(f"--ratios needs three numbers train,val,test in [0, 1] such as "
                         f"0.8,0.1,0.1, got {ratios!r}")  # fmt: skip
    splits = seeded_split(files, fractions, seed)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with out_file.open("wb") as f:
        pickle.dump(splits, f)
    log.info("wrote %s: %s", out_file, {k: len(v) for k, v in splits.items()})


def prepare(
    split_file: Path, data_path: Path, output_path: Path, scales: list[float], overwrite: bool
) -> dict[str, int]:
    """Write the HR and LR PNGs of every split; returns the number of images per split."""
    check_output(output_path, overwrite)
    if min(scales) < 1:
        raise ValueError(f"--scales must be >= 1, got {scales}")
    splits = load_split_pickle(split_file)
    files = sorted({f for paths in splits.values() for f in paths})
    missing = [f for f in files if not (data_path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(files)} files named by {split_file} are missing under "
            f"{data_path}, e.g. {missing[:5]}; check --data_path"
        )
    bad = []
    for f in files:  # every image decodes, before anything is written
        try:
            verify_image(data_path / f)
        except ImageReadError as err:
            bad.append(str(err))
    if bad:
        raise ImageReadError(
            f"{len(bad)} unreadable image(s) named by {split_file}; re-export or remove them "
            "(no image was written): " + "; ".join(bad)
        )
    names = flat_names(files)
    for split, paths in splits.items():
        hr_dir = output_path / split / "HR"
        hr_dir.mkdir(parents=True, exist_ok=True)
        for f in tqdm(paths, desc=split, unit="img"):
            hr = load_image(data_path / f)
            save_png(hr, hr_dir / names[f])
            for scale in scales:
                lr_dir = output_path / split / "LR" / f"X{scale:g}"
                lr_dir.mkdir(parents=True, exist_ok=True)
                lr = resize_bicubic(hr, lr_size((hr.height, hr.width), scale))
                save_png(lr, lr_dir / names[f])
    return {split: len(paths) for split, paths in splits.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--split_file", "--split-file", type=Path, help="split pickle to apply")
    parser.add_argument(
        "--data_path", "--data-path", type=Path, required=True, help="raw dataset root"
    )
    parser.add_argument(
        "--output_path", "--output-path", type=Path, help="folder to write {split}/{HR,LR} to"
    )
    parser.add_argument("--scales", type=float, nargs="+", default=[4.0], help="LR scales")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --make-split file and write into a non-empty --output_path",
    )
    parser.add_argument("--make-split", type=Path, help="write a seeded split pickle here first")
    parser.add_argument("--ratios", default="0.8,0.1,0.1", help="train,val,test fractions")
    parser.add_argument("--seed", type=int, default=0, help="seed of --make-split")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.data_path.is_dir():
        parser.error(f"--data_path {args.data_path} is not a folder")
    if args.make_split is None and (args.split_file is None or args.output_path is None):
        parser.error("pass --split_file and --output_path (or --make-split to create a split)")
    out = args.output_path.resolve() if args.output_path is not None else None
    if out is not None and args.data_path.resolve() in (out, *out.parents):
        parser.error(
            f"--output_path {args.output_path} is inside --data_path {args.data_path}: the "
            "prepared PNGs would mix with the raw images; choose another folder"
        )
    try:
        if args.output_path is not None:
            check_output(args.output_path, args.overwrite)
        if args.make_split is not None:
            make_split(args.data_path, args.make_split, args.ratios, args.seed, args.overwrite)
            if args.output_path is None:
                return 0
            args.split_file = args.make_split
        counts = prepare(
            args.split_file, args.data_path, args.output_path, args.scales, args.overwrite
        )
    except (FileExistsError, FileNotFoundError, ValueError, ImageReadError) as err:
        parser.error(str(err))
    log.info("wrote %s under %s", counts, args.output_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
