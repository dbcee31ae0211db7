"""Fused one-token decode update of linear attention (the recurrent form), Pallas Triton or
Mosaic TPU (one program per batch x head)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.linear_attention_scan._chunk import BACKENDS, F32, is_pow2, resolve


def _step_kernel(gate: str, q_ref, k_ref, v_ref, *refs):
    """``S' = diag(a) S + k v^T``, ``o = S'^T q`` for one (batch, head); vectors are ``[1, d]``."""
    g_ref = refs[0] if gate != "none" else None
    s_ref, o_ref, s_out = refs[-3:]
    s = s_ref[...]
    if g_ref is not None:
        s = s * jnp.exp(g_ref[...].astype(F32)).T  # [dk | 1, 1]
    s = s + k_ref[...].astype(F32).T * v_ref[...].astype(F32)  # [dk, dv]
    s_out[...] = s
    o_ref[...] = jnp.sum(s * q_ref[...].astype(F32).T, axis=0, keepdims=True).astype(o_ref.dtype)


def recurrent_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    state: jax.Array,
    *,
    log_decay: jax.Array | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Fused one-token decode update (the recurrent form, GLA paper eq. 2).

    q/k ``[batch, heads, dk]``, v ``[batch, heads, dv]``, state ``[batch, heads, dk, dv]``
    float32 (updated in place when donated), log_decay None, ``[batch, heads]`` or
    ``[batch, heads, dk]``. Returns ``(out [batch, heads, dv] in q.dtype, new_state)``.
    """
    backend, interpret = resolve(backend, interpret)
    if q.ndim != 3 or q.shape != k.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"recurrent_step: q/k must be [batch, heads, dk] and v [batch, heads, dv], "
            f"got {q.shape} {k.shape} {v.shape}"
        )
    bsz, heads, dk = q.shape
    dv = v.shape[2]
    if state.shape != (bsz, heads, dk, dv) or state.dtype != jnp.float32:
        raise ValueError(
            f"recurrent_step: state must be float32 {(bsz, heads, dk, dv)}, "
            f"got {state.dtype} {state.shape}"
        )
    if log_decay is not None and log_decay.shape not in ((bsz, heads), (bsz, heads, dk)):
        raise ValueError(
            f"recurrent_step: log_decay must be [batch, heads] or [batch, heads, dk], "
            f"got {log_decay.shape}"
        )
    if backend not in BACKENDS:
        raise ValueError(f"recurrent_step: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "gpu" and not interpret and not (is_pow2(dk) and is_pow2(dv)):
        raise ValueError(
            f"recurrent_step: the Triton kernel needs dk and dv powers of two, got {dk}, {dv}"
        )
    gate = "none" if log_decay is None else "gated"
    vec = lambda x: x.reshape(bsz, heads, 1, -1)  # [b, h, 1, d]
    args = [vec(q), vec(k), vec(v)] + ([vec(log_decay)] if log_decay is not None else [])
    args.append(state)
    row = lambda x: pl.BlockSpec((None, None, 1, x.shape[3]), lambda i, j: (i, j, 0, 0))
    st = pl.BlockSpec((None, None, dk, dv), lambda i, j: (i, j, 0, 0))
    out_shape = (jax.ShapeDtypeStruct((bsz, heads, 1, dv), q.dtype), state)
    params = None
    if not interpret:
        params = (pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
                  if backend == "tpu" else pltriton.CompilerParams(num_warps=4))  # fmt: skip
    o, new_state = pl.pallas_call(
        functools.partial(_step_kernel, gate),
        out_shape=(out_shape[0], jax.ShapeDtypeStruct(state.shape, F32)),
        grid=(bsz, heads),
        in_specs=[row(x) for x in args[:-1]] + [st],
        out_specs=(row(out_shape[0]), st),
        input_output_aliases={len(args) - 1: 1},
        interpret=interpret,
        compiler_params=params,
        name="la_recurrent_step",
    )(*args)
    return o[:, :, 0], new_state
