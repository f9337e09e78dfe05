"""Helpers of demo.py: held-out images from a user's folder, the time budget, the result table
(with each method's high-frequency energy) and the comparison figure.

The figure has one block per image: LR (nearest-upscaled) | bicubic | sr_kd | LDCSR | stage-1
reconstruction | HR | uncertainty, each output with its PSNR (panels whose images are absent are
left out), a box around the window of most HR detail, and that window zoomed below.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data.splits import flat_names, seeded_split
from data.transforms import lr_size, resize_bicubic
from evaluation.spectrum import hf_energy_ratio
from utils.image_io import list_images, load_image, to_tensor01
from utils.metrics import crop_border_for, psnr

_LABEL_HEIGHT = 22
_GAP = 4


def time_limit(minutes: float) -> str:
    """Lightning's `max_time` string "DD:HH:MM:SS" for `minutes` (> 0)."""
    if not minutes > 0:
        raise ValueError(f"a training budget must be > 0 minutes, got {minutes}")
    seconds = max(1, round(minutes * 60))
    days, rest = divmod(seconds, 86400)
    return f"{days:02d}:{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"


def split_folder(folder: Path, fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) image paths relative to `folder`: a seeded split (`seeded_split`)
    holding out `round(n * fraction)` images, at least one, and leaving at least one to train on.
    """
    files = list_images(folder)
    if len(files) < 2:
        raise ValueError(f"{folder} holds {len(files)} image(s); the demo needs at least 2")
    fraction = min(max(fraction, 1.0 / len(files)), 1.0 - 1.0 / len(files))
    split = seeded_split(files, (1.0 - fraction, 0.0, fraction), seed)
    return split["train"], split["test"]


def save_center_crops(folder: Path, files: Sequence[str], size: int, out_dir: Path) -> None:
    """Centre crops of at most `size` x `size` px of `folder/files`, as PNGs in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for rel, name in flat_names(list(files)).items():
        img = load_image(folder / rel)
        width, height = min(size, img.width), min(size, img.height)
        left, top = (img.width - width) // 2, (img.height - height) // 2
        img.crop((left, top, left + width, top + height)).save(out_dir / name)


def detail_window(img: Image.Image, size: int) -> tuple[int, int, int, int]:
    """The `size` x `size` box (left, top, right, bottom) with the most gradient energy."""
    grey = np.asarray(img.convert("L"), np.float64)
    energy = np.zeros_like(grey)
    energy[:, 1:] += np.diff(grey, axis=1) ** 2
    energy[1:, :] += np.diff(grey, axis=0) ** 2
    size = min(size, *grey.shape)
    total = np.pad(energy, ((1, 0), (1, 0))).cumsum(0).cumsum(1)  # integral image
    sums = total[size:, size:] - total[:-size, size:] - total[size:, :-size] + total[:-size, :-size]
    top, left = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(left), int(top), int(left) + size, int(top) + size


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType: the bitmap font
        return ImageFont.load_default()


def _block(panels: list[tuple[str, Image.Image]], box: tuple, zoom_size: int) -> Image.Image:
    """Labels, full panels with the box drawn, then the boxed windows zoomed to `zoom_size`."""
    width, height = panels[0][1].size
    cell = max(width, zoom_size)
    block = Image.new(
        "RGB", (len(panels) * (cell + _GAP), _LABEL_HEIGHT + height + zoom_size + _GAP)
    )
    draw = ImageDraw.Draw(block, "RGB")
    block.paste((255, 255, 255), (0, 0, block.width, block.height))
    font = _font(14)
    for i, (label, img) in enumerate(panels):
        x = i * (cell + _GAP)
        draw.text((x + 2, 3), label, fill=(0, 0, 0), font=font)
        framed = img.copy()
        ImageDraw.Draw(framed).rectangle(box, outline=(255, 40, 40), width=2)
        block.paste(framed, (x, _LABEL_HEIGHT))
        zoomed = img.crop(box).resize((zoom_size, zoom_size), Image.Resampling.NEAREST)
        block.paste(zoomed, (x, _LABEL_HEIGHT + height + _GAP))
    return block


