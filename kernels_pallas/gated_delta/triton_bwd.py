"""GPU backward (Pallas Triton) in three kernels: only the ``dL/dS`` pass runs in order.

1. :func:`w_and_scores`, parallel over (batch, heads, chunks): ``W = T kg`` from the forward's
   ``T`` (a residual of ``C`` values per token, where ``W`` would take ``dk``), the inverse
   not recomputed, and the scores ``Q K^T * decay_incl`` for the next kernel;
2. :func:`state_grads`, grid (batch, heads, value tiles), chunks in reverse carrying
   ``dS = dL/dS`` (from ``ds_final``): stores ``dh_n = dL/dS_next`` of chunk ``n`` and
   ``dU = (Q K^T * decay_incl)^T dO + (K e_end) dS`` (the scores loaded: off the serial
   chain), then
   ``dS = (Q g_read)^T dO + carry dS - W^T dU`` (:func:`._chunk.u_grad`,
   :func:`._chunk.state_grad`);
3. :func:`backward`'s gradient kernel, parallel over (batch, heads, chunks): ``dv`` one value
   tile at a time, then the backward through the scores (recomputed), ``W`` and the UT
   transform (``T`` loaded; :func:`._chunk.finish_backward`), which reads each value-summed
   term (:class:`._chunk.TileSums`: ``dO U^T``, ``dU S^T``, ...) once, formed there as one
   accumulator over the value tiles from the saved ``h_n``, ``dh_n``, ``dU`` and the
   forward's ``U``.

Each term is a contraction over all of ``dv`` formed right where it is used, so no program
holds more than one such sum, and no per-tile partial sums go through memory (before, a
kernel of its own per (chunk, value tile) wrote them in float32 and this one read them back:
at (8, 16, 2048) with ``dk = dv = 128`` about 0.8 GB each way, counted from their shapes).
"""

from __future__ import annotations

import functools
import operator

import jax
from jax import lax

from kernels_pallas.gated_delta._chunk import (
    F32,
    Cfg,
    TileSums,
    TileTerms,
    finish_backward,
    gates,
    grad_shapes,
    kg_scale,
    mm,
    scores,
    scores_backward,
    state_grad,
    u_grad,
)
from kernels_pallas.gated_delta.triton_fwd import call, dims, loader, program_ids, rows


def w_and_scores(inputs: dict, t_mat: jax.Array, cfg: Cfg) -> tuple[jax.Array, jax.Array]:
    """``(W = T kg [batch, heads, len, dk], scores [batch, heads, chunks, C, C])`` in
    :attr:`Cfg.store` from the forward's ``T`` (:func:`.triton_fwd.prepare`, stored in
    :attr:`Cfg.store`). Both are only MMA operands after, which round them to that dtype
    anyway (``W``'s MMA rounded ``T`` too), so they are what the kernels computed before bit
    for bit."""
    bsz, length, heads, dk, dv, n_chunks = dims(inputs, cfg)
    c = cfg.chunk

    def kernel(ins, t_ref, w_ref, sc_ref):
        bi, hi, n = program_ids(3)
        t = rows(n, c)
        ch = loader(cfg, ins, bi, hi)(n)
        g = gates(ch)
        w = mm(t_ref[bi, hi, n, :, :], ch.k * kg_scale(ch, g), cfg.precision)
        w_ref[bi, hi, t, :] = w.astype(w_ref.dtype)
        sc_ref[bi, hi, n, :, :] = scores(ch, cfg.precision)[0].astype(sc_ref.dtype)

    out_shape = [
        jax.ShapeDtypeStruct((bsz, heads, length, dk), cfg.store),
        jax.ShapeDtypeStruct((bsz, heads, n_chunks, c, c), cfg.store),
    ]
    return tuple(call(kernel, inputs, (t_mat,), out_shape, (bsz, heads, n_chunks), cfg,
                      "gated_delta_w_bwd"))  # fmt: skip


