"""Chunked form: WY representation and UT transform inside chunks, a state scan across them.

Yang et al. 2024 "Parallelizing Linear Transformers with the Delta Rule over Sequence
Length", sec. 3 (the WY representation of the product of transitions, and the UT transform
that computes it with one triangular solve per chunk); with the decay as in Yang, Kautz,
Hatamizadeh 2025 "Gated Delta Networks", sec. 3.3. Per chunk of ``C`` tokens entering with
state ``S`` and in-chunk cumulative log decay ``gam_t = sum_{s <= t} g_s``:

* ``A = strict_lower(beta_t exp(gam_t - gam_s) k_t . k_s)`` and ``T = (I + A)^{-1}``
  (:func:`unit_lower_inverse`: matmuls only, no LAPACK call on CPU);
* ``W = T (beta exp(gam) K)`` and ``U = T (beta V) - W S`` (the pseudo-values
  ``u_t = beta_t (v_t - (exp(g_t) S_{t-1})^T k_t)``, all at once);
* ``O = (exp(gam) Q) S + (Q K^T * exp(gam_t - gam_s), s <= t) U``;
* ``S_next = exp(gam_C) S + (K exp(gam_C - gam))^T U``.

Every exponent is a difference of in-chunk log decays with ``t >= s`` (<= 0), so nothing
overflows. Document boundaries mask pairs across documents, the incoming state's reads and
its carry, as in :mod:`arjax.ops.linear_attention.chunked`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from arjax.ops.gated_delta_rule.common import as_float32
from arjax.ops.linear_attention.common import document_index, masked_exp


def unit_lower_inverse(a: jax.Array) -> jax.Array:
    """``(I + A)^{-1}`` for strictly lower triangular ``a [..., c, c]`` by block doubling:
    with ``T`` the inverse of the diagonal blocks of size ``s``, the blocks of size ``2s`` are
    ``[[T1, 0], [-T2 A21 T1, T2]]``, i.e. ``T - T (A masked to the A21 blocks) T``; the 2 x 2
    blocks need no product (``I - A`` there)."""
    c = a.shape[-1]
    p = 1 << max(c - 1, 0).bit_length()  # next power of two: pad with zeros (identity)
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, p - c), (0, p - c)])
    rows, cols = jnp.indices((p, p))

    def cross(size: int) -> jax.Array:  # the A21 blocks of the diagonal blocks of size 2s
        return ((rows ^ cols) < 2 * size) & ((rows & size) != 0) & ((cols & size) == 0)

    t = jnp.eye(p, dtype=a.dtype) - jnp.where(cross(1), a, 0.0)
    size = 2
    while size < p:
        t = t - t @ jnp.where(cross(size), a, 0.0) @ t
        size *= 2
    return t[..., :c, :c]


def chunked_gated_delta_rule(
    q: jax.Array,  # [batch, len, heads, dk]
    k: jax.Array,  # [batch, len, heads, dk]
    v: jax.Array,  # [batch, len, heads, dv]
    beta: jax.Array,  # [batch, len, heads]
    *,
    log_decay: jax.Array | None = None,  # [batch, len, heads]
    initial_state: jax.Array | None = None,  # [batch, heads, dk, dv] float32
    segment_ids: jax.Array | None = None,  # [batch, len]
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """Chunkwise form (float32 inside); ``(out [b, len, h, dv], state [b, h, dk, dv])``."""
    b, length = q.shape[:2]
    qf, kf, vf, bf, g, s0 = as_float32(q, k, v, beta, log_decay, initial_state)
    doc = document_index(segment_ids, b, length)
    pad = -length % chunk_size  # zero k, v, beta and log decay leave the state untouched
    if pad:
        widths = lambda x: ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)  # noqa: E731
        qf, kf, vf, bf, g = (jnp.pad(x, widths(x)) for x in (qf, kf, vf, bf, g))
        doc = jnp.pad(doc, ((0, 0), (0, pad)), mode="edge")
    qc, kc, vc = (rearrange(x, "b (n c) h d -> b n h c d", c=chunk_size) for x in (qf, kf, vf))
    bc, gc = (rearrange(x, "b (n c) h -> b n h c", c=chunk_size) for x in (bf, g))
    dc = rearrange(doc, "b (n c) -> b n c", c=chunk_size)
    gam = jnp.cumsum(gc, axis=-1)  # [b, n, h, c]
    doc_in = jnp.concatenate([jnp.zeros_like(dc[:, :1, -1]), dc[:, :-1, -1]], axis=1)  # [b, n]

    same = (dc[..., :, None] == dc[..., None, :])[:, :, None]  # [b, n, 1, t, s]
    rows, cols = jnp.indices((chunk_size, chunk_size))
    diff = gam[..., :, None] - gam[..., None, :]  # [b, n, h, t, s]
    decay_strict = masked_exp(diff, same & (rows > cols))
    decay_incl = masked_exp(diff, same & (rows >= cols))
    a = jnp.einsum("bnhtd,bnhsd->bnhts", kc, kc) * decay_strict * bc[..., None]
    reads = (dc == doc_in[..., None])[:, :, None]  # [b, n, 1, c] in the incoming document
    g_read = jnp.exp(gam) * reads  # [b, n, h, c]
    t = unit_lower_inverse(a)  # UT transform: W = T (beta exp(gam) K), U_v = T (beta V)
    w = jnp.einsum("bnhts,bnhsd->bnhtd", t, kc * (bc * g_read)[..., None])
    u_v = jnp.einsum("bnhts,bnhse->bnhte", t, vc * bc[..., None])

    g_last = gam[..., -1]  # [b, n, h]
    in_last = (dc == dc[..., -1:])[:, :, None]  # [b, n, 1, c] in the outgoing document
    k_end = kc * masked_exp(g_last[..., None] - gam, in_last)[..., None]
    carry = jnp.exp(g_last) * (dc[:, :, -1] == doc_in)[:, :, None]  # [b, n, h]

    def step(state, x):
        w_n, uv_n, kend_n, carry_n = x
        u = uv_n - jnp.einsum("bhcd,bhde->bhce", w_n, state)
        new = carry_n[..., None, None] * state + jnp.einsum("bhcd,bhce->bhde", kend_n, u)
        return new, (u, state)

    per_chunk = lambda x: rearrange(x, "b n ... -> n b ...")  # noqa: E731
    xs = tuple(map(per_chunk, (w, u_v, k_end, carry)))
    state, (u, s_prev) = jax.lax.scan(step, s0, xs)
    u, s_prev = (rearrange(x, "n b ... -> b n ...") for x in (u, s_prev))

    scores = jnp.einsum("bnhtd,bnhsd->bnhts", qc, kc) * decay_incl
    out = jnp.einsum("bnhtd,bnhde->bnhte", qc * g_read[..., None], s_prev)
    out += jnp.einsum("bnhts,bnhse->bnhte", scores, u)
    out = rearrange(out, "b n h c e -> b (n c) h e")[:, :length]
    return out.astype(q.dtype), state
