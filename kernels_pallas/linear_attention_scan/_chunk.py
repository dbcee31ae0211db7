"""Chunk math of the linear-attention scan, shared by both lowerings (values and refs of one
chunk; the drivers in :mod:`.triton_fwd`, :mod:`.triton_bwd` and :mod:`.mosaic_tpu` launch it).

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
differences ``b_i - b_j <= 0`` (``Chunk.gated_diag``).

``out_kernel`` / ``grad_kernel`` are the one-kernel chunk forms: every gate on TPU, scalar and
no decay on GPU (the GPU's GLA runs the staged kernels of :mod:`.triton_fwd` /
:mod:`.triton_bwd`). Without a gate a chunk is one sub-block, so their tiles are loaded once
("hoisted"); with GLA (TPU) the state tiles are loaded where used and the earlier sub-blocks
are read in exact power-of-two row slices, and the backward runs as two kernels (dq; dk, dv),
fewer live tiles each (GLA paper sec. 4).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.linear_attention_scan.tuning import MosaicTpuTuning, TritonTuning

F32 = jnp.float32
SUB = 16  # chunk sizes are multiples of this (the smallest GLA sub-chunk, one MMA tile)
FACTOR_SPREAD = 30.0  # GLA diagonal block: factor through MMAs when its log-gate range is below
BACKENDS = ("gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Cfg:
    """Static description of one call (hashable: it keys the custom_vjp)."""

    backend: str  # "gpu" | "tpu"
    interpret: bool
    chunk: int  # C, tokens per chunk
    gate: str  # "none" | "scalar" | "gated"
    segments: bool
    exact: bool  # float32 inputs: ask for full-precision MMAs
    tune: TritonTuning | MosaicTpuTuning  # the lowering's launch parameters and sub-chunk rows
    lowering: str = "triton"  # GPU forward: "triton", or "mosaic" (the fused Hopper forward)

    @property
    def sub(self) -> int:
        """GLA sub-chunk rows: ``tune.sub`` clipped to the chunk (16 if it does not divide it)."""
        if self.gate != "gated":
            return self.chunk
        sub = min(self.tune.sub, self.chunk)
        return sub if self.chunk % sub == 0 else SUB

    @property
    def staged(self) -> bool:
        """GLA on GPU: the "staged" kernels of :mod:`.triton_fwd` / :mod:`.triton_bwd`."""
        return self.gate == "gated" and self.backend == "gpu"

    @property
    def gates_in(self) -> bool:
        """The scan takes the raw log-gates ``g`` where it takes ``b`` otherwise: GLA on the
        fused Hopper forward, whose scores kernel forms the chunk-local cumsum itself."""
        return self.staged and self.lowering == "mosaic"

    @property
    def precision(self):
        return lax.Precision.HIGHEST if self.exact else None


def mm(a, b, cfg: Cfg, *, ta: bool = False, tb: bool = False) -> jax.Array:
    """``a @ b`` (optionally transposed operands) with float32 accumulation."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=cfg.precision, preferred_element_type=F32)


def iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def exp_masked(mask, x):
    """``exp(x)`` where ``mask``, else 0 (x <= 0 wherever mask holds)."""
    return jnp.exp(jnp.where(mask, x, -jnp.inf))


# ----------------------------------------------------------------------------------------------
# state recurrence over one chunk (values; shared by both drivers)


def state_step(s, x, y, b, b_last, r, r_prev, r_last, cfg: Cfg, *, reverse: bool):
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
    return carry + mm(xd.astype(y.dtype), y, cfg, ta=True)


# ----------------------------------------------------------------------------------------------
# intra-chunk scores (refs of one chunk; shared by both backends)


