"""Procedural aerial scenes: deterministic top-down images with the structure SR has to recover.

    python -m data.scenes --output scenes --num 16 --size 512 --seed 0
    python data/scenes.py --output scenes --num 4 --size 384 512 --seed 1 --overwrite

`generate_scene` paints a block grid whose land use follows a per-scene urban/suburban/rural mix:
roads with lane markings and cars, houses with pitched roofs and flat-roofed buildings with rooftop
units (all casting shadows away from one sun), row-textured fields, trees, ponds and rivers; then a
camera model (MTF blur, sensor noise, JPEG). Image `i` of a set with seed `s` is
`generate_scene(size, seed=(s, i))`, so sets with different seeds share no image.
`SceneTrainDataset` / `SceneEvalDataset` are `MultiScaleTrainDataset` / `FixedScaleDataset` whose
images are generated in memory instead of read from a `root` folder; in any config:

    train:
      target: data.scenes.SceneTrainDataset
      params: {num_images: 64, size: 256, seed: 0, min_scale: 1.0, max_scale: 4.0, lr_size: 32}
    validation:
      target: data.scenes.SceneEvalDataset
      params: {num_images: 4, size: 256, seed: 1, scale: 4.0}
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

if __package__ in (None, ""):  # run as `python data/scenes.py`: import from the repo root,
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # not from data/ (would shadow names)

from torch.utils.data import Dataset  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data.datasets import FixedScaleDataset, MultiScaleTrainDataset  # noqa: E402
from data.scene_layout import SceneLayout  # noqa: E402


def scene_size(size: int | Sequence[int]) -> tuple[int, int]:
    """`(height, width)` from a side or a pair; raises ValueError for sides < 8."""
    hw = (size, size) if isinstance(size, int | np.integer) else size
    hw = tuple(hw) if isinstance(hw, Sequence) and not isinstance(hw, str) else ()
    if len(hw) != 2 or not all(isinstance(s, int | np.integer) and s >= 8 for s in hw):
        raise ValueError(f"scene size must be an int or (height, width) of ints >= 8, got {size!r}")
    return int(hw[0]), int(hw[1])


def _camera(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Optics/detector MTF blur, haze and gain, sensor noise, then JPEG at quality 85-92."""
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.45, 0.75)))
    arr = np.asarray(img, np.float32)
    grey = arr.mean(-1, keepdims=True)
    arr = (grey + (arr - grey) * rng.uniform(0.7, 0.95)) * rng.uniform(0.92, 1.08)
    arr += rng.uniform(0, 14) * np.array([0.8, 0.9, 1.0], np.float32)  # atmospheric haze
    arr += rng.standard_normal(arr.shape[:2] + (1,), dtype=np.float32) * rng.uniform(1, 2.5)
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * rng.uniform(0.5, 1.5)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8)).save(
        buffer, "JPEG", quality=int(rng.integers(85, 93))
    )
    return Image.open(buffer).convert("RGB")


def generate_scene(
    size: int | tuple[int, int] = 512, seed: int | tuple[int, ...] = 0
) -> Image.Image:
    """Paint one aerial scene (deterministic per seed).

    The layout (road grid at a random angle, land use of each block, ground sampling 0.3-0.5 m/px,
    sun direction and camera parameters) is drawn from `numpy.random.default_rng(seed)`.

    Args:
        size: side in pixels, or `(height, width)`; sides >= 8.
        seed: non-negative int or tuple of them (a set uses `(set seed, image index)`).

    Returns:
        RGB uint8 Pillow image of `size` (about 0.1-0.3 s for 512 x 512 on one core).
    """
    h, w = scene_size(size)
    rng = np.random.default_rng(seed)
    angle = 0.0 if rng.random() < 0.3 else rng.uniform(0, 90)
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    ch, cw = math.ceil(w * sin + h * cos) + 2, math.ceil(w * cos + h * sin) + 2  # covers the crop
    img = SceneLayout(rng, ch, cw).render()
    if angle:  # the grid runs at `angle` to the image axes
        img = img.rotate(angle, Image.Resampling.BICUBIC)
    left, top = (cw - w) // 2, (ch - h) // 2
    img = img.crop((left, top, left + w, top + h))
    return _camera(img, rng)


def scene_name(index: int) -> str:
    """File name of scene `index` of a set: `scene_0000.png`, ..."""
    return f"scene_{index:04d}.png"


