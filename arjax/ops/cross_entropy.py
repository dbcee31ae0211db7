"""Masked next-token cross-entropy, from logits or fused with the output projection.

The training loss is ``sum_t mask_t * (logsumexp(z_t) - z_t[target_t])`` with the token
count ``sum_t mask_t`` beside it (the step divides; ``mask`` may hold real-valued weights).

* :func:`cross_entropy` -- from logits ``[..., vocab]`` (the default training path);
* :func:`cross_entropy_reference` -- ``z = hidden @ weight`` in float32, then
  :func:`cross_entropy`: the ground truth for the fused form;
* :func:`chunked_cross_entropy` -- the same loss that never holds the whole
  ``[batch, seq, vocab]`` logits: it walks the sequence in chunks of ``chunk_size``
  positions and, in the backward, recomputes each chunk's logits (the "fused/chunked
  cross-entropy" of large-vocabulary training, e.g. Wijmans et al. 2024 "Cut Your Losses in
  Large-Vocabulary Language Models", here as plain XLA chunks rather than a kernel).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange


def cross_entropy(
    logits: jax.Array, targets: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Summed masked cross-entropy (nats) and the number of predicted tokens.

    logits ``[..., vocab]`` (any float dtype; computed in float32), targets/mask ``[...]``.
    """
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)
    nll = logz - target_logit[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def validate_cross_entropy_args(
    hidden: jax.Array,
    weight: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    chunk_size: int = 1,
) -> None:
    """Raise ``ValueError`` naming the bad argument; runs at trace time, before compiling."""
    if hidden.ndim != 3 or not jnp.issubdtype(hidden.dtype, jnp.floating):
        raise ValueError(
            f"cross_entropy: hidden must be float [batch, seq, d], got {hidden.dtype}{hidden.shape}"
        )
    if hidden.shape[1] == 0:
        raise ValueError(f"cross_entropy: hidden has an empty sequence, shape {hidden.shape}")
    if weight.ndim != 2 or not jnp.issubdtype(weight.dtype, jnp.floating):
        raise ValueError(
            f"cross_entropy: weight must be float [d, vocab], got {weight.dtype}{weight.shape}"
        )
    if weight.shape[0] != hidden.shape[2]:
        raise ValueError(
            f"cross_entropy: weight {weight.shape} is not [d={hidden.shape[2]}, vocab] "
            f"for hidden {hidden.shape}"
        )
    if targets.shape != hidden.shape[:2] or not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(
            f"cross_entropy: targets must be integer [batch, seq]={hidden.shape[:2]}, "
            f"got {targets.dtype}{targets.shape}"
        )
    if mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"cross_entropy: mask must be [batch, seq]={hidden.shape[:2]}, got {mask.shape}"
        )
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"cross_entropy: chunk_size must be a positive int, got {chunk_size!r}")


def cross_entropy_reference(
    hidden: jax.Array,  # [batch, seq, d]
    weight: jax.Array,  # [d, vocab]
    targets: jax.Array,  # [batch, seq] int
    mask: jax.Array,  # [batch, seq] 0/1 or weights
) -> tuple[jax.Array, jax.Array]:
    """(summed nats, token count) of logits ``hidden @ weight``, all in float32."""
    validate_cross_entropy_args(hidden, weight, targets, mask)
    logits = jnp.einsum(
        "bsd,dv->bsv", hidden.astype(jnp.float32), weight.astype(jnp.float32)
    )  # [batch, seq, vocab]
    return cross_entropy(logits, targets, mask)


def _chunk_logits(h: jax.Array, weight: jax.Array) -> jax.Array:
    """h ``[batch, chunk, d]`` -> float32 logits ``[batch, chunk, vocab]``, the matmul in the
    promoted dtype of ``h`` and ``weight`` (what the model's head computes)."""
    return jnp.einsum("bnd,dv->bnv", h, weight).astype(jnp.float32)


