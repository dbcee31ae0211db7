"""GPU flash-attention backward in Pallas (Triton lowering): FA-2 alg. 2 split in two kernels,
dK/dV (a program per KV tile, loop over q tiles) and dQ (a program per q tile, loop over KV
tiles), with the forward's tile skipping and launch order (``triton_fwd.py``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.flash_attention._common import (
    Geometry,
    backward_tile,
    dot_nn,
    dot_tn,
    kv_block_range,
    q_block_range,
    segment_tile_ranges,
    tile_mask,
)
from kernels_pallas.flash_attention.triton_fwd import (
    compiler_params,
    launch_order,
    segments_overlap,
    tile_segments,
)
from kernels_pallas.flash_attention.tuning import BlockSizes


def _dq_kernel(*refs, geo: Geometry, where):
    """dQ of one query tile, streaming the KV tiles it sees."""
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), dq_ref = refs[:6], refs[-1]
    qseg_ref, kseg_ref, rng_ref = refs[6:9] if geo.has_segments else (None, None, None)
    bq, bk = geo.bq, geo.bk
    q_first = where(pl.program_id(0))[0] * bq
    q_idx = q_first + jnp.arange(bq, dtype=jnp.int32)[:, None]
    q_seg = None if qseg_ref is None else qseg_ref[...][:, None]
    q, do = q_ref[...], do_ref[...]
    lse2, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    lo, full_lo, full_hi, hi = kv_block_range(
        q_first, q_first + bq - 1, geo, tile_segments(rng_ref)
    )

    def step(j, dq, masked):
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        mask = None
        if masked:
            k_seg = None if kseg_ref is None else kseg_ref[pl.ds(start, bk)][None, :]
            k_idx = start + jnp.arange(bk, dtype=jnp.int32)[None, :]
            mask = tile_mask(q_idx, k_idx, q_seg, k_seg, geo)
        _, ds = backward_tile(q, k, v, do, lse2, delta, mask, geo)
        return dq + dot_nn(ds.astype(k.dtype), k)

    def masked_step(j, dq):
        if kseg_ref is None:
            return step(j, dq, True)
        k_seg = kseg_ref[pl.ds(pl.multiple_of(j * bk, bk), bk)][None, :]
        return lax.cond(segments_overlap(q_seg, k_seg), lambda c: step(j, c, True), lambda c: c, dq)

    dq = jnp.zeros(q.shape, jnp.float32)
    dq = lax.fori_loop(lo, full_lo, masked_step, dq)
    dq = lax.fori_loop(full_lo, full_hi, lambda j, c: step(j, c, False), dq)
    dq = lax.fori_loop(full_hi, hi, masked_step, dq)
    dq_ref[...] = (dq * geo.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, geo: Geometry, where):
    """dK, dV of one KV tile, streaming the q tiles that see it."""
    n_in = 6 + 3 * geo.has_segments
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), (dk_ref, dv_ref) = refs[:6], refs[n_in:]
    qseg_ref, kseg_ref, rng_ref = refs[6:9] if geo.has_segments else (None, None, None)
    bq, bk = geo.bq, geo.bk
    k_first = where(pl.program_id(0))[0] * bk
    k_idx = k_first + jnp.arange(bk, dtype=jnp.int32)[None, :]
    k_seg = None if kseg_ref is None else kseg_ref[...][None, :]
    k, v = k_ref[...], v_ref[...]
    lo, full_lo, full_hi, hi = q_block_range(k_first, k_first + bk - 1, geo, tile_segments(rng_ref))

    def step(i, carry, masked):
        dk, dv = carry
        start = pl.multiple_of(i * bq, bq)
        q = q_ref[pl.ds(start, bq), :]
        do = do_ref[pl.ds(start, bq), :]
        lse2 = lse_ref[pl.ds(start, bq)][:, None]
        delta = delta_ref[pl.ds(start, bq)][:, None]
        mask = None
        if masked:
            q_seg = None if qseg_ref is None else qseg_ref[pl.ds(start, bq)][:, None]
            q_idx = start + jnp.arange(bq, dtype=jnp.int32)[:, None]
            mask = tile_mask(q_idx, k_idx, q_seg, k_seg, geo)
        p, ds = backward_tile(q, k, v, do, lse2, delta, mask, geo)
        dv = dv + dot_tn(p.astype(do.dtype), do)
        dk = dk + dot_tn(ds.astype(q.dtype), q)
        return dk, dv

    def masked_step(i, carry):
        if qseg_ref is None:
            return step(i, carry, True)
        q_seg = qseg_ref[pl.ds(pl.multiple_of(i * bq, bq), bq)][:, None]
        return lax.cond(
            segments_overlap(q_seg, k_seg), lambda c: step(i, c, True), lambda c: c, carry
        )

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    carry = lax.fori_loop(lo, full_lo, masked_step, carry)
    carry = lax.fori_loop(full_lo, full_hi, lambda i, c: step(i, c, False), carry)
    dk, dv = lax.fori_loop(full_hi, hi, masked_step, carry)
    dk_ref[...] = (dk * geo.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, do, lse2, delta, q_seg, kv_seg, geo, bs: BlockSizes, interpret: bool):
    """Gradients for padded inputs; dk/dv come back per query head ``[b, Lk, h, d]``
    (float32 when heads share a KV head, to be summed over the group by the caller)."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    g = geo.groups
    geo_q = dataclasses.replace(geo, bq=bs.bwd_bq_dq, bk=bs.bwd_bk_dq)
    geo_k = dataclasses.replace(geo, bq=bs.bwd_bq_dkv, bk=bs.bwd_bk_dkv)
    seg_args, dq_args = [], []
    if geo.has_segments:
        seg_args = [q_seg, kv_seg]
        dq_args = [q_seg, kv_seg, segment_tile_ranges(q_seg, kv_seg, geo_q.bq, geo_q.bk)]

    # dQ: a program per q tile, streaming KV.
    bq = geo_q.bq
    where, spec = launch_order(geo_q.nq, b, h, last_first=True, wave=geo_q.wave)
    row = lambda i, b_, h_: (b_, i, h_, 0)
    kv_full = lambda i, b_, h_: (b_, 0, h_ // g, 0)
    seg_specs = (
        [
            spec((None, bq), lambda i, b_, h_: (b_, i)),
            spec((None, lk), lambda i, b_, h_: (b_, 0)),
            spec((None, 4), lambda i, b_, h_: (b_, i)),
        ]
        if geo.has_segments
        else []
    )
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, geo=geo_q, where=where),
        grid=(geo_q.nq * b * h,),
        in_specs=[
            spec((None, bq, None, d), row),
            spec((None, lk, None, d), kv_full),
            spec((None, lk, None, d), kv_full),
            spec((None, bq, None, d), row),
            spec((None, None, bq), lambda i, b_, h_: (b_, h_, i)),
            spec((None, None, bq), lambda i, b_, h_: (b_, h_, i)),
            *seg_specs,
        ],
        out_specs=spec((None, bq, None, d), row),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=compiler_params(bs, bwd=True),
        interpret=interpret,
        name="arjax_flash_dq",
    )(q, k, v, do, lse2, delta, *dq_args)

    dk, dv = _dkv_call(q, k, v, do, lse2, delta, seg_args, geo_k, bs, interpret)
    return dq, dk, dv


