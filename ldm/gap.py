"""GAP encoder and decoder of the stage-1 autoencoder (ARCHITECTURE.md §2).

The encoder sees cat[bicubic_up(LR), HR] and compresses it 8x into the latent; the decoder rebuilds
HR at any size from LR plus the latent, with scale-conditioned fusion and a scale-aware upsampler.
The same encoder class (in_channels 3, double_z False) is stage 2's condition encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.baseline_upsamplers import LocalImplicitUpsampler, PixelShuffleUpsampler
from ldm.blocks import FRU, Downsample, ResnetBlock, ScaleModulation, normalize, swish
from ldm.upsampler import ScaleAwareUpsampler

UPSAMPLERS = {
    "scale_aware": lambda ch, out: ScaleAwareUpsampler(ch, out, num_levels=4),
    "liif": LocalImplicitUpsampler,
    "pixel_shuffle": PixelShuffleUpsampler,
}


def build_upsampler(name: str, channels: int, out_channels: int) -> nn.Module:
    """The decoder's upsampler by name (the paper's is "scale_aware")."""
    _check_choice("upsampler", name, tuple(UPSAMPLERS))
    return UPSAMPLERS[name](channels, out_channels)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"GAPDecoder: {name} must be one of {choices}, got {value!r}")


class GAPEncoder(nn.Module):
    """latent-diffusion's Encoder without attention: [B, in, H, W] -> [B, (2)z, ~H/8, ~W/8].

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
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.block_1(h))
        return self.conv_out(swish(self.norm_out(h)))


class GAPDecoder(nn.Module):
    """Scale-aware decoder: (latent, LR, output size) -> HR in model space.

    Two branches. The embedding branch runs the latent through `conv_in`, `mid` and the `up`
    levels (processed from the last to the first); after each level a 1x1 `transfer` and a nearest
    resize to the LR size give h_k, and `condition_scale1/2` map the scale s = H_out / h_lr to a_k,
    b_k. The SR branch runs LR features through k = 0..L-1 of `ScaleModulation(x, a_k, b_k, h_k)`
    then FRU k. The output is `upsampler(x, out_size) + bicubic_up(lr, out_size)`.

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
            `style`/`condition_scale*` parameters).
        refinement: ablation switch. "fru" (paper) or "none" (no refinement blocks).
        upsampler: ablation switch. "scale_aware" (paper), "liif" (`LocalImplicitUpsampler`) or
            "pixel_shuffle" (fixed x4, `PixelShuffleUpsampler`).
        use_latent: ablation switch. False builds the SR-only baseline: no embedding branch, the
            decoder super-resolves the LR alone (`forward(None, lr, out_size)`).
        modulation_init: initialisation of `condition_scale1/2` (training only; checkpoints are
            unaffected). "default" (paper, the authors' code): PyTorch's Linear init, so a_k, b_k
            start with random signs and about half of the SR features enter the lrelu negated,
            nearly zeroed. "identity": weights 0, biases 1 (a) and 0.1 (b), so the fusion starts
            as ~x + 0.1 h and the SR branch passes through; on a CPU budget of minutes this is
            what lets the tiny configs beat bicubic (README, "It learns").
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
        self.fusion, self.use_latent = fusion, use_latent
        # Names (`style`, `head`, `FRUList`, `up[i].transfer`, `condition_scale1/2`) are the
        # authors', for checkpoint compatibility.
        if use_latent and fusion == "modulation":
            self.style = ScaleModulation()
        self.head = nn.Conv2d(in_channels, ch, 3, padding=1)
        refine = (lambda n: FRU(ch, n)) if refinement == "fru" else (lambda n: nn.Identity())
        self.FRUList = nn.ModuleList(refine(n) for n in num_sr_modules)
        self.upsampler = build_upsampler(upsampler, ch, out_ch)
        if use_latent:
            self._build_embedding_branch(ch, ch_mult, num_res_blocks, z_channels, dropout)
            if fusion == "modulation" and modulation_init == "identity":
                for level in self.up:
                    nn.init.zeros_(level.condition_scale1.weight)
                    nn.init.ones_(level.condition_scale1.bias)
                    nn.init.zeros_(level.condition_scale2.weight)
                    nn.init.constant_(level.condition_scale2.bias, 0.1)

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
            level.transfer = nn.Conv2d(block_in, ch, 1)
            if self.fusion == "modulation":
                level.condition_scale1 = nn.Linear(1, ch)
                level.condition_scale2 = nn.Linear(1, ch)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.upsampler.last_layer

    def embed_latent(self, z: torch.Tensor, lr_size: tuple[int, int], scale: float):
        """Latent branch: yields (h_k [B, ch, h_lr, w_lr], a_k [1, ch], b_k [1, ch]) per level."""
        s = torch.tensor([[float(scale)]], dtype=z.dtype, device=z.device)
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for block in level.block:
                h = block(h)
            feat = F.interpolate(level.transfer(h), size=lr_size, mode="nearest")
            if self.fusion == "add":
                yield feat, None, None
            else:
                yield feat, level.condition_scale1(s), level.condition_scale2(s)

    def forward(
        self, z: torch.Tensor | None, lr: torch.Tensor, out_size: Sequence[int]
    ) -> torch.Tensor:
        """z: [B, z, h_z, w_z] (None without latent); lr: [B, 3, h, w] in [-1, 1]
        -> [B, out_ch, *out_size]."""
        out_size = (int(out_size[0]), int(out_size[1]))
        scale = out_size[0] / lr.shape[-2]  # height ratio s = H_out / h_lr
        x = self.head(lr)  # [B, ch, h, w]
        if not self.use_latent:
            for fru in self.FRUList:
                x = fru(x)
        else:
            levels = self.embed_latent(z, lr.shape[-2:], scale)
            for fru, (feat, a, b) in zip(self.FRUList, levels):
                x = fru(x + feat if self.fusion == "add" else self.style(x, a, b, feat))
        up = F.interpolate(lr, size=out_size, mode="bicubic", align_corners=False)
        return self.upsampler(x, out_size) + up
