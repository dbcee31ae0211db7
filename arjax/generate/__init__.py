"""Generation: sampling rules and cached decoding loops for each model family.

:func:`sample` is the family-agnostic entry used by ``arjax train`` and ``arjax sample``;
each family registers its sampler in ``SAMPLERS``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from arjax.generate.axial import sample_axial, sample_axial_naive, sample_images_text
from arjax.generate.block import sample_block
from arjax.generate.decode import generate_text, generate_tokens, sample_text
from arjax.generate.hat import generate_hat, sample_hat
from arjax.generate.linear import generate_recurrent, sample_linear_lm
from arjax.generate.sampling import filter_logits, sample_token
from arjax.models.linear_lm import LINEAR_MIXERS


def _sample_byte_lm(model, params, cfg, *, prompts, max_bytes, seed, png, **sampling) -> str:
    del cfg, png
    return sample_text(
        generate_tokens, model, params, prompts=prompts, max_bytes=max_bytes, seed=seed,
        max_len=model.config.max_seq_len, **sampling,
    )  # fmt: skip


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
