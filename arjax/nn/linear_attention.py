"""Linear-attention token mixers: BASED, decay (RetNet / Lightning), GLA, Aaren and the
delta rule (Gated DeltaNet, DeltaNet).

Each mixer maps ``x [batch, len, d_model] -> [batch, len, d_model]`` in three modes, like
:class:`arjax.nn.layers.Attention`: ``"train"`` (chunked form over the sequence),
``"prefill"`` (same, and stores the final recurrent state in the ``cache`` collection) and
``"decode"`` (one token, O(1) state update, memory independent of the context length).
:data:`MixerConfig` (one config class per kind) selects one as the token mixer of
:class:`arjax.nn.Transformer`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from arjax.config import check, check_field_types, check_positive, tagged_union_members
from arjax.nn.layers import NO_ROPE_SCALING, Mode, RMSNorm, RopeScaling, apply_rope, logical
from arjax.ops import (
    aaren,
    aaren_step,
    attention,
    decode_attention,
    gated_delta_rule,
    gated_delta_step,
    linear_attention,
    linear_attention_step,
)
from arjax.ops.aaren import AarenState
from arjax.ops.linear_attention.common import IMPLS, document_index


@dataclasses.dataclass(frozen=True)
class AttentionMixerConfig:
    """Softmax attention (:class:`arjax.nn.layers.Attention`); its settings are the stack's
    (``TransformerConfig.num_kv_heads``, ``window``, ``qk_norm``, ``attention_impl``)."""

    kind: Literal["attention"] = "attention"

    def __post_init__(self) -> None:
        check_field_types(self)


@dataclasses.dataclass(frozen=True)
class _ChunkedConfig:
    """``chunk_size``/``impl``: the chunked linear-attention op
    (:func:`arjax.ops.linear_attention`)."""

    chunk_size: int = 64
    impl: Literal["auto", "xla", "pallas"] = "auto"

    def __post_init__(self) -> None:
        check_field_types(self)
        check_positive(self, "chunk_size")
        check(self.impl in IMPLS, "impl", f"must be one of {list(IMPLS)}, got {self.impl!r}")


@dataclasses.dataclass(frozen=True)
class BasedConfig(_ChunkedConfig):
    """BASED: ``feature_dim`` q/k dim before the Taylor map (state ``1 + d + d^2`` per head),
    ``window`` sliding-window attention width, ``conv_size`` short causal convolution."""

    kind: Literal["based"] = "based"
    feature_dim: int = 16
    window: int = 64
    conv_size: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "feature_dim", "window", "conv_size")


@dataclasses.dataclass(frozen=True)
class GLAConfig(_ChunkedConfig):
    """GLA: ``gate_rank`` of the low-rank gate projection."""

    kind: Literal["gla"] = "gla"
    gate_rank: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "gate_rank")


@dataclasses.dataclass(frozen=True)
class RetNetConfig(_ChunkedConfig):
    """RetNet-style fixed per-head decay."""

    kind: Literal["retnet"] = "retnet"


@dataclasses.dataclass(frozen=True)
class _DeltaRuleConfig(_ChunkedConfig):
    """The delta rule: ``conv_size`` of the short causal convolutions of q, k and v;
    ``chunk_size``/``impl`` of :func:`arjax.ops.gated_delta_rule`."""

    conv_size: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "conv_size")


@dataclasses.dataclass(frozen=True)
class GatedDeltaNetConfig(_DeltaRuleConfig):
    """Gated DeltaNet (decay and delta rule)."""

    kind: Literal["gdn"] = "gdn"


@dataclasses.dataclass(frozen=True)
class DeltaNetConfig(_DeltaRuleConfig):
    """DeltaNet (delta rule, no decay)."""

    kind: Literal["deltanet"] = "deltanet"


@dataclasses.dataclass(frozen=True)
class AarenConfig:
    """Aaren: no settings beyond the stack's heads."""

    kind: Literal["aaren"] = "aaren"

    def __post_init__(self) -> None:
        check_field_types(self)


