"""GPU forward (Pallas Triton) in three kernels: only the state update runs in order.

1. :func:`prepare`, parallel over (batch, heads, chunks): the state-independent UT transform,
   ``W = T kg`` and ``UV = T beta V`` (:func:`._chunk.transform`, :func:`._chunk.values`;
   the value tiles in turn), and for the backward ``T``;
2. :func:`states`, grid (batch, heads, value tiles), chunks in order with the ``[dk, bv]``
   state tile in registers: stores the state entering each chunk ``h_n`` and
   ``U = UV - W h_n``, then ``S = carry S + (K e_end)^T U`` (:func:`._chunk.state_step`);
3. the output, parallel over (batch, heads, chunks), the scores once for the value tiles
   in turn: ``O = (Q g_read) h_n + (Q K^T * decay_incl) U`` (:func:`._chunk.output`).

The backward (``triton_bwd.py``) runs the transposes the same way. Native layouts:
``q, k [batch, len, heads, dk]``, ``v, o [batch, len, heads, dv]``; ``beta``/``gam`` as
columns ``[batch, heads, len, 1]``, ``gam`` also as rows ``[batch, heads, chunks, 1, C]``;
document masks ``[batch, len, 1]`` / ``[batch, chunks, 1, C]``. Between kernels (in
:attr:`._chunk.Cfg.store`, head-major): ``W [batch, heads, len, dk]``, ``UV``, ``U [batch,
heads, len, dv]`` and ``h [batch, heads, chunks, dk, dv]``.
"""

from __future__ import annotations

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.gated_delta._chunk import (
    F32,
    Cfg,
    Chunk,
    gates,
    output,
    scores,
    state_step,
    transform,
    values,
)


def rows(n, size: int):
    """The ``n``-th block of ``size`` rows (or columns); ``n`` traced or a Python int."""
    return pl.ds(n * size if isinstance(n, int) else pl.multiple_of(n * size, size), size)


def program_ids(count: int) -> tuple:
    return tuple(pl.program_id(i) for i in range(count))


def loader(cfg: Cfg, refs: dict, bi, hi):
    """``load(n, q=True) -> Chunk`` for chunk ``n`` of (batch bi, head hi); ``q`` only when
    asked for, ``v`` None (the kernels loop over value tiles: :func:`with_value_tile`)."""
    c = cfg.chunk

    def load(n, *, q: bool = True) -> Chunk:
        t = rows(n, c)
        same = reads = last = None
        if cfg.segments:
            same = refs["doc_c"][bi, t, :] == refs["doc_r"][bi, n, :, :]
            reads, last = refs["reads"][bi, t, :], refs["last"][bi, t, :]
        return Chunk(
            refs["q"][bi, t, hi, :] if q else None,
            refs["k"][bi, t, hi, :],
            None,
            refs["beta_c"][bi, hi, t, :], refs["gam_c"][bi, hi, t, :],
            refs["gam_r"][bi, hi, n, :, :], same, reads, last,
        )  # fmt: skip

    return load


def with_value_tile(ch: Chunk, refs: dict, bi, t, hi, vs) -> Chunk:
    """``ch`` with ``v`` = the value columns ``vs`` of its rows ``t`` (batch bi, head hi)."""
    return ch._replace(v=refs["v"][bi, t, hi, vs])


def compiler_params(cfg: Cfg, name: str):
    if cfg.interpret:
        return None
    return pltriton.CompilerParams(num_warps=cfg.tuning.warps_of(name), num_stages=1)


def call(kernel, inputs: dict, extra: tuple, out_shape, grid: tuple, cfg: Cfg, name: str):
    """``kernel(ins: dict of input refs, *refs of extra then of outputs)`` over ``grid``."""
    names = list(inputs)

    def body(*refs):
        kernel(dict(zip(names, refs)), *refs[len(names) :])

    return pl.pallas_call(
        body, out_shape=out_shape, grid=grid, interpret=cfg.interpret,
        compiler_params=compiler_params(cfg, name), name=name,
    )(*inputs.values(), *extra)  # fmt: skip


def dims(inputs: dict, cfg: Cfg) -> tuple[int, int, int, int, int, int]:
    """``(batch, len, heads, dk, dv, chunks)``."""
    bsz, length, heads, dk = inputs["q"].shape
    return bsz, length, heads, dk, inputs["v"].shape[3], length // cfg.chunk