class GeneratedScenes(Dataset):
    """Generated HR images with `ImageFolder`'s interface (len, items, `root`, `files`, `validate`).

    Item `i` is `(generate_scene(size, (seed, i % num_images)), "scene_{i:04d}.png")`, the image
    that `python -m data.scenes --seed <seed>` writes under that name.

    Args:
        num_images: number of distinct scenes.
        size: side in pixels, or `(height, width)`.
        seed: seed of the set; use different seeds for train and evaluation sets.
        repeat: the dataset length is `repeat * num_images` (longer epochs).
        cache: keep each painted image in memory (per DataLoader worker) to paint it only once.
    """

    def __init__(
        self,
        num_images: int,
        size: int | tuple[int, int] = 512,
        seed: int = 0,
        repeat: int = 1,
        cache: bool = True,
    ) -> None:
        if num_images < 1 or repeat < 1 or seed < 0:
            raise ValueError(
                f"generated scenes need num_images >= 1, repeat >= 1 and seed >= 0, got "
                f"{num_images}, {repeat}, {seed}"
            )
        self.size, self.seed, self.repeat = scene_size(size), seed, repeat
        self.files = [scene_name(i) for i in range(num_images)]
        self.root = Path(f"<generated scenes, seed {seed}>")  # shown in the datasets' messages
        self.cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.files) * self.repeat

    def __getitem__(self, i: int) -> tuple[Image.Image, str]:
        i = i % len(self.files)
        if self.cache is not None and i in self.cache:
            return Image.fromarray(self.cache[i]), self.files[i]
        img = generate_scene(self.size, (self.seed, i))
        if self.cache is not None:
            self.cache[i] = np.asarray(img)
        return img, self.files[i]

    def validate(self, min_size: int = 1) -> None:
        """Check that the scenes fit the largest crop (nothing is painted)."""
        if min(self.size) < min_size:
            raise ValueError(
                f"generated scenes are {self.size[0]}x{self.size[1]}, smaller than "
                f"the {min_size} px the dataset needs; raise `size` or lower max_scale"
            )


class SceneTrainDataset(MultiScaleTrainDataset):
    """`MultiScaleTrainDataset` (random-scale crops) over `GeneratedScenes` instead of a folder.

    Args:
        num_images, size, seed, repeat, cache: see `GeneratedScenes`.
        min_scale, max_scale, lr_size, hr_size, augment: see `MultiScaleTrainDataset`.
    """

    def __init__(
        self,
        num_images: int,
        size: int | tuple[int, int] = 512,
        seed: int = 0,
        min_scale: float = 1.0,
        max_scale: float = 8.0,
        lr_size: int | None = None,
        hr_size: int | None = None,
        augment: bool = True,
        repeat: int = 1,
        cache: bool = True,
    ) -> None:
        self._set_crops(min_scale, max_scale, lr_size, hr_size, augment)
        self.images = GeneratedScenes(num_images, size, seed, repeat, cache)


class SceneEvalDataset(FixedScaleDataset):
    """`FixedScaleDataset` (whole HR image and its bicubic LR) over `GeneratedScenes`.

    Args:
        num_images, size, seed, repeat, cache: see `GeneratedScenes`; the default seed (1) differs
            from `SceneTrainDataset`'s (0), so default evaluation scenes are unseen in training.
        scale: SR factor s >= 1.
    """

    def __init__(
        self,
        num_images: int,
        scale: float,
        size: int | tuple[int, int] = 512,
        seed: int = 1,
        repeat: int = 1,
        cache: bool = True,
    ) -> None:
        self._set_scale(scale)
        self.images = GeneratedScenes(num_images, size, seed, repeat, cache)


def write_scenes(
    output: str | Path, num: int, size: int | Sequence[int], seed: int = 0, overwrite: bool = False
) -> list[Path]:
    """Write `scene_0000.png`, ... (scene i uses seed `(seed, i)`); returns their paths.

    Raises:
        FileExistsError: if any of the files exists and `overwrite` is False (nothing is written).
    """
    output = Path(output)
    paths = [output / scene_name(i) for i in range(num)]
    existing = [p.name for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{len(existing)} of the {num} scene files already exist in {output} "
            f"(e.g. {existing[0]}); pass --overwrite to replace them"
        )
    output.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(tqdm(paths, desc=f"scenes -> {output}", unit="img")):
        generate_scene(size, (seed, i)).save(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--output", required=True, help="folder for the PNGs (created if missing)")
    parser.add_argument("--num", type=int, default=16, help="number of scenes to write")
    parser.add_argument(
        "--size",
        type=int,
        nargs="+",
        default=[512],
        metavar="PX",
        help="image side in pixels, or height and width",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the set (scene i: (seed, i))")
    parser.add_argument("--overwrite", action="store_true", help="replace existing scene files")
    args = parser.parse_args(argv)
    if args.num < 1 or args.seed < 0 or len(args.size) > 2:
        parser.error("need --num >= 1, --seed >= 0 and one or two --size values")
    try:
        write_scenes(
            args.output,
            args.num,
            scene_size(args.size[0] if len(args.size) == 1 else args.size),
            args.seed,
            args.overwrite,
        )
    except (FileExistsError, ValueError) as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
