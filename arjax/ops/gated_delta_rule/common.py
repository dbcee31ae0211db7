"""Argument checks and shared preprocessing for the gated delta rule forms.

Recurrence (Yang, Kautz, Hatamizadeh 2025 "Gated Delta Networks", sec. 3.1; with
``g_t = 0`` the delta rule of Schlag et al. 2021 / Yang et al. 2024 "Parallelizing Linear
Transformers with the Delta Rule over Sequence Length", sec. 2.2):
``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` and ``o_t = S_t^T q_t``,
``S [dk, dv]``. A document boundary (``segment_ids`` changes) zeroes the state before the
update, as in :mod:`arjax.ops.linear_attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from arjax.ops.linear_attention.common import validate as validate_qkv

FORMS = ("naive", "chunked", "recurrent")
WHO = "gated_delta_rule"


def validate(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    *,
    log_decay: jax.Array | None,
    initial_state: jax.Array | None,
    segment_ids: jax.Array | None,
) -> None:
    """Raise ``ValueError`` naming the bad argument (trace time, before compiling)."""
    validate_qkv(
        q, k, v, log_decay=None, initial_state=initial_state, segment_ids=segment_ids, who=WHO
    )
    want = q.shape[:3]
    for name, x in (("beta", beta), ("log_decay", log_decay)):
        if x is None:
            continue
        if x.shape != want:
            raise ValueError(f"{WHO}: {name} must be [batch, len, heads]={want}, got {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{WHO}: {name} must be floating point, got {x.dtype}")


def as_float32(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    log_decay: jax.Array | None,
    initial_state: jax.Array | None,
) -> tuple[jax.Array, ...]:
    """float32 q, k, v, beta, log_decay (zeros when None: DeltaNet) and initial state."""
    b, length, h, dk = q.shape
    qf, kf, vf, bf = (x.astype(jnp.float32) for x in (q, k, v, beta))
    g = jnp.zeros((b, length, h), jnp.float32) if log_decay is None else log_decay
    s0 = jnp.zeros((b, h, dk, v.shape[3]), jnp.float32) if initial_state is None else initial_state
    return qf, kf, vf, bf, g.astype(jnp.float32), s0


def resets(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
    """``[batch, len]`` bool: the token starts a new document (never the row's first token)."""
    if segment_ids is None:
        return jnp.zeros((batch, length), bool)
    return jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))
