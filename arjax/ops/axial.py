"""Axial attention: softmax attention along one axis of an N-D tensor (Ho et al. 2019, sec. 3).

q, k, v ``[batch, *spatial, heads, head_dim]`` with the same ``spatial`` shape
(e.g. ``[batch, rows, cols, heads, head_dim]`` for images, ``[batch, frames, rows, cols, ...]``
for video). Every position attends only to the positions that share all its other spatial
indices, i.e. to its own "row" along ``axis``; with ``causal`` only to those at an index
``<=`` its own along ``axis`` (the paper's masked axial attention). The fast form folds the
other axes into the batch and calls :func:`arjax.ops.attention`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from einops import rearrange

from arjax.ops.attention import Impl, attention


def _axis_patterns(num_spatial: int, axis: int, trailing: str) -> tuple[str, str]:
    """einops patterns ``b s0 .. s{n-1} trailing`` <-> ``(b others) s{axis} trailing``."""
    names = [f"s{i}" for i in range(num_spatial)]
    others = " ".join(n for i, n in enumerate(names) if i != axis)
    return f"b {' '.join(names)} {trailing}", f"(b {others}) {names[axis]} {trailing}"


def check_axis(axis: int, num_spatial: int, name: str = "axis") -> int:
    """Normalise a (possibly negative) spatial axis; ``ValueError`` naming it if out of range."""
    if not isinstance(axis, int) or not -num_spatial <= axis < num_spatial:
        raise ValueError(f"{name} must be an int in [-{num_spatial}, {num_spatial}), got {axis!r}")
    return axis % num_spatial


def fold_axis(
    x: jax.Array, axis: int, num_trailing: int = 1
) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """``[batch, *spatial, *trailing]`` -> ``[batch * others, spatial[axis], *trailing]``.

    Returns the folded array and the inverse (which accepts any trailing shape).
    ``num_trailing`` counts the non-spatial dims at the end (1 for features,
    2 for ``heads, head_dim``).
    """
    num_spatial = x.ndim - 1 - num_trailing
    if num_spatial < 1:
        raise ValueError(
            f"fold_axis: need [batch, *spatial, {num_trailing} trailing dims], got {x.shape}"
        )
    axis = check_axis(axis, num_spatial)
    trailing = " ".join(f"t{i}" for i in range(num_trailing))
    full, folded = _axis_patterns(num_spatial, axis, trailing)
    sizes = {f"s{i}": x.shape[1 + i] for i in range(num_spatial)}

    def unfold(y: jax.Array) -> jax.Array:
        tail = " ".join(f"u{i}" for i in range(y.ndim - 2))
        src, dst = _axis_patterns(num_spatial, axis, tail)
        return rearrange(y, f"{dst} -> {src}", **sizes)

    return rearrange(x, f"{full} -> {folded}"), unfold


def _validate(q: jax.Array, k: jax.Array, v: jax.Array, axis: int) -> int:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim < 4:
            raise ValueError(
                f"axial_attention: {name} must be [batch, *spatial, heads, head_dim], "
                f"got shape {x.shape}"
            )
    if k.shape[:-2] != q.shape[:-2] or v.shape[:-2] != q.shape[:-2]:
        raise ValueError(
            f"axial_attention: q {q.shape}, k {k.shape}, v {v.shape} differ in batch/spatial dims"
        )
    return check_axis(axis, q.ndim - 3)


def axial_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    axis: int,
    causal: bool = False,
    scale: float | None = None,
) -> jax.Array:
    """Naive float32 axial attention, written without folding (ground truth for tests)."""
    axis = _validate(q, k, v, axis)
    if k.shape[-2] != q.shape[-2] or k.shape[-1] != q.shape[-1] or v.shape != k.shape:
        raise ValueError(f"axial_attention: reference needs equal heads, got {q.shape}, {k.shape}")
    a = 1 + axis  # array axis of the attended spatial axis
    # Move the attended axis next to the heads: [batch, *others, len, heads, head_dim].
    qf, kf, vf = (jnp.moveaxis(x.astype(jnp.float32), a, -3) for x in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = jnp.einsum("...qhd,...khd->...hqk", qf, kf, precision="highest") * scale
    if causal:
        n = q.shape[a]
        logits = jnp.where(jnp.tril(jnp.ones((n, n), bool)), logits, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("...hqk,...khd->...qhd", p, vf, precision="highest")
    return jnp.moveaxis(out, -3, a).astype(q.dtype)


def axial_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    axis: int,
    causal: bool = False,
    scale: float | None = None,
    impl: Impl = "auto",
) -> jax.Array:
    """Attention along spatial ``axis``; returns ``[batch, *spatial, heads, head_dim]``.

    ``causal`` is the paper's masked axial attention (sec. 3): index ``i`` along ``axis``
    sees indices ``<= i``. Any implementation of :func:`arjax.ops.attention` (GQA included).
    """
    axis = _validate(q, k, v, axis)
    qf, unfold = fold_axis(q, axis, num_trailing=2)  # [batch * others, len, heads, head_dim]
    kf, _ = fold_axis(k, axis, num_trailing=2)
    vf, _ = fold_axis(v, axis, num_trailing=2)
    return unfold(attention(qf, kf, vf, causal=causal, scale=scale, impl=impl))
