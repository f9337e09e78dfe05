"""Geometry of one super-resolution call, computed once and passed down: LR, output and latent
sizes, the scale, the window of a block of a larger scene; and the smallest output a model runs at.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from models.tiling import OutputWindow


def min_output_side(model: nn.Module) -> int:
    """Smallest output side the model runs at: `2**levels` px of its condition encoder (stage 2)
    or encoder (stage 1), a 2-px latent; a 1-px latent breaks GroupNorm in narrow configs."""
    encoder = getattr(model, "cond_stage_model", None) or getattr(model, "encoder", None)
    levels = len(getattr(encoder, "down", ()))
    return 2**levels if levels else 1


def check_output_size(model: nn.Module, out_size) -> None:
    """Raises ValueError naming the size and the fix when an output side is below
    `min_output_side(model)` (test.py, super_resolve.py and the Python API share this rule)."""
    least = min_output_side(model)
    if min(int(out_size[0]), int(out_size[1])) < least:
        raise ValueError(
            f"output size {int(out_size[0])}x{int(out_size[1])} is too small for this model: "
            f"each side must be >= {least} px; use a larger scale (or --size), or a larger image"
        )


@dataclass(frozen=True)
class Geometry:
    """Sizes of one scene: LR (h, w), output (H, W), latent (H//8, W//8); scale = H / h.

    With `window` (a block of a larger scene whose output size is `out`; `OutputWindow`'s
    fields), `lr` is the block's LR crop, `out` becomes the crop's share of the scene's output
    (the size its latent stages run at), `window` an `OutputWindow` and the result
    (`target`) the window's pixels of the scene's output grid.
    """

    lr: tuple[int, int]
    out: tuple[int, int]
    window: OutputWindow | None = None

    def __post_init__(self):
        if self.window is not None:
            w, scene_out = self.window, self.out
            share = tuple(round(n * m / s) for n, m, s in zip(self.lr, scene_out, w.lr_size))
            window = OutputWindow(*(tuple(v) for v in (w.lr_size, scene_out, w.offset)),
                                  tuple(w.rows), tuple(w.cols))  # fmt: skip
            object.__setattr__(self, "out", share)
            object.__setattr__(self, "window", window)

    @property
    def latent(self) -> tuple[int, int]:
        return self.out[0] // 8, self.out[1] // 8

    @property
    def scene(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(LR size, output size) of the whole scene."""
        if self.window is None:
            return self.lr, self.out
        return self.window.lr_size, self.window.out_size

    @property
    def scene_lr(self) -> tuple[int, int]:
        return self.scene[0]

    @property
    def scale(self) -> float:
        return self.scene[1][0] / self.scene[0][0]

    @property
    def target(self) -> tuple[int, int]:
        """Size of the result: the output, or the block's window."""
        if self.window is None:
            return self.out
        return tuple(b - a for a, b in (self.window.rows, self.window.cols))

    def output_window(self, offset, rows, cols) -> OutputWindow:
        """The `OutputWindow` of a decoder tile: LR crop at `offset` of `lr`, output `rows` x
        `cols` of the result, in the scene's coordinates."""
        if self.window is None:
            return OutputWindow(self.lr, self.out, tuple(offset), rows, cols)
        (o0, o1), (r0, c0) = self.window.offset, (self.window.rows[0], self.window.cols[0])
        shift = lambda ax, d: (ax[0] + d, ax[1] + d)  # noqa: E731
        return OutputWindow(*self.scene, (o0 + offset[0], o1 + offset[1]), shift(rows, r0),
                            shift(cols, c0))  # fmt: skip
