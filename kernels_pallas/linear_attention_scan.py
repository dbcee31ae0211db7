"""Chunked linear-attention scan in Pallas: plain, scalar decay and gated (GLA); fwd + bwd.

Recurrence (Katharopoulos et al. 2020, eq. 5; Yang et al. 2024 "Gated Linear Attention",
eq. 2): ``S_t = diag(a_t) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q_t``, ``a_t = exp(g_t)`` with
``g = log_decay`` None (a_t = 1), ``[batch, len, heads]`` (scalar decay) or
``[batch, len, heads, dk]`` (gated). A new segment (``segment_ids`` changes) zeroes the state
before its first update; the initial state belongs to the first token's segment.

Chunked form (GLA paper sec. 3.3 / 4.2): with chunk-local cumulative log-gates
``b_i = sum_{s <= i} g_s`` (inside one chunk of ``C`` tokens, ``B = b_{C-1}``),

* inter-chunk: ``o_i += (q_i * e^{b_i})^T S_prev``;
  ``S_next = e^{B} * S_prev + sum_j (k_j * e^{B - b_j}) v_j^T`` (all factors <= 1);
* intra-chunk: ``o_i += sum_{j <= i} A_ij v_j`` with ``A_ij = sum_d q_id k_jd e^{b_id - b_jd}``.

Gates stay in log space. For scalar decay ``A = (q k^T) * exp(b_i - b_j)`` is one [C, C]
matmul. For GLA the chunk is split into sub-chunks of ``sub`` rows (secondary chunking, GLA
paper sec. 4.2): a block pair (rows X, cols Y < X) uses the reference ``rho = b_{first row of
X}`` so that ``q e^{b - rho}`` and ``k e^{rho - b}`` are both <= 1 and one MMA computes it. A
diagonal block is factored the same way around its middle row when its log-gate range is below
``FACTOR_SPREAD`` (factors within e^{+-30}: no overflow, same rounding as the direct product);
with stronger gates it is computed element-wise, one key (or query) row at a time, from exact
differences ``b_i - b_j <= 0`` (``_Chunk.gated_diag``). The tuning table
(``kernels_pallas/tuning.py``, ``ScanConfig``) picks how, the sub-chunk rows and the Triton
launch parameters.

Kernels (one set of chunk math, two drivers):

* ``state pass`` (sequential over chunks): chunk-start states ``h[n]`` (stored in the input
  dtype for the MMAs) and the final float32 state; state rows are independent (the gate is
  diagonal), so programs split the state into ``[bk, bv]`` tiles.
* ``chunk output`` (parallel over chunks): ``o`` from ``h[n]`` and the intra-chunk scores.
* backward: a reverse state pass for ``dh[n] = dL/dS_n`` and the initial-state gradient, then
  a parallel chunk kernel for ``dq, dk, dv`` and ``db = q*dq - k*dk`` (+ the ``e^B`` term on
  the last row); ``dg`` follows from ``db`` by the transpose of the chunk-local cumsum (XLA).
  With ``ScanConfig.bwd_form="split"`` the GLA chunk kernel runs as two (GLA paper sec. 4):
  dq (+ ``q*dq``) and dk, dv (+ the rest of ``db``); other gates keep one ("lean") kernel.
* ``form``/``bwd_form="staged"`` (GLA, Triton; GLA paper sec. 4.2 and fla's chunk_gla split):
  scores ``A [b, h, chunks, C, C]`` float32 by one kernel, the output ``(q e^b) h[n] + A v``
  by another over dv tiles; backward ``dA = do v^T``, ``dv = A^T do + (k e^{B-b}) dh[n]`` over
  dv tiles, and ``dq, dk, db`` over dk tiles (each channel's terms are independent). Few live
  tiles per kernel; the TPU driver and the other gates use "lean" (backward "split") instead.

``backend="gpu"`` (Pallas Triton; native ``[batch, len, heads, dim]`` layout, the sequential
kernels loop over chunks inside a program) or ``"tpu"`` (Mosaic; ``[batch, heads, len, dim]``
layout, chunks are an ``arbitrary`` grid axis carrying the state in VMEM scratch). Both run in
interpret mode on CPU. ``recurrent_step`` is the fused one-token decode update.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from einops import rearrange
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.tuning import ScanConfig, scan_config

F32 = jnp.float32
SUB = 16  # chunk sizes are multiples of this (the smallest GLA sub-chunk, one MMA tile)
FACTOR_SPREAD = 30.0  # GLA diagonal block: factor through MMAs when its log-gate range is below
BACKENDS = ("gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Static description of one call (hashable: it keys the custom_vjp)."""

    backend: str  # "gpu" | "tpu"
    interpret: bool
    chunk: int  # C, tokens per chunk
    gate: str  # "none" | "scalar" | "gated"
    segments: bool
    exact: bool  # float32 inputs: ask for full-precision MMAs
    tune: ScanConfig  # launch parameters, sub-chunk size, diagonal-block mode

    @property
    def sub(self) -> int:
        """GLA sub-chunk rows: ``tune.sub`` clipped to the chunk (16 if it does not divide it)."""
        if self.gate != "gated":
            return self.chunk
        sub = min(self.tune.sub, self.chunk)
        return sub if self.chunk % sub == 0 else SUB

    @property
    def staged(self) -> bool:
        """Forward by the "staged" GLA kernels (``tune.form``; GPU only, else "lean")."""
        return self.gate == "gated" and self.backend == "gpu" and self.tune.form == "staged"

    @property
    def bwd_staged(self) -> bool:
        """Backward by the "staged" GLA kernels (``tune.bwd_form``; GPU only, else "split")."""
        return self.gate == "gated" and self.backend == "gpu" and self.tune.bwd_form == "staged"

    @property
    def precision(self):
        return lax.Precision.HIGHEST if self.exact else None


