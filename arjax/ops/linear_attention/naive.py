"""Parallel (quadratic, masked) form: the float32 reference for the other forms.

``o_t = sum_{s <= t, same doc} (q_t * exp(G_t - G_s)) . k_s v_s
+ [doc_t = 0] (q_t * exp(G_t))^T S_0`` with ``G_t = sum_{r <= t} log_decay_r``
(Sun et al. 2023 "Retentive Network", eq. 5, generalised to per-key-dim gates as in
Yang et al. 2024, sec. 4.1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from arjax.ops.linear_attention.common import as_float32, document_index, masked_exp

HIGHEST = jax.lax.Precision.HIGHEST


def parallel_linear_attention(
    q: jax.Array,  # [batch, len, heads, dk]
    k: jax.Array,  # [batch, len, heads, dk]
    v: jax.Array,  # [batch, len, heads, dv]
    *,
    log_decay: jax.Array | None = None,  # [batch, len, heads] or [batch, len, heads, dk]
    initial_state: jax.Array | None = None,  # [batch, heads, dk, dv] float32
    segment_ids: jax.Array | None = None,  # [batch, len]
) -> tuple[jax.Array, jax.Array]:
    """Quadratic masked form in float32; returns ``(out [b, len, h, dv], state [b, h, dk, dv])``."""
    b, length, h, dk = q.shape
    qf, kf, vf, log_decay, s0 = as_float32(q, k, v, log_decay, initial_state)
    # A scalar decay [b, len, h] keeps its weights [b, t, s, h]; a gate adds the key dim.
    expand = (lambda x: x[..., None]) if log_decay.ndim == 3 else (lambda x: x)
    doc = document_index(segment_ids, b, length)  # [b, len]
    g = jnp.cumsum(log_decay, axis=1)  # [b, len, h(, dk)]
    causal = jnp.tril(jnp.ones((length, length), bool))
    mask = causal[None] & (doc[:, :, None] == doc[:, None, :])  # [b, t, s]
    pair_mask = mask[..., None] if log_decay.ndim == 3 else mask[..., None, None]
    weight = expand(masked_exp(g[:, :, None] - g[:, None, :], pair_mask))  # [b, t, s, h, dk|1]
    if log_decay.ndim == 3:
        scores = jnp.einsum("bthd,bshd->bhts", qf, kf, precision=HIGHEST)
        scores *= rearrange(weight[..., 0], "b t s h -> b h t s")
    else:
        scores = jnp.einsum("bthd,bshd,btshd->bhts", qf, kf, weight, precision=HIGHEST)
    out = jnp.einsum("bhts,bshe->bthe", scores, vf, precision=HIGHEST)
    first_doc = (doc == 0)[:, :, None, None]  # [b, len, 1, 1]
    q_in = qf * expand(jnp.exp(g)) * first_doc
    out += jnp.einsum("bthd,bhde->bthe", q_in, s0, precision=HIGHEST)

    # S_L = [doc_L = 0] exp(G_L) S_0 + sum_{s in the last doc} exp(G_L - G_s) k_s v_s^T.
    in_last = (doc == doc[:, -1:])[:, :, None]  # [b, len, 1]
    k_end = kf * expand(masked_exp(g[:, -1:] - g, in_last if g.ndim == 3 else in_last[..., None]))
    state = jnp.einsum("bshd,bshe->bhde", k_end, vf, precision=HIGHEST)
    carry = expand(jnp.exp(g[:, -1]) * (doc[:, -1] == 0)[:, None, *([None] * (g.ndim - 3))])
    state += carry[..., None] * s0  # [b, h, dk|1, 1]
    return out.astype(q.dtype), state
