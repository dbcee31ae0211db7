"""TPU backward (Pallas Mosaic TPU): the forward's grid (``mosaic_tpu_fwd.py``) with the chunk
axis reversed, ``dL/dS`` carried in VMEM scratch."""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.gated_delta._chunk import F32, Cfg, chunk_backward, grad_shapes
from kernels_pallas.gated_delta.mosaic_tpu_fwd import compiler_params, load, specs


def backward(inputs: dict, h: jax.Array, do: jax.Array, ds_final: jax.Array, cfg: Cfg):
    """As :func:`kernels_pallas.gated_delta.triton_bwd.backward`, in head-major layouts: one
    value tile per program (:func:`._chunk.chunk_backward`), the tiles' float32 parts of
    ``dq``, ``dk``, ``dbeta``, ``dgam`` summed after the kernel."""
    names = list(inputs)
    bsz, heads, length, dk = inputs["q"].shape
    dv = inputs["v"].shape[3]
    c, n_chunks, nv = cfg.chunk, length // cfg.chunk, dv // cfg.block_v
    sp = specs(names, cfg, dk, n_chunks, reverse=True)

    def kernel(*refs):
        ins = dict(zip(names, refs))
        h_ref, do_ref, dsf_ref, dq_ref, dk_ref, dv_ref, db_ref, dgc_ref, dgr_ref, ds0_ref = refs[
            len(names) : -1
        ]
        scratch, n = refs[-1], pl.program_id(3)

        @pl.when(n == 0)
        def _():
            scratch[...] = dsf_ref[...]

        g, dv_n, ds = chunk_backward(
            load(ins, cfg), h_ref[...], do_ref[...].astype(F32), scratch[...], cfg.precision
        )
        dq_ref[...], dk_ref[...], dv_ref[...] = g.dq, g.dk, dv_n.astype(dv_ref.dtype)
        db_ref[...], dgc_ref[...], dgr_ref[...] = g.dbeta, g.dgam_c, g.dgam_r
        scratch[...] = ds

        @pl.when(n == n_chunks - 1)
        def _():
            ds0_ref[...] = ds

    out_shape = grad_shapes(bsz, length, heads, dk, dv, c, F32, inputs["v"].dtype, parts=nv,
                            heads_major=True)  # fmt: skip
    out_specs = [sp["part_k"], sp["part_k"], sp["v"], sp["part_col"], sp["part_col"],
                 sp["part_row"], sp["state"]]  # fmt: skip
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(bsz, heads, nv, n_chunks),
        in_specs=sp["inputs"] + [sp["h"], sp["v"], sp["state"]], out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((dk, cfg.block_v), F32)], interpret=cfg.interpret,
        compiler_params=compiler_params(cfg), name="gated_delta_bwd",
    )(*inputs.values(), h, do, ds_final)  # fmt: skip
    return tuple(x if i in (2, 6) else x.sum(0) for i, x in enumerate(outs))  # dv, ds0 whole