def state_grads(inputs: dict, w: jax.Array, sc: jax.Array, do: jax.Array, ds_final: jax.Array,
                cfg: Cfg):  # fmt: skip
    """``(dh [batch, heads, chunks, dk, dv], dU [batch, heads, len, dv], ds0 [batch, heads,
    dk, dv])`` float32, from ``W`` and the scores ``sc`` of :func:`w_and_scores`: grid (batch,
    heads, value tiles), chunks in reverse."""
    bsz, length, heads, dk, dv, n_chunks = dims(inputs, cfg)
    c, bv, prec = cfg.chunk, cfg.block_v, cfg.precision

    def kernel(ins, w_ref, sc_ref, do_ref, dsf_ref, dh_ref, du_ref, ds0_ref):
        bi, hi, j = program_ids(3)
        vs = rows(j, bv)
        load = loader(cfg, ins, bi, hi)

        def body(i, ds):
            n = n_chunks - 1 - i
            t = rows(n, c)
            ch = load(n)
            dh_ref[bi, hi, n, :, vs] = ds.astype(dh_ref.dtype)
            g, do_n, w_n = gates(ch), do_ref[bi, t, hi, vs], w_ref[bi, hi, t, :]
            du = u_grad(ch, g, sc_ref[bi, hi, n, :, :], do_n, ds, prec)
            du_ref[bi, hi, t, vs] = du.astype(du_ref.dtype)
            return state_grad(ch, g, w_n, do_n, ds, du, prec)

        ds0_ref[bi, hi, :, vs] = lax.fori_loop(0, n_chunks, body, dsf_ref[bi, hi, :, vs])

    out_shape = [
        jax.ShapeDtypeStruct((bsz, heads, n_chunks, dk, dv), cfg.store),
        jax.ShapeDtypeStruct((bsz, heads, length, dv), cfg.store),
        jax.ShapeDtypeStruct((bsz, heads, dk, dv), F32),
    ]
    grid = (bsz, heads, dv // bv)
    return call(kernel, inputs, (w, sc, do, ds_final), out_shape, grid, cfg,
                "gated_delta_state_bwd")  # fmt: skip


def grad_block_v(dk: int, dv: int, block_v: int, grad_tile: int) -> int:
    """The gradient kernel's value tile: ``block_v`` (which divides ``dv``) doubled while the
    double divides ``dv`` and ``dk`` times it stays within ``grad_tile``
    (:attr:`.tuning.TritonTuning.grad_tile`)."""
    bv = block_v
    while dv % (2 * bv) == 0 and dk * 2 * bv <= grad_tile:
        bv *= 2
    return bv


def backward(inputs: dict, res: tuple, do: jax.Array, ds_final: jax.Array, cfg: Cfg):
    """``(dq, dk, dv, dbeta, dgam_c, dgam_r, ds0)`` (:func:`._chunk.grad_shapes`, no value-tile
    axis) from the forward's residuals ``res = (h, T, U)``: the states entering each chunk,
    the UT transform's inverses and ``U``."""
    w, sc = w_and_scores(inputs, res[1], cfg)
    dh, du, ds0 = state_grads(inputs, w, sc, do, ds_final, cfg)
    return gradients(inputs, res, do, dh, du, ds0, cfg)


def gradients(inputs: dict, res: tuple, do: jax.Array, dh: jax.Array, du: jax.Array,
              ds0: jax.Array, cfg: Cfg):  # fmt: skip
    """Step 3 (module doc) from the state pass's ``dh``, ``dU`` and ``ds0``: the
    outputs of :func:`backward`."""
    bsz, length, heads, dk, dv, n_chunks = dims(inputs, cfg)
    c, prec = cfg.chunk, cfg.precision
    bv = grad_block_v(dk, dv, cfg.block_v, cfg.tuning.grad_tile)
    nv = dv // bv
    h, t_mat, u = res

    def kernel(ins, t_ref, u_ref, h_ref, do_ref, dh_ref, du_ref, *out_refs):
        dq_ref, dk_ref, dv_ref, db_ref, dgc_ref, dgr_ref = out_refs
        bi, hi, n = program_ids(3)
        t = rows(n, c)
        ch = loader(cfg, ins, bi, hi)(n)
        g, t_n = gates(ch), t_ref[bi, hi, n, :, :]

        def tile(j: int) -> TileTerms:  # value tile j's operands, loaded where a term reads them
            vs, full = rows(j, bv), slice(None)
            at = {"v": (ins["v"], (bi, t, hi, vs)), "u": (u_ref, (bi, hi, t, vs)),
                  "do": (do_ref, (bi, t, hi, vs)), "du": (du_ref, (bi, hi, t, vs)),
                  "s": (h_ref, (bi, hi, n, full, vs)),
                  "ds_next": (dh_ref, (bi, hi, n, full, vs))}  # fmt: skip

            def get(name: str) -> jax.Array:
                ref, index = at[name]
                return ref[index]

            return TileTerms(ch, g, t_n, get, prec)

        tiles = [tile(j) for j in range(nv)]
        dbeta = []
        for j, terms in enumerate(tiles):
            dv_j, dbeta_j = terms.dv_dbeta()
            dv_ref[bi, t, hi, rows(j, bv)] = dv_j.astype(dv_ref.dtype)
            dbeta.append(dbeta_j)
        p = TileSums(ch, tiles, functools.reduce(operator.add, dbeta))
        sg = scores_backward(ch, p, prec)
        dq_ref[bi, t, hi, :] = sg.dq.astype(dq_ref.dtype)  # now: not held through the rest
        grads = finish_backward(ch, g, t_n, p, sg, prec)
        dk_ref[bi, t, hi, :] = grads.dk.astype(dk_ref.dtype)
        db_ref[bi, hi, t, :] = grads.dbeta
        dgc_ref[bi, hi, t, :] = grads.dgam_c
        dgr_ref[bi, hi, n, :, :] = grads.dgam_r

    shapes = grad_shapes(bsz, length, heads, dk, dv, c, inputs["q"].dtype, inputs["v"].dtype,
                         parts=None, heads_major=False)  # fmt: skip
    grid = (bsz, heads, n_chunks)
    dq, dk_grad, dv_grad, dbeta, dgam_c, dgam_r = call(
        kernel, inputs, (t_mat, u, h, do, dh, du), shapes[:6], grid, cfg, "gated_delta_bwd"
    )  # all but ds0 (state_grads)
    return dq, dk_grad, dv_grad, dbeta, dgam_c, dgam_r, ds0
