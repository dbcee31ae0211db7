"""Aaren: softmax attention of one query over every prefix, as a parallel prefix scan.

Feng et al. 2024, "Attention as an RNN", sec. 3.1-3.2: with scores ``s_i = q . k_i`` the
prefix output ``o_t = sum_{i<=t} exp(s_i) v_i / sum_{i<=t} exp(s_i)`` is the ratio of two
running sums kept relative to the running max ``m_t``; ``(m, u, w)`` triples combine
associatively, so :func:`jax.lax.associative_scan` computes all prefixes in O(log n)
depth and :func:`aaren_step` updates one token in O(1). Document boundaries
(``segment_ids`` changes) restart the sums: a segmented scan.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from einops import rearrange

from arjax.ops.linear_attention.common import document_index

HIGHEST = jax.lax.Precision.HIGHEST
EMPTY_MAX = float(jnp.finfo(jnp.float32).min)  # running max of an empty prefix (finite: no NaN)


class AarenState(NamedTuple):
    """Running softmax sums of a prefix, float32: ``o = numer / denom``."""

    max: jax.Array  # [batch, heads] running max score m
    denom: jax.Array  # [batch, heads] sum exp(s_i - m)
    numer: jax.Array  # [batch, heads, dv] sum exp(s_i - m) v_i


def aaren_init_state(batch: int, heads: int, dv: int) -> AarenState:
    """The empty prefix."""
    return AarenState(
        jnp.full((batch, heads), EMPTY_MAX, jnp.float32),
        jnp.zeros((batch, heads), jnp.float32),
        jnp.zeros((batch, heads, dv), jnp.float32),
    )


def _merge(a: AarenState, b: AarenState) -> AarenState:
    """Combine the sums of two adjacent spans (a before b), rescaled to the joint max."""
    m = jnp.maximum(a.max, b.max)
    ea, eb = jnp.exp(a.max - m), jnp.exp(b.max - m)
    return AarenState(
        m, a.denom * ea + b.denom * eb, a.numer * ea[..., None] + b.numer * eb[..., None]
    )


def _validate(scores: jax.Array, v: jax.Array, segment_ids, initial_state) -> None:
    if scores.ndim != 3 or v.ndim != 4 or v.shape[:3] != scores.shape:
        raise ValueError(
            f"aaren: scores must be [batch, len, heads] and v [batch, len, heads, dv], "
            f"got {scores.shape} and {v.shape}"
        )
    if segment_ids is not None and segment_ids.shape != scores.shape[:2]:
        raise ValueError(
            f"aaren: segment_ids must be [batch, len]={scores.shape[:2]}, got {segment_ids.shape}"
        )
    if initial_state is not None:
        b, _, h = scores.shape
        want = ((b, h), (b, h), (b, h, v.shape[3]))
        got = tuple(x.shape for x in initial_state)
        if got != want:
            raise ValueError(f"aaren: initial_state shapes must be {want}, got {got}")


def aaren(
    scores: jax.Array,  # [batch, len, heads] query-key scores (already scaled)
    v: jax.Array,  # [batch, len, heads, dv]
    *,
    segment_ids: jax.Array | None = None,  # [batch, len]
    initial_state: AarenState | None = None,
) -> tuple[jax.Array, AarenState]:
    """Prefix softmax for every position: ``(out [batch, len, heads, dv], final state)``."""
    _validate(scores, v, segment_ids, initial_state)
    b, length, h = scores.shape
    sf, vf = scores.astype(jnp.float32), v.astype(jnp.float32)
    doc = document_index(segment_ids, b, length)
    starts = doc != jnp.pad(doc, ((0, 0), (1, 0)))[:, :-1]  # [b, len] a new document here
    # Element t: the one-token span (m=s_t, u=1, w=v_t), flagged when it starts a document.
    elems = (AarenState(sf, jnp.ones_like(sf), vf), starts)

    def combine(a, b):
        (sa, fa), (sb, fb) = a, b
        merged = _merge(sa, sb)
        pick = lambda x, y: jnp.where(fb.reshape(fb.shape + (1,) * (x.ndim - fb.ndim)), y, x)  # noqa: E731
        return jax.tree.map(pick, merged, sb), fa | fb

    prefix, crossed = jax.lax.associative_scan(combine, elems, axis=1)
    if initial_state is None:
        initial_state = aaren_init_state(b, h, v.shape[3])
    # The initial state precedes the first document only.
    init = jax.tree.map(lambda x: x[:, None], initial_state)
    with_init = _merge(init, prefix)  # broadcasts over len
    keep = lambda x, y: jnp.where(crossed.reshape(crossed.shape + (1,) * (x.ndim - 2)), x, y)  # noqa: E731
    prefix = jax.tree.map(keep, prefix, with_init)
    out = prefix.numer / prefix.denom[..., None]
    final = jax.tree.map(lambda x: x[:, -1], prefix)
    return out.astype(v.dtype), final


def aaren_reference(
    scores: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    initial_state: AarenState | None = None,
) -> tuple[jax.Array, AarenState]:
    """Quadratic masked softmax in float32; the initial state acts as one extra key."""
    _validate(scores, v, segment_ids, initial_state)
    b, length, h = scores.shape
    if initial_state is None:
        initial_state = aaren_init_state(b, h, v.shape[3])
    doc = document_index(segment_ids, b, length)
    mask = jnp.tril(jnp.ones((length, length), bool))[None] & (doc[:, :, None] == doc[:, None])
    logits = jnp.where(
        mask[:, None], rearrange(scores.astype(jnp.float32), "b s h -> b h 1 s"), -jnp.inf
    )
    # Extra key per query: the initial prefix, visible from the first document only.
    m0, u0, w0 = initial_state
    has0 = (doc == 0)[:, None, :] & (u0 > 0)[:, :, None]  # [b, h, t]
    init_logit = jnp.where(
        has0, m0[:, :, None] + jnp.log(jnp.where(u0 > 0, u0, 1.0))[:, :, None], -jnp.inf
    )
    logits = jnp.concatenate([logits, init_logit[..., None]], axis=-1)  # [b, h, t, s + 1]
    p = jax.nn.softmax(logits, axis=-1)
    vf = v.astype(jnp.float32)
    init_value = w0 / jnp.where(u0 > 0, u0, 1.0)[..., None]  # [b, h, dv] the prefix's mean value
    out = jnp.einsum("bhts,bshe->bthe", p[..., :-1], vf, precision=HIGHEST)
    out += jnp.einsum("bht,bhe->bthe", p[..., -1], init_value, precision=HIGHEST)
    # Final state straight from the definition (the last position's visible keys).
    last = logits[:, :, -1]  # [b, h, s + 1]
    m = jnp.max(last, axis=-1)
    e = jnp.exp(last - m[..., None])
    numer = jnp.einsum("bhs,bshe->bhe", e[..., :-1], vf, precision=HIGHEST)
    final = AarenState(m, e.sum(-1), numer + e[..., -1:] * init_value)
    return out.astype(v.dtype), final


def aaren_step(
    score: jax.Array,  # [batch, heads]
    v: jax.Array,  # [batch, heads, dv]
    state: AarenState,
) -> tuple[jax.Array, AarenState]:
    """Append one token to the prefix in O(1): ``(out [batch, heads, dv], new state)``."""
    token = AarenState(
        score.astype(jnp.float32), jnp.ones(score.shape, jnp.float32), v.astype(jnp.float32)
    )
    state = _merge(state, token)
    return (state.numer / state.denom[..., None]).astype(v.dtype), state