# The token mixer of a transformer block: a tagged union on ``kind``, each kind with only the
# fields it uses (``--set model.mixer.kind=gla`` switches the class, see arjax.config).
MixerConfig = (
    AttentionMixerConfig
    | BasedConfig
    | GLAConfig
    | RetNetConfig
    | AarenConfig
    | GatedDeltaNetConfig
    | DeltaNetConfig
)
MIXER_CONFIGS: dict[str, type] = tagged_union_members(MixerConfig)
MIXERS = tuple(MIXER_CONFIGS)


def mixer_config(kind: str = "attention", **fields: Any) -> MixerConfig:
    """The config of mixer ``kind`` with ``fields``; a field that kind does not use is a
    :class:`ConfigError` naming it."""
    check(kind in MIXER_CONFIGS, "kind", f"must be one of {list(MIXERS)}, got {kind!r}")
    cls = MIXER_CONFIGS[kind]
    known = [f.name for f in dataclasses.fields(cls) if f.name != "kind"]
    unused = sorted(set(fields) - set(known))
    check(
        not unused,
        "mixer",
        f"kind {kind!r} does not use {', '.join(unused)} "
        f"(its fields: {', '.join(known) or 'none'})",
    )
    return cls(**fields)


def _heads(x: jax.Array, heads: int, dim: int, dtype: Any, name: str) -> jax.Array:
    """``[batch, len, embed] -> [batch, len, heads, dim]``."""
    return nn.DenseGeneral(
        (heads, dim), use_bias=False, dtype=dtype,
        kernel_init=logical(nn.initializers.lecun_normal(), "embed", "heads", "head_dim"),
        name=name,
    )(x)  # fmt: skip


def _merge_heads(x: jax.Array, d_model: int, dtype: Any, name: str) -> jax.Array:
    """``[batch, len, heads, dim] -> [batch, len, d_model]``."""
    return nn.DenseGeneral(
        d_model, axis=(-2, -1), use_bias=False, dtype=dtype,
        kernel_init=logical(nn.initializers.lecun_normal(), "heads", "head_dim", "embed"),
        name=name,
    )(x)  # fmt: skip


def _gated_output(out: jax.Array, x: jax.Array, heads: int, dim: int, dtype: Any) -> jax.Array:
    """Per-head RMSNorm of ``out [batch, len, heads, dim]`` times ``SiLU(W_g x)``, then the
    output projection (submodules ``head_norm``, ``g``, ``o_proj`` of the calling mixer)."""
    out = RMSNorm(axis_name="head_dim", name="head_norm")(out.astype(dtype))
    out = out * nn.silu(_heads(x, heads, dim, dtype, "g"))
    return _merge_heads(out, x.shape[-1], dtype, "o_proj")


def _check_decode(x: jax.Array, who: str) -> None:
    if x.shape[1] != 1:
        raise ValueError(f"{who}: decode takes one token at a time, got len {x.shape[1]}")


def _recurrent_mix(
    module: nn.Module,
    q: jax.Array,  # [batch, len, heads, dk]
    k: jax.Array,
    v: jax.Array,  # [batch, len, heads, dv]
    *,
    log_decay: jax.Array | None,
    segment_ids: jax.Array | None,
    mode: Mode,
    chunk_size: int,
    impl: str,
    beta: jax.Array | None = None,  # [batch, len, heads]: the delta rule instead
) -> jax.Array:
    """Linear attention (or, given ``beta``, the gated delta rule) in ``mode``; the state
    ``[batch, heads, dk, dv]`` lives in ``cache``."""
    if mode == "decode":
        _check_decode(q, type(module).__name__)
        state = module.get_variable("cache", "state")
        decay = None if log_decay is None else log_decay[:, 0]
        if beta is None:
            out, state = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], state, log_decay=decay)
        else:
            out, state = gated_delta_step(
                q[:, 0], k[:, 0], v[:, 0], beta[:, 0], state, log_decay=decay
            )
        module.put_variable("cache", "state", state)
        return out[:, None]
    args = dict(log_decay=log_decay, segment_ids=segment_ids, form="chunked",
                chunk_size=chunk_size, impl=impl)  # fmt: skip
    if beta is None:
        out, state = linear_attention(q, k, v, **args)
    else:
        out, state = gated_delta_rule(q, k, v, beta, **args)
    if mode == "prefill":
        module.put_variable("cache", "state", state)
    return out


