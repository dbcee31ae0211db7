"""GPU flash attention in Pallas (Triton lowering): forward and split-KV decode (the backward
is ``triton_bwd.py``; the helpers here are shared with it).

Layout is arjax's native ``[batch, len, heads, head_dim]`` (no transposes); head_dim is padded
to a power of two >= 16 and lengths to tile multiples by the caller (``__init__.py``).

* forward: one program per (q tile, batch, head), each streaming its visible KV tiles
  (FlashAttention-2, Dao 2023, alg. 1) in three loops -- masked edge, unmasked interior,
  masked edge -- so only boundary tiles pay for the mask and fully masked tiles are skipped.
  With segment ids the loop runs only over the tiles between the first and the last key of the
  tile's segments (``segment_tile_ranges``: a packed document's own tiles); those inside one
  document with the tile take the unmasked path, the others are tested for segment overlap
  and skipped when disjoint.
* backward: FA-2 alg. 2 split in two kernels, dK/dV (a program per KV tile, loop over q tiles)
  and dQ (a program per q tile, loop over KV tiles), both with the same tile skipping.
* decode: flash-decoding (Dao et al. 2023): the group of query heads sharing a KV head and
  the few query tokens are packed into the rows of one tile, the KV length is split across
  programs, and the partial results are merged by log-sum-exp.

The forward and backward grids are 1-D, in ``_common.work_item`` order: heaviest causal tiles
first over groups of heads (``tuning.heads_per_wave``; ``Geometry.wave``), as the Hopper kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.flash_attention._common import (
    Geometry,
    dot_nt,
    finalize,
    kv_block_range,
    online_softmax_step,
    segment_tile_ranges,
    tile_mask,
    work_item,
)
from kernels_pallas.flash_attention.tuning import BlockSizes, heads_per_wave


def compiler_params(bs: BlockSizes, bwd: bool = False) -> plgpu.CompilerParams:
    if bwd:
        return plgpu.CompilerParams(num_warps=bs.bwd_warps, num_stages=bs.bwd_stages)
    return plgpu.CompilerParams(num_warps=bs.warps, num_stages=bs.stages)


def launch_order(tiles: int, b: int, h: int, last_first: bool, wave: int | None):
    """A 1-D grid of ``tiles * b * h`` programs in ``work_item`` order, whose heaviest causal
    tile is the last one (``last_first``: query tiles) or the first (KV tiles). Returns
    ``where(p) -> (tile, batch, head)`` and ``spec(block_shape, index_map)``: a BlockSpec whose
    ``index_map(tile, batch, head)`` is called with ``where(p)``."""
    group = heads_per_wave(tiles, b * h, wave)
    where = lambda p: work_item(p, tiles, b, h, group, last_first)  # noqa: E731

    def spec(block_shape, index_map) -> pl.BlockSpec:
        return pl.BlockSpec(block_shape, lambda p: index_map(*where(p)))

    return where, spec


def segments_overlap(q_seg, k_seg):
    """Can tiles of segment ids ``q_seg [rows, 1]``, ``k_seg [1, cols]`` share a segment?
    Conservative min/max range test (exact for sorted, packed documents)."""
    q_seg, k_seg = q_seg[:, 0], k_seg[0, :]
    return (jnp.min(q_seg) <= jnp.max(k_seg)) & (jnp.min(k_seg) <= jnp.max(q_seg))


def tile_segments(rng_ref):
    """This tile's row of ``segment_tile_ranges`` (4 ints), or None without segment ids."""
    return None if rng_ref is None else tuple(rng_ref[i] for i in range(4))


def _stream_kv(q, q_idx, q_seg, k_ref, v_ref, kseg_ref, bounds, geo: Geometry):
    """Online softmax of one query tile ``q [rows, dim]`` over KV tiles ``bounds`` (4 ints).

    ``q_idx [rows, 1]`` are the query indices (positions minus offset), ``q_seg [rows, 1]``
    their segment ids or None. Returns float32 ``(m [rows], l [rows], acc [rows, dim])``.
    """
    lo, full_lo, full_hi, hi = bounds
    rows, dim = q.shape
    bk = geo.bk

    def step(j, carry, masked):
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        s2 = dot_nt(q, k) * geo.scale2
        if not masked:
            return online_softmax_step(s2, v, *carry, None)
        k_seg = None if kseg_ref is None else kseg_ref[pl.ds(start, bk)][None, :]
        k_idx = start + jnp.arange(bk, dtype=jnp.int32)[None, :]
        return online_softmax_step(s2, v, *carry, tile_mask(q_idx, k_idx, q_seg, k_seg, geo))

    def masked_step(j, carry):
        if kseg_ref is None:
            return step(j, carry, True)
        k_seg = kseg_ref[pl.ds(pl.multiple_of(j * bk, bk), bk)][None, :]
        return lax.cond(
            segments_overlap(q_seg, k_seg), lambda c: step(j, c, True), lambda c: c, carry
        )

    carry = (
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, dim), jnp.float32),
    )
    carry = lax.fori_loop(lo, full_lo, masked_step, carry)
    carry = lax.fori_loop(full_lo, full_hi, lambda j, c: step(j, c, False), carry)
    return lax.fori_loop(full_hi, hi, masked_step, carry)


