"""Flax Linen building blocks: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Parameters are float32 and carry logical axis names (``vocab``, ``embed``, ``heads``,
``kv_heads``, ``head_dim``, ``mlp``) that :mod:`arjax.train.sharding` maps onto the mesh.
Compute runs in ``dtype`` (bf16 by default in the models).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from arjax.config import check, check_field_types
from arjax.nn.partitioning import constrain, logical
from arjax.ops import attention, decode_attention

Mode = Literal["train", "prefill", "decode"]


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019), computed in float32."""

    eps: float = 1e-6
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", logical(nn.initializers.ones, self.axis_name), x.shape[-1:])
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * scale).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 RoPE frequency rescaling (Meta's ``rope_type: "llama3"``).

    A frequency whose wavelength ``2 pi / f`` exceeds ``original_max_position_embeddings /
    low_freq_factor`` is divided by ``factor``; one whose wavelength is below
    ``original_max_position_embeddings / high_freq_factor`` is kept; in between the two are
    blended linearly in ``original_max_position_embeddings / wavelength``. ``factor`` 1 (the
    default) leaves every frequency unchanged.
    """

    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        check_field_types(self)
        check(self.factor >= 1.0, "rope_scaling.factor", f"must be >= 1, got {self.factor}")
        check(
            0 < self.low_freq_factor < self.high_freq_factor,
            "rope_scaling.high_freq_factor",
            f"must exceed low_freq_factor={self.low_freq_factor} > 0, got {self.high_freq_factor}",
        )
        check(
            self.original_max_position_embeddings > 0,
            "rope_scaling.original_max_position_embeddings",
            f"must be > 0, got {self.original_max_position_embeddings}",
        )


NO_ROPE_SCALING = RopeScaling()


def rope_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling = NO_ROPE_SCALING
) -> jax.Array:
    """Rotation frequencies ``[head_dim / 2]`` (float32): ``theta ** (-2i / head_dim)``,
    rescaled by ``scaling`` (:class:`RopeScaling`)."""
    freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if scaling == NO_ROPE_SCALING:
        return freq
    ctx = scaling.original_max_position_embeddings
    ratio = ctx * freq / (2 * jnp.pi)  # original context / wavelength
    blend = (ratio - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blend = jnp.clip(blend, 0.0, 1.0)  # 0: long wavelengths, 1: short ones
    return (1.0 - blend) * freq / scaling.factor + blend * freq


def apply_rope(
    x: jax.Array, positions: jax.Array, theta: float, scaling: RopeScaling = NO_ROPE_SCALING
) -> jax.Array:
    """Rotary position embedding (Su et al. 2021, eq. 34), half-split pairing.

    x ``[batch, len, heads, head_dim]``, positions ``[batch, len]`` int; frequencies from
    :func:`rope_frequencies`.
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"apply_rope: head_dim must be even, got {d}")
    freq = rope_frequencies(d, theta, scaling)  # [d/2]
    angle = positions.astype(jnp.float32)[..., None, None] * freq  # [b, l, 1, d/2]
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def head_projection(
    num_heads: int, head_dim: int, heads_axis: str, dtype: Any, name: str
) -> nn.DenseGeneral:
    """``[..., embed] -> [..., num_heads, head_dim]`` (attention q/k/v projections)."""
    return nn.DenseGeneral(
        (num_heads, head_dim),
        use_bias=False,
        dtype=dtype,
        kernel_init=logical(nn.initializers.lecun_normal(), "embed", heads_axis, "head_dim"),
        name=name,
    )


def output_projection(features: int, dtype: Any, name: str) -> nn.DenseGeneral:
    """``[..., heads, head_dim] -> [..., features]`` (attention output projection)."""
    return nn.DenseGeneral(
        features,
        axis=(-2, -1),
        use_bias=False,
        dtype=dtype,
        kernel_init=logical(nn.initializers.lecun_normal(), "heads", "head_dim", "embed"),
        name=name,
    )


