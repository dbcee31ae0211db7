"""Next-token sampling: greedy, temperature, top-k, nucleus (top-p; Holtzman et al. 2020)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(
    logits: jax.Array, *, top_k: int | None = None, top_p: float | None = None
) -> jax.Array:
    """Set logits outside the top-k / top-p nucleus to -inf. logits ``[batch, vocab]`` f32."""
    neg = jnp.finfo(logits.dtype).min
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff_idx = jnp.sum(before < top_p, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, neg, logits)
    return logits


def sample_token(
    logits: jax.Array,
    rng: jax.Array,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """One token id per row of ``logits [batch, vocab]``; ``temperature == 0`` is greedy."""
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def validate_sampling(
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    max_new_tokens: int | None = None,
) -> None:
    """Clear errors for sampling arguments (and the generation length, when given)."""
    if max_new_tokens is not None and max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive int or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
