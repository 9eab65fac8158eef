"""UNet2DCondition: the noise predictor eps_theta(x_t, t, context) of Stable Diffusion.

One config dataclass covers SD 1.x, SD 2.x, SDXL and the toy sizes that train on a CPU.  The network:

    t ──sinusoidal──► MLP ──► temb (+ class embedding) (+ SDXL's added embedding)   (added inside every ResnetBlock)
    x ─► conv_in ─► down blocks ─► mid block ─► up blocks ─► GroupNorm, SiLU, conv_out ─► eps
                       │  [ResnetBlock, Transformer2D] x layers,          ▲
                       │  then a stride-2 Downsample                     │ each up block concatenates
                       └──────────── skip connections ───────────────────┘ the matching skips

Transformer2D blocks attend over the pixels (self-attention) and to the text tokens
(cross-attention, keys/values from ``context``).  NHWC throughout.

SDXL ("text_time" added embedding, Podell et al. 2023): the pooled text embedding p (B, 1280) and the
six size/crop numbers  time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w)  condition
the network like the timestep does:

    e_add = add_embedding([p, sin/cos(time_ids_1), ..., sin/cos(time_ids_6)])   (each 256-dim, flattened)
    temb  = time_embedding(sin/cos(t)) + e_add
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from .layers import Downsample, ResnetBlock, TimestepEmbedding, Transformer2D, Upsample, conv3x3, timestep_embedding


@dataclass(frozen=True)
class UNetConfig:
    """Everything that fixes the architecture (and so the parameter tree).

    ``attention`` says which down blocks carry Transformer2D layers (the up blocks mirror it);
    ``num_attention_heads`` is one count or one per block (SD 2.x: 5, 10, 20, 20; head_dim =
    channels / heads); ``transformer_layers_per_block`` is one depth or one per down block (SDXL:
    1, 2, 10; the mid block takes the last, the up blocks mirror the down blocks).
    ``addition_embed_type="text_time"`` (SDXL) adds the embedding of the pooled text and the six
    size/crop numbers to the time embedding: ``addition_time_embed_dim`` per number,
    ``projection_class_embeddings_input_dim`` = pooled width + 6 x that.  ``cross_attention_dim=None`` gives self-attention only (unconditional or
    class-conditional toys); ``num_class_embeds`` adds a class embedding to the time embedding.
    """

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention: tuple[bool, ...] = (True, True, True, False)
    mid_block_attention: bool = True
    num_attention_heads: int | tuple[int, ...] = 8
    transformer_layers_per_block: int | tuple[int, ...] = 1
    cross_attention_dim: int | None = 768
    use_linear_projection: bool = False
    num_class_embeds: int | None = None
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    dropout: float = 0.0
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    attention_chunk_size: int | None = 1024  # queries per block of cross-attention (self-attention over
    # more than 512 pixels, a multiple of 64, takes blocks of keys instead: layers._key_block)
    addition_embed_type: str | None = None  # None (SD 1.x / 2.x) or "text_time" (SDXL)
    addition_time_embed_dim: int | None = None  # SDXL: 256
    projection_class_embeddings_input_dim: int | None = None  # SDXL: 2816 = 1280 + 6 x 256

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.transformer_depths) != n:
            raise ValueError(f"transformer_layers_per_block has {len(self.transformer_depths)} entries, "
                             f"block_out_channels {n}")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"addition_embed_type={self.addition_embed_type!r} is not supported (None or 'text_time')")
        if self.addition_embed_type and not (self.addition_time_embed_dim and self.projection_class_embeddings_input_dim):
            raise ValueError("addition_embed_type='text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")
        if len(self.attention) != n:
            raise ValueError(f"attention has {len(self.attention)} entries, block_out_channels {n}")
        heads = self.heads_per_block
        if len(heads) != n:
            raise ValueError(f"num_attention_heads has {len(heads)} entries, block_out_channels {n}")
        for c, h in zip(self.block_out_channels, heads):
            if c % self.norm_num_groups:
                raise ValueError(f"{c} channels cannot be split into {self.norm_num_groups} GroupNorm groups")
            if c % h:
                raise ValueError(f"{c} channels cannot be split into {h} attention heads")

    @property
    def heads_per_block(self) -> tuple[int, ...]:
        h = self.num_attention_heads
        return tuple(h) if isinstance(h, (tuple, list)) else (h,) * len(self.block_out_channels)

    @property
    def transformer_depths(self) -> tuple[int, ...]:
        """Transformer blocks per Transformer2D, one count per down block."""
        d = self.transformer_layers_per_block
        return tuple(d) if isinstance(d, (tuple, list)) else (d,) * len(self.block_out_channels)

    @property
    def pooled_text_dim(self) -> int | None:
        """SDXL: the width of the pooled text embedding the added embedding takes (1280)."""
        if self.addition_embed_type is None:
            return None
        return self.projection_class_embeddings_input_dim - 6 * self.addition_time_embed_dim

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @classmethod
    def sd15(cls, **overrides) -> "UNetConfig":
        """Stable Diffusion 1.x (1.4, 1.5): 859,520,964 parameters."""
        return replace(cls(), **overrides)

    @classmethod
    def sd2(cls, **overrides) -> "UNetConfig":
        """Stable Diffusion 2.x: linear projections, 5/10/20/20 heads of 64, OpenCLIP context 1024."""
        return replace(cls(num_attention_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True),
                       **overrides)

    @classmethod
    def sdxl(cls, **overrides) -> "UNetConfig":
        """SDXL base 1.0: blocks of 320, 640, 1280 channels, no attention in the first, 1 / 2 / 10
        transformer blocks (10 in the mid block), heads of 64, context 2048 (CLIP-L ++ OpenCLIP bigG),
        the "text_time" added embedding; 128x128 latents; 2,567,463,684 parameters."""
        base = cls(sample_size=128, block_out_channels=(320, 640, 1280), attention=(False, True, True),
                   num_attention_heads=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                   use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=2816)
        return replace(base, **overrides)

    @classmethod
    def toy(cls, in_channels: int = 3, out_channels: int | None = None, sample_size: int = 32, **overrides) -> "UNetConfig":
        """A few hundred thousand parameters, for 32x32 images on a CPU."""
        base = cls(sample_size=sample_size, in_channels=in_channels, out_channels=out_channels or in_channels,
                   block_out_channels=(32, 64, 64), layers_per_block=1, attention=(False, True, True),
                   num_attention_heads=4, cross_attention_dim=None, norm_num_groups=8, attention_chunk_size=None)
        return replace(base, **overrides)


def _resnet(cfg: UNetConfig, channels: int, dtype, name: str) -> ResnetBlock:
    return ResnetBlock(channels, cfg.norm_num_groups, cfg.norm_eps, cfg.dropout, dtype, name=name)


def _transformer(cfg: UNetConfig, block: int, dtype, name: str) -> Transformer2D:
    """The Transformer2D of down block ``block`` (its mirror up block; -1: the mid block, as the last block)."""
    channels, heads, depth = cfg.block_out_channels[block], cfg.heads_per_block[block], cfg.transformer_depths[block]
    return Transformer2D(heads, channels // heads, depth, cfg.cross_attention_dim is not None,
                         cfg.use_linear_projection, cfg.norm_num_groups, cfg.attention_chunk_size, dtype, name=name)


class DownBlock(nn.Module):
    """``layers_per_block`` x [ResnetBlock, Transformer2D if attention], then a Downsample
    (except in the last block).  Returns h and every intermediate output, for the skips."""

    config: UNetConfig
    index: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, temb, context, train):
        cfg, i = self.config, self.index
        ch, skips = cfg.block_out_channels[i], []
        for j in range(cfg.layers_per_block):
            h = _resnet(cfg, ch, self.dtype, f"resnets_{j}")(h, temb, train)
            if cfg.attention[i]:
                h = _transformer(cfg, i, self.dtype, f"attentions_{j}")(h, context)
            skips.append(h)
        if i < len(cfg.block_out_channels) - 1:
            h = Downsample(ch, self.dtype, name="downsamplers_0")(h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """ResnetBlock, Transformer2D, ResnetBlock at the lowest resolution."""

    config: UNetConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, temb, context, train):
        cfg = self.config
        ch = cfg.block_out_channels[-1]
        h = _resnet(cfg, ch, self.dtype, "resnets_0")(h, temb, train)
        if cfg.mid_block_attention:
            h = _transformer(cfg, -1, self.dtype, "attentions_0")(h, context)
        return _resnet(cfg, ch, self.dtype, "resnets_1")(h, temb, train)


class UpBlock(nn.Module):
    """Mirror of a down block: ``layers_per_block + 1`` x [concat a skip, ResnetBlock,
    Transformer2D if attention], then an Upsample (except in the last block)."""

    config: UNetConfig
    index: int  # up block i mirrors down block n - 1 - i
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, skips, temb, context, train):
        """``skips``: this block's layers_per_block + 1 skip tensors, used last first."""
        cfg, i = self.config, self.index
        skips = list(skips)
        n = len(cfg.block_out_channels)
        b = n - 1 - i
        ch = cfg.block_out_channels[b]
        for j in range(cfg.layers_per_block + 1):
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = _resnet(cfg, ch, self.dtype, f"resnets_{j}")(h, temb, train)
            if cfg.attention[b]:
                h = _transformer(cfg, b, self.dtype, f"attentions_{j}")(h, context)
        if i < n - 1:
            h = Upsample(ch, self.dtype, name="upsamplers_0")(h)
        return h