class ShortConv(nn.Module):
    """Depthwise causal convolution over ``kernel_size`` tokens, within documents.

    Decoding keeps the last ``kernel_size - 1`` inputs in ``cache`` (``conv``).
    """

    kernel_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, *, segment_ids: jax.Array | None = None, mode: Mode = "train"
    ) -> jax.Array:
        b, length, d = x.shape
        w = self.param(
            "kernel", logical(nn.initializers.normal(self.kernel_size**-0.5), None, "embed"),
            (self.kernel_size, d),
        )  # fmt: skip
        w = w.astype(self.dtype)  # w[j] weighs x_{t-j}
        if mode == "decode":
            _check_decode(x, "ShortConv")
            past = self.get_variable("cache", "conv")  # [b, kernel - 1, d], oldest first
            window = jnp.concatenate([past, x.astype(past.dtype)], axis=1)  # [b, kernel, d]
            self.put_variable("cache", "conv", window[:, 1:])
            return jnp.einsum("bkd,kd->bd", window, w[::-1])[:, None].astype(self.dtype)
        doc = document_index(segment_ids, b, length)
        out = jnp.zeros_like(x, dtype=self.dtype)
        for j in range(self.kernel_size):
            shifted = jnp.pad(x, ((0, 0), (j, 0), (0, 0)))[:, :length]
            same = doc == jnp.pad(doc, ((0, 0), (j, 0)), constant_values=-1)[:, :length]
            out += jnp.where(same[..., None], shifted, 0) * w[j]
        if mode == "prefill":
            keep = self.kernel_size - 1
            tail = jnp.where((doc == doc[:, -1:])[..., None], x, 0)[:, -keep:]
            self.put_variable(
                "cache", "conv", jnp.pad(tail, ((0, 0), (keep - tail.shape[1], 0), (0, 0)))
            )
        return out


class SlidingWindowAttention(nn.Module):
    """Exact softmax attention over the last ``window`` tokens (RoPE), within documents.

    Decoding keeps a ring buffer of ``window`` keys/values (``cache``: ``k``, ``v``,
    ``valid``, ``index``), so memory is constant in the context length.
    """

    num_heads: int
    head_dim: int
    window: int
    rope_theta: float = 10_000.0
    dtype: Any = jnp.float32
    impl: str = "auto"
    rope_scaling: RopeScaling = RopeScaling()

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [batch, len, embed]
        *,
        positions: jax.Array,  # [batch, len]
        segment_ids: jax.Array | None = None,
        mode: Mode = "train",
    ) -> jax.Array:
        b, length, _ = x.shape
        q, k, v = (_heads(x, self.num_heads, self.head_dim, self.dtype, n) for n in "qkv")
        q = apply_rope(q, positions, self.rope_theta, self.rope_scaling)
        k = apply_rope(k, positions, self.rope_theta, self.rope_scaling)
        if mode == "decode":
            _check_decode(x, "SlidingWindowAttention")
            index = self.get_variable("cache", "index")
            slot = lambda cache, new: jax.lax.dynamic_update_slice_in_dim(cache, new, index, 1)  # noqa: E731
            ks = slot(self.get_variable("cache", "k"), k.astype(jnp.float32))
            vs = slot(self.get_variable("cache", "v"), v.astype(jnp.float32))
            valid = slot(self.get_variable("cache", "valid"), jnp.ones((b, 1), bool))
            for name, value in (("k", ks), ("v", vs), ("valid", valid)):
                self.put_variable("cache", name, value)
            self.put_variable("cache", "index", (index + 1) % self.window)
            # auto: XLA, which a GPU diagnostic found faster on this few-slot ring than the
            # flash-decoding kernel (experiments/results/linear_decode.md)
            impl = "xla" if self.impl == "auto" else self.impl
            out = decode_attention(
                q, ks.astype(q.dtype), vs.astype(q.dtype), kv_visible=valid, impl=impl
            )
        else:
            out = attention(
                q, k, v, causal=True, window=self.window, q_segment_ids=segment_ids,
                kv_segment_ids=segment_ids, impl=self.impl,
            )  # fmt: skip
            if mode == "prefill":  # ring holds the last `window` tokens, oldest at slot 0
                doc = document_index(segment_ids, b, length)
                pad = max(self.window - length, 0)
                tail = (
                    lambda a: jnp.pad(  # noqa: E731
                        a[:, -self.window :], ((0, 0), (pad, 0)) + ((0, 0),) * (a.ndim - 2)
                    )
                )
                self.put_variable("cache", "k", tail(k.astype(jnp.float32)))
                self.put_variable("cache", "v", tail(v.astype(jnp.float32)))
                self.put_variable("cache", "valid", tail(doc == doc[:, -1:]))
                self.put_variable("cache", "index", jnp.zeros((), jnp.int32))
        return _merge_heads(out, x.shape[-1], self.dtype, "o_proj")