class Chunk:
    """Refs of one chunk (``[C, dim]`` each) and the static geometry of its sub-blocks."""

    def __init__(self, cfg: Cfg, q, k, v, b, r, rp):
        self.cfg, self.q, self.k, self.v, self.b, self.r, self.rp = cfg, q, k, v, b, r, rp
        self.c, self.sub = cfg.chunk, cfg.sub
        self.dt = (q if q is not None else k).dtype

    def rows(self, ref, i0, n=None, cols=slice(None)):
        """Rows ``[i0, i0 + n)`` (columns ``cols``) of a ref; of a value (Triton lowers no
        slices of values): all of its rows, or one row (``n = 1``) by a masked sum."""
        n = self.sub if n is None else n
        if not isinstance(ref, jax.Array):
            return ref[i0 : i0 + n, cols]
        if cols != slice(None) or (n != 1 and (i0, n) != (0, ref.shape[0])):
            raise ValueError(f"Chunk.rows: a value gives all rows or one, not {i0}:{i0 + n}")
        if n == ref.shape[0]:
            return ref
        return jnp.sum(jnp.where(iota(ref.shape, 0) == i0, ref, 0.0), axis=0, keepdims=True)

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
        rows, cols = iota((n, n), 0), iota((n, n), 1)
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

    def state_in(self, i0, n, cols=slice(None)):
        """GLA: ``e^{b}`` of rows ``[i0, i0 + n)`` ``[n, dk]`` (columns ``cols``), zero on rows
        that do not see the incoming state (a document starts before them in the chunk)."""
        e = jnp.exp(self.gate(i0, n, cols))
        return e if self.r is None else jnp.where(self.inter_mask(i0, n), e, 0.0)

    def state_out(self, i0, n, cols=slice(None)):
        """GLA: ``e^{B - b}`` of rows ``[i0, i0 + n)`` ``[n, dk]`` (columns ``cols``; their
        weight in the outgoing state), zero on rows before the chunk's last document start."""
        e = jnp.exp(self.gate(self.c - 1, 1, cols) - self.gate(i0, n, cols))
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
            s = mm(q, k, self.cfg, tb=True)
            if self.cfg.gate == "scalar":
                b = self.gate(i0)
                return s * exp_masked(m, b - b.T)
            return jnp.where(m, s, 0.0)
        return self.gated_diag(i0, m)[0]

    def gated_diag(self, i0, m, da=None, dat=None, *, scores: bool = True):
        """Diagonal GLA block: ``(A [sub, sub],)`` or, given ``da = dA`` and/or ``dat = dA^T``
        (masked), ``(A, dq, dk)`` with the intra-block ``dq`` (from ``da``) and ``dk`` (from
        ``dat``), None for what was not asked (``scores=False``: no ``A``; the split backward's
        dq kernel); the forward picks the branch with ``lax.cond``, the backward is branch-free.

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

        Forward: ``lax.cond`` runs one branch (Triton 3.6 failed to compile it in the backward).
        Backward, branch-free: the factored values, zeroed on unsafe blocks (``jnp.where``), are
        the loops' initial carries and the loops run ``sub`` steps on unsafe blocks, 0 on safe
        ones (so they cost nothing there, and no second set of results stays live for a select).
        Both beat the exact loops alone and each other's pass (``experiments/results/
        tune_scan.md``, ``tune_scan_h100.md``).
        """
        q = self.rows(self.q, i0)
        grads = da is not None or dat is not None

        def factored():
            up, down = self.factors(i0, self.sub)
            qf = (q.astype(F32) * up).astype(self.dt)
            kf = (self.rows(self.k, i0).astype(F32) * down).astype(self.dt)
            a = jnp.where(m, mm(qf, kf, self.cfg, tb=True), 0.0) if scores else None
            if not grads:
                return (a,)
            dq = None if da is None else up * mm(da.astype(self.dt), kf, self.cfg)
            return a, dq, None if dat is None else down * mm(dat.astype(self.dt), qf, self.cfg)

        def exact(steps, a0=None, dq0=None, dk0=None):  # the loops, accumulating onto a0, ..
            n, d = self.sub, self.q.shape[1]
            a0, dq0, dk0 = (jnp.zeros(s, F32) if x is None else x
                            for x, s in ((a0, (n, n)), (dq0, (n, d)), (dk0, (n, d))))  # fmt: skip
            a, dq = self._gated_diag(i0, m, q, da, steps, a0 if scores else None, dq0)
            if not grads:
                return (a,)
            dk = None if dat is None else self._gated_diag_dk(i0, dat, steps, dk0)
            return a, None if da is None else dq, dk

        safe = self.safe(i0, self.sub)
        if not grads:
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
        rows, cols = iota((n, 1), 0), iota((n, n), 1)

        def body(j, carry):
            a, dq = carry
            kj = self.k[pl.ds(i0 + j, 1), :].astype(F32)  # [1, dk]
            e = exp_masked(rows >= j, b - self.b[pl.ds(i0 + j, 1), :]) * kj  # [n, dk]
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
        rows, cols = iota((n, 1), 0), iota((n, n), 1)

        def body(i, dk):
            qi = self.q[pl.ds(i0 + i, 1), :].astype(F32)
            e = exp_masked(rows <= i, self.b[pl.ds(i0 + i, 1), :] - b) * qi
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
        j = iota((n, 1), 0)
        kr = self.span(self.k, j0, n).astype(F32)
        if j0 + n > i0:
            return qr, kr * exp_masked(j < i0 - j0, rho - self.span(self.b, j0, n)), rho
        return qr, kr * jnp.exp(rho - self.span(self.b, j0, n)), rho

    def ref_cols(self, i0, j0=0, n=None):
        """Column-block factors: ``q e^{b - rho}`` (rows after the block, of rows ``[j0, j0 +
        n)``, default the chunk), ``k_X e^{rho - b_X}``; rho = b of the block's last row."""
        n = self.c if n is None else n
        j1 = i0 + self.sub - 1
        rho = self.gate(j1, 1)
        qr = self.span(self.q, j0, n).astype(F32)
        if j0 <= j1:
            qr = qr * exp_masked(iota((n, 1), 0) > j1 - j0, self.span(self.b, j0, n) - rho)
        else:
            qr = qr * jnp.exp(self.span(self.b, j0, n) - rho)
        kr = self.rows(self.k, i0).astype(F32) * jnp.exp(rho - self.gate(i0))
        return qr, kr, rho

    def earlier_scores(self, i0, j0, n):
        """GLA ``A [sub, n]`` of block row i0 against the keys of rows ``[j0, j0 + n)`` (only
        those before i0 count), same-document masked, float32: one MMA of ``ref_rows``."""
        qr, kr, _ = self.ref_rows(i0, j0, n)
        rj_t = None if self.r is None else self.span(self.r, j0, n).T
        a = mm(qr.astype(self.dt), kr.astype(self.dt), self.cfg, tb=True)
        return self.same_doc(self.doc(i0), rj_t, a)


