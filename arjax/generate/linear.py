"""Constant-memory generation for linear-attention LMs (:mod:`arjax.models.linear_lm`).

The prompt is prefilled once with the chunked form (left padding is its own document, so
the state resets at the prompt's first token); each new token then updates the fixed-size
recurrent state (and BASED's ``window``-token ring buffer) in O(1) time and memory. Unlike
the KV-cache loop of :mod:`arjax.generate.decode`, nothing grows with the context, so the
generated length is not bounded by ``max_seq_len``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arjax.data.vocab import EOS_ID, PAD_ID
from arjax.generate.decode import pad_prompts, sample_text, trim_generated
from arjax.generate.sampling import sample_token, validate_sampling


@functools.partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p")
)
def _generate(
    model: nn.Module,
    params: Any,
    tokens: jax.Array,  # [batch, prompt]
    segments: jax.Array,  # [batch, prompt] 0 = left padding
    positions: jax.Array,  # [batch, prompt]
    stop_ids: jax.Array,  # [n_stop]
    rng: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> jax.Array:
    logits, state = model.apply(
        {"params": params}, tokens, positions, segments, None, method="prefill", mutable=["cache"]
    )
    next_pos = positions[:, -1] + 1  # [batch]

    def step(carry, i):
        cache, logits, done, rng = carry
        rng, key = jax.random.split(rng)
        tok = sample_token(logits, key, temperature=temperature, top_k=top_k, top_p=top_p)
        tok = jnp.where(done, PAD_ID, tok)
        done = done | jnp.isin(tok, stop_ids)
        out, new = model.apply(
            {"params": params, "cache": cache}, tok[:, None], (next_pos + i)[:, None], None, None,
            method="decode", mutable=["cache"],
        )  # fmt: skip
        return (new["cache"], out[:, -1], done, rng), tok

    done = jnp.zeros((tokens.shape[0],), bool)
    carry = (state["cache"], logits[:, -1], done, rng)
    _, generated = jax.lax.scan(step, carry, jnp.arange(max_new_tokens))
    return generated.T  # [batch, max_new_tokens]


def generate_recurrent(
    model: nn.Module,
    params: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: tuple[int, ...] = (EOS_ID,),
    rng: jax.Array | None = None,
) -> list[list[int]]:
    """Continue each prompt (token ids) by up to ``max_new_tokens``, stopping after a stop id."""
    validate_sampling(temperature, top_k, top_p, max_new_tokens)
    tokens, segments, positions = pad_prompts(prompts)
    if tokens.shape[1] > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({tokens.shape[1]} tokens) exceeds the model's max_seq_len="
            f"{model.config.max_seq_len} (the prefill's limit; generation itself is unbounded)"
        )
    out = _generate(
        model, params, tokens, segments, positions, jnp.asarray(stop_ids, jnp.int32),
        jax.random.key(0) if rng is None else rng, max_new_tokens=max_new_tokens,
        temperature=float(temperature), top_k=top_k, top_p=top_p,
    )  # fmt: skip
    return trim_generated(np.asarray(out).tolist(), stop_ids)


def sample_linear_lm(model, params, cfg, *, prompts, max_bytes, seed, png, **sampling) -> str:
    """``SAMPLERS`` entry for the linear-attention LMs (byte-level text, no length cap)."""
    del cfg, png
    return sample_text(
        generate_recurrent, model, params, prompts=prompts, max_bytes=max_bytes, seed=seed,
        **sampling,
    )  # fmt: skip