def _mm(a, b, cfg: _Cfg, *, ta: bool = False, tb: bool = False) -> jax.Array:
    """``a @ b`` (optionally transposed operands) with float32 accumulation."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=cfg.precision, preferred_element_type=F32)


def _iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _exp_masked(mask, x):
    """``exp(x)`` where ``mask``, else 0 (x <= 0 wherever mask holds)."""
    return jnp.exp(jnp.where(mask, x, -jnp.inf))


# ----------------------------------------------------------------------------------------------
# state recurrence over one chunk (values; shared by both drivers)


def _state_step(s, x, y, b, b_last, r, r_prev, r_last, cfg: _Cfg, *, reverse: bool):
    """One chunk of the state pass on a ``[bk, bv]`` tile of the state.

    forward: ``S_next = e^{B} S + (k * e^{B - b})^T v`` (x = k, y = v);
    reverse: ``dS_prev = e^{B} dS + (q * e^{b})^T do`` (x = q, y = do).
    ``x [C, bk]``, ``y [C, bv]``, ``b [C, bk | 1]``, ``b_last [1, bk | 1]``, ``r [C, 1]`` document
    index, ``r_prev``/``r_last`` ``[1, 1]`` of the token before the chunk / the last token.
    """
    xd = x.astype(F32)
    carry = s
    if cfg.gate != "none":
        xd = xd * jnp.exp(b if reverse else b_last - b)
        carry = carry * jnp.exp(b_last).T
    if cfg.segments:
        xd = jnp.where(r == (r_prev if reverse else r_last), xd, 0.0)
        carry = jnp.where(r_last == r_prev, carry, 0.0)
    return carry + _mm(xd.astype(y.dtype), y, cfg, ta=True)


def _tiles(dk: int, dv: int, cfg: _Cfg, *, reverse: bool) -> tuple[int, int]:
    """State tile ``[bk, bv]`` of one state-pass program (from the tuning table)."""
    if cfg.backend == "tpu":  # Mosaic: last block dims full (or multiples of 128)
        return dk, dv
    t = cfg.tune
    bk, bv = (t.bwd_state_bk, t.bwd_state_bv) if reverse else (t.state_bk, t.state_bv)
    return min(dk, bk), min(dv, bv)


def _state_pass_gpu(x, y, b, s_init, r, rp, cfg: _Cfg, *, reverse: bool, h_dtype):
    """Triton driver: grid (batch, heads, state tiles); each program loops over all chunks."""
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
            return _state_step(s, xx, yy, bb, b_last, r, r_prev, r_last, cfg, reverse=reverse)

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


def _state_pass_tpu(x, y, b, s_init, r, rp, cfg: _Cfg, *, reverse: bool, h_dtype):
    """Mosaic driver: grid (batch, heads, chunks); chunks run in order, state in VMEM."""
    bsz, heads, length, dk = x.shape
    dv = y.shape[3]
    c, n_chunks = cfg.chunk, length // cfg.chunk
    g = b.shape[3] if b is not None else 0

    def chunk_of(n):
        return n_chunks - 1 - n if reverse else n

    def kernel(*refs):
        x_ref, y_ref, *refs = refs
        b_ref = refs.pop(0) if b is not None else None
        s0_ref = refs.pop(0)
        r_ref, rp_ref = (refs.pop(0), refs.pop(0)) if cfg.segments else (None, None)
        h_ref, sf_ref, s_scr = refs
        n = pl.program_id(2)

        @pl.when(n == 0)
        def _():
            s_scr[...] = s0_ref[...]

        s = s_scr[...]
        h_ref[...] = s.astype(h_ref.dtype)
        bb = b_last = r = r_prev = r_last = None
        if b_ref is not None:
            bb, b_last = b_ref[...], b_ref[c - 1 : c, :]
        if r_ref is not None:
            r, r_last, r_prev = r_ref[...], r_ref[c - 1 : c, :], rp_ref[0:1, :]
        s = _state_step(s, x_ref[...], y_ref[...], bb, b_last, r, r_prev, r_last, cfg,
                        reverse=reverse)  # fmt: skip
        s_scr[...] = s

        @pl.when(n == n_chunks - 1)
        def _():
            sf_ref[...] = s

    seq = lambda d: pl.BlockSpec((None, None, c, d), lambda i, j, n: (i, j, chunk_of(n), 0))
    full = pl.BlockSpec((None, None, dk, dv), lambda i, j, n: (i, j, 0, 0))
    doc = pl.BlockSpec((None, c, 1), lambda i, j, n: (i, chunk_of(n), 0))
    args, specs = [x, y], [seq(dk), seq(dv)]
    if b is not None:
        args, specs = args + [b], specs + [seq(g)]
    args, specs = args + [s_init], specs + [full]
    if cfg.segments:
        args, specs = args + [r, rp], specs + [doc, doc]
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((bsz, heads, n_chunks, dk, dv), h_dtype),
            jax.ShapeDtypeStruct((bsz, heads, dk, dv), F32),
        ),
        grid=(bsz, heads, n_chunks),
        in_specs=specs,
        out_specs=(
            pl.BlockSpec((None, None, None, dk, dv), lambda i, j, n: (i, j, chunk_of(n), 0, 0)),
            full,
        ),
        scratch_shapes=[pltpu.VMEM((dk, dv), F32)],
        interpret=cfg.interpret,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        name="la_state_bwd" if reverse else "la_state_fwd",
    )(*args)


def _state_pass(x, y, b, s_init, r, rp, cfg: _Cfg, *, reverse: bool, h_dtype):
    """Returns ``(h [batch, heads, chunks, dk, dv], s_end [batch, heads, dk, dv] f32)``.

    forward: ``h[n]`` = state before chunk n, ``s_end`` = final state;
    reverse: ``h[n]`` = dL/d(state after chunk n), ``s_end`` = dL/d(initial state).
    """
    fn = _state_pass_tpu if cfg.backend == "tpu" else _state_pass_gpu
    return fn(x, y, b, s_init, r, rp, cfg, reverse=reverse, h_dtype=h_dtype)


# ----------------------------------------------------------------------------------------------
# intra-chunk scores (refs of one chunk; shared by both backends)


class _Chunk:
    """Refs of one chunk (``[C, dim]`` each) and the static geometry of its sub-blocks."""

    def __init__(self, cfg: _Cfg, q, k, v, b, r, rp):
        self.cfg, self.q, self.k, self.v, self.b, self.r, self.rp = cfg, q, k, v, b, r, rp
        self.c, self.sub = cfg.chunk, cfg.sub
        self.dt = (q if q is not None else k).dtype

    def rows(self, ref, i0, n=None, cols=slice(None)):
        n = self.sub if n is None else n
        return ref[i0 : i0 + n, cols]

    def gate(self, i0, n=None, cols=slice(None)):
        """``b`` rows as float32 ``[n, dk | 1]``, or None without a gate."""
        return None if self.b is None else self.rows(self.b, i0, n, cols)

    def doc(self, i0, n=None):
        return None if self.r is None else self.rows(self.r, i0, n)

    def same_doc(self, ri, rj_t, x):
        """Zero ``x [rows, cols]`` where query and key documents differ."""
        return x if ri is None else jnp.where(ri == rj_t, x, 0.0)

    def inter_mask(self, i0, n=None):
        """Rows ``[i0, i0 + n)`` that see the incoming state ``[n, 1]`` (or None)."""
        return None if self.r is None else self.doc(i0, n) == self.rp[0:1, :]

    def diag_mask(self, i0, n=None, *, transpose: bool = False):
        """Causal (+ same document) mask of the diagonal block ``[n, n]`` (default ``sub``)."""
        n = self.sub if n is None else n
        rows, cols = _iota((n, n), 0), _iota((n, n), 1)
        m = rows <= cols if transpose else rows >= cols
        if self.r is not None:
            rb = self.doc(i0, n)
            m &= rb == rb.T
        return m

    def safe(self, i0, n):
        """Whether the log-gate range of rows ``[i0, i0 + n)`` is below ``FACTOR_SPREAD``."""
        return jnp.max(self.gate(i0, 1) - self.gate(i0 + n - 1, 1)) < FACTOR_SPREAD

    def factors(self, i0, n, cols=slice(None)):
        """Rows ``[i0, i0 + n)`` (columns ``cols``) factored around their middle row ``rho``
        (GLA paper sec. 4.2): ``(e^{b - rho}, e^{rho - b})`` float32 ``[n, dk]``, exponents
        clamped at ``FACTOR_SPREAD`` (none is where ``safe``; see ``gated_diag`` for the bound)."""
        b, rho = self.gate(i0, n, cols), self.gate(i0 + n // 2, 1, cols)
        up = jnp.exp(jnp.minimum(b - rho, FACTOR_SPREAD))
        return up, jnp.exp(jnp.minimum(rho - b, FACTOR_SPREAD))

    def state_in(self, i0, n):
        """GLA: ``e^{b}`` of rows ``[i0, i0 + n)`` ``[n, dk]``, zero on rows that do not see the
        incoming state (a document starts before them in the chunk)."""
        e = jnp.exp(self.gate(i0, n))
        return e if self.r is None else jnp.where(self.inter_mask(i0, n), e, 0.0)

    def state_out(self, i0, n):
        """GLA: ``e^{B - b}`` of rows ``[i0, i0 + n)`` ``[n, dk]`` (their weight in the outgoing
        state), zero on rows before the chunk's last document start."""
        e = jnp.exp(self.gate(self.c - 1, 1) - self.gate(i0, n))
        return (
            e if self.r is None else jnp.where(self.doc(i0, n) == self.doc(self.c - 1, 1), e, 0.0)
        )

    def state_gate_grad(self, hdh, kdk_state):
        """``dL/dB`` through the state update (B = the chunk's last cumulative log-gate, ``[1,
        dk | 1]``): ``e^{B} sum_v S dS'`` (``hdh [dk, 1] = sum_v S dS'``; zero if the chunk
        resets the state) plus ``kdk_state = sum_j k_j dk_j`` over the keys' state terms (of
        ``e^{B - b_j}``)."""
        if self.cfg.gate == "scalar":
            extra = jnp.sum(hdh, axis=0, keepdims=True)
            kdk_state = jnp.sum(kdk_state, axis=1, keepdims=True)
        else:
            extra = hdh.T  # [1, dk]
        extra = extra * jnp.exp(self.gate(self.c - 1, 1))
        if self.r is not None:
            extra = jnp.where(self.doc(self.c - 1, 1) == self.rp[0:1, :], extra, 0.0)
        return extra + kdk_state

    def diag_scores(self, i0, m):
        """``A [sub, sub]`` of the diagonal block (float32, masked by ``m``)."""
        q, k = self.rows(self.q, i0), self.rows(self.k, i0)
        if self.cfg.gate != "gated":
            s = _mm(q, k, self.cfg, tb=True)
            if self.cfg.gate == "scalar":
                b = self.gate(i0)
                return s * _exp_masked(m, b - b.T)
            return jnp.where(m, s, 0.0)
        return self.gated_diag(i0, m)[0]

    def gated_diag(self, i0, m, da=None, dat=None, *, scores: bool = True):
        """Diagonal GLA block: ``(A [sub, sub],)`` or, given ``da = dA`` and/or ``dat = dA^T``
        (masked), ``(A, dq, dk)`` with the intra-block ``dq`` (from ``da``) and ``dk`` (from
        ``dat``), None for what was not asked (``scores=False``: no ``A``; the split backward's
        dq kernel); ``tune.diag`` / ``tune.bwd_diag`` say how.

        Factored form (GLA paper sec. 4.2, a diagonal sub-chunk factored like the off-diagonal
        ones but around its middle row ``rho``): ``A = (q e^{b - rho}) (k e^{rho - b})^T`` by
        one MMA, ``dq = e^{b - rho} (dA (k e^{rho - b}))``, ``dk = e^{rho - b} (dA^T (q e^{b -
        rho}))``. Stability: with the block's log-gate range ``spread = max_d (b_first - b_last)
        < FACTOR_SPREAD`` every exponent lies in ``[-spread, spread]``, so each factor is within
        e^{+-30} of its input (normal in bf16/f32, no overflow or underflow) and each kept term
        ``q_id k_jd e^{b_id - b_jd}`` is a product of two separately rounded factors: the same
        relative error as the direct product, no cancellation; masked terms (j > i, up to
        e^{30} |q| |k|) stay finite and are zeroed by the mask. Blocks with a larger range (very
        strong gates, e.g. log-gates -5 per step) use the exact loops, whose exponents
        ``b_i - b_j <= 0`` are exact differences. Exponents are clamped at ``FACTOR_SPREAD`` so
        the factored values of such blocks stay finite before they are discarded.

        Modes: "exact" loops only; "cond" picks one branch with ``lax.cond`` (the forward's
        first form; Triton 3.6 failed to compile it in the backward); "factored" is branch-free:
        the factored values, zeroed on unsafe blocks (``jnp.where``), are the loops' initial
        carries and the loops run ``sub`` steps on unsafe blocks, 0 on safe ones (so they cost
        nothing there, and no second set of results stays live for a select).
        """
        q = self.rows(self.q, i0)
        grads = da is not None or dat is not None
        mode = self.cfg.tune.bwd_diag if grads else self.cfg.tune.diag

        def factored():
            up, down = self.factors(i0, self.sub)
            qf = (q.astype(F32) * up).astype(self.dt)
            kf = (self.rows(self.k, i0).astype(F32) * down).astype(self.dt)
            a = jnp.where(m, _mm(qf, kf, self.cfg, tb=True), 0.0) if scores else None
            if not grads:
                return (a,)
            dq = None if da is None else up * _mm(da.astype(self.dt), kf, self.cfg)
            return a, dq, None if dat is None else down * _mm(dat.astype(self.dt), qf, self.cfg)

        def exact(steps, a0=None, dq0=None, dk0=None):  # the loops, accumulating onto a0, ..
            n, d = self.sub, self.q.shape[1]
            a0, dq0, dk0 = (jnp.zeros(s, F32) if x is None else x
                            for x, s in ((a0, (n, n)), (dq0, (n, d)), (dk0, (n, d))))  # fmt: skip
            a, dq = self._gated_diag(i0, m, q, da, steps, a0 if scores else None, dq0)
            if not grads:
                return (a,)
            dk = None if dat is None else self._gated_diag_dk(i0, dat, steps, dk0)
            return a, None if da is None else dq, dk

        if mode == "exact":
            return exact(self.sub)
        safe = self.safe(i0, self.sub)
        if mode == "cond":
            return lax.cond(safe, factored, lambda: exact(self.sub))
        # trip count as a product: Pallas-Triton lowers a select of int literals to i1
        steps = (~safe).astype(jnp.int32) * self.sub
        return exact(steps, *(None if x is None else jnp.where(safe, x, 0.0) for x in factored()))

    def _gated_diag(self, i0, m, q, da, steps, a0, dq0):
        """Column loop over the diagonal block: ``A [sub, sub]`` and ``sum_j dA_ij k_j e^..``,
        added to ``a0``/``dq0`` (``a0`` None: no ``A``, returned as None).

        ``A_ij = sum_d q_id k_jd e^{b_id - b_jd}`` from exact differences (<= 0 for j <= i);
        ``steps`` columns (``sub``, or a traced 0 to skip the loop).
        """
        n = self.sub
        qf, b = q.astype(F32), self.gate(i0)
        rows, cols = _iota((n, 1), 0), _iota((n, n), 1)

        def body(j, carry):
            a, dq = carry
            kj = self.k[pl.ds(i0 + j, 1), :].astype(F32)  # [1, dk]
            e = _exp_masked(rows >= j, b - self.b[pl.ds(i0 + j, 1), :]) * kj  # [n, dk]
            if a is not None:
                a = a + jnp.where(cols == j, jnp.sum(qf * e, axis=1, keepdims=True), 0.0)
            if da is not None:
                dq = dq + jnp.sum(jnp.where(cols == j, da, 0.0), axis=1, keepdims=True) * e
            return a, dq

        a, dq = lax.fori_loop(0, steps, body, (a0, dq0))
        return None if a is None else jnp.where(m, a, 0.0), dq

    def _gated_diag_dk(self, i0, dat, steps, dk0):
        """Row loop: ``dk0 + dk`` with ``dk_j = sum_{i >= j} dA_ij q_i e^{b_i - b_j}``;
        ``dat = dA^T [sub, sub]``."""
        n = self.sub
        b = self.gate(i0)
        rows, cols = _iota((n, 1), 0), _iota((n, n), 1)

        def body(i, dk):
            qi = self.q[pl.ds(i0 + i, 1), :].astype(F32)
            e = _exp_masked(rows <= i, self.b[pl.ds(i0 + i, 1), :] - b) * qi
            return dk + jnp.sum(jnp.where(cols == i, dat, 0.0), axis=1, keepdims=True) * e

        return lax.fori_loop(0, steps, body, dk0)

    def span(self, ref, j0, n):
        """Rows ``[j0, j0 + n)`` of ``ref`` (the whole ref when that is the chunk)."""
        return ref[...] if (j0, n) == (0, self.c) else ref[j0 : j0 + n, :]

    def pieces(self, lo, hi, lean):
        """Row ranges ``(j0, n)`` covering rows ``[lo, hi)`` of an off-diagonal product: the
        whole chunk (the factors mask the other rows; none if the range is empty), or with
        ``lean`` exactly ``[lo, hi)`` as static power-of-two slices (smaller live tiles)."""
        if not lean:
            return [(0, self.c)] if lo < hi else []
        out = []
        while lo < hi:
            n = 1 << ((hi - lo).bit_length() - 1)
            out.append((lo, n))
            lo += n
        return out

    def blocks(self, lo, hi):
        """Sub-block row ranges ``(j0, sub)`` covering rows ``[lo, hi)`` (the staged kernels:
        one sub-block pair per MMA, the smallest live tiles)."""
        return [(j0, self.sub) for j0 in range(lo, hi, self.sub)]

    def ref_rows(self, i0, j0=0, n=None):
        """Row-block factors ``q_X e^{b_X - rho}``, ``k e^{rho - b}`` (cols < i0, of rows
        ``[j0, j0 + n)``, default the chunk); rho = b_{i0}."""
        n = self.c if n is None else n
        rho = self.gate(i0, 1)
        qr = self.rows(self.q, i0).astype(F32) * jnp.exp(self.gate(i0) - rho)
        j = _iota((n, 1), 0)
        kr = self.span(self.k, j0, n).astype(F32)
        if j0 + n > i0:
            return qr, kr * _exp_masked(j < i0 - j0, rho - self.span(self.b, j0, n)), rho
        return qr, kr * jnp.exp(rho - self.span(self.b, j0, n)), rho

    def ref_cols(self, i0, j0=0, n=None):
        """Column-block factors: ``q e^{b - rho}`` (rows after the block, of rows ``[j0, j0 +
        n)``, default the chunk), ``k_X e^{rho - b_X}``; rho = b of the block's last row."""
        n = self.c if n is None else n
        j1 = i0 + self.sub - 1
        rho = self.gate(j1, 1)
        qr = self.span(self.q, j0, n).astype(F32)
        if j0 <= j1:
            qr = qr * _exp_masked(_iota((n, 1), 0) > j1 - j0, self.span(self.b, j0, n) - rho)
        else:
            qr = qr * jnp.exp(self.span(self.b, j0, n) - rho)
        kr = self.rows(self.k, i0).astype(F32) * jnp.exp(rho - self.gate(i0))
        return qr, kr, rho

    def earlier_scores(self, i0, j0, n):
        """GLA ``A [sub, n]`` of block row i0 against the keys of rows ``[j0, j0 + n)`` (only
        those before i0 count), same-document masked, float32: one MMA of ``ref_rows``."""
        qr, kr, _ = self.ref_rows(i0, j0, n)
        rj_t = None if self.r is None else self.span(self.r, j0, n).T
        a = _mm(qr.astype(self.dt), kr.astype(self.dt), self.cfg, tb=True)
        return self.same_doc(self.doc(i0), rj_t, a)