def taylor_features(x: jax.Array) -> jax.Array:
    """2nd-order Taylor map of exp: ``phi(q) . phi(k) = 1 + q.k + (q.k)^2 / 2``.

    Arora et al. 2024 (BASED), sec. 4.1. ``[..., d] -> [..., 1 + d + d^2]``.
    """
    outer = rearrange(x[..., :, None] * x[..., None, :], "... i j -> ... (i j)")
    return jnp.concatenate([jnp.ones_like(x[..., :1]), x, outer * math.sqrt(0.5)], axis=-1)


class BasedMixer(nn.Module):
    """BASED (Arora et al. 2024, sec. 4): Taylor linear attention over a short causal
    convolution of the input, plus exact sliding-window attention; the branches are summed."""

    num_heads: int
    head_dim: int
    config: BasedConfig
    rope_theta: float = 10_000.0
    dtype: Any = jnp.float32
    rope_scaling: RopeScaling = RopeScaling()

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        mode: Mode = "train",
    ) -> jax.Array:
        c = self.config
        xc = ShortConv(c.conv_size, dtype=self.dtype, name="conv")(
            x, segment_ids=segment_ids, mode=mode
        )
        scale = c.feature_dim**-0.25  # phi(q).phi(k) then expands exp(q.k / sqrt(d))
        q = taylor_features(_heads(xc, self.num_heads, c.feature_dim, self.dtype, "q") * scale)
        k = taylor_features(_heads(xc, self.num_heads, c.feature_dim, self.dtype, "k") * scale)
        v = _heads(xc, self.num_heads, self.head_dim, self.dtype, "v")
        v1 = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)  # last column: normaliser
        out = _recurrent_mix(
            self, q, k, v1, log_decay=None, segment_ids=segment_ids, mode=mode,
            chunk_size=c.chunk_size, impl=c.impl,
        )  # fmt: skip
        out = out[..., :-1] / (out[..., -1:] + 1e-6)  # 1 + x + x^2/2 >= 1/2: positive weights
        linear = _merge_heads(out.astype(self.dtype), x.shape[-1], self.dtype, "o_proj")
        local = SlidingWindowAttention(
            self.num_heads, self.head_dim, c.window, self.rope_theta, self.dtype, c.impl,
            rope_scaling=self.rope_scaling, name="window_attn",
        )(x, positions=positions, segment_ids=segment_ids, mode=mode)  # fmt: skip
        return linear + local


