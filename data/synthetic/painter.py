"""Drawing half of the procedural aerial scenes (`data.synthetic`): palettes, canvas primitives,
ground textures (grass, fields, water, forest floor), trees, cars, roofs, and the shadow/grain pass.

`SceneLayout` (`data/synthetic/layout.py`) decides where things go and calls these painters.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def palette(*colours: str) -> np.ndarray:
    return np.array([[int(c[i : i + 2], 16) / 255 for i in (0, 2, 4)] for c in colours], np.float32)


ROOFS = palette("6b6b70", "484a52", "944d38", "805c47", "5c4038", "8f8c85", "546173", "a37054")
FLAT_ROOFS = palette("bdbdb8", "999994", "7a7a7d", "ccc7b8", "707580", "a89e8c", "59595c")
CARS = palette("ebebeb", "121214", "9ea1a6", "616369", "9e1a1a", "1f3885", "c2b394")
CAR_P = (0.26, 0.22, 0.18, 0.13, 0.08, 0.08, 0.05)
CROPS = palette("4d6b29", "708038", "b8a361", "856645", "6b5238", "998f52", "3d5a2b", "9e855c")
TREES = palette("2b451a", "21381c", "404f1f", "304029", "4d4a21")
GRASS, DRY = palette("52662f", "8c805c")
GLASS, WHITE, YELLOW, WALK = palette("1f2126", "edede6", "e6bf40", "9e9c94")
SHADOW_TINT = np.array([0.40, 0.44, 0.54], np.float32)  # shade is lit by the blue sky only


def rgb(colour, k: float = 1.0) -> tuple[int, int, int]:
    """Pillow colour of `colour * k` ([0, 1] floats, clipped)."""
    r, g, b = (float(c) * k * 255 + 0.5 for c in colour)
    return min(max(int(r), 0), 255), min(max(int(g), 0), 255), min(max(int(b), 0), 255)


def axis_box(axis: int, c0: float, c1: float, a0: float, a1: float) -> tuple:
    """Rectangle (x0, y0, x1, y1) from a cross range c and an along range a; axis 0 runs along y."""
    c0, c1, a0, a1 = min(c0, c1), max(c0, c1), min(a0, a1), max(a0, a1)
    return (c0, a0, c1, a1) if axis == 0 else (a0, c0, a1, c1)


def axis_point(axis: int, c: float, a: float) -> tuple[float, float]:
    return (c, a) if axis == 0 else (a, c)


def corners(box: tuple) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


class ScenePainter:
    """Canvas of one scene, `h` x `w` pixels, axis-aligned (rotated by `generate_scene`).

    Holds the per-scene draws (ground sampling `ppm` px/m, urbanity in [0, 1], sun direction,
    asphalt and centre-line colours), the RGB image, the cast-shadow mask, the `keep_out` mask
    (river, country road) and the standing objects whose shadows and tops `finish` draws.
    Every random number comes from `rng`, in drawing order: a scene is deterministic per seed.

    Args:
        rng: the scene's generator (shared with the layout and the camera model).
        h, w: canvas size in pixels.
    """

    def __init__(self, rng: np.random.Generator, h: int, w: int) -> None:
        self.rng, self.h, self.w = rng, h, w
        self.ppm = 1.0 / rng.uniform(0.3, 0.5)  # pixels per metre (ground sampling 0.3-0.5 m)
        self.urban = float(rng.beta(1.1, 1.1))
        self.tilt = rng.normal(0, 0.35, 2) / max(h, w)  # urbanity gradient across the scene
        azimuth = rng.uniform(0, 2 * math.pi)
        self.sun = (math.cos(azimuth), math.sin(azimuth))  # towards the sun, image xy
        self.shade = -np.array(self.sun) * rng.uniform(0.5, 1.2) * self.ppm  # shadow px per m
        self.asphalt = palette("4a4a4d")[0] * rng.uniform(0.8, 1.2)
        self.centre = YELLOW if rng.random() < 0.5 else WHITE
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
        self.draw.rectangle(axis_box(0, box[0], box[2], box[1], box[3]), fill=rgb(colour, k))

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

    # ------------------------------------------------------------------ ground textures (NumPy)
    def ground(self) -> np.ndarray:
        """Grass/dry soil base, [h, w, 3] float32 in [0, 1]."""
        h, w = self.h, self.w
        dry = np.clip(self.noise(h, w, self.m(50)) * 1.6 - 0.5 + 0.4 * self.urban, 0, 1)
        grain = (
            1
            + 0.25 * (self.noise(h, w, self.m(6)) - 0.5)
            + 0.2 * (self.rng.random((h, w), np.float32) - 0.5)
        )
        return (GRASS + (DRY - GRASS) * dry[..., None]) * grain[..., None]

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
        colour = CROPS[self.rng.integers(len(CROPS))] * self.u(0.9, 1.1)
        view[:] = colour * shade[..., None]

    def water(self, shape: tuple, xx: np.ndarray, yy: np.ndarray, depth: np.ndarray) -> np.ndarray:
        """Smooth dark water with faint ripples, [h, w, 3]; `depth` in [0, 1] darkens it."""
        phase = (xx * 0.8 + yy * 0.6) / self.m(0.9) + 6 * self.noise(*shape, self.m(10))
        tone = 1 + 0.035 * np.sin(phase) - 0.25 * depth
        return palette("2e4a4f")[0] * tone[..., None]

    def pond(self, arr: np.ndarray, rect: tuple) -> None:
        view, xx, yy = self.region(arr, rect)
        if min(view.shape[:2]) < 8:
            return
        cx, cy, rx, ry = xx.mean(), yy.mean(), np.ptp(xx) * self.u(0.3, 0.45), np.ptp(yy) * 0.4
        f = np.hypot((xx - cx) / rx, (yy - cy) / ry)
        f = f + 0.6 * (self.noise(*view.shape[:2], min(view.shape[:2]) / 3) - 0.5)
        view[(f >= 1) & (f < 1.12)] = palette("7a7052")[0]  # muddy bank
        wet = f < 1
        view[wet] = self.water(view.shape[:2], xx, yy, np.clip((1 - f) * 2, 0, 1))[wet]
        for a in self.rng.uniform(0, 2 * math.pi, int(self.rng.integers(0, 8))):
            self.add_tree(cx + 1.3 * rx * math.cos(a), cy + 1.3 * ry * math.sin(a))

    def forest(self, arr: np.ndarray, rect: tuple) -> None:
        view = self.region(arr, rect)[0]
        view *= palette("6b8a5c")[0] * 0.8  # dark understorey between crowns
        x0, y0, x1, y1 = rect
        n = min(int((x1 - x0) * (y1 - y0) / (math.pi * self.m(3.5) ** 2) * 0.8), 600)
        for x, y in zip(self.rng.uniform(x0, x1, n), self.rng.uniform(y0, y1, n)):
            self.add_tree(x, y, self.m(self.u(2.5, 5)))

    # ------------------------------------------------------------------ objects
    def add_tree(self, x: float, y: float, r: float | None = None) -> None:
        r = self.m(self.u(1.8, 4.5)) if r is None else r
        colour = (TREES[self.rng.integers(len(TREES))] * self.u(0.85, 1.15)).tolist()
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
        self.draw.ellipse((x - r, y - r, x + r, y + r), fill=rgb(colour, 0.4))
        for dx, dy, rr in lumps:
            k = 0.8 + 0.7 * (dx * sx + dy * sy)
            cx, cy, rl = x + dx * r, y + dy * r, rr * r
            self.draw.ellipse((cx - rl, cy - rl, cx + rl, cy + rl), fill=rgb(colour, k))
            cx, cy, rl = cx + sx * rl * 0.4, cy + sy * rl * 0.4, rl * 0.5
            self.draw.ellipse((cx - rl, cy - rl, cx + rl, cy + rl), fill=rgb(colour, k * 1.35))

    def tree_line(self, axis: int, pos: float, span: tuple) -> None:
        step = self.m(self.u(3, 6))
        for a in np.arange(span[0], span[1], step):
            if self.rng.random() < 0.85:
                c = pos + self.rng.normal(0, step / 6)
                self.add_tree(*((c, a) if axis == 0 else (a, c)))

    def add_building(self, box: tuple, height: float, draw) -> None:
        shadow = partial(self.sweep, self.mask_draw, corners(box), self.shade * height, 255)
        self.objects.append(
            (0, corners(box) + [((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)], shadow, draw)
        )

    def car(self, axis: int, c: float, t: float, forward: bool) -> None:
        """A car of length along `axis` at cross position `c`, rear/front at `t`."""
        length, width = self.m(self.u(4.2, 5.0)), self.m(self.u(1.7, 1.9))
        colour = CARS[self.rng.choice(len(CARS), p=CAR_P)] * self.u(0.9, 1.05)
        body = axis_box(axis, c - width / 2, c + width / 2, t, t + length)
        self.sweep(self.mask_draw, corners(body), self.shade * 1.5, 255)
        self.rect(body, colour)
        at = (lambda s: t + length * s) if forward else (lambda s: t + length * (1 - s))
        for s0, s1 in ((0.56, 0.76), (0.1, 0.22)):  # windscreen, rear window
            self.rect(axis_box(axis, c - width * 0.4, c + width * 0.4, at(s0), at(s1)), GLASS)

    # ------------------------------------------------------------------ roofs
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
            self.draw.polygon([pt(*p) for p in poly], fill=rgb(colour, light[-1]))
        step = max(2.5, self.m(0.8))
        for v in np.arange(v0 + step, v1 - 1, step):  # tile courses parallel to the ridge
            d = min(v - v0, v1 - v) if hip else 0.0
            k = light[0] if v < vm else light[1]
            self.draw.line([pt(u0 + d, v), pt(u1 - d, v)], fill=rgb(colour, k * 0.9))
        ridge = [pt(u0 + i, vm), pt(u1 - i, vm)]
        self.draw.line(ridge, fill=rgb(colour, 1.3), width=max(1, round(self.m(0.3))))
        if hip:
            for (a, b), end in (((u0, v0), 0), ((u0, v1), 0), ((u1, v0), 1), ((u1, v1), 1)):
                self.draw.line([pt(a, b), ridge[end]], fill=rgb(colour, 1.2))
        self.draw.polygon(corners(box), outline=rgb(colour, 0.55))

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
            self.sweep(self.draw, corners(room), self.shade * 3, rgb(colour, 0.5))
            self.rect(room, colour, 1.08)
        n = int(self.rng.uniform(0.2, 1) * min((x1 - x0) * (y1 - y0) / self.m(9) ** 2, 40))
        units, tone = self.rng.uniform(0, 1, (n, 4)), self.u(0.8, 1.3)
        if self.rng.random() < 0.5:  # a row of identical units
            units[:, 0], units[:, 1:] = np.linspace(0.05, 0.95, n), units[:1, 1:]
        for ux, uy, uw, uh in units:
            ux, uy = x0 + ux * (x1 - x0 - self.m(3)), y0 + uy * (y1 - y0 - self.m(3))
            unit = (ux, uy, ux + self.m(1 + 2 * uw), uy + self.m(1 + 2 * uh))
            self.sweep(self.draw, corners(unit), self.shade * 1.5, rgb(colour, 0.5))
            self.rect(unit, WALK, tone)
            self.draw.rectangle(unit, outline=rgb(WALK, tone * 0.7))

    # ------------------------------------------------------------------ shadows and grain
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
        arr = np.asarray(self.img, np.float32) * (1 - shade[..., None] * (1 - SHADOW_TINT))
        self.img.paste(Image.fromarray((arr + 0.5).astype(np.uint8)))
        for obj in objects:
            obj[3]()
        grain = 0.12 * self.rng.random((h, w), np.float32) + 0.12 * self.noise(h, w, self.m(2.5))
        grain += 0.88  # fine grain and stains on everything
        arr = np.asarray(self.img, np.float32) * grain[..., None]
        self.img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
