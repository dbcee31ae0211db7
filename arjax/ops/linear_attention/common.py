"""Argument checks and shared preprocessing for the linear-attention forms.

Notation (Katharopoulos et al. 2020, eq. 5; Yang et al. 2024 "Gated Linear Attention",
eq. 2): ``S_t = diag(a_t) S_{t-1} + k_t v_t^T`` and ``o_t = q_t^T S_t`` with
``a_t = exp(log_decay_t)``. A document boundary (``segment_ids`` changes) zeroes the state
before the update, so packed documents never see each other.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

FORMS = ("parallel", "chunked", "recurrent")
IMPLS = ("auto", "xla", "pallas")  # the chunked ops' (gated delta rule, the mixers' configs)
# linear_attention's and gated_delta_rule's: also the kernels with their fused Hopper forward
SCAN_IMPLS = (*IMPLS, "pallas_mosaic")
KERNEL_LOWERINGS = {"pallas": "triton", "pallas_mosaic": "mosaic"}  # the kernels' per impl


def validate(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    log_decay: jax.Array | None,
    initial_state: jax.Array | None,
    segment_ids: jax.Array | None,
    who: str = "linear_attention",
) -> None:
    """Raise ``ValueError`` naming the bad argument (trace time, before compiling); messages
    start with ``who`` (the public op being called)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{who}: {name} must be 4-D, got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{who}: {name} must be floating point, got {x.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"{who}: q {q.shape} and k {k.shape} must both be [batch, len, heads, dk]")
    b, length, h, dk = q.shape
    if v.shape[:3] != (b, length, h):
        raise ValueError(
            f"{who}: v must be [batch, len, heads, dv]={(b, length, h)} + (dv,), got {v.shape}"
        )
    if log_decay is not None:
        if log_decay.shape not in ((b, length, h), (b, length, h, dk)):
            raise ValueError(
                f"{who}: log_decay must be [batch, len, heads]={(b, length, h)} or "
                f"[batch, len, heads, dk]={(b, length, h, dk)}, got {log_decay.shape}"
            )
        if not jnp.issubdtype(log_decay.dtype, jnp.floating):
            raise ValueError(f"{who}: log_decay must be floating, got {log_decay.dtype}")
    if initial_state is not None:
        want = (b, h, dk, v.shape[3])
        if initial_state.shape != want:
            raise ValueError(
                f"{who}: initial_state must be [batch, heads, dk, dv]={want}, "
                f"got {initial_state.shape}"
            )
        if initial_state.dtype != jnp.float32:
            raise ValueError(f"{who}: initial_state must be float32, got {initial_state.dtype}")
    if segment_ids is not None:
        if segment_ids.shape != (b, length):
            raise ValueError(
                f"{who}: segment_ids must be [batch, len]={(b, length)}, got {segment_ids.shape}"
            )
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"{who}: segment_ids must be integer, got {segment_ids.dtype}")


def check_options(
    who: str,
    forms: tuple[str, ...],
    form: str,
    impl: str,
    chunk_size,
    impls: tuple[str, ...] = IMPLS,
) -> None:
    """``ValueError`` for an unknown ``form`` / ``impl`` (one of ``impls``), a bad
    ``chunk_size`` or a kernel ``impl`` with a form the kernels do not run (only
    ``"chunked"``)."""
    if form not in forms:
        raise ValueError(f"{who}: form must be one of {forms}, got {form!r}")
    if impl not in impls:
        raise ValueError(f"{who}: impl must be one of {impls}, got {impl!r}")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"{who}: chunk_size must be a positive int, got {chunk_size!r}")
    if impl not in ("auto", "xla") and form != "chunked":
        raise ValueError(f"{who}: impl={impl!r} needs form='chunked', got {form!r}")


def mosaic_supported(dims: tuple[int, int, int], dtype: DTypeLike) -> bool:
    """Whether the fused Mosaic GPU forward (``impl="pallas_mosaic"``, shared by the scan and
    the gated delta rule) runs (dk, dv, chunk_size) = ``dims`` and ``dtype``."""
    from kernels_pallas.linear_attention_scan import mosaic_gpu_fwd

    dk, dv, chunk = dims
    q, v = (jax.ShapeDtypeStruct((d,), dtype) for d in (dk, dv))
    try:
        mosaic_gpu_fwd.check_supported(q, v, chunk=chunk)
    except ValueError:
        return False
    return True


def pow2_tiles(*dims: int) -> bool:
    """Every dim a power of two >= 16 (the tiles of the compiled Pallas scan kernels)."""
    return all(n >= 16 and n & (n - 1) == 0 for n in dims)


def document_index(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
    """``[batch, len]`` int32 count of boundaries so far (0 for the first document).

    Position ``t > 0`` starts a new document when ``segment_ids[t] != segment_ids[t-1]``;
    the initial state belongs to document 0.
    """
    if segment_ids is None:
        return jnp.zeros((batch, length), jnp.int32)
    starts = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = jnp.pad(starts, ((0, 0), (1, 0)))
    return jnp.cumsum(starts.astype(jnp.int32), axis=1)


def as_float32(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    log_decay: jax.Array | None,
    initial_state: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """float32 q, k, v, log_decay (zeros ``[b, len, h]`` when None) and initial state."""
    b, length, h, dk = q.shape
    qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
    if log_decay is None:
        log_decay = jnp.zeros((b, length, h), jnp.float32)
    if initial_state is None:
        initial_state = jnp.zeros((b, h, dk, v.shape[3]), jnp.float32)
    return qf, kf, vf, log_decay.astype(jnp.float32), initial_state


def masked_exp(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``exp(x)`` where ``mask`` else 0, with finite gradients (x may overflow where masked)."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)
