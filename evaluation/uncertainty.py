"""How well an uncertainty map predicts the error (`test.py --samples N`): the per-image Spearman
rank correlation between uncertainty and absolute error, and a calibration curve per dataset and
scale (pixels binned by uncertainty, equal counts per bin, against their mean absolute error).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.stats import spearmanr

from evaluation.tables import write_csv
from models.uncertainty import seeds_from
from scenes.uncertainty_maps import write_uncertainty
from utils.distributed import World
from utils.metrics import crop_border_for, quantize

KEPT_PIXELS = 1 << 16  # per image, for the calibration curve (an evenly strided subset)


def sample_with_uncertainty(model, lr, hr, out_size, generator, tiling=None, samples=2):
    """An evaluation method (`evaluation.runner.Method.run`): LDCSR's sample of the batch's seed
    s (`generator.initial_seed()`) and the uncertainty map of seeds s .. s + samples - 1."""
    seeds = seeds_from(generator.initial_seed(), samples)
    return model.super_resolve_samples(lr, out_size, seeds, **(tiling or {}))


def spearman(uncertainty: np.ndarray, error: np.ndarray) -> float:
    """Spearman rank correlation of two same-shape arrays, over all elements (ties share their
    mean rank); NaN when either is constant."""
    u, e = np.ravel(uncertainty), np.ravel(error)
    if u.size < 2 or np.ptp(u) == 0 or np.ptp(e) == 0:
        return math.nan
    return float(spearmanr(u, e).statistic)


class Calibration:
    """Accumulates (uncertainty, |error|) pixels of a dataset at one scale; `bins()` groups them
    into `bins` equal-count bins of increasing uncertainty. `parts` holds what was added, keyed,
    so that the parts of several processes merge in one process's order (`merge`)."""

    def __init__(self, bins: int = 10):
        self.n_bins, self.parts = bins, []  # [(key, uncertainty, error)], float32 pixels

    def add(self, uncertainty: np.ndarray, error: np.ndarray, key: int = 0) -> None:
        """Keeps an evenly strided subset of the pixels; `key` orders parts when merged (e.g.
        the batch index; parts of one key stay in the order they were added)."""
        u, e = np.ravel(uncertainty), np.ravel(error)
        step = max(1, u.size // KEPT_PIXELS)
        self.parts.append((key, u[::step].astype(np.float32), e[::step].astype(np.float32)))

    def merge(self, parts: list) -> None:
        """Adds the `parts` of other calibrations (e.g. other processes' shares)."""
        self.parts += parts

    def bins(self) -> list[dict]:
        """[{"bin", "uncertainty" (mean), "mae", "pixels"}] in increasing uncertainty."""
        if not self.parts:
            return []
        parts = sorted(self.parts, key=lambda part: part[0])  # stable: added order within a key
        u, e = (np.concatenate([part[i] for part in parts]).astype(np.float64) for i in (1, 2))
        order = np.argsort(u, kind="stable")
        groups = [g for g in np.array_split(order, min(self.n_bins, u.size)) if g.size]
        return [
            {"bin": i, "uncertainty": float(u[g].mean()), "mae": float(e[g].mean()),
             "pixels": int(g.size)}
            for i, g in enumerate(groups)
        ]  # fmt: skip

    def write(self, folder: Path, title: str) -> None:
        """`calibration.csv` and `calibration.png` in `folder` (nothing without pixels)."""
        bins = self.bins()
        if bins:
            write_csv(folder / "calibration.csv", ("bin", "uncertainty", "mae", "pixels"), bins)
            plot_calibration(bins, folder / "calibration.png", title)


class UncertaintyReport:
    """The uncertainty side of one dataset at one scale: writes each image's map to
    `folder/<stem>_uncertainty.{tif,png}`, scores it against the reported output's error and
    gathers the calibration curve."""

    def __init__(self, folder: Path, scale: float):
        self.folder, self.scale, self.calibration = folder, scale, Calibration()
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, sr, uncertainty, hr, names, key: int = 0) -> list[float | None]:
        """sr [B, 3, H, W] (scored as the saved uint8), uncertainty [B, 1, H, W], hr or None ->
        per image the rank correlation of uncertainty and |sr - hr| (mean over channels), both
        with the metrics' border crop of ceil(scale); `key` (the batch index) orders the
        calibration's pixels as one process adds them."""
        values = []
        for k, name in enumerate(names):
            unc = uncertainty[k, 0].float().cpu()
            write_uncertainty(self.folder / Path(name).with_suffix(".png").name, unc.numpy())
            if hr is None:
                values.append(None)
                continue
            err = (quantize(sr[k]).float() / 255 - hr[k].float().cpu()).abs().mean(dim=0)
            b = crop_border_for(self.scale)
            unc, err = (x[b:-b, b:-b] if b and min(x.shape) > 2 * b else x for x in (unc, err))
            values.append(spearman(unc.numpy(), err.numpy()))
            self.calibration.add(unc.numpy(), err.numpy(), key)
        return values

    def finish(self, title: str, world: World | None = None) -> None:
        """Writes the calibration curve; with several processes (`world`), every rank calls and
        rank 0 writes the curve of all ranks' pixels, as one process would."""
        parts = (world or World()).gather(self.calibration.parts)
        if parts is not None:  # rank 0, or one process
            self.calibration.parts = []
            self.calibration.merge([part for rank in parts for part in rank])
            self.calibration.write(self.folder.parent, title)


def plot_calibration(bins: list[dict], path: Path, title: str, size=(480, 400)) -> None:
    """Mean absolute error against mean uncertainty per bin, both axes from 0 to the largest
    value of either (the dashed diagonal is error = uncertainty); drawn with Pillow."""
    width, height = size
    left, right, top, bottom = 60, 20, 30, 50
    top_value = max(max(b["uncertainty"] for b in bins), max(b["mae"] for b in bins), 1e-6)
    scale_x, scale_y = (width - left - right) / top_value, (height - top - bottom) / top_value
    point = lambda u, e: (left + u * scale_x, height - bottom - e * scale_y)  # noqa: E731
    img = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for k in range(0, 101, 4):  # dashed diagonal
        if k % 8 == 0:
            draw.line([point(top_value * k / 100, top_value * k / 100),
                       point(top_value * (k + 4) / 100, top_value * (k + 4) / 100)],
                      fill=(150, 150, 150))  # fmt: skip
    for k in range(5):  # ticks and labels
        value = top_value * k / 4
        x, y = point(value, value)
        draw.line([(x, height - bottom), (x, height - bottom + 4)], fill="black")
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((x - 12, height - bottom + 6), f"{value:.3f}", fill="black", font=font)
        draw.text((4, y - 6), f"{value:.3f}", fill="black", font=font)
    points = [point(b["uncertainty"], b["mae"]) for b in bins]
    draw.line(points, fill=(33, 144, 141), width=2)
    for x, y in points:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(68, 1, 84))
    draw.text((left, 8), title, fill="black", font=font)
    draw.text((left + 40, height - 18), "uncertainty (std of samples, [0, 1])", fill="black")
    draw.text((4, top - 14), "mean |error|", fill="black", font=font)
    img.save(path)
