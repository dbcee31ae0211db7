"""GPU forward (Pallas Triton): grid (batch, heads, value tiles); each program runs its
chunks in order (the backward, ``triton_bwd.py``, in reverse), keeping its ``[dk, bv]`` state
tile in registers.

Native layouts: ``q, k [batch, len, heads, dk]``, ``v, o [batch, len, heads, dv]``;
``beta``/``gam`` as columns ``[batch, heads, len, 1]``, ``gam`` also as rows ``[batch, heads,
chunks, 1, C]``; document masks ``[batch, len, 1]`` / ``[batch, chunks, 1, C]``.
"""

from __future__ import annotations

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.gated_delta._chunk import F32, Cfg, Chunk, chunk_forward


def loader(cfg: Cfg, bi, hi, vs, refs: dict):
    """``load(n) -> Chunk`` for chunk ``n`` of program (bi, hi, value slice vs)."""
    c = cfg.chunk

    def load(n) -> Chunk:
        t = pl.ds(pl.multiple_of(n * c, c), c)
        same = reads = last = None
        if cfg.segments:
            same = refs["doc_c"][bi, t, :] == refs["doc_r"][bi, n, :, :]
            reads, last = refs["reads"][bi, t, :], refs["last"][bi, t, :]
        return Chunk(
            refs["q"][bi, t, hi, :].astype(F32), refs["k"][bi, t, hi, :].astype(F32),
            refs["v"][bi, t, hi, vs].astype(F32),
            refs["beta_c"][bi, hi, t, :], refs["gam_c"][bi, hi, t, :],
            refs["gam_r"][bi, hi, n, :, :], same, reads, last,
        )  # fmt: skip

    return load


def compiler_params(cfg: Cfg):
    return None if cfg.interpret else pltriton.CompilerParams(num_warps=4, num_stages=1)


def forward(inputs: dict, s0: jax.Array, cfg: Cfg, *, save_states: bool):
    """``(o, s_final, h)``: ``h [batch, heads, chunks, dk, dv]`` f32 states entering each
    chunk (only with ``save_states``, for the backward; else None)."""
    names = list(inputs)
    bsz, length, heads, dk = inputs["q"].shape
    dv = inputs["v"].shape[3]
    bv, n_chunks, c = cfg.block_v, length // cfg.chunk, cfg.chunk

    def kernel(*refs):
        ins = dict(zip(names, refs))
        s0_ref, o_ref, sf_ref, *h_ref = refs[len(names) :]
        bi, hi, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        vs = pl.ds(pl.multiple_of(j * bv, bv), bv)
        load = loader(cfg, bi, hi, vs, ins)

        def body(n, s):
            if save_states:
                h_ref[0][bi, hi, n, :, vs] = s
            out, s = chunk_forward(load(n), s, cfg.precision)
            o_ref[bi, pl.ds(pl.multiple_of(n * c, c), c), hi, vs] = out.astype(o_ref.dtype)
            return s

        sf_ref[bi, hi, :, vs] = lax.fori_loop(0, n_chunks, body, s0_ref[bi, hi, :, vs])

    out_shape = [
        jax.ShapeDtypeStruct((bsz, length, heads, dv), inputs["q"].dtype),
        jax.ShapeDtypeStruct((bsz, heads, dk, dv), F32),
    ]
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((bsz, heads, n_chunks, dk, dv), F32))
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(bsz, heads, dv // bv), interpret=cfg.interpret,
        compiler_params=compiler_params(cfg), name="gated_delta_fwd",
    )(*inputs.values(), s0)  # fmt: skip
    return outs[0], outs[1], (outs[2] if save_states else None)
