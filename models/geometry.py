"""Geometry of one super-resolution call, computed once and passed down: LR, output and latent
sizes, the scale, the window of a block of a larger scene; and the smallest output a model runs at.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from models.tiling import OutputWindow


def min_output_side(model: nn.Module) -> int:
    """Smallest output side the model (`LDCSR` or `AutoencoderKL`) runs at: its own
    `min_output_side()`, a 2-px latent (a 1-px latent breaks GroupNorm in narrow configs)."""
    return model.min_output_side()


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

    Build it with `Geometry.of`. For a block of a larger scene, `lr` is the block's LR crop, `out`
    the crop's share of the scene's output (the size its latent stages run at), `window` an
    `OutputWindow` (the scene's sizes, the crop's offset, the block's output rows x cols) and the
    result (`target`) the window's pixels of the scene's output grid.
    """

    lr: tuple[int, int]
    out: tuple[int, int]
    window: OutputWindow | None = None

    @classmethod
    def of(cls, lr_size, out_size, window=None) -> Geometry:
        """The geometry of LR `lr_size` -> output `out_size`; with `window` (`OutputWindow`'s
        fields: a block of a larger scene, `out_size` being the scene's output size) that of
        the block."""
        lr, out = (int(lr_size[0]), int(lr_size[1])), (int(out_size[0]), int(out_size[1]))
        if window is None:
            return cls(lr, out)
        share = tuple(round(n * m / s) for n, m, s in zip(lr, out, window.lr_size))
        fields = (window.lr_size, out, window.offset, window.rows, window.cols)
        return cls(lr, share, OutputWindow(*(tuple(int(v) for v in f) for f in fields)))

    @property
    def scene(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(LR size, output size) of the whole scene."""
        if self.window is None:
            return self.lr, self.out
        return self.window.lr_size, self.window.out_size

    @property
    def scene_out(self) -> tuple[int, int]:
        return self.scene[1]

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