# (label, image folder under <dataset>/x<s>/) of the figure's output panels, in order
PANELS = (
    ("Bicubic", "bicubic"), ("sr_kd", "sr_kd"), ("LDCSR", "sr"),
    ("Stage 1 (HR latent)", "reconstruction"),
)  # fmt: skip
# table rows: (summary method name, label); the reconstruction is an upper bound, not a method
STORY = (
    ("Bicubic", "Bicubic"), ("LDCSR (sr_kd)", "sr_kd (condition decoded alone)"),
    ("LDCSR", "LDCSR (4 steps)"),
    ("LDCSR stage 1", "stage-1 reconstruction from the HR latent (upper bound, uses the HR)"),
)  # fmt: skip


def hf_ratio(hr_dir: Path, results_dir: Path, folder: str) -> float | None:
    """Mean over the images of `results_dir/folder` of their energy above a quarter of the
    Nyquist frequency over the HR's (`evaluation.spectrum.hf_energy_ratio`); None if absent."""
    files = sorted((results_dir / folder).glob("*.png"))
    hr_files = {flat: rel for rel, flat in flat_names(list_images(hr_dir)).items()}
    ratios = []
    for path in (f for f in files if f.name in hr_files):
        hr = to_tensor01(load_image(hr_dir / hr_files[path.name]))
        ratios.append(hf_energy_ratio(to_tensor01(load_image(path)), hr))
    return sum(ratios) / len(ratios) if ratios else None


def story_table(rows: Sequence[dict]) -> str:
    """Markdown: per scale, Bicubic, sr_kd, LDCSR and the stage-1 upper bound with PSNR, SSIM and
    the high-frequency energy ratio (HR = 1) of `rows` (summary rows with `hf_ratio`)."""
    fmt = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
    lines = [
        "| Scale | Method | PSNR | SSIM | HF energy / HR's |",
        "|---|---|---|---|---|",
    ]
    for scale in sorted({r["scale"] for r in rows}):
        by_method = {r["method"]: r for r in rows if r["scale"] == scale}
        for method, label in STORY:
            if (r := by_method.get(method)) is not None:
                cells = (fmt(r.get("psnr"), "{:.2f}"), fmt(r.get("ssim"), "{:.4f}"),
                         fmt(r.get("hf_ratio"), "{:.3f}"))  # fmt: skip
                lines.append(f"| x{scale:g} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_comparison(
    hr_dir: Path, results_dir: Path, scale: float, out_path: Path, num_images: int = 2
) -> Path:
    """Comparison figure of evaluate()'s outputs at one scale.

    Args:
        hr_dir: the evaluated HR folder (flat, PNG names as evaluate() writes them).
        results_dir: `<eval out>/<dataset>/x<scale>` holding `sr/`, `bicubic/` and, where
            evaluated, `sr_kd/`, `reconstruction/` and `uncertainty/<stem>_uncertainty.png`.
        scale: the SR factor of `results_dir` (LR = Pillow bicubic of the HR, as evaluated).
        out_path: PNG to write.
        num_images: blocks in the figure (the first images by name).

    Returns:
        `out_path`.
    """
    names = sorted(p.name for p in (results_dir / "sr").glob("*.png"))[:num_images]
    if not names:
        raise FileNotFoundError(f"no super-resolved images in {results_dir / 'sr'}")
    hr_files = {flat: rel for rel, flat in flat_names(list_images(hr_dir)).items()}
    border = crop_border_for(scale)
    blocks = []
    for name in names:
        hr = load_image(hr_dir / hr_files[name])
        lr = resize_bicubic(hr, lr_size((hr.height, hr.width), scale))
        panels = [(f"LR x{scale:g}", lr.resize(hr.size, Image.Resampling.NEAREST))]
        for label, folder in PANELS:
            if (results_dir / folder / name).is_file():
                out = load_image(results_dir / folder / name)
                value = float(psnr(to_tensor01(out)[None], to_tensor01(hr)[None], border)[0])
                panels.append((f"{label} {value:.2f}", out))
        panels.append(("HR", hr))
        unc = results_dir / "uncertainty" / f"{Path(name).stem}_uncertainty.png"
        if unc.is_file():
            panels.append(("uncertainty", load_image(unc)))
        window = max(16, math.ceil(min(hr.size) / 3))
        blocks.append(_block(panels, detail_window(hr, window), max(hr.width, 192)))
    figure = Image.new(
        "RGB", (max(b.width for b in blocks), sum(b.height for b in blocks)), "white"
    )
    top = 0
    for block in blocks:
        figure.paste(block, (0, top))
        top += block.height
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.save(out_path)
    return out_path