def _out_kernel(cfg: _Cfg, *refs):
    """Forward chunk kernel: ``o = (q e^b) h[n] + A v`` block row by block row."""
    q_ref, k_ref, v_ref, *refs = refs
    b_ref = refs.pop(0) if cfg.gate != "none" else None
    h_ref = refs.pop(0)
    r_ref, rp_ref = (refs.pop(0), refs.pop(0)) if cfg.segments else (None, None)
    (o_ref,) = refs
    ch = _Chunk(cfg, q_ref, k_ref, v_ref, b_ref, r_ref, rp_ref)
    lean = cfg.tune.form != "hoist"  # h loaded where used; earlier blocks in exact slices
    h = None if lean else h_ref[...]
    for i0 in range(0, cfg.chunk, ch.sub):
        qi = ch.rows(q_ref, i0).astype(F32)
        if b_ref is not None:
            qi = qi * jnp.exp(ch.gate(i0))
        if r_ref is not None:
            qi = jnp.where(ch.inter_mask(i0), qi, 0.0)
        acc = _mm(qi.astype(ch.dt), h_ref[...] if lean else h, cfg)
        a = ch.diag_scores(i0, ch.diag_mask(i0))
        acc += _mm(a.astype(ch.dt), ch.rows(v_ref, i0), cfg)
        for j0, n in ch.pieces(0, i0, lean):  # earlier sub-blocks (gated only)
            a = ch.earlier_scores(i0, j0, n)
            acc += _mm(a.astype(ch.dt), ch.span(v_ref, j0, n), cfg)
        o_ref[i0 : i0 + ch.sub, :] = acc.astype(o_ref.dtype)


