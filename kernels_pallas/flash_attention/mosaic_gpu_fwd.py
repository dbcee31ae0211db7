"""Hopper flash-attention forward in Pallas Mosaic GPU (FlashAttention-3 style).

FlashAttention-3 (Shah et al. 2024), sec. 3.1: a CTA computes 128-row query tiles with three
warpgroups with specialised roles. A producer warpgroup streams the KV tiles through a ring of
``stages`` shared-memory buffers with TMA, each buffer guarded by a "ready" mbarrier (TMA
transaction count) and a "consumed" mbarrier (both consumers arrived); two consumer
warpgroups each own 64 query rows (one wgmma M), compute ``S = Q K^T`` and ``O += P V`` with
wgmma (float32 accumulators in registers, ``P`` cast to the input dtype) and run the online
softmax in registers (FlashAttention-2, alg. 1, base-2 logits as in ``_common``). Options
(``tuning.MOSAIC_TABLE``): the consumers' pingpong schedule on the tensor cores (FA-3 sec. 3.2;
on for D=128); see ``_forward_kernel``.

KV tiles outside a warpgroup's causal / sliding-window range are skipped (``kv_block_range``
per warpgroup; the producer loads the union of the two ranges, a warpgroup only waits on and
releases the buffers of tiles it skips); only boundary tiles are masked -- with segment ids
also the tiles that cross a document, by id equality (see ``_forward_kernel``). The
outputs are ``o`` and the base-2 log-sum-exp ``lse2 [batch, heads, q_len]``, exactly what the
backward kernels consume (Triton ``triton_bwd.py``, Mosaic GPU ``mosaic_gpu_bwd.py``). Lengths
are padded by the caller (query to 128 rows, KV to the tile); padded keys are masked, padded
query rows sliced off.

Interpret mode (CPU tests) runs the same kernel -- TMA copies, barriers, warp specialisation,
masks, softmax, epilogue -- except the two matrix products: the Mosaic GPU interpreter cannot
read a transposed shared-memory operand or a register left operand of ``wgmma``, so there
they are ``jnp`` dot products of the same operands (same dtypes, float32 accumulation).
"""

from __future__ import annotations

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
    WGMMA_TRANSFORMS,
    check_call,
    interpret_params,
    iota,
    mma,
    nested,
    same_segment,
    smem_footprint,
    tile_ranges,
    vector,
    wgmma_operands,
)
from kernels_pallas.flash_attention._common import (
    LOG2_E,
    Geometry,
    dot_nt,
    finalize,
    kv_block_range,
    softmax_tile,
    tile_mask,
    work_item,
)
from kernels_pallas.flash_attention.tuning import BlockSizes, heads_per_wave

TILE_Q = ROWS * CONSUMERS  # query rows per CTA
KV_TILES = (64, 128)
# registers per thread after setmaxnreg (FA-3 sec. 3.1): 2 x 232 + 40 = 3 x _hopper.LAUNCH_REGS
CONSUMER_REGS, PRODUCER_REGS = 232, 40


def check_supported(dtype, head_dim: int, has_segments: bool, blocks: BlockSizes) -> None:
    """Raise ``ValueError`` naming what this forward does not support (before compiling)."""
    check_call(dtype, head_dim, "lowering='mosaic'")
    if blocks.bq != TILE_Q:
        raise ValueError(f"lowering='mosaic': query tile bq must be {TILE_Q}, got {blocks.bq}")
    if blocks.bk not in KV_TILES:
        raise ValueError(
            f"lowering='mosaic': KV tile bk must be one of {KV_TILES}, got {blocks.bk}"
        )
    need = smem_bytes(dtype, head_dim, blocks, has_segments)
    if need > SMEM_BYTES:
        raise ValueError(
            f"lowering='mosaic': bk={blocks.bk}, stages={blocks.stages} need {need} B of shared "
            f"memory > {SMEM_BYTES}"
        )


