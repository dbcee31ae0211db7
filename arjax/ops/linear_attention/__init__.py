"""Causal linear attention with optional scalar or gated decay: three equivalent forms.

``S_t = diag(a_t) S_{t-1} + k_t v_t^T``, ``o_t = q_t^T S_t``, ``a_t = exp(log_decay_t)``:
``a_t = 1`` is plain linear attention (Katharopoulos et al. 2020), a scalar per head is
retention / Lightning decay (Sun et al. 2023; Qin et al. 2024 "TransNormerLLM"), a
per-key-dim data-dependent gate is GLA (Yang et al. 2024). Forms:

* ``"parallel"`` -- quadratic masked float32 math, the reference (:mod:`.naive`);
* ``"chunked"`` -- chunkwise parallel, for training (:mod:`.chunked`); with
  ``impl="pallas"`` the kernel in :mod:`kernels_pallas.linear_attention_scan` (Triton on GPU),
  with ``impl="pallas_mosaic"`` its fused Hopper forward in Pallas Mosaic GPU (bf16/fp16, dk
  64 or 128, dv a multiple of 64, chunk 64; else a ``ValueError``) and the Triton backward;
  ``impl="auto"`` takes the one measured fastest (:func:`resolve_impl`);
* ``"recurrent"`` -- a per-token scan with O(1) state, as used for decoding (:mod:`.recurrent`).

q is not scaled here (the layer scales it). ``segment_ids`` resets the state at every
document boundary of a packed row; the initial state belongs to the row's first document.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from arjax.ops.linear_attention.chunked import chunked_linear_attention
from arjax.ops.linear_attention.common import (
    FORMS,
    KERNEL_LOWERINGS,
    SCAN_IMPLS,
    check_options,
    mosaic_supported,
    pow2_tiles,
    validate,
)
from arjax.ops.linear_attention.naive import parallel_linear_attention
from arjax.ops.linear_attention.recurrent import (
    linear_attention_step,
    recurrent_linear_attention,
)
from arjax.ops.measured import auto_table, kernel_unless_measured_slower

Form = Literal["parallel", "chunked", "recurrent"]
Impl = Literal["auto", "xla", "pallas", "pallas_mosaic"]


def linear_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    log_decay: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The float32 ground truth (the parallel form); same outputs as :func:`linear_attention`."""
    validate(q, k, v, log_decay=log_decay, initial_state=initial_state, segment_ids=segment_ids)
    return parallel_linear_attention(
        q, k, v, log_decay=log_decay, initial_state=initial_state, segment_ids=segment_ids
    )


def _pallas_available() -> bool:
    try:
        from kernels_pallas.linear_attention_scan import chunked_linear_attention  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(
    form: str,
    impl: str,
    dims: tuple[int, int, int] = (64, 64, 64),
    *,
    gate: str = "none",
    seq_len: int = 0,
    dtype: DTypeLike = jnp.float32,
) -> str:
    """What ``impl="auto"`` means: the Pallas kernel for the chunked form on GPU/TPU when
    ``dims`` = (dk, dv, chunk_size) are powers of two >= 16 (the compiled kernels' tiles),
    unless another impl was measured faster for this ``gate`` (``"none"``, ``"scalar"``,
    ``"gated"``) near ``seq_len`` on this GPU (``arjax.ops.auto_table.SCAN``): the jnp chunked
    form (``"xla"``), or the fused forward (``"pallas_mosaic"``) where it runs the call (its
    ``dtype`` and dims)."""
    if impl != "auto":
        return impl
    on_accelerator = jax.default_backend() in ("gpu", "tpu")
    if form == "chunked" and on_accelerator and pow2_tiles(*dims) and _pallas_available():
        allowed = ("xla", "pallas_mosaic") if mosaic_supported(dims, dtype) else ("xla",)
        return kernel_unless_measured_slower(auto_table.SCAN, (gate,), seq_len, allowed)
    return "xla"


def linear_attention(
    q: jax.Array,  # [batch, len, heads, dk]
    k: jax.Array,  # [batch, len, heads, dk]
    v: jax.Array,  # [batch, len, heads, dv]
    *,
    log_decay: jax.Array | None = None,  # None, [batch, len, heads] or [batch, len, heads, dk]
    initial_state: jax.Array | None = None,  # [batch, heads, dk, dv] float32
    segment_ids: jax.Array | None = None,  # [batch, len] int; a change starts a new document
    form: Form = "chunked",
    chunk_size: int = 64,
    impl: Impl = "auto",
) -> tuple[jax.Array, jax.Array]:
    """``(out [batch, len, heads, dv] in q's dtype, final_state [batch, heads, dk, dv] f32)``.

    ``log_decay`` must be <= 0 (a_t in (0, 1]); it is not checked (values are traced).
    """
    validate(q, k, v, log_decay=log_decay, initial_state=initial_state, segment_ids=segment_ids)
    check_options("linear_attention", FORMS, form, impl, chunk_size, SCAN_IMPLS)
    args = dict(log_decay=log_decay, initial_state=initial_state, segment_ids=segment_ids)
    if form == "parallel":
        return parallel_linear_attention(q, k, v, **args)
    if form == "recurrent":
        return recurrent_linear_attention(q, k, v, **args)
    gate = "none" if log_decay is None else ("scalar" if log_decay.ndim == 3 else "gated")
    dims = (q.shape[-1], v.shape[-1], chunk_size)
    impl = resolve_impl(form, impl, dims, gate=gate, seq_len=q.shape[1], dtype=q.dtype)
    if impl in KERNEL_LOWERINGS:
        from kernels_pallas.linear_attention_scan import chunked_linear_attention as kernel

        return kernel(q, k, v, chunk_size=chunk_size, lowering=KERNEL_LOWERINGS[impl], **args)
    return chunked_linear_attention(q, k, v, chunk_size=chunk_size, **args)


__all__ = [
    "chunked_linear_attention",
    "linear_attention",
    "linear_attention_reference",
    "linear_attention_step",
    "parallel_linear_attention",
    "recurrent_linear_attention",
]
