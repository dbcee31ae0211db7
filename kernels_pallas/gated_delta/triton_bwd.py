"""GPU backward (Pallas Triton), as the forward (``triton_fwd.py``) in three kernels:

1. :func:`.triton_fwd.prepare` recomputes ``W`` (a parallel kernel; cheaper than keeping a
   float32 ``[batch, heads, len, dk]`` residual per layer from the forward to the backward);
2. :func:`state_grads`, grid (batch, heads, value tiles), chunks in reverse carrying
   ``dS = dL/dS`` (from ``ds_final``): stores ``dh_n = dL/dS_next`` of chunk ``n``, then
   ``dU = (Q K^T * decay_incl)^T dO + (K e_end) dS`` and
   ``dS = (Q g_read)^T dO + carry dS - W^T dU`` (:func:`._chunk.u_grad`,
   :func:`._chunk.state_grad`);
3. the gradients from the saved ``h_n`` and ``dh_n``, parallel over (batch, heads, chunks):
   the value-independent UT transform and scores once (:func:`._chunk.recompute`), the value
   tiles in turn summing their terms (:func:`._chunk.tile_backward`), then the backward
   through the UT transform and the gates once (:func:`._chunk.finish_backward`).
"""

from __future__ import annotations

import jax
from jax import lax

from kernels_pallas.gated_delta._chunk import (
    F32,
    Cfg,
    finish_backward,
    gates,
    grad_shapes,
    no_partials,
    recompute,
    scores,
    state_grad,
    tile_backward,
    u_grad,
)
from kernels_pallas.gated_delta.triton_fwd import (
    call,
    dims,
    loader,
    prepare,
    program_ids,
    rows,
    with_value_tile,
)


def state_grads(inputs: dict, w: jax.Array, do: jax.Array, ds_final: jax.Array, cfg: Cfg):
    """``(dh [batch, heads, chunks, dk, dv], ds0 [batch, heads, dk, dv])`` float32: grid
    (batch, heads, value tiles), chunks in reverse."""
    bsz, length, heads, dk, dv, n_chunks = dims(inputs, cfg)
    c, bv, prec = cfg.chunk, cfg.block_v, cfg.precision

    def kernel(ins, w_ref, do_ref, dsf_ref, dh_ref, ds0_ref):
        bi, hi, j = program_ids(3)
        vs = rows(j, bv)
        load = loader(cfg, ins, bi, hi)

        def body(i, ds):
            n = n_chunks - 1 - i
            t = rows(n, c)
            ch = load(n)
            dh_ref[bi, hi, n, :, vs] = ds
            g, do_n, w_n = gates(ch), do_ref[bi, t, hi, vs].astype(F32), w_ref[bi, hi, t, :]
            du = u_grad(ch, g, scores(ch, prec)[0], do_n, ds, prec)
            return state_grad(ch, g, w_n, do_n, ds, du, prec)

        ds0_ref[bi, hi, :, vs] = lax.fori_loop(0, n_chunks, body, dsf_ref[bi, hi, :, vs])

    out_shape = [
        jax.ShapeDtypeStruct((bsz, heads, n_chunks, dk, dv), F32),
        jax.ShapeDtypeStruct((bsz, heads, dk, dv), F32),
    ]
    grid = (bsz, heads, dv // bv)
    return call(kernel, inputs, (w, do, ds_final), out_shape, grid, cfg, "gated_delta_state_bwd")


def backward(inputs: dict, h: jax.Array, do: jax.Array, ds_final: jax.Array, cfg: Cfg):
    """``(dq, dk, dv, dbeta, dgam_c, dgam_r, ds0)`` (:func:`._chunk.grad_shapes`, no value-tile
    axis) from the forward's states ``h``."""
    bsz, length, heads, dk, dv, n_chunks = dims(inputs, cfg)
    c, bv, prec = cfg.chunk, cfg.block_v, cfg.precision
    w, _ = prepare(inputs, cfg, with_values=False)
    dh, ds0 = state_grads(inputs, w, do, ds_final, cfg)

    def kernel(ins, h_ref, do_ref, dh_ref, dq_ref, dk_ref, dv_ref, db_ref, dgc_ref, dgr_ref):
        bi, hi, n = program_ids(3)
        t = rows(n, c)
        ch = loader(cfg, ins, bi, hi)(n)
        r = recompute(ch, prec)

        def tile(j, p):
            vs = rows(j, bv)
            p, dv_j, _ = tile_backward(
                with_value_tile(ch, ins, bi, t, hi, vs), r, h_ref[bi, hi, n, :, vs],
                do_ref[bi, t, hi, vs].astype(F32), dh_ref[bi, hi, n, :, vs], p, prec,
            )  # fmt: skip
            dv_ref[bi, t, hi, vs] = dv_j.astype(dv_ref.dtype)
            return p

        g = finish_backward(ch, r, lax.fori_loop(0, dv // bv, tile, no_partials(c, dk)), prec)
        dq_ref[bi, t, hi, :] = g.dq.astype(dq_ref.dtype)
        dk_ref[bi, t, hi, :] = g.dk.astype(dk_ref.dtype)
        db_ref[bi, hi, t, :] = g.dbeta
        dgc_ref[bi, hi, t, :] = g.dgam_c
        dgr_ref[bi, hi, n, :, :] = g.dgam_r

    q_dtype, v_dtype = inputs["q"].dtype, inputs["v"].dtype
    out_shape = grad_shapes(bsz, length, heads, dk, dv, c, q_dtype, v_dtype, parts=None,
                            heads_major=False)[:-1]  # fmt: skip
    grads = call(kernel, inputs, (h, do, dh), out_shape, (bsz, heads, n_chunks), cfg,
                 "gated_delta_bwd")  # fmt: skip
    return (*grads, ds0)
