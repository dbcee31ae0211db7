"""TPU flash attention in Pallas (Mosaic TPU): forward (the backward is ``mosaic_tpu_bwd.py``;
the helpers here are shared with it).

Heads-major layout ``[batch, heads, len, head_dim]`` so tiles are ``[len tile, head_dim]``.
The grid carries the KV (or q) tile as its last, sequential ("arbitrary") axis and the
running softmax state lives in VMEM scratch (FlashAttention-2, Dao 2023, alg. 1/2).
Fully masked tiles are skipped twice over: their compute is guarded by ``pl.when`` and their
index map is clamped into the visible range, so the pipeline re-uses the resident block
instead of DMA-ing a new one. With segment ids, per-tile min/max ids are scalar-prefetched to
SMEM and tiles with disjoint id ranges are skipped too. Tested in interpret mode on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.flash_attention._common import (
    Geometry,
    dot_nt,
    finalize,
    kv_block_range,
    online_softmax_step,
    segment_block_bounds,
    tile_mask,
)
from kernels_pallas.flash_attention.tuning import BlockSizes

SEMANTICS = pltpu.CompilerParams(
    dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
)


def clamped(x, lo, hi, n):
    """Clamp a tile index into ``[lo, hi)`` (and ``[0, n)``) so skipped steps re-use a block."""
    return jnp.minimum(jnp.minimum(jnp.maximum(x, lo), jnp.maximum(hi - 1, lo)), n - 1)


def split_refs(refs, n_in: int, has_segments: bool):
    """(segment tile bounds or None, input refs, remaining refs)."""
    if has_segments:
        return refs[:4], refs[4 : 4 + n_in], refs[4 + n_in :]
    return None, refs[:n_in], refs[n_in:]


def tiles_overlap(bounds, b, i, j):
    q_min, q_max, k_min, k_max = bounds
    return (q_min[b, i] <= k_max[b, j]) & (k_min[b, j] <= q_max[b, i])


def seg_prefetch(q_seg, kv_seg, bq: int, bk: int):
    return [*segment_block_bounds(q_seg, bq), *segment_block_bounds(kv_seg, bk)]


def tile_mask_at(i, j, seg_refs, geo: Geometry) -> jax.Array:
    """Mask of q tile ``i`` x KV tile ``j`` (causal, window, segments from ``seg_refs``, the
    q and KV segment-id refs when ``geo.has_segments``)."""
    q_idx = i * geo.bq + jax.lax.broadcasted_iota(jnp.int32, (geo.bq, 1), 0)
    k_idx = j * geo.bk + jax.lax.broadcasted_iota(jnp.int32, (1, geo.bk), 1)
    q_seg, k_seg = (r[...] for r in seg_refs) if geo.has_segments else (None, None)
    return tile_mask(q_idx, k_idx, q_seg, k_seg, geo)


def visibility(step, bounds, seg_bounds, b, i, j):
    """``(live, full)`` of the grid's sequential ``step`` against its tile range ``bounds =
    (lo, full_lo, full_hi, hi)``: whether tile pair (i, j) is seen at all (and, with segments,
    their id ranges overlap), and whether it is seen whole (no mask)."""
    lo, full_lo, full_hi, hi = bounds
    live = (step >= lo) & (step < hi)
    if seg_bounds is not None:
        live = live & tiles_overlap(seg_bounds, b, i, j)
    return live, (step >= full_lo) & (step < full_hi)


def _fwd_kernel(*refs, geo: Geometry):
    n_in = 5 if geo.has_segments else 3
    seg_bounds, ins, (o_ref, lse_ref, m_sc, l_sc, acc_sc) = split_refs(refs, n_in, geo.has_segments)
    q_ref, k_ref, v_ref = ins[:3]
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    bounds = kv_block_range(i * geo.bq, i * geo.bq + geo.bq - 1, geo)
    live, full = visibility(j, bounds, seg_bounds, b, i, j)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def tile(masked: bool):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s2 = dot_nt(q, k) * geo.scale2
        mask = tile_mask_at(i, j, ins[3:5], geo) if masked else None
        m, row_sum, acc = online_softmax_step(
            s2, v, m_sc[...][:, 0], l_sc[...][:, 0], acc_sc[...], mask
        )
        m_sc[...], l_sc[...], acc_sc[...] = m[:, None], row_sum[:, None], acc

    pl.when(live & full)(lambda: tile(False))
    pl.when(live & ~full)(lambda: tile(True))

    @pl.when(j == geo.nk - 1)
    def _finish():
        out, lse2 = finalize(m_sc[...][:, 0], l_sc[...][:, 0], acc_sc[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse2[:, None]


def heads_major(*xs):
    return [rearrange(x, "b l h d -> b h l d") for x in xs]


def seg_specs(geo: Geometry, q_tile, kv_tile):
    """BlockSpecs of q ids ``[b, Lq, 1]`` and kv ids ``[b, 1, Lk]`` given tile index fns."""
    return [
        pl.BlockSpec((None, geo.bq, 1), lambda b, h, x, y, *_: (b, q_tile(x, y, *_), 0)),
        pl.BlockSpec((None, 1, geo.bk), lambda b, h, x, y, *_: (b, 0, kv_tile(x, y, *_))),
    ]


def forward(q, k, v, q_seg, kv_seg, geo: Geometry, bs: BlockSizes, interpret: bool):
    """Padded ``[b, L, h, d]`` inputs; returns ``(o [b, Lq, h, d], lse2 [b, h, Lq])``."""
    b, lq, h, d = q.shape
    bq, bk, g = geo.bq, geo.bk, geo.groups
    qh, kh, vh = heads_major(q, k, v)

    def kv_tile(i, j, *_):
        lo, _, _, hi = kv_block_range(i * bq, i * bq + bq - 1, geo)
        return clamped(j, lo, hi, geo.nk)

    in_specs = [
        pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j, *_: (b_, h_, i, 0)),
        pl.BlockSpec(
            (None, None, bk, d), lambda b_, h_, i, j, *_: (b_, lax.div(h_, g), kv_tile(i, j), 0)
        ),
        pl.BlockSpec(
            (None, None, bk, d), lambda b_, h_, i, j, *_: (b_, lax.div(h_, g), kv_tile(i, j), 0)
        ),
    ]
    args, prefetch = [qh, kh, vh], []
    if geo.has_segments:
        in_specs += seg_specs(geo, lambda i, j, *_: i, kv_tile)
        args += [q_seg[:, :, None], kv_seg[:, None, :]]
        prefetch = seg_prefetch(q_seg, kv_seg, bq, bk)
    out, lse2 = pl.pallas_call(
        functools.partial(_fwd_kernel, geo=geo),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(b, h, geo.nq, geo.nk),
            in_specs=in_specs,
            out_specs=[
                pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j, *_: (b_, h_, i, 0)),
                pl.BlockSpec((None, None, bq, 1), lambda b_, h_, i, j, *_: (b_, h_, i, 0)),
            ],
            scratch_shapes=[
                pltpu.VMEM((bq, 1), jnp.float32),
                pltpu.VMEM((bq, 1), jnp.float32),
                pltpu.VMEM((bq, d), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((b, h, lq, d), q.dtype),
            jax.ShapeDtypeStruct((b, h, lq, 1), jnp.float32),
        ],
        compiler_params=SEMANTICS,
        interpret=interpret,
        name="arjax_flash_fwd_tpu",
    )(*prefetch, *args)
    return rearrange(out, "b h l d -> b l h d"), lse2[..., 0]
