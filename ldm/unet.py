"""Stage-2 denoiser: the OpenAI/LDM ``UNetModel`` with time + scale + output-size embeddings.

Only the features LDCSR uses are kept (2-D, conv resampling, legacy QKV attention). Attribute names
are the authors' (``time_embed``, ``input_blocks``, ``middle_block``, ``output_blocks``, ``out``,
``in_layers`` ...) because they become state-dict keys of released checkpoints.
"""

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ldm.chain import Stage, run_chain
from ldm.nn import normalization, timestep_embedding, zero_module


class TimestepEmbedSequential(nn.Sequential):
    """``nn.Sequential`` that passes the embedding to the children that take one (``ResBlock``)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest x2 upsampling, optionally followed by a 3x3 conv (``conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """x1/2 downsampling by a strided 3x3 conv or 2x2 average pooling (``op``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        elif out_channels != channels:
            raise ValueError("Downsample without conv cannot change the channel count")
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the embedding: ``skip(x) + out(in(x) + emb_proj(emb))``.

    With ``use_scale_shift_norm`` the embedding instead gives FiLM scale/shift after the second
    norm; ``up``/``down`` resample inside the block (``resblock_updown``).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x [B, C, h, w], emb [B, E] -> [B, C_out, h', w']."""
        return self.second(*self.first(x, emb), emb)

    def first(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> (x, in_layers(x)), both resampled with `up` / `down`."""
        if self.updown:
            h = self.h_upd(self.in_layers[:-1](x))
            return self.x_upd(x), self.in_layers[-1](h)
        return x, self.in_layers(x)

    def second(self, x: torch.Tensor, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """(x, h) -> skip(x) + out_layers(h with the embedding)."""
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]  # [B, C_out(*2), 1, 1]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttentionLegacy(nn.Module):
    """Multi-head attention on a fused ``qkv`` tensor in the legacy layout ``[B, heads*3*ch, T]``.

    The channel axis is split per head first, then into q, k, v (improved-diffusion's original
    order, which the released weights use). Computed with ``scaled_dot_product_attention``, which
    equals the legacy ``softmax(q^T k / sqrt(ch)) v``.
    """

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)  # [B*h, ch, T]
        a = F.scaled_dot_product_attention(q.mT, k.mT, v.mT)  # [B*h, T, ch]
        return a.mT.reshape(bs, -1, length)


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection and zero-initialised output projection."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(
                    f"channels {channels} is not divisible by num_head_channels {num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.attention = QKVAttentionLegacy(self.num_heads)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)  # [B, C, h*w]
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad ``x`` [..., h, w] on the right/bottom so that h and w become multiples of ``multiple``.

    Reflect padding as in the authors' code wherever it is defined (pad < side); a side that needs
    a pad >= its length (latent sides <= 4 for multiple 8, where the authors' code crashes) gets
    replicate padding instead. The two axes are padded separately, which for reflect equals
    padding them jointly, so every size the authors' code handles gives identical results.
    """
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_w:
        x = F.pad(x, (0, pad_w, 0, 0), mode="reflect" if pad_w < w else "replicate")
    if pad_h:
        x = F.pad(x, (0, 0, 0, pad_h), mode="reflect" if pad_h < h else "replicate")
    return x


def _embedding_mlp(model_channels: int, embed_dim: int) -> nn.Sequential:
    """Linear -> SiLU -> Linear (indices 0 and 2, the authors' key names)."""
    return nn.Sequential(
        nn.Linear(model_channels, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim)
    )


def _check_arguments(num_heads, num_head_channels, scale_embedding, pad_multiple, channel_mult):
    if num_heads == -1 and num_head_channels == -1:
        raise ValueError("UNetModel: set either num_heads or num_head_channels")
    if scale_embedding not in ("floor", "float"):
        raise ValueError(f"scale_embedding must be 'floor' or 'float', got {scale_embedding!r}")
    if pad_multiple % 2 ** (len(channel_mult) - 1):
        raise ValueError(
            f"pad_multiple {pad_multiple} must be divisible by 2**(len(channel_mult)-1)"
            f" = {2 ** (len(channel_mult) - 1)} so that skip connections line up"
        )


class UNetModel(nn.Module):
    """The LDCSR denoiser ``eps = UNet(cat[z_t, c], t, scale, out_height)``.

    ``emb = time_embed(sin(t)) + scale_embed(sin(floor(scale))) + osize_embed(sin(out_height))``,
    every ``sin`` being the ``model_channels``-wide sinusoidal embedding. The input is padded on the
    right/bottom to a multiple of ``pad_multiple`` (see :func:`pad_to_multiple`) and the output
    cropped back, so any latent size (even 1x1) works.

    Args:
        image_size: unused; kept so that the authors' configs instantiate unchanged.
        in_channels: input channels (8 = latent 4 + condition 4).
        model_channels: base width; the embedding width is ``4 * model_channels``.
        out_channels: predicted-eps channels (4).
        num_res_blocks: residual blocks per level.
        attention_resolutions: downsample factors (1, 2, 4, ...) at which attention is applied.
        dropout: dropout inside the residual blocks.
        channel_mult: width multiplier per level.
        conv_resample: strided-conv / conv resampling instead of pooling / plain nearest.
        num_heads: attention heads (used when ``num_head_channels`` is -1).
        num_head_channels: channels per attention head (overrides ``num_heads``).
        use_scale_shift_norm: FiLM-style embedding injection (off in LDCSR).
        resblock_updown: resample with residual blocks instead of Up/Downsample layers.
        use_scale_embedding: add the scale embedding (``scale_embed``).
        use_osize_embedding: add the output-height embedding (``osize_embed``).
        scale_embedding: ``"floor"`` embeds ``floor(scale)`` like the authors' code (3.7 -> 3);
            ``"float"`` embeds the real-valued scale (our option; not used by released weights).
        pad_multiple: pad to this multiple; must be divisible by ``2 ** (len(channel_mult) - 1)``.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        num_heads: int = -1,
        num_head_channels: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_scale_embedding: bool = True,
        use_osize_embedding: bool = True,
        scale_embedding: str = "floor",
        pad_multiple: int = 8,
    ):
        super().__init__()
        _check_arguments(num_heads, num_head_channels, scale_embedding, pad_multiple, channel_mult)
        self.image_size = image_size
        self.model_channels = model_channels
        self.use_scale_embedding = use_scale_embedding
        self.use_osize_embedding = use_osize_embedding
        self.scale_embedding = scale_embedding
        self.pad_multiple = pad_multiple
        self.channel_mult, self.num_res_blocks = tuple(channel_mult), num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        emb_dim = 4 * model_channels
        # Settings shared by the encoder and decoder builders.
        spec = dict(
            n_res=num_res_blocks,
            attn_res=tuple(attention_resolutions),
            block=dict(
                emb_channels=emb_dim, dropout=dropout, use_scale_shift_norm=use_scale_shift_norm
            ),
            attn=dict(num_heads=num_heads, num_head_channels=num_head_channels),
            conv_resample=conv_resample,
            resblock_updown=resblock_updown,
        )

        # Key names time_embed / scale_embed / osize_embed are the authors' (checkpoint keys).
        self.time_embed = _embedding_mlp(model_channels, emb_dim)
        if use_scale_embedding:
            self.scale_embed = _embedding_mlp(model_channels, emb_dim)
        if use_osize_embedding:
            self.osize_embed = _embedding_mlp(model_channels, emb_dim)

        mults = [model_channels * m for m in channel_mult]
        self.input_blocks, skip_chans = self._build_encoder(in_channels, mults, spec)
        self.middle_block = TimestepEmbedSequential(
            ResBlock(mults[-1], **spec["block"]),
            AttentionBlock(mults[-1], **spec["attn"]),
            ResBlock(mults[-1], **spec["block"]),
        )
        self.output_blocks = self._build_decoder(mults, skip_chans, spec)
        self.out = nn.Sequential(
            normalization(model_channels),
            nn.SiLU(),
            zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1)),
        )

    @staticmethod
    def _build_encoder(in_ch: int, mults: list[int], spec: dict):
        """Input blocks: stem conv, then per level ``n_res`` x (ResBlock [+ attn]) + downsample.

        Returns the blocks and the channel count of every skip connection they produce.
        """
        block_kw, attn_kw = spec["block"], spec["attn"]
        blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_ch, mults[0], 3, padding=1))])
        skip_chans, ch, ds = [mults[0]], mults[0], 1
        for level, out_ch in enumerate(mults):
            for _ in range(spec["n_res"]):
                layers = [ResBlock(ch, out_channels=out_ch, **block_kw)]
                ch = out_ch
                if ds in spec["attn_res"]:
                    layers.append(AttentionBlock(ch, **attn_kw))
                blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(mults) - 1:
                if spec["resblock_updown"]:
                    down = ResBlock(ch, out_channels=ch, down=True, **block_kw)
                else:
                    down = Downsample(ch, spec["conv_resample"], out_channels=ch)
                blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2
        return blocks, skip_chans

    @staticmethod
    def _build_decoder(mults: list[int], skip_chans: list[int], spec: dict):
        """Output blocks: per level (reversed) ``n_res + 1`` x (ResBlock on [h, skip] [+ attn]),
        the last one of each level but the first followed by an upsample."""
        block_kw, attn_kw, n_res = spec["block"], spec["attn"], spec["n_res"]
        blocks, ch, ds = nn.ModuleList(), mults[-1], 2 ** (len(mults) - 1)
        skip_chans = list(skip_chans)
        for level in reversed(range(len(mults))):
            for i in range(n_res + 1):
                layers = [ResBlock(ch + skip_chans.pop(), out_channels=mults[level], **block_kw)]
                ch = mults[level]
                if ds in spec["attn_res"]:
                    layers.append(AttentionBlock(ch, **attn_kw))
                if level and i == n_res:
                    if spec["resblock_updown"]:
                        layers.append(ResBlock(ch, out_channels=ch, up=True, **block_kw))
                    else:
                        layers.append(Upsample(ch, spec["conv_resample"], out_channels=ch))
                    ds //= 2
                blocks.append(TimestepEmbedSequential(*layers))
        return blocks

    def embed(self, timesteps, scale=None, out_height=None) -> torch.Tensor:
        """Sum of the time, scale and output-size embeddings -> [B, 4 * model_channels]."""
        mc = self.model_channels
        emb = self.time_embed(timestep_embedding(timesteps, mc))
        if self.use_scale_embedding:
            if scale is None:
                raise ValueError("UNetModel(use_scale_embedding=True) needs `scale` (H_out / h_lr)")
            # The authors cast the scale with .long(): floor for positive scales.
            scale = torch.floor(scale) if self.scale_embedding == "floor" else scale
            emb = emb + self.scale_embed(timestep_embedding(scale, mc))
        if self.use_osize_embedding:
            if out_height is None:
                raise ValueError("UNetModel(use_osize_embedding=True) needs `out_height` (H_out)")
            emb = emb + self.osize_embed(timestep_embedding(out_height, mc))
        return emb

    def peak_elements(self, size: Sequence[int], batch: int = 1) -> int:
        """Rough count of the float activations alive at once in `forward` (inference) on a
        latent of `size`: the skip maps, four working maps of the widest concatenation (h and
        its skip) of a level, and the attention matrices (one per head)."""
        m = self.pad_multiple
        h, w = (-(-int(n) // m) * m for n in size)
        blocks = [b for b in self.modules() if isinstance(b, AttentionBlock)]
        heads = max((b.num_heads for b in blocks), default=0)
        skips, work, attention = self.model_channels * h * w, 0, 0
        for level, mult in enumerate(self.channel_mult):
            ch, px = self.model_channels * mult, h * w // 4**level
            skips += (self.num_res_blocks + 1) * ch * px
            work = max(work, 4 * 2 * ch * px)
            if 2**level in self.attention_resolutions:
                attention = max(attention, heads * px * px)
        return batch * (skips + work + attention)

    def forward(self, x, timesteps, scale=None, out_height=None) -> torch.Tensor:
        """Predict the noise.

        Args:
            x: [B, in_channels, h, w] (``cat[z_t, c]``), any h, w >= 1.
            timesteps: [B] long diffusion steps (a scalar is broadcast).
            scale: [B] float ``H_out / h_lr`` (floored unless ``scale_embedding="float"``).
            out_height: [B] output height ``H_out`` in pixels.

        Returns:
            [B, out_channels, h, w].
        """
        chain, h = self.stages(x, timesteps, scale, out_height)
        return run_chain(chain, h)[0][..., : x.shape[-2], : x.shape[-1]]  # [B, out, h, w]

    def stages(self, x, timesteps, scale=None, out_height=None) -> tuple[list[Stage], torch.Tensor]:
        """`forward` as a chain of stages (`ldm.chain`) with the embedding bound, and the
        chain's input: x padded to `pad_multiple` [B, in, H8, W8] (the output is cropped back
        to x's size). Each layer of a block is a stage (Downsample, Upsample: 1 row around;
        attention and up/down ResBlocks: whole), a ResBlock two (each starting at a GroupNorm
        and reading 1 row around); an input block's last stage pushes a copy of its output
        (the skip connection), an output block's first stage takes (skip, h) and reads
        cat[h, skip]."""
        b = x.shape[0]
        timesteps, scale, out_height = (
            None if v is None else torch.as_tensor(v, device=x.device).expand(b)
            for v in (timesteps, scale, out_height)
        )
        emb = self.embed(timesteps, scale, out_height)  # [B, 4 * model_channels]
        chain = []
        for block in self.input_blocks:
            *layers, last = layer_stages(block, emb)
            chain += [*layers, last._replace(fn=partial(keep, last.fn))]
        chain += layer_stages(self.middle_block, emb)
        for block in self.output_blocks:
            first, *layers = layer_stages(block, emb)
            chain += [first._replace(fn=partial(join, first.fn), take=2), *layers]
        chain.append(Stage(self.out, 1))
        return chain, pad_to_multiple(x, self.pad_multiple)  # [B, in, H8, W8]


def layer_stages(block: TimestepEmbedSequential, emb: torch.Tensor) -> list[Stage]:
    """The layers of a UNet block as stages, the embedding bound."""
    stages = []
    for layer in block:
        if isinstance(layer, ResBlock) and layer.updown:  # norms on two grids: whole
            stages.append(Stage(partial(layer, emb=emb), None))
        elif isinstance(layer, ResBlock):  # two stages, each starting at a GroupNorm
            stages.append(Stage(partial(layer.first, emb=emb), 1))
            stages.append(Stage(partial(layer.second, emb=emb), 1, take=2))
        elif isinstance(layer, AttentionBlock):
            stages.append(Stage(layer, None))
        elif isinstance(layer, Downsample):
            stages.append(Stage(layer, 1, stride=2))
        elif isinstance(layer, Upsample):
            stages.append(Stage(layer, 1, up=2))
        else:  # the stem's 3x3 convolution
            stages.append(Stage(layer, 1))
    return stages


def keep(fn, *maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(*maps), pushed twice: the skip connection and the running map."""
    h = fn(*maps)
    return h, h


def join(fn, skip: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """fn(cat[h, skip]) (an output block's first layer)."""
    return fn(torch.cat([h, skip], dim=1))