def out_kernel(cfg: Cfg, *refs):
    """Forward chunk kernel: ``o = (q e^b) h[n] + A v`` block row by block row."""
    q_ref, k_ref, v_ref, *refs = refs
    b_ref = refs.pop(0) if cfg.gate != "none" else None
    h_ref = refs.pop(0)
    r_ref, rp_ref = (refs.pop(0), refs.pop(0)) if cfg.segments else (None, None)
    (o_ref,) = refs
    ch = Chunk(cfg, q_ref, k_ref, v_ref, b_ref, r_ref, rp_ref)
    lean = cfg.gate == "gated"  # h loaded where used; earlier blocks in exact slices
    h = None if lean else h_ref[...]
    for i0 in range(0, cfg.chunk, ch.sub):
        qi = ch.rows(q_ref, i0).astype(F32)
        if b_ref is not None:
            qi = qi * jnp.exp(ch.gate(i0))
        if r_ref is not None:
            qi = jnp.where(ch.inter_mask(i0), qi, 0.0)
        acc = mm(qi.astype(ch.dt), h_ref[...] if lean else h, cfg)
        a = ch.diag_scores(i0, ch.diag_mask(i0))
        acc += mm(a.astype(ch.dt), ch.rows(v_ref, i0), cfg)
        for j0, n in ch.pieces(0, i0, lean):  # earlier sub-blocks (gated only)
            a = ch.earlier_scores(i0, j0, n)
            acc += mm(a.astype(ch.dt), ch.span(v_ref, j0, n), cfg)
        o_ref[i0 : i0 + ch.sub, :] = acc.astype(o_ref.dtype)


def row_dot(x_ref, y_ref) -> jax.Array:
    """``sum_v x * y`` of two ``[n, dv]`` refs as float32 ``[n, 1]``, 64 columns at a time (not
    two whole ``[dk, dv]`` tiles in registers)."""
    n, dv = x_ref.shape
    w = min(dv, 64)
    out = jnp.zeros((n, 1), F32)
    for c0 in range(0, dv, w):
        x, y = (ref[:, c0 : c0 + w].astype(F32) for ref in (x_ref, y_ref))
        out += jnp.sum(x * y, axis=1, keepdims=True)
    return out


