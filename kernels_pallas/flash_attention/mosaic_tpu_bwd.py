"""TPU flash-attention backward in Pallas (Mosaic TPU): FA-2 alg. 2 as a dQ kernel and a
dK/dV kernel, with the forward's tile skipping (``mosaic_tpu_fwd.py``).
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

from kernels_pallas.flash_attention._common import (
    Geometry,
    backward_tile,
    dot_tn,
    kv_block_range,
    q_block_range,
)
from kernels_pallas.flash_attention.mosaic_tpu_fwd import (
    SEMANTICS,
    clamped,
    heads_major,
    seg_prefetch,
    seg_specs,
    split_refs,
    tile_mask_at,
    visibility,
)
from kernels_pallas.flash_attention.tuning import BlockSizes


def _dq_kernel(*refs, geo: Geometry):
    n_in = 8 if geo.has_segments else 6
    seg_bounds, ins, (dq_ref, dq_sc) = split_refs(refs, n_in, geo.has_segments)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins[:6]
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    bounds = kv_block_range(i * geo.bq, i * geo.bq + geo.bq - 1, geo)
    live, full = visibility(j, bounds, seg_bounds, b, i, j)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def tile(masked: bool):
        k = k_ref[...]
        mask = tile_mask_at(i, j, ins[6:8], geo) if masked else None
        _, ds = backward_tile(
            q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], mask, geo
        )
        dq_sc[...] += jax.lax.dot_general(
            ds.astype(k.dtype), k, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )

    pl.when(live & full)(lambda: tile(False))
    pl.when(live & ~full)(lambda: tile(True))

    @pl.when(j == geo.nk - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * geo.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, geo: Geometry):
    n_in = 8 if geo.has_segments else 6
    seg_bounds, ins, (dk_ref, dv_ref, dk_sc, dv_sc) = split_refs(refs, n_in, geo.has_segments)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins[:6]
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    bounds = q_block_range(j * geo.bk, j * geo.bk + geo.bk - 1, geo)
    live, full = visibility(i, bounds, seg_bounds, b, i, j)

    @pl.when(i == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def tile(masked: bool):
        q, do = q_ref[...], do_ref[...]
        mask = tile_mask_at(i, j, ins[6:8], geo) if masked else None
        p, ds = backward_tile(
            q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...], mask, geo
        )
        dv_sc[...] += dot_tn(p.astype(do.dtype), do)
        dk_sc[...] += dot_tn(ds.astype(q.dtype), q)

    pl.when(live & full)(lambda: tile(False))
    pl.when(live & ~full)(lambda: tile(True))

    @pl.when(i == geo.nq - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * geo.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward(q, k, v, do, lse2, delta, q_seg, kv_seg, geo, bs: BlockSizes, interpret: bool):
    """Gradients for padded inputs; dk/dv per query head ``[b, Lk, h, d]`` (float32 for GQA)."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    g = geo.groups
    qh, kh, vh, doh = heads_major(q, k, v, do)
    lse2, delta = lse2[..., None], delta[..., None]  # [b, h, Lq, 1]
    seg_args = [q_seg[:, :, None], kv_seg[:, None, :]] if geo.has_segments else []

    # dQ: grid (b, h, q tiles, kv tiles)
    gq = dataclasses.replace(geo, bq=bs.bwd_bq_dq, bk=bs.bwd_bk_dq)
    bq, bk = gq.bq, gq.bk

    def kv_tile(i, j, *_):
        lo, _, _, hi = kv_block_range(i * bq, i * bq + bq - 1, gq)
        return clamped(j, lo, hi, gq.nk)

    q_spec = lambda shape: pl.BlockSpec(shape, lambda b_, h_, i, j, *_: (b_, h_, i, 0))
    kv_spec = pl.BlockSpec(
        (None, None, bk, d), lambda b_, h_, i, j, *_: (b_, lax.div(h_, g), kv_tile(i, j), 0)
    )
    prefetch = seg_prefetch(q_seg, kv_seg, bq, bk) if geo.has_segments else []
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, geo=gq),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(b, h, gq.nq, gq.nk),
            in_specs=[
                q_spec((None, None, bq, d)),
                kv_spec,
                kv_spec,
                q_spec((None, None, bq, d)),
                q_spec((None, None, bq, 1)),
                q_spec((None, None, bq, 1)),
                *(seg_specs(gq, lambda i, j, *_: i, kv_tile) if geo.has_segments else []),
            ],
            out_specs=q_spec((None, None, bq, d)),
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
        compiler_params=SEMANTICS,
        interpret=interpret,
        name="arjax_flash_dq_tpu",
    )(*prefetch, qh, kh, vh, doh, lse2, delta, *seg_args)

    # dK, dV: grid (b, h, kv tiles, q tiles), per query head
    gk = dataclasses.replace(geo, bq=bs.bwd_bq_dkv, bk=bs.bwd_bk_dkv)
    bq, bk = gk.bq, gk.bk

    def q_tile(j, i, *_):
        lo, _, _, hi = q_block_range(j * bk, j * bk + bk - 1, gk)
        return clamped(i, lo, hi, gk.nq)

    q_spec = lambda shape: pl.BlockSpec(shape, lambda b_, h_, j, i, *_: (b_, h_, q_tile(j, i), 0))
    kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, h_, j, i, *_: (b_, lax.div(h_, g), j, 0))
    out_spec = pl.BlockSpec((None, None, bk, d), lambda b_, h_, j, i, *_: (b_, h_, j, 0))
    prefetch = seg_prefetch(q_seg, kv_seg, bq, bk) if geo.has_segments else []
    out_dtype = k.dtype if g == 1 else jnp.float32
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, geo=gk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(b, h, gk.nk, gk.nq),
            in_specs=[
                q_spec((None, None, bq, d)),
                kv_spec,
                kv_spec,
                q_spec((None, None, bq, d)),
                q_spec((None, None, bq, 1)),
                q_spec((None, None, bq, 1)),
                *(seg_specs(gk, q_tile, lambda j, i, *_: j) if geo.has_segments else []),
            ],
            out_specs=[out_spec, out_spec],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct((b, h, lk, d), out_dtype)] * 2,
        compiler_params=SEMANTICS,
        interpret=interpret,
        name="arjax_flash_dkv_tpu",
    )(*prefetch, qh, kh, vh, doh, lse2, delta, *seg_args)
    dq, dk, dv = (rearrange(x, "b h l d -> b l h d") for x in (dq, dk, dv))
    return dq, dk, dv
