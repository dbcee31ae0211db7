"""Batched KV-cache decoding for token-level LMs (the transformer LM and friends).

Works with any module exposing ``prefill(tokens, positions, segment_ids, cache_len)`` and
``decode(tokens, positions, cache_index, kv_visible)`` (see
:class:`arjax.models.transformer.TransformerLM`). Prompts of different lengths are
left-padded; padding gets segment 0 and is never attended to.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arjax.data.vocab import BOS_ID, EOS_ID, PAD_ID, decode
from arjax.generate.sampling import sample_token, validate_sampling
from arjax.nn import TransformerConfig, unrolled
from arjax.ops.attention import decode_cache_len


def pad_prompts(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad to ``[batch, max_len]``: tokens, segment ids (0 = pad), positions."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (BOS is prepended)")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), PAD_ID, np.int32)
    segments = np.zeros_like(tokens)
    positions = np.zeros_like(tokens)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = p
        segments[i, width - len(p) :] = 1
        positions[i, width - len(p) :] = np.arange(len(p))
    return tokens, segments, positions


def unscanned_for_decoding(model: nn.Module, params: Any) -> tuple[nn.Module, Any]:
    """The same LM with its ``transformer`` stack unrolled (see :func:`arjax.nn.unrolled`: a
    decode step then updates each layer's cache in place instead of the scanned stack's whole
    cache). Other models are returned as is."""
    if not isinstance(model.config, TransformerConfig) or "transformer" not in params:
        return model, params
    config, stack = unrolled(model.config, params["transformer"])
    return model.clone(config=config), {**params, "transformer": stack}


@functools.partial(
    jax.jit,
    static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p", "window"),
)
def _generate(
    model: nn.Module,
    params: Any,
    tokens: jax.Array,  # [batch, prompt]
    segments: jax.Array,
    positions: jax.Array,
    stop_ids: jax.Array,  # [n_stop] int32
    rng: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    window: int | None,
) -> jax.Array:
    batch, prompt_len = tokens.shape
    cache_len = decode_cache_len(prompt_len + max_new_tokens)
    model, params = unscanned_for_decoding(model, params)
    logits, vars_ = model.apply(
        {"params": params}, tokens, positions, segments, cache_len,
        method="prefill", mutable=["cache"],
    )  # fmt: skip
    slots = jnp.arange(cache_len)
    visible = jnp.pad(segments > 0, ((0, 0), (0, cache_len - prompt_len)))  # [batch, cache_len]
    next_pos = positions[:, -1] + 1  # [batch]

    def step(carry, i):
        cache, visible, logits, done, rng = carry
        rng, key = jax.random.split(rng)
        tok = sample_token(logits, key, temperature=temperature, top_k=top_k, top_p=top_p)
        tok = jnp.where(done, PAD_ID, tok)
        done = done | jnp.isin(tok, stop_ids)
        slot = prompt_len + i
        visible = visible | (slots == slot)[None, :]
        see = visible if window is None else visible & (slots > slot - window)[None, :]
        out, new_vars = model.apply(
            {"params": params, "cache": cache}, tok[:, None], (next_pos + i)[:, None],
            slot, see, method="decode", mutable=["cache"],
        )  # fmt: skip
        return (new_vars["cache"], visible, out[:, -1], done, rng), tok

    done = jnp.zeros((batch,), bool)
    carry = (vars_["cache"], visible, logits[:, -1], done, rng)
    _, generated = jax.lax.scan(step, carry, jnp.arange(max_new_tokens))
    return generated.T  # [batch, max_new_tokens]


def generate_tokens(
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
    """Continue each prompt (token ids, BOS included by the caller) by up to
    ``max_new_tokens``; a sequence stops after emitting one of ``stop_ids`` (kept)."""
    validate_sampling(temperature, top_k, top_p, max_new_tokens)
    tokens, segments, positions = pad_prompts(prompts)
    max_len = model.config.max_seq_len
    if tokens.shape[1] + max_new_tokens > max_len:
        raise ValueError(
            f"prompt ({tokens.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"the model's max_seq_len={max_len}"
        )
    rng = jax.random.key(0) if rng is None else rng
    out = _generate(
        model, params, tokens, segments, positions,
        jnp.asarray(stop_ids, jnp.int32), rng,
        max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k,
        top_p=top_p, window=getattr(model.config, "window", None),
    )  # fmt: skip
    return trim_generated(np.asarray(out).tolist(), stop_ids)


def trim_generated(rows: list[list[int]], stop_ids: tuple[int, ...]) -> list[list[int]]:
    """Each generated row up to its first PAD (dropped) or stop id (kept)."""
    result = []
    for row in rows:
        keep = []
        for t in row:
            if t == PAD_ID:
                break
            keep.append(t)
            if t in stop_ids:
                break
        result.append(keep)
    return result


def generate_text(
    model: nn.Module,
    params: Any,
    prompts: list[str],
    *,
    max_new_bytes: int,
    generate: Callable[..., list[list[int]]] = generate_tokens,
    **kwargs: Any,
) -> list[str]:
    """Byte-level convenience: text prompts in (BOS prepended), continuations out (invalid
    UTF-8 replaced). ``generate`` is any token-level generator with this module's signature."""
    ids = [[BOS_ID, *p.encode("utf-8")] for p in prompts]
    return [
        decode(row) for row in generate(model, params, ids, max_new_tokens=max_new_bytes, **kwargs)
    ]


def sample_text(
    generate: Callable[..., list[list[int]]],
    model: nn.Module,
    params: Any,
    *,
    prompts: list[str],
    max_bytes: int,
    seed: int,
    max_len: int | None = None,
    **sampling: Any,
) -> str:
    """``prompt + continuation`` for each prompt, separated by ``---`` (the CLI's samples).
    ``max_len`` caps prompt + continuation (a KV-cache model's ``max_seq_len``)."""
    if max_len is not None:
        max_bytes = min(max_bytes, max_len - max(len(p.encode()) for p in prompts) - 1)
    texts = generate_text(
        model, params, prompts, max_new_bytes=max(1, max_bytes), generate=generate,
        rng=jax.random.key(seed), **sampling,
    )  # fmt: skip
    return "\n---\n".join(p + t for p, t in zip(prompts, texts))
