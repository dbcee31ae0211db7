"""The float32 token-by-token recurrence of linear attention (the sequential form the chunked
kernels are tested against)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from jax import lax

F32 = jnp.float32


def linear_attention_recurrence(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    log_decay: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Token-by-token float32 recurrence (GLA paper eq. 2): the ground truth for the kernels.

    Same arguments and outputs as :func:`kernels_pallas.linear_attention_scan.
    chunked_linear_attention` (out in float32).
    """
    bsz, length, heads, dk = q.shape
    g = jnp.zeros((bsz, length, heads), F32) if log_decay is None else log_decay.astype(F32)
    g = jnp.broadcast_to(g if g.ndim == 4 else g[..., None], q.shape)
    s0 = jnp.zeros((bsz, heads, dk, v.shape[3]), F32) if initial_state is None else initial_state
    seg = jnp.zeros((bsz, length), jnp.int32) if segment_ids is None else segment_ids
    starts = jnp.pad(seg[:, 1:] != seg[:, :-1], ((0, 0), (1, 0)))  # [batch, len]

    def step(s, xs):  # s [batch, heads, dk, dv]
        qt, kt, vt, gt, start = xs
        s = jnp.where(start[:, None, None, None], 0.0, s * jnp.exp(gt)[..., None])
        s = s + kt[..., None] * vt[..., None, :]
        return s, jnp.einsum("bhk,bhkv->bhv", qt, s, precision=lax.Precision.HIGHEST)

    xs = [rearrange(x.astype(F32), "b l ... -> l b ...") for x in (q, k, v, g)]
    s, out = lax.scan(step, s0, (*xs, starts.T))
    return rearrange(out, "l b h d -> b l h d"), s