def _grad_kernel(cfg: _Cfg, *refs, part: str = "all"):
    """Backward chunk kernel of one chunk given ``h[n]`` and ``dh[n]``. ``part`` "all": dq, dk,
    dv and db; GLA only, the two kernels of ``bwd_form="split"`` (fewer live tiles each, as
    fla's split backward): "dq" = dq and its db term ``q * dq``, "dkv" = dk, dv and the rest of
    db (the two db parts are summed outside)."""
    q_ref, k_ref, v_ref, *refs = refs
    b_ref = refs.pop(0) if cfg.gate != "none" else None
    h_ref, dh_ref, do_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    r_ref, rp_ref = (refs.pop(0), refs.pop(0)) if cfg.segments else (None, None)
    want_q, want_kv = part != "dkv", part != "dq"
    outs = iter(refs)
    dq_ref = next(outs) if want_q else None
    dk_ref, dv_ref = (next(outs), next(outs)) if want_kv else (None, None)
    db_ref = next(outs) if b_ref is not None else None
    ch = _Chunk(cfg, q_ref, k_ref, v_ref, b_ref, r_ref, rp_ref)
    c, sub, dt = cfg.chunk, ch.sub, ch.dt
    lean = cfg.tune.bwd_form != "hoist"  # h, dh loaded where used, not live across the loop
    h, dh = (None, None) if lean else (h_ref[...], dh_ref[...])
    b_last = None if b_ref is None else b_ref[c - 1 : c, :]
    r_all_t = None if r_ref is None else r_ref[...].T
    last_doc = None if r_ref is None else r_ref[c - 1 : c, :]
    kdk_state = jnp.zeros((1, q_ref.shape[1]), F32)  # sum_j k_j * dk_j (state part): d/dB

    for i0 in range(0, c, sub):
        q, k, v, do = (ch.rows(ref, i0) for ref in (q_ref, k_ref, v_ref, do_ref))
        b, rd = ch.gate(i0), ch.doc(i0)
        # incoming state (dq) and outgoing state (dk, dv)
        eq = jnp.ones((sub, 1), F32) if b is None else jnp.exp(b)
        ek = jnp.ones((sub, 1), F32) if b is None else jnp.exp(b_last - b)
        if rd is not None:
            eq = jnp.where(ch.inter_mask(i0), eq, 0.0)
            ek = jnp.where(rd == last_doc, ek, 0.0)
        if lean:
            h, dh = h_ref[...] if want_q else None, dh_ref[...] if want_kv else None
        if want_q:
            dq = eq * _mm(do, h, cfg, tb=True)
        if want_kv:
            dk = ek * _mm(v, dh, cfg, tb=True)
            kdk_state += jnp.sum(k.astype(F32) * dk, axis=0, keepdims=True)
            kd = (k.astype(F32) * ek).astype(dt)
            dv = _mm(kd, dh, cfg)
        # diagonal block
        m = ch.diag_mask(i0)
        if cfg.gate != "gated":
            d = m.astype(F32) if b is None else _exp_masked(m, b - b.T)
            a = _mm(q, k, cfg, tb=True) * d
            da = _mm(do, v, cfg, tb=True) * d
            dq += _mm(da.astype(dt), k, cfg)
            dk += _mm(da.astype(dt), q, cfg, ta=True)
        else:
            da = dat = None
            if want_q:
                da = jnp.where(m, _mm(do, v, cfg, tb=True), 0.0)
            if want_kv:
                mt = ch.diag_mask(i0, transpose=True)
                dat = jnp.where(mt, _mm(v, do, cfg, tb=True), 0.0)
            a, dq_diag, dk_diag = ch.gated_diag(i0, m, da, dat, scores=want_kv)
            if want_q:
                dq += dq_diag
            if want_kv:
                dk += dk_diag
        if want_kv:
            dv += _mm(a.astype(dt), do, cfg, ta=True)
        # earlier columns -> dq of this block
        if i0 > 0 and want_q:
            qr, kr, rho = ch.ref_rows(i0)
            da = ch.same_doc(rd, r_all_t, _mm(do, v_ref[...], cfg, tb=True))
            dq += jnp.exp(b - rho) * _mm(da.astype(dt), kr.astype(dt), cfg)
        # later rows -> dk, dv of this block
        if i0 + sub < c and want_kv:
            qr, kr, rho = ch.ref_cols(i0)
            r_all = None if r_ref is None else r_ref[...]
            rd_t = None if rd is None else rd.T
            a = ch.same_doc(r_all, rd_t, _mm(qr.astype(dt), kr.astype(dt), cfg, tb=True))
            da = ch.same_doc(r_all, rd_t, _mm(do_ref[...], v, cfg, tb=True))
            dv += _mm(a.astype(dt), do_ref[...], cfg, ta=True)
            dk += jnp.exp(rho - b) * _mm(da.astype(dt), qr.astype(dt), cfg, ta=True)
        if want_q:
            dq_ref[i0 : i0 + sub, :] = dq.astype(dq_ref.dtype)
        if want_kv:
            dk_ref[i0 : i0 + sub, :] = dk.astype(dk_ref.dtype)
            dv_ref[i0 : i0 + sub, :] = dv.astype(dv_ref.dtype)
        if db_ref is not None:  # [sub, dk]
            db = (q.astype(F32) * dq if want_q else 0.0) - (k.astype(F32) * dk if want_kv else 0.0)
            if cfg.gate == "scalar":
                db = jnp.sum(db, axis=1, keepdims=True)
            if want_kv and i0 + sub == c:  # d/dB of e^{B} S_prev and e^{B - b_j} (state update)
                if lean:
                    h, dh = h_ref[...], dh_ref[...]
                hdh = jnp.sum(h.astype(F32) * dh.astype(F32), axis=1, keepdims=True)
                extra = ch.state_gate_grad(hdh, kdk_state)
                db += jnp.where(_iota((sub, 1), 0) == sub - 1, extra, 0.0)
            db_ref[i0 : i0 + sub, :] = db


