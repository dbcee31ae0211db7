"""Flash attention in Pallas: ``flash_attention`` (training/prefill, with gradients) and
``flash_decode`` (a few queries against a long KV cache, forward only).

Semantics are exactly those of ``arjax.ops.attention`` (which dispatches here for
``impl="pallas"``): q ``[batch, q_len, heads, head_dim]``, k/v ``[batch, kv_len, kv_heads,
head_dim]`` (GQA when ``kv_heads < heads``); with ``causal`` query ``i`` sits at position
``kv_len - q_len + i`` and sees keys ``j <= p``, a ``window`` w limits that to
``p - w < j <= p``; segment ids restrict attention to equal ids; a query that sees no key
returns zeros. One file per lowering and pass: Pallas Triton (``triton_fwd.py`` with the
split-KV decode, ``triton_bwd.py``), Pallas Mosaic TPU (``mosaic_tpu_fwd.py``,
``mosaic_tpu_bwd.py``), picked by ``backend``; on CPU they run in interpret mode. On Hopper
GPUs the kernels may instead be Pallas Mosaic GPU (``lowering="mosaic"``: ``mosaic_gpu_fwd.py``,
``mosaic_gpu_bwd.py``, helpers shared with the other Hopper kernels in
``kernels_pallas/_hopper.py``). Launch parameters: ``tuning.py``, one
frozen dataclass per lowering (``BlockSizes`` for Triton and Mosaic TPU, ``MosaicForward`` and
``mosaic_gpu_bwd.Tiles`` for Mosaic GPU), passed down as static arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from einops import rearrange
from jax.ad_checkpoint import checkpoint_name

from kernels_pallas import _hopper
from kernels_pallas.flash_attention import (
    mosaic_gpu_bwd,
    mosaic_gpu_fwd,
    mosaic_tpu_bwd,
    mosaic_tpu_fwd,
    triton_bwd,
    triton_fwd,
    tuning,
)
from kernels_pallas.flash_attention._common import (
    Geometry,
    pad_ids,
    pad_to,
    segment_tile_ranges,
)
from kernels_pallas.flash_attention.tuning import BlockSizes

BACKENDS = ("gpu", "tpu")
LOWERINGS = ("triton", "mosaic")  # GPU forward: Pallas Triton or Pallas Mosaic GPU (Hopper)
DECODE_BLOCK_K = 128  # flash_decode's default KV tile


def _triton_dim(n: int) -> int:
    """Smallest power of two >= max(n, 16): a Triton tile dim that covers ``n``."""
    return max(16, 1 << (n - 1).bit_length())


def decode_kv_tile(kv_len: int, block_k: int = DECODE_BLOCK_K) -> int:
    """KV tile ``flash_decode`` uses on GPU for a cache of ``kv_len`` slots: ``block_k``, or
    the power of two (>= 16) that covers a shorter cache."""
    return min(block_k, _triton_dim(kv_len))


__all__ = [
    "BACKENDS",
    "DECODE_BLOCK_K",
    "LOWERINGS",
    "BlockSizes",
    "decode_kv_tile",
    "flash_attention",
    "flash_decode",
]


def _validate(q, k, v, causal, window, q_segment_ids, kv_segment_ids, backend, fn: str) -> None:
    """Raise ``ValueError`` naming the bad argument (at trace time, before compiling)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{fn}: {name} must be [batch, len, heads, head_dim], got {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{fn}: {name} must be floating point, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{fn}: dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    b, q_len, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"{fn}: k {k.shape} / v {v.shape} do not match q {q.shape}")
    if h % k.shape[2]:
        raise ValueError(f"{fn}: heads={h} is not a multiple of kv_heads={k.shape[2]}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)):
        raise ValueError(f"{fn}: window must be a positive int or None, got {window!r}")
    if window is not None and (window <= 0 or not causal):
        raise ValueError(f"{fn}: window must be positive and needs causal=True, got {window!r}")
    if causal and q_len > k.shape[1]:
        raise ValueError(f"{fn}: causal needs q_len <= kv_len, got {q_len} > {k.shape[1]}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError(f"{fn}: pass both q_segment_ids and kv_segment_ids, or neither")
    if q_segment_ids is not None:
        for name, ids, want in (
            ("q_segment_ids", q_segment_ids, (b, q_len)),
            ("kv_segment_ids", kv_segment_ids, (b, k.shape[1])),
        ):
            if ids.shape != want or not jnp.issubdtype(ids.dtype, jnp.integer):
                raise ValueError(f"{fn}: {name} must be int {want}, got {ids.dtype}{ids.shape}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {BACKENDS} or None, got {backend!r}")


def _resolve(backend: str | None, interpret: bool | None) -> tuple[str, bool]:
    platform = jax.default_backend()
    if backend is None:
        backend = "tpu" if platform == "tpu" else "gpu"
    if interpret is None:
        interpret = platform != backend
    return backend, interpret


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclasses.dataclass(frozen=True)
class _Call:
    """Static part of one flash_attention call (the custom_vjp's non-differentiable arg)."""

    geo: Geometry
    blocks: BlockSizes
    backend: str
    interpret: bool
    lowering: str  # GPU forward kernel, one of LOWERINGS
    q_pad: int  # padded lengths / head_dim
    kv_pad: int
    d_pad: int
    bwd_tiles: mosaic_gpu_bwd.Tiles | None = None  # the Hopper backward's (lowering "mosaic")
    mosaic_fwd: tuning.MosaicForward | None = None  # the Hopper forward's (lowering "mosaic")


# The Hopper kernels' launchers under jit: a model's identical attention calls (its layers) then
# share one traced and lowered function in the program instead of lowering the Mosaic GPU
# kernels again per call site (seconds each). Interpreted calls use the plain functions, which
# tests patch (race detection is read when a kernel is traced).
_mosaic_forward = jax.jit(mosaic_gpu_fwd.forward, static_argnums=(3, 4, 5, 6))
_mosaic_backward = jax.jit(mosaic_gpu_bwd.backward, static_argnums=(6, 7, 8))


def _prepare(call: _Call, q, k, v, q_seg, kv_seg):
    d_axis = 3
    q = pad_to(pad_to(q, 1, call.q_pad), d_axis, call.d_pad)
    k = pad_to(pad_to(k, 1, call.kv_pad), d_axis, call.d_pad)
    v = pad_to(pad_to(v, 1, call.kv_pad), d_axis, call.d_pad)
    if q_seg is not None:
        q_seg, kv_seg = pad_ids(q_seg, call.q_pad), pad_ids(kv_seg, call.kv_pad)
    return q, k, v, q_seg, kv_seg


def _forward(call: _Call, q, k, v, q_seg, kv_seg):
    q_len, d = q.shape[1], q.shape[3]
    args = _prepare(call, q, k, v, q_seg, kv_seg)
    if call.lowering == "mosaic":
        segs = ()
        if call.geo.has_segments:
            ranges = segment_tile_ranges(*args[3:], mosaic_gpu_fwd.TILE_Q, call.geo.bk)
            segs = (*args[3:], ranges)
        forward = mosaic_gpu_fwd.forward if call.interpret else _mosaic_forward
        out, lse2 = forward(
            *args[:3],
            call.geo,
            call.blocks.stages,
            call.interpret,
            call.mosaic_fwd.pingpong,
            *segs,
        )
    else:
        kernel = triton_fwd.forward if call.backend == "gpu" else mosaic_tpu_fwd.forward
        out, lse2 = kernel(*args, call.geo, call.blocks, call.interpret)
    return out[:, :q_len, :, :d], lse2[:, :, :q_len]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(call: _Call, q, k, v, q_seg, kv_seg):
    return _forward(call, q, k, v, q_seg, kv_seg)[0]


def _flash_fwd(call: _Call, q, k, v, q_seg, kv_seg):
    out, lse2 = _forward(call, q, k, v, q_seg, kv_seg)
    # Named so that a remat policy can keep them (``save_only_these_names``) instead of
    # running the forward kernel again in the backward pass.
    out, lse2 = checkpoint_name(out, "attention_out"), checkpoint_name(lse2, "attention_lse")
    return out, (q, k, v, q_seg, kv_seg, out, lse2)


def _flash_bwd(call: _Call, res, d_out):
    q, k, v, q_seg, kv_seg, out, lse2 = res
    b, q_len, h, d = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    # delta_i = sum_d dO * O (FA-2 alg. 2 line 4), float32 [b, h, q_len]
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    # padded query rows get lse=+inf so their probabilities are exactly 0 in every tile
    lse2 = pad_to(lse2, 2, call.q_pad, jnp.inf)
    delta = pad_to(delta, 2, call.q_pad)
    qp, kp, vp, q_seg, kv_seg = _prepare(call, q, k, v, q_seg, kv_seg)
    dop = pad_to(pad_to(d_out.astype(q.dtype), 1, call.q_pad), 3, call.d_pad)
    if call.lowering == "mosaic":  # Hopper backward: dk/dv come back summed per KV head
        backward = mosaic_gpu_bwd.backward if call.interpret else _mosaic_backward
        dq, dk, dv = backward(qp, kp, vp, dop, lse2, delta, call.geo, call.bwd_tiles,
                              call.interpret, q_seg, kv_seg)  # fmt: skip
        return dq[:, :q_len, :, :d], dk[:, :kv_len, :, :d], dv[:, :kv_len, :, :d], None, None
    kernel = triton_bwd.backward if call.backend == "gpu" else mosaic_tpu_bwd.backward
    dq, dk, dv = kernel(qp, kp, vp, dop, lse2, delta, q_seg, kv_seg, call.geo, call.blocks,
                        call.interpret)  # fmt: skip
    dq = dq[:, :q_len, :, :d]
    dk, dv = (x[:, :kv_len, :, :d] for x in (dk, dv))
    if call.geo.groups > 1:  # per-query-head partials -> sum over each KV head's group
        dk, dv = (
            rearrange(x, "b k (g r) d -> b k g r d", g=kv_heads).sum(3).astype(k.dtype)
            for x in (dk, dv)
        )
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    window: int | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    scale: float | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
    block_sizes: BlockSizes | None = None,
    lowering: str | None = None,
    wave: int | None = None,
) -> jax.Array:
    """Flash attention (FlashAttention-2, Dao 2023) with block-sparse tile skipping.

    Returns ``[batch, q_len, heads, head_dim]`` in q's dtype; differentiable in q, k, v.
    ``backend`` is ``"gpu"`` (Triton lowering) or ``"tpu"`` (Mosaic), default: the current
    platform's (GPU kernels on CPU); ``interpret`` defaults to True off that platform.
    ``lowering`` (GPU only) picks the kernels: ``"triton"`` or ``"mosaic"`` (Hopper forward and
    backward, FlashAttention-3 style; bf16/fp16, head_dim 64/128, segment ids included),
    default: the rule :func:`.tuning.gpu_lowering`. Each Mosaic GPU call site is lowered and
    compiled on its own, more than ten times slower than a Triton one
    (experiments/results/flash_attention_compile_time.md): minutes for an unrolled deep model;
    ``lowering="triton"`` compiles fast.
    ``block_sizes`` overrides the tiles from :func:`.tuning.block_sizes`. ``wave``: CTAs per
    wave the GPU launch order plans for (``tuning.heads_per_wave``; default the SM count).
    """
    _validate(q, k, v, causal, window, q_segment_ids, kv_segment_ids, backend, "flash_attention")
    if wave is not None and (isinstance(wave, bool) or not isinstance(wave, int) or wave < 1):
        raise ValueError(f"flash_attention: wave must be a positive int or None, got {wave!r}")
    backend, interpret = _resolve(backend, interpret)
    b, q_len, h, d = q.shape
    kv_len = k.shape[1]
    lowering = _resolve_lowering(lowering, backend, interpret, q.dtype, d, block_sizes)
    blocks = block_sizes or tuning.block_sizes(backend, q_len, kv_len, d, lowering)
    bwd_tiles = None
    if lowering == "mosaic":
        mosaic_gpu_fwd.check_supported(q.dtype, d, q_segment_ids is not None, blocks)
        span = min(q_len, kv_len, window or kv_len)  # the most keys a query sees
        bwd_tiles = mosaic_gpu_bwd.default_tiles(d, span, q_segment_ids is not None)
        mosaic_gpu_bwd.check_supported(q.dtype, d, q_segment_ids is not None, bwd_tiles)
    q_tile = max(blocks.bq, blocks.bwd_bq_dq, blocks.bwd_bq_dkv)
    kv_tile = max(blocks.bk, blocks.bwd_bk_dq, blocks.bwd_bk_dkv)
    geo = Geometry(
        q_len=q_len,
        kv_len=kv_len,
        bq=blocks.bq,
        bk=blocks.bk,
        causal=causal,
        window=window if causal else None,
        has_segments=q_segment_ids is not None,
        scale=1.0 / math.sqrt(d) if scale is None else float(scale),
        groups=h // k.shape[2],
        wave=wave,
    )
    call = _Call(
        geo=geo,
        blocks=blocks,
        backend=backend,
        interpret=interpret,
        lowering=lowering,
        q_pad=_round_up(q_len, q_tile),
        kv_pad=_round_up(kv_len, kv_tile),
        d_pad=_head_dim_pad(backend, d),
        bwd_tiles=bwd_tiles,
        mosaic_fwd=tuning.mosaic_forward(d) if lowering == "mosaic" else None,
    )
    return _flash(call, q, k, v, q_segment_ids, kv_segment_ids)


def _resolve_lowering(lowering, backend, interpret, dtype, d, block_sizes) -> str:
    """The GPU lowering: ``lowering`` if given, else the tuning rule; explicit ``block_sizes``
    without a lowering keep the Triton kernels they were chosen for."""
    if lowering is not None and lowering not in LOWERINGS:
        raise ValueError(
            f"flash_attention: lowering must be one of {LOWERINGS} or None, got {lowering!r}"
        )
    if backend != "gpu":
        if lowering is not None:
            raise ValueError(f"flash_attention: lowering needs backend='gpu', got {backend!r}")
        return "triton"  # unused off GPU
    if lowering is not None:
        return lowering
    device = jax.devices()[0]
    mosaic_ok = (
        not interpret
        and block_sizes is None
        and device.platform == "gpu"
        and _hopper.supports(dtype, d)
    )
    return tuning.gpu_lowering(device.device_kind, d, mosaic_ok)


def _head_dim_pad(backend: str, d: int) -> int:
    """Triton tiles need a power-of-two last dim >= 16; Mosaic takes the full dim as is."""
    return _triton_dim(d) if backend == "gpu" else d


def flash_decode(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    window: int | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    scale: float | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
    num_splits: int | None = None,
    block_k: int = DECODE_BLOCK_K,
) -> jax.Array:
    """Flash-decoding (Dao, Haziza, Massa, Sizov 2023): few queries vs a long KV cache.

    Same arguments and result as :func:`flash_attention`; differentiable through
    :func:`flash_attention`'s backward (a forward kernel only). On GPU the KV length
    is split over ``num_splits`` programs (default: enough to fill the device) whose partial
    outputs are merged by their log-sum-exp; query heads sharing a KV head are packed into
    one tile. On TPU, where the grid runs sequentially per core, this is
    :func:`flash_attention`'s forward kernel.
    """
    _validate(q, k, v, causal, window, q_segment_ids, kv_segment_ids, backend, "flash_decode")
    backend, interpret = _resolve(backend, interpret)
    if backend == "tpu":
        return flash_attention(
            q, k, v, causal=causal, window=window, q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids, scale=scale, backend=backend, interpret=interpret,
        )  # fmt: skip
    b, kv_len, kv_heads = q.shape[0], k.shape[1], k.shape[2]
    bk = decode_kv_tile(kv_len, block_k)
    n_tiles = -(-kv_len // bk)
    if num_splits is None:  # ~2 programs per SM of an H100 (132 SMs)
        num_splits = max(1, min(n_tiles, -(-264 // (b * kv_heads))))
    if not isinstance(num_splits, int) or num_splits <= 0:
        raise ValueError(f"flash_decode: num_splits must be a positive int, got {num_splits!r}")
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    split_tiles = -(-n_tiles // num_splits)
    call = _DecodeCall(causal, window, scale, interpret, num_splits, split_tiles, bk)
    return _decode(call, q, k, v, q_segment_ids, kv_segment_ids)


@dataclasses.dataclass(frozen=True)
class _DecodeCall:
    """Static part of one (GPU) flash_decode call."""

    causal: bool
    window: int | None
    scale: float
    interpret: bool
    num_splits: int
    split_tiles: int  # KV tiles per split
    bk: int  # KV tile


def _decode_forward(call: _DecodeCall, q, k, v, q_segment_ids, kv_segment_ids):
    b, q_len, h, d = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = h // kv_heads
    kv_pad = -(-kv_len // call.bk) * call.bk  # whole tiles only: splits past them run empty
    d_pad = _head_dim_pad("gpu", d)
    rows = groups * q_len
    rows_pad = _triton_dim(rows)
    geo = Geometry(
        q_len=q_len,
        kv_len=kv_len,
        bq=rows_pad,
        bk=call.bk,
        causal=call.causal,
        window=call.window if call.causal else None,
        has_segments=q_segment_ids is not None,
        scale=call.scale,
        groups=groups,
    )
    # [b, q, (hk g), d] -> rows ordered (g, q) so row % q_len is the query token
    q_rows = rearrange(q, "b q (hk g) d -> b hk (g q) d", hk=kv_heads)
    q_rows = pad_to(pad_to(q_rows, 2, rows_pad), 3, d_pad)
    k = pad_to(pad_to(k, 1, kv_pad), 3, d_pad)
    v = pad_to(pad_to(v, 1, kv_pad), 3, d_pad)
    qseg_rows = kv_seg = None
    if q_segment_ids is not None:
        qseg_rows = jnp.tile(q_segment_ids.astype(jnp.int32), (1, groups))  # [b, (g q)]
        qseg_rows = pad_to(qseg_rows, 1, rows_pad)
        kv_seg = pad_to(kv_segment_ids.astype(jnp.int32), 1, kv_pad)
    blocks = tuning.block_sizes("gpu", rows_pad, kv_len, d)
    o, lse2 = triton_fwd.decode(
        q_rows, k, v, qseg_rows, kv_seg, geo, q_len, call.num_splits, call.split_tiles, blocks,
        call.interpret,
    )  # fmt: skip  # o [b, hk, S, rows, d], lse2 [b, hk, S, rows]
    seen = jnp.isfinite(lse2)  # lse2 is +inf for rows of a split that saw no key
    m = jnp.max(jnp.where(seen, lse2, -jnp.inf), axis=2, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.where(seen, jnp.exp2(jnp.where(seen, lse2, 0.0) - m), 0.0)
    total = jnp.sum(w, axis=2)
    # a sum, not an einsum: XLA keeps it in the fusion around it instead of a GEMM of its own
    out = jnp.sum(w[..., None] * o, axis=2) / jnp.where(total == 0, 1.0, total)[..., None]
    out = out[:, :, :rows, :d]
    return rearrange(out, "b hk (g q) d -> b q (hk g) d", q=q_len).astype(q.dtype)


# A custom_vjp, not a bare kernel: JAX never dead-code eliminates a pallas_call, while a
# custom_vjp call whose output is unused is dropped. flax >= 0.12.9's ``nn.scan`` requires it: it
# traces the body once more and rejects any input the dead-code-eliminated trace still uses.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _decode(call: _DecodeCall, q, k, v, q_seg, kv_seg):
    return _decode_forward(call, q, k, v, q_seg, kv_seg)


def _decode_fwd(call: _DecodeCall, q, k, v, q_seg, kv_seg):
    return _decode_forward(call, q, k, v, q_seg, kv_seg), (q, k, v, q_seg, kv_seg)


def _decode_bwd(call: _DecodeCall, res, d_out):
    """flash_decode computes flash_attention's function: its gradient is flash_attention's."""
    q, k, v, q_seg, kv_seg = res

    def attend(q, k, v):
        return flash_attention(
            q, k, v, causal=call.causal, window=call.window, q_segment_ids=q_seg,
            kv_segment_ids=kv_seg, scale=call.scale, backend="gpu", interpret=call.interpret,
        )  # fmt: skip

    return (*jax.vjp(attend, q, k, v)[1](d_out), None, None)


_decode.defvjp(_decode_fwd, _decode_bwd)