def _fwd_kernel(*refs, geo: Geometry, where):
    if geo.has_segments:
        q_ref, k_ref, v_ref, qseg_ref, kseg_ref, rng_ref, o_ref, lse_ref = refs
    else:
        (q_ref, k_ref, v_ref, o_ref, lse_ref), qseg_ref, kseg_ref, rng_ref = refs, None, None, None
    q_first = where(pl.program_id(0))[0] * geo.bq
    q_idx = q_first + jnp.arange(geo.bq, dtype=jnp.int32)[:, None]
    q_seg = None if qseg_ref is None else qseg_ref[...][:, None]
    bounds = kv_block_range(q_first, q_first + geo.bq - 1, geo, tile_segments(rng_ref))
    m, row_sum, acc = _stream_kv(q_ref[...], q_idx, q_seg, k_ref, v_ref, kseg_ref, bounds, geo)
    out, lse2 = finalize(m, row_sum, acc)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse2


def forward(q, k, v, q_seg, kv_seg, geo: Geometry, bs: BlockSizes, interpret: bool):
    """Padded ``q [b, Lq, h, d]``, ``k/v [b, Lk, hk, d]``; returns ``(o, lse2 [b, h, Lq])``."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    g, nq = geo.groups, geo.nq
    where, spec = launch_order(nq, b, h, last_first=True, wave=geo.wave)
    in_specs = [
        spec((None, geo.bq, None, d), lambda i, b_, h_: (b_, i, h_, 0)),
        spec((None, lk, None, d), lambda i, b_, h_: (b_, 0, h_ // g, 0)),
        spec((None, lk, None, d), lambda i, b_, h_: (b_, 0, h_ // g, 0)),
    ]
    args = [q, k, v]
    if geo.has_segments:
        in_specs += [
            spec((None, geo.bq), lambda i, b_, h_: (b_, i)),
            spec((None, lk), lambda i, b_, h_: (b_, 0)),
            spec((None, 4), lambda i, b_, h_: (b_, i)),
        ]
        args += [q_seg, kv_seg, segment_tile_ranges(q_seg, kv_seg, geo.bq, geo.bk)]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, geo=geo, where=where),
        grid=(nq * b * h,),
        in_specs=in_specs,
        out_specs=[
            spec((None, geo.bq, None, d), lambda i, b_, h_: (b_, i, h_, 0)),
            spec((None, None, geo.bq), lambda i, b_, h_: (b_, h_, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, h, lq), jnp.float32),
        ],
        compiler_params=compiler_params(bs),
        interpret=interpret,
        name="arjax_flash_fwd",
    )(*args)


def _decode_kernel(*refs, geo: Geometry, q_tokens: int, split_tiles: int):
    if geo.has_segments:
        q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref = refs
    else:
        (q_ref, k_ref, v_ref, o_ref, lse_ref), qseg_ref, kseg_ref = refs, None, None
    rows = q_ref.shape[0]
    # rows are (group head, query token) pairs; the token index is row % q_tokens
    q_idx = lax.rem(jnp.arange(rows, dtype=jnp.int32), jnp.int32(q_tokens))[:, None]
    q_seg = None if qseg_ref is None else qseg_ref[...][:, None]
    lo, full_lo, full_hi, hi = kv_block_range(0, q_tokens - 1, geo)
    s_lo = pl.program_id(0) * split_tiles
    s_hi = s_lo + split_tiles
    clip = lambda x: jnp.minimum(jnp.maximum(x, s_lo), s_hi)
    bounds = (clip(lo), clip(full_lo), clip(full_hi), clip(hi))
    m, row_sum, acc = _stream_kv(q_ref[...], q_idx, q_seg, k_ref, v_ref, kseg_ref, bounds, geo)
    out, lse2 = finalize(m, row_sum, acc)
    o_ref[...] = out
    lse_ref[...] = lse2


def decode(
    q_rows, k, v, qseg_rows, kv_seg, geo, q_tokens, splits, split_tiles, bs: BlockSizes, interpret
):
    """``q_rows [b, hk, rows, d]`` packed queries, ``k/v [b, Lk, hk, d]`` with ``Lk`` whole KV
    tiles; split ``s`` streams tiles ``[s * split_tiles, (s + 1) * split_tiles)`` of them (none
    when past the end). Returns per-split float32 ``o [b, hk, S, rows, d]``, ``lse2 [b, hk, S,
    rows]``."""
    b, hk, rows, d = q_rows.shape
    lk = k.shape[1]
    in_specs = [
        pl.BlockSpec((None, None, rows, d), lambda s, b_, h_: (b_, h_, 0, 0)),
        pl.BlockSpec((None, lk, None, d), lambda s, b_, h_: (b_, 0, h_, 0)),
        pl.BlockSpec((None, lk, None, d), lambda s, b_, h_: (b_, 0, h_, 0)),
    ]
    args = [q_rows, k, v]
    if geo.has_segments:
        in_specs += [
            pl.BlockSpec((None, rows), lambda s, b_, h_: (b_, 0)),
            pl.BlockSpec((None, lk), lambda s, b_, h_: (b_, 0)),
        ]
        args += [qseg_rows, kv_seg]
    return pl.pallas_call(
        functools.partial(_decode_kernel, geo=geo, q_tokens=q_tokens, split_tiles=split_tiles),
        grid=(splits, b, hk),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, None, rows, d), lambda s, b_, h_: (b_, h_, s, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda s, b_, h_: (b_, h_, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, hk, splits, rows, d), jnp.float32),
            jax.ShapeDtypeStruct((b, hk, splits, rows), jnp.float32),
        ],
        compiler_params=compiler_params(bs),
        interpret=interpret,
        name="arjax_flash_decode",
    )(*args)
