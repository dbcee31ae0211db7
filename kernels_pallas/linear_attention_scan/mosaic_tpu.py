"""Pallas Mosaic TPU lowering of the linear-attention scan, forward and backward
(``[batch, heads, len, dim]`` layout): the state pass has chunks as an ``arbitrary`` grid axis
carrying the state in VMEM scratch; the chunk kernels are :func:`._chunk.out_kernel` and
:func:`._chunk.grad_kernel` (GLA: two backward kernels), one program per chunk.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.linear_attention_scan._chunk import (
    F32,
    Cfg,
    chunk_grads,
    chunk_output,
    state_step,
)


def state_pass(x, y, b, s_init, r, rp, cfg: Cfg, *, reverse: bool, h_dtype):
    """As :func:`.triton_fwd.state_pass`; grid (batch, heads, chunks), chunks in order (reversed
    for ``reverse``), the state in VMEM."""
    bsz, heads, length, dk = x.shape
    dv = y.shape[3]
    c, n_chunks = cfg.chunk, length // cfg.chunk
    g = b.shape[3] if b is not None else 0

    def chunk_of(n):
        return n_chunks - 1 - n if reverse else n

    def kernel(*refs):
        x_ref, y_ref, *refs = refs
        b_ref = refs.pop(0) if b is not None else None
        s0_ref = refs.pop(0)
        r_ref, rp_ref = (refs.pop(0), refs.pop(0)) if cfg.segments else (None, None)
        h_ref, sf_ref, s_scr = refs
        n = pl.program_id(2)

        @pl.when(n == 0)
        def _():
            s_scr[...] = s0_ref[...]

        s = s_scr[...]
        h_ref[...] = s.astype(h_ref.dtype)
        bb = b_last = r = r_prev = r_last = None
        if b_ref is not None:
            bb, b_last = b_ref[...], b_ref[c - 1 : c, :]
        if r_ref is not None:
            r, r_last, r_prev = r_ref[...], r_ref[c - 1 : c, :], rp_ref[0:1, :]
        s = state_step(s, x_ref[...], y_ref[...], bb, b_last, r, r_prev, r_last, cfg,
                        reverse=reverse)  # fmt: skip
        s_scr[...] = s

        @pl.when(n == n_chunks - 1)
        def _():
            sf_ref[...] = s

    seq = lambda d: pl.BlockSpec((None, None, c, d), lambda i, j, n: (i, j, chunk_of(n), 0))
    full = pl.BlockSpec((None, None, dk, dv), lambda i, j, n: (i, j, 0, 0))
    doc = pl.BlockSpec((None, c, 1), lambda i, j, n: (i, chunk_of(n), 0))
    args, specs = [x, y], [seq(dk), seq(dv)]
    if b is not None:
        args, specs = args + [b], specs + [seq(g)]
    args, specs = args + [s_init], specs + [full]
    if cfg.segments:
        args, specs = args + [r, rp], specs + [doc, doc]
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((bsz, heads, n_chunks, dk, dv), h_dtype),
            jax.ShapeDtypeStruct((bsz, heads, dk, dv), F32),
        ),
        grid=(bsz, heads, n_chunks),
        in_specs=specs,
        out_specs=(
            pl.BlockSpec((None, None, None, dk, dv), lambda i, j, n: (i, j, chunk_of(n), 0, 0)),
            full,
        ),
        scratch_shapes=[pltpu.VMEM((dk, dv), F32)],
        interpret=cfg.interpret,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        name="la_state_bwd" if reverse else "la_state_fwd",
    )(*args)


def chunk_call(kernel, cfg: Cfg, ins: list, outs: list, name: str, *, bwd: bool):
    """Parallel-over-chunks pallas_call; ``ins``/``outs`` as :func:`.triton_fwd.chunk_call`
    (kinds "seq", "state", "doc"; ``bwd`` unused: one set of Mosaic parameters)."""
    bsz, heads, length, _ = ins[0][0].shape
    c = cfg.chunk

    def spec(x, kind):
        d = x.shape[-1]
        if kind == "seq":
            return pl.BlockSpec((None, None, c, d), lambda i, j, n: (i, j, n, 0))
        if kind == "state":
            return pl.BlockSpec((None, None, None) + x.shape[3:], lambda i, j, n: (i, j, n, 0, 0))
        return pl.BlockSpec((None, c, 1), lambda i, j, n: (i, n, 0))

    params = pltpu.CompilerParams(dimension_semantics=("parallel",) * 3)
    return pl.pallas_call(
        functools.partial(kernel, cfg),
        out_shape=[s for s, _ in outs],
        grid=(bsz, heads, length // c),
        in_specs=[spec(x, kind) for x, kind in ins],
        out_specs=[spec(s, kind) for s, kind in outs],
        interpret=cfg.interpret,
        compiler_params=None if cfg.interpret else params,
        name=name,
    )(*[x for x, _ in ins])


def forward(q, k, v, b, h, seg, cfg: Cfg):
    """``(o, None)`` as :func:`.triton_fwd.forward` (no staged scores on TPU)."""
    return chunk_output(chunk_call, q, k, v, b, h, seg, cfg), None


def backward(q, k, v, b, seg, h, a, dh, do, cfg: Cfg) -> tuple:
    """``(dq, dk, dv, db)`` as :func:`.triton_bwd.backward` (``a`` unused on TPU)."""
    return chunk_grads(chunk_call, q, k, v, b, seg, h, dh, do, cfg)
