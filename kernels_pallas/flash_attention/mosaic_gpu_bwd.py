"""Hopper flash-attention backward in Pallas Mosaic GPU (FlashAttention-2 alg. 2, FA-3 style).

Warp-specialised kernels. In each CTA a producer warpgroup streams tiles through a ring
of ``stages`` shared-memory slots with TMA -- one "ready" mbarrier per slot and operand (TMA
transaction count), one "free" mbarrier per slot that both consumers arrive on -- and two
consumer warpgroups, each owning 64 rows (one wgmma M), run the products with wgmma into
float32 register accumulators (FlashAttention-3, Shah et al. 2024, sec. 3.1 and 3.3):

* dK/dV: one CTA per 128 KV rows of one (batch, KV head); each consumer keeps its 64 K and V
  rows in shared memory while the producer streams ``Q``, ``dO`` (``bq`` rows), ``lse2`` and
  ``delta`` of every query head of the GQA group over the query tiles that see the CTA's keys.
  Transposed products keep the KV rows as the wgmma M: ``S^T = K Q^T``, ``dP^T = V dO^T``,
  ``P^T = exp2(S^T scale log2(e) - lse2)``, ``dS^T = P^T (dP^T - delta)``, ``dV += P^T dO``,
  ``dK += dS^T Q`` (FA-2 alg. 2 lines 11-17). The group's heads are summed in the float32
  accumulators, so dK/dV come out once per KV head, in the input dtype.
* dQ, two ways (``Tiles.fused_dq``):
  - a second kernel: one CTA per 128 query rows of one (batch, head), heaviest causal tiles
    first; the producer streams the visible ``K``, ``V`` tiles (``bk`` rows): ``S = Q K^T``,
    ``dP = dO V^T``, ``dS = P (dP - delta)``, ``dQ += dS K`` (alg. 2 lines 11-16, 18) --
    7 matmuls in all, as arjax's Triton backward;
  - fused (FA-2 alg. 2 line 18 as written, FA-3 sec. 3.3): the dK/dV kernel also writes
    ``dS^T`` (input dtype) to shared memory and the two consumers swap halves through an
    mbarrier. Each issues dV, then (once the other half is there) its 64x64 block of the step's
    ``dQ`` partial ``dS K`` over the CTA's 128 keys, from shared memory (transposed ``dS^T`` as
    the wgmma lhs), then dK; while dK runs it stages the block and adds it to a float32 ``dQ``
    in GMEM with a TMA reduce-add -- 5 matmuls; ``dQ`` is scaled and cast by XLA afterwards.
    The kernel's consumers have no registers to spare: their shared-memory operands are indexed
    through ``_opaque`` so that their wgmma descriptors are not hoisted out of the step loop
    (hoisted, ptxas spilled registers at D=128). On an H200 it was faster than the split
    kernels from L=8192 and slower at L=2048, at both head dims
    (experiments/results/bench_mgpu_bwd_d128_fused.md, bench_mgpu_bwd_d64_fused.md);
    ``default_tiles`` fuses it from 8192 keys per query (``FUSED_DQ_MIN_LEN``), not with
    segment ids.

``lse2`` is the forward's base-2 log-sum-exp (``_common``; +inf for rows that see no key, so
their probabilities are exactly 0) and ``delta = rowsum(dO * O)``. Tile skipping and the
boundary masks come from ``_common`` (``q_block_range``, ``kv_block_range``, ``tile_mask``):
tiles a CTA does not see are never loaded, tiles a warpgroup sees whole run unmasked. The
caller's padding is topped up here to whole CTA tiles; padded keys are masked, padded query
rows carry ``lse2 = +inf``. Segment ids (int32, padded with each row's last id): a CTA
streams only the tiles of its rows' documents (its 128-row tile's row of
``segment_tile_ranges``, read from GMEM as in the forward), and each consumer runs the tiles
inside its 64 rows' one document unmasked (its 64-row tile's row, clipped to the CTA's steps
by ``_hopper.nested``); for the masked tiles each consumer loads its own rows' ids once, the
producer streams the other side's ids beside the tiles (like ``lse2``/``delta``), and the
masks compare them.

Interpret mode (CPU tests) runs the same kernels -- TMA copies, barriers, warp
specialisation, masks, epilogues -- but the Mosaic GPU interpreter cannot read a transposed
shared-memory operand or a register left operand of ``wgmma``, so there the products are
``jnp`` dot products of the same operands (same dtypes, float32 accumulation); nor has it TMA
reductions, so there the fused ``dQ`` add is a read-modify-write of GMEM, into a partial per
KV tile (summed by ``backward``: CTAs of one KV tile and the two consumers add disjoint
blocks). Operands that the GPU reads only with wgmma are loaded once per step there
(``_hopper.wgmma_operands``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas._hopper import (
    CONSUMERS,
    ROWS,
    SMEM_BYTES,
    TILE,
    WGMMA_TRANSFORMS,
    Transposed,
    check_call,
    interpret_params,
    iota,
    mma,
    nested,
    operand,
    produce,
    same_segment,
    smem_footprint,
    tile_ranges,
    vector,
    wgmma_operands,
    zero_acc,
)
from kernels_pallas.flash_attention._common import (
    Geometry,
    kv_block_range,
    pad_ids,
    pad_to,
    q_block_range,
    segment_tile_ranges,
    tile_mask,
    work_item,
)
from kernels_pallas.flash_attention.tuning import heads_per_wave

STREAM_TILES = (64, 128)  # allowed bq (dK/dV) and bk (dQ)
# registers per thread after setmaxnreg: 2 x 240 + 24 = 3 x _hopper.LAUNCH_REGS
CONSUMER_REGS, PRODUCER_REGS = 240, 24


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Streamed tile sizes and ring depth of the two kernels."""

    bq: int = 64  # query rows per step of the dK/dV kernel
    bk: int = 64  # KV rows per step of the dQ kernel (unused when fused_dq)
    stages: int = 2  # ring slots in flight
    fused_dq: bool = False  # dQ by the dK/dV kernel (TMA reduce-add)


