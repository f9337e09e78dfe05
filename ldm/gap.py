"""GAP encoder and decoder of the stage-1 autoencoder (docs/method.md, "Stage 1").

The encoder sees cat[bicubic_up(LR), HR] and compresses it 8x into the latent; the decoder rebuilds
HR at any size from LR plus the latent, with scale-conditioned fusion and a scale-aware upsampler.
The same encoder class (in_channels 3, double_z False) is stage 2's condition encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ldm.baseline_upsamplers import (
    FixedScaleUpsampler,
    LocalImplicitUpsampler,
    NearestMLPUpsampler,
    PixelShuffleUpsampler,
)
from ldm.blocks import (
    FRU,
    Downsample,
    ResnetBlock,
    ScaleModulation,
    inference_layout,
    lean,
    normalize,
    swish,
)
from ldm.chain import Stage, run_chain
from ldm.upsampler import ScaleAwareUpsampler, resize_to

UPSAMPLERS = {
    "scale_aware": lambda ch, out: ScaleAwareUpsampler(ch, out, num_levels=4),
    "mlp_interpolate": NearestMLPUpsampler,
    "fixed_x4": FixedScaleUpsampler,
    "liif": LocalImplicitUpsampler,
    "pixel_shuffle": PixelShuffleUpsampler,
}


def build_upsampler(name: str, channels: int, out_channels: int) -> nn.Module:
    """The decoder's upsampler by name (the paper's is "scale_aware")."""
    _check_choice("upsampler", name, tuple(UPSAMPLERS))
    return UPSAMPLERS[name](channels, out_channels)


def transfer(conv: nn.Conv2d, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder level's output h_k = conv(h), pushed under h: (h_k, h)."""
    return conv(h), h


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"GAPDecoder: {name} must be one of {choices}, got {value!r}")


class GAPEncoder(nn.Module):
    """latent-diffusion's Encoder without attention: [B, in, H, W] -> [B, (2)z, ~H/f, ~W/f],
    f = 2**(len(ch_mult) - 1) (`downsampling()`; 8 in the paper).

    Args:
        in_channels: 6 for stage 1 (LR-up and HR), 3 for the stage-2 condition encoder.
        ch: base width; level i has ch * ch_mult[i] channels.
        ch_mult: width multipliers; every level but the last halves the resolution.
        num_res_blocks: ResnetBlocks per level.
        z_channels: latent channels.
        double_z: output 2·z_channels (mean and log-variance) when True.
        attn_resolutions: must be empty (the paper's encoder has no attention); kept so the
            authors' YAML files load.
        dropout: ResnetBlock dropout.
    """

    def __init__(
        self,
        in_channels: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        double_z: bool = True,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
    ):
        super().__init__()
        if attn_resolutions:
            raise ValueError("GAPEncoder has no attention blocks: set attn_resolutions to []")
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            block_in = ch * in_mult[i]
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * mult, dropout))
                block_in = ch * mult
            level.block = nn.ModuleList(blocks)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(
            block_in, 2 * z_channels if double_z else z_channels, 3, padding=1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in, H, W] -> [B, (2)z, ~H/f, ~W/f]."""
        # Kept in NCHW: channels-last convolutions round differently, and the sampling chain
        # amplifies the condition's rounding ~25x (conformance tolerance 1e-4).
        return run_chain(self.stages(), x)[0]

    def stages(self) -> list[Stage]:
        """The encoder as a chain of stages (`ldm.chain`): 3x3 convolutions read one row
        around (a ResnetBlock is two stages), a `Downsample` rows 2i .. 2i + 2; tiled
        inference streams the scene through the chain by bands of rows."""
        chain = [Stage(self.conv_in, 1)]
        for level in self.down:
            chain += [stage for block in level.block for stage in block.stages()]
            if hasattr(level, "downsample"):
                chain.append(Stage(level.downsample, 1, stride=2))
        return chain + [*self.mid.block_1.stages(), *self.mid.block_2.stages(), Stage(self.out, 1)]

    def out(self, h: torch.Tensor) -> torch.Tensor:
        """norm_out -> swish -> conv_out."""
        return self.conv_out(swish(self.norm_out(h), inplace=lean()))

    def downsampling(self) -> int:
        """Input side / output side: 2**(levels - 1) (8 in the paper configs)."""
        return 2 ** (len(self.down) - 1)

    def min_input_side(self) -> int:
        """Smallest input side: that of a 2-px output."""
        return 2 * self.downsampling()

    def peak_elements(self, size: Sequence[int], batch: int = 1) -> int:
        """Rough count of the float activations alive at once on an input of `size`: about four
        maps of the first level's width at full resolution (inference)."""
        return 4 * batch * self.conv_in.out_channels * int(size[0]) * int(size[1])