# ----------------------------------------------------------------------------------------------
# "staged" GLA kernels (ScanConfig.form / bwd_form = "staged"; GPU): the chunk work in several
# small kernels with few live tiles each (GLA paper sec. 4.2, secondary-level chunking; the
# split of fla's chunk_gla). Intra-chunk scores and their gradient go through memory as
# ``[batch, heads, chunks, C, C]`` float32; the other kernels tile the feature dims.
#
# Stability. Common path (``_Chunk.safe`` over the chunk): the whole chunk is factored around
# its middle row ``rho``, ``(q e^{b - rho}) (k e^{rho - b})^T``, as ``gated_diag`` factors a
# diagonal block: with the chunk's log-gate range below ``FACTOR_SPREAD`` every exponent lies in
# ``[-30, 30]``, each kept term is a product of two separately rounded factors (the direct
# product's relative error, no cancellation) and the masked ones (j > i) stay finite. Chunks
# with a larger range go to the fix-up kernels, sub-block by sub-block: every exponent of a
# factored off-diagonal pair is <= 0 (log-gates <= 0, so ``b`` falls along the chunk): rows X
# after columns Y use ``rho = b_{first row of X}`` for ``q_X e^{b_X - rho}`` and ``k_Y e^{rho -
# b_Y}``, columns Y before rows X (the dk side) ``rho = b_{last row of Y}``; a factor that
# underflows drops a term below ``e^{-87} |q| |k|``; diagonal blocks as ``gated_diag``.


def _docs(refs: list) -> tuple:
    """``(r_ref, rp_ref)`` of the document-index inputs (``_doc_args``), or Nones."""
    return tuple(refs) if refs else (None, None)


def _gla_scores_kernel(cfg: _Cfg, q_ref, k_ref, b_ref, *refs):
    """Staged forward (1): ``A [C, C]`` float32, ``A_ij = sum_d q_id k_jd e^{b_id - b_jd}``
    for ``j <= i`` in the same document (GLA paper eq. 4 within a chunk), else 0.

    The chunk is factored as a whole around its middle row: one ``[C, dk] x [dk, C]`` MMA (64
    columns at a time), exact where its log-gate range is below ``FACTOR_SPREAD`` (the usual
    case; the bound of ``gated_diag`` over the chunk); ``_gla_scores_fix_kernel`` recomputes
    the other chunks."""
    *docs, a_ref = refs
    ch = _Chunk(cfg, q_ref, k_ref, None, b_ref, *_docs(docs))
    c, dt = cfg.chunk, ch.dt
    dk = q_ref.shape[1]
    a = jnp.zeros((c, c), F32)
    for c0 in range(0, dk, min(dk, 64)):  # 64 columns at a time: fewer live [C, dk] tiles
        cols = slice(c0, c0 + min(dk, 64))
        up, down = ch.factors(0, c, cols)
        qf = (ch.rows(q_ref, 0, c, cols).astype(F32) * up).astype(dt)
        kf = (ch.rows(k_ref, 0, c, cols).astype(F32) * down).astype(dt)
        a += _mm(qf, kf, cfg, tb=True)
    a_ref[...] = jnp.where(ch.diag_mask(0, c), a, 0.0)


def _gla_scores_fix_kernel(cfg: _Cfg, q_ref, k_ref, b_ref, *refs):
    """``A`` of the chunks whose log-gate range is >= ``FACTOR_SPREAD`` (strong gates; a
    separate kernel, so the common one keeps few registers), sub-block by sub-block into the
    aliased ``A``: earlier sub-block pairs by one MMA each, factored around the row block's
    first row (factors <= 1), the diagonal blocks as ``gated_diag``."""
    *docs, _, a_ref = refs
    ch = _Chunk(cfg, q_ref, k_ref, None, b_ref, *_docs(docs))
    c, sub = cfg.chunk, ch.sub

    @pl.when(~ch.safe(0, c))
    def _():
        for i0 in range(0, c, sub):
            for j0, n in ch.blocks(0, i0):
                a_ref[i0 : i0 + sub, j0 : j0 + n] = ch.earlier_scores(i0, j0, n)
            a_ref[i0 : i0 + sub, i0 : i0 + sub] = ch.gated_diag(i0, ch.diag_mask(i0))[0]


def _gla_out_kernel(cfg: _Cfg, q_ref, b_ref, v_ref, a_ref, h_ref, *refs):
    """Staged forward (2), one dv tile: ``o = (q e^b) h[n] + A v`` (GLA paper eq. 4-5);
    ``v``, ``h``, ``o`` are ``[.., bv]`` column tiles."""
    *docs, o_ref = refs
    ch = _Chunk(cfg, q_ref, None, v_ref, b_ref, *_docs(docs))
    c, dt = cfg.chunk, ch.dt
    qs = (q_ref[...].astype(F32) * ch.state_in(0, c)).astype(dt)
    o = _mm(qs, h_ref[...], cfg) + _mm(a_ref[...].astype(dt), v_ref[...], cfg)
    o_ref[...] = o.astype(o_ref.dtype)


def _gla_da_kernel(cfg: _Cfg, do_ref, v_ref, *refs):
    """Staged backward (1): ``dA = do v^T`` [C, C] float32, causal and same-document masked."""
    *docs, da_ref = refs
    ch = _Chunk(cfg, do_ref, None, v_ref, None, *_docs(docs))
    m = ch.diag_mask(0, cfg.chunk)
    da_ref[...] = jnp.where(m, _mm(do_ref[...], v_ref[...], cfg, tb=True), 0.0)


def _gla_dv_kernel(cfg: _Cfg, k_ref, b_ref, a_ref, do_ref, dh_ref, *refs):
    """Staged backward (2), one dv tile: ``dv = A^T do + (k e^{B - b}) dh[n]``; ``do``, ``dh``,
    ``dv`` are ``[.., bv]`` column tiles."""
    *docs, dv_ref = refs
    ch = _Chunk(cfg, None, k_ref, None, b_ref, *_docs(docs))
    c, dt = cfg.chunk, ch.dt
    ks = (k_ref[...].astype(F32) * ch.state_out(0, c)).astype(dt)
    dv = _mm(a_ref[...].astype(dt), do_ref[...], cfg, ta=True) + _mm(ks, dh_ref[...], cfg)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _row_dot(x_ref, y_ref) -> jax.Array:
    """``sum_v x * y`` of two ``[n, dv]`` refs as float32 ``[n, 1]``, 64 columns at a time."""
    n, dv = x_ref.shape
    w = min(dv, 64)
    out = jnp.zeros((n, 1), F32)
    for c0 in range(0, dv, w):
        x, y = (ref[:, c0 : c0 + w].astype(F32) for ref in (x_ref, y_ref))
        out += jnp.sum(x * y, axis=1, keepdims=True)
    return out


def _gla_dqk_kernel(cfg: _Cfg, q_ref, k_ref, b_ref, v_ref, do_ref, da_ref, h_ref, dh_ref, *refs):
    """Staged backward (3), one dk tile (every term is per channel d):

    ``dq = e^{b} (do h^T) + sum_{j <= i} dA_ij k_j e^{b_i - b_j}``,
    ``dk = e^{B - b} (v dh^T) + sum_{i >= j} dA_ij q_i e^{b_i - b_j}``,
    ``db = q dq - k dk`` (+ ``dL/dB``, ``_Chunk.state_gate_grad``, on the last row): the
    derivative of ``o`` and of the state update w.r.t. the cumulative log-gates ``b``. The
    intra-chunk sums as in ``_gla_scores_kernel``: one MMA each over the chunk factored around
    its middle row (``_gla_dqk_fix_kernel`` recomputes the chunks with a log-gate range >=
    ``FACTOR_SPREAD``). ``q, k, b, h, dh, dq, dk, db``: dk tiles."""
    *docs, dq_ref, dk_ref, db_ref = refs
    ch = _Chunk(cfg, q_ref, k_ref, v_ref, b_ref, *_docs(docs))
    c, dt = cfg.chunk, ch.dt
    f32 = lambda ref: ref[...].astype(F32)  # noqa: E731 -- loaded where used: few live tiles
    up, down = ch.factors(0, c)
    dk = ch.state_out(0, c) * _mm(v_ref[...], dh_ref[...], cfg, tb=True)
    kdk_state = jnp.sum(f32(k_ref) * dk, axis=0, keepdims=True)
    dk += down * _mm(da_ref[...].astype(dt), (f32(q_ref) * up).astype(dt), cfg, ta=True)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    extra = ch.state_gate_grad(_row_dot(h_ref, dh_ref), kdk_state)
    db_ref[...] = jnp.where(_iota((c, 1), 0) == c - 1, extra, 0.0) - f32(k_ref) * dk
    up, down = ch.factors(0, c)  # again: not live across the dk half
    dq = ch.state_in(0, c) * _mm(do_ref[...], h_ref[...], cfg, tb=True)
    dq += up * _mm(da_ref[...].astype(dt), (f32(k_ref) * down).astype(dt), cfg)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    db_ref[...] += f32(q_ref) * dq


