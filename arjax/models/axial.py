"""Axial Transformer (Ho et al. 2019, "Axial Attention in Multidimensional Transformers").

An autoregressive model of N-D tensors of discrete values ``[batch, *spatial, channels]``
(images: ``spatial = (rows, cols)``; video: ``(frames, rows, cols)``). Generation order:
channel-major (sec. 4: a whole channel slice after the previous ones), then raster order over
``spatial``.

Per channel slice, with data embeddings ``e`` and a context ``a`` that every position may see
(axial position embeddings + the channel encoder's summary of the earlier channels):

- outer decoder of axis ``k`` (sec. 4; one per axis but the last): layers of unmasked
  axial attention along every later axis then masked axial attention along ``k``;
  ``ctx_{k+1} = shift_k(outer_k(e + ctx_k)) + ctx_k`` with ``ctx_0 = a``. For images this is
  the paper's "unmasked row + masked column" stack followed by ``ShiftDown``; for more axes it
  nests (frames, then rows within a frame).
- inner decoder (masked attention along the last axis): ``inner(shift_last(e) + ctx_{n-1})``,
  the paper's ``ShiftRight(h) + ShiftDown(u)`` followed by masked row attention.
- channel encoder (sec. 4): unmasked axial attention along all axes over the sum of the
  earlier channels' embeddings; absent for one channel.

Every shift moves context one step later along its axis, so the logits at a subpixel depend
only on subpixels before it in the generation order. Blocks are pre-norm residual
(RMSNorm, axial attention with RoPE along the attended axis, SwiGLU). Sampling
(:mod:`arjax.generate.axial`) runs outer decoders once per slice and the inner decoder once
per pixel, with KV caches along the masked axes (sec. 4, semi-parallel sampling).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from arjax.config import check, check_field_types, check_positive
from arjax.data.images import IMAGE_DATASETS
from arjax.models.registry import ModelSpec, register_model
from arjax.nn import Attention, RMSNorm, SwiGLU, logical
from arjax.nn.layers import Mode, RopeScaling
from arjax.nn.transformer import DTYPES
from arjax.ops.attention import IMPLS
from arjax.ops.axial import fold_axis


@dataclasses.dataclass(frozen=True)
class AxialConfig:
    """Axial Transformer over ``[batch, *shape, channels]`` tensors of ``levels`` values.

    ``outer_layers`` layers per outer decoder (one outer decoder per axis but the last),
    ``inner_layers`` masked blocks along the last axis, ``channel_layers`` channel-encoder
    layers (used only when ``channels > 1``). ``dataset`` names the image data
    (:mod:`arjax.data.images`) the trainer feeds; it must match ``shape``/``channels``.
    """

    shape: tuple[int, ...] = (8, 8)
    channels: int = 1
    levels: int = 256
    d_model: int = 64
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 16
    mlp_dim: int = 192
    outer_layers: int = 2
    inner_layers: int = 2
    channel_layers: int = 1
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling = RopeScaling()
    norm_eps: float = 1e-6
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attention_impl: Literal["auto", "xla", "cudnn", "pallas"] = "auto"
    dataset: Literal["digits", "fashion_mnist"] = "digits"

    def __post_init__(self) -> None:
        check_field_types(self)
        check(
            isinstance(self.shape, tuple)
            and len(self.shape) >= 1
            and all(isinstance(s, int) and s > 0 for s in self.shape),
            "shape",
            f"must be a non-empty tuple of positive ints, got {self.shape!r}",
        )
        check_positive(self, "channels", "levels", "d_model", "num_heads", "num_kv_heads")
        check_positive(self, "head_dim", "mlp_dim", "outer_layers", "inner_layers")
        check_positive(self, "channel_layers")
        check(self.levels >= 2, "levels", f"must be >= 2, got {self.levels}")
        check(
            self.num_heads % self.num_kv_heads == 0,
            "num_kv_heads",
            f"must divide num_heads={self.num_heads}, got {self.num_kv_heads}",
        )
        check(self.head_dim % 2 == 0, "head_dim", f"must be even for RoPE, got {self.head_dim}")
        check(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
        check(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps}")
        check(self.dtype in DTYPES, "dtype", f"must be one of {list(DTYPES)}, got {self.dtype!r}")
        check(
            self.attention_impl in IMPLS,
            "attention_impl",
            f"must be one of {list(IMPLS)}, got {self.attention_impl!r}",
        )
        check(
            self.dataset in IMAGE_DATASETS,
            "dataset",
            f"must be one of {list(IMAGE_DATASETS)}, got {self.dataset!r}",
        )

    @property
    def compute_dtype(self) -> jnp.dtype:
        return DTYPES[self.dtype]

    @property
    def num_dims(self) -> int:
        """Subpixels per example: ``prod(shape) * channels`` (the "dims" of bits/dim)."""
        return math.prod(self.shape) * self.channels


PRESETS: dict[str, AxialConfig] = {
    "tiny": AxialConfig(
        shape=(8, 8), d_model=64, num_heads=4, num_kv_heads=4, head_dim=16, mlp_dim=192,
        outer_layers=1, inner_layers=2, dataset="digits",
    ),
    "small": AxialConfig(
        shape=(28, 28), d_model=128, num_heads=4, num_kv_heads=4, head_dim=32, mlp_dim=384,
        outer_layers=2, inner_layers=2, dataset="fashion_mnist",
    ),
}  # fmt: skip


def shift(x: jax.Array, axis: int) -> jax.Array:
    """Move ``x [batch, *spatial, d]`` one step later along spatial ``axis`` (zeros first)."""
    a = 1 + axis
    pad = [(0, 0)] * x.ndim
    pad[a] = (1, 0)
    return jax.lax.slice_in_dim(jnp.pad(x, pad), 0, x.shape[a], axis=a)


def earlier_channels(emb: jax.Array) -> jax.Array:
    """Exclusive sum over channels: ``[..., channels, d]`` -> for each channel the sum of the
    channels before it (zeros for the first). Not ``cumsum - emb``: that leaks by rounding."""
    earlier = jnp.cumsum(emb[..., :-1, :], axis=-2)
    return jnp.concatenate([jnp.zeros_like(emb[..., :1, :]), earlier], axis=-2)


def check_images(tokens: jax.Array, config: AxialConfig, name: str = "inputs") -> None:
    """Shape/dtype checks at trace time, before compilation."""
    want = (*config.shape, config.channels)
    if tokens.ndim != len(want) + 1 or tuple(tokens.shape[1:]) != want:
        raise ValueError(
            f"{name} must be [batch, *shape, channels] = [batch, {', '.join(map(str, want))}], "
            f"got shape {tokens.shape}"
        )
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer subpixel values, got dtype {tokens.dtype}")


class AxialBlock(nn.Module):
    """Pre-norm residual block: axial attention along spatial ``axis`` (masked if ``causal``),
    then a SwiGLU MLP (the paper's axial-attention transformer block, sec. 4).

    x ``[batch, *spatial, d_model]``. In ``prefill``/``decode`` a causal block keeps the K/V of
    its axis in the ``cache`` collection (``decode``: the slice at ``cache_index`` along
    ``axis``, which must have length 1); unmasked blocks always see their whole input.
    """

    config: AxialConfig
    axis: int
    causal: bool

    @nn.compact
    def __call__(
        self, x: jax.Array, *, mode: Mode = "train", cache_index: jax.Array | None = None
    ) -> jax.Array:
        c = self.config
        mode = mode if self.causal else "train"
        h = RMSNorm(c.norm_eps, name="attn_norm")(x)
        hf, unfold = fold_axis(h, self.axis)  # [batch * others, len, d_model]
        cache_len = c.shape[self.axis]
        visible = None
        if mode == "decode":
            positions = jnp.full(hf.shape[:2], cache_index, jnp.int32)
            visible = jnp.broadcast_to(jnp.arange(cache_len) <= cache_index, (len(hf), cache_len))
        else:
            positions = jnp.broadcast_to(jnp.arange(hf.shape[1]), hf.shape[:2])
        out = Attention(
            num_heads=c.num_heads,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            rope_theta=c.rope_theta,
            rope_scaling=c.rope_scaling,
            causal=self.causal,
            dtype=c.compute_dtype,
            impl=c.attention_impl,
            name="attn",
        )(
            hf,
            q_positions=positions,
            mode=mode,
            cache_len=cache_len,
            cache_index=cache_index,
            kv_visible=visible,
        )
        x = x + unfold(out).astype(x.dtype)
        h = RMSNorm(c.norm_eps, name="mlp_norm")(x)
        return x + SwiGLU(c.mlp_dim, dtype=c.compute_dtype, name="mlp")(h).astype(x.dtype)


class AxialStack(nn.Module):
    """``num_layers`` x (unmasked blocks along ``unmasked`` axes, then a masked block along
    ``masked`` if not None), then RMSNorm."""

    config: AxialConfig
    num_layers: int
    unmasked: tuple[int, ...]
    masked: int | None

    @nn.compact
    def __call__(
        self, x: jax.Array, *, mode: Mode = "train", cache_index: jax.Array | None = None
    ) -> jax.Array:
        c = self.config
        for layer in range(self.num_layers):
            for axis in self.unmasked:
                x = AxialBlock(c, axis, False, name=f"layer{layer}_axis{axis}")(x)
            if self.masked is not None:
                x = AxialBlock(c, self.masked, True, name=f"layer{layer}_masked{self.masked}")(
                    x, mode=mode, cache_index=cache_index
                )
        return RMSNorm(c.norm_eps, name="norm")(x)


class AxialTransformer(nn.Module):
    """``__call__(batch)`` -> float32 logits ``[batch, *shape, channels, levels]``.

    The methods below ``__call__`` are the pieces the semi-parallel sampler runs; each takes
    and returns activations ``[batch, *spatial, d_model]`` over one slice (axes before the
    sliced one have length 1).
    """

    config: AxialConfig

    def setup(self) -> None:
        c = self.config
        n = len(c.shape)
        self.embed = nn.Embed(
            c.channels * c.levels,  # one table per channel
            c.d_model,
            embedding_init=logical(nn.initializers.normal(1.0), "vocab", "embed"),
            name="embed",
        )
        pos_init = logical(nn.initializers.normal(0.1), None, "embed")
        self.pos_embed = [
            self.param(f"pos_axis{j}", pos_init, (size, c.d_model))
            for j, size in enumerate(c.shape)
        ]
        if c.channels > 1:
            self.channel_encoder = AxialStack(
                c, c.channel_layers, tuple(range(n)), None, name="channel_encoder"
            )
        self.outer = [
            AxialStack(c, c.outer_layers, tuple(range(k + 1, n)), k, name=f"outer{k}")
            for k in range(n - 1)
        ]
        self.inner = AxialStack(c, c.inner_layers, (), n - 1, name="inner")
        self.head = nn.Dense(
            c.levels,
            use_bias=False,
            kernel_init=logical(nn.initializers.lecun_normal(), "embed", "vocab"),
            name="head",
        )

    def __call__(self, batch: dict, *, train: bool = False) -> jax.Array:
        c = self.config
        tokens = batch["inputs"]
        check_images(tokens, c)
        emb = self.embed_channels(tokens)  # [batch, *shape, channels, d_model]
        e = rearrange(emb, "b ... c d -> (b c) ... d")  # every channel slice in parallel
        earlier = rearrange(earlier_channels(emb), "b ... c d -> (b c) ... d")
        ctx = self.slice_context(earlier)  # [(batch channels), *shape, d_model]
        for k in range(len(c.shape) - 1):
            ctx = shift(self.outer[k](e + ctx), k) + ctx
        logits = self.logits(self.inner(shift(e, len(c.shape) - 1) + ctx))
        return rearrange(logits, "(b c) ... v -> b ... c v", c=c.channels)

    def embed_channels(self, tokens: jax.Array) -> jax.Array:
        """``[batch, *spatial, channels]`` values -> ``[batch, *spatial, channels, d_model]``."""
        c = self.config
        offsets = jnp.arange(tokens.shape[-1], dtype=jnp.int32) * c.levels
        return self.embed(tokens.astype(jnp.int32) + offsets).astype(c.compute_dtype)

    def embed_slice(self, tokens: jax.Array, channel: int) -> jax.Array:
        """Values of one channel ``[batch, *spatial]`` -> ``[batch, *spatial, d_model]``."""
        c = self.config
        return self.embed(tokens.astype(jnp.int32) + channel * c.levels).astype(c.compute_dtype)

    def slice_context(self, earlier: jax.Array) -> jax.Array:
        """What every position of a channel slice may see (``ctx_0``): the axial position
        embeddings plus the channel encoder over ``earlier`` ``[batch, *shape, d_model]``, the
        summed embeddings of the channels before it (sec. 4; zeros for the first)."""
        c = self.config
        pos = sum(
            jnp.expand_dims(p, [i for i in range(len(c.shape)) if i != j])
            for j, p in enumerate(self.pos_embed)
        ).astype(c.compute_dtype)  # [*shape, d_model]
        if c.channels == 1:
            return jnp.broadcast_to(pos, earlier.shape)
        return self.channel_encoder(earlier) + pos

    def logits(self, h: jax.Array) -> jax.Array:
        return self.head(h).astype(jnp.float32)

    def outer_step(self, k: int, x: jax.Array, index: jax.Array) -> jax.Array:
        """Outer decoder ``k`` on one new slice along axis ``k`` (input ``e + ctx_k`` at
        ``index``; length 1 on axes ``<= k``), using/updating its caches."""
        return self.outer[k](x, mode="decode", cache_index=index)

    def inner_step(self, x: jax.Array, index: jax.Array) -> jax.Array:
        """Inner decoder on one pixel (input ``shift(e) + ctx``, all axes length 1) at
        ``index`` along the last axis -> logits ``[batch, levels]``."""
        h = self.inner(x, mode="decode", cache_index=index)
        return self.logits(h).reshape(x.shape[0], -1)

    def init_cache(self, batch_size: int) -> None:
        """Create the ``cache`` collection for sampling ``batch_size`` tensors (zero inputs;
        callers keep only the shapes)."""
        c = self.config
        n = len(c.shape)
        for k in range(n):
            x = jnp.zeros((batch_size, *(1,) * k, *c.shape[k:], c.d_model), c.compute_dtype)
            stack = self.inner if k == n - 1 else self.outer[k]
            stack(x, mode="prefill")


register_model(
    ModelSpec(
        "axial",
        AxialConfig,
        AxialTransformer,
        PRESETS,
        data="images",
        decoder="arjax.generate.axial:AxialDecoder",
    )
)
