"""Hopper forward of the linear-attention scan (no decay, scalar decay, GLA) and of the gated
delta rule in Pallas Mosaic GPU: one fused kernel, the state kept on chip.

The Triton forward (:mod:`.triton_fwd`) writes every chunk's entering state ``h`` to HBM in a
sequential state pass and reads it back in a parallel output kernel. Here a CTA owns one
(batch, head, ``BLOCK_V``-column value tile), walks the chunks in order with its state tile
``S [dk, BLOCK_V]`` in float32 registers and writes each chunk's output as it goes (GLA paper
sec. 3.3, the chunkwise form, as one pass: the "fused chunk" schedule). With ``b`` the
chunk-local inclusive cumsum of the log-gates and ``B`` its last value (no gate: ``b = 0``),
per chunk of ``C = 64`` tokens:

* ``A = (Q K^T) * exp(b_i - b_j)`` for ``j <= i``, else 0 (``[C, C]``);
* ``O = exp(b) * (Q S) + A V`` (``[C, BLOCK_V]``);
* ``S <- exp(B) S + K^T (exp(B - b) * V)``.

Every product is a ``wgmma`` (input-dtype operands, float32 accumulation). Three warpgroups
split the work (the schedule of FlashQLA's Hopper forward, as jla describes it):

* the state warpgroup runs only the serial chain: it publishes ``S`` entering chunk ``n`` to
  shared memory in the input dtype (``Q S``'s right operand, the precision of the Triton
  path's ``h``; two slots, so it may run a chunk ahead), then loads ``K^T`` from its ring
  slot into registers (a transposed load), scales its columns by ``exp(B - b)``, rounds it to
  the input dtype and adds ``(.) V`` to the decayed state: one ``wgmma`` per chunk on the
  chain (:data:`REGISTER_UPDATE`);
* the output warpgroup forms ``A`` while the state is built, then waits for the published
  ``S`` and issues ``Q S`` and ``A V`` together; its output tiles are double-buffered too;
* a producer warpgroup streams ``Q, K, V`` and the chunk's gate factors through a ring of
  ``stages`` slots with TMA (2 by default, measured faster than 3:
  ``experiments/results/bench_scan_fused_ab.md``); both consumers free a slot.

Where that transposed load does not lower (jax < 0.11), and for the gated delta rule (below),
the state warpgroup instead forms ``exp(B - b) * V`` as the product of a diagonal matrix
(registers, its factors rounded to the input dtype) and ``V``, stores it and adds ``K^T (.)``:
a second ``wgmma``, a shared-memory store and a fence on the chain. In delta mode the register
operand made the forward slower (``experiments/results/ab_gated_delta.md``); for the no /
scalar decay modes it made it faster (``ab_scan_register_update.md``). Moving ``exp(B - b) *
V`` to the output warpgroup, published in two slots, made the forward slower
(``experiments/results/bench_scan_fused_ab.md``).

``save_states`` also writes ``h [batch, heads, chunks, dk, dv]`` (input dtype) from the
published states, what the Triton backward reads.

Segment ids (packed documents) enter as per-token document indices ``r``: scores only within
a document, the incoming state read only by the rows of its document, the outgoing state fed
only by the rows of the last one (and carried only if the chunk has no document start), all
folded into the gate factors (:func:`gate_factors`) and one extra comparison in the scores'
mask. The initial state enters through the final state's staging buffer.

GLA's per-channel gates (``gated``, :func:`forward_gated`) take jla's split of the GLA forward
(its ``intra`` then ``state_output`` kernels): Triton's staged scores kernel
(:func:`.triton_fwd.gla_scores`, exact for any gate by secondary chunking) gives ``A`` and
the scaled rows ``q e^b``, ``k e^{B - b}``; the same three warpgroups then run ``O = (Q e^b) S
+ A V`` and ``S <- diag(e^B) S + (K e^{B - b})^T V``: the output warpgroup takes ``A``
(stored in the input dtype) as a wgmma operand instead of forming it, and the state
warpgroup's chain loses its diagonal product (the state rows' decays are the factors the
scalar gate repeats ``dk`` times).

The gated delta rule (``delta``, :func:`forward_delta`, used by
:mod:`kernels_pallas.gated_delta`) has the scalar gate's factors and scores, with ``V``
replaced by ``U = T beta V - W S``, from the UT transform's ``W`` and ``T beta V`` that a
parallel kernel computed before: the state warpgroup forms ``-U`` as one accumulator of ``W
S`` (the published ``S``) and ``-I (T beta V)``, and publishes ``U`` with ``S``; then ``S <-
exp(B) S + K^T (exp(B - b) * U)``, the factors applied in registers. The output warpgroup
reads ``U`` in place of ``V``.

Interpret mode runs the same kernel with ``jnp`` products (:func:`kernels_pallas._hopper.mma`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas._hopper import (
    DTYPES,
    HEAD_DIMS,
    ROWS,
    SMEM_BYTES,
    WGMMA_TRANSFORMS,
    Transposed,
    columns,
    interpret_params,
    iota,
    load_acc,
    mma,
    produce,
    smem_footprint,
    vector,
    wgmma_operands,
    zero_acc,
)

CHUNK = ROWS  # tokens per chunk: one wgmma M
BLOCK_V = 64  # value columns per CTA (the state tile's registers: dk * 64 / 128 per thread)
# the float32 state staging buffer: 128-byte swizzled (8 x 32-element) tiles, so that both the
# final state's store and the initial state's load avoid bank conflicts
F32_TRANSFORMS = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
# The no / scalar decay state update's register operand ``K^T exp(B - b)`` (module doc): its
# transposed load of a swizzled K tile lowers from jax 0.11 (0.10: "Can't transpose the
# swizzled dimension"); else the diagonal product. Interpret mode runs either.
REGISTER_UPDATE = tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 11)


def check_supported(q, v, *, chunk: int, who: str = "chunked_linear_attention") -> None:
    """Raise ``ValueError`` naming what the fused forward does not support (before tracing)."""
    who = f"{who}(lowering='mosaic')"
    problems = []
    if jnp.dtype(q.dtype) not in map(jnp.dtype, DTYPES):
        problems.append(f"dtype must be bfloat16 or float16, got {q.dtype}")
    if q.shape[-1] not in HEAD_DIMS:
        problems.append(f"dk must be one of {HEAD_DIMS}, got {q.shape[-1]}")
    if v.shape[-1] % BLOCK_V:
        problems.append(f"dv must be a multiple of {BLOCK_V}, got {v.shape[-1]}")
    if chunk != CHUNK:
        problems.append(f"chunk_size must be {CHUNK}, got {chunk}")
    if problems:
        raise ValueError(f"{who}: " + "; ".join(problems))


def gate_factors(b, seg, shape: tuple[int, int, int], dk: int) -> tuple[jax.Array, jax.Array]:
    """Per chunk, float32, from ``b`` (the chunk-local cumsum of the log-gates, ``[batch, len,
    heads, 1]``; None: no gate) and ``seg`` (``(r, r_prev)`` ``[batch, len, 1]``: each token's
    document index and its predecessor's; None: one document):

    * read along columns (tokens: of the scores, and of ``K^T`` in the register update),
      ``[batch, heads, chunks, 3, C]``: ``b``, ``r``, ``w = exp(B - b)`` where the token
      reaches the outgoing state (the last row's document);
    * read along rows, ``[batch, heads, chunks, 4 + dk / C, C]``: ``b``, ``r``, ``exp(b)``
      where the row reads the incoming state (its document's), ``w`` (the diagonal update's),
      then ``exp(B)`` (0 if a document starts in the chunk) repeated ``dk`` times, one per
      state row (TMA copies at most 256 elements along a dimension).

    (Two buffers: Mosaic GPU's layout inference, jax 0.11, finds no layout when one
    shared-memory buffer is loaded both along rows and along columns.)"""
    bsz, length, heads = shape
    per_chunk = lambda x: rearrange(x, "b (n c) h -> b h n c", c=CHUNK)  # noqa: E731
    zeros = jnp.zeros((bsz, heads, length // CHUNK, CHUNK), jnp.float32)
    b_chunks = zeros if b is None else per_chunk(b[..., 0])
    r = r_prev = zeros
    if seg is not None:
        r, r_prev = (jnp.broadcast_to(per_chunk(x.astype(jnp.float32)), zeros.shape) for x in seg)
    last = b_chunks[..., -1:]
    reads = r == r_prev[..., :1]  # the document entering the chunk
    reaches = r == r[..., -1:]  # the document leaving it
    carry = jnp.exp(last) * (r[..., -1:] == r_prev[..., :1])
    w = jnp.where(reaches, jnp.exp(last - b_chunks), 0.0)
    rows = [b_chunks, r, jnp.where(reads, jnp.exp(b_chunks), 0.0), w,
            *(jnp.broadcast_to(carry, b_chunks.shape),) * (dk // CHUNK)]  # fmt: skip
    return jnp.stack([b_chunks, r, w], axis=-2), jnp.stack(rows, axis=-2)


def diagonal_update(mode: str) -> bool:
    """Whether ``mode``'s state update scales ``V`` (``U``) by a diagonal product (module doc):
    the gated delta rule's, and the decay modes' without :data:`REGISTER_UPDATE`."""
    return mode == "delta" or (mode == "decay" and not REGISTER_UPDATE)


def scratch_types(dtype, dk: int, stages: int, mode: str = "decay") -> tuple:
    """For ``mode`` "decay" (no or scalar decay), "gla" or "delta" (the gated delta rule):
    rings of Q, K, V tiles (``delta``: of ``T beta V``, plus a ring of ``W``) and gate factors
    (``gla``: of the scores ``A`` and the state rows' decays); the published states (input
    dtype, two slots: ``Q S``'s operand), ``exp(B - b) * V`` (``delta``: ``* U``) if
    :func:`diagonal_update`, ``delta``'s published ``U`` (two slots), two output tiles and the
    float32 initial / final state's staging; barriers (module doc)."""
    mat = lambda *shape: plgpu.SMEM(shape, dtype, transforms=WGMMA_TRANSFORMS)  # noqa: E731
    if mode == "gla":
        x_ring = mat(stages, CHUNK, CHUNK)  # the scores A, a wgmma operand
        f_ring = plgpu.SMEM((stages, dk // CHUNK, CHUNK), jnp.float32)  # state rows' decays
    else:
        x_ring = plgpu.SMEM((stages, 3, CHUNK), jnp.float32)  # factors (columns)
        f_ring = plgpu.SMEM((stages, 4 + dk // CHUNK, CHUNK), jnp.float32)  # factors (rows)
    delta = mode == "delta"
    return (
        (
            mat(stages, CHUNK, dk),  # Q ring
            mat(stages, CHUNK, dk),  # K ring
            mat(stages, CHUNK, BLOCK_V),  # V ring (delta: T beta V)
            x_ring,
            f_ring,
            *((mat(stages, CHUNK, dk),) if delta else ()),  # W ring
            mat(2, dk, BLOCK_V),  # S entering chunk n, in slot n % 2
            *((mat(CHUNK, BLOCK_V),) if diagonal_update(mode) else ()),  # exp(B - b) * V (U)
            *((mat(2, CHUNK, BLOCK_V),) if delta else ()),  # U of chunk n, in slot n % 2
            mat(2, CHUNK, BLOCK_V),  # O of chunk n, in slot n % 2
            plgpu.SMEM((dk, BLOCK_V), jnp.float32, transforms=F32_TRANSFORMS),  # initial, final S
        ),
        tuple(plgpu.Barrier(num_barriers=stages) for _ in range(6 if delta else 5)),  # ready
        plgpu.Barrier(),  # initial S ready
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # slot consumed by both consumers
        plgpu.Barrier(num_barriers=2),  # S (delta: and U) published
        plgpu.Barrier(num_barriers=2),  # S read
    )


def _columns_transposed(x, i: int, interpret: bool):
    """Columns ``[64 i, 64 (i + 1))`` of a ``[C, dk]`` ring slot, transposed: float32 ``[64,
    C]`` in registers, in the wgmma layout (on the GPU a generic-proxy load: fence before the
    slot's release; ``x`` a ref there, a value interpreted)."""
    if interpret:
        return x[:, i * ROWS : (i + 1) * ROWS].T.astype(jnp.float32)
    ref = plgpu.transpose_ref(x.at[:, pl.ds(i * ROWS, ROWS)], (1, 0))
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA).astype(jnp.float32)


def value_tile_program(heads: int, tiles: int) -> tuple:
    """``(batch, head, cols)`` of this CTA, program id ``p = (batch * heads + head) * tiles +
    tile``: its ``BLOCK_V`` value columns ``cols``."""
    pid = lax.axis_index("p")
    head_of, tile = lax.div(pid, tiles), lax.rem(pid, tiles)
    batch, head = lax.div(head_of, heads), lax.rem(head_of, heads)
    return batch, head, pl.ds(pl.multiple_of(tile * BLOCK_V, BLOCK_V), BLOCK_V)


def load_state(src, staging, ready, interpret: bool) -> tuple:
    """A float32 ``[dk, BLOCK_V]`` state tile from HBM ``src`` through ``staging`` (TMA, then
    a wait on ``ready``), as one wgmma accumulator per 64 rows."""
    plgpu.copy_gmem_to_smem(src, staging, ready)
    plgpu.barrier_wait(ready)
    halves = staging.shape[0] // ROWS
    return tuple(load_acc(staging.at[pl.ds(i * ROWS, ROWS)], interpret) for i in range(halves))


def store_state(parts: tuple, staging, dst) -> None:
    """The state tile ``parts`` (:func:`load_state`'s layout) to HBM ``dst`` through
    ``staging``, after every copy out this warpgroup issued before, and waited for."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    for i, part in enumerate(parts):
        staging.at[pl.ds(i * ROWS, ROWS)][...] = part
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(staging, dst)
    plgpu.wait_smem_to_gmem(0)


def _kernel(q_ref, k_ref, v_ref, x_ref, f_ref, *refs, stages, save, mode, interpret):
    """One CTA per (batch, head, value tile), program id ``p = (batch * heads + head) * tiles
    + tile``; warpgroup 2 produces, 1 carries the state, 0 writes the outputs (module doc).
    ``x_ref``: the gate's column factors, or (``gla``) the scores ``A``; ``delta``: ``v_ref``
    holds ``T beta V`` and ``W`` follows ``f_ref``."""
    gla, delta, diagonal = mode == "gla", mode == "delta", diagonal_update(mode)
    w_ref, s0_ref, o_ref, sf_ref, *refs = refs if delta else (None, *refs)
    saved = (1 + delta) if save else 0  # outputs h (and, delta, U) for the backward
    h_ref, u_out = (*refs[:saved], None, None)[:2]
    smem, ready, s0_ready, free, s_ready, s_free = refs[saved:]
    q_ring, k_ring, v_ring, x_ring, f_ring, *rest = smem
    w_ring = rest.pop(0) if delta else None
    s_pub, *rest = rest
    vw_smem = rest.pop(0) if diagonal else None
    u_pub, o_smem, sf_smem = rest if delta else (None, *rest)
    q_ready, k_ready, v_ready, x_ready, f_ready, *w_ready = ready
    _, length, heads, dk = q_ref.shape
    tiles = v_ref.shape[-1] // BLOCK_V
    n_chunks = length // CHUNK
    halves = dk // ROWS
    dtype = q_ref.dtype
    batch, head, cols = value_tile_program(heads, tiles)
    rows = lambda n: pl.ds(pl.multiple_of(n * CHUNK, CHUNK), CHUNK)  # noqa: E731
    ring_slot = lambda n: lax.rem(n, jnp.int32(stages))  # noqa: E731
    two = lambda n: lax.rem(n, jnp.int32(2))  # noqa: E731
    shape_cc, shape_cv = (CHUNK, CHUNK), (CHUNK, BLOCK_V)
    bcast = lambda x, shape, dim: lax.broadcast_in_dim(x, shape, (dim,))  # noqa: E731

    def v_at(t):  # the value tile's rows t (delta: of T beta V, head-major)
        return v_ref.at[batch, head, t, cols] if delta else v_ref.at[batch, t, head, cols]

    wg = lax.axis_index("wg")

    @pl.when(wg == 2)
    def _producer():
        def load(n, slot):
            t = rows(n)
            plgpu.copy_gmem_to_smem(q_ref.at[batch, t, head], q_ring.at[slot], q_ready.at[slot])
            plgpu.copy_gmem_to_smem(k_ref.at[batch, t, head], k_ring.at[slot], k_ready.at[slot])
            plgpu.copy_gmem_to_smem(v_at(t), v_ring.at[slot], v_ready.at[slot])
            for ref, ring, bar in ((x_ref, x_ring, x_ready), (f_ref, f_ring, f_ready)):
                plgpu.copy_gmem_to_smem(ref.at[batch, head, n], ring.at[slot], bar.at[slot])
            if delta:
                plgpu.copy_gmem_to_smem(w_ref.at[batch, head, t], w_ring.at[slot],
                                        w_ready[0].at[slot])  # fmt: skip

        produce(load, n_chunks, stages, free)

    @pl.when(wg == 1)
    def _state():
        """The serial chain: publish S entering chunk n, then S <- exp(B) S + (K^T w) V, ``K^T
        w`` in registers, or (:func:`diagonal_update`) ``K^T (w * V)`` (``gla``: ``S <-
        diag(exp(B)) S + K^T V``, K's rows scaled by the scores kernel; ``delta``: first ``U =
        T beta V - W S``, published with S, then ``V`` is ``U``)."""

        def chunk(n, s):
            slot, pub = ring_slot(n), two(n)
            pl.when(n >= 2)(lambda: plgpu.barrier_wait(s_free.at[pub]))  # read 2 chunks ago
            # and copied out: per chunk one copy (h), or two (h, U); the oldest two chunks ago
            pending = 2 * saved - 1
            if save:
                plgpu.wait_smem_to_gmem(pending, wait_read_only=True)
            for i, part in enumerate(s):
                s_pub.at[pub, pl.ds(i * ROWS, ROWS)][...] = part.astype(dtype)
            plgpu.commit_smem()
            if not delta:
                plgpu.barrier_arrive(s_ready.at[pub])
            if save:
                plgpu.copy_smem_to_gmem(s_pub.at[pub], h_ref.at[batch, head, n, :, cols])
            registers = not (gla or diagonal)  # the update's left operand K^T w in registers
            for bar in (k_ready, v_ready, f_ready, *w_ready, *((x_ready,) if registers else ())):
                plgpu.barrier_wait(bar.at[slot])
            k, v = wgmma_operands((k_ring.at[slot], v_ring.at[slot]), interpret)
            kt = [Transposed(columns(k, i, interpret)) for i in range(halves)]  # K^T, 64 rows each
            if gla:
                carry = [vector(f_ring.at[slot, i], 0, interpret) for i in range(halves)]
                plgpu.commit_smem()  # fences the slot's gate loads before its release
                vw = v
            elif registers:  # K^T exp(B - b), rounded to the input dtype
                w_col = vector(x_ring.at[slot, 2], 1, interpret)
                carry = [vector(f_ring.at[slot, i], 0, interpret) for i in range(4, 4 + halves)]
                w_cols = bcast(w_col, shape_cc, 1)
                kt = [(_columns_transposed(k, i, interpret) * w_cols).astype(dtype)
                      for i in range(halves)]  # fmt: skip
                plgpu.commit_smem()  # fences the slot's loads before its release
                vw = v
            else:
                w_row, *carry = (vector(f_ring.at[slot, i], 0, interpret)
                                 for i in range(3, 4 + halves))  # fmt: skip
                row, col = iota(shape_cc, 0, interpret), iota(shape_cc, 1, interpret)
                eye = lambda x: jnp.where(row == col, x, 0.0).astype(dtype)  # noqa: E731
                if delta:  # -U = W S - I (T beta V), then U and w * U in the input dtype
                    (w,) = wgmma_operands((w_ring.at[slot],), interpret)
                    minus_eye = eye(jnp.full(shape_cc, -1.0, jnp.float32))
                    products = [(w, s_pub.at[pub]), (minus_eye, v)]
                    (neg_u,) = mma(((zero_acc(shape_cv, interpret), products),), interpret)
                    if save:  # this slot's U copy, two chunks ago
                        plgpu.wait_smem_to_gmem(pending, wait_read_only=True)
                    u_pub.at[pub][...] = (-neg_u).astype(dtype)
                    vw_smem[...] = (neg_u * bcast(-w_row, shape_cv, 0)).astype(dtype)
                else:
                    diag = eye(bcast(w_row, shape_cc, 0))
                    (vw,) = mma(((zero_acc(shape_cv, interpret), [(diag, v)]),), interpret)
                    vw_smem[...] = vw.astype(dtype)
                plgpu.commit_smem()  # for wgmma; also fences the slot's gate loads
                if delta:
                    plgpu.barrier_arrive(s_ready.at[pub])
                    if save:
                        plgpu.copy_smem_to_gmem(u_pub.at[pub], u_out.at[batch, head, rows(n), cols])
                vw = vw_smem
            s = [part * bcast(carry[i], shape_cv, 0) for i, part in enumerate(s)]
            s = mma(tuple((part, [(kt[i], vw)]) for i, part in enumerate(s)), interpret)
            plgpu.barrier_arrive(free.at[slot])
            return tuple(s)

        s0 = load_state(s0_ref.at[batch, head, :, cols], sf_smem, s0_ready, interpret)
        s = lax.fori_loop(0, n_chunks, chunk, s0)

        @pl.loop(jnp.maximum(n_chunks - 2, 0), n_chunks)
        def _(n):  # the last two publications' reads
            plgpu.barrier_wait(s_free.at[two(n)])

        store_state(s, sf_smem, sf_ref.at[batch, head, :, cols])

    @pl.when(wg == 0)
    def _output():
        """Per chunk: A = Q K^T masked and decayed while the state is built, then
        O = exp(b) * (Q S) + A V (``gla``: A given, Q's rows already scaled: O = Q S + A V;
        ``delta``: ``U`` published by the state warpgroup in place of V)."""
        # the slots' loads this warpgroup reads (delta: V and W are the state warpgroup's)
        mine = (q_ready, k_ready, x_ready, f_ready) if delta else ready

        @pl.loop(jnp.int32(0), n_chunks)
        def _(n):
            slot, pub = ring_slot(n), two(n)
            for bar in mine:
                plgpu.barrier_wait(bar.at[slot])
            q, k = wgmma_operands((q_ring.at[slot], k_ring.at[slot]), interpret)
            if gla:
                (p,) = wgmma_operands((x_ring.at[slot],), interpret)
            else:
                b_col, r_col = (vector(x_ring.at[slot, i], 1, interpret) for i in range(2))
                b_row, r_row, e_row = (vector(f_ring.at[slot, i], 0, interpret) for i in range(3))
                plgpu.commit_smem()  # fences the slot's gate loads before its release
                (a,) = mma(((zero_acc(shape_cc, interpret), [(q, Transposed(k))]),), interpret)
                row, col = iota(shape_cc, 0, interpret), iota(shape_cc, 1, interpret)
                causal = (col <= row) & (bcast(r_row, shape_cc, 0) == bcast(r_col, shape_cc, 1))
                gap = jnp.where(causal, bcast(b_row, shape_cc, 0) - bcast(b_col, shape_cc, 1), 0)
                p = jnp.where(causal, a * jnp.exp(gap), 0.0).astype(dtype)
            plgpu.barrier_wait(s_ready.at[pub])
            (v,) = wgmma_operands((u_pub.at[pub] if delta else v_ring.at[slot],), interpret)
            zeros_cv = zero_acc(shape_cv, interpret)
            qs, pv = mma(((zeros_cv, [(q, s_pub.at[pub])]), (zeros_cv, [(p, v)])), interpret)
            plgpu.barrier_arrive(s_free.at[pub])
            plgpu.barrier_arrive(free.at[slot])
            o = (qs if gla else qs * bcast(e_row, shape_cv, 0)) + pv
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # slot pub's copy, 2 chunks ago
            o_smem.at[pub][...] = o.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[pub], o_ref.at[batch, rows(n), head, cols])

        plgpu.wait_smem_to_gmem(0)


def state_decays(b, seg) -> jax.Array:
    """GLA (per-channel log-gates ``b`` ``[batch, len, heads, dk]`` float32, chunk-local
    cumsums): the state rows' decays ``e^B`` per chunk, 0 where a document starts in the chunk,
    ``[batch, heads, chunks, dk / C, C]``; ``seg`` as :func:`gate_factors`."""
    last = b[:, CHUNK - 1 :: CHUNK]  # [batch, chunks, heads, dk]
    carry = jnp.exp(last)
    if seg is not None:
        r, r_prev = seg
        same = r[:, CHUNK - 1 :: CHUNK] == r_prev[:, ::CHUNK]  # [batch, chunks, 1]
        carry = jnp.where(same[..., None], carry, 0.0)
    return rearrange(carry, "b n h (i c) -> b h n i c", c=CHUNK)


def _launch(q, k, v, x, f, s0, w=None, *, mode: str, stages: int, save_states: bool,
            interpret: bool):  # fmt: skip
    bsz, length, heads, dk = q.shape
    dv = v.shape[-1]
    scratch = scratch_types(q.dtype, dk, stages, mode)
    if (need := smem_footprint(scratch)) > SMEM_BYTES:
        raise ValueError(f"linear-attention mosaic forward: stages={stages} needs {need} B of "
                         f"shared memory > {SMEM_BYTES}")  # fmt: skip
    out_type = [
        jax.ShapeDtypeStruct((bsz, length, heads, dv), q.dtype),
        jax.ShapeDtypeStruct((bsz, heads, dk, dv), jnp.float32),
    ]
    if save_states:
        out_type.append(jax.ShapeDtypeStruct((bsz, heads, length // CHUNK, dk, dv), q.dtype))
        if mode == "delta":
            out_type.append(jax.ShapeDtypeStruct((bsz, heads, length, dv), q.dtype))
    outs = plgpu.kernel(
        functools.partial(_kernel, stages=stages, save=save_states, mode=mode, interpret=interpret),
        out_type=tuple(out_type),
        scratch_types=scratch,
        grid=(bsz * heads * (dv // BLOCK_V),),
        grid_names=("p",),
        num_threads=3,
        thread_name="wg",
        kernel_name=f"scan_fwd_{mode}",
        interpret=interpret_params() if interpret else None,
    )(q, k, v, x, f, *(() if w is None else (w,)), s0)
    return outs[0], outs[1], (outs[2:] if save_states else None)


def forward(q, k, v, b, s0, seg=None, *, stages: int = 2, save_states: bool, interpret: bool):
    """``(o [batch, len, heads, dv], s_final [batch, heads, dk, dv] float32, h)`` from ``q, k
    [batch, len, heads, dk]``, ``v [batch, len, heads, dv]`` (len a multiple of ``CHUNK``),
    ``b`` (chunk-local log-gate cumsum ``[batch, len, heads, 1]`` float32, None: no decay) and
    ``s0`` (the initial state ``[batch, heads, dk, dv]`` float32), ``seg`` (document indices,
    see :func:`gate_factors`; None: one document); ``h [batch,
    heads, chunks, dk, dv]`` (states entering each chunk) in the input dtype with
    ``save_states``, else None."""
    bsz, length, heads, dk = q.shape
    x, f = gate_factors(b, seg, (bsz, length, heads), dk)
    o, s_final, saved = _launch(q, k, v, x, f, s0, mode="decay", stages=stages,
                                save_states=save_states, interpret=interpret)  # fmt: skip
    return o, s_final, (saved[0] if save_states else None)


def forward_gated(qg, kg, v, a, decays, s0, *, stages: int = 2, save_states: bool,
                  interpret: bool):  # fmt: skip
    """GLA: :func:`forward` from the rows ``qg = q e^b``, ``kg = k e^{B - b}``, the chunks'
    scores ``a`` ``[batch, heads, chunks, C, C]`` in the input dtype (causal, documents and gates
    applied; all three from :func:`.triton_fwd.gla_scores` with ``scaled``) and the state
    rows' ``decays`` (:func:`state_decays`)."""
    o, s_final, saved = _launch(qg, kg, v, a, decays, s0, mode="gla", stages=stages,
                                save_states=save_states, interpret=interpret)  # fmt: skip
    return o, s_final, (saved[0] if save_states else None)


def forward_delta(q, k, w, uv, b, s0, seg=None, *, stages: int = 2, save_states: bool,
                  interpret: bool):  # fmt: skip
    """The gated delta rule (:mod:`kernels_pallas.gated_delta`): :func:`forward` with ``V``
    replaced per chunk by ``U = UV - W S``, from the UT transform's ``w = T (beta e^b K)``
    ``[batch, heads, len, dk]`` and ``uv = T (beta V)`` ``[batch, heads, len, dv]`` (input
    dtype, rows outside the incoming state's document zero in ``w``); ``b`` the chunk-local
    cumsum of the log-decays (``[batch, len, heads, 1]``), ``seg`` as :func:`forward`. With
    ``save_states`` the third output is ``(h, U)``: also every chunk's ``U`` (``[batch, heads,
    len, dv]``, input dtype), what the backward's value-tile kernel reads."""
    bsz, length, heads, dk = q.shape
    x, f = gate_factors(b, seg, (bsz, length, heads), dk)
    return _launch(q, k, uv, x, f, s0, w, mode="delta", stages=stages,
                   save_states=save_states, interpret=interpret)  # fmt: skip
