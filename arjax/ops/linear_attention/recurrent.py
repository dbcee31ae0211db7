"""Recurrent form: one state update per token, O(1) memory in the sequence length.

``S_t = diag(a_t) S_{t-1} + k_t v_t^T``, ``o_t = q_t^T S_t`` (Katharopoulos et al. 2020,
eq. 16-17; gated: Yang et al. 2024, eq. 2). :func:`linear_attention_step` is the decode
update; :func:`recurrent_linear_attention` scans it over a sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from arjax.ops.linear_attention.common import as_float32, document_index


def linear_attention_step(
    q: jax.Array,  # [batch, heads, dk]
    k: jax.Array,  # [batch, heads, dk]
    v: jax.Array,  # [batch, heads, dv]
    state: jax.Array,  # [batch, heads, dk, dv] float32
    *,
    log_decay: jax.Array | None = None,  # [batch, heads] or [batch, heads, dk]
    reset: jax.Array | None = None,  # [batch] bool: this token starts a new document
) -> tuple[jax.Array, jax.Array]:
    """One token: ``(out [batch, heads, dv] in q's dtype, new state float32)``."""
    if q.ndim != 3 or k.shape != q.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"linear_attention_step: q/k must be [batch, heads, dk] and v [batch, heads, dv], "
            f"got {q.shape}, {k.shape}, {v.shape}"
        )
    want = (*q.shape, v.shape[-1])
    if state.shape != want or state.dtype != jnp.float32:
        raise ValueError(
            f"linear_attention_step: state must be float32 {want}, got {state.dtype} {state.shape}"
        )
    qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
    if log_decay is not None:
        decay = jnp.exp(log_decay.astype(jnp.float32))  # [b, h] or [b, h, dk]
        state = state * (decay[..., None, None] if decay.ndim == 2 else decay[..., None])
    if reset is not None:
        state = jnp.where(reset[:, None, None, None], 0.0, state)
    state = state + jnp.einsum("bhd,bhe->bhde", kf, vf)
    out = jnp.einsum("bhd,bhde->bhe", qf, state)
    return out.astype(q.dtype), state


def recurrent_linear_attention(
    q: jax.Array,  # [batch, len, heads, dk]
    k: jax.Array,  # [batch, len, heads, dk]
    v: jax.Array,  # [batch, len, heads, dv]
    *,
    log_decay: jax.Array | None = None,  # [batch, len, heads] or [batch, len, heads, dk]
    initial_state: jax.Array | None = None,  # [batch, heads, dk, dv] float32
    segment_ids: jax.Array | None = None,  # [batch, len]
) -> tuple[jax.Array, jax.Array]:
    """``lax.scan`` of :func:`linear_attention_step` over time."""
    b, length = q.shape[:2]
    qf, kf, vf, log_decay, s0 = as_float32(q, k, v, log_decay, initial_state)
    doc = document_index(segment_ids, b, length)
    reset = doc != jnp.pad(doc, ((0, 0), (1, 0)))[:, :-1]  # [b, len]
    xs = tuple(rearrange(x, "b l ... -> l b ...") for x in (qf, kf, vf, log_decay, reset))

    def step(state, x):
        qt, kt, vt, gt, rt = x
        out, state = linear_attention_step(qt, kt, vt, state, log_decay=gt, reset=rt)
        return state, out

    state, out = jax.lax.scan(step, s0, xs)
    return rearrange(out, "l b h e -> b l h e").astype(q.dtype), state