def _gla_dqk_fix_kernel(cfg: _Cfg, q_ref, k_ref, b_ref, v_ref, do_ref, da_ref, h_ref, dh_ref,
                        *refs):  # fmt: skip
    """``_gla_dqk_kernel`` for the chunks with a log-gate range >= ``FACTOR_SPREAD`` (strong
    gates), sub-block by sub-block into the aliased ``dq, dk, db``: per block X the inter
    terms, the diagonal block by ``gated_diag``, earlier columns (dq) and later rows (dk) one
    sub-block pair per MMA, factored around the pair's boundary (factors <= 1)."""
    *docs, _, _, _, dq_ref, dk_ref, db_ref = refs
    ch = _Chunk(cfg, q_ref, k_ref, v_ref, b_ref, *_docs(docs))

    @pl.when(~ch.safe(0, cfg.chunk))
    def _():
        _gla_dqk_blocks(ch, da_ref, h_ref, dh_ref, do_ref, dq_ref, dk_ref, db_ref)


def _gla_dqk_blocks(ch: _Chunk, da_ref, h_ref, dh_ref, do_ref, dq_ref, dk_ref, db_ref):
    """The sub-block path of ``_gla_dqk_fix_kernel``."""
    cfg = ch.cfg
    c, sub, dt = cfg.chunk, ch.sub, ch.dt
    kdk_state = jnp.zeros((1, ch.q.shape[1]), F32)
    for i0 in range(0, c, sub):
        q, k, b = ch.rows(ch.q, i0).astype(F32), ch.rows(ch.k, i0).astype(F32), ch.gate(i0)
        dq = ch.state_in(i0, sub) * _mm(ch.rows(do_ref, i0), h_ref[...], cfg, tb=True)
        dk = ch.state_out(i0, sub) * _mm(ch.rows(ch.v, i0), dh_ref[...], cfg, tb=True)
        kdk_state += jnp.sum(k * dk, axis=0, keepdims=True)
        da = da_ref[i0 : i0 + sub, i0 : i0 + sub]
        _, dq_diag, dk_diag = ch.gated_diag(i0, None, da, da.T, scores=False)
        dq, dk = dq + dq_diag, dk + dk_diag
        acc, rho = jnp.zeros_like(dq), None
        for j0, n in ch.blocks(0, i0):  # earlier columns -> dq
            _, kr, rho = ch.ref_rows(i0, j0, n)
            acc += _mm(da_ref[i0 : i0 + sub, j0 : j0 + n].astype(dt), kr.astype(dt), cfg)
        if rho is not None:
            dq += jnp.exp(b - rho) * acc
        acc, rho = jnp.zeros_like(dk), None
        for j0, n in ch.blocks(i0 + sub, c):  # later rows -> dk
            qr, _, rho = ch.ref_cols(i0, j0, n)
            acc += _mm(da_ref[j0 : j0 + n, i0 : i0 + sub].astype(dt), qr.astype(dt), cfg, ta=True)
        if rho is not None:
            dk += jnp.exp(rho - b) * acc
        dq_ref[i0 : i0 + sub, :] = dq.astype(dq_ref.dtype)
        dk_ref[i0 : i0 + sub, :] = dk.astype(dk_ref.dtype)
        db = q * dq - k * dk
        if i0 + sub == c:
            extra = ch.state_gate_grad(_row_dot(h_ref, dh_ref), kdk_state)
            db += jnp.where(_iota((sub, 1), 0) == sub - 1, extra, 0.0)
        db_ref[i0 : i0 + sub, :] = db


def _chunk_call(kernel, cfg: _Cfg, ins: list, outs: list, name: str, *, bwd: bool,
                tiles: int = 1, aliases: dict | None = None):  # fmt: skip
    """Parallel-over-chunks pallas_call. ``ins``/``outs``: (array | ShapeDtypeStruct, kind)
    with kind "seq" (per-token ``[.., len, .., dim]``), "state" (``[b, h, chunks, dk, dv]``),
    "scores" (``[b, h, chunks, C, C]``) or "doc" (``[b, len, 1]``); ``bwd`` picks the
    backward's launch parameters. ``tiles > 1`` (Triton) adds a grid axis over column tiles:
    kinds "seq/t" and "state/v" take that tile of their last dim, "state/k" of the state rows.
    ``aliases``: ``input_output_aliases`` (outputs updated in place)."""
    tpu = cfg.backend == "tpu"
    shape = ins[0][0].shape
    bsz, heads = (shape[0], shape[1]) if tpu else (shape[0], shape[2])
    length = shape[2] if tpu else shape[1]
    c = cfg.chunk
    at = lambda t: t[0] if t else 0  # noqa: E731 -- the column tile (grid axis 3, if any)

    def spec(x, kind):
        d = x.shape[-1]
        if kind == "seq" and tpu:
            return pl.BlockSpec((None, None, c, d), lambda i, j, n: (i, j, n, 0))
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

    if cfg.interpret:
        params = None
    elif tpu:
        params = pltpu.CompilerParams(dimension_semantics=("parallel",) * 3)
    else:
        t = cfg.tune
        warps, stages = (t.bwd_warps, t.bwd_stages) if bwd else (t.warps, t.stages)
        params = pltriton.CompilerParams(num_warps=warps, num_stages=stages)
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
# custom VJP over the padded, chunk-local-cumsum'd problem


def _doc_args(seg, cfg: _Cfg) -> list:
    return [(seg[0], "doc"), (seg[1], "doc")] if cfg.segments else []


