"""Attention between words and their own bytes (HAT's connectors, Neitemeier et al. 2025).

HAT's encoder connector (Sec. 2.2, eq. 1) lets word ``w``'s query attend to the bytes of
word ``w`` only. Written as masked attention (segment ids ``w + 1`` against each byte's
word id) it scores every word against every byte of the row, ``O(words x seq)``, although
each byte is a key of exactly one word. Its query is one learned latent, the same for
every word, rotated by the word's position: :func:`word_pool_attention` scores each byte
against the unrotated latent with the byte's key rotated by its position relative to its
word's (RoPE rotations compose) and takes the per-word softmax with segment reductions:
``O(seq)`` work and memory, no per-byte copy of the query. :func:`word_attention_reference`
is the masked form in float32 (each word's rotated query over the rotated keys).

The decoder connector's cross-attention (Sec. 2.3) is the other direction, each byte to
its own word's predictive embedding: a softmax over one key, i.e. exactly that word's value
vector. :func:`gather_words` is that lookup; the model applies the value and output
projections per word before it (they are linear), ``O(words)`` instead of ``O(seq)``.

Conventions: q ``[batch, words, heads, head_dim]`` (the reference; ``[heads, head_dim]``
for :func:`word_pool_attention`), k/v ``[batch, seq, kv_heads, head_dim]``
(GQA: consecutive query heads share a KV head), ``word_ids`` ``[batch, seq]`` int, the
1-based word slot of each byte (0 = padding byte, see :mod:`arjax.data.words`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange

from arjax.ops.attention import attention_reference


def _validate(q: jax.Array, k: jax.Array, v: jax.Array, word_ids: jax.Array) -> None:
    """Raise ``ValueError`` naming the bad argument (trace time, before compilation)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"word_attention: {name} must be 4-D, got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"word_attention: {name} must be floating point, got {x.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"word_attention: k {k.shape} and v {v.shape} differ")
    b, _, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or h % k.shape[2]:
        raise ValueError(
            f"word_attention: k {k.shape} does not fit q {q.shape} (batch, head_dim, "
            "heads a multiple of kv_heads)"
        )
    if word_ids.shape != k.shape[:2] or not jnp.issubdtype(word_ids.dtype, jnp.integer):
        raise ValueError(
            f"word_attention: word_ids must be integer [batch, seq]={k.shape[:2]}, "
            f"got {word_ids.dtype} {word_ids.shape}"
        )


def word_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, word_ids: jax.Array, *, scale: float | None = None
) -> jax.Array:
    """Float32 masked attention: query ``w`` sees key ``j`` iff ``word_ids[j] == w + 1``."""
    _validate(q, k, v, word_ids)
    slots = jnp.broadcast_to(jnp.arange(1, q.shape[1] + 1), q.shape[:2])
    return attention_reference(q, k, v, q_segment_ids=slots, kv_segment_ids=word_ids, scale=scale)


def word_pool_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    word_ids: jax.Array,
    *,
    num_words: int,
    scale: float | None = None,
) -> jax.Array:
    """One query shared by every word, ``q [heads, head_dim]``, over each word's own bytes:
    ``[batch, num_words, heads, head_dim]`` in k's dtype; a word with no bytes gets zeros,
    a byte whose id is 0 or beyond ``num_words`` is no key of any query.

    HAT's encoder connector (Sec. 2.2): its latent query is the same for every word, and
    RoPE rotations compose (``R(a) q . R(b) k = q . R(b - a) k``), so the caller rotates
    each key by its byte's position *relative to its word's* and leaves ``q`` unrotated;
    the result equals :func:`word_attention_reference` of each word's rotated query over
    the keys rotated by byte position. No per-byte copy of the query is built
    (``[batch, seq, heads, head_dim]``) and its gradient is a matmul, not a scatter over
    the bytes. Scores are one dot product per (byte, head), the softmax a segment max /
    sum per word (float32).
    """
    if q.ndim != 2:
        raise ValueError(f"word_pool_attention: q must be [heads, head_dim], got shape {q.shape}")
    w = num_words
    _validate(jax.ShapeDtypeStruct((k.shape[0], w, *q.shape), q.dtype), k, v, word_ids)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    valid = (word_ids > 0) & (word_ids <= w)
    idx = jnp.where(valid, word_ids - 1, w)  # [b, s]; invalid bytes -> a spill slot w
    q = rearrange(q, "(g r) d -> g r d", g=k.shape[2])
    logits = jnp.einsum("grd,bsgd->bsgr", q, k, preferred_element_type=jnp.float32)
    logits = logits * scale  # [b, s, kv_heads, groups]
    # Per-row segment reductions (vmapped: batch stays a batch dimension for sharding).
    seg_max = jax.vmap(lambda x, i: jax.ops.segment_max(x, i, num_segments=w + 1))
    seg_sum = jax.vmap(lambda x, i: jax.ops.segment_sum(x, i, num_segments=w + 1))
    m = jax.lax.stop_gradient(seg_max(logits, idx))  # [b, w + 1, kv_heads, groups]
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # empty words
    p = jnp.exp(logits - jnp.take_along_axis(m, idx[:, :, None, None], axis=1))
    denom = seg_sum(p, idx)
    num = seg_sum(p[..., None] * v[:, :, :, None, :].astype(jnp.float32), idx)
    out = num / jnp.where(denom == 0, 1.0, denom)[..., None]  # [b, w + 1, g, r, d]
    return rearrange(out[:, :w], "b w g r d -> b w (g r) d").astype(k.dtype)


def gather_words(x: jax.Array, word_ids: jax.Array) -> jax.Array:
    """Per-byte rows of per-word ``x`` ``[batch, words, ...]`` -> ``[batch, seq, ...]``:
    byte ``j`` gets ``x[word_ids[j] - 1]``, zeros where ``word_ids`` is 0 or beyond ``words``.

    This is the decoder connector's cross-attention output when every byte attends to
    exactly one key, its word (the softmax weight is 1).
    """
    if word_ids.ndim != 2 or word_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"gather_words: word_ids must be [batch, seq] with batch {x.shape[0]}, "
            f"got {word_ids.shape}"
        )
    w = x.shape[1]
    valid = (word_ids > 0) & (word_ids <= w)
    idx = jnp.where(valid, word_ids - 1, 0)
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    out = jnp.take_along_axis(x, idx, axis=1)
    return jnp.where(valid.reshape(idx.shape), out, jnp.zeros((), x.dtype))