class DecayLinearAttention(nn.Module):
    """Linear attention with decay, output RMSNorm per head and a SiLU output gate.

    ``gated=False``: fixed per-head scalar decay ``1 - 2^(-5-h)`` (RetNet, Sun et al. 2023,
    sec. 2.2; Lightning attention, Qin et al. 2024). ``gated=True``: data-dependent
    per-key-dim gate ``log_sigmoid(W2 W1 x + b) / 16`` (GLA, Yang et al. 2024, sec. 4.4).
    """

    num_heads: int
    head_dim: int
    config: GLAConfig | RetNetConfig
    gated: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        mode: Mode = "train",
    ) -> jax.Array:
        del positions  # position enters through the decay
        c, h, d = self.config, self.num_heads, self.head_dim
        q = _heads(x, h, d, self.dtype, "q") * d**-0.5
        k = _heads(x, h, d, self.dtype, "k")
        v = _heads(x, h, d, self.dtype, "v")
        if self.gated:
            low = nn.Dense(
                c.gate_rank, use_bias=False, dtype=self.dtype,
                kernel_init=logical(nn.initializers.lecun_normal(), "embed", None), name="gate_a",
            )(x)  # fmt: skip
            gate = nn.DenseGeneral(
                (h, d), dtype=self.dtype,
                kernel_init=logical(nn.initializers.lecun_normal(), None, "heads", "head_dim"),
                bias_init=logical(nn.initializers.constant(4.0), "heads", "head_dim"),
                name="gate_b",
            )(low)  # fmt: skip
            log_decay = jax.nn.log_sigmoid(gate.astype(jnp.float32)) / 16.0  # [b, len, h, d]
        else:
            gamma = 1.0 - 2.0 ** (-5.0 - jnp.arange(h, dtype=jnp.float32))
            log_decay = jnp.broadcast_to(jnp.log(gamma), x.shape[:2] + (h,))  # [b, len, h]
        out = _recurrent_mix(
            self, q, k, v, log_decay=log_decay, segment_ids=segment_ids, mode=mode,
            chunk_size=c.chunk_size, impl=c.impl,
        )  # fmt: skip
        return _gated_output(out, x, h, d, self.dtype)


def _inverse_softplus(x: jax.Array) -> jax.Array:
    return x + jnp.log(-jnp.expm1(-x))


def _dt_bias_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """Mamba2's time-step bias: ``softplus(bias)`` log-uniform in [1e-3, 0.1] (Dao & Gu 2024)."""
    lo, hi = math.log(1e-3), math.log(0.1)
    dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32, lo, hi))
    return _inverse_softplus(jnp.maximum(dt, 1e-4)).astype(dtype)


def _a_log_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """``log A`` with ``A`` uniform in [1, 16] per head (Mamba2's range)."""
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)


class DeltaRuleMixer(nn.Module):
    """Gated DeltaNet (``gated=True``; Yang, Kautz, Hatamizadeh 2025, sec. 3.4 and fig. 1) or
    DeltaNet (``gated=False``; Yang et al. 2024, sec. 4) token mixer.

    q, k, v: projections, each through a short causal depthwise convolution and SiLU; q and k
    L2-normalised per head, q scaled by ``head_dim^-0.5``; ``beta = sigmoid(W_b x)``;
    Gated DeltaNet's decay ``log a_t = -exp(A_log) * softplus(W_a x + dt_bias)`` per head
    (Mamba2's parameterisation, Dao & Gu 2024); the op :func:`arjax.ops.gated_delta_rule`;
    per-head RMSNorm of the output times ``SiLU(W_g x)``, then the output projection.
    Decoding keeps the ``[heads, dk, dv]`` state and each convolution's last inputs.
    """

    num_heads: int
    head_dim: int
    config: GatedDeltaNetConfig | DeltaNetConfig
    gated: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [batch, len, embed]
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        mode: Mode = "train",
    ) -> jax.Array:
        del positions  # order enters through the convolution, the recurrence and the decay
        c, h, d = self.config, self.num_heads, self.head_dim

        def conv_heads(name: str) -> jax.Array:  # [batch, len, heads, head_dim]
            y = rearrange(_heads(x, h, d, self.dtype, name), "b l h d -> b l (h d)")
            y = ShortConv(c.conv_size, dtype=self.dtype, name=f"conv_{name}")(
                y, segment_ids=segment_ids, mode=mode
            )
            return rearrange(nn.silu(y), "b l (h d) -> b l h d", h=h)

        def l2norm(y: jax.Array) -> jax.Array:
            y = y.astype(jnp.float32)
            return y * jax.lax.rsqrt(jnp.sum(y * y, axis=-1, keepdims=True) + 1e-6)

        def per_head(name: str, **kw: Any) -> jax.Array:  # [batch, len, heads] float32
            return nn.DenseGeneral(
                h, dtype=self.dtype, name=name,
                kernel_init=logical(nn.initializers.lecun_normal(), "embed", "heads"), **kw,
            )(x).astype(jnp.float32)  # fmt: skip

        q = (l2norm(conv_heads("q")) * d**-0.5).astype(self.dtype)
        k = l2norm(conv_heads("k")).astype(self.dtype)
        v = conv_heads("v")
        beta = jax.nn.sigmoid(per_head("beta", use_bias=False))
        log_decay = None
        if self.gated:
            a_log = self.param("a_log", logical(_a_log_init, "heads"), (h,))
            dt_bias = self.param("dt_bias", logical(_dt_bias_init, "heads"), (h,))
            dt = jax.nn.softplus(per_head("alpha", use_bias=False) + dt_bias)
            log_decay = -jnp.exp(a_log) * dt  # [b, len, h] <= 0
        out = _recurrent_mix(
            self, q, k, v, beta=beta, log_decay=log_decay, segment_ids=segment_ids, mode=mode,
            chunk_size=c.chunk_size, impl=c.impl,
        )  # fmt: skip
        return _gated_output(out, x, h, d, self.dtype)