def _scores_like(q, cfg: _Cfg) -> tuple:
    """``[batch, heads, chunks, C, C]`` float32 output (GPU layout ``q [b, len, h, dk]``)."""
    bsz, length, heads, _ = q.shape
    c = cfg.chunk
    return jax.ShapeDtypeStruct((bsz, heads, length // c, c, c), F32), "scores"


def _gla_scores(q, k, b, seg, cfg: _Cfg) -> jax.Array:
    """Staged GLA: the intra-chunk scores ``A [batch, heads, chunks, C, C]`` float32."""
    ins = [(q, "seq"), (k, "seq"), (b, "seq")] + _doc_args(seg, cfg)
    (a,) = _chunk_call(_gla_scores_kernel, cfg, ins, [_scores_like(q, cfg)],
                       "la_chunk_gla_scores", bwd=False)  # fmt: skip
    (a,) = _chunk_call(_gla_scores_fix_kernel, cfg, ins + [(a, "scores")],
                       [_scores_like(q, cfg)], "la_chunk_gla_scores_fix", bwd=False,
                       aliases={len(ins): 0})  # fmt: skip
    return a


def _forward(q, k, v, b, s0, seg, cfg: _Cfg):
    """``((o, s_final), (h, A))``: ``A`` the staged GLA scores (else None)."""
    r, rp = seg if cfg.segments else (None, None)
    h, s_final = _state_pass(k, v, b, s0, r, rp, cfg, reverse=False, h_dtype=q.dtype)
    o_like = jax.ShapeDtypeStruct(v.shape, q.dtype)
    if cfg.staged:
        a = _gla_scores(q, k, b, seg, cfg)
        dv = v.shape[3]
        ins = [(q, "seq"), (b, "seq"), (v, "seq/t"), (a, "scores"), (h, "state/v")]
        (o,) = _chunk_call(_gla_out_kernel, cfg, ins + _doc_args(seg, cfg), [(o_like, "seq/t")],
                           "la_chunk_gla_out", bwd=False,
                           tiles=dv // min(dv, cfg.tune.staged_tile))  # fmt: skip
        return (o, s_final), (h, a)
    ins = [(q, "seq"), (k, "seq"), (v, "seq")] + ([(b, "seq")] if b is not None else [])
    ins += [(h, "state")] + _doc_args(seg, cfg)
    (o,) = _chunk_call(_out_kernel, cfg, ins, [(o_like, "seq")], "la_chunk_fwd", bwd=False)
    return (o, s_final), (h, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _scan(q, k, v, b, s0, seg, cfg):
    return _forward(q, k, v, b, s0, seg, cfg)[0]


def _scan_fwd(q, k, v, b, s0, seg, cfg):
    out, (h, a) = _forward(q, k, v, b, s0, seg, cfg)
    return out, (q, k, v, b, seg, h, a if cfg.bwd_staged else None)


def _staged_grads(q, k, v, b, seg, h, a, dh, do, cfg: _Cfg) -> tuple:
    """Staged GLA backward: ``dA``, then ``dv`` (dv tiles) and ``dq, dk, db`` (dk tiles)."""
    docs = _doc_args(seg, cfg)
    a = _gla_scores(q, k, b, seg, cfg) if a is None else a
    (da,) = _chunk_call(_gla_da_kernel, cfg, [(do, "seq"), (v, "seq")] + docs,
                        [_scores_like(q, cfg)], "la_chunk_gla_da", bwd=True)  # fmt: skip
    dk_, dv_ = q.shape[3], v.shape[3]
    bk, bv = min(dk_, cfg.tune.bwd_staged_bk), min(dv_, cfg.tune.bwd_staged_tile)
    ins = [(k, "seq"), (b, "seq"), (a, "scores"), (do, "seq/t"), (dh, "state/v")] + docs
    dv_like = jax.ShapeDtypeStruct(v.shape, v.dtype)
    (dv,) = _chunk_call(_gla_dv_kernel, cfg, ins, [(dv_like, "seq/t")], "la_chunk_gla_dv",
                        bwd=True, tiles=dv_ // bv)  # fmt: skip
    ins = [(q, "seq/t"), (k, "seq/t"), (b, "seq/t"), (v, "seq"), (do, "seq"), (da, "scores"),
           (h, "state/k"), (dh, "state/k")] + docs  # fmt: skip
    outs = [(jax.ShapeDtypeStruct(x.shape, dt), "seq/t") for x, dt in ((q, q.dtype), (k, k.dtype),
                                                                      (b, F32))]  # fmt: skip
    grads = _chunk_call(_gla_dqk_kernel, cfg, ins, outs, "la_chunk_gla_dqk", bwd=True,
                        tiles=dk_ // bk)  # fmt: skip
    aliases = {len(ins) + i: i for i in range(3)}
    dq, dk, db = _chunk_call(_gla_dqk_fix_kernel, cfg, ins + [(x, "seq/t") for x in grads], outs,
                             "la_chunk_gla_dqk_fix", bwd=True, tiles=dk_ // bk,
                             aliases=aliases)  # fmt: skip
    return dq, dk, dv, db


def _scan_bwd(cfg, res, cts):
    q, k, v, b, seg, h, a = res
    do, ds_final = cts
    r, rp = seg if cfg.segments else (None, None)
    do = do.astype(q.dtype)
    dh, ds0 = _state_pass(q, do, b, ds_final.astype(F32), r, rp, cfg, reverse=True,
                          h_dtype=q.dtype)  # fmt: skip
    ins = [(q, "seq"), (k, "seq"), (v, "seq")] + ([(b, "seq")] if b is not None else [])
    ins += [(h, "state"), (dh, "state"), (do, "seq")] + _doc_args(seg, cfg)
    like = lambda x, dtype=None: (jax.ShapeDtypeStruct(x.shape, dtype or x.dtype), "seq")  # noqa: E731
    if cfg.bwd_staged:
        grads = _staged_grads(q, k, v, b, seg, h, a, dh, do, cfg)
    elif cfg.gate == "gated" and cfg.tune.bwd_form in ("split", "staged"):
        part = lambda p: functools.partial(_grad_kernel, part=p)  # noqa: E731
        dq, db_q = _chunk_call(part("dq"), cfg, ins, [like(q), like(b, F32)], "la_chunk_bwd_dq",
                               bwd=True)  # fmt: skip
        dk, dv, db_k = _chunk_call(part("dkv"), cfg, ins, [like(k), like(v), like(b, F32)],
                                   "la_chunk_bwd_dkv", bwd=True)  # fmt: skip
        grads = (dq, dk, dv, db_q + db_k)
    else:
        outs = [like(x) for x in (q, k, v)] + ([like(b, F32)] if b is not None else [])
        grads = _chunk_call(_grad_kernel, cfg, ins, outs, "la_chunk_bwd", bwd=True)
    db = grads[3] if b is not None else None
    seg_ct = None if seg is None else tuple(jnp.zeros(x.shape, jax.dtypes.float0) for x in seg)
    return grads[0], grads[1], grads[2], db, ds0, seg_ct


_scan.defvjp(_scan_fwd, _scan_bwd)


# ----------------------------------------------------------------------------------------------
# chunk-local cumsum of the GLA log-gates in Pallas (ScanConfig.cumsum = "pallas"; Triton)


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
def _local_cumsum(g, c: int, interpret: bool) -> jax.Array:
    """``b`` = chunk-local inclusive cumsum of the log-gates (one read, one write of ``g``,
    instead of XLA's reduce-window); its transpose is the reverse cumsum, also one kernel."""
    return _cumsum_call(g, c, interpret, reverse=False)


_local_cumsum.defvjp(
    lambda g, c, interpret: (_cumsum_call(g, c, interpret, reverse=False), None),
    lambda c, interpret, _, db: (_cumsum_call(db, c, interpret, reverse=True),),
)


# ----------------------------------------------------------------------------------------------
# public API


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _validate(q, k, v, log_decay, initial_state, segment_ids, chunk_size, backend, compiled_gpu):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"chunked_linear_attention: {name} must be 4-D, got {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"chunked_linear_attention: {name} must be floating, got {x.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"chunked_linear_attention: q {q.shape} and k {k.shape} differ")
    b, length, h, dk = q.shape
    if v.shape[:3] != (b, length, h):
        raise ValueError(
            f"chunked_linear_attention: v must be [batch, len, heads, dv] with "
            f"(batch, len, heads)={(b, length, h)}, got {v.shape}"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"chunked_linear_attention: dtypes differ: {q.dtype} {k.dtype} {v.dtype}")
    if log_decay is not None and log_decay.shape not in ((b, length, h), (b, length, h, dk)):
        raise ValueError(
            f"chunked_linear_attention: log_decay must be [batch, len, heads]={(b, length, h)} "
            f"or [batch, len, heads, dk], got {log_decay.shape}"
        )
    want = (b, h, dk, v.shape[3])
    if initial_state is not None and (
        initial_state.shape != want or initial_state.dtype != jnp.float32
    ):
        raise ValueError(
            f"chunked_linear_attention: initial_state must be float32 {want}, "
            f"got {initial_state.dtype} {initial_state.shape}"
        )
    if segment_ids is not None and (
        segment_ids.shape != (b, length) or not jnp.issubdtype(segment_ids.dtype, jnp.integer)
    ):
        raise ValueError(
            f"chunked_linear_attention: segment_ids must be integer [batch, len]={(b, length)}, "
            f"got {segment_ids.dtype} {segment_ids.shape}"
        )
    if not isinstance(chunk_size, int) or chunk_size <= 0 or chunk_size % SUB:
        raise ValueError(
            f"chunked_linear_attention: chunk_size must be a positive multiple of {SUB}, "
            f"got {chunk_size!r}"
        )
    if backend not in BACKENDS:
        raise ValueError(
            f"chunked_linear_attention: backend must be one of {BACKENDS}, got {backend!r}"
        )
    if compiled_gpu and not all(_is_pow2(n) and n >= 16 for n in (dk, v.shape[3], chunk_size)):
        raise ValueError(
            "chunked_linear_attention: the Triton kernels need dk, dv and chunk_size powers of "
            f"two >= 16, got dk={dk}, dv={v.shape[3]}, chunk_size={chunk_size}"
        )


def _document_index(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per token: how many segment starts precede it (``[b, len, 1]``), and the previous one's."""
    starts = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
    r = jnp.concatenate([jnp.zeros_like(starts[:, :1]), jnp.cumsum(starts, axis=1)], axis=1)
    rp = jnp.concatenate([r[:, :1], r[:, :-1]], axis=1)
    return r[..., None], rp[..., None]


def _resolve(backend: str | None, interpret: bool | None) -> tuple[str, bool]:
    platform = jax.default_backend()
    backend = backend or ("tpu" if platform == "tpu" else "gpu")
    return backend, (platform == "cpu" if interpret is None else interpret)


def chunked_linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    log_decay: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int = 64,
    backend: str | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Causal (gated) linear attention, chunked scan (GLA paper sec. 4); differentiable.

    q/k ``[batch, len, heads, dk]``, v ``[batch, len, heads, dv]``; returns
    ``(out [batch, len, heads, dv] in q.dtype, final_state [batch, heads, dk, dv] float32)``.
    ``backend`` "gpu" (Triton) or "tpu" (Mosaic), default from the platform; ``interpret``
    defaults to True on CPU.
    """
    backend, interpret = _resolve(backend, interpret)
    _validate(q, k, v, log_decay, initial_state, segment_ids, chunk_size, backend,
              compiled_gpu=backend == "gpu" and not interpret)  # fmt: skip
    bsz, length, heads, dk = q.shape
    dv = v.shape[3]
    c = chunk_size
    pad = -length % c
    gate = "none" if log_decay is None else ("scalar" if log_decay.ndim == 3 else "gated")
    cfg = _Cfg(backend, interpret, c, gate, segment_ids is not None, q.dtype == jnp.float32,
               scan_config(gate, dk))  # fmt: skip

    def pad_len(x, mode="constant"):
        return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), mode=mode)

    q, k, v = (pad_len(x) for x in (q, k, v))
    b = None
    if log_decay is not None:  # chunk-local inclusive cumsum of the log-gates, float32
        g = pad_len(log_decay.astype(F32))
        g = g if g.ndim == 4 else g[..., None]
        if gate == "gated" and backend == "gpu" and cfg.tune.cumsum == "pallas":
            b = _local_cumsum(g, c, interpret)
        else:
            b = rearrange(jnp.cumsum(rearrange(g, "b (n c) h d -> b n c h d", c=c), axis=2),
                          "b n c h d -> b (n c) h d")  # fmt: skip
    seg = None if segment_ids is None else _document_index(pad_len(segment_ids, "edge"))
    s0 = jnp.zeros((bsz, heads, dk, dv), F32) if initial_state is None else initial_state
    if backend == "tpu":
        to_heads = lambda x: None if x is None else rearrange(x, "b l h d -> b h l d")
        q, k, v, b = (to_heads(x) for x in (q, k, v, b))
    out, s_final = _scan(q, k, v, b, s0, seg, cfg)
    if backend == "tpu":
        out = rearrange(out, "b h l d -> b l h d")
    return out[:, :length], s_final


def linear_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    log_decay: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Token-by-token float32 recurrence (GLA paper eq. 2): the ground truth for the kernels.

    Same arguments and outputs as :func:`chunked_linear_attention` (out in float32).
    """
    bsz, length, heads, dk = q.shape
    g = jnp.zeros((bsz, length, heads), F32) if log_decay is None else log_decay.astype(F32)
    g = jnp.broadcast_to(g if g.ndim == 4 else g[..., None], q.shape)
    s0 = jnp.zeros((bsz, heads, dk, v.shape[3]), F32) if initial_state is None else initial_state
    seg = jnp.zeros((bsz, length), jnp.int32) if segment_ids is None else segment_ids
    starts = jnp.pad(seg[:, 1:] != seg[:, :-1], ((0, 0), (1, 0)))  # [batch, len]

    def step(s, xs):  # s [batch, heads, dk, dv]
        qt, kt, vt, gt, start = xs
        s = jnp.where(start[:, None, None, None], 0.0, s * jnp.exp(gt)[..., None])
        s = s + kt[..., None] * vt[..., None, :]
        return s, jnp.einsum("bhk,bhkv->bhv", qt, s, precision=lax.Precision.HIGHEST)

    xs = [rearrange(x.astype(F32), "b l ... -> l b ...") for x in (q, k, v, g)]
    s, out = lax.scan(step, s0, (*xs, starts.T))
    return rearrange(out, "l b h d -> b l h d"), s


def _step_kernel(gate: str, q_ref, k_ref, v_ref, *refs):
    """``S' = diag(a) S + k v^T``, ``o = S'^T q`` for one (batch, head); vectors are ``[1, d]``."""
    g_ref = refs[0] if gate != "none" else None
    s_ref, o_ref, s_out = refs[-3:]
    s = s_ref[...]
    if g_ref is not None:
        s = s * jnp.exp(g_ref[...].astype(F32)).T  # [dk | 1, 1]
    s = s + k_ref[...].astype(F32).T * v_ref[...].astype(F32)  # [dk, dv]
    s_out[...] = s
    o_ref[...] = jnp.sum(s * q_ref[...].astype(F32).T, axis=0, keepdims=True).astype(o_ref.dtype)


def recurrent_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    state: jax.Array,
    *,
    log_decay: jax.Array | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Fused one-token decode update (the recurrent form, GLA paper eq. 2).

    q/k ``[batch, heads, dk]``, v ``[batch, heads, dv]``, state ``[batch, heads, dk, dv]``
    float32 (updated in place when donated), log_decay None, ``[batch, heads]`` or
    ``[batch, heads, dk]``. Returns ``(out [batch, heads, dv] in q.dtype, new_state)``.
    """
    backend, interpret = _resolve(backend, interpret)
    if q.ndim != 3 or q.shape != k.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"recurrent_step: q/k must be [batch, heads, dk] and v [batch, heads, dv], "
            f"got {q.shape} {k.shape} {v.shape}"
        )
    bsz, heads, dk = q.shape
    dv = v.shape[2]
    if state.shape != (bsz, heads, dk, dv) or state.dtype != jnp.float32:
        raise ValueError(
            f"recurrent_step: state must be float32 {(bsz, heads, dk, dv)}, "
            f"got {state.dtype} {state.shape}"
        )
    if log_decay is not None and log_decay.shape not in ((bsz, heads), (bsz, heads, dk)):
        raise ValueError(
            f"recurrent_step: log_decay must be [batch, heads] or [batch, heads, dk], "
            f"got {log_decay.shape}"
        )
    if backend not in BACKENDS:
        raise ValueError(f"recurrent_step: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "gpu" and not interpret and not (_is_pow2(dk) and _is_pow2(dv)):
        raise ValueError(
            f"recurrent_step: the Triton kernel needs dk and dv powers of two, got {dk}, {dv}"
        )
    gate = "none" if log_decay is None else "gated"
    vec = lambda x: x.reshape(bsz, heads, 1, -1)  # [b, h, 1, d]
    args = [vec(q), vec(k), vec(v)] + ([vec(log_decay)] if log_decay is not None else [])
    args.append(state)
    row = lambda x: pl.BlockSpec((None, None, 1, x.shape[3]), lambda i, j: (i, j, 0, 0))
    st = pl.BlockSpec((None, None, dk, dv), lambda i, j: (i, j, 0, 0))
    out_shape = (jax.ShapeDtypeStruct((bsz, heads, 1, dv), q.dtype), state)
    params = None
    if not interpret:
        params = (pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
                  if backend == "tpu" else pltriton.CompilerParams(num_warps=4))  # fmt: skip
    o, new_state = pl.pallas_call(
        functools.partial(_step_kernel, gate),
        out_shape=(out_shape[0], jax.ShapeDtypeStruct(state.shape, F32)),
        grid=(bsz, heads),
        in_specs=[row(x) for x in args[:-1]] + [st],
        out_specs=(row(out_shape[0]), st),
        input_output_aliases={len(args) - 1: 1},
        interpret=interpret,
        compiler_params=params,
        name="la_recurrent_step",
    )(*args)
    return o[:, :, 0], new_state
