"""GPU backward (Pallas Triton): the forward's grid (``triton_fwd.py``), chunks in reverse
from the saved states, carrying ``dL/dS``."""

from __future__ import annotations

import jax
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.gated_delta._chunk import F32, Cfg, chunk_backward, grad_shapes
from kernels_pallas.gated_delta.triton_fwd import compiler_params, loader


def backward(inputs: dict, h: jax.Array, do: jax.Array, ds_final: jax.Array, cfg: Cfg):
    """Reverse pass over chunks: ``(dq, dk, dbeta, dgam_c, dgam_r)`` with a leading
    value-tile axis (parts to sum), ``dv`` and ``ds0``."""
    names = list(inputs)
    bsz, length, heads, dk = inputs["q"].shape
    dv = inputs["v"].shape[3]
    bv, n_chunks, c = cfg.block_v, length // cfg.chunk, cfg.chunk
    nv = dv // bv

    def kernel(*refs):
        ins = dict(zip(names, refs))
        h_ref, do_ref, dsf_ref, dq_ref, dk_ref, dv_ref, db_ref, dgc_ref, dgr_ref, ds0_ref = refs[
            len(names) :
        ]
        bi, hi, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        vs = pl.ds(pl.multiple_of(j * bv, bv), bv)
        load = loader(cfg, bi, hi, vs, ins)

        def body(i, ds):
            n = n_chunks - 1 - i
            t = pl.ds(pl.multiple_of(n * c, c), c)
            g = chunk_backward(
                load(n), h_ref[bi, hi, n, :, vs], do_ref[bi, t, hi, vs].astype(F32), ds,
                cfg.precision,
            )  # fmt: skip
            dq_ref[j, bi, t, hi, :] = g.dq
            dk_ref[j, bi, t, hi, :] = g.dk
            dv_ref[bi, t, hi, vs] = g.dv.astype(dv_ref.dtype)
            db_ref[j, bi, hi, t, :] = g.dbeta
            dgc_ref[j, bi, hi, t, :] = g.dgam_c
            dgr_ref[j, bi, hi, n, :, :] = g.dgam_r
            return g.ds

        ds0_ref[bi, hi, :, vs] = lax.fori_loop(0, n_chunks, body, dsf_ref[bi, hi, :, vs])

    out_shape = grad_shapes(bsz, length, heads, dk, dv, nv, c, inputs["v"].dtype, heads_major=False)
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(bsz, heads, nv), interpret=cfg.interpret,
        compiler_params=compiler_params(cfg), name="gated_delta_bwd",
    )(*inputs.values(), h, do, ds_final)  # fmt: skip
