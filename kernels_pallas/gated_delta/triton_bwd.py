"""GPU backward (Pallas Triton) in four kernels: only the ``dL/dS`` pass runs in order.

1. :func:`w_and_scores`, parallel over (batch, heads, chunks): ``W = T kg`` from the forward's
   ``T`` (a residual of ``C`` values per token, where ``W`` would take ``dk``), the inverse
   not recomputed, and the scores ``Q K^T * decay_incl`` for the next kernel;
2. :func:`state_grads`, grid (batch, heads, value tiles), chunks in reverse carrying
   ``dS = dL/dS`` (from ``ds_final``): stores ``dh_n = dL/dS_next`` of chunk ``n`` and
   ``dU = (Q K^T * decay_incl)^T dO + (K e_end) dS`` (the scores loaded: off the serial
   chain), then
   ``dS = (Q g_read)^T dO + carry dS - W^T dU`` (:func:`._chunk.u_grad`,
   :func:`._chunk.state_grad`);
3. :func:`tile_grads`, parallel over (batch, heads, chunks, value tiles): ``dv`` and the
   tile's :class:`._chunk.Partials` from the saved ``h_n``, ``dh_n``, ``dU``, ``T`` and the
   forward's ``U`` (:func:`._chunk.tile_backward`);
4. the rest, parallel over (batch, heads, chunks): the tiles' partials summed, then the
   backward through the scores (recomputed), ``W`` and the UT transform (``T`` loaded;
   :func:`._chunk.finish_backward`).

Steps 3 and 4 are one kernel each, not one loop over the value tiles, so that no program holds
the chunk's recomputed transform and the tiles' running sums at once.
"""

from __future__ import annotations

import jax
from jax import lax

from kernels_pallas.gated_delta._chunk import (
    F32,
    Cfg,
    Partials,
    finish_backward,
    gates,
    grad_shapes,
    kg_scale,
    mm,
    scores,
    state_grad,
    tile_backward,
    u_grad,
)
from kernels_pallas.gated_delta.triton_fwd import (
    call,
    dims,
    loader,
    program_ids,
    rows,
    with_value_tile,
)


def w_and_scores(inputs: dict, t_mat: jax.Array, cfg: Cfg, *,
                 state_operands: bool = False) -> tuple[jax.Array, ...]:  # fmt: skip
    """``(W = T kg [batch, heads, len, dk], scores [batch, heads, chunks, C, C])`` in
    :attr:`Cfg.store` from the forward's ``T`` (:func:`.triton_fwd.prepare`, stored in
    :attr:`Cfg.store`). Both are only MMA operands after, which round them to that dtype
    anyway (``W``'s MMA rounded ``T`` too), so they are what the kernels computed before bit
    for bit. With ``state_operands`` also the scaled rows ``K e_end`` and ``-(Q g_read)``
    (``[batch, heads, len, dk]``, the Mosaic GPU state pass's operands, rounded as its
    products would round them)."""
    bsz, length, heads, dk, dv, n_chunks = dims(inputs, cfg)
    c = cfg.chunk

    def kernel(ins, t_ref, w_ref, sc_ref, *scaled_refs):
        bi, hi, n = program_ids(3)
        t = rows(n, c)
        ch = loader(cfg, ins, bi, hi)(n)
        g = gates(ch)
        w = mm(t_ref[bi, hi, n, :, :], ch.k * kg_scale(ch, g), cfg.precision)
        w_ref[bi, hi, t, :] = w.astype(w_ref.dtype)
        sc_ref[bi, hi, n, :, :] = scores(ch, cfg.precision)[0].astype(sc_ref.dtype)
        if state_operands:
            ke_ref, qs_ref = scaled_refs
            ke_ref[bi, hi, t, :] = (ch.k * g.e_end).astype(ke_ref.dtype)
            qs_ref[bi, hi, t, :] = (-(ch.q * g.g_read)).astype(qs_ref.dtype)

    rows_dk = jax.ShapeDtypeStruct((bsz, heads, length, dk), cfg.store)
    out_shape = [rows_dk, jax.ShapeDtypeStruct((bsz, heads, n_chunks, c, c), cfg.store)]
    out_shape += [rows_dk, rows_dk] if state_operands else []
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


def partial_shapes(bsz: int, length: int, heads: int, dk: int, c: int, parts: int,
                   store) -> Partials:  # fmt: skip
    """:class:`._chunk.Partials` of every (value tile, batch, head, chunk), head-major:
    ``[C, C]`` terms ``[parts, batch, heads, chunks, C, C]``, ``[C, dk]`` ones ``[parts, batch,
    heads, len, dk]``, columns ``[parts, batch, heads, len, 1]``, ``dcarry [parts, batch,
    heads, chunks, 1, 1]``. Float32 but ``dk`` and ``dw`` in ``store`` (:attr:`Cfg.store`):
    those only reach bf16 gradients and MMA operands (bf16 ``dq`` also reaches ``dgam``: it
    took the bf16 test's error from 0.93% to 1.27%)."""
    n = length // c
    square, wide, col = (n, c, c), (length, dk), (length, 1)
    shapes = Partials(square, square, wide, wide, wide, col, col, (n, 1, 1))
    return Partials(*(jax.ShapeDtypeStruct((parts, bsz, heads, *s), store if f in ("dk", "dw")
                                           else F32)
                      for f, s in zip(Partials._fields, shapes, strict=True)))  # fmt: skip


def _at(ref, j, bi, hi, n, t) -> tuple:
    """Index of tile ``j``'s partial in ``ref`` for (batch bi, head hi, chunk n with rows
    ``t``): the chunk's block (the 6-D ``[C, C]`` and ``dcarry`` terms) or its rows."""
    full = slice(None)
    return (j, bi, hi, n, full, full) if len(ref.shape) == 6 else (j, bi, hi, t, full)


