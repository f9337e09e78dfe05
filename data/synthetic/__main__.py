"""Write a set of generated aerial scenes as PNG files (`scene_0000.png`, ...).

    python -m data.synthetic --output scenes --num 16 --size 512 --seed 0
    python -m data.synthetic --output scenes --num 4 --size 384 512 --seed 1 --overwrite

Image `i` of a set with seed `s` is `generate_scene(size, seed=(s, i))`, so sets with different
seeds share no image.
"""

from __future__ import annotations

import argparse

from data.synthetic.dataset import write_scenes
from data.synthetic.scene import scene_size


def main(argv: list[str] | None = None) -> None:
    """Parse `argv` (default: sys.argv) and write the scenes; errors exit with a usage message."""
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
