"""Generated scenes as datasets: `GeneratedScenes` (an `ImageFolder` look-alike) and the training /
evaluation datasets over it, plus `write_scenes`, which saves a set as PNG files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from data.datasets import FixedScaleDataset, MultiScaleTrainDataset
from data.synthetic.scene import generate_scene, scene_name, scene_size


class GeneratedScenes(Dataset):
    """Generated HR images with `ImageFolder`'s interface (len, items, `root`, `files`, `validate`).

    Item `i` is `(generate_scene(size, (seed, i % num_images)), "scene_{i:04d}.png")`, the image
    that `python -m data.synthetic --seed <seed>` writes under that name.

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
