"""Synthetic data: procedural aerial scenes, deterministic top-down images with the structure SR
has to recover.

    python -m data.synthetic --output scenes --num 16 --size 512 --seed 0

`generate_scene` paints a block grid whose land use follows a per-scene urban/suburban/rural mix:
roads with lane markings and cars, houses with pitched roofs and flat-roofed buildings with rooftop
units (all casting shadows away from one sun), row-textured fields, trees, ponds and rivers; then a
camera model (MTF blur, sensor noise, JPEG). Image `i` of a set with seed `s` is
`generate_scene(size, seed=(s, i))`, so sets with different seeds share no image.
`SceneTrainDataset` / `SceneEvalDataset` are `MultiScaleTrainDataset` / `FixedScaleDataset` whose
images are generated in memory instead of read from a `root` folder; in any config:

    train:
      target: data.synthetic.SceneTrainDataset
      params: {num_images: 64, size: 256, seed: 0, min_scale: 1.0, max_scale: 4.0, lr_size: 32}
    validation:
      target: data.synthetic.SceneEvalDataset
      params: {num_images: 4, size: 256, seed: 1, scale: 4.0}
"""

from data.synthetic.dataset import (
    GeneratedScenes,
    SceneEvalDataset,
    SceneTrainDataset,
    write_scenes,
)
from data.synthetic.scene import generate_scene, scene_name, scene_size

__all__ = [
    "GeneratedScenes",
    "SceneEvalDataset",
    "SceneTrainDataset",
    "generate_scene",
    "scene_name",
    "scene_size",
    "write_scenes",
]