def _dkv_call(q, k, v, do, lse2, delta, seg_args, geo_k, bs, interpret):
    """dK/dV per query head: a program per KV tile, each streaming q."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    g = geo_k.groups
    bk = geo_k.bk
    where, spec = launch_order(geo_k.nk, b, h, last_first=False, wave=geo_k.wave)
    kv_row = lambda j, b_, h_: (b_, j, h_ // g, 0)
    q_full = lambda j, b_, h_: (b_, 0, h_, 0)
    seg_specs = (
        [
            spec((None, lq), lambda j, b_, h_: (b_, 0)),
            spec((None, bk), lambda j, b_, h_: (b_, j)),
            spec((None, 4), lambda j, b_, h_: (b_, j)),
        ]
        if geo_k.has_segments
        else []
    )
    if seg_args:  # per KV tile, the q tiles holding its segments' queries
        q_seg, kv_seg = seg_args
        seg_args = [q_seg, kv_seg, segment_tile_ranges(kv_seg, q_seg, bk, geo_k.bq)]
    out_dtype = k.dtype if g == 1 else jnp.float32
    out_spec = spec((None, bk, None, d), lambda j, b_, h_: (b_, j, h_, 0))
    out_shape = jax.ShapeDtypeStruct((b, lk, h, d), out_dtype)
    return pl.pallas_call(
        functools.partial(_dkv_kernel, geo=geo_k, where=where),
        grid=(geo_k.nk * b * h,),
        in_specs=[
            spec((None, lq, None, d), q_full),
            spec((None, bk, None, d), kv_row),
            spec((None, bk, None, d), kv_row),
            spec((None, lq, None, d), q_full),
            spec((None, None, lq), lambda j, b_, h_: (b_, h_, 0)),
            spec((None, None, lq), lambda j, b_, h_: (b_, h_, 0)),
            *seg_specs,
        ],
        out_specs=[out_spec, out_spec],
        out_shape=[out_shape, out_shape],
        compiler_params=compiler_params(bs, bwd=True),
        interpret=interpret,
        name="arjax_flash_dkv",
    )(q, k, v, do, lse2, delta, *seg_args)