class AarenMixer(nn.Module):
    """Aaren (Feng et al. 2024, sec. 3.3): a learned query per head attends (softmax) over
    every prefix of the keys, via the prefix scan of :func:`arjax.ops.aaren`."""

    num_heads: int
    head_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        mode: Mode = "train",
    ) -> jax.Array:
        del positions
        h, d = self.num_heads, self.head_dim
        query = self.param(
            "query", logical(nn.initializers.normal(1.0), "heads", "head_dim"), (h, d)
        )
        k = _heads(x, h, d, self.dtype, "k")
        v = _heads(x, h, d, self.dtype, "v")
        scores = jnp.einsum("blhd,hd->blh", k, query.astype(self.dtype)) * d**-0.5
        if mode == "decode":
            _check_decode(x, "AarenMixer")
            state = AarenState(*(self.get_variable("cache", n) for n in AarenState._fields))
            out, state = aaren_step(scores[:, 0], v[:, 0], state)
            out = out[:, None]
        else:
            out, state = aaren(scores, v, segment_ids=segment_ids)
        if mode != "train":
            for name, value in zip(AarenState._fields, state):
                self.put_variable("cache", name, value)
        return _merge_heads(out, x.shape[-1], self.dtype, "o_proj")


def make_mixer(
    config: MixerConfig,
    *,
    num_heads: int,
    head_dim: int,
    rope_theta: float,
    dtype: Any,
    name: str,
    rope_scaling: RopeScaling = NO_ROPE_SCALING,
) -> nn.Module:
    """The mixer module for a linear ``config.kind`` (called with ``x, positions=,
    segment_ids=, mode=``)."""
    kind = config.kind
    if kind == "based":
        return BasedMixer(
            num_heads, head_dim, config, rope_theta, dtype, rope_scaling=rope_scaling, name=name
        )
    if kind in ("gla", "retnet"):
        return DecayLinearAttention(num_heads, head_dim, config, kind == "gla", dtype, name=name)
    if kind == "aaren":
        return AarenMixer(num_heads, head_dim, dtype, name=name)
    if kind in ("gdn", "deltanet"):
        return DeltaRuleMixer(num_heads, head_dim, config, kind == "gdn", dtype, name=name)
    raise ValueError(f"make_mixer: {kind!r} is not a linear mixer (one of {MIXERS[1:]})")


__all__ = [
    "MIXERS",
    "AarenConfig",
    "AarenMixer",
    "AttentionMixerConfig",
    "BasedConfig",
    "DeltaNetConfig",
    "GatedDeltaNetConfig",
    "GLAConfig",
    "RetNetConfig",
    "mixer_config",
    "BasedMixer",
    "DecayLinearAttention",
    "DeltaRuleMixer",
    "MixerConfig",
    "ShortConv",
    "SlidingWindowAttention",
    "make_mixer",
    "taylor_features",
]
