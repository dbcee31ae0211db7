"""Generation: one decoding protocol (:class:`Decoder`) every family implements and one
jitted sampling loop (:func:`generate`); see :mod:`arjax.generate.engine`.

:func:`sample` is the printable sample of ``arjax train`` and ``arjax sample``.
"""

from __future__ import annotations

from typing import Any

from arjax.data.bpe import load_tokenizer
from arjax.generate.engine import Decoder, Generation, decoder_for, generate
from arjax.generate.sampling import filter_logits, sample_token


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
    """A printable sample from a trained model of any registered family: each prompt and
    its continuation, separated by ``---`` (an image family renders its samples instead; a
    run with ``data.tokenizer`` generates tokens of that tokenizer)."""
    from arjax.models import get_model_spec

    decoder = get_model_spec(model_name).decoder_cls()(model)
    path = getattr(getattr(cfg, "data", None), "tokenizer", None)
    extra = {} if path is None else {"tokenizer": load_tokenizer(path)}
    return decoder.sample_text(
        params,
        prompts=prompts or [cfg.train.sample_prompt],
        max_bytes=cfg.train.sample_bytes if max_bytes is None else max_bytes,
        seed=seed,
        png=png,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        **extra,
    )


__all__ = [
    "Decoder",
    "Generation",
    "decoder_for",
    "filter_logits",
    "generate",
    "sample",
    "sample_token",
]
