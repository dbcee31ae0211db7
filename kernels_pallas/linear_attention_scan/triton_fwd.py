"""Pallas Triton forward of the linear-attention scan (native ``[batch, len, heads, dim]``
layout): the state pass (also run in reverse by the backward), the parallel chunk launcher,
the "staged" GLA forward kernels and the chunk-local cumsum of the log-gates.

The state pass loops over chunks inside a program, grid (batch, heads, state tiles). GLA runs
"staged" (GLA paper sec. 4.2 and fla's chunk_gla split): scores ``A [b, h, chunks, C, C]``
float32 by one kernel, the output ``(q e^b) h[n] + A v`` by another over dv tiles; it was
faster than the one-kernel chunk forms (``experiments/results/tune_scan_h100.md``), and the
Pallas cumsum faster than XLA's reduce-window (``bench_scan_gla_h100.md``). Scalar and no
decay run :func:`._chunk.out_kernel`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.linear_attention_scan._chunk import (
    F32,
    Cfg,
    Chunk,
    chunk_output,
    doc_args,
    mm,
    state_step,
)


def _tiles(dk: int, dv: int, cfg: Cfg, *, reverse: bool) -> tuple[int, int]:
    """State tile ``[bk, bv]`` of one state-pass program (``TritonTuning``)."""
    t = cfg.tune
    bk, bv = (t.bwd_state_bk, t.bwd_state_bv) if reverse else (t.state_bk, t.state_bv)
    return min(dk, bk), min(dv, bv)


def state_pass(x, y, b, s_init, r, rp, cfg: Cfg, *, reverse: bool, h_dtype):
    """Returns ``(h [batch, heads, chunks, dk, dv], s_end [batch, heads, dk, dv] f32)``.

    forward: ``h[n]`` = state before chunk n, ``s_end`` = final state;
    reverse (the backward's): ``h[n]`` = dL/d(state after chunk n), ``s_end`` = dL/d(initial
    state). Grid (batch, heads, state tiles); each program loops over all chunks."""
    bsz, length, heads, dk = x.shape
    dv = y.shape[3]
    c, n_chunks = cfg.chunk, length // cfg.chunk
    bk, bv = _tiles(dk, dv, cfg, reverse=reverse)
    nv = dv // bv

    def kernel(*refs):
        x_ref, y_ref, *refs = refs
        b_ref = refs.pop(0) if b is not None else None
        s0_ref = refs.pop(0)
        r_ref, rp_ref = (refs.pop(0), refs.pop(0)) if cfg.segments else (None, None)
        h_ref, sf_ref = refs
        bi, hi, tile = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        ks = pl.ds(pl.multiple_of((tile // nv) * bk, bk), bk)
        vs = pl.ds(pl.multiple_of((tile % nv) * bv, bv), bv)
        gs = ks if cfg.gate == "gated" else pl.ds(0, 1)

        def body(i, s):
            n = n_chunks - 1 - i if reverse else i
            h_ref[bi, hi, n, ks, vs] = s.astype(h_ref.dtype)
            t0 = pl.multiple_of(n * c, c)
            t = pl.ds(t0, c)
            last = pl.ds(t0 + c - 1, 1)
            bb = b_last = r = r_prev = r_last = None
            if b_ref is not None:
                bb, b_last = b_ref[bi, t, hi, gs], b_ref[bi, last, hi, gs]
            if r_ref is not None:
                r, r_last, r_prev = r_ref[bi, t, :], r_ref[bi, last, :], rp_ref[bi, pl.ds(t0, 1), :]
            xx, yy = x_ref[bi, t, hi, ks], y_ref[bi, t, hi, vs]
            return state_step(s, xx, yy, bb, b_last, r, r_prev, r_last, cfg, reverse=reverse)

        s = lax.fori_loop(0, n_chunks, body, s0_ref[bi, hi, ks, vs])
        sf_ref[bi, hi, ks, vs] = s

    args = [x, y] + ([b] if b is not None else []) + [s_init]
    args += [r, rp] if cfg.segments else []
    out_shape = (
        jax.ShapeDtypeStruct((bsz, heads, n_chunks, dk, dv), h_dtype),
        jax.ShapeDtypeStruct((bsz, heads, dk, dv), F32),
    )
    t = cfg.tune
    warps, stages = ((t.bwd_state_warps, t.bwd_state_stages) if reverse
                     else (t.state_warps, t.state_stages))  # fmt: skip
    params = None if cfg.interpret else pltriton.CompilerParams(num_warps=warps, num_stages=stages)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(bsz, heads, (dk // bk) * nv),
        interpret=cfg.interpret,
        compiler_params=params,
        name="la_state_bwd" if reverse else "la_state_fwd",
    )(*args)


def chunk_call(kernel, cfg: Cfg, ins: list, outs: list, name: str, *, bwd: bool,
                tiles: int = 1, aliases: dict | None = None):  # fmt: skip
    """Parallel-over-chunks pallas_call. ``ins``/``outs``: (array | ShapeDtypeStruct, kind)
    with kind "seq" (per-token ``[.., len, .., dim]``), "state" (``[b, h, chunks, dk, dv]``),
    "scores" (``[b, h, chunks, C, C]``) or "doc" (``[b, len, 1]``); ``bwd`` picks the
    backward's launch parameters. ``tiles > 1`` adds a grid axis over column tiles:
    kinds "seq/t" and "state/v" take that tile of their last dim, "state/k" of the state rows.
    ``aliases``: ``input_output_aliases`` (outputs updated in place)."""
    bsz, length, heads, _ = ins[0][0].shape
    c = cfg.chunk
    at = lambda t: t[0] if t else 0  # noqa: E731 -- the column tile (grid axis 3, if any)

    def spec(x, kind):
        d = x.shape[-1]
        if kind == "seq":
            return pl.BlockSpec((None, c, None, d), lambda i, j, n, *t: (i, n, j, 0))
        if kind == "seq/t":
            return pl.BlockSpec((None, c, None, d // tiles), lambda i, j, n, *t: (i, n, j, at(t)))
        if kind == "state":
            return pl.BlockSpec((None, None, None) + x.shape[3:],
                                lambda i, j, n, *t: (i, j, n, 0, 0))  # fmt: skip
        if kind == "state/k":
            return pl.BlockSpec((None, None, None, x.shape[3] // tiles, d),
                                lambda i, j, n, *t: (i, j, n, at(t), 0))  # fmt: skip
        if kind == "state/v":
            return pl.BlockSpec((None, None, None, x.shape[3], d // tiles),
                                lambda i, j, n, *t: (i, j, n, 0, at(t)))  # fmt: skip
        if kind == "scores":
            return pl.BlockSpec((None, None, None, c, c), lambda i, j, n, *t: (i, j, n, 0, 0))
        return pl.BlockSpec((None, c, 1), lambda i, j, n, *t: (i, n, 0))

    t = cfg.tune
    warps, stages = (t.bwd_warps, t.bwd_stages) if bwd else (t.warps, t.stages)
    params = None if cfg.interpret else pltriton.CompilerParams(num_warps=warps, num_stages=stages)
    return pl.pallas_call(
        functools.partial(kernel, cfg),
        out_shape=[s for s, _ in outs],
        grid=(bsz, heads, length // c) + ((tiles,) if tiles > 1 else ()),
        in_specs=[spec(x, kind) for x, kind in ins],
        out_specs=[spec(s, kind) for s, kind in outs],
        interpret=cfg.interpret,
        compiler_params=params,
        input_output_aliases=aliases or {},
        name=name,
    )(*[x for x, _ in ins])


# ----------------------------------------------------------------------------------------------
# "staged" GLA kernels (GLA on GPU; the forward's here, the backward's in triton_bwd.py): the
# chunk work in several small kernels with few live tiles each (GLA paper sec. 4.2,
# secondary-level chunking; the split of fla's chunk_gla). Intra-chunk scores and their
# gradient go through memory as ``[batch, heads, chunks, C, C]`` float32; the other kernels tile
# the feature dims.
#
# Stability. Common path (``Chunk.safe`` over the chunk): the whole chunk is factored around
# its middle row ``rho``, ``(q e^{b - rho}) (k e^{rho - b})^T``, as ``gated_diag`` factors a
# diagonal block: with the chunk's log-gate range below ``FACTOR_SPREAD`` every exponent lies in
# ``[-30, 30]``, each kept term is a product of two separately rounded factors (the direct
# product's relative error, no cancellation) and the masked ones (j > i) stay finite. Chunks
# with a larger range go to the fix-up kernels, sub-block by sub-block: every exponent of a
# factored off-diagonal pair is <= 0 (log-gates <= 0, so ``b`` falls along the chunk): rows X
# after columns Y use ``rho = b_{first row of X}`` for ``q_X e^{b_X - rho}`` and ``k_Y e^{rho -
# b_Y}``, columns Y before rows X (the dk side) ``rho = b_{last row of Y}``; a factor that
# underflows drops a term below ``e^{-87} |q| |k|``; diagonal blocks as ``gated_diag``.


def doc_refs(refs: list) -> tuple:
    """``(r_ref, rp_ref)`` of the document-index inputs (``doc_args``), or Nones."""
    return tuple(refs) if refs else (None, None)


def _gla_scores_kernel(cfg: Cfg, q_ref, k_ref, b_ref, *refs, scaled: bool = False):
    """Staged forward (1): ``A [C, C]`` (float32 math, stored in the input dtype),
    ``A_ij = sum_d q_id k_jd e^{b_id - b_jd}`` for ``j <= i`` in the same document (GLA paper
    eq. 4 within a chunk), else 0; with ``scaled`` also the rows the fused Hopper forward
    multiplies, ``q e^{b}`` and ``k e^{B - b}`` (``Chunk.state_in`` / ``state_out``, in the
    input dtype), and ``b_ref`` holds the raw log-gates ``g``: ``b`` is their cumsum here,
    written out too (``Cfg.gates_in``).

    The chunk is factored as a whole around its middle row: one ``[C, dk] x [dk, C]`` MMA (64
    columns at a time), exact where its log-gate range is below ``FACTOR_SPREAD`` (the usual
    case; the bound of ``gated_diag`` over the chunk); ``_gla_scores_fix_kernel`` recomputes
    the other chunks."""
    outs = 4 if scaled else 1
    docs, (a_ref, *scaled_refs) = refs[:-outs], refs[-outs:]
    ch = Chunk(cfg, q_ref, k_ref, None, b_ref, *doc_refs(docs))
    c, dt = cfg.chunk, ch.dt
    dk = q_ref.shape[1]
    a = jnp.zeros((c, c), F32)
    for c0 in range(0, dk, min(dk, 64)):  # 64 columns at a time: fewer live [C, dk] tiles
        cols = slice(c0, c0 + min(dk, 64))
        q, k = ch.rows(q_ref, 0, c, cols).astype(F32), ch.rows(k_ref, 0, c, cols).astype(F32)
        if scaled:
            qg_ref, kg_ref, b_out_ref = scaled_refs
            b_out_ref[:, cols] = b = jnp.cumsum(b_ref[:, cols], axis=0)
            slab = Chunk(cfg, q_ref, None, None, b, *doc_refs(docs))  # b: these columns only
            up, down = slab.factors(0, c)
            qg_ref[:, cols] = (q * slab.state_in(0, c)).astype(dt)
            kg_ref[:, cols] = (k * slab.state_out(0, c)).astype(dt)
        else:
            up, down = ch.factors(0, c, cols)
        a += mm((q * up).astype(dt), (k * down).astype(dt), cfg, tb=True)
    a_ref[...] = jnp.where(ch.diag_mask(0, c), a, 0.0).astype(a_ref.dtype)


def _gla_scores_fix_kernel(cfg: Cfg, q_ref, k_ref, b_ref, *refs):
    """``A`` of the chunks whose log-gate range is >= ``FACTOR_SPREAD`` (strong gates; a
    separate kernel, so the common one keeps few registers), sub-block by sub-block into the
    aliased ``A``: earlier sub-block pairs by one MMA each, factored around the row block's
    first row (factors <= 1), the diagonal blocks as ``gated_diag``."""
    *docs, _, a_ref = refs
    ch = Chunk(cfg, q_ref, k_ref, None, b_ref, *doc_refs(docs))
    c, sub = cfg.chunk, ch.sub

    @pl.when(~ch.safe(0, c))
    def _():
        for i0 in range(0, c, sub):
            for j0, n in ch.blocks(0, i0):
                scores = ch.earlier_scores(i0, j0, n)
                a_ref[i0 : i0 + sub, j0 : j0 + n] = scores.astype(a_ref.dtype)
            diag = ch.gated_diag(i0, ch.diag_mask(i0))[0]
            a_ref[i0 : i0 + sub, i0 : i0 + sub] = diag.astype(a_ref.dtype)


def _gla_out_kernel(cfg: Cfg, q_ref, b_ref, v_ref, a_ref, h_ref, *refs):
    """Staged forward (2), one dv tile: ``o = (q e^b) h[n] + A v`` (GLA paper eq. 4-5);
    ``v``, ``h``, ``o`` are ``[.., bv]`` column tiles."""
    *docs, o_ref = refs
    ch = Chunk(cfg, q_ref, None, v_ref, b_ref, *doc_refs(docs))
    c, dt = cfg.chunk, ch.dt
    qs = (q_ref[...].astype(F32) * ch.state_in(0, c)).astype(dt)
    o = mm(qs, h_ref[...], cfg) + mm(a_ref[...].astype(dt), v_ref[...], cfg)
    o_ref[...] = o.astype(o_ref.dtype)


def scores_like(q, cfg: Cfg, dtype=F32) -> tuple:
    """``[batch, heads, chunks, C, C]`` output (GPU layout ``q [b, len, h, dk]``)."""
    bsz, length, heads, _ = q.shape
    c = cfg.chunk
    return jax.ShapeDtypeStruct((bsz, heads, length // c, c, c), dtype), "scores"


def gla_scores(q, k, b, seg, cfg: Cfg, *, scaled: bool = False):
    """Staged GLA: the intra-chunk scores ``A [batch, heads, chunks, C, C]`` in the input dtype
    (computed in float32; every consumer takes them as an MMA operand of that dtype); with
    ``scaled`` (``b`` then holds the raw log-gates) ``(A, q e^b, k e^{B - b}, b)``: the fused
    Hopper forward's operands (q's layout) and the chunk-local cumsum."""
    ins = [(q, "seq"), (k, "seq"), (b, "seq")] + doc_args(seg, cfg)
    a_like = scores_like(q, cfg, q.dtype)
    like = [a_like]
    if scaled:
        like += [(jax.ShapeDtypeStruct(q.shape, q.dtype), "seq")] * 2 + [(b, "seq")]
    a, *rest = chunk_call(functools.partial(_gla_scores_kernel, scaled=scaled), cfg, ins, like,
                          "la_chunk_gla_scores", bwd=False)  # fmt: skip
    if scaled:
        ins[2] = (rest[2], "seq")
    (a,) = chunk_call(_gla_scores_fix_kernel, cfg, ins + [(a, "scores")],
                       [a_like], "la_chunk_gla_scores_fix", bwd=False,
                       aliases={len(ins): 0})  # fmt: skip
    return (a, *rest) if scaled else a


def forward(q, k, v, b, h, seg, cfg: Cfg):
    """``(o, A)``: the chunk outputs from the states ``h`` entering each chunk, and the staged
    GLA scores (else None)."""
    o_like = jax.ShapeDtypeStruct(v.shape, q.dtype)
    if cfg.staged:
        a = gla_scores(q, k, b, seg, cfg)
        dv = v.shape[3]
        ins = [(q, "seq"), (b, "seq"), (v, "seq/t"), (a, "scores"), (h, "state/v")]
        (o,) = chunk_call(_gla_out_kernel, cfg, ins + doc_args(seg, cfg), [(o_like, "seq/t")],
                          "la_chunk_gla_out", bwd=False,
                          tiles=dv // min(dv, cfg.tune.staged_tile))  # fmt: skip
        return o, a
    return chunk_output(chunk_call, q, k, v, b, h, seg, cfg), None


# ----------------------------------------------------------------------------------------------
# chunk-local cumsum of the GLA log-gates in Pallas (GLA on GPU)


def _cumsum_kernel(reverse: bool, x_ref, o_ref):
    """Cumsum along the rows of one chunk ``[C, dk]`` (float32); ``reverse``: from the chunk's
    end, as ``total - cumsum + x`` (Triton has no reverse scan)."""
    x = x_ref[...]
    s = jnp.cumsum(x, axis=0)
    o_ref[...] = jnp.sum(x, axis=0, keepdims=True) - s + x if reverse else s


def _cumsum_call(x, c: int, interpret: bool, *, reverse: bool) -> jax.Array:
    """Chunk-local cumsum of ``x [batch, len, heads, dk]`` float32, one program per chunk/head."""
    bsz, length, heads, d = x.shape
    spec = pl.BlockSpec((None, c, None, d), lambda i, n, j: (i, n, j, 0))
    return pl.pallas_call(
        functools.partial(_cumsum_kernel, reverse),
        out_shape=jax.ShapeDtypeStruct(x.shape, F32),
        grid=(bsz, length // c, heads),
        in_specs=[spec],
        out_specs=spec,
        interpret=interpret,
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=4, num_stages=1),
        name="la_cumsum_rev" if reverse else "la_cumsum",
    )(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def local_cumsum(g, c: int, interpret: bool) -> jax.Array:
    """``b`` = chunk-local inclusive cumsum of the log-gates (one read, one write of ``g``,
    instead of XLA's reduce-window); its transpose is the reverse cumsum, also one kernel."""
    return _cumsum_call(g, c, interpret, reverse=False)


def reverse_cumsum(db, c: int, interpret: bool) -> jax.Array:
    """The transpose of :func:`local_cumsum`: ``dg`` from ``db``, chunk-local, from the end."""
    return _cumsum_call(db, c, interpret, reverse=True)


local_cumsum.defvjp(
    lambda g, c, interpret: (_cumsum_call(g, c, interpret, reverse=False), None),
    lambda c, interpret, _, db: (reverse_cumsum(db, c, interpret),),
)