FUSED_DQ_MIN_LEN = {64: 8192, 128: 8192}  # head_dim -> shortest default_tiles length fusing dQ


def default_tiles(head_dim: int, length: int, segments: bool = False) -> Tiles:
    """Tiles for ``head_dim`` and ``length``: the most queries a key (or keys a query) can see,
    ``min(q_len, kv_len)`` or a shorter sliding window. Register budget: dK, dV (D=128: 64 + 64
    registers per thread) plus S^T, dP^T (bq/2 each) fit 240 registers with bq=64; D=64 leaves
    room for 128-wide streamed tiles. dQ is fused into the dK/dV kernel where that measured
    faster on an H200 (``FUSED_DQ_MIN_LEN``, dense causal, module docstring): not for a
    1024-token window at L=8192 nor with ``segments`` (8 packed documents of 1024: both ran
    faster split at D=128, experiments/results/bench_attention_masked.md); fused at D=128
    with 2 ring slots: 3 fit in shared memory but were no faster
    (experiments/results/bench_mgpu_bwd_d128_stages.md)."""
    fused = not segments and length >= FUSED_DQ_MIN_LEN.get(head_dim, float("inf"))
    if head_dim > 64:
        return Tiles(bq=64, bk=64, stages=2 if fused else 3, fused_dq=fused)
    return Tiles(bq=128, bk=128, stages=2, fused_dq=fused)