class Attention(nn.Module):
    """Multi-head attention with GQA, RoPE, optional qk RMSNorm and a KV cache.

    Self-attention when ``kv`` is None, cross-attention otherwise. ``mode``:
    ``"train"`` attends over the given sequence; ``"prefill"`` does the same and stores
    K/V in the ``cache`` collection (length ``cache_len``); ``"decode"`` writes one new
    token's K/V at ``cache_index`` (a scalar slot for every row, or ``[batch]`` slots, each
    clipped into ``[0, cache_len)``: a row that must not write is pointed at a slot no query
    sees, as HAT's decoder points them at each cache's last) and attends over the cache slots
    that ``kv_visible`` ``[batch, cache_len]`` marks.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float | None = 10_000.0
    rope_scaling: RopeScaling = RopeScaling()
    window: int | None = None
    causal: bool = True
    qk_norm: bool = False
    qk_norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [batch, q_len, embed]
        kv: jax.Array | None = None,  # [batch, kv_len, embed_kv] (cross-attention)
        *,
        q_positions: jax.Array | None = None,  # [batch, q_len]
        kv_positions: jax.Array | None = None,  # [batch, kv_len]
        q_segment_ids: jax.Array | None = None,
        kv_segment_ids: jax.Array | None = None,
        mode: Mode = "train",
        cache_len: int | None = None,
        cache_index: jax.Array | None = None,
        kv_visible: jax.Array | None = None,
    ) -> jax.Array:
        source = x if kv is None else kv
        act = lambda y: constrain(y, ("batch", "seq", "act_heads", None))  # noqa: E731
        q = act(head_projection(self.num_heads, self.head_dim, "heads", self.dtype, "q_proj")(x))
        kv_proj = lambda name: head_projection(  # noqa: E731
            self.num_kv_heads, self.head_dim, "kv_heads", self.dtype, name
        )
        k = act(kv_proj("k_proj")(source))
        v = act(kv_proj("v_proj")(source))
        if self.qk_norm:
            q = RMSNorm(self.qk_norm_eps, axis_name="head_dim", name="q_norm")(q)
            k = RMSNorm(self.qk_norm_eps, axis_name="head_dim", name="k_norm")(k)
        if self.rope_theta is not None:
            rope = lambda y, pos: apply_rope(y, pos, self.rope_theta, self.rope_scaling)  # noqa: E731
            q = rope(q, q_positions)
            k = rope(k, q_positions if kv is None else kv_positions)

        if mode == "decode":
            out = self._decode(q, k, v, cache_index, kv_visible)
        elif mode in ("train", "prefill"):
            out = attention(
                q, k, v, causal=self.causal, window=self.window,
                q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, impl=self.impl,
            )  # fmt: skip
            if mode == "prefill":
                pad = ((0, 0), (0, cache_len - k.shape[1]), (0, 0), (0, 0))
                self.put_variable("cache", "k", jnp.pad(k, pad))
                self.put_variable("cache", "v", jnp.pad(v, pad))
        else:
            raise ValueError(f"Attention: unknown mode {mode!r}")
        return output_projection(x.shape[-1], self.dtype, "o_proj")(out)

    def _decode(self, q, k, v, cache_index, kv_visible):
        """One query token against the cache; K/V of the new token written at cache_index."""
        if q.shape[1] != 1:
            raise ValueError(f"Attention: decode takes one token at a time, got {q.shape[1]}")
        caches = []
        for name, new in (("k", k), ("v", v)):
            cache = self.get_variable("cache", name)
            new = new.astype(cache.dtype)
            if jnp.ndim(cache_index) == 0:
                cache = jax.lax.dynamic_update_slice(cache, new, (0, cache_index, 0, 0))
            elif cache.shape[0] == 1:  # one row: an update slice (clamped: a clipped slot),
                # where XLA's one-row scatter kept a bounds check and a select of the old slot
                cache = jax.lax.dynamic_update_slice(cache, new, (0, cache_index[0], 0, 0))
            else:  # one slot per row
                rows = jnp.arange(cache.shape[0])
                cache = cache.at[rows, cache_index].set(new[:, 0], mode="clip")
            self.put_variable("cache", name, cache)
            caches.append(cache)
        return decode_attention(q, caches[0], caches[1], kv_visible=kv_visible, impl=self.impl)


class SwiGLU(nn.Module):
    """Gated MLP ``W2 (silu(W1 x) * W3 x)`` (Shazeer 2020, eq. 6)."""

    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.lecun_normal()
        up = lambda name: nn.Dense(  # noqa: E731
            self.hidden_dim, use_bias=False, dtype=self.dtype,
            kernel_init=logical(init, "embed", "mlp"), name=name,
        )  # fmt: skip
        h = nn.silu(up("gate_proj")(x)) * up("up_proj")(x)
        h = constrain(h, ("batch", "seq", "act_mlp"))
        return nn.Dense(
            x.shape[-1], use_bias=False, dtype=self.dtype,
            kernel_init=logical(init, "mlp", "embed"), name="down_proj",
        )(h)  # fmt: skip