def tile_grads(inputs, t_mat, u, h, do, dh, du, cfg: Cfg):
    """``(dv [batch, len, heads, dv] in v's dtype, Partials`` of :func:`partial_shapes`):
    grid (batch, heads, chunks x value tiles)."""
    bsz, length, heads, dk, dv, n_chunks = dims(inputs, cfg)
    c, bv, nv, prec = cfg.chunk, cfg.block_v, dv // cfg.block_v, cfg.precision

    def kernel(ins, t_ref, u_ref, h_ref, do_ref, dh_ref, du_ref, dv_ref, *p_refs):
        bi, hi, nj = program_ids(3)
        n, j = nj // nv, nj % nv
        t, vs = rows(n, c), rows(j, bv)
        ch = with_value_tile(loader(cfg, ins, bi, hi)(n, q=False), ins, bi, t, hi, vs)
        u_n, h_n = u_ref[bi, hi, t, vs], h_ref[bi, hi, n, :, vs]
        do_n, dh_n, du_n = do_ref[bi, t, hi, vs], dh_ref[bi, hi, n, :, vs], du_ref[bi, hi, t, vs]
        p, dv_j = tile_backward(ch, gates(ch), t_ref[bi, hi, n, :, :], u_n, h_n, do_n, dh_n, du_n,
                                prec)  # fmt: skip
        dv_ref[bi, t, hi, vs] = dv_j.astype(dv_ref.dtype)
        for ref, x in zip(p_refs, p, strict=True):
            ref[_at(ref, j, bi, hi, n, t)] = x.astype(ref.dtype)

    shapes = partial_shapes(bsz, length, heads, dk, c, nv, cfg.store)
    out_shape = [jax.ShapeDtypeStruct((bsz, length, heads, dv), inputs["v"].dtype), *shapes]
    outs = call(kernel, inputs, (t_mat, u, h, do, dh, du), out_shape,
                (bsz, heads, n_chunks * nv), cfg, "gated_delta_tile_bwd")  # fmt: skip
    return outs[0], Partials(*outs[1:])


class Sums:
    """The value tiles' :class:`._chunk.Partials` of one chunk summed, each field loaded at
    each read (``sum_tiles(ref)``), so that :func:`._chunk.finish_backward` holds few at
    once."""

    def __init__(self, refs, sum_tiles):
        self._refs, self._sum = dict(zip(Partials._fields, refs, strict=True)), sum_tiles

    def __getattr__(self, name: str) -> jax.Array:
        return self._sum(self._refs[name])


def backward(inputs: dict, res: tuple, do: jax.Array, ds_final: jax.Array, cfg: Cfg):
    """``(dq, dk, dv, dbeta, dgam_c, dgam_r, ds0)`` (:func:`._chunk.grad_shapes`, no value-tile
    axis) from the forward's residuals ``res = (h, T, U)``: the states entering each chunk,
    the UT transform's inverses and ``U``."""
    w, sc = w_and_scores(inputs, res[1], cfg)
    dh, du, ds0 = state_grads(inputs, w, sc, do, ds_final, cfg)
    return gradients(inputs, res, do, dh, du, ds0, cfg)


def gradients(inputs: dict, res: tuple, do: jax.Array, dh: jax.Array, du: jax.Array,
              ds0: jax.Array, cfg: Cfg):  # fmt: skip
    """Steps 3 and 4 (module doc) from the state pass's ``dh``, ``dU`` and ``ds0``: the
    outputs of :func:`backward`."""
    bsz, length, heads, dk, dv, n_chunks = dims(inputs, cfg)
    c, nv, prec = cfg.chunk, dv // cfg.block_v, cfg.precision
    h, t_mat, u = res
    dv_grad, parts = tile_grads(inputs, t_mat, u, h, do, dh, du, cfg)

    def kernel(ins, t_ref, *refs):
        p_refs, (dq_ref, dk_ref, db_ref, dgc_ref, dgr_ref) = refs[:8], refs[8:]
        bi, hi, n = program_ids(3)
        t = rows(n, c)
        ch = loader(cfg, ins, bi, hi)(n)
        p = Sums(p_refs, lambda ref: sum(ref[_at(ref, j, bi, hi, n, t)].astype(F32)
                                         for j in range(nv)))  # fmt: skip
        g = finish_backward(ch, gates(ch), t_ref[bi, hi, n, :, :], p, prec)
        dq_ref[bi, t, hi, :] = g.dq.astype(dq_ref.dtype)
        dk_ref[bi, t, hi, :] = g.dk.astype(dk_ref.dtype)
        db_ref[bi, hi, t, :] = g.dbeta
        dgc_ref[bi, hi, t, :] = g.dgam_c
        dgr_ref[bi, hi, n, :, :] = g.dgam_r

    q_dtype, v_dtype = inputs["q"].dtype, inputs["v"].dtype
    shapes = grad_shapes(bsz, length, heads, dk, dv, c, q_dtype, v_dtype, parts=None,
                         heads_major=False)  # fmt: skip
    out_shape = shapes[:2] + shapes[3:6]  # all but dv (tile_grads) and ds0 (state_grads)
    grid = (bsz, heads, n_chunks)
    dq, dk_grad, dbeta, dgam_c, dgam_r = call(
        kernel, inputs, (t_mat, *parts), out_shape, grid, cfg, "gated_delta_bwd"
    )
    return dq, dk_grad, dv_grad, dbeta, dgam_c, dgam_r, ds0