def scratch_types(dtype, head_dim: int, bk: int, stages: int, segments: bool) -> tuple:
    """The kernel's scratch: Q/O tiles, K and V rings, the lse rows (and with segment ids the
    query rows' ids and a ring of the KV tiles' ids, int32), their barriers."""
    mat = lambda rows: plgpu.SMEM((*rows, head_dim), dtype, transforms=WGMMA_TRANSFORMS)
    seg_smem = (plgpu.SMEM((CONSUMERS, ROWS), jnp.int32), plgpu.SMEM((stages, bk), jnp.int32))
    seg_ready = (plgpu.Barrier(num_barriers=CONSUMERS), plgpu.Barrier(num_barriers=stages))
    return (
        (
            mat((CONSUMERS, ROWS)),  # Q, then O
            mat((stages, bk)),  # K ring
            mat((stages, bk)),  # V ring
            plgpu.SMEM((CONSUMERS, ROWS), jnp.float32),
            *(seg_smem if segments else ()),
        ),
        (
            plgpu.Barrier(num_barriers=CONSUMERS),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            *(seg_ready if segments else ()),
        ),
        (plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),) * 2,
        plgpu.Barrier(num_arrivals=CONSUMERS),
    )


def smem_bytes(dtype, head_dim: int, blocks: BlockSizes, segments: bool = False) -> int:
    """Shared memory of one CTA, as Mosaic GPU allocates it."""
    return smem_footprint(scratch_types(dtype, head_dim, blocks.bk, blocks.stages, segments))


def _rows_layout(x, interpret: bool):
    """``x [rows]`` in the layout of a wgmma accumulator's row reductions (loop carries)."""
    return x if interpret else plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(1))


def _acc_layout(x, interpret: bool):
    return x if interpret else plgpu.layout_cast(x, plgpu.Layout.WGMMA)


def _qk(q_smem, k_smem, interpret: bool, issued):
    """``S = Q K^T`` float32 ``[rows, bk]`` from shared ``q [rows, d]``, ``k [bk, d]``;
    ``issued()`` runs between issuing the (asynchronous) wgmma and reading its result."""
    if interpret:
        s = dot_nt(q_smem[...], k_smem[...])
        issued()
        return s

    def issue(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem, (1, 0)))
        issued()
        return acc_ref[...]

    return pl.run_scoped(issue, plgpu.ACC((q_smem.shape[0], k_smem.shape[0]), jnp.float32))


