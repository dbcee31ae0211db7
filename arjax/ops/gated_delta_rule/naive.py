"""The recurrence as written, token by token: the float32 reference for the other forms.

Each step applies the transition matrix ``exp(g_t) (I - beta_t k_t k_t^T)`` (a generalised
Householder reflection, Yang et al. 2024 "Parallelizing Linear Transformers with the Delta
Rule", sec. 2.2; gated: Yang, Kautz, Hatamizadeh 2025, sec. 3.1) to the whole state,
then adds ``beta_t k_t v_t^T``. O(dk^2 dv) per token: slow, but nothing is rearranged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from arjax.ops.gated_delta_rule.common import as_float32, resets

HIGHEST = jax.lax.Precision.HIGHEST


def naive_gated_delta_rule(
    q: jax.Array,  # [batch, len, heads, dk]
    k: jax.Array,  # [batch, len, heads, dk]
    v: jax.Array,  # [batch, len, heads, dv]
    beta: jax.Array,  # [batch, len, heads]
    *,
    log_decay: jax.Array | None = None,  # [batch, len, heads]; None: DeltaNet
    initial_state: jax.Array | None = None,  # [batch, heads, dk, dv] float32
    segment_ids: jax.Array | None = None,  # [batch, len]
) -> tuple[jax.Array, jax.Array]:
    """``(out [b, len, h, dv] in q's dtype, final state [b, h, dk, dv] float32)``."""
    b, length, _, dk = q.shape
    qf, kf, vf, bf, g, s0 = as_float32(q, k, v, beta, log_decay, initial_state)
    xs = (qf, kf, vf, bf, g, resets(segment_ids, b, length))
    xs = tuple(rearrange(x, "b l ... -> l b ...") for x in xs)
    eye = jnp.eye(dk, dtype=jnp.float32)

    def step(state, x):
        qt, kt, vt, bt, gt, rt = x  # [b, h, dk], [b, h, dk], [b, h, dv], [b, h], [b, h], [b]
        state = jnp.where(rt[:, None, None, None], 0.0, state)
        householder = eye - bt[..., None, None] * jnp.einsum("bhi,bhj->bhij", kt, kt)
        transition = jnp.exp(gt)[..., None, None] * householder  # [b, h, dk, dk]
        state = jnp.einsum("bhij,bhje->bhie", transition, state, precision=HIGHEST)
        state += bt[..., None, None] * jnp.einsum("bhd,bhe->bhde", kt, vt)
        return state, jnp.einsum("bhde,bhd->bhe", state, qt, precision=HIGHEST)

    state, out = jax.lax.scan(step, s0, xs)
    return rearrange(out, "l b h e -> b l h e").astype(q.dtype), state
