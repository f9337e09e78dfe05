"""The inputs of super_resolve.py: image files, folders (searched recursively) and glob patterns,
and the output path of each under --output (sub-folders kept, one output per input)."""

from __future__ import annotations

import glob
from pathlib import Path

from scenes.scene_io import output_suffix
from utils.image_io import IMAGE_EXTENSIONS, list_images


def collect_inputs(patterns: list[str], error: type[Exception] = ValueError) -> list[tuple]:
    """(input file, output path relative to --output) for files, folders and globs; one with
    no image is an `error`."""
    found = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            files = list_images(path)
            if not files:
                raise error(f"no images in folder {path} (png/jpg/jpeg/tif/tiff, searched "
                            "recursively); give a folder or files that hold some")  # fmt: skip
            found += [(path / rel, Path(rel)) for rel in files]
        elif path.is_file():
            found.append((path, Path(path.name)))
        else:
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
            files = [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
            if not files:
                raise error(f"no image matches {pattern!r} (a file, folder or glob pattern)")
            found += [(p, Path(p.name)) for p in files]
    return found


def output_paths(jobs: list[tuple[Path, Path]], out_dir: Path, suffix: str,
                 error: type[Exception] = ValueError) -> list[Path]:  # fmt: skip
    """The output file of each input; one that would replace its input, or two inputs that
    would share one, are an `error`."""
    dsts = [out_dir / rel.with_name(rel.stem + suffix + output_suffix(src)) for src, rel in jobs]
    owners: dict[Path, list[Path]] = {}
    for (src, _), dst in zip(jobs, dsts):
        owners.setdefault(dst, []).append(src)
    inputs = [src for (src, _), dst in zip(jobs, dsts) if dst.resolve() == src.resolve()]
    if inputs:
        raise error(
            f"the output of {inputs[0]} would replace the input itself; choose another --output "
            "folder or a --suffix (e.g. --suffix _sr)"
        )
    clashes = {dst: srcs for dst, srcs in owners.items() if len(srcs) > 1}
    if clashes:
        lines = "; ".join(f"{dst} <- {', '.join(map(str, srcs))}" for dst, srcs in clashes.items())
        raise error(
            f"inputs that would write the same output: {lines}; rename one of them "
            "or run them into different --output folders"
        )
    return dsts
