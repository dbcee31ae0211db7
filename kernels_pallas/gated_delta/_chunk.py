"""One chunk of the gated delta rule, forward and backward, on values loaded by a driver.

Chunkwise form (Yang et al. 2024 "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length", sec. 3: WY representation, UT transform; decay as in Yang, Kautz,
Hatamizadeh 2025 "Gated Delta Networks", sec. 3.3). A chunk of ``C`` tokens enters with the
state tile ``S [dk, bv]``; ``gam`` is the in-chunk cumulative log decay:

* ``A_ts = beta_t exp(gam_t - gam_s) k_t . k_s`` (s < t), ``T = (I + A)^{-1}`` by block
  doubling (:func:`unit_lower_inverse`, MMAs only);
* ``W = T (beta exp(gam) K)``, ``U = T (beta V) - W S``;
* ``O = (exp(gam) Q) S + (Q K^T * exp(gam_t - gam_s), s <= t) U``;
* ``S_next = exp(gam_last) S + (K exp(gam_last - gam))^T U``.

The pieces are separate functions so that a driver can run the state-independent ones
(:func:`transform`, :func:`values`: ``T``, ``W``, ``T beta V``; :func:`output` given the
state) in parallel over chunks and only :func:`state_step` (two MMAs) in order;
:func:`u_grad` and :func:`state_grad` are its transposes, carrying ``dL/dS`` backwards.
:func:`chunk_forward` chains them for one chunk. The backward recomputes the chunk from ``S``
and transposes the lines above by hand (``dA = -T^T dT T^T``) in three steps:
:func:`transform` (``T``, ``W``), :func:`tile_backward` per value tile (``bv`` columns of
``V``, ``S``, ``O``, given ``dU`` of :func:`u_grad`; it returns the tile's terms,
:class:`Partials`, of what ``dq``, ``dk``, ``dbeta``, ``dgam`` need; :class:`TileTerms`
forms them one at a time, :class:`TileSums` their sums over the tiles), then, once on
their sum, :func:`scores_backward` (back through the scores: ``dq`` whole) and
:func:`finish_backward` (through ``W`` and the UT transform); :func:`chunk_backward` chains
them for one tile. On the GPU the MMAs take
bfloat16 operands unless the inputs are float32 (:attr:`Cfg.precision`), with float32
accumulation, a float32 state and ``T`` built in float32, as in fla's kernels.
Document boundaries arrive as masks: ``same`` (pairs in one document), ``reads`` (rows in
the incoming state's document) and ``last`` (rows in the outgoing state's document).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas.gated_delta.tuning import TritonTuning

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Cfg:
    """Static description of one call (hashable: it keys the custom_vjp)."""

    backend: str  # "gpu" (Pallas Triton) | "tpu" (Pallas Mosaic TPU)
    interpret: bool
    chunk: int  # C, tokens per chunk
    block_v: int  # bv, value columns per program
    segments: bool
    exact: bool  # float32 inputs: float32-accurate MMAs
    lowering: str = "triton"  # GPU forward: "triton", or "mosaic" (the fused Hopper pass)
    tuning: TritonTuning = TritonTuning()  # the Triton kernels' launch parameters

    @property
    def store(self):
        """The dtype of the float32-computed values that one kernel saves for another (``W``,
        ``T beta V``, ``U``, ``T``, the chunk states, their gradients, some of the backward's
        partials): bfloat16 unless ``exact``, as fla's kernels keep them; the state carried in
        order and the gates stay float32."""
        return F32 if self.exact else jnp.bfloat16

    @property
    def precision(self):
        """The MMAs' precision. Unless ``exact``, the GPU's MMAs take bfloat16 operands
        (:data:`BF16`), as fla's kernels do. Compiled Triton gets float32 accuracy from three
        TF32 passes: its exact float32 dot is an unrolled FMA loop, whose compile at chunk 64
        never finished (``experiments/results/gpu_suite.md``, runs 3-7)."""
        if not self.exact:
            return BF16 if self.backend == "gpu" else None
        if self.backend == "gpu" and not self.interpret:
            return lax.DotAlgorithmPreset.TF32_TF32_F32_X3
        return lax.Precision.HIGHEST


class Chunk(NamedTuple):
    """Loaded values of one chunk: ``q, k [C, dk]``, ``v [C, bv]`` (the inputs' dtype),
    ``beta`` as a float32 column ``[C, 1]``, ``gam`` as a column and a row ``[1, C]``; masks or
    None without documents. ``q``/``v`` are None where a kernel does not read them."""

    q: jax.Array | None
    k: jax.Array
    v: jax.Array | None
    beta_c: jax.Array
    gam_c: jax.Array
    gam_r: jax.Array
    same: jax.Array | None  # [C, C] bool
    reads: jax.Array | None  # [C, 1] float 0/1
    last: jax.Array | None  # [C, 1] float 0/1


# The MMAs' precision (:attr:`Cfg.precision`) with bfloat16 operands, float32 accumulation.
BF16 = lax.DotAlgorithmPreset.BF16_BF16_F32


def mm(a: jax.Array, b: jax.Array, prec, *, ta: bool = False, tb: bool = False):
    """``a @ b`` (``ta``/``tb``: that operand transposed) with float32 accumulation at
    ``prec`` (:attr:`Cfg.precision`); at :data:`BF16` the operands are rounded to bfloat16."""
    if prec is BF16:
        a, b, prec = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), None
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=F32)


def _iota(shape: tuple[int, int], dim: int) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _exp_where(mask: jax.Array, x: jax.Array) -> jax.Array:
    """``exp(x)`` where ``mask`` (there x <= 0), else 0."""
    return jnp.exp(jnp.where(mask, x, -jnp.inf))


def unit_lower_inverse(a: jax.Array, prec) -> jax.Array:
    """``(I + A)^{-1}`` for strictly lower ``a [C, C]`` (C a power of two), by block doubling:
    with ``T`` inverting the diagonal blocks of size ``s``, those of size ``2s`` are
    ``[[T1, 0], [-T2 A21 T1, T2]]``, i.e. ``T - T (A masked to the A21 blocks) T``. The
    first step needs no product (``T1 = T2 = 1``: the 2 x 2 blocks are ``I - A``), so ``2
    log2(C) - 2`` MMAs."""
    c = a.shape[0]
    rows, cols = _iota((c, c), 0), _iota((c, c), 1)

    def cross(size: int) -> jax.Array:  # the A21 blocks of the diagonal blocks of size 2s
        return ((rows ^ cols) < 2 * size) & ((rows & size) != 0) & ((cols & size) == 0)

    t = (rows == cols).astype(F32) - jnp.where(cross(1), a, 0.0)
    size = 2
    while size < c:
        t = t - mm(mm(t, jnp.where(cross(size), a, 0.0), prec), t, prec)
        size *= 2
    return t


class Gates(NamedTuple):
    """The decay factors of one chunk's rows."""

    g_read: jax.Array  # [C, 1] exp(gam) where the row reads the incoming state
    e_end: jax.Array  # [C, 1] exp(gam_last - gam) where the row reaches the outgoing state
    carry: jax.Array  # [1, 1] exp(gam_last) if no boundary in the chunk, else 0


def gates(ch: Chunk) -> Gates:
    c = ch.gam_c.shape[0]
    g_read = jnp.exp(ch.gam_c) if ch.reads is None else jnp.exp(ch.gam_c) * ch.reads
    last_col = _iota((1, c), 1) == c - 1
    gam_last = jnp.sum(jnp.where(last_col, ch.gam_r, 0.0), axis=1, keepdims=True)  # [1, 1]
    e_end = jnp.exp(jnp.minimum(gam_last - ch.gam_c, 0.0))
    carry = jnp.exp(gam_last)
    if ch.last is not None:
        e_end = e_end * ch.last
        last_row = _iota((c, 1), 0) == c - 1
        carry = carry * jnp.sum(jnp.where(last_row, ch.reads, 0.0), axis=0, keepdims=True)
    return Gates(g_read, e_end, carry)


def decay(ch: Chunk, *, strict: bool) -> jax.Array:
    """``exp(gam_t - gam_s)`` for ``s < t`` (``strict``) or ``s <= t`` in one document, else
    0 ``[C, C]``."""
    c = ch.gam_c.shape[0]
    rows, cols = _iota((c, c), 0), _iota((c, c), 1)
    keep = rows > cols if strict else rows >= cols
    if ch.same is not None:
        keep = keep & ch.same
    return _exp_where(keep, ch.gam_c - ch.gam_r)


class WY(NamedTuple):
    """The state-independent UT transform of one chunk."""

    t: jax.Array  # (I + A)^{-1} [C, C], A = K K^T * decay_strict * beta_t
    w: jax.Array  # T kg [C, dk], kg = beta exp(gam) K (rows reading the state)


def kg_scale(ch: Chunk, g: Gates) -> jax.Array:
    """``beta g_read [C, 1]``: ``kg = K beta g_read``."""
    return ch.beta_c * g.g_read


def transform(ch: Chunk, g: Gates, prec) -> WY:
    """The UT transform; ``T`` is built on float32 operands, also at :data:`BF16`."""
    a = mm(ch.k, ch.k, prec, tb=True) * decay(ch, strict=True) * ch.beta_c
    t = unit_lower_inverse(a, None if prec is BF16 else prec)
    return WY(t, mm(t, ch.k * kg_scale(ch, g), prec))


def values(ch: Chunk, t: jax.Array, prec) -> tuple[jax.Array, jax.Array]:
    """``(vb = beta V, UV = T vb)`` ``[C, bv]`` from ``T`` of :func:`transform`."""
    vb = ch.v * ch.beta_c
    return vb, mm(t, vb, prec)


def scores(ch: Chunk, prec) -> tuple[jax.Array, jax.Array]:
    """``(Q K^T * decay_incl, decay_incl)`` ``[C, C]``."""
    d = decay(ch, strict=False)
    return mm(ch.q, ch.k, prec, tb=True) * d, d


def state_step(ch: Chunk, g: Gates, w, uv, s, prec) -> tuple[jax.Array, jax.Array]:
    """``(U = UV - W S [C, bv], S_next [dk, bv])`` from the state tile ``s`` entering."""
    u = uv - mm(w, s, prec)
    return u, g.carry * s + mm(ch.k * g.e_end, u, prec, ta=True)


def output(ch: Chunk, g: Gates, sc, s, u, prec) -> jax.Array:
    """``O = (Q g_read) S + sc U [C, bv]`` with ``sc`` the scores of :func:`scores`."""
    return g.g_read * mm(ch.q, s, prec) + mm(sc, u, prec)


def u_grad(ch: Chunk, g: Gates, sc, do, ds_next, prec) -> jax.Array:
    """The transpose of :func:`output` and :func:`state_step` in ``U``: ``dU [C, bv]`` from
    ``do [C, bv]`` and ``ds_next = dL/dS_next [dk, bv]``."""
    return mm(sc, do, prec, ta=True) + mm(ch.k * g.e_end, ds_next, prec)


def state_grad(ch: Chunk, g: Gates, w, do, ds_next, du, prec) -> jax.Array:
    """Their transpose in ``S``: ``dL/dS [dk, bv]`` of the state tile entering, given ``du``
    of :func:`u_grad`."""
    return mm(ch.q * g.g_read, do, prec, ta=True) + g.carry * ds_next - mm(w, du, prec, ta=True)


def chunk_forward(ch: Chunk, s: jax.Array, prec) -> tuple[jax.Array, jax.Array]:
    """``(O [C, bv], S_next [dk, bv])`` from the state tile ``s`` entering the chunk."""
    g = gates(ch)
    wy = transform(ch, g, prec)
    u, s_next = state_step(ch, g, wy.w, values(ch, wy.t, prec)[1], s, prec)
    return output(ch, g, scores(ch, prec)[0], s, u, prec), s_next


class Partials(NamedTuple):
    """One value tile's terms (:func:`tile_backward`) of what the value-independent rest of the
    backward (:func:`scores_backward`, :func:`finish_backward`) needs; it takes their sum over
    the tiles."""

    dsc: jax.Array  # [C, C] dL/d(scores) = dO U^T
    dt_v: jax.Array  # [C, C] dU (beta V)^T, the V part of dL/dT
    dq: jax.Array  # [C, dk] g_read dO S^T
    dk: jax.Array  # [C, dk] e_end U dS_next^T
    dw: jax.Array  # [C, dk] dL/dW = -dU S^T
    dbeta: jax.Array  # [C, 1] the V part of dL/dbeta, V . (T^T dU)
    de: jax.Array  # [C, 1] K . (e_end U dS_next^T), dL/dgam_last - dL/dgam via e_end
    dcarry: jax.Array  # [1, 1] S . dS_next, dL/d(carry) / carry


class TileTerms:
    """One value tile's products behind :class:`Partials` (each a contraction over the tile's
    value columns), computed at each call from operands that ``get(name)`` fetches at that
    call: ``v``, ``u``, ``do``, ``du`` ``[C, bv]`` (the chunk's values, ``U`` of
    :func:`state_step`, ``dO``, ``dU`` of :func:`u_grad`) and ``s``, ``ds_next`` ``[dk, bv]``
    (the state entering, ``dL/dS_next``); a kernel loads them there, so that few are live at
    once. ``t`` is :func:`transform`'s ``T``."""

    def __init__(self, ch: Chunk, g: Gates, t: jax.Array, get, prec):
        self.ch, self.g, self.t, self.get, self.prec = ch, g, t, get, prec

    def dsc(self) -> jax.Array:
        return mm(self.get("do"), self.get("u"), self.prec, tb=True)

    def dt_v(self) -> jax.Array:
        return mm(self.get("du"), self.get("v") * self.ch.beta_c, self.prec, tb=True)

    def dq(self) -> jax.Array:
        return self.g.g_read * mm(self.get("do"), self.get("s"), self.prec, tb=True)

    def dk(self) -> jax.Array:
        return mm(self.get("u"), self.get("ds_next"), self.prec, tb=True) * self.g.e_end

    def dw(self) -> jax.Array:
        return -mm(self.get("du"), self.get("s"), self.prec, tb=True)

    def dv_dbeta(self) -> tuple[jax.Array, jax.Array]:
        """``(dv [C, bv], V's part of dbeta [C, 1])`` from ``dL/d(beta V) = T^T dU``."""
        dvb = mm(self.t, self.get("du"), self.prec, ta=True)
        return dvb * self.ch.beta_c, _row_dot(dvb, self.get("v"))

    def dcarry(self) -> jax.Array:
        s, ds_next = self.get("s").astype(F32), self.get("ds_next")
        return jnp.sum(jnp.sum(s * ds_next, axis=1, keepdims=True), axis=0, keepdims=True)


def _row_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.sum(a * b, axis=1, keepdims=True)


def tile_backward(ch: Chunk, g: Gates, t, u, s, do, ds_next, du, prec):
    """One value tile of the backward (``ch.v``, ``do``, ``du [C, bv]`` with ``du`` of
    :func:`u_grad`; ``s``, ``ds_next = dL/dS_next [dk, bv]``; ``t`` of :func:`transform`,
    ``u`` of :func:`state_step`): ``(`` this tile's :class:`Partials`, ``dv [C, bv])``."""
    ops = dict(v=ch.v, u=u, s=s, do=do, ds_next=ds_next, du=du)
    terms = TileTerms(ch, g, t, ops.__getitem__, prec)
    dk_end, (dv, dbeta) = terms.dk(), terms.dv_dbeta()
    p = Partials(terms.dsc(), terms.dt_v(), terms.dq(), dk_end, terms.dw(), dbeta,
                 _row_dot(dk_end, ch.k), terms.dcarry())  # fmt: skip
    return p, dv


class TileSums:
    """:class:`Partials` of a whole chunk from its value tiles' :class:`TileTerms`, each field
    summed over the tiles at its first read (so the rest of the backward holds one such sum at
    a time, not all of them), ``dbeta`` given (a kernel forms it with ``dv``)."""

    def __init__(self, ch: Chunk, tiles: list[TileTerms], dbeta: jax.Array):
        self._ch, self._tiles, self.dbeta = ch, tiles, dbeta

    def _sum(self, field: str) -> jax.Array:
        return functools.reduce(operator.add, (getattr(t, field)() for t in self._tiles))

    dsc = functools.cached_property(lambda self: self._sum("dsc"))
    dt_v = functools.cached_property(lambda self: self._sum("dt_v"))
    dq = functools.cached_property(lambda self: self._sum("dq"))
    dk = functools.cached_property(lambda self: self._sum("dk"))
    dw = functools.cached_property(lambda self: self._sum("dw"))
    dcarry = functools.cached_property(lambda self: self._sum("dcarry"))
    de = functools.cached_property(lambda self: _row_dot(self.dk, self._ch.k))


class ChunkGrads(NamedTuple):
    dq: jax.Array  # [C, dk]
    dk: jax.Array  # [C, dk]
    dbeta: jax.Array  # [C, 1]
    dgam_c: jax.Array  # [C, 1] part of dL/dgam
    dgam_r: jax.Array  # [1, C] the other part


class ScoreGrads(NamedTuple):
    dq: jax.Array  # [C, dk] whole
    dscores: jax.Array  # [C, C] dL/d(Q K^T)
    dgam_c: jax.Array  # [C, 1] the scores' and state reads' parts of dL/dgam
    dgam_r: jax.Array  # [1, C]


def scores_backward(ch: Chunk, p: Partials, prec) -> ScoreGrads:
    """Back through the terms of ``O`` that read ``Q`` (the scores ``Q K^T * decay_incl`` and
    ``(Q g_read) S``), from the tiles' sums ``p``: ``dq`` whole, so that a kernel may store it
    before :func:`finish_backward` and not hold it there."""
    sc, decay_incl = scores(ch, prec)
    pairs = p.dsc * sc  # d/dgam_t of the score (t: +, s: -)
    dgam_c, dgam_r = jnp.sum(pairs, axis=1, keepdims=True), -jnp.sum(pairs, axis=0, keepdims=True)
    dscores = p.dsc * decay_incl  # d(Q K^T)
    dq = mm(dscores, ch.k, prec) + p.dq
    dgam_c += jnp.sum(ch.q * p.dq, axis=1, keepdims=True)
    return ScoreGrads(dq, dscores, dgam_c, dgam_r)


def finish_backward(ch: Chunk, g: Gates, t: jax.Array, p: Partials, sg: ScoreGrads,
                    prec) -> ChunkGrads:  # fmt: skip
    """The gradients but ``dv``: :func:`scores_backward`'s ``sg`` (its ``dq`` passes through)
    carried on through ``K`` in the scores and in ``U``'s end state, ``W = T kg`` and the UT
    transform (sec. 3 of Yang et al. 2024), once per chunk, from the tiles' sums ``p`` and
    ``t = (I + A)^{-1}``. Linear in ``p``, so that parts of the tiles' sums give parts of the
    gradients. ``K K^T`` is recomputed where it is used, and ``p``'s fields are read one part
    at a time, so that a driver which forms each at its read holds few at once."""
    k = ch.k
    c = k.shape[0]
    dk = mm(sg.dscores, ch.q, prec, ta=True) + p.dk  # through K in the scores and in U's end
    dgam_c = sg.dgam_c - p.de
    dlast = g.carry * p.dcarry + jnp.sum(p.de, axis=0, keepdims=True)  # [1, 1]
    # W = T kg.
    scale = kg_scale(ch, g)
    dt = p.dt_v + mm(p.dw, k * scale, prec, tb=True)  # [C, C]
    dkg = mm(t, p.dw, prec, ta=True)  # [C, dk]
    dk += dkg * scale
    dkg_k = jnp.sum(dkg * k, axis=1, keepdims=True)
    dbeta = p.dbeta + dkg_k * g.g_read
    dgam_c += dkg_k * scale
    # T = (I + A)^{-1}; A = kk * decay_strict * beta_t.
    dkk = -mm(mm(t, dt, prec, ta=True), t, prec, tb=True) * decay(ch, strict=True)
    kk = mm(k, k, prec, tb=True)
    dbeta += jnp.sum(dkk * kk, axis=1, keepdims=True)
    dkk *= ch.beta_c
    dk += mm(dkk, k, prec) + mm(dkk, k, prec, ta=True)
    da_a = dkk * kk  # dL/dA * A
    dgam_c += jnp.sum(da_a, axis=1, keepdims=True)
    dgam_r = sg.dgam_r - jnp.sum(da_a, axis=0, keepdims=True)
    dgam_c += jnp.where(_iota((c, 1), 0) == c - 1, dlast, 0.0)
    return ChunkGrads(sg.dq, dk, dbeta, dgam_c, dgam_r)


def chunk_backward(ch: Chunk, s: jax.Array, do: jax.Array, ds_next: jax.Array, prec):
    """``(ChunkGrads, dv [C, bv], dS [dk, bv])`` of one chunk with one value tile, ``dS``
    that of the state entering, given ``s`` (that state), ``do [C, bv]`` and ``ds_next =
    dL/dS_next [dk, bv]``; the forward is recomputed."""
    g = gates(ch)
    wy = transform(ch, g, prec)
    u = state_step(ch, g, wy.w, values(ch, wy.t, prec)[1], s, prec)[0]
    du = u_grad(ch, g, scores(ch, prec)[0], do, ds_next, prec)
    p, dv = tile_backward(ch, g, wy.t, u, s, do, ds_next, du, prec)
    ds = state_grad(ch, g, wy.w, do, ds_next, du, prec)
    return finish_backward(ch, g, wy.t, p, scores_backward(ch, p, prec), prec), dv, ds


def grad_shapes(bsz: int, length: int, heads: int, dk: int, dv: int, c: int, k_dtype, v_dtype,
                *, parts: int | None, heads_major: bool) -> list:  # fmt: skip
    """The backward kernel's outputs: ``dq``, ``dk [bsz, len, heads, dk]`` (``heads_major``:
    ``[bsz, heads, len, dk]``), ``dv`` likewise, ``dbeta``/``dgam`` columns ``[bsz, heads, len,
    1]``, ``dgam`` rows ``[bsz, heads, chunks, 1, C]`` and ``ds0 [bsz, heads, dk, dv]``; all but
    ``dv`` and ``ds0`` with a leading axis of ``parts`` (one per value tile, to sum) unless
    None."""
    tokens = (heads, length) if heads_major else (length, heads)
    lead = () if parts is None else (parts,)
    col = (*lead, bsz, heads, length, 1)
    return [
        jax.ShapeDtypeStruct((*lead, bsz, *tokens, dk), k_dtype),
        jax.ShapeDtypeStruct((*lead, bsz, *tokens, dk), k_dtype),
        jax.ShapeDtypeStruct((bsz, *tokens, dv), v_dtype),
        jax.ShapeDtypeStruct(col, F32),
        jax.ShapeDtypeStruct(col, F32),
        jax.ShapeDtypeStruct((*lead, bsz, heads, length // c, 1, c), F32),
        jax.ShapeDtypeStruct((bsz, heads, dk, dv), F32),
    ]