class UNet2DCondition(nn.Module):
    config: UNetConfig
    dtype: Any = jnp.float32  # computation dtype (bfloat16 on accelerators); parameters stay float32
    # Gradient checkpointing (training only): each down, mid and up block keeps only its inputs for the
    # backward pass and recomputes the rest (jax.checkpoint), trading ~1/3 more compute for activations.
    # The parameters and outputs are those of the plain network.
    remat: bool = False

    @nn.compact
    def __call__(self, x, t, context=None, class_labels=None, train: bool = False, added_cond=None):
        """x (B, H, W, in_channels), t (B,) timesteps, context (B, L, cross_attention_dim) or None,
        class_labels (B,) or None; added_cond (SDXL): {"text_embeds": (B, pooled width), "time_ids":
        (B, 6)} (diffusers' ``added_cond_kwargs``).  Returns (B, H, W, out_channels) float32."""
        cfg, dt = self.config, self.dtype
        self._check_inputs(x, t, context, class_labels, added_cond)
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))

        # time (and class) embedding
        temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = TimestepEmbedding(cfg.time_embed_dim, dt, name="time_embedding")(temb.astype(dt))
        if cfg.num_class_embeds is not None:
            temb = temb + nn.Embed(cfg.num_class_embeds, cfg.time_embed_dim, dtype=dt, name="class_embedding")(class_labels)
        if cfg.addition_embed_type == "text_time":
            temb = temb + self._text_time_embedding(added_cond["text_embeds"], added_cond["time_ids"])
        if context is not None:
            context = context.astype(dt)

        # static_argnums count self as 0: ``train`` (a Python bool) is argument 4 (5 for an up block)
        Down, Mid, Up = ((nn.remat(DownBlock, static_argnums=(4,)), nn.remat(MidBlock, static_argnums=(4,)),
                          nn.remat(UpBlock, static_argnums=(5,))) if self.remat else (DownBlock, MidBlock, UpBlock))
        h = conv3x3(cfg.block_out_channels[0], "conv_in", dt)(x.astype(dt))
        skips = [h]
        for i in range(len(cfg.block_out_channels)):
            h, block_skips = Down(cfg, i, dt, name=f"down_blocks_{i}")(h, temb, context, train)
            skips += block_skips
        h = Mid(cfg, dt, name="mid_block")(h, temb, context, train)
        k = cfg.layers_per_block + 1  # skips each up block concatenates, taken from the end
        for i in range(len(cfg.block_out_channels)):
            skips, own = skips[:-k], skips[-k:]
            h = Up(cfg, i, dt, name=f"up_blocks_{i}")(h, own, temb, context, train)

        h = nn.silu(nn.GroupNorm(cfg.norm_num_groups, epsilon=cfg.norm_eps, name="conv_norm_out")(h))
        return conv3x3(cfg.out_channels, "conv_out", dt)(h).astype(jnp.float32)

    def _text_time_embedding(self, text_embeds, time_ids):
        """SDXL: add_embedding([pooled text, sin/cos of each of the six size/crop numbers])."""
        cfg, B = self.config, text_embeds.shape[0]
        times = timestep_embedding(jnp.reshape(time_ids, (-1,)), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                   cfg.freq_shift).reshape(B, -1)  # (B, 6 x 256)
        e = jnp.concatenate([jnp.asarray(text_embeds, jnp.float32), times], axis=-1).astype(self.dtype)
        return TimestepEmbedding(cfg.time_embed_dim, self.dtype, name="add_embedding")(e)

    def _check_inputs(self, x, t, context, class_labels, added_cond):
        cfg = self.config
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"x must be NHWC with {cfg.in_channels} channels, got shape {x.shape}")
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"height and width must be multiples of {factor} for this UNet, got {x.shape[1:3]}")
        if cfg.cross_attention_dim is not None:
            if context is None or context.ndim != 3 or context.shape[-1] != cfg.cross_attention_dim:
                got = None if context is None else context.shape
                raise ValueError(f"context must be (B, L, {cfg.cross_attention_dim}), got {got}")
        elif context is not None:
            raise ValueError("this UNet has no cross-attention (cross_attention_dim=None) but a context was given")
        if (cfg.num_class_embeds is None) != (class_labels is None):
            raise ValueError("class_labels must be given exactly when the config has num_class_embeds "
                             f"(num_class_embeds={cfg.num_class_embeds})")
        if cfg.addition_embed_type is None:
            if added_cond is not None:
                raise ValueError("added_cond (SDXL's pooled text and size/crop numbers) was given, but this UNet "
                                 "has no added embedding (addition_embed_type=None)")
            return
        want = {"text_embeds": (x.shape[0], cfg.pooled_text_dim), "time_ids": (x.shape[0], 6)}
        got = {k: tuple(jnp.shape(added_cond[k])) if added_cond is not None and k in added_cond else None for k in want}
        if got != want:
            raise ValueError(f"this UNet (addition_embed_type='text_time') needs added_cond with text_embeds "
                             f"and time_ids of shapes {want}, got {got}")
