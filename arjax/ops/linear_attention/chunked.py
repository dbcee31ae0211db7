"""Chunked form: quadratic inside chunks of ``chunk_size``, state recurrence across them.

Per chunk with in-chunk cumulative log gates ``g`` (Yang et al. 2024, sec. 4.2;
Sun et al. 2023, sec. 2.3 "chunkwise recurrent"):
``O = (Q K^T * D) V + (Q * exp(g)) S_prev`` and
``S_next = diag(exp(g_last)) S_prev + (K * exp(g_last - g))^T V``, where ``D`` holds
``exp(g_t - g_s)`` for causal same-document pairs. Every exponent is <= 0 (log-space
differences inside one chunk), so nothing overflows whatever the sequence length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from arjax.ops.linear_attention.common import as_float32, document_index, masked_exp


def chunked_linear_attention(
    q: jax.Array,  # [batch, len, heads, dk]
    k: jax.Array,  # [batch, len, heads, dk]
    v: jax.Array,  # [batch, len, heads, dv]
    *,
    log_decay: jax.Array | None = None,  # [batch, len, heads] or [batch, len, heads, dk]
    initial_state: jax.Array | None = None,  # [batch, heads, dk, dv] float32
    segment_ids: jax.Array | None = None,  # [batch, len]
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """Chunkwise-parallel form (float32 inside); ``(out [b, len, h, dv], state [b, h, dk, dv])``."""
    b, length = q.shape[:2]
    qf, kf, vf, log_decay, s0 = as_float32(q, k, v, log_decay, initial_state)
    gated = log_decay.ndim == 4
    doc = document_index(segment_ids, b, length)
    pad = -length % chunk_size  # zero k/v and zero log-decay leave the state untouched
    if pad:
        widths = lambda x: ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)  # noqa: E731
        qf, kf, vf, log_decay = (jnp.pad(x, widths(x)) for x in (qf, kf, vf, log_decay))
        doc = jnp.pad(doc, ((0, 0), (0, pad)), mode="edge")
    chunk = lambda x: rearrange(x, "b (n c) ... -> b n c ...", c=chunk_size)  # noqa: E731
    qc, kc, vc, gc, dc = (chunk(x) for x in (qf, kf, vf, log_decay, doc))
    g = jnp.cumsum(gc, axis=2)  # [b, n, c, h(, dk)] in-chunk cumulative log gate
    # Document of the state entering each chunk: the last position of the previous chunk.
    doc_in = jnp.concatenate([jnp.zeros_like(dc[:, :1, -1]), dc[:, :-1, -1]], axis=1)  # [b, n]

    # Intra-chunk, causal and same-document.
    causal = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))
    mask = causal & (dc[..., :, None] == dc[..., None, :])  # [b, n, t, s]
    if gated:
        weight = masked_exp(g[:, :, :, None] - g[:, :, None], mask[..., None, None])
        scores = jnp.einsum("bnthd,bnshd,bntshd->bnhts", qc, kc, weight)
    else:
        weight = masked_exp(g[:, :, :, None] - g[:, :, None], mask[..., None])  # [b,n,t,s,h]
        scores = jnp.einsum("bnthd,bnshd->bnhts", qc, kc) * rearrange(
            weight, "b n t s h -> b n h t s"
        )
    out = jnp.einsum("bnhts,bnshe->bnthe", scores, vc)

    # Each chunk's own contribution to the state at its end, and its decay of the incoming one.
    g_last = g[:, :, -1:]  # [b, n, 1, h(, dk)]
    in_last = dc == dc[:, :, -1:]  # [b, n, c]
    to_end = masked_exp(g_last - g, in_last[..., None, None] if gated else in_last[..., None])
    k_end = kc * (to_end if gated else to_end[..., None])
    chunk_kv = jnp.einsum("bnshd,bnshe->bnhde", k_end, vc)  # [b, n, h, dk, dv]
    keeps = (dc[:, :, -1] == doc_in).astype(jnp.float32)  # no boundary inside the chunk
    carry = jnp.exp(g_last[:, :, 0]) * (keeps[..., None, None] if gated else keeps[..., None])
    carry = carry[..., None] if gated else carry[..., None, None]  # [b, n, h, dk|1, 1]

    def step(state, x):
        carry_n, kv_n = x
        return carry_n * state + kv_n, state

    per_chunk = lambda x: rearrange(x, "b n ... -> n b ...")  # noqa: E731
    state, s_prev = jax.lax.scan(step, s0, (per_chunk(carry), per_chunk(chunk_kv)))
    s_prev = rearrange(s_prev, "n b ... -> b n ...")  # state entering each chunk

    # Inter-chunk: positions still in the incoming state's document read it, decayed.
    reads = (dc == doc_in[..., None])[..., None, None]  # [b, n, c, 1, 1]
    q_in = qc * (jnp.exp(g) if gated else jnp.exp(g)[..., None]) * reads
    out += jnp.einsum("bnthd,bnhde->bnthe", q_in, s_prev)
    out = rearrange(out, "b n c h e -> b (n c) h e")[:, :length]
    return out.astype(q.dtype), state