def scratch_types(dtype, head_dim: int, tiles: Tiles, segments: bool) -> tuple:
    """Scratch of the dK/dV kernel (fused: its ``dS^T`` exchange last) and of the dQ kernel
    (None when fused): ``(smem buffers, ready barriers, free barriers[, exchange])`` each. With
    segment ids: each consumer's own rows' ids and a ring of the streamed tiles' ids."""
    s, bq, bk = tiles.stages, tiles.bq, tiles.bk
    mat = lambda *shape: plgpu.SMEM((*shape, head_dim), dtype, transforms=WGMMA_TRANSFORMS)
    vec = lambda n, rows, dtype=jnp.float32: plgpu.SMEM((n, rows), dtype)
    bars = lambda n, count: tuple(plgpu.Barrier(num_barriers=n) for _ in range(count))
    free = lambda n: plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=n)
    ids = lambda n, rows: vec(n, rows, jnp.int32)  # noqa: E731
    seg_vecs = lambda streamed: (ids(CONSUMERS, ROWS), ids(s, streamed)) if segments else ()
    seg_bars = bars(CONSUMERS, 1) + bars(s, 1) if segments else ()
    dkv = (
        (mat(CONSUMERS, ROWS),) * 2 + (mat(s, bq),) * 2 + (vec(s, bq),) * 2 + seg_vecs(bq),
        bars(CONSUMERS, 2) + bars(s, 4) + seg_bars,
        free(s),
    )
    if tiles.fused_dq:
        exchange = (
            plgpu.SMEM((2, CONSUMERS, ROWS, bq), dtype, transforms=WGMMA_TRANSFORMS),  # dS^T x 2
            plgpu.SMEM((CONSUMERS, ROWS, ROWS), jnp.float32),  # dQ block staging
            free(2),  # both halves of dS^T written
            free(1),  # both consumers done with K
        )
        return (*dkv, exchange), None
    dq = (
        (mat(CONSUMERS, ROWS),) * 2 + (vec(CONSUMERS, ROWS),) * 2 + (mat(s, bk),) * 2
        + seg_vecs(bk),
        bars(CONSUMERS, 4) + bars(s, 2) + seg_bars,
        free(s),
    )  # fmt: skip
    return dkv, dq


def smem_bytes(dtype, head_dim: int, tiles: Tiles, segments: bool = False) -> int:
    """Shared memory of the larger of the kernels' CTAs, as Mosaic GPU allocates it."""
    return max(smem_footprint(x) for x in scratch_types(dtype, head_dim, tiles, segments) if x)


def check_supported(dtype, head_dim: int, has_segments: bool, tiles: Tiles) -> None:
    """Raise ``ValueError`` naming what this backward does not support (before compiling)."""
    check_call(dtype, head_dim, "mosaic backward")
    for name in ("bq", "bk"):
        if getattr(tiles, name) not in STREAM_TILES:
            raise ValueError(
                f"mosaic backward: tile {name} must be one of {STREAM_TILES}, "
                f"got {getattr(tiles, name)}"
            )
    if not isinstance(tiles.fused_dq, bool):
        raise ValueError(f"mosaic backward: fused_dq must be a bool, got {tiles.fused_dq!r}")
    if tiles.fused_dq and tiles.bq * head_dim != CONSUMERS * ROWS * ROWS:
        raise ValueError(
            f"mosaic backward: fused_dq needs bq * head_dim = {CONSUMERS * ROWS * ROWS} (one "
            f"{ROWS}x{ROWS} dQ block per consumer), got bq={tiles.bq}, head_dim={head_dim}"
        )
    if not isinstance(tiles.stages, int) or tiles.stages < 1:
        raise ValueError(f"mosaic backward: stages must be a positive int, got {tiles.stages!r}")
    if (need := smem_bytes(dtype, head_dim, tiles, has_segments)) > SMEM_BYTES:
        raise ValueError(f"mosaic backward: {tiles} needs {need} B of shared memory > {SMEM_BYTES}")


def _probs_and_dlogits(s, dp, lse2, delta, mask, scale2: float, query_dim: int):
    """``P = exp2(S scale2 - lse2)`` (0 where masked) and ``dS = P (dP - delta)``; ``lse2``
    and ``delta`` are per query, along ``query_dim`` of the ``[m, n]`` tiles."""
    bcast = lambda x: lax.broadcast_in_dim(x, s.shape, (query_dim,))
    p = jnp.exp2(s * scale2 - bcast(lse2))
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    return p, p * (dp - bcast(delta))


def _opaque(x):
    """``x`` through an LLVM optimization barrier. Shared-memory operands indexed by it get
    their wgmma descriptors computed next to each use: indexed by the loop-invariant warpgroup
    id, LLVM hoists them out of the step loop, ~50 registers of 64-bit descriptors that the fused
    kernel's consumers do not have (ptxas spilled 632 B per thread, in the loop). Also keeps
    Python-int ref indices out of ``run_state`` operands, which jax 0.11's lowering rejects
    ("Shaped arrays must be represented by ir.Values")."""
    return lax.optimization_barrier(x)