class GAPDecoder(nn.Module):
    """Scale-aware decoder: (latent, LR, output size) -> HR in model space.

    Two branches. The embedding branch runs the latent through `conv_in`, `mid` and the `up`
    levels (processed from the last to the first); after each level a 1x1 `transfer` and a nearest
    (`latent_resize`) resize to the LR size give h_k, and `condition_scale1/2` map the scale
    s = H_out / h_lr to a_k, b_k. The SR branch runs LR features through k = 0..L-1 of
    `ScaleModulation(x, a_k, b_k, h_k)` then FRU k. The output is
    `upsampler(x, out_size) + bicubic_up(lr, out_size)`.

    Args:
        ch: feature width of both branches.
        out_ch: output image channels.
        ch_mult: width multipliers of the embedding branch levels.
        num_res_blocks: ResnetBlocks per embedding level.
        z_channels: latent channels.
        in_channels: LR image channels.
        num_sr_modules: IMD modules of the FRU at each level (one FRU per level).
        attn_resolutions: must be empty; kept so the authors' YAML files load.
        dropout: ResnetBlock dropout.
        fusion: ablation switch. "modulation" (paper): scale-conditioned `ScaleModulation` of the
            SR features with the latent features; "add": `x + h_k`, no scale input (no
            `style`/`condition_scale*` parameters). Ignored without the SR branch.
        refinement: ablation switch. "fru" (paper) or "none" (no refinement blocks).
        upsampler: ablation switch. "scale_aware" (paper); the paper's ablations
            "mlp_interpolate" (`NearestMLPUpsampler`) and "fixed_x4" (`FixedScaleUpsampler`);
            our variants "liif" (`LocalImplicitUpsampler`) and "pixel_shuffle"
            (`PixelShuffleUpsampler`).
        use_latent: ablation switch. False builds the SR-only baseline: no embedding branch, the
            decoder super-resolves the LR alone (`forward(None, lr, out_size)`).
        use_sr_branch: ablation switch. False builds the paper's "no SR branch" decoder: no
            `head`, fusion or FRUs; the upsampler reads the last embedding level's h_k (level 0,
            resized to the LR size), so LR pixels reach the output only through the bicubic
            skip.
        modulation_init: initialisation of `condition_scale1/2` (training only; checkpoints are
            unaffected). "default" (paper, the authors' code): PyTorch's Linear init, so a_k, b_k
            start with random signs and about half of the SR features enter the lrelu negated,
            nearly zeroed. "identity": weights 0, biases 1 (a) and 0.1 (b), so the fusion starts
            as ~x + 0.1 h and the SR branch passes through (docs/results.md, "It learns",
            has what it does to the tiny configs).
        lr_feature_dropout: our option, training only: the probability that a sample's LR
            features (`head`'s output) are zeroed, so that the decoder must rebuild the detail
            from the latent (plus the bicubic skip); 0 (the authors'): never. Meant against the
            SR branch's shortcut around the latent (docs/results.md has what it did).
        latent_resize: `F.interpolate` mode of the resize of h_k to the LR size. "nearest" (the
            authors'): LR pixel i reads latent pixel floor(i * m / l), which misplaces the
            latent by up to one latent pixel depending on m / l; "nearest-exact" (our option):
            the centre-aligned floor((i + 0.5) * m / l).
    """

    def __init__(
        self,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        in_channels: int,
        num_sr_modules: Sequence[int],
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        fusion: str = "modulation",
        refinement: str = "fru",
        upsampler: str = "scale_aware",
        use_latent: bool = True,
        modulation_init: str = "default",
        use_sr_branch: bool = True,
        lr_feature_dropout: float = 0.0,
        latent_resize: str = "nearest",
    ):
        super().__init__()
        if attn_resolutions:
            raise ValueError("GAPDecoder has no attention blocks: set attn_resolutions to []")
        if len(num_sr_modules) != len(ch_mult):
            raise ValueError(
                f"num_sr_modules {list(num_sr_modules)} needs one entry per level of "
                f"ch_mult {list(ch_mult)}"
            )
        _check_choice("fusion", fusion, ("modulation", "add"))
        _check_choice("refinement", refinement, ("fru", "none"))
        _check_choice("modulation_init", modulation_init, ("default", "identity"))
        _check_choice("latent_resize", latent_resize, ("nearest", "nearest-exact"))
        if not (use_latent or use_sr_branch):
            raise ValueError("GAPDecoder: use_latent and use_sr_branch cannot both be false")
        if not use_sr_branch:
            fusion = "none"  # nothing to fuse: no scale-conditioning parameters either
        self.fusion, self.use_latent, self.use_sr_branch = fusion, use_latent, use_sr_branch
        self.lr_feature_dropout, self.latent_resize = lr_feature_dropout, latent_resize
        self.ch, self.num_levels = ch, len(ch_mult)
        # Names (`style`, `head`, `FRUList`, `up[i].transfer`, `condition_scale1/2`) are the
        # authors', for checkpoint compatibility.
        if use_latent and fusion == "modulation":
            self.style = ScaleModulation()
        if use_sr_branch:
            self.head = nn.Conv2d(in_channels, ch, 3, padding=1)
            refine = (lambda n: FRU(ch, n)) if refinement == "fru" else (lambda n: nn.Identity())
            self.FRUList = nn.ModuleList(refine(n) for n in num_sr_modules)
        self.upsampler = build_upsampler(upsampler, ch, out_ch)
        if use_latent:
            self._build_embedding_branch(ch, ch_mult, num_res_blocks, z_channels, dropout)
            if fusion == "modulation" and modulation_init == "identity":
                self._init_identity_modulation()

    def _build_embedding_branch(self, ch, ch_mult, num_res_blocks, z_channels, dropout) -> None:
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.up = nn.ModuleList([nn.Module() for _ in ch_mult])
        for i in reversed(range(len(ch_mult))):
            level = self.up[i]
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * ch_mult[i], dropout))
                block_in = ch * ch_mult[i]
            level.block = nn.ModuleList(blocks)
            if self.use_sr_branch or i == 0:  # without the SR branch only level 0's is read
                level.transfer = nn.Conv2d(block_in, ch, 1)
            if self.fusion == "modulation":
                level.condition_scale1 = nn.Linear(1, ch)
                level.condition_scale2 = nn.Linear(1, ch)

    def _init_identity_modulation(self) -> None:
        """a_k = 1, b_k = 0.1 at every scale (`modulation_init: identity`)."""
        for level in self.up:
            nn.init.zeros_(level.condition_scale1.weight)
            nn.init.ones_(level.condition_scale1.bias)
            nn.init.zeros_(level.condition_scale2.weight)
            nn.init.constant_(level.condition_scale2.bias, 0.1)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.upsampler.last_layer

    def authors_unused_keys(self) -> list[str]:
        """State-dict keys (relative to the decoder) that the authors' module of this ablation
        holds but never reads, so this decoder does not build them: `style.weight` of the
        SR-only baseline; without the SR branch, `condition_scale1/2` and the `transfer` convs
        of levels 1..L-1. Loading drops exactly these names."""
        keys = [] if self.use_latent else ["style.weight"]
        if not self.use_sr_branch:
            for i in range(self.num_levels):
                names = ["condition_scale1", "condition_scale2"] + (["transfer"] if i else [])
                keys += [f"up.{i}.{n}.{p}" for n in names for p in ("weight", "bias")]
        return keys

    def latent_features(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Embedding branch before the resize to the LR size: h_k [B, ch, h_z, w_z] per level,
        in processing order (k = 0 is level L-1); without the SR branch only level 0's."""
        return run_chain(self.latent_stages(), z)[:-1]

    def latent_stages(self) -> list[Stage]:
        """`latent_features` as a chain of stages (`ldm.chain`): z -> [h_0, .., h_k, h]; a
        level's `transfer` pushes its h_k under the running map h (dropped at the end)."""
        first = lambda z: self.conv_in(inference_layout(z))  # noqa: E731
        chain = [Stage(first, 1), *self.mid.block_1.stages(), *self.mid.block_2.stages()]
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            chain += [stage for block in level.block for stage in block.stages()]
            if hasattr(level, "transfer"):
                chain.append(Stage(partial(transfer, level.transfer)))
        return chain

    def modulations(self, scale: float, like: torch.Tensor) -> list[tuple | None]:
        """(a_k, b_k) [1, ch] per level from the scale s = H_out / h_lr (None without them)."""
        if self.fusion != "modulation" or not self.use_latent:
            return [None] * self.num_levels
        s = torch.tensor([[float(scale)]], dtype=like.dtype, device=like.device)
        return [(self.up[i].condition_scale1(s), self.up[i].condition_scale2(s)) for i in
                reversed(range(len(self.up)))]  # fmt: skip

    def sr_branch(self, lr: torch.Tensor, feats, scale: float) -> torch.Tensor:
        """`head`, then per level the fusion with h_k and FRU k.

        Without the SR branch: the last h_k (level 0) itself.

        Args:
            lr: [B, in, h, w] in [-1, 1].
            feats: h_k [B, ch, h, w] per level (already at the LR size), or None without latent.
            scale: s = H_out / h_lr of the whole image.

        Returns:
            [B, ch, h, w] features for the upsampler.
        """
        maps = [] if feats is None else feats[::-1]
        return run_chain(self.sr_stages(scale, feats is not None), *maps, lr)[0]

    def sr_stages(self, scale: float, with_latent: bool = True) -> list[Stage]:
        """`sr_branch` as a chain of stages (`ldm.chain`) on the stack [h_{L-1}, .., h_0, lr]
        ([lr] without latent): `head` (3x3), then per level k the pointwise fusion of (h_k, x)
        and the FRU's stages; without the SR branch, h_0 itself."""
        if not self.use_sr_branch:
            return [Stage(lambda feat, lr: feat.to(lr.dtype), take=2)]
        chain = [Stage(self.head_features, 1)]
        for fru, mod in zip(self.FRUList, self.modulations(scale, self.head.weight)):
            if with_latent:
                chain.append(Stage(partial(self.fuse, mod), take=2))
            chain += fru.stages() if isinstance(fru, FRU) else [Stage(fru)]
        return chain

    def head_features(self, lr: torch.Tensor) -> torch.Tensor:
        """`head` on lr [B, in, h, w] -> [B, ch, h, w] (channels last outside autograd), with
        the training-time LR feature dropout (`lr_feature_dropout`)."""
        x = self.head(inference_layout(lr))
        if self.training and self.lr_feature_dropout > 0:  # our option; training only
            x = x * (torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= self.lr_feature_dropout)
        return x

    def fuse(self, mod, feat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Fusion of SR features x with h_k `feat` (both [B, ch, h, w]): `x + feat`, or the
        scale modulation with `mod` = (a_k, b_k)."""
        feat = feat.to(x.dtype)
        return x + feat if self.fusion == "add" else self.style(x, *mod, feat)

    def render(self, x: torch.Tensor, lr: torch.Tensor, out_size, window=None) -> torch.Tensor:
        """`upsampler(x, out_size) + bicubic_up(lr, out_size)` -> [B, out_ch, *out_size]; with
        `window` (a tile: see `ScaleAwareUpsampler.forward`) its output window."""
        resize = window.resize if window is not None else resize_to(out_size)
        skip = resize(lr, "bicubic", 1)
        out = self.upsampler(x, out_size, window)
        return out.add_(skip) if lean() else out + skip

    def forward(
        self, z: torch.Tensor | None, lr: torch.Tensor, out_size: Sequence[int], window=None
    ) -> torch.Tensor:
        """z: [B, z, h_z, w_z] (None without latent); lr: [B, 3, h, w] in [-1, 1]
        -> [B, out_ch, *out_size]; with `window` (a block of a larger scene: `lr` is its crop at
        `window.offset`, see `ScaleAwareUpsampler.forward`) that window of the scene's output."""
        out_size = (int(out_size[0]), int(out_size[1]))
        feats = None
        if self.use_latent:
            lr_size = tuple(lr.shape[-2:])
            feats = [
                F.interpolate(h, size=lr_size, mode=self.latent_resize)
                for h in self.latent_features(z)
            ]
        lr_height = lr.shape[-2] if window is None else window.lr_size[0]
        x = self.sr_branch(lr, feats, out_size[0] / lr_height)  # scale s = H_out / h_lr
        return self.render(x, lr, out_size, window)

    def peak_elements(self, lr_size: Sequence[int], out_size: Sequence[int], batch: int = 1):
        """Rough count of the float activations alive at once (inference): those of the
        upsampler, plus the SR branch's at the LR size."""
        upsampler = self.upsampler.peak_elements(lr_size, out_size, batch)
        return upsampler + self.sr_branch_elements(lr_size, batch)

    def sr_branch_elements(self, lr_size: Sequence[int], batch: int = 1) -> int:
        """Rough count of the float activations alive at once in `sr_branch` on the whole LR
        image (inference), the h_k resized to the LR size included."""
        return (8 + self.num_levels) * batch * self.ch * int(lr_size[0]) * int(lr_size[1])

    def latent_elements(self, latent_size: Sequence[int], batch: int = 1) -> int:
        """Rough count of the float activations alive at once in `latent_features` (inference):
        four maps of the widest level and the h_k of every level."""
        if not self.use_latent:
            return 0
        widest = self.conv_in.out_channels
        return (
            (4 * widest + self.num_levels * self.ch)
            * batch
            * int(latent_size[0])
            * int(latent_size[1])
        )
