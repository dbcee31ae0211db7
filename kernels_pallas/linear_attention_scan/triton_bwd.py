"""Pallas Triton backward of the linear-attention scan: the "staged" GLA backward kernels
(``dA = do v^T``; ``dv = A^T do + (k e^{B-b}) dh[n]`` over dv tiles; ``dq, dk, db`` over dk
tiles, each channel's terms being independent), their fix-up for strong gates, and the dispatch
of the other gates to :func:`._chunk.grad_kernel`. The reverse state pass is
:func:`.triton_fwd.state_pass`; see :mod:`.triton_fwd` for the stability argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.linear_attention_scan._chunk import (
    F32,
    Cfg,
    Chunk,
    chunk_grads,
    doc_args,
    iota,
    mm,
    row_dot,
)
from kernels_pallas.linear_attention_scan.triton_fwd import chunk_call, doc_refs, scores_like


def _gla_da_kernel(cfg: Cfg, do_ref, v_ref, *refs):
    """Staged backward (1): ``dA = do v^T`` [C, C] float32, causal and same-document masked."""
    *docs, da_ref = refs
    ch = Chunk(cfg, do_ref, None, v_ref, None, *doc_refs(docs))
    m = ch.diag_mask(0, cfg.chunk)
    da_ref[...] = jnp.where(m, mm(do_ref[...], v_ref[...], cfg, tb=True), 0.0)


def _gla_dv_kernel(cfg: Cfg, k_ref, b_ref, a_ref, do_ref, dh_ref, *refs):
    """Staged backward (2), one dv tile: ``dv = A^T do + (k e^{B - b}) dh[n]``; ``do``, ``dh``,
    ``dv`` are ``[.., bv]`` column tiles."""
    *docs, dv_ref = refs
    ch = Chunk(cfg, None, k_ref, None, b_ref, *doc_refs(docs))
    c, dt = cfg.chunk, ch.dt
    ks = (k_ref[...].astype(F32) * ch.state_out(0, c)).astype(dt)
    dv = mm(a_ref[...].astype(dt), do_ref[...], cfg, ta=True) + mm(ks, dh_ref[...], cfg)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _gla_dqk_kernel(cfg: Cfg, q_ref, k_ref, b_ref, v_ref, do_ref, da_ref, h_ref, dh_ref, *refs):
    """Staged backward (3), one dk tile (every term is per channel d):

    ``dq = e^{b} (do h^T) + sum_{j <= i} dA_ij k_j e^{b_i - b_j}``,
    ``dk = e^{B - b} (v dh^T) + sum_{i >= j} dA_ij q_i e^{b_i - b_j}``,
    ``db = q dq - k dk`` (+ ``dL/dB``, ``Chunk.state_gate_grad``, on the last row): the
    derivative of ``o`` and of the state update w.r.t. the cumulative log-gates ``b``. The
    intra-chunk sums as in ``_gla_scores_kernel``: one MMA each over the chunk factored around
    its middle row (``_gla_dqk_fix_kernel`` recomputes the chunks with a log-gate range >=
    ``FACTOR_SPREAD``). ``q, k, b, h, dh, dq, dk, db``: dk tiles."""
    *docs, dq_ref, dk_ref, db_ref = refs
    ch = Chunk(cfg, q_ref, k_ref, v_ref, b_ref, *doc_refs(docs))
    c, dt = cfg.chunk, ch.dt
    f32 = lambda ref: ref[...].astype(F32)  # noqa: E731 -- loaded where used: few live tiles
    up, down = ch.factors(0, c)
    dk = ch.state_out(0, c) * mm(v_ref[...], dh_ref[...], cfg, tb=True)
    kdk_state = jnp.sum(f32(k_ref) * dk, axis=0, keepdims=True)
    dk += down * mm(da_ref[...].astype(dt), (f32(q_ref) * up).astype(dt), cfg, ta=True)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    extra = ch.state_gate_grad(row_dot(h_ref, dh_ref), kdk_state)
    db_ref[...] = jnp.where(iota((c, 1), 0) == c - 1, extra, 0.0) - f32(k_ref) * dk
    up, down = ch.factors(0, c)  # again: not live across the dk half
    dq = ch.state_in(0, c) * mm(do_ref[...], h_ref[...], cfg, tb=True)
    dq += up * mm(da_ref[...].astype(dt), (f32(k_ref) * down).astype(dt), cfg)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    db_ref[...] += f32(q_ref) * dq


def _gla_dqk_fix_kernel(cfg: Cfg, q_ref, k_ref, b_ref, v_ref, do_ref, da_ref, h_ref, dh_ref,
                        *refs):  # fmt: skip
    """``_gla_dqk_kernel`` for the chunks with a log-gate range >= ``FACTOR_SPREAD`` (strong
    gates), sub-block by sub-block into the aliased ``dq, dk, db``: per block X the inter
    terms, the diagonal block by ``gated_diag``, earlier columns (dq) and later rows (dk) one
    sub-block pair per MMA, factored around the pair's boundary (factors <= 1)."""
    *docs, _, _, _, dq_ref, dk_ref, db_ref = refs
    ch = Chunk(cfg, q_ref, k_ref, v_ref, b_ref, *doc_refs(docs))

    @pl.when(~ch.safe(0, cfg.chunk))
    def _():
        _gla_dqk_blocks(ch, da_ref, h_ref, dh_ref, do_ref, dq_ref, dk_ref, db_ref)


