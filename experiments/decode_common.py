"""Shared by the decode benchmarks: the generation engine's jitted loop on fixed prompts."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from arjax.data.vocab import BOS_ID
from arjax.generate import decoder_for
from arjax.generate.engine import Decoder, _run


def without_eos(decoder: Decoder) -> Decoder:
    """The same decoder with no id that ends a row (EOS is then an ordinary id), so every row
    generates the full length: timed runs do the same work whatever the weights."""
    cls = type(decoder)
    plain = dataclasses.dataclass(frozen=True)(
        type(f"{cls.__name__}NoEOS", (cls,), {"ends": property(lambda self: ())})
    )
    return plain(**{f.name: getattr(decoder, f.name) for f in dataclasses.fields(decoder)})


def engine_call(
    decoder: Decoder, params: Any, prompts: np.ndarray, gen: int, **sampling: Any
) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the engine's loop (:func:`arjax.generate.engine._run`) on
    ``prompts`` (int ``[batch, width]`` ids, all of full width) for ``gen`` new tokens, no stop
    strings, key 0, greedy unless ``sampling`` says otherwise."""
    tokens = jnp.asarray(prompts, jnp.int32)
    lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    layout = decoder.layout(np.asarray(prompts), np.asarray(lengths))
    stops, stop_lens = jnp.zeros((0, 1), jnp.int32), jnp.zeros((0,), jnp.int32)
    args = (decoder, params, tokens, lengths, stops, stop_lens, jax.random.key(0))
    kw = dict(max_new=gen, layout=layout, return_logits=False, temperature=0.0, top_k=None,
              top_p=None) | sampling  # fmt: skip
    return args, kw


def engine_runner(
    model: Any, params: Any, prompts: np.ndarray, gen: int, decoder: Decoder | None = None,
    **sampling: Any,
) -> tuple[Callable[[], dict], Callable[[], dict[str, int]]]:  # fmt: skip
    """``run()``: the engine's loop on ``prompts`` (int ``[batch, width]`` ids, all of full
    width) for ``gen`` new tokens with ``decoder`` (default: the model's registered one), no
    EOS, greedy unless ``sampling`` says otherwise (``run.lower()``: that call lowered);
    ``cache_bytes()``: bytes per sequence of each decode cache (from shapes only)."""
    decoder = without_eos(decoder_for(model) if decoder is None else decoder)
    params = jax.device_put(params)  # on the device once: host (e.g. unpickled) params would
    # be copied to it at every timed call
    args, kw = engine_call(decoder, params, prompts, gen, **sampling)
    _, _, tokens, lengths, *_ = args  # cache_bytes() prefills them
    layout = kw["layout"]

    def run() -> dict:
        return _run(*args, **kw)

    run.lower = lambda: _run.lower(*args, **kw)  # the same call, lowered (profile_decode.py)

    def cache_bytes() -> dict[str, int]:
        def state(p):
            return decoder.prefill(decoder.prepare(p), tokens, lengths, layout=layout, max_new=gen)[
                1
            ]

        sizes = decoder.cache_bytes(jax.eval_shape(state, params))
        return {k: v // tokens.shape[0] for k, v in sizes.items()}

    return run, cache_bytes


def random_prompts(batch: int, width: int, seed: int = 0) -> np.ndarray:
    """``[batch, width]`` random bytes after BOS."""
    tokens = np.random.default_rng(seed).integers(0, 256, (batch, width)).astype(np.int32)
    tokens[:, 0] = BOS_ID
    return tokens