def _mma_with_dq(dv, dv_products, dk, dk_products, dq_products, ready, emit, interpret: bool):
    """A fused step's products: ``dv``/``dk`` plus their products (as ``_mma``), and a fresh
    64x64 ``dQ`` block from ``dq_products``, issued in the order dV, (wait for the ``ready``
    barrier: the other consumer's ``dS^T``), dQ, dK; once the dQ block is done -- dK still on the
    tensor cores -- it is handed to ``emit``. Returns ``dv, dk``."""
    dq = zero_acc((ROWS, ROWS), interpret)
    if interpret:
        (dv,) = mma(((dv, dv_products),), True)
        plgpu.barrier_wait(ready)
        emit(mma(((dq, dq_products),), True)[0])
        (dk,) = mma(((dk, dk_products),), True)
        return dv, dk

    def issue(acc_refs):
        dv_ref, dk_ref, dq_ref = acc_refs
        add = lambda acc_ref, products: [
            plgpu.wgmma(acc_ref, operand(a, False), operand(b, False)) for a, b in products
        ]
        add(dv_ref, dv_products)
        plgpu.barrier_wait(ready)
        add(dq_ref, dq_products)
        add(dk_ref, dk_products)
        # wgmma groups finish in issue order: dQ is done once only dK's remain in flight
        emit(plgpu.wgmma_accumulator_load(dq_ref, wait_n=len(dk_products)))

    dv, dk, _ = pl.run_state(issue)(tuple(plgpu.ACC.init(acc) for acc in (dv, dk, dq)))
    return dv, dk


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, geo: Geometry,
                stages: int, group: int, interpret: bool, fused: bool):  # fmt: skip
    """dK, dV of 128 KV rows of one (batch, KV head), and with ``fused`` their dQ partials;
    refs are ``[b, len, heads, d]`` / ``[b, heads, len]`` in GMEM. CTAs in ``work_item`` order
    (groups of ``group`` (batch, KV head)s)."""
    seg = geo.has_segments
    if seg:  # int32 ids, the CTAs' and the consumers' rows of segment_tile_ranges (GMEM)
        qseg_ref, kseg_ref, rng_ref, wg_rng_ref, *refs = refs
    if fused:  # dK and dV share one GMEM ref [2, ...]
        dq_ref, dkv_ref, smem, ready, free, (ds_smem, dq_stage, ds_ready, k_done) = refs
        dk_ref, dv_ref = dkv_ref.at[0], dkv_ref.at[1]
    else:
        dk_ref, dv_ref, smem, ready, free = refs
    (k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, *seg_smem) = smem
    (k_ready, v_ready, q_ready, do_ready, lse_ready, delta_ready, *seg_ready) = ready
    wg = lax.axis_index("wg")
    b, hk = k_ref.shape[0], k_ref.shape[2]
    tile, batch, kv_head = work_item(lax.axis_index("p"), geo.nk, b, hk, group, last_first=False)
    bq, g = geo.bq, geo.groups
    cta_first = tile * TILE
    ranges = tile_ranges(rng_ref, batch, tile) if seg else None
    lo, _, _, hi = q_block_range(cta_first, cta_first + TILE - 1, geo, ranges)
    n = hi - lo  # query tiles per head of the group; steps run (head r, tile i) = (t // n, t % n)

    @pl.when(wg == CONSUMERS)
    def _producer():
        def load(t, slot):
            head = kv_head * g + lax.div(t, n)
            rows = pl.ds((lo + lax.rem(t, n)) * bq, bq)
            plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_ring.at[slot], q_ready.at[slot])
            plgpu.copy_gmem_to_smem(
                do_ref.at[batch, rows, head], do_ring.at[slot], do_ready.at[slot]
            )
            plgpu.copy_gmem_to_smem(
                lse_ref.at[batch, head, rows], lse_ring.at[slot], lse_ready.at[slot]
            )
            plgpu.copy_gmem_to_smem(
                delta_ref.at[batch, head, rows], delta_ring.at[slot], delta_ready.at[slot]
            )
            if seg:
                plgpu.copy_gmem_to_smem(
                    qseg_ref.at[batch, rows], seg_smem[1].at[slot], seg_ready[1].at[slot]
                )

        produce(load, g * n, stages, free, PRODUCER_REGS)

    @pl.when(wg < CONSUMERS)
    def _consumer():
        plgpu.set_max_registers(CONSUMER_REGS, action="increase")
        k_first = cta_first + wg * ROWS
        k_slot, v_slot = k_smem.at[wg], v_smem.at[wg]
        own = (batch, pl.ds(k_first, ROWS), kv_head)
        plgpu.copy_gmem_to_smem(k_ref.at[own], k_slot, k_ready.at[wg])
        plgpu.copy_gmem_to_smem(v_ref.at[own], v_slot, v_ready.at[wg])
        plgpu.barrier_wait(k_ready.at[wg])
        plgpu.barrier_wait(v_ready.at[wg])
        k_seg = None
        if seg:  # own keys' ids (seg_smem[0]); the query tiles' stream in seg_smem[1]
            plgpu.copy_gmem_to_smem(kseg_ref.at[batch, pl.ds(k_first, ROWS)], seg_smem[0].at[wg],
                                    seg_ready[0].at[wg])  # fmt: skip
            plgpu.barrier_wait(seg_ready[0].at[wg])
            k_seg = vector(seg_smem[0].at[wg], 0, interpret)
        k_idx = k_first + iota((ROWS, bq), 0, interpret)
        q_col = iota((ROWS, bq), 1, interpret)
        wg_ranges = tile_ranges(wg_rng_ref, batch, tile * CONSUMERS + wg) if seg else None
        _, full_lo, full_hi, _ = q_block_range(k_first, k_first + ROWS - 1, geo, wg_ranges)
        full_lo, full_hi = nested(lo, hi, full_lo, full_hi)  # the producer's steps [lo, hi)
        d, dtype = k_ref.shape[-1], q_ref.dtype

        def fused_dq(i, r, t, wg_, p_t, ds_t, dv, dk, q, do):
            """Share ``dS^T`` with the other consumer (double-buffered), then the step's dV, dK
            and this consumer's 64x64 block of the ``[bq, d]`` dQ partial ``dS K`` over the CTA's
            128 keys (both halves of ``dS^T``, transposed, against both consumers' K): its query
            rows if bq = 128, else its feature columns; added to the float32 dQ with a TMA
            reduce-add while dK runs."""
            buf = lax.rem(t, 2)
            ds_smem.at[buf, wg_][...] = ds_t
            plgpu.commit_smem()
            plgpu.barrier_arrive(ds_ready.at[buf])
            mine = lambda n_: (
                pl.ds(pl.multiple_of(wg_ * ROWS, ROWS), ROWS) if n_ > ROWS else slice(None)
            )
            rows, cols = mine(bq), mine(d)
            halves = [_opaque(jnp.int32(h)) for h in range(CONSUMERS)]
            dq_products = [
                (Transposed(ds_smem.at[buf, h, :, rows]), k_smem.at[h, :, cols]) for h in halves
            ]
            stage = dq_stage.at[wg_]

            def emit(part):
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last add has read stage
                stage[...] = part
                plgpu.commit_smem()
                first = i * bq + (wg_ * ROWS if bq > ROWS else 0)
                block = (batch, pl.ds(first, ROWS), kv_head * g + r, cols)
                if interpret:  # this KV tile's partial (see backward)
                    dst = dq_ref.at[(tile, *block)]
                    dst[...] += stage[...]
                else:
                    plgpu.copy_smem_to_gmem(stage, dq_ref.at[block], reduction_op="add")

            return _mma_with_dq(dv, [(p_t.astype(dtype), do)], dk, [(ds_t, q)], dq_products,
                                ds_ready.at[buf], emit, interpret)  # fmt: skip

        def step(i, carry, r, masked: bool):
            dk, dv = carry
            t = r * n + i - lo
            slot = lax.rem(t, jnp.int32(stages))
            wg_ = _opaque(wg) if fused else wg
            for bar in (q_ready, do_ready, lse_ready, delta_ready, *seg_ready[1:]):
                plgpu.barrier_wait(bar.at[slot])
            q, do = wgmma_operands((q_ring.at[slot], do_ring.at[slot]), interpret)
            zeros = zero_acc((ROWS, bq), interpret)
            s_t, dp_t = mma(((zeros, [(k_smem.at[wg_], Transposed(q))]),
                              (zeros, [(v_smem.at[wg_], Transposed(do))])), interpret)  # fmt: skip
            mask = None
            if masked:
                mask = tile_mask(i * bq + q_col, k_idx, None, None, geo)
                if seg:  # tiles inside one document need no ids
                    q_seg = vector(seg_smem[1].at[slot], 1, interpret)
                    mask = mask & same_segment(q_seg, k_seg, (ROWS, bq), query_dim=1)
            p_t, ds_t = _probs_and_dlogits(
                s_t,
                dp_t,
                vector(lse_ring.at[slot], 1, interpret),
                vector(delta_ring.at[slot], 1, interpret),
                mask,
                geo.scale2,
                query_dim=1,
            )
            ds_t = ds_t.astype(dtype)
            if fused:
                dv, dk = fused_dq(i, r, t, wg_, p_t, ds_t, dv, dk, q, do)
            else:
                dv, dk = mma(((dv, [(p_t.astype(dtype), do)]), (dk, [(ds_t, q)])), interpret)
                plgpu.commit_smem()  # lse2, delta (and ids) loads, before TMA refills the slot
            plgpu.barrier_arrive(free.at[slot])  # fused: fused_dq's commit_smem fenced them
            return dk, dv

        def head(r, carry):
            for start, stop, masked in ((lo, full_lo, True), (full_lo, full_hi, False),
                                        (full_hi, hi, True)):  # fmt: skip
                body = functools.partial(step, r=r, masked=masked)
                carry = lax.fori_loop(start, stop, body, carry)
            return carry

        zeros = zero_acc((ROWS, k_ref.shape[-1]), interpret)
        dk, dv = lax.fori_loop(0, g, head, (zeros, zeros))
        if fused:  # the other consumer's last dQ blocks read this K: wait for them
            plgpu.barrier_arrive(k_done.at[0])
            plgpu.barrier_wait(k_done.at[0])
        k_slot[...] = (dk * geo.scale).astype(dk_ref.dtype)  # K, V are done: stage dK, dV there
        v_slot[...] = dv.astype(dv_ref.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_slot, dk_ref.at[own])
        plgpu.copy_smem_to_gmem(v_slot, dv_ref.at[own])
        plgpu.wait_smem_to_gmem(0)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, geo: Geometry,
               stages: int, group: int, interpret: bool):  # fmt: skip
    """dQ of 128 query rows of one (batch, head); CTAs in ``work_item`` order."""
    seg = geo.has_segments
    if seg:  # int32 ids, the CTAs' and the consumers' rows of segment_tile_ranges (GMEM)
        qseg_ref, kseg_ref, rng_ref, wg_rng_ref, *refs = refs
    dq_ref, smem, ready, free = refs
    (q_smem, do_smem, lse_smem, delta_smem, k_ring, v_ring, *seg_smem) = smem
    (q_ready, do_ready, lse_ready, delta_ready, k_ready, v_ready, *seg_ready) = ready
    wg = lax.axis_index("wg")
    b, h = q_ref.shape[0], q_ref.shape[2]
    tile, batch, head = work_item(lax.axis_index("p"), geo.nq, b, h, group, last_first=True)
    bk = geo.bk
    cta_first = tile * TILE
    ranges = tile_ranges(rng_ref, batch, tile) if seg else None
    lo, _, _, hi = kv_block_range(cta_first, cta_first + TILE - 1, geo, ranges)

    @pl.when(wg == CONSUMERS)
    def _producer():
        kv_head = lax.div(head, jnp.int32(geo.groups))

        def load(t, slot):
            rows = (batch, pl.ds((lo + t) * bk, bk), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_ring.at[slot], k_ready.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_ring.at[slot], v_ready.at[slot])
            if seg:
                plgpu.copy_gmem_to_smem(kseg_ref.at[rows[:2]], seg_smem[1].at[slot],
                                        seg_ready[1].at[slot])  # fmt: skip

        produce(load, hi - lo, stages, free, PRODUCER_REGS)

    @pl.when(wg < CONSUMERS)
    def _consumer():
        plgpu.set_max_registers(CONSUMER_REGS, action="increase")
        q_first = cta_first + wg * ROWS
        own = pl.ds(q_first, ROWS)
        q_slot, do_slot = q_smem.at[wg], do_smem.at[wg]
        copies = (
            (q_ref.at[batch, own, head], q_slot, q_ready),
            (do_ref.at[batch, own, head], do_slot, do_ready),
            (lse_ref.at[batch, head, own], lse_smem.at[wg], lse_ready),
            (delta_ref.at[batch, head, own], delta_smem.at[wg], delta_ready),
        )
        if seg:  # own queries' ids (seg_smem[0]); the KV tiles' stream in seg_smem[1]
            copies += ((qseg_ref.at[batch, own], seg_smem[0].at[wg], seg_ready[0]),)
        for src, dst, bar in copies:
            plgpu.copy_gmem_to_smem(src, dst, bar.at[wg])
        for *_, bar in copies:
            plgpu.barrier_wait(bar.at[wg])
        lse2 = vector(lse_smem.at[wg], 0, interpret)
        delta = vector(delta_smem.at[wg], 0, interpret)
        q_seg = vector(seg_smem[0].at[wg], 0, interpret) if seg else None
        q_idx = q_first + iota((ROWS, bk), 0, interpret)
        k_col = iota((ROWS, bk), 1, interpret)
        wg_ranges = tile_ranges(wg_rng_ref, batch, tile * CONSUMERS + wg) if seg else None
        _, full_lo, full_hi, _ = kv_block_range(q_first, q_first + ROWS - 1, geo, wg_ranges)
        full_lo, full_hi = nested(lo, hi, full_lo, full_hi)  # the producer's steps [lo, hi)

        def step(j, dq, masked: bool):
            slot = lax.rem(j - lo, jnp.int32(stages))
            for bar in (k_ready, v_ready, *seg_ready[1:]):
                plgpu.barrier_wait(bar.at[slot])
            k, v = wgmma_operands((k_ring.at[slot], v_ring.at[slot]), interpret)
            zeros = zero_acc((ROWS, bk), interpret)
            s, dp = mma(
                ((zeros, [(q_slot, Transposed(k))]), (zeros, [(do_slot, Transposed(v))])), interpret
            )
            mask = None
            if masked:
                mask = tile_mask(q_idx, j * bk + k_col, None, None, geo)
                if seg:  # tiles inside one document need no ids
                    k_seg = vector(seg_smem[1].at[slot], 1, interpret)
                    mask = mask & same_segment(q_seg, k_seg, (ROWS, bk), query_dim=0)
            _, ds = _probs_and_dlogits(s, dp, lse2, delta, mask, geo.scale2, query_dim=0)
            (dq,) = mma(((dq, [(ds.astype(q_ref.dtype), k)]),), interpret)
            if seg and masked:  # the ids' loads, before TMA refills the slot
                plgpu.commit_smem()
            plgpu.barrier_arrive(free.at[slot])
            return dq

        dq = zero_acc((ROWS, q_ref.shape[-1]), interpret)
        for start, stop, masked in ((lo, full_lo, True), (full_lo, full_hi, False),
                                    (full_hi, hi, True)):  # fmt: skip
            dq = lax.fori_loop(start, stop, functools.partial(step, masked=masked), dq)
        q_slot[...] = (dq * geo.scale).astype(dq_ref.dtype)  # Q is done: stage dQ there
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_slot, dq_ref.at[batch, own, head])
        plgpu.wait_smem_to_gmem(0)


