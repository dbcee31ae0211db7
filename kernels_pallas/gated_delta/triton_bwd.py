"""GPU backward (Pallas Triton), as the forward (``triton_fwd.py``) in three kernels:

1. :func:`.triton_fwd.prepare` recomputes ``W`` (a parallel kernel; cheaper than keeping a
   float32 ``[batch, heads, len, dk]`` residual per layer from the forward to the backward);
2. :func:`state_grads`, grid (batch, heads, value tiles), chunks in reverse carrying
   ``dS = dL/dS`` (from ``ds_final``): stores ``dh_n = dL/dS_next`` of chunk ``n``, then
   ``dU = (Q K^T * decay_incl)^T dO + (K e_end) dS`` and
   ``dS = (Q g_read)^T dO + carry dS - W^T dU`` (:func:`._chunk.state_grad`);
3. the gradients, parallel over (batch, heads, chunks, value tiles):
   :func:`._chunk.chunk_backward` from the saved ``h_n`` and ``dh_n``.
"""

from __future__ import annotations

import jax
from jax import lax

from kernels_pallas.gated_delta._chunk import (
    F32,
    Cfg,
    chunk_backward,
    gates,
    grad_shapes,
    scores,
    state_grad,
)
from kernels_pallas.gated_delta.triton_fwd import call, dims, loader, prepare, program_ids, rows


def state_grads(inputs: dict, w: jax.Array, do: jax.Array, ds_final: jax.Array, cfg: Cfg):
    """``(dh [batch, heads, chunks, dk, dv], ds0 [batch, heads, dk, dv])`` float32: grid
    (batch, heads, value tiles), chunks in reverse."""
    bsz, length, heads, dk, dv, n_chunks = dims(inputs, cfg)
    c, bv = cfg.chunk, cfg.block_v

    def kernel(ins, w_ref, do_ref, dsf_ref, dh_ref, ds0_ref):
        bi, hi, j = program_ids(3)
        vs = rows(j, bv)
        load = loader(cfg, ins, bi, hi)

        def body(i, ds):
            n = n_chunks - 1 - i
            t = rows(n, c)
            ch = load(n)
            dh_ref[bi, hi, n, :, vs] = ds
            sc, _ = scores(ch, cfg.precision)
            _, ds = state_grad(
                ch, gates(ch), sc, w_ref[bi, hi, t, :], do_ref[bi, t, hi, vs].astype(F32), ds,
                cfg.precision,
            )  # fmt: skip
            return ds

        ds0_ref[bi, hi, :, vs] = lax.fori_loop(0, n_chunks, body, dsf_ref[bi, hi, :, vs])

    out_shape = [
        jax.ShapeDtypeStruct((bsz, heads, n_chunks, dk, dv), F32),
        jax.ShapeDtypeStruct((bsz, heads, dk, dv), F32),
    ]
    grid = (bsz, heads, dv // bv)
    return call(kernel, inputs, (w, do, ds_final), out_shape, grid, cfg, "gated_delta_state_bwd")


def backward(inputs: dict, h: jax.Array, do: jax.Array, ds_final: jax.Array, cfg: Cfg):
    """``(dq, dk, dbeta, dgam_c, dgam_r)`` with a leading value-tile axis (parts to sum),
    ``dv`` and ``ds0``, from the forward's states ``h``."""
    bsz, length, heads, dk, dv, n_chunks = dims(inputs, cfg)
    c, bv, nv = cfg.chunk, cfg.block_v, dv // cfg.block_v
    w, _ = prepare(inputs, cfg, with_values=False)
    dh, ds0 = state_grads(inputs, w, do, ds_final, cfg)

    def kernel(ins, h_ref, do_ref, dh_ref, dq_ref, dk_ref, dv_ref, db_ref, dgc_ref, dgr_ref):
        bi, hi, n, j = program_ids(4)
        t, vs = rows(n, c), rows(j, bv)
        g = chunk_backward(
            loader(cfg, ins, bi, hi)(n, vs=vs), h_ref[bi, hi, n, :, vs],
            do_ref[bi, t, hi, vs].astype(F32), dh_ref[bi, hi, n, :, vs], cfg.precision,
        )  # fmt: skip
        dq_ref[j, bi, t, hi, :] = g.dq
        dk_ref[j, bi, t, hi, :] = g.dk
        dv_ref[bi, t, hi, vs] = g.dv.astype(dv_ref.dtype)
        db_ref[j, bi, hi, t, :] = g.dbeta
        dgc_ref[j, bi, hi, t, :] = g.dgam_c
        dgr_ref[j, bi, hi, n, :, :] = g.dgam_r

    out_shape = grad_shapes(bsz, length, heads, dk, dv, nv, c, inputs["v"].dtype,
                            heads_major=False)[:-1]  # fmt: skip
    grid = (bsz, heads, n_chunks, nv)
    grads = call(kernel, inputs, (h, do, dh), out_shape, grid, cfg, "gated_delta_bwd")
    return (*grads, ds0)
