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
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

if __package__ in (None, ""):  # run as `python data/scenes.py`: import from the repo root,
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # not from data/ (would shadow names)

from torch.utils.data import Dataset  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data.datasets import FixedScaleDataset, MultiScaleTrainDataset  # noqa: E402


def _palette(*colours: str) -> np.ndarray:
    return np.array([[int(c[i : i + 2], 16) / 255 for i in (0, 2, 4)] for c in colours], np.float32)


_ROOFS = _palette("6b6b70", "484a52", "944d38", "805c47", "5c4038", "8f8c85", "546173", "a37054")
_FLAT_ROOFS = _palette("bdbdb8", "999994", "7a7a7d", "ccc7b8", "707580", "a89e8c", "59595c")
_CARS = _palette("ebebeb", "121214", "9ea1a6", "616369", "9e1a1a", "1f3885", "c2b394")
_CAR_P = (0.26, 0.22, 0.18, 0.13, 0.08, 0.08, 0.05)
_CROPS = _palette("4d6b29", "708038", "b8a361", "856645", "6b5238", "998f52", "3d5a2b", "9e855c")
_TREES = _palette("2b451a", "21381c", "404f1f", "304029", "4d4a21")
_GRASS, _DRY = _palette("52662f", "8c805c")
_GLASS, _WHITE, _YELLOW, _WALK = _palette("1f2126", "edede6", "e6bf40", "9e9c94")
_SHADOW_TINT = np.array([0.40, 0.44, 0.54], np.float32)  # shade is lit by the blue sky only


def _rgb(colour, k: float = 1.0) -> tuple[int, int, int]:
    """Pillow colour of `colour * k` ([0, 1] floats, clipped)."""
    r, g, b = (float(c) * k * 255 + 0.5 for c in colour)
    return min(max(int(r), 0), 255), min(max(int(g), 0), 255), min(max(int(b), 0), 255)


def _box(axis: int, c0: float, c1: float, a0: float, a1: float) -> tuple:
    """Rectangle (x0, y0, x1, y1) from a cross range c and an along range a; axis 0 runs along y."""
    c0, c1, a0, a1 = min(c0, c1), max(c0, c1), min(a0, a1), max(a0, a1)
    return (c0, a0, c1, a1) if axis == 0 else (a0, c0, a1, c1)


def _pt(axis: int, c: float, a: float) -> tuple[float, float]:
    return (c, a) if axis == 0 else (a, c)


def _corners(box: tuple) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