def _gla_dqk_blocks(ch: Chunk, da_ref, h_ref, dh_ref, do_ref, dq_ref, dk_ref, db_ref):
    """The sub-block path of ``_gla_dqk_fix_kernel``."""
    cfg = ch.cfg
    c, sub, dt = cfg.chunk, ch.sub, ch.dt
    kdk_state = jnp.zeros((1, ch.q.shape[1]), F32)
    for i0 in range(0, c, sub):
        q, k, b = ch.rows(ch.q, i0).astype(F32), ch.rows(ch.k, i0).astype(F32), ch.gate(i0)
        dq = ch.state_in(i0, sub) * mm(ch.rows(do_ref, i0), h_ref[...], cfg, tb=True)
        dk = ch.state_out(i0, sub) * mm(ch.rows(ch.v, i0), dh_ref[...], cfg, tb=True)
        kdk_state += jnp.sum(k * dk, axis=0, keepdims=True)
        da = da_ref[i0 : i0 + sub, i0 : i0 + sub]
        _, dq_diag, dk_diag = ch.gated_diag(i0, None, da, da.T, scores=False)
        dq, dk = dq + dq_diag, dk + dk_diag
        acc, rho = jnp.zeros_like(dq), None
        for j0, n in ch.blocks(0, i0):  # earlier columns -> dq
            _, kr, rho = ch.ref_rows(i0, j0, n)
            acc += mm(da_ref[i0 : i0 + sub, j0 : j0 + n].astype(dt), kr.astype(dt), cfg)
        if rho is not None:
            dq += jnp.exp(b - rho) * acc
        acc, rho = jnp.zeros_like(dk), None
        for j0, n in ch.blocks(i0 + sub, c):  # later rows -> dk
            qr, _, rho = ch.ref_cols(i0, j0, n)
            acc += mm(da_ref[j0 : j0 + n, i0 : i0 + sub].astype(dt), qr.astype(dt), cfg, ta=True)
        if rho is not None:
            dk += jnp.exp(rho - b) * acc
        dq_ref[i0 : i0 + sub, :] = dq.astype(dq_ref.dtype)
        dk_ref[i0 : i0 + sub, :] = dk.astype(dk_ref.dtype)
        db = q * dq - k * dk
        if i0 + sub == c:
            extra = ch.state_gate_grad(row_dot(h_ref, dh_ref), kdk_state)
            db += jnp.where(iota((sub, 1), 0) == sub - 1, extra, 0.0)
        db_ref[i0 : i0 + sub, :] = db


def backward(q, k, v, b, seg, h, a, dh, do, cfg: Cfg) -> tuple:
    """``(dq, dk, dv, db)`` (``db`` None without a gate) from the states ``h`` and their
    gradients ``dh``; GLA staged: ``dA``, then ``dv`` (dv tiles) and ``dq, dk, db`` (dk tiles),
    from the forward's scores ``a``; the others by :func:`._chunk.chunk_grads`."""
    if not cfg.staged:
        return chunk_grads(chunk_call, q, k, v, b, seg, h, dh, do, cfg)
    docs = doc_args(seg, cfg)
    (da,) = chunk_call(_gla_da_kernel, cfg, [(do, "seq"), (v, "seq")] + docs,
                        [scores_like(q, cfg)], "la_chunk_gla_da", bwd=True)  # fmt: skip
    dk_, dv_ = q.shape[3], v.shape[3]
    bk, bv = min(dk_, cfg.tune.bwd_staged_bk), min(dv_, cfg.tune.bwd_staged_tile)
    ins = [(k, "seq"), (b, "seq"), (a, "scores"), (do, "seq/t"), (dh, "state/v")] + docs
    dv_like = jax.ShapeDtypeStruct(v.shape, v.dtype)
    (dv,) = chunk_call(_gla_dv_kernel, cfg, ins, [(dv_like, "seq/t")], "la_chunk_gla_dv",
                        bwd=True, tiles=dv_ // bv)  # fmt: skip
    ins = [(q, "seq/t"), (k, "seq/t"), (b, "seq/t"), (v, "seq"), (do, "seq"), (da, "scores"),
           (h, "state/k"), (dh, "state/k")] + docs  # fmt: skip
    outs = [(jax.ShapeDtypeStruct(x.shape, dt), "seq/t") for x, dt in ((q, q.dtype), (k, k.dtype),
                                                                      (b, F32))]  # fmt: skip
    grads = chunk_call(_gla_dqk_kernel, cfg, ins, outs, "la_chunk_gla_dqk", bwd=True,
                        tiles=dk_ // bk)  # fmt: skip
    aliases = {len(ins) + i: i for i in range(3)}
    dq, dk, db = chunk_call(_gla_dqk_fix_kernel, cfg, ins + [(x, "seq/t") for x in grads], outs,
                             "la_chunk_gla_dqk_fix", bwd=True, tiles=dk_ // bk,
                             aliases=aliases)  # fmt: skip
    return dq, dk, dv, db