def grad_kernel(cfg: Cfg, *refs, part: str = "all"):
    """Backward chunk kernel of one chunk given ``h[n]`` and ``dh[n]``. ``part`` "all": dq, dk,
    dv and db; or two kernels with fewer live tiles each (as fla's split backward; GLA on TPU,
    and every gate with ``TritonTuning.bwd_parts=2``): "dq" = dq and its db term ``q * dq``,
    "dkv" = dk, dv and the rest of db (the two db parts are summed outside)."""
    q_ref, k_ref, v_ref, *refs = refs
    b_ref = refs.pop(0) if cfg.gate != "none" else None
    h_ref, dh_ref, do_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    r_ref, rp_ref = (refs.pop(0), refs.pop(0)) if cfg.segments else (None, None)
    want_q, want_kv = part != "dkv", part != "dq"
    outs = iter(refs)
    dq_ref = next(outs) if want_q else None
    dk_ref, dv_ref = (next(outs), next(outs)) if want_kv else (None, None)
    db_ref = next(outs) if b_ref is not None else None
    ch = Chunk(cfg, q_ref, k_ref, v_ref, b_ref, r_ref, rp_ref)
    c, sub, dt = cfg.chunk, ch.sub, ch.dt
    lean = part != "all"  # h, dh loaded where used, not live across the loop
    h, dh = (None, None) if lean else (h_ref[...], dh_ref[...])
    b_last = None if b_ref is None else b_ref[c - 1 : c, :]
    r_all_t = None if r_ref is None else r_ref[...].T
    last_doc = None if r_ref is None else r_ref[c - 1 : c, :]
    # sum_j k_j * dk_j over the state part (d/dB); scalar gate: summed over dk too
    kdk_state = jnp.zeros((1, 1 if cfg.gate == "scalar" else q_ref.shape[1]), F32)

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
        m = ch.diag_mask(i0)
        if cfg.gate != "gated":  # one block (sub = C)
            # the scores first, so that their [C, C] factors are dead before the accumulators
            d = m.astype(F32) if b is None else exp_masked(m, b - b.T)
            da = (mm(do, v, cfg, tb=True) * d).astype(dt)  # dL/d(Q K^T)
            if want_kv:
                qk = mm(q, k, cfg, tb=True)
                a = qk * d
            if want_q:
                dq = eq * mm(do, h, cfg, tb=True) + mm(da, k, cfg)
            if want_kv:
                dk = ek * mm(v, dh, cfg, tb=True)
                if b is not None:
                    # k . dk per row (db): the state part, then the block's as the column sums
                    # of da * Q K^T (k_j . sum_i da_ij q_i), so dk need not outlive its store
                    k_dk = jnp.sum(k.astype(F32) * dk, axis=1, keepdims=True)
                    kdk_state += jnp.sum(k_dk, axis=0, keepdims=True)
                    k_dk += jnp.sum(da.astype(F32) * qk, axis=0, keepdims=True).T
                dk += mm(da, q, cfg, ta=True)
                dk_ref[i0 : i0 + sub, :] = dk.astype(dk_ref.dtype)
                kd = (k.astype(F32) * ek).astype(dt)
                dv = mm(kd, dh, cfg) + mm(a.astype(dt), do, cfg, ta=True)
        else:
            if want_q:
                dq = eq * mm(do, h, cfg, tb=True)
            if want_kv:
                dk = ek * mm(v, dh, cfg, tb=True)
                kdk_state += jnp.sum(k.astype(F32) * dk, axis=0, keepdims=True)
                kd = (k.astype(F32) * ek).astype(dt)
                dv = mm(kd, dh, cfg)
            da = dat = None
            if want_q:
                da = jnp.where(m, mm(do, v, cfg, tb=True), 0.0)
            if want_kv:
                mt = ch.diag_mask(i0, transpose=True)
                dat = jnp.where(mt, mm(v, do, cfg, tb=True), 0.0)
            a, dq_diag, dk_diag = ch.gated_diag(i0, m, da, dat, scores=want_kv)
            if want_q:
                dq += dq_diag
            if want_kv:
                dk += dk_diag
                dv += mm(a.astype(dt), do, cfg, ta=True)
        # earlier columns -> dq of this block
        if i0 > 0 and want_q:
            qr, kr, rho = ch.ref_rows(i0)
            da = ch.same_doc(rd, r_all_t, mm(do, v_ref[...], cfg, tb=True))
            dq += jnp.exp(b - rho) * mm(da.astype(dt), kr.astype(dt), cfg)
        # later rows -> dk, dv of this block
        if i0 + sub < c and want_kv:
            qr, kr, rho = ch.ref_cols(i0)
            r_all = None if r_ref is None else r_ref[...]
            rd_t = None if rd is None else rd.T
            a = ch.same_doc(r_all, rd_t, mm(qr.astype(dt), kr.astype(dt), cfg, tb=True))
            da = ch.same_doc(r_all, rd_t, mm(do_ref[...], v, cfg, tb=True))
            dv += mm(a.astype(dt), do_ref[...], cfg, ta=True)
            dk += jnp.exp(rho - b) * mm(da.astype(dt), qr.astype(dt), cfg, ta=True)
        if want_q:
            dq_ref[i0 : i0 + sub, :] = dq.astype(dq_ref.dtype)
        if want_kv:
            if cfg.gate == "gated":  # (the one block of the other gates stored dk already)
                dk_ref[i0 : i0 + sub, :] = dk.astype(dk_ref.dtype)
            dv_ref[i0 : i0 + sub, :] = dv.astype(dv_ref.dtype)
        if db_ref is not None:  # [sub, dk] ([sub, 1] scalar)
            if cfg.gate == "scalar":
                db = jnp.sum(q.astype(F32) * dq, axis=1, keepdims=True) if want_q else 0.0
                db = db - k_dk if want_kv else db
            else:
                db = (q.astype(F32) * dq if want_q else 0.0) - (
                    k.astype(F32) * dk if want_kv else 0.0
                )
            if want_kv and i0 + sub == c:  # d/dB of e^{B} S_prev and e^{B - b_j} (state update)
                extra = ch.state_gate_grad(row_dot(h_ref, dh_ref), kdk_state)
                db += jnp.where(iota((sub, 1), 0) == sub - 1, extra, 0.0)
            db_ref[i0 : i0 + sub, :] = db


