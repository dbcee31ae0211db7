"""Generation: sampling rules and cached decoding loops for each model family.

:func:`sample` is the family-agnostic entry used by ``arjax train`` and ``arjax sample``;
each family registers its sampler in ``SAMPLERS``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from arjax.data.bpe import load_tokenizer
from arjax.data.vocab import BOS_ID
from arjax.generate.axial import sample_axial, sample_axial_naive, sample_images_text
from arjax.generate.block import sample_block
from arjax.generate.decode import generate_text, generate_tokens, sample_text
from arjax.generate.hat import generate_hat, sample_hat
from arjax.generate.linear import generate_recurrent, sample_linear_lm
from arjax.generate.sampling import filter_logits, sample_token
from arjax.models.linear_lm import LINEAR_MIXERS


def _sample_byte_lm(model, params, cfg, *, prompts, max_bytes, seed, png, **sampling) -> str:
    del png
    if cfg.data.tokenizer is not None:
        return _sample_tokenized(model, params, cfg, prompts, max_bytes, seed, **sampling)
    return sample_text(
        generate_tokens, model, params, prompts=prompts, max_bytes=max_bytes, seed=seed,
        max_len=model.config.max_seq_len, **sampling,
    )  # fmt: skip


def _sample_tokenized(model, params, cfg, prompts, max_bytes, seed, **sampling) -> str:
    """A BPE model (``data.tokenizer``): prompts encoded, continuations decoded by the
    tokenizer and cut to ``max_bytes`` UTF-8 bytes (a token holds at least one byte)."""
    tok = load_tokenizer(cfg.data.tokenizer)
    ids = [[BOS_ID, *tok.encode(p).tolist()] for p in prompts]
    room = model.config.max_seq_len - max(len(i) for i in ids)
    rows = generate_tokens(
        model, params, ids, max_new_tokens=max(1, min(max_bytes, room)),
        rng=jax.random.key(seed), **sampling,
    )  # fmt: skip
    cut = lambda r: tok.decode(r).encode()[:max_bytes].decode(errors="ignore")  # noqa: E731
    return "\n---\n".join(p + cut(r) for p, r in zip(prompts, rows))


# model name -> sampler(model, params, run_cfg, *, prompts, max_bytes, seed, png, **sampling)
SAMPLERS: dict[str, Callable[..., str]] = {
    "hat": sample_hat,
    "transformer": _sample_byte_lm,
    "axial": sample_images_text,
    "block": sample_block,
}

SAMPLERS.update(dict.fromkeys(LINEAR_MIXERS, sample_linear_lm))  # constant-memory decoding


def sample(
    model_name: str,
    model: Any,
    params: Any,
    cfg: Any,
    *,
    prompts: list[str] | None = None,
    max_bytes: int | None = None,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = 0.95,
    seed: int = 0,
    png: str | None = None,
) -> str:
    """A printable sample from a trained model of any registered family."""
    if model_name not in SAMPLERS:
        raise ValueError(f"no sampler registered for model {model_name!r}")
    return SAMPLERS[model_name](
        model, params, cfg,
        prompts=prompts or [cfg.train.sample_prompt],
        max_bytes=cfg.train.sample_bytes if max_bytes is None else max_bytes,
        seed=seed, png=png, temperature=temperature, top_k=top_k, top_p=top_p,
    )  # fmt: skip


__all__ = [
    "SAMPLERS",
    "filter_logits",
    "generate_hat",
    "generate_recurrent",
    "generate_text",
    "generate_tokens",
    "sample",
    "sample_axial",
    "sample_axial_naive",
    "sample_token",
]