def backward(q, k, v, do, lse2, delta, geo: Geometry, tiles: Tiles, interpret: bool,
             q_seg=None, kv_seg=None):  # fmt: skip
    """FlashAttention-2 alg. 2 gradients: ``q, do [b, Lq, h, d]``, ``k, v [b, Lk, hk, d]``,
    ``lse2`` (base 2, +inf past the true rows) and ``delta = rowsum(dO * O)``, both float32
    ``[b, h, Lq]``; lengths may carry any padding past ``geo.q_len``/``geo.kv_len``. Returns
    ``dq`` shaped like q and ``dk, dv`` like k (summed over each GQA group), in q's dtype.
    ``q_seg [b, Lq]``, ``kv_seg [b, Lk]``: int32 segment ids (with ``geo.has_segments``)."""
    b, lq, h, d = q.shape
    lk, hk = k.shape[1], k.shape[2]
    lq_pad, lk_pad = (-(-n // TILE) * TILE for n in (lq, lk))
    q, do = (pad_to(x, 1, lq_pad) for x in (q, do))
    k, v = (pad_to(x, 1, lk_pad) for x in (k, v))
    lse2, delta = pad_to(lse2, 2, lq_pad, jnp.inf), pad_to(delta, 2, lq_pad)
    dt, s, bq = q.dtype, tiles.stages, tiles.bq
    params = plgpu.CompilerParams(approx_math=True)
    interp = interpret_params() if interpret else None
    seg = geo.has_segments
    dkv_scratch, dq_scratch = scratch_types(dt, d, tiles, seg)
    if seg:
        q_seg, kv_seg = pad_ids(q_seg, lq_pad), pad_ids(kv_seg, lk_pad)

    def args(rows, cols, block: int):
        """A kernel's inputs; with segment ids also the ids and the ``segment_tile_ranges`` of
        the ``rows`` ids' 128-row (CTA) and 64-row (consumer: tile * 2 + wg) tiles against
        the ``cols`` ids' ``block``-row tiles."""
        inputs = (q, k, v, do, lse2, delta)
        if not seg:
            return inputs
        ranges = (segment_tile_ranges(rows, cols, n, block) for n in (TILE, ROWS))
        return (*inputs, q_seg, kv_seg, *ranges)

    geo_kv = dataclasses.replace(geo, bq=bq, bk=TILE)
    dkv_group = heads_per_wave(geo_kv.nk, b * hk, geo_kv.wave)
    dkv_kernel = functools.partial(
        _dkv_kernel,
        geo=geo_kv,
        stages=s,
        group=dkv_group,
        interpret=interpret,
        fused=tiles.fused_dq,
    )
    dkv_launch = dict(grid=(geo_kv.nk * b * hk,), grid_names=("p",))
    dkv_out = (jax.ShapeDtypeStruct(k.shape, dt),) * 2
    dkv_args = args(kv_seg, q_seg, bq)
    if tiles.fused_dq:
        mesh = plgpu.Mesh(num_threads=CONSUMERS + 1, thread_name="wg", **dkv_launch)
        # plgpu.kernel cannot take a Ref operand (jax 0.10.2 and 0.11: its vmap wrapper), so the
        # kernel mutates GMEM refs under pl.core_map, as jax's own TMA-reduction test does (the
        # inputs are copied into refs); the scratch is allocated once for all warpgroups.
        gmem = lambda x: jax.new_ref(x, memory_space=plgpu.GMEM)
        # dK and dV in one ref [2, ...]: as two refs of zeros they came back as one buffer on an
        # H200 (jax 0.11.2, with segment ids: dK exactly equal to dV; the interpreter was right)
        refs = [gmem(x) for x in dkv_args]
        # interpret mode has no TMA reduce-add, and its race detector orders no two CTAs:
        # there each KV tile adds into its own dQ partial [nk, ...], summed here
        dq_shape = (geo_kv.nk, *q.shape) if interpret else q.shape
        refs += [gmem(jnp.zeros(dq_shape, jnp.float32)), gmem(jnp.zeros((2, *k.shape), dt))]

        @pl.core_map(mesh, compiler_params=params, interpret=interp)
        def _():
            kernel = functools.partial(dkv_kernel, *refs)
            pl.run_scoped(kernel, *dkv_scratch, collective_axes="wg")

        dq_acc, (dk, dv) = (jax.freeze(r) for r in refs[-2:])
        dq = ((dq_acc.sum(0) if interpret else dq_acc) * geo.scale).astype(dt)
        return dq[:, :lq], dk[:, :lk], dv[:, :lk]

    launch = dict(num_threads=CONSUMERS + 1, thread_name="wg", compiler_params=params,
                  interpret=interp)  # fmt: skip
    dk, dv = plgpu.kernel(
        dkv_kernel,
        out_type=dkv_out,
        scratch_types=dkv_scratch,
        kernel_name="flash_bwd_dkv",
        **dkv_launch,
        **launch,
    )(*dkv_args)
    geo_q = dataclasses.replace(geo, bq=TILE, bk=tiles.bk)
    dq_group = heads_per_wave(geo_q.nq, b * h, geo_q.wave)
    dq = plgpu.kernel(
        functools.partial(_dq_kernel, geo=geo_q, stages=s, group=dq_group, interpret=interpret),
        out_type=jax.ShapeDtypeStruct(q.shape, dt),
        scratch_types=dq_scratch,
        grid=(geo_q.nq * b * h,),
        grid_names=("p",),
        kernel_name="flash_bwd_dq",
        **launch,
    )(*args(q_seg, kv_seg, tiles.bk))
    return dq[:, :lq], dk[:, :lk], dv[:, :lk]