def doc_args(seg, cfg: Cfg) -> list:
    """The document-index inputs ``(r, "doc"), (rp, "doc")`` of a chunk call (none without
    segments)."""
    return [(seg[0], "doc"), (seg[1], "doc")] if cfg.segments else []


def chunk_output(chunk_call, q, k, v, b, h, seg, cfg: Cfg):
    """``o`` by ``out_kernel`` from the states ``h`` entering each chunk; ``chunk_call``: the
    lowering's parallel-over-chunks launcher."""
    o_like = jax.ShapeDtypeStruct(v.shape, q.dtype)
    ins = [(q, "seq"), (k, "seq"), (v, "seq")] + ([(b, "seq")] if b is not None else [])
    ins += [(h, "state")] + doc_args(seg, cfg)
    (o,) = chunk_call(out_kernel, cfg, ins, [(o_like, "seq")], "la_chunk_fwd", bwd=False)
    return o


def chunk_grads(chunk_call, q, k, v, b, seg, h, dh, do, cfg: Cfg) -> tuple:
    """``(dq, dk, dv, db)`` (``db`` None without a gate) by ``grad_kernel``; GLA, and the other
    gates with ``TritonTuning.bwd_parts=2``, as two kernels (dq; dk, dv), whose ``db`` parts are
    summed here."""
    ins = [(q, "seq"), (k, "seq"), (v, "seq")] + ([(b, "seq")] if b is not None else [])
    ins += [(h, "state"), (dh, "state"), (do, "seq")] + doc_args(seg, cfg)
    like = lambda x, dtype=None: (jax.ShapeDtypeStruct(x.shape, dtype or x.dtype), "seq")  # noqa: E731
    db = [like(b, F32)] if b is not None else []
    split = isinstance(cfg.tune, TritonTuning) and cfg.tune.bwd_parts == 2
    if cfg.gate == "gated" or split:
        part = lambda p: functools.partial(grad_kernel, part=p)  # noqa: E731
        dq, *db_q = chunk_call(part("dq"), cfg, ins, [like(q), *db], "la_chunk_bwd_dq",
                               bwd=True)  # fmt: skip
        dk, dv, *db_k = chunk_call(part("dkv"), cfg, ins, [like(k), like(v), *db],
                                   "la_chunk_bwd_dkv", bwd=True)  # fmt: skip
        return dq, dk, dv, db_q[0] + db_k[0] if db else None
    grads = chunk_call(grad_kernel, cfg, ins, [like(q), like(k), like(v), *db], "la_chunk_bwd",
                       bwd=True)  # fmt: skip
    return grads[0], grads[1], grads[2], grads[3] if db else None


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def resolve(backend: str | None, interpret: bool | None) -> tuple[str, bool]:
    platform = jax.default_backend()
    backend = backend or ("tpu" if platform == "tpu" else "gpu")
    return backend, (platform == "cpu" if interpret is None else interpret)
