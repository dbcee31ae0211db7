"""Recurrent form: the delta-rule update per token, O(dk dv) time and O(1) memory.

``S' = exp(g_t) S_{t-1}``, ``u_t = beta_t (v_t - S'^T k_t)``, ``S_t = S' + k_t u_t^T``,
``o_t = S_t^T q_t`` (Yang et al. 2024 "Parallelizing Linear Transformers with the Delta
Rule", sec. 2.2; the decay as in Gated Delta Networks, sec. 3.1):
:func:`gated_delta_step` is the decode update; :func:`recurrent_gated_delta_rule` scans it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from arjax.ops.gated_delta_rule.common import as_float32, resets


def gated_delta_step(
    q: jax.Array,  # [batch, heads, dk]
    k: jax.Array,  # [batch, heads, dk]
    v: jax.Array,  # [batch, heads, dv]
    beta: jax.Array,  # [batch, heads]
    state: jax.Array,  # [batch, heads, dk, dv] float32
    *,
    log_decay: jax.Array | None = None,  # [batch, heads]
    reset: jax.Array | None = None,  # [batch] bool: this token starts a new document
) -> tuple[jax.Array, jax.Array]:
    """One token: ``(out [batch, heads, dv] in q's dtype, new state float32)``."""
    if q.ndim != 3 or k.shape != q.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"gated_delta_step: q/k must be [batch, heads, dk] and v [batch, heads, dv], "
            f"got {q.shape}, {k.shape}, {v.shape}"
        )
    for name, x in (("beta", beta), ("log_decay", log_decay)):
        if x is not None and x.shape != q.shape[:2]:
            raise ValueError(
                f"gated_delta_step: {name} must be [batch, heads]={q.shape[:2]}, got {x.shape}"
            )
    want = (*q.shape, v.shape[-1])
    if state.shape != want or state.dtype != jnp.float32:
        raise ValueError(
            f"gated_delta_step: state must be float32 {want}, got {state.dtype} {state.shape}"
        )
    qf, kf, vf, bf = (x.astype(jnp.float32) for x in (q, k, v, beta))
    if log_decay is not None:
        state = state * jnp.exp(log_decay.astype(jnp.float32))[..., None, None]
    if reset is not None:
        state = jnp.where(reset[:, None, None, None], 0.0, state)
    u = bf[..., None] * (vf - jnp.einsum("bhde,bhd->bhe", state, kf))  # [b, h, dv]
    state = state + jnp.einsum("bhd,bhe->bhde", kf, u)
    out = jnp.einsum("bhde,bhd->bhe", state, qf)
    return out.astype(q.dtype), state


def recurrent_gated_delta_rule(
    q: jax.Array,  # [batch, len, heads, dk]
    k: jax.Array,  # [batch, len, heads, dk]
    v: jax.Array,  # [batch, len, heads, dv]
    beta: jax.Array,  # [batch, len, heads]
    *,
    log_decay: jax.Array | None = None,  # [batch, len, heads]
    initial_state: jax.Array | None = None,  # [batch, heads, dk, dv] float32
    segment_ids: jax.Array | None = None,  # [batch, len]
) -> tuple[jax.Array, jax.Array]:
    """``lax.scan`` of :func:`gated_delta_step` over time."""
    b, length = q.shape[:2]
    qf, kf, vf, bf, g, s0 = as_float32(q, k, v, beta, log_decay, initial_state)
    xs = (qf, kf, vf, bf, g, resets(segment_ids, b, length))
    xs = tuple(rearrange(x, "b l ... -> l b ...") for x in xs)

    def step(state, x):
        qt, kt, vt, bt, gt, rt = x
        out, state = gated_delta_step(qt, kt, vt, bt, state, log_decay=gt, reset=rt)
        return state, out

    state, out = jax.lax.scan(step, s0, xs)
    return rearrange(out, "l b h e -> b l h e").astype(q.dtype), state