def _forward_kernel(*refs, geo, stages, pingpong, programs, group, interpret):
    """Program ``p`` computes the work items ``p, p + programs, ...`` (``forward`` launches one
    program per item), each
    128 query rows of one (batch, head), in ``work_item`` order over groups of ``group``
    (batch, head)s: heaviest causal tiles first.
    Refs are ``[b, len, heads, d]`` in GMEM. The KV ring runs on across items (a global step
    count picks the slot), so the producer prefetches the next item's tiles while the
    consumers finish the current one.

    With ``pingpong`` the consumers take turns on the tensor cores (FA-3 sec. 3.2): the
    ``turn`` barrier (both consumers arrive) is passed twice per KV step -- after issuing
    ``Q K^T`` and before issuing ``P V`` -- and consumer 1 starts one phase late, so one
    warpgroup's softmax overlaps the other's matrix products.

    With segment ids (``geo.has_segments``; int32, padded with each row's last id) the
    KV range is cut to the documents of the 128-row tile and runs unmasked over the tiles
    inside its one document (its row of ``segment_tile_ranges``, read from GMEM); the consumer
    loads its rows' ids once per item, the producer streams each KV tile's ids beside K
    (released with K's slot), and masked tiles also compare ids.
    """
    seg = geo.has_segments
    if seg:  # int32 ids and the 128-row tiles' rows of segment_tile_ranges (GMEM)
        q_ref, k_ref, v_ref, qseg_ref, kseg_ref, rng_ref, o_ref, lse_ref, *refs = refs
        smem, ready, free, turn = refs
        (q_smem, k_smem, v_smem, lse_smem, qseg_smem, kseg_smem) = smem
        (q_ready, k_ready, v_ready, qseg_ready, kseg_ready) = ready
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref, smem, ready, free, turn = refs
        (q_smem, k_smem, v_smem, lse_smem), (q_ready, k_ready, v_ready) = smem, ready
    k_free, v_free = free
    bk = geo.bk
    b, h = q_ref.shape[0], q_ref.shape[2]
    wg = lax.axis_index("wg")
    pid = lax.axis_index("p")
    n_items = geo.nq * b * h
    count = lax.div(n_items - 1 - pid, jnp.int32(programs)) + 1  # items of this program

    def item(k):
        """(first query row, batch, head, KV tiles [lo, hi) of the 128 rows, their row of
        ``segment_tile_ranges`` or None) of item k."""
        tile, batch, head = work_item(pid + k * programs, geo.nq, b, h, group, last_first=True)
        tile_first = tile * TILE_Q
        ranges = tile_ranges(rng_ref, batch, tile) if seg else None
        lo, _, _, hi = kv_block_range(tile_first, tile_first + TILE_Q - 1, geo, ranges)
        return tile_first, batch, head, lo, hi, ranges

    def slot_of(g):  # global KV step -> ring slot
        return lax.rem(g, jnp.int32(stages))

    @pl.when(wg == CONSUMERS)
    def _producer():
        plgpu.set_max_registers(PRODUCER_REGS, action="decrease")
        operands = ((k_ref, k_smem, k_ready, k_free), (v_ref, v_smem, v_ready, v_free))

        def produce(k, base):
            _, batch, head, lo, hi, _ = item(k)
            rows = lambda step: (batch, pl.ds(step * bk, bk), lax.div(head, jnp.int32(geo.groups)))  # noqa: E731

            @pl.loop(lo, hi)
            def _(step):
                g = base + step - lo
                for ref, buf, ready, free in operands:  # K and V separately: K is freed first
                    # wait for both consumers to release the slot's previous tile
                    pl.when(g >= stages)(lambda free=free: plgpu.barrier_wait(free.at[slot_of(g)]))
                    plgpu.copy_gmem_to_smem(ref.at[rows(step)], buf.at[slot_of(g)],
                                            ready.at[slot_of(g)])  # fmt: skip
                    if seg and ref is k_ref:  # the tile's ids, in K's slot
                        plgpu.copy_gmem_to_smem(kseg_ref.at[batch, pl.ds(step * bk, bk)],
                                                kseg_smem.at[slot_of(g)],
                                                kseg_ready.at[slot_of(g)])  # fmt: skip

            return base + hi - lo

        total = lax.fori_loop(0, count, produce, jnp.int32(0))

        @pl.loop(jnp.maximum(0, total - stages), total)
        def _(g):  # observe the last releases too (the interpreter checks every phase)
            for *_, free in operands:
                plgpu.barrier_wait(free.at[slot_of(g)])

    @pl.when(wg < CONSUMERS)
    def _consumer():
        plgpu.set_max_registers(CONSUMER_REGS, action="increase")
        q_slot = q_smem.at[wg]

        def pass_turn():
            if pingpong:
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(turn)

        def end_softmax(slot):  # hand over the tensor cores, wait for V and our turn
            if pingpong:
                plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(v_ready.at[slot])
            if pingpong:
                plgpu.barrier_wait(turn)

        def consume(k, base):
            tile_first, batch, head, lo, hi, ranges = item(k)
            q_first = tile_first + wg * ROWS
            plgpu.copy_gmem_to_smem(
                q_ref.at[batch, pl.ds(q_first, ROWS), head], q_slot, q_ready.at[wg]
            )
            plgpu.barrier_wait(q_ready.at[wg])
            q_seg = None
            if seg:
                plgpu.copy_gmem_to_smem(qseg_ref.at[batch, pl.ds(q_first, ROWS)],
                                        qseg_smem.at[wg], qseg_ready.at[wg])  # fmt: skip
                plgpu.barrier_wait(qseg_ready.at[wg])
                q_seg = vector(qseg_smem.at[wg], 0, interpret)
            own_lo, full_lo, full_hi, own_hi = nested(
                lo, hi, *kv_block_range(q_first, q_first + ROWS - 1, geo, ranges)
            )

            def skip(step, carry):  # another warpgroup's tile: keep the barrier phases in step
                slot = slot_of(base + step - lo)
                plgpu.barrier_wait(k_ready.at[slot])
                if seg:
                    plgpu.barrier_wait(kseg_ready.at[slot])
                pass_turn()
                plgpu.barrier_arrive(k_free.at[slot])
                end_softmax(slot)
                plgpu.barrier_arrive(v_free.at[slot])
                return carry

            def attend(step, carry, masked: bool):
                m, row_sum, acc = carry
                slot = slot_of(base + step - lo)
                plgpu.barrier_wait(k_ready.at[slot])
                (k_slot,) = wgmma_operands((k_smem.at[slot],), interpret)
                same = None
                if seg:  # read before K's slot (which holds the ids) is released
                    plgpu.barrier_wait(kseg_ready.at[slot])
                    if masked:  # whole tiles (one document) need no ids
                        k_seg = vector(kseg_smem.at[slot], 1, interpret)
                        same = same_segment(q_seg, k_seg, (ROWS, bk), query_dim=0)
                s2 = _qk(q_slot, k_slot, interpret, pass_turn) * geo.scale2
                if seg and masked:  # the ids' loads, before TMA refills the slot
                    plgpu.commit_smem()
                plgpu.barrier_arrive(k_free.at[slot])
                mask = None
                if masked:  # indices built here, not kept live across the loop (registers)
                    q_idx = q_first + iota((ROWS, bk), 0, interpret)
                    k_idx = step * bk + iota((ROWS, bk), 1, interpret)
                    mask = tile_mask(q_idx, k_idx, None, None, geo)
                    if seg:
                        mask = mask & same
                m, row_sum, alpha, p = softmax_tile(s2, m, row_sum, mask)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, (0,))
                p = p.astype(q_ref.dtype)
                if pingpong:  # finish the softmax before handing over the tensor cores
                    m, row_sum, acc, p = lax.optimization_barrier((m, row_sum, acc, p))
                end_softmax(slot)
                (v_slot,) = wgmma_operands((v_smem.at[slot],), interpret)
                (acc,) = mma(((acc, [(p, v_slot)]),), interpret)  # acc + P V
                plgpu.barrier_arrive(v_free.at[slot])
                return m, row_sum, acc

            d = q_ref.shape[-1]
            carry = (
                _rows_layout(jnp.full((ROWS,), -jnp.inf, jnp.float32), interpret),
                _rows_layout(jnp.full((ROWS,), 0.0, jnp.float32), interpret),
                _acc_layout(jnp.full((ROWS, d), 0.0, jnp.float32), interpret),
            )
            lax.fori_loop(lo, own_lo, skip, None)
            carry = lax.fori_loop(own_lo, full_lo, functools.partial(attend, masked=True), carry)
            carry = lax.fori_loop(full_lo, full_hi, functools.partial(attend, masked=False), carry)
            carry = lax.fori_loop(full_hi, own_hi, functools.partial(attend, masked=True), carry)
            lax.fori_loop(own_hi, hi, skip, None)

            # Mosaic GPU has no log2: log2(x) = ln(x) * log2(e)
            out, lse2 = finalize(*carry, log2=lambda x: jnp.log(x) * LOG2_E)
            q_slot[...] = out.astype(q_ref.dtype)  # Q is no longer needed: stage O in its buffer
            lse_smem.at[wg][...] = lse2
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_slot, o_ref.at[batch, pl.ds(q_first, ROWS), head])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[batch, head, pl.ds(q_first, ROWS)])
            # the next item's Q load and epilogue reuse these buffers
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            return base + hi - lo

        pl.when(wg == 1)(pass_turn)  # consumer 1 starts one phase late
        lax.fori_loop(0, count, consume, jnp.int32(0))
        pl.when(wg == 0)(pass_turn)  # ... and consumer 0 ends one phase late
        plgpu.wait_smem_to_gmem(0)


