"""Layout half of the procedural aerial scenes (`data.synthetic`): road grid and blocks, the land
use of each block (houses on lots, flats, parking, parks, fields, forest, ponds), streets with
markings and traffic, country roads and rivers.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
from PIL import Image, ImageDraw

from data.synthetic.painter import (
    DRY,
    FLAT_ROOFS,
    GRASS,
    ROOFS,
    WALK,
    WHITE,
    ScenePainter,
    axis_box,
    axis_point,
    palette,
    rgb,
)


def longer_side(rect: tuple) -> tuple[int, tuple]:
    """`(axis, (a0, a1, c0, c1))`: the `axis_box` axis along the longer side of `rect` (ties: x)
    and the along (a) and cross (c) ranges of `rect`."""
    x0, y0, x1, y1 = rect
    axis = 1 if x1 - x0 >= y1 - y0 else 0
    return axis, ((x0, x1, y0, y1) if axis else (y0, y1, x0, x1))


class SceneLayout(ScenePainter):
    """A whole scene: `render()` plans the road grid, assigns land uses, paints and composes.

    Args:
        rng: the scene's generator; h, w: canvas size in pixels (see `ScenePainter`).
    """

    # ------------------------------------------------------------------ road grid and blocks
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

    # ------------------------------------------------------------------ land uses of the blocks
    def houses(self, rect: tuple) -> None:
        """Rows of lots along the longer block sides, each with a house, driveway, trees, pools."""
        axis, (a0, a1, c0, c1) = longer_side(rect)  # lots follow the longer side
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
        x0, y0, x1, y1 = rect
        for _ in range(int(self.rng.integers(0, 4))):
            self.add_tree(self.u(x0, x1), self.u(y0, y1))

    def lot(self, axis: int, along: tuple, across: tuple, front: float) -> None:
        a0, a1 = along
        self.rect(axis_box(axis, *across, a0, a1), GRASS * self.u(0.8, 1.25), self.u(0.9, 1.1))
        into = 1 if front == across[0] else -1
        setback, depth = self.m(self.u(3, 7)), self.m(self.u(8, 13))
        depth = min(depth, abs(across[1] - across[0]) - setback - self.m(2))
        width = (a1 - a0) * self.u(0.5, 0.72)
        if depth < self.m(5) or width < self.m(5):
            return self.add_tree(*axis_point(axis, front + into * self.m(4), (a0 + a1) / 2))
        pa = (
            a0 + self.u(self.m(1), a1 - a0 - width - self.m(1))
            if a1 - a0 - width > self.m(2)
            else a0
        )
        wall = front + into * setback
        house = axis_box(axis, wall, wall + into * depth, pa, pa + width)
        gaps = ((a0, pa), (pa + width, a1))
        da0, da1 = max(gaps, key=lambda g: g[1] - g[0])
        if da1 - da0 > self.m(3.5):  # driveway with a parked car
            mid = (da0 + da1) / 2
            self.rect(
                axis_box(
                    axis, front, wall + into * self.m(5), mid - self.m(1.6), mid + self.m(1.6)
                ),
                WALK,
                self.u(0.9, 1.1),
            )
            if self.rng.random() < 0.4:
                self.car(1 - axis, mid, front + into * self.m(1), into > 0)
        back = wall + into * (depth + self.m(2))
        if abs(across[1] - across[0]) - setback - depth > self.m(8) and self.rng.random() < 0.2:
            pool = axis_box(axis, back, back + into * self.m(4), pa, pa + min(width, self.m(8)))
            self.draw.rounded_rectangle(pool, 2, fill=rgb((0.3, 0.62, 0.75)), outline=rgb(WHITE))
        colour = ROOFS[self.rng.integers(len(ROOFS))] * self.u(0.85, 1.15)
        if self.rng.random() < 0.35:  # extension wing towards the back
            wing = axis_box(axis, wall, back + into * self.m(self.u(2, 5)), pa, pa + width * 0.4)
            self.add_building(wing, 5, partial(self.pitched, wing, colour * 0.95, False))
        self.add_building(
            house, self.u(5, 8), partial(self.pitched, house, colour, self.rng.random() < 0.5)
        )
        for _ in range(int(self.rng.integers(0, 3))):
            self.add_tree(*axis_point(axis, back + into * self.m(self.u(1, 6)), self.u(a0, a1)))

    def flats(self, rect: tuple) -> None:
        """Paved block with large flat-roofed buildings (or a car park) in a row."""
        self.rect(rect, WALK, self.u(0.75, 1.05))
        axis, (a0, a1, c0, c1) = longer_side(rect)
        cuts = np.linspace(a0, a1, max(1, int((a1 - a0) / self.m(self.u(30, 70)))) + 1)
        for pa0, pa1 in zip(cuts[:-1], cuts[1:]):
            if self.rng.random() < 0.12:
                self.parking(axis_box(axis, c0, c1, pa0 + self.m(1), pa1 - self.m(1)))
                continue
            i = [self.m(self.u(1.5, 8)) for _ in range(4)]
            box = axis_box(axis, c0 + i[0], c1 - i[1], pa0 + i[2], pa1 - i[3])
            if min(box[2] - box[0], box[3] - box[1]) < self.m(6):
                continue
            colour = FLAT_ROOFS[self.rng.integers(len(FLAT_ROOFS))] * self.u(0.9, 1.1)
            height = self.u(6, 10 + 35 * self.urban)
            self.add_building(box, height, partial(self.flat_roof, box, colour))

    def parking(self, rect: tuple) -> None:
        """Asphalt with rows of marked stalls, most of them taken."""
        self.rect(rect, self.asphalt, 1.1)
        axis, (a0, a1, c0, c1) = longer_side(rect)  # stall rows along the longer side
        stall, depth, busy = self.m(2.6), self.m(5), self.u(0.2, 0.75)
        c, row = c0 + self.m(1), 0
        while c + depth < c1:
            for a in np.arange(a0 + self.m(1), a1 - stall, stall):
                self.rect(axis_box(axis, c, c + depth, a, a + 1), WHITE, 0.7)
                if self.rng.random() < busy:
                    self.car(1 - axis, a + stall / 2, c + self.m(0.3), row % 2 == 0)
            c, row = c + depth + (self.m(6.5) if row % 2 == 0 else self.m(0.3)), row + 1

    def park(self, rect: tuple) -> None:
        """Mown lawn with footpaths and clumps of trees."""
        self.rect(rect, GRASS, self.u(1.0, 1.25))
        x0, y0, x1, y1 = rect
        for _ in range(int(self.rng.integers(0, 3))):
            pts = [(self.u(x0, x1), self.u(y0, y1)) for _ in range(3)]
            self.thick_line(self.draw, pts, self.m(1.2), rgb(DRY))
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
                track = axis_box(axis, pos - self.m(1.8), pos + self.m(1.8), p0, p1)
                self.rect(track, DRY if self.urban < 0.4 else self.asphalt, 1.1)
        for axis, pos, width, _, p0, p1, _, _ in kept:
            self.rect(
                axis_box(axis, pos - width / 2 - self.side, pos + width / 2 + self.side, p0, p1),
                WALK,
            )
        for axis, pos, width, _, p0, p1, _, _ in kept:
            self.rect(axis_box(axis, pos - width / 2, pos + width / 2, p0, p1), self.asphalt)
        for axis, pos, width, lanes, _, _, ends, _ in kept:
            self.markings(axis, pos, width, lanes, ends)
            if self.side and self.rng.random() < 0.5:  # street trees on the sidewalk
                for a in np.arange(ends[0], ends[1], self.m(self.u(8, 14))):
                    self.add_tree(
                        *axis_point(
                            axis, pos + (width / 2 + self.side) * self.rng.choice([-1, 1]), a
                        ),
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
                    self.rect(axis_box(axis, q, q + self.m(0.5), a, a + self.m(3)), WHITE, 0.9)
            e0, e1 = e0 + self.m(4), e1 - self.m(4)
        for s in (-1, 1):  # edge lines
            edge = pos + s * (width / 2 - self.m(0.4))
            self.rect(axis_box(axis, edge - lw / 2, edge + lw / 2, e0, e1), WHITE, 0.8)
        offsets = [0.0] if lanes == 2 else [-width / 4, width / 4]
        if lanes == 4:
            for s in (-1, 1):
                self.rect(
                    axis_box(
                        axis, pos + s * lw * 1.5 - lw / 2, pos + s * lw * 1.5 + lw / 2, e0, e1
                    ),
                    self.centre,
                )
        for off in offsets:
            for a in np.arange(e0 + self.u(0, dash), e1 - dash, dash * 3):
                self.rect(
                    axis_box(axis, pos + off - lw / 2, pos + off + lw / 2, a, a + dash),
                    self.centre if lanes == 2 else WHITE,
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
        self.thick_line(self.draw, pts, width + self.m(2), rgb(DRY, 1.2))
        self.thick_line(self.draw, pts, width, rgb(self.asphalt))
        for i in range(0, len(pts) - 1, 3):
            self.draw.line(pts[i : i + 2], fill=rgb(WHITE, 0.9), width=max(1, round(self.m(0.15))))

    def river(self) -> None:
        """Paint a meandering river with banks."""
        pts, width = self.wander(), self.m(self.u(10, 35))
        masks = [Image.new("L", (self.w, self.h)) for _ in range(2)]
        for mask, extra in zip(masks, (self.m(self.u(2, 5)), 0)):
            self.thick_line(ImageDraw.Draw(mask), pts, width + 2 * extra, 255)
        bank, wet = (np.asarray(m) > 127 for m in masks)
        arr = np.asarray(self.img, np.float32) / 255
        arr[bank & ~wet] = palette("7a7052")[0]
        _, xx, yy = self.region(arr, (0, 0, self.w, self.h))
        arr[wet] = self.water((self.h, self.w), xx, yy, np.zeros((self.h, self.w), np.float32))[wet]
        self.img.paste(Image.fromarray((arr * 255 + 0.5).astype(np.uint8)))
        self.mask.paste(0, mask=masks[1])  # no car shadows on the water
        self.keep_out.paste(255, mask=masks[0])

    # ------------------------------------------------------------------ whole scene
    def render(self) -> Image.Image:
        """Plan, paint ground, land uses, river and roads, then `finish` -> RGB image (h, w)."""
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