def prepare(inputs: dict, cfg: Cfg, *, save_t: bool):
    """``(W [batch, heads, len, dk], UV [batch, heads, len, dv], T)`` in :attr:`Cfg.store`,
    grid (batch, heads, chunks); ``T [batch, heads, chunks, C, C]`` only with ``save_t`` (the
    backward's residual: it recomputes ``W`` from it, :func:`.triton_bwd.w_and_scores`), else
    None."""
    bsz, length, heads, dk, dv, n_chunks = dims(inputs, cfg)
    c, bv, prec = cfg.chunk, cfg.block_v, cfg.precision

    def kernel(ins, w_ref, uv_ref, *t_ref):
        bi, hi, n = program_ids(3)
        t = rows(n, c)
        ch = loader(cfg, ins, bi, hi)(n, q=False)
        wy = transform(ch, gates(ch), prec)
        w_ref[bi, hi, t, :] = wy.w.astype(w_ref.dtype)
        if save_t:
            t_ref[0][bi, hi, n, :, :] = wy.t.astype(t_ref[0].dtype)

        def tile(j, carry):
            vs = rows(j, bv)
            ch_j = with_value_tile(ch, ins, bi, t, hi, vs)
            uv_ref[bi, hi, t, vs] = values(ch_j, wy.t, prec)[1].astype(uv_ref.dtype)
            return carry

        lax.fori_loop(0, dv // bv, tile, 0)

    out_shape = [
        jax.ShapeDtypeStruct((bsz, heads, length, dk), cfg.store),
        jax.ShapeDtypeStruct((bsz, heads, length, dv), cfg.store),
        *([jax.ShapeDtypeStruct((bsz, heads, n_chunks, c, c), cfg.store)] if save_t else []),
    ]
    outs = call(kernel, inputs, (), out_shape, (bsz, heads, n_chunks), cfg, "gated_delta_prepare")
    return outs[0], outs[1], (outs[2] if save_t else None)


def states(inputs: dict, w: jax.Array, uv: jax.Array, s0: jax.Array, cfg: Cfg):
    """``(h [batch, heads, chunks, dk, dv], U [batch, heads, len, dv], s_final)`` float32:
    grid (batch, heads, value tiles), chunks in order."""
    bsz, length, heads, dk, dv, n_chunks = dims(inputs, cfg)
    c, bv = cfg.chunk, cfg.block_v

    def kernel(ins, w_ref, uv_ref, s0_ref, h_ref, u_ref, sf_ref):
        bi, hi, j = program_ids(3)
        vs = rows(j, bv)
        load = loader(cfg, ins, bi, hi)

        def body(n, s):
            t = rows(n, c)
            ch = load(n, q=False)
            h_ref[bi, hi, n, :, vs] = s.astype(h_ref.dtype)
            w_n, uv_n = w_ref[bi, hi, t, :], uv_ref[bi, hi, t, vs]
            u, s = state_step(ch, gates(ch), w_n, uv_n, s, cfg.precision)
            u_ref[bi, hi, t, vs] = u.astype(u_ref.dtype)
            return s

        sf_ref[bi, hi, :, vs] = lax.fori_loop(0, n_chunks, body, s0_ref[bi, hi, :, vs])

    out_shape = [
        jax.ShapeDtypeStruct((bsz, heads, n_chunks, dk, dv), cfg.store),
        jax.ShapeDtypeStruct((bsz, heads, length, dv), cfg.store),
        jax.ShapeDtypeStruct((bsz, heads, dk, dv), F32),
    ]
    grid = (bsz, heads, dv // bv)
    return call(kernel, inputs, (w, uv, s0), out_shape, grid, cfg, "gated_delta_states")


def forward(inputs: dict, s0: jax.Array, cfg: Cfg, *, save_states: bool):
    """``(o, s_final, res)``: with ``save_states`` the backward's residuals ``(h, T, U)``,
    ``h [batch, heads, chunks, dk, dv]`` the states entering each chunk, ``T`` the UT
    transform's inverses (:func:`prepare`) and ``U`` (:func:`states`); else None."""
    bsz, length, heads, dk, dv, n_chunks = dims(inputs, cfg)
    c, bv = cfg.chunk, cfg.block_v
    w, uv, t_mat = prepare(inputs, cfg, save_t=save_states)
    h, u, s_final = states(inputs, w, uv, s0, cfg)

    def kernel(ins, h_ref, u_ref, o_ref):
        bi, hi, n = program_ids(3)
        t = rows(n, c)
        ch = loader(cfg, ins, bi, hi)(n)
        sc, _ = scores(ch, cfg.precision)
        g = gates(ch)

        def tile(j, carry):
            vs = rows(j, bv)
            h_n, u_n = h_ref[bi, hi, n, :, vs], u_ref[bi, hi, t, vs]
            out = output(ch, g, sc, h_n, u_n, cfg.precision)
            o_ref[bi, t, hi, vs] = out.astype(o_ref.dtype)
            return carry

        lax.fori_loop(0, dv // bv, tile, 0)

    out_shape = jax.ShapeDtypeStruct((bsz, length, heads, dv), inputs["q"].dtype)
    out = call(kernel, inputs, (h, u), out_shape, (bsz, heads, n_chunks), cfg, "gated_delta_fwd")
    return out, s_final, ((h, t_mat, u) if save_states else None)