def forward(
    q,
    k,
    v,
    geo: Geometry,
    stages: int,
    interpret: bool,
    pingpong: bool = False,
    q_seg=None,
    kv_seg=None,
    ranges=None,
):
    """Padded ``q [b, Lq, h, d]``, ``k/v [b, Lk, hk, d]`` (``geo.bq`` = 128 query and ``geo.bk``
    KV rows per tile, ``stages`` KV buffers); returns ``(o [b, Lq, h, d], lse2 [b, h, Lq]``
    float32); rows past ``geo.nq`` tiles are left unwritten; one CTA per work item (persistent
    CTAs were slower: ``experiments/results/bench_attention_variants.md``); ``pingpong``: see
    ``_forward_kernel``; ``q_seg [b, Lq]``, ``kv_seg [b, Lk]``: int32 segment ids (with
    ``geo.has_segments``) and ``ranges``: ``segment_tile_ranges`` of the 128-row query tiles
    against ``geo.bk``-row KV tiles."""
    b, lq, h, d = q.shape
    bk = geo.bk
    seg = geo.has_segments
    scratch = scratch_types(q.dtype, d, bk, stages, seg)
    programs = geo.nq * b * h
    kernel = functools.partial(
        _forward_kernel,
        geo=geo,
        stages=stages,
        pingpong=pingpong,
        programs=programs,
        group=heads_per_wave(geo.nq, b * h, geo.wave),
        interpret=interpret,
    )
    return plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, h, lq), jnp.float32),
        ),
        scratch_types=scratch,
        grid=(programs,),
        grid_names=("p",),
        num_threads=CONSUMERS + 1,
        thread_name="wg",
        kernel_name="flash_fwd",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params() if interpret else None,
    )(q, k, v, *((q_seg, kv_seg, ranges) if seg else ()))
