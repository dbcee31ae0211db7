"""Gated delta rule (Gated DeltaNet) and the delta rule (DeltaNet): three equivalent forms.

``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``o_t = S_t^T q_t``
(Yang, Kautz, Hatamizadeh 2025 "Gated Delta Networks", sec. 3.1; ``log_decay=None`` is
DeltaNet, Yang et al. 2024 "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length"). Forms:

* ``"naive"`` -- the recurrence as written, the float32 reference (:mod:`.naive`);
* ``"chunked"`` -- WY representation / UT transform per chunk, for training
  (:mod:`.chunked`); with ``impl="pallas"`` the kernel in :mod:`kernels_pallas.gated_delta`,
  with ``impl="pallas_mosaic"`` the same with its fused Hopper forward in Pallas Mosaic GPU
  (bf16/fp16, dk 64 or 128, dv a multiple of 64, chunk 64; else a ``ValueError``);
* ``"recurrent"`` -- the per-token delta update with O(1) state, as used for decoding
  (:mod:`.recurrent`).

Nothing is scaled or normalised here (the layer L2-normalises q and k and scales q).
``segment_ids`` resets the state at every document boundary of a packed row; the initial
state belongs to the row's first document.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from arjax.ops import auto_table
from arjax.ops.gated_delta_rule.chunked import chunked_gated_delta_rule
from arjax.ops.gated_delta_rule.common import FORMS, validate
from arjax.ops.gated_delta_rule.naive import naive_gated_delta_rule
from arjax.ops.gated_delta_rule.recurrent import gated_delta_step, recurrent_gated_delta_rule
from arjax.ops.linear_attention.common import (
    KERNEL_LOWERINGS,
    SCAN_IMPLS,
    check_options,
    mosaic_supported,
    pow2_tiles,
)
from arjax.ops.measured import kernel_unless_measured_slower

Form = Literal["naive", "chunked", "recurrent"]


def gated_delta_rule_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    *,
    log_decay: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The float32 ground truth (the recurrence as written); same outputs as
    :func:`gated_delta_rule`."""
    validate(q, k, v, beta, log_decay=log_decay, initial_state=initial_state,
             segment_ids=segment_ids)  # fmt: skip
    return naive_gated_delta_rule(
        q, k, v, beta, log_decay=log_decay, initial_state=initial_state, segment_ids=segment_ids
    )


def resolve_impl(
    form: str,
    impl: str,
    dims: tuple[int, int, int] = (64, 64, 64),
    *,
    seq_len: int = 0,
    dtype: DTypeLike = jnp.float32,
) -> str:
    """What ``impl="auto"`` means: the Pallas kernel for the chunked form on GPU/TPU when
    ``dims`` = (dk, dv, chunk_size) are powers of two >= 16 (the kernels' tiles), unless
    another impl was measured faster near ``seq_len`` on this GPU
    (``arjax.ops.auto_table.GATED_DELTA``): the jnp chunked form (``"xla"``), or the fused
    forward (``"pallas_mosaic"``) where it runs the call (its ``dtype`` and dims); else the jnp
    chunked form."""
    if impl != "auto":
        return impl
    on_accelerator = jax.default_backend() in ("gpu", "tpu")
    kernel = importlib.util.find_spec("kernels_pallas.gated_delta") is not None
    if form == "chunked" and on_accelerator and pow2_tiles(*dims) and kernel:
        allowed = ("xla", "pallas_mosaic") if mosaic_supported(dims, dtype) else ("xla",)
        return kernel_unless_measured_slower(auto_table.GATED_DELTA, (), seq_len, allowed)
    return "xla"


def gated_delta_rule(
    q: jax.Array,  # [batch, len, heads, dk]
    k: jax.Array,  # [batch, len, heads, dk]
    v: jax.Array,  # [batch, len, heads, dv]
    beta: jax.Array,  # [batch, len, heads], the writing strength (sigmoid in the layer)
    *,
    log_decay: jax.Array | None = None,  # [batch, len, heads] <= 0; None: DeltaNet
    initial_state: jax.Array | None = None,  # [batch, heads, dk, dv] float32
    segment_ids: jax.Array | None = None,  # [batch, len] int; a change starts a new document
    form: Form = "chunked",
    chunk_size: int = 64,
    impl: Literal["auto", "xla", "pallas", "pallas_mosaic"] = "auto",
) -> tuple[jax.Array, jax.Array]:
    """``(out [batch, len, heads, dv] in q's dtype, final_state [batch, heads, dk, dv] f32)``.

    ``log_decay`` must be <= 0; it is not checked (values are traced).
    """
    validate(q, k, v, beta, log_decay=log_decay, initial_state=initial_state,
             segment_ids=segment_ids)  # fmt: skip
    check_options("gated_delta_rule", FORMS, form, impl, chunk_size, SCAN_IMPLS)
    args = dict(log_decay=log_decay, initial_state=initial_state, segment_ids=segment_ids)
    if form == "naive":
        return naive_gated_delta_rule(q, k, v, beta, **args)
    if form == "recurrent":
        return recurrent_gated_delta_rule(q, k, v, beta, **args)
    dims = (q.shape[-1], v.shape[-1], chunk_size)
    impl = resolve_impl(form, impl, dims, seq_len=q.shape[1], dtype=q.dtype)
    if impl in KERNEL_LOWERINGS:
        from kernels_pallas.gated_delta import gated_delta_rule as kernel

        return kernel(q, k, v, beta, chunk_size=chunk_size, lowering=KERNEL_LOWERINGS[impl], **args)
    return chunked_gated_delta_rule(q, k, v, beta, chunk_size=chunk_size, **args)


__all__ = [
    "chunked_gated_delta_rule",
    "gated_delta_rule",
    "gated_delta_rule_reference",
    "gated_delta_step",
    "naive_gated_delta_rule",
    "recurrent_gated_delta_rule",
]
