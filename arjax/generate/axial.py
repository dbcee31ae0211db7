"""Sampling from the Axial Transformer (Ho et al. 2019, sec. 4): semi-parallel and naive.

Both samplers draw subpixel ``g`` (generation order: channel-major, then raster) with the key
``fold_in(rng, g)``, so with the same ``rng`` they return the same tensors up to float
rounding of the logits.

- :class:`AxialDecoder` (semi-parallel; the family's registered decoder): per channel, the
  channel encoder runs once; the outer
  decoder of axis ``k`` runs once per slice along ``k`` (e.g. once per row), on that slice
  only, with K/V caches of its masked attention; the inner decoder runs once per pixel with
  its row cache. Nested ``lax.scan`` loops, one per axis, all in one ``jit``, like the text
  engine's loop (:mod:`arjax.generate.engine`). It does not implement the engine's one-token
  ``step``: what runs after a value is drawn depends on the level (the inner decoder after
  every pixel, an outer decoder after each finished slice, the channel encoder after each
  channel), and images have no prompts, stop strings or EOS; a token protocol would have to
  carry the whole nest as a state machine for no gain.
- :func:`sample_axial_naive`: one full forward pass of the model per subpixel.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arjax.data.images import image_grid, write_png
from arjax.generate.engine import Decoder
from arjax.generate.sampling import sample_token, validate_sampling
from arjax.models.axial import earlier_channels

SamplingArgs = dict[str, Any]


def _draw(logits: jax.Array, rng: jax.Array, g: jax.Array, sampling: SamplingArgs) -> jax.Array:
    """Values ``[batch]`` for generation index ``g`` from logits ``[batch, levels]``."""
    return sample_token(logits, jax.random.fold_in(rng, g), **sampling)


@functools.partial(jax.jit, static_argnames=("model", "num", "temperature", "top_k", "top_p"))
def _naive(model, params, rng, *, num, temperature, top_k, top_p):
    c = model.config
    n_pix = math.prod(c.shape)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)

    def body(g, tokens):  # tokens [num, pixels, channels]
        channel, flat = jnp.divmod(g, n_pix)
        batch = {"inputs": tokens.reshape(num, *c.shape, c.channels)}
        logits = model.apply({"params": params}, batch).reshape(num, n_pix, c.channels, -1)
        tok = _draw(logits[:, flat, channel], rng, g, sampling)
        return tokens.at[:, flat, channel].set(tok)

    tokens = jnp.zeros((num, n_pix, c.channels), jnp.int32)
    tokens = jax.lax.fori_loop(0, n_pix * c.channels, body, tokens)
    return tokens.reshape(num, *c.shape, c.channels)


@functools.partial(jax.jit, static_argnames=("model", "num", "temperature", "top_k", "top_p"))
def _semi_parallel(model, params, rng, *, num, temperature, top_k, top_p):
    c = model.config
    n = len(c.shape)
    n_pix = math.prod(c.shape)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    call = lambda cache, method, *args: model.apply(  # noqa: E731
        {"params": params, "cache": cache}, *args, method=method, mutable=["cache"]
    )
    shapes = jax.eval_shape(
        lambda: model.apply({"params": params}, num, method="init_cache", mutable=["cache"])
    )[1]["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def level(k, channel, ctx, cache, g0):
        """Sample the slice whose context is ``ctx [num, 1 x k, *shape[k:], d]``; ``g0`` is the
        generation index of its first subpixel. Returns values ``[num, 1 x k, *shape[k:]]``."""
        size = c.shape[k]
        ones = (1,) * (k + 1)

        def step(carry, i):
            cache, prev = carry  # prev: shifted input for index i (zeros at i = 0)
            ctx_i = jax.lax.dynamic_slice_in_dim(ctx, i, 1, axis=1 + k)
            if k == n - 1:  # inner decoder: one pixel
                logits, vars_ = call(cache, "inner_step", prev + ctx_i, i)
                tok = _draw(logits, rng, g0 + i, sampling).reshape(num, *ones)
                emb, _ = call(vars_["cache"], "embed_slice", tok, channel)
                return (vars_["cache"], emb), tok
            stride = math.prod(c.shape[k + 1 :])
            tok, cache = level(k + 1, channel, prev + ctx_i, cache, g0 + i * stride)
            emb, _ = call(cache, "embed_slice", tok, channel)
            out, vars_ = call(cache, "outer_step", k, emb + ctx_i, i)
            return (vars_["cache"], out), tok

        prev = jnp.zeros_like(jax.lax.slice_in_dim(ctx, 0, 1, axis=1 + k))
        (cache, _), toks = jax.lax.scan(step, (cache, prev), jnp.arange(size))
        # toks [size, num, 1 x (k + 1), *shape[k+1:]] -> [num, 1 x k, size, *shape[k+1:]]
        toks = jnp.moveaxis(jnp.squeeze(toks, axis=2 + k), 0, 1 + k)
        return toks, cache

    def channel_step(carry, channel):
        tokens, cache = carry  # tokens [num, *shape, channels]
        emb, _ = call(cache, "embed_channels", tokens)  # [num, *shape, channels, d]
        earlier = jnp.take(earlier_channels(emb), channel, axis=-2)  # [num, *shape, d]
        ctx, _ = call(cache, "slice_context", earlier)
        values, cache = level(0, channel, ctx, cache, channel * n_pix)
        return (tokens.at[..., channel].set(values), cache), None

    tokens = jnp.zeros((num, *c.shape, c.channels), jnp.int32)
    (tokens, _), _ = jax.lax.scan(channel_step, (tokens, cache), jnp.arange(c.channels))
    return tokens


def _validate(model: nn.Module, num: int, temperature: float, top_k, top_p) -> None:
    validate_sampling(temperature, top_k, top_p)
    if not isinstance(num, int) or num <= 0:
        raise ValueError(f"num must be a positive int, got {num!r}")
    if not hasattr(model, "config") or not hasattr(model.config, "levels"):
        raise ValueError(f"model must be an AxialTransformer, got {type(model).__name__}")


def sample_axial_naive(
    model: nn.Module,
    params: Any,
    rng: jax.Array,
    num: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """Reference sampler: a full forward pass per subpixel. Same output as
    :meth:`AxialDecoder.sample`."""
    _validate(model, num, temperature, top_k, top_p)
    return _naive(
        model, params, rng, num=num, temperature=float(temperature), top_k=top_k, top_p=top_p
    )


_SHADES = " .:-=+*#%@"


def ascii_art(images: np.ndarray, levels: int = 256) -> str:
    """Greyscale ``[num, height, width, channels]`` as text (channel mean, 10 shades)."""
    shades = np.asarray(images, np.float64).mean(-1) * len(_SHADES) / levels
    idx = np.clip(shades.astype(int), 0, len(_SHADES) - 1)
    rows = []
    for r in range(idx.shape[1]):
        rows.append("  ".join("".join(_SHADES[v] for v in img[r]) for img in idx))
    return "\n".join(rows)


@dataclasses.dataclass(frozen=True)
class AxialDecoder(Decoder):
    """Semi-parallel sampling of :class:`arjax.models.axial.AxialTransformer` (module doc)."""

    def sample(
        self,
        params: Any,
        rng: jax.Array,
        num: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> jax.Array:
        """int32 ``[num, *shape, channels]`` values in ``[0, levels)``."""
        _validate(self.model, num, temperature, top_k, top_p)
        return _semi_parallel(
            self.model, params, rng, num=num, temperature=float(temperature), top_k=top_k,
            top_p=top_p,
        )  # fmt: skip

    def sample_text(
        self,
        params: Any,
        *,
        prompts: list[str],
        max_bytes: int,
        seed: int,
        png: str | None,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        num: int = 16,
    ) -> str:
        """``num`` samples; with ``png`` a PNG grid is written there (path returned), else the
        first samples as ASCII art. Prompts/max_bytes: unused (images are unconditional)."""
        del prompts, max_bytes
        c = self.model.config
        values = self.sample(
            params, jax.random.key(seed), num, temperature=temperature, top_k=top_k, top_p=top_p
        )
        images = np.asarray(values)
        if png is not None:
            if len(c.shape) != 2 or c.channels not in (1, 3):
                raise ValueError(
                    f"png: needs 2-D images with 1 or 3 channels, got shape={c.shape}, "
                    f"channels={c.channels}"
                )
            pixels = np.round(images * (255.0 / (c.levels - 1))).astype(np.uint8)
            cols = math.ceil(math.sqrt(num))
            path = write_png(Path(png), image_grid(pixels, cols=cols), scale=4)
            return f"wrote {num} samples ({c.shape[0]}x{c.shape[1]}) as a PNG grid: {path}"
        if len(c.shape) != 2:
            return f"{num} samples of shape {images.shape[1:]}; pass png= for 2-D images"
        return ascii_art(images[: min(num, 8)], c.levels)