@jax.custom_vjp
def _chunked_nll(
    h: jax.Array,  # [chunks, batch, chunk, d]
    weight: jax.Array,  # [d, vocab]
    targets: jax.Array,  # [chunks, batch, chunk] int32
    mask: jax.Array,  # [chunks, batch, chunk] float32
) -> jax.Array:
    """Summed ``mask * (logsumexp - target logit)`` over chunks (VJP: ``_chunked_nll_bwd``)."""
    return _chunked_nll_fwd(h, weight, targets, mask)[0]


def _chunked_nll_fwd(h, weight, targets, mask):
    def chunk(_, xs):
        h_c, t_c = xs
        logits = _chunk_logits(h_c, weight)  # [batch, chunk, vocab] float32
        lse = jax.nn.logsumexp(logits, axis=-1)
        nll = lse - jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
        return None, (lse, nll)

    _, (lse, nll) = jax.lax.scan(chunk, None, (h, targets))  # [chunks, batch, chunk] each
    return jnp.sum(nll * mask), (h, weight, targets, mask, lse, nll)


def _chunked_nll_bwd(res, g):
    h, weight, targets, mask, lse, nll = res
    compute = jnp.result_type(h, weight)

    def chunk(dw, xs):
        h_c, t_c, m_c, lse_c = xs
        probs = jnp.exp(_chunk_logits(h_c, weight) - lse_c[..., None])  # [batch, chunk, vocab]
        onehot = jax.nn.one_hot(t_c, weight.shape[1], dtype=jnp.float32)
        dlogits = ((probs - onehot) * (g * m_c)[..., None]).astype(compute)
        dh = jnp.einsum("bnv,dv->bnd", dlogits, weight.astype(compute))
        dw = dw + jnp.einsum(
            "bnd,bnv->dv", h_c.astype(compute), dlogits, preferred_element_type=jnp.float32
        )
        return dw, dh.astype(h.dtype)

    dw0 = jnp.zeros(weight.shape, jnp.float32)
    dw, dh = jax.lax.scan(chunk, dw0, (h, targets, mask, lse))
    return dh, dw.astype(weight.dtype), None, g * nll


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)


def chunked_cross_entropy(
    hidden: jax.Array,  # [batch, seq, d]
    weight: jax.Array,  # [d, vocab]
    targets: jax.Array,  # [batch, seq] int
    mask: jax.Array,  # [batch, seq] 0/1 or weights
    *,
    chunk_size: int,
) -> tuple[jax.Array, jax.Array]:
    """:func:`cross_entropy_reference` that holds one chunk of logits, never all of them.

    Chunks run along the sequence, ``[batch, chunk_size, vocab]`` each, so a batch-sharded
    ``hidden`` stays sharded in every chunk; a ragged tail is padded with ``mask = 0``
    (``chunk_size`` is clipped to ``seq``). Each chunk's logits are the matmul in the promoted
    dtype of ``hidden`` and ``weight`` with a float32 logsumexp.

    The backward is a ``jax.custom_vjp`` rather than ``jax.checkpoint`` around the chunk:
    the forward keeps the per-token logsumexp (float32 ``[batch, seq]``) beside its chunked
    (padded, chunk-major) copies of the inputs, never logits, so the backward recomputes one
    matmul per chunk, writes ``softmax - onehot`` directly, and
    accumulates the weight gradient over chunks in float32 (autodiff through the scan would
    accumulate it in the weight's dtype, bfloat16 for a tied bf16 head). Gradients flow to
    ``hidden``, ``weight`` and ``mask``.
    """
    validate_cross_entropy_args(hidden, weight, targets, mask, chunk_size)
    n = min(chunk_size, hidden.shape[1])
    pad = -hidden.shape[1] % n
    m = mask.astype(jnp.float32)

    def chunks(x: jax.Array) -> jax.Array:  # [batch, seq, ...] -> [chunks, batch, n, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return rearrange(x, "b (c n) ... -> c b n ...", n=n)

    total = _chunked_nll(chunks(hidden), weight, chunks(targets.astype(jnp.int32)), chunks(m))
    return total, jnp.sum(m)