class _Scene:
    """One scene painted on an axis-aligned canvas of `h` x `w` pixels (rotated afterwards)."""

    def __init__(self, rng: np.random.Generator, h: int, w: int) -> None:
        self.rng, self.h, self.w = rng, h, w
        self.ppm = 1.0 / rng.uniform(0.3, 0.5)  # pixels per metre (ground sampling 0.3-0.5 m)
        self.urban = float(rng.beta(1.1, 1.1))
        self.tilt = rng.normal(0, 0.35, 2) / max(h, w)  # urbanity gradient across the scene
        azimuth = rng.uniform(0, 2 * math.pi)
        self.sun = (math.cos(azimuth), math.sin(azimuth))  # towards the sun, image xy
        self.shade = -np.array(self.sun) * rng.uniform(0.5, 1.2) * self.ppm  # shadow px per m
        self.asphalt = _palette("4a4a4d")[0] * rng.uniform(0.8, 1.2)
        self.centre = _YELLOW if rng.random() < 0.5 else _WHITE
        self.side = self.m(2.0) if self.urban > 0.35 else 0.0  # sidewalk width
        self.objects: list[tuple] = []  # (priority, anchor points, shadow fn, draw fn)
        self.img = Image.new("RGB", (w, h))
        self.draw = ImageDraw.Draw(self.img)
        self.mask = Image.new("L", (w, h))  # cast shadows
        self.mask_draw = ImageDraw.Draw(self.mask)
        self.keep_out = Image.new("L", (w, h))  # river and country road: nothing stands there

    def m(self, metres: float) -> float:
        return metres * self.ppm

    def u(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))

    def noise(self, h: int, w: int, cell: float) -> np.ndarray:
        """Value noise [h, w] in about [0, 1] with features of `cell` pixels."""
        cell = max(cell, 1.0)
        gh, gw = int(h / cell) + 2, int(w / cell) + 2
        grid = Image.fromarray(self.rng.random((gh, gw), dtype=np.float32))
        size = (math.ceil(gw * cell), math.ceil(gh * cell))
        return np.asarray(grid.resize(size, Image.Resampling.BICUBIC))[:h, :w]

    def rect(self, box: tuple, colour, k: float = 1.0) -> None:
        self.draw.rectangle(_box(0, box[0], box[2], box[1], box[3]), fill=_rgb(colour, k))

    def sweep(self, draw: ImageDraw.ImageDraw, points: list, offset, fill) -> None:
        """Fill the region swept by polygon `points` moved by `offset` (a cast shadow)."""
        moved = [(x + offset[0], y + offset[1]) for x, y in points]
        draw.polygon(moved, fill=fill)
        for p, q, mq, mp in zip(points, points[1:] + points[:1], moved[1:] + moved[:1], moved):
            draw.polygon([p, q, mq, mp], fill=fill)

    def thick_line(self, draw: ImageDraw.ImageDraw, pts: list, width: float, fill) -> None:
        """A wide polyline; discs at the vertices fill the gaps Pillow leaves at its joints."""
        draw.line(pts, fill=fill, width=max(1, round(width)))
        r = width / 2
        for x, y in pts:
            if -r < x < self.w + r and -r < y < self.h + r:
                draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)

    # ------------------------------------------------------------------ layout
    def plan(self) -> tuple[list, list]:
        """Road segments `(axis, pos, width, lanes, p0, p1, ends, kept)` and block rectangles."""
        roads, spacing = ([], []), self.m(np.interp(self.urban, [0, 1], [240, 75]))
        for axis, length in ((0, self.w), (1, self.h)):
            pos = self.u(0.15, 0.9) * spacing
            while pos < length:
                if self.rng.random() < np.interp(self.urban, [0, 0.5, 1], [0.3, 0.9, 1.0]):
                    lanes = 4 if self.rng.random() < 0.35 * self.urban else 2
                    width = self.m(lanes * 3.3 + self.u(0, 1.5))
                    roads[axis].append((pos, width / 2 + self.side, width, lanes))
                pos += spacing * self.u(0.7, 1.3)
        bounds = [
            [(-2.0, 0.0)] + [r[:2] for r in rs] + [(ln + 2.0, 0.0)]
            for rs, ln in zip(roads, (self.w, self.h))
        ]
        segments = []
        for axis in (0, 1):
            for pos, _, width, lanes in roads[axis]:
                for (p0, r0), (p1, r1) in zip(bounds[1 - axis][:-1], bounds[1 - axis][1:]):
                    kept = lanes == 4 or self.rng.random() > 0.5 * (1 - self.urban) ** 2
                    ends = (p0 + r0 + self.m(1) * (r0 > 0), p1 - r1 - self.m(1) * (r1 > 0))
                    segments.append((axis, pos, width, lanes, p0, p1, ends, kept))
        blocks = []
        for (x0, rx0), (x1, rx1) in zip(bounds[0][:-1], bounds[0][1:]):
            for (y0, ry0), (y1, ry1) in zip(bounds[1][:-1], bounds[1][1:]):
                if x1 - rx1 - x0 - rx0 > 4 and y1 - ry1 - y0 - ry0 > 4:
                    blocks.append((x0 + rx0, y0 + ry0, x1 - rx1, y1 - ry1))
        return segments, blocks

    def assign(self, rect: tuple, out: list) -> None:
        """Append `(land use, rect)` for a block, splitting large blocks recursively."""
        x0, y0, x1, y1 = rect
        w, h = x1 - x0, y1 - y0
        if max(w, h) > self.m(120) and self.rng.random() < 0.9:
            cut, gap = self.u(0.35, 0.65) * max(w, h), self.m(self.u(1.5, 4))
            axis = 0 if w >= h else 1  # 0: cut at an x position
            lo = (x0, y0, x0 + cut - gap / 2, y1) if axis == 0 else (x0, y0, x1, y0 + cut - gap / 2)
            hi = (x0 + cut + gap / 2, y0, x1, y1) if axis == 0 else (x0, y0 + cut + gap / 2, x1, y1)
            if self.rng.random() < 0.5 * (1 - self.urban):  # hedgerow along the boundary
                pos = (x0 if axis == 0 else y0) + cut
                self.tree_line(axis, pos, (y0, y1) if axis == 0 else (x0, x1))
            self.assign(lo, out)
            self.assign(hi, out)
            return
        v = self.urban + float(self.tilt @ ((x0 + x1) / 2 - self.w / 2, (y0 + y1) / 2 - self.h / 2))
        v = min(max(v + self.rng.normal(0, 0.12), 0.0), 1.0)
        uses = ("flats", "parking", "houses", "fields", "forest", "park", "pond")
        q = 1 - v
        weights = np.array(
            [3 * v**3, 0.15 * v**2, 3 * v * q + 0.05, 3 * q**2, 0.5 * q + 0.05, 0.25, 0.1]
        )
        if min(w, h) < self.m(16):
            weights[[0, 1, 2, 6]] = 0
        out.append((uses[self.rng.choice(7, p=weights / weights.sum())], rect))

    # ------------------------------------------------------------------ ground (NumPy)
    def ground(self) -> np.ndarray:
        """Grass/dry soil base, [h, w, 3] float32 in [0, 1]."""
        h, w = self.h, self.w
        dry = np.clip(self.noise(h, w, self.m(50)) * 1.6 - 0.5 + 0.4 * self.urban, 0, 1)
        grain = (
            1
            + 0.25 * (self.noise(h, w, self.m(6)) - 0.5)
            + 0.2 * (self.rng.random((h, w), np.float32) - 0.5)
        )
        return (_GRASS + (_DRY - _GRASS) * dry[..., None]) * grain[..., None]

    def region(self, arr: np.ndarray, rect: tuple) -> tuple:
        """Integer view of `rect` on `arr` and its pixel grids (xx [1, w], yy [h, 1])."""
        x0, y0 = max(int(rect[0]), 0), max(int(rect[1]), 0)
        x1, y1 = min(int(rect[2]), self.w), min(int(rect[3]), self.h)
        yy, xx = np.ogrid[y0 : max(y1, y0), x0 : max(x1, x0)]
        return arr[y0:y1, x0:x1], xx.astype(np.float32), yy.astype(np.float32)

    def fields(self, arr: np.ndarray, rect: tuple) -> None:
        """Crop rows of a random period and orientation, with tramlines and moisture patches."""
        inset = self.m(self.u(0.5, 2))
        view, xx, yy = self.region(
            arr, (rect[0] + inset, rect[1] + inset, rect[2] - inset, rect[3] - inset)
        )
        if view.size == 0:
            return
        angle = self.rng.choice([0, math.pi / 2]) if self.rng.random() < 0.7 else self.u(0, 3.2)
        t = (xx * math.cos(angle) + yy * math.sin(angle)) / max(self.m(self.u(1.2, 3.5)), 2.2)
        shade = 1 + self.u(0.06, 0.22) * np.sin(2 * math.pi * t)
        shade = shade + 0.3 * (self.noise(*view.shape[:2], self.m(25)) - 0.5)
        shade = shade + 0.2 * (self.noise(*view.shape[:2], 1.2) - 0.5)  # plants, clods
        if self.rng.random() < 0.6:
            lines = int(self.rng.integers(16, 32))
            shade = shade * np.where(np.abs(t % lines - lines / 2) < 0.6, 0.8, 1.0)
        colour = _CROPS[self.rng.integers(len(_CROPS))] * self.u(0.9, 1.1)
        view[:] = colour * shade[..., None]

    def water(self, shape: tuple, xx: np.ndarray, yy: np.ndarray, depth: np.ndarray) -> np.ndarray:
        """Smooth dark water with faint ripples, [h, w, 3]; `depth` in [0, 1] darkens it."""
        phase = (xx * 0.8 + yy * 0.6) / self.m(0.9) + 6 * self.noise(*shape, self.m(10))
        tone = 1 + 0.035 * np.sin(phase) - 0.25 * depth
        return _palette("2e4a4f")[0] * tone[..., None]

    def pond(self, arr: np.ndarray, rect: tuple) -> None:
        view, xx, yy = self.region(arr, rect)
        if min(view.shape[:2]) < 8:
            return
        cx, cy, rx, ry = xx.mean(), yy.mean(), np.ptp(xx) * self.u(0.3, 0.45), np.ptp(yy) * 0.4
        f = np.hypot((xx - cx) / rx, (yy - cy) / ry)
        f = f + 0.6 * (self.noise(*view.shape[:2], min(view.shape[:2]) / 3) - 0.5)
        view[(f >= 1) & (f < 1.12)] = _palette("7a7052")[0]  # muddy bank
        wet = f < 1
        view[wet] = self.water(view.shape[:2], xx, yy, np.clip((1 - f) * 2, 0, 1))[wet]
        for a in self.rng.uniform(0, 2 * math.pi, int(self.rng.integers(0, 8))):
            self.add_tree(cx + 1.3 * rx * math.cos(a), cy + 1.3 * ry * math.sin(a))

    def forest(self, arr: np.ndarray, rect: tuple) -> None:
        view = self.region(arr, rect)[0]
        view *= _palette("6b8a5c")[0] * 0.8  # dark understorey between crowns
        x0, y0, x1, y1 = rect
        n = min(int((x1 - x0) * (y1 - y0) / (math.pi * self.m(3.5) ** 2) * 0.8), 600)
        for x, y in zip(self.rng.uniform(x0, x1, n), self.rng.uniform(y0, y1, n)):
            self.add_tree(x, y, self.m(self.u(2.5, 5)))

    # ------------------------------------------------------------------ objects
    def add_tree(self, x: float, y: float, r: float | None = None) -> None:
        r = self.m(self.u(1.8, 4.5)) if r is None else r
        colour = (_TREES[self.rng.integers(len(_TREES))] * self.u(0.85, 1.15)).tolist()
        n = 3 + 3 * int(r > 6)
        lumps = np.clip(self.rng.normal(0, 0.35, (n, 3)), -0.6, 0.6)
        lumps[:, 2] = self.rng.uniform(0.3, 0.55, n)  # (dx, dy, radius) in crown radii
        height = r / self.ppm * self.u(1.6, 2.6)
        circle = [(x + r * math.cos(a), y + r * math.sin(a)) for a in np.linspace(0, 6.28, 9)[:-1]]
        shadow = partial(self.sweep, self.mask_draw, circle, self.shade * height, 255)
        self.objects.append(
            (1, [(x, y)], shadow, partial(self.tree, x, y, r, colour, lumps.tolist()))
        )

    def tree(self, x: float, y: float, r: float, colour, lumps: list) -> None:
        """A crown of overlapping lumps, lit from the sun side."""
        sx, sy = self.sun
        self.draw.ellipse((x - r, y - r, x + r, y + r), fill=_rgb(colour, 0.4))
        for dx, dy, rr in lumps:
            k = 0.8 + 0.7 * (dx * sx + dy * sy)
            cx, cy, rl = x + dx * r, y + dy * r, rr * r
            self.draw.ellipse((cx - rl, cy - rl, cx + rl, cy + rl), fill=_rgb(colour, k))
            cx, cy, rl = cx + sx * rl * 0.4, cy + sy * rl * 0.4, rl * 0.5
            self.draw.ellipse((cx - rl, cy - rl, cx + rl, cy + rl), fill=_rgb(colour, k * 1.35))

    def tree_line(self, axis: int, pos: float, span: tuple) -> None:
        step = self.m(self.u(3, 6))
        for a in np.arange(span[0], span[1], step):
            if self.rng.random() < 0.85:
                c = pos + self.rng.normal(0, step / 6)
                self.add_tree(*((c, a) if axis == 0 else (a, c)))

    def add_building(self, box: tuple, height: float, draw) -> None:
        shadow = partial(self.sweep, self.mask_draw, _corners(box), self.shade * height, 255)
        self.objects.append(
            (0, _corners(box) + [((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)], shadow, draw)
        )

    def car(self, axis: int, c: float, t: float, forward: bool) -> None:
        """A car of length along `axis` at cross position `c`, rear/front at `t`."""
        length, width = self.m(self.u(4.2, 5.0)), self.m(self.u(1.7, 1.9))
        colour = _CARS[self.rng.choice(len(_CARS), p=_CAR_P)] * self.u(0.9, 1.05)
        body = _box(axis, c - width / 2, c + width / 2, t, t + length)
        self.sweep(self.mask_draw, _corners(body), self.shade * 1.5, 255)
        self.rect(body, colour)
        at = (lambda s: t + length * s) if forward else (lambda s: t + length * (1 - s))
        for s0, s1 in ((0.56, 0.76), (0.1, 0.22)):  # windscreen, rear window
            self.rect(_box(axis, c - width * 0.4, c + width * 0.4, at(s0), at(s1)), _GLASS)

    # ------------------------------------------------------------------ buildings
    def pitched(self, box: tuple, colour, hip: bool) -> None:
        """Gable or hip roof, ridge along the longer side, faces shaded by the sun direction."""
        x0, y0, x1, y1 = box
        along_x = x1 - x0 >= y1 - y0
        u0, u1, v0, v1 = (x0, x1, y0, y1) if along_x else (y0, y1, x0, x1)
        pt = (lambda u, v: (u, v)) if along_x else (lambda u, v: (v, u))
        vm, i = (v0 + v1) / 2, (v1 - v0) / 2 if hip else 0.0
        faces = [
            ([(u0, v0), (u1, v0), (u1 - i, vm), (u0 + i, vm)], (0, -1)),
            ([(u0, v1), (u1, v1), (u1 - i, vm), (u0 + i, vm)], (0, 1)),
            ([(u0, v0), (u0 + i, vm), (u0, v1)], (-1, 0)),
            ([(u1, v0), (u1 - i, vm), (u1, v1)], (1, 0)),
        ]
        light = []
        for poly, (nu, nv) in faces[: 4 if hip else 2]:
            nx, ny = (nu, nv) if along_x else (nv, nu)
            light.append(1.0 + 0.4 * (nx * self.sun[0] + ny * self.sun[1]))
            self.draw.polygon([pt(*p) for p in poly], fill=_rgb(colour, light[-1]))
        step = max(2.5, self.m(0.8))
        for v in np.arange(v0 + step, v1 - 1, step):  # tile courses parallel to the ridge
            d = min(v - v0, v1 - v) if hip else 0.0
            k = light[0] if v < vm else light[1]
            self.draw.line([pt(u0 + d, v), pt(u1 - d, v)], fill=_rgb(colour, k * 0.9))
        ridge = [pt(u0 + i, vm), pt(u1 - i, vm)]
        self.draw.line(ridge, fill=_rgb(colour, 1.3), width=max(1, round(self.m(0.3))))
        if hip:
            for (a, b), end in (((u0, v0), 0), ((u0, v1), 0), ((u1, v0), 1), ((u1, v1), 1)):
                self.draw.line([pt(a, b), ridge[end]], fill=_rgb(colour, 1.2))
        self.draw.polygon(_corners(box), outline=_rgb(colour, 0.55))

    def flat_roof(self, box: tuple, colour) -> None:
        """Flat roof: parapet, optional ribs or skylights, a plant room, rooftop units."""
        self.rect(box, colour, 0.7)
        p = max(1.0, self.m(0.6))
        x0, y0, x1, y1 = box[0] + p, box[1] + p, box[2] - p, box[3] - p
        self.rect((x0, y0, x1, y1), colour)
        style, step = self.rng.random(), self.m(self.u(1.2, 3))
        for a in np.arange(x0 + step, x1 - 1, step) if style < 0.5 else ():
            if style < 0.3:  # corrugated sheet
                self.rect((a, y0, a + 1, y1), colour, 0.9)
            else:  # skylight rows
                self.rect((a, y0 + step, a + step / 2, y1 - step), (0.35, 0.42, 0.5))
        if self.rng.random() < 0.4 and min(x1 - x0, y1 - y0) > self.m(12):  # plant room
            fx, fy = self.u(0.2, 0.35) * (x1 - x0), self.u(0.2, 0.35) * (y1 - y0)
            cx, cy = self.u(x0, x1 - fx), self.u(y0, y1 - fy)
            room = (cx, cy, cx + fx, cy + fy)
            self.sweep(self.draw, _corners(room), self.shade * 3, _rgb(colour, 0.5))
            self.rect(room, colour, 1.08)
        n = int(self.rng.uniform(0.2, 1) * min((x1 - x0) * (y1 - y0) / self.m(9) ** 2, 40))
        units, tone = self.rng.uniform(0, 1, (n, 4)), self.u(0.8, 1.3)
        if self.rng.random() < 0.5:  # a row of identical units
            units[:, 0], units[:, 1:] = np.linspace(0.05, 0.95, n), units[:1, 1:]
        for ux, uy, uw, uh in units:
            ux, uy = x0 + ux * (x1 - x0 - self.m(3)), y0 + uy * (y1 - y0 - self.m(3))
            unit = (ux, uy, ux + self.m(1 + 2 * uw), uy + self.m(1 + 2 * uh))
            self.sweep(self.draw, _corners(unit), self.shade * 1.5, _rgb(colour, 0.5))
            self.rect(unit, _WALK, tone)
            self.draw.rectangle(unit, outline=_rgb(_WALK, tone * 0.7))

    def houses(self, rect: tuple) -> None:
        """Rows of lots along the longer block sides, each with a house, driveway, trees, pools."""
        x0, y0, x1, y1 = rect
        axis = 1 if x1 - x0 >= y1 - y0 else 0  # lots follow the longer side
        a0, a1, c0, c1 = (x0, x1, y0, y1) if axis else (y0, y1, x0, x1)
        depth = min((c1 - c0) / 2, self.m(self.u(26, 40)))
        rows = (
            [(c0, c0 + depth, c0), (c1 - depth, c1, c1)] if c1 - c0 > self.m(32) else [(c0, c1, c0)]
        )
        for lo, hi, front in rows:
            a = a0
            while a1 - a > self.m(9):
                width = min(self.m(self.u(14, 24)), a1 - a)
                self.lot(axis, (a, a + width), (lo, hi), front)
                a += width
        for _ in range(int(self.rng.integers(0, 4))):
            self.add_tree(self.u(x0, x1), self.u(y0, y1))

    def lot(self, axis: int, along: tuple, across: tuple, front: float) -> None:
        a0, a1 = along
        self.rect(_box(axis, *across, a0, a1), _GRASS * self.u(0.8, 1.25), self.u(0.9, 1.1))
        into = 1 if front == across[0] else -1
        setback, depth = self.m(self.u(3, 7)), self.m(self.u(8, 13))
        depth = min(depth, abs(across[1] - across[0]) - setback - self.m(2))
        width = (a1 - a0) * self.u(0.5, 0.72)
        if depth < self.m(5) or width < self.m(5):
            return self.add_tree(*_pt(axis, front + into * self.m(4), (a0 + a1) / 2))
        pa = (
            a0 + self.u(self.m(1), a1 - a0 - width - self.m(1))
            if a1 - a0 - width > self.m(2)
            else a0
        )
        wall = front + into * setback
        house = _box(axis, wall, wall + into * depth, pa, pa + width)
        gaps = ((a0, pa), (pa + width, a1))
        da0, da1 = max(gaps, key=lambda g: g[1] - g[0])
        if da1 - da0 > self.m(3.5):  # driveway with a parked car
            mid = (da0 + da1) / 2
            self.rect(
                _box(axis, front, wall + into * self.m(5), mid - self.m(1.6), mid + self.m(1.6)),
                _WALK,
                self.u(0.9, 1.1),
            )
            if self.rng.random() < 0.4:
                self.car(1 - axis, mid, front + into * self.m(1), into > 0)
        back = wall + into * (depth + self.m(2))
        if abs(across[1] - across[0]) - setback - depth > self.m(8) and self.rng.random() < 0.2:
            pool = _box(axis, back, back + into * self.m(4), pa, pa + min(width, self.m(8)))
            self.draw.rounded_rectangle(pool, 2, fill=_rgb((0.3, 0.62, 0.75)), outline=_rgb(_WHITE))
        colour = _ROOFS[self.rng.integers(len(_ROOFS))] * self.u(0.85, 1.15)
        if self.rng.random() < 0.35:  # extension wing towards the back
            wing = _box(axis, wall, back + into * self.m(self.u(2, 5)), pa, pa + width * 0.4)
            self.add_building(wing, 5, partial(self.pitched, wing, colour * 0.95, False))
        self.add_building(
            house, self.u(5, 8), partial(self.pitched, house, colour, self.rng.random() < 0.5)
        )
        for _ in range(int(self.rng.integers(0, 3))):
            self.add_tree(*_pt(axis, back + into * self.m(self.u(1, 6)), self.u(a0, a1)))

    def flats(self, rect: tuple) -> None:
        """Paved block with large flat-roofed buildings (or a car park) in a row."""
        self.rect(rect, _WALK, self.u(0.75, 1.05))
        x0, y0, x1, y1 = rect
        axis = 1 if x1 - x0 >= y1 - y0 else 0
        a0, a1, c0, c1 = (x0, x1, y0, y1) if axis else (y0, y1, x0, x1)
        cuts = np.linspace(a0, a1, max(1, int((a1 - a0) / self.m(self.u(30, 70)))) + 1)
        for pa0, pa1 in zip(cuts[:-1], cuts[1:]):
            if self.rng.random() < 0.12:
                self.parking(_box(axis, c0, c1, pa0 + self.m(1), pa1 - self.m(1)))
                continue
            i = [self.m(self.u(1.5, 8)) for _ in range(4)]
            box = _box(axis, c0 + i[0], c1 - i[1], pa0 + i[2], pa1 - i[3])
            if min(box[2] - box[0], box[3] - box[1]) < self.m(6):
                continue
            colour = _FLAT_ROOFS[self.rng.integers(len(_FLAT_ROOFS))] * self.u(0.9, 1.1)
            height = self.u(6, 10 + 35 * self.urban)
            self.add_building(box, height, partial(self.flat_roof, box, colour))

    def parking(self, rect: tuple) -> None:
        """Asphalt with rows of marked stalls, most of them taken."""
        self.rect(rect, self.asphalt, 1.1)
        x0, y0, x1, y1 = rect
        axis = 1 if x1 - x0 >= y1 - y0 else 0  # stall rows along the longer side
        a0, a1, c0, c1 = (x0, x1, y0, y1) if axis else (y0, y1, x0, x1)
        stall, depth, busy = self.m(2.6), self.m(5), self.u(0.2, 0.75)
        c, row = c0 + self.m(1), 0
        while c + depth < c1:
            for a in np.arange(a0 + self.m(1), a1 - stall, stall):
                self.rect(_box(axis, c, c + depth, a, a + 1), _WHITE, 0.7)
                if self.rng.random() < busy:
                    self.car(1 - axis, a + stall / 2, c + self.m(0.3), row % 2 == 0)
            c, row = c + depth + (self.m(6.5) if row % 2 == 0 else self.m(0.3)), row + 1

    def park(self, rect: tuple) -> None:
        """Mown lawn with footpaths and clumps of trees."""
        self.rect(rect, _GRASS, self.u(1.0, 1.25))
        x0, y0, x1, y1 = rect
        for _ in range(int(self.rng.integers(0, 3))):
            pts = [(self.u(x0, x1), self.u(y0, y1)) for _ in range(3)]
            self.thick_line(self.draw, pts, self.m(1.2), _rgb(_DRY))
        for _ in range(int(self.rng.integers(1, 5))):
            cx, cy, spread = self.u(x0, x1), self.u(y0, y1), self.m(self.u(3, 12))
            for _ in range(int(self.rng.integers(1, 9))):
                self.add_tree(cx + self.rng.normal(0, spread), cy + self.rng.normal(0, spread))

    # ------------------------------------------------------------------ roads
    def roads(self, segments: list) -> None:
        """Asphalt, sidewalks, markings, crossings and traffic on the kept road segments."""
        kept = [s for s in segments if s[-1]]
        for axis, pos, _, _, p0, p1, _, _ in (s for s in segments if not s[-1]):
            if self.rng.random() < 0.6:  # farm track or service lane instead of a street
                track = _box(axis, pos - self.m(1.8), pos + self.m(1.8), p0, p1)
                self.rect(track, _DRY if self.urban < 0.4 else self.asphalt, 1.1)
        for axis, pos, width, _, p0, p1, _, _ in kept:
            self.rect(
                _box(axis, pos - width / 2 - self.side, pos + width / 2 + self.side, p0, p1), _WALK
            )
        for axis, pos, width, _, p0, p1, _, _ in kept:
            self.rect(_box(axis, pos - width / 2, pos + width / 2, p0, p1), self.asphalt)
        for axis, pos, width, lanes, _, _, ends, _ in kept:
            self.markings(axis, pos, width, lanes, ends)
            if self.side and self.rng.random() < 0.5:  # street trees on the sidewalk
                for a in np.arange(ends[0], ends[1], self.m(self.u(8, 14))):
                    self.add_tree(
                        *_pt(axis, pos + (width / 2 + self.side) * self.rng.choice([-1, 1]), a),
                        self.m(self.u(2, 3.5)),
                    )

    def markings(self, axis: int, pos: float, width: float, lanes: int, ends: tuple) -> None:
        e0, e1 = ends
        if e1 - e0 < self.m(8):
            return
        lw, dash = max(1.0, self.m(0.15)), self.m(3)
        if self.urban > 0.4 and self.rng.random() < 0.7:  # zebra crossings at both ends
            for q in np.arange(
                pos - width / 2 + self.m(0.5), pos + width / 2 - self.m(0.5), self.m(1)
            ):
                for a in (e0, e1 - self.m(3)):
                    self.rect(_box(axis, q, q + self.m(0.5), a, a + self.m(3)), _WHITE, 0.9)
            e0, e1 = e0 + self.m(4), e1 - self.m(4)
        for s in (-1, 1):  # edge lines
            edge = pos + s * (width / 2 - self.m(0.4))
            self.rect(_box(axis, edge - lw / 2, edge + lw / 2, e0, e1), _WHITE, 0.8)
        offsets = [0.0] if lanes == 2 else [-width / 4, width / 4]
        if lanes == 4:
            for s in (-1, 1):
                self.rect(
                    _box(axis, pos + s * lw * 1.5 - lw / 2, pos + s * lw * 1.5 + lw / 2, e0, e1),
                    self.centre,
                )
        for off in offsets:
            for a in np.arange(e0 + self.u(0, dash), e1 - dash, dash * 3):
                self.rect(
                    _box(axis, pos + off - lw / 2, pos + off + lw / 2, a, a + dash),
                    self.centre if lanes == 2 else _WHITE,
                )
        gap = self.m(np.interp(self.urban, [0, 1], [150, 15]))
        for lane in range(lanes):  # right-hand traffic: lanes left of the centre go backwards
            c = pos - width / 2 + (lane + 0.5) * width / lanes
            a = e0 + self.rng.exponential(gap)
            while a < e1 - self.m(5):
                self.car(axis, c, a, lane >= lanes // 2)
                a += self.m(7) + self.rng.exponential(gap)

    def wander(self) -> list:
        """Points of a smooth random curve crossing the canvas."""
        n = int(3 * (self.h + self.w) / self.m(4))
        knots = self.rng.uniform(-0.7, 0.7, n // 25 + 2)  # heading wanders, never loops
        turn = np.interp(np.arange(n) / 25, np.arange(len(knots)), knots)
        heading = turn + self.u(-0.6, 0.6) + (0 if self.rng.random() < 0.5 else math.pi / 2)
        x = np.cumsum(np.cos(heading)) * self.m(4)
        y = np.cumsum(np.sin(heading)) * self.m(4)
        x, y = x - x[n // 3] + self.u(0.2, 0.8) * self.w, y - y[n // 3] + self.u(0.2, 0.8) * self.h
        return list(zip(x.tolist(), y.tolist()))

    def country_road(self) -> None:
        pts, width = self.wander(), self.m(self.u(5, 7))
        self.thick_line(ImageDraw.Draw(self.keep_out), pts, width + self.m(2), 255)
        self.thick_line(self.draw, pts, width + self.m(2), _rgb(_DRY, 1.2))
        self.thick_line(self.draw, pts, width, _rgb(self.asphalt))
        for i in range(0, len(pts) - 1, 3):
            self.draw.line(
                pts[i : i + 2], fill=_rgb(_WHITE, 0.9), width=max(1, round(self.m(0.15)))
            )

    def river(self) -> None:
        """Paint a meandering river with banks."""
        pts, width = self.wander(), self.m(self.u(10, 35))
        masks = [Image.new("L", (self.w, self.h)) for _ in range(2)]
        for mask, extra in zip(masks, (self.m(self.u(2, 5)), 0)):
            self.thick_line(ImageDraw.Draw(mask), pts, width + 2 * extra, 255)
        bank, wet = (np.asarray(m) > 127 for m in masks)
        arr = np.asarray(self.img, np.float32) / 255
        arr[bank & ~wet] = _palette("7a7052")[0]
        _, xx, yy = self.region(arr, (0, 0, self.w, self.h))
        arr[wet] = self.water((self.h, self.w), xx, yy, np.zeros((self.h, self.w), np.float32))[wet]
        self.img.paste(Image.fromarray((arr * 255 + 0.5).astype(np.uint8)))
        self.mask.paste(0, mask=masks[1])  # no car shadows on the water
        self.keep_out.paste(255, mask=masks[0])

    # ------------------------------------------------------------------ composition
    def finish(self) -> None:
        """Cast the shadows of the buildings and trees outside `keep_out`, then draw them."""
        h, w = self.h, self.w
        blocked = np.asarray(self.keep_out) > 0

        def free(x: float, y: float) -> bool:
            return not blocked[min(max(int(y), 0), h - 1), min(max(int(x), 0), w - 1)]

        objects = sorted(
            (o for o in self.objects if all(free(*p) for p in o[1])), key=lambda o: o[0]
        )
        for obj in objects:
            obj[2]()
        shade = np.asarray(self.mask.filter(ImageFilter.GaussianBlur(0.7)), np.float32) / 255
        arr = np.asarray(self.img, np.float32) * (1 - shade[..., None] * (1 - _SHADOW_TINT))
        self.img.paste(Image.fromarray((arr + 0.5).astype(np.uint8)))
        for obj in objects:
            obj[3]()
        grain = 0.12 * self.rng.random((h, w), np.float32) + 0.12 * self.noise(h, w, self.m(2.5))
        grain += 0.88  # fine grain and stains on everything
        arr = np.asarray(self.img, np.float32) * grain[..., None]
        self.img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))

    def render(self) -> Image.Image:
        segments, blocks = self.plan()
        uses = []
        for rect in blocks:
            self.assign(rect, uses)
        arr = self.ground()
        for use, rect in uses:
            if use in ("fields", "pond", "forest"):
                getattr(self, use)(arr, rect)
        self.img.paste(Image.fromarray((np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)))
        for use, rect in uses:
            if use in ("flats", "parking", "houses", "park"):
                getattr(self, use)(rect)
        if self.rng.random() < 0.4 * (1 - self.urban) ** 2:
            self.river()
        self.roads(segments)
        if sum(s[-1] for s in segments) < 3 and self.urban < 0.5:
            self.country_road()
        self.finish()
        return self.img


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
    img = _Scene(rng, ch, cw).render()
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
