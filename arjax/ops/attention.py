"""Scaled dot-product attention with causal / sliding-window / segment masks.

One signature, several implementations:

* :func:`attention_reference` -- naive float32 math, the ground truth for tests;
* ``impl="xla"`` -- einsum + softmax in float32 accumulation, any backend;
* ``impl="cudnn"`` -- ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU);
* ``impl="pallas"`` -- the flash-attention kernels in :mod:`kernels_pallas`
  (interpret mode on CPU);
* ``impl="pallas_mosaic"`` -- the same with the Hopper kernels in Pallas Mosaic GPU, forward
  and backward (bf16/fp16, head_dim 64 or 128, no segment ids);
* ``impl="auto"`` -- the fastest available for the backend and the call: on GPU the one
  measured fastest for its shape class (:mod:`arjax.ops.auto_table`, :func:`resolve_impl`).

Conventions (Vaswani et al. 2017, eq. 1; GQA: Ainslie et al. 2023):
q ``[batch, q_len, heads, head_dim]``, k/v ``[batch, kv_len, kv_heads, head_dim]`` with
``heads % kv_heads == 0``. With ``causal``, query ``i`` sits at position
``kv_len - q_len + i`` (decode convention) and sees keys ``j <= that position``; a
``window`` w additionally limits it to keys ``p - w < j <= p``. Segment ids restrict
attention to keys of the same segment. A query that sees no key returns zeros.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from einops import rearrange

from arjax.ops.measured import auto_table, measured_choice
from arjax.ops.mesh import shard_batch_heads

Impl = Literal["auto", "xla", "cudnn", "pallas", "pallas_mosaic"]
IMPLS = ("auto", "xla", "cudnn", "pallas", "pallas_mosaic")


def validate_attention_args(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    window: int | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    impl: str = "auto",
) -> None:
    """Raise ``ValueError`` naming the bad argument; runs at trace time, before compiling."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(
                f"attention: {name} must be [batch, len, heads, head_dim], got shape {x.shape}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"attention: {name} must be floating point, got {x.dtype}")
    b, q_len, h, d = q.shape
    if k.shape != v.shape[:3] + (k.shape[3],) or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"attention: k {k.shape} and v {v.shape} differ in batch/len/heads")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"attention: k {k.shape} does not match q {q.shape} (batch, head_dim)")
    if h % k.shape[2]:
        raise ValueError(f"attention: heads={h} is not a multiple of kv_heads={k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if window is not None and (not isinstance(window, int) or window <= 0):
        raise ValueError(f"attention: window must be a positive int or None, got {window!r}")
    if window is not None and not causal:
        raise ValueError("attention: window requires causal=True")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("attention: pass both q_segment_ids and kv_segment_ids, or neither")
    if q_segment_ids is not None:
        if q_segment_ids.shape != (b, q_len):
            raise ValueError(
                f"attention: q_segment_ids must be [batch, q_len]={(b, q_len)}, "
                f"got {q_segment_ids.shape}"
            )
        if kv_segment_ids.shape != (b, k.shape[1]):
            raise ValueError(
                f"attention: kv_segment_ids must be [batch, kv_len]={(b, k.shape[1])}, "
                f"got {kv_segment_ids.shape}"
            )
    if causal and q_len > k.shape[1]:
        raise ValueError(f"attention: causal needs q_len <= kv_len, got {q_len} > {k.shape[1]}")
    if impl not in IMPLS:
        raise ValueError(f"attention: impl must be one of {IMPLS}, got {impl!r}")


def attention_mask(
    q_len: int,
    kv_len: int,
    *,
    causal: bool = False,
    window: int | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
) -> jax.Array | None:
    """Boolean visibility ``[batch or 1, 1, q_len, kv_len]``, or None when all visible."""
    mask = None
    if causal:
        q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
        kv_pos = jnp.arange(kv_len)[None, :]
        mask = kv_pos <= q_pos
        if window is not None:
            mask &= kv_pos > q_pos - window
        mask = mask[None, None]
    if q_segment_ids is not None:
        seg = q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]
        mask = seg if mask is None else mask & seg
    return mask


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    window: int | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Naive float32 attention; the ground truth the fast paths are tested against."""
    validate_attention_args(
        q, k, v, causal=causal, window=window,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
    )  # fmt: skip
    groups = q.shape[2] // k.shape[2]
    qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
    kf = jnp.repeat(kf, groups, axis=2)
    vf = jnp.repeat(vf, groups, axis=2)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = jnp.einsum("bqhd,bkhd->bhqk", qf, kf, precision="highest") * scale
    mask = attention_mask(
        q.shape[1], k.shape[1], causal=causal, window=window,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
    )  # fmt: skip
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, vf, precision="highest")
    return out.astype(q.dtype)


def _attention_xla(q, k, v, *, causal, window, q_segment_ids, kv_segment_ids, scale):
    """Grouped einsum attention: no K/V repeat for GQA, float32 softmax."""
    b, q_len, h, d = q.shape
    kv_heads = k.shape[2]
    qg = rearrange(q, "b q (g r) d -> b g r q d", g=kv_heads)  # [b, kv_heads, groups, q, d]
    logits = jnp.einsum("bgrqd,bkgd->bgrqk", qg * jnp.asarray(scale, q.dtype), k)
    logits = logits.astype(jnp.float32)
    mask = attention_mask(
        q_len, k.shape[1], causal=causal, window=window,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
    )  # fmt: skip
    if mask is not None:
        mask = mask[:, :, None]  # [b|1, 1, 1, q, k]
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        p = jnp.where(jnp.any(mask, axis=-1, keepdims=True), p, 0.0)
    out = jnp.einsum("bgrqk,bkgd->bqgrd", p.astype(v.dtype), v)
    return rearrange(out, "b q g r d -> b q (g r) d")


def _cudnn_supported(q, k, *, causal, q_segment_ids) -> bool:
    return (
        q.dtype in (jnp.bfloat16, jnp.float16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 128
        and q_segment_ids is None
        and (not causal or q.shape[1] == k.shape[1])
    )


def _attention_cudnn(q, k, v, *, causal, window, q_segment_ids, kv_segment_ids, scale):
    if not _cudnn_supported(q, k, causal=causal, q_segment_ids=q_segment_ids):
        raise ValueError(
            "attention(impl='cudnn'): needs bf16/fp16, head_dim <= 128 and a multiple of 8, "
            "no segment ids, and q_len == kv_len when causal; use impl='xla' or 'pallas'"
        )
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=scale,
        is_causal=causal,
        local_window_size=None if window is None else (window - 1, 0),
        implementation="cudnn",
    )


def _attention_pallas(
    q, k, v, *, causal, window, q_segment_ids, kv_segment_ids, scale, lowering=None
):
    """Flash attention kernels; shard_mapped over batch and heads under a training mesh.
    ``lowering`` picks the GPU forward kernel (default: the tuning rule)."""
    from kernels_pallas.flash_attention import flash_attention

    def kernel(q, k, v, q_seg, kv_seg):
        return flash_attention(
            q, k, v, causal=causal, window=window,
            q_segment_ids=q_seg, kv_segment_ids=kv_seg, scale=scale, lowering=lowering,
        )  # fmt: skip

    heads = (q.shape[2], k.shape[2], k.shape[2], 0, 0)
    return shard_batch_heads(kernel, heads, q.shape[0], q, k, v, q_segment_ids, kv_segment_ids)


def _pallas_available() -> bool:
    try:
        from kernels_pallas.flash_attention import flash_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _mask_kind(causal: bool, window: int | None, q_segment_ids) -> str:
    if q_segment_ids is not None:
        return "segments"
    if window is not None:
        return "window"
    return "causal" if causal else "full"


def resolve_impl(
    q: jax.Array,
    k: jax.Array,
    *,
    causal: bool,
    q_segment_ids,
    impl: str,
    window: int | None = None,
) -> str:
    """Pick the implementation ``impl="auto"`` means for this call and backend.

    On GPU, self-attention calls (``q_len == kv_len``) take the implementation measured
    fastest for training (forward+backward) in ``arjax.ops.auto_table`` where it can run the
    call and was measured within an octave of its length; otherwise cuDNN where it applies,
    else the Pallas kernels. TPU: Pallas. CPU: XLA.
    """
    if impl != "auto":
        return impl
    if jax.default_backend() == "gpu":
        ok = {
            "cudnn": _cudnn_supported(q, k, causal=causal, q_segment_ids=q_segment_ids),
            "pallas": _pallas_available(),
        }
        if q.shape[1] == k.shape[1]:
            kind = jax.devices()[0].device_kind
            mask = _mask_kind(causal, window, q_segment_ids)
            choice = measured_choice(auto_table.ATTENTION, kind, (q.shape[-1], mask), q.shape[1])
            if choice is not None and ok.get(choice):
                return choice
        return next((name for name in ("cudnn", "pallas") if ok[name]), "xla")
    if jax.default_backend() == "tpu" and _pallas_available():
        return "pallas"
    return "xla"


_IMPLS = {
    "xla": _attention_xla,
    "cudnn": _attention_cudnn,
    "pallas": _attention_pallas,
    "pallas_mosaic": functools.partial(_attention_pallas, lowering="mosaic"),
}


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    window: int | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    scale: float | None = None,
    impl: Impl = "auto",
) -> jax.Array:
    """Softmax attention; returns ``[batch, q_len, heads, head_dim]`` in q's dtype."""
    validate_attention_args(
        q, k, v, causal=causal, window=window,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, impl=impl,
    )  # fmt: skip
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if not causal:
        window = None
    impl = resolve_impl(
        q, k, causal=causal, q_segment_ids=q_segment_ids, impl=impl, window=window
    )  # fmt: skip
    fn = _IMPLS[impl]
    return fn(
        q, k, v, causal=causal, window=window,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, scale=scale,
    )  # fmt: skip


def decode_cache_len(length: int) -> int:
    """Slots to allocate for a KV cache holding ``length`` tokens: ``length`` rounded up to
    whole KV tiles of the flash-decoding kernel (128 slots; a power of two >= 16 for shorter
    caches). The extra slots are never visible (``kv_visible`` is False there); they cost the
    XLA path at most one tile. Whole tiles spare the kernel padding (copying) the cache at
    every step, whatever its split count."""
    if length <= 0:
        raise ValueError(f"decode_cache_len: length must be > 0, got {length}")
    try:
        from kernels_pallas.flash_attention import decode_kv_tile
    except ImportError:  # no Pallas kernels, nothing to align to
        return length
    tile = decode_kv_tile(length)
    return -(-length // tile) * tile


def decode_attention(
    q: jax.Array,  # [batch, q_len (few), heads, head_dim]
    k_cache: jax.Array,  # [batch, cache_len, kv_heads, head_dim]
    v_cache: jax.Array,
    *,
    kv_visible: jax.Array,  # [batch, cache_len] bool: slots this step may attend to
    scale: float | None = None,
    impl: Impl = "auto",
) -> jax.Array:
    """Generation-time attention of new queries over a KV cache (forward only).

    Same result as ``attention`` with segment ids (queries 1, visible slots 1, others 0);
    ``impl="pallas"`` uses the split-KV flash-decoding kernel (Dao et al. 2023). ``"auto"``
    on GPU: what ``auto_table.DECODE`` measured faster for the head dim and the cache rows
    read (batch x cache length), within an octave; elsewhere :func:`resolve_impl`.
    """
    ones = jnp.ones(q.shape[:2], jnp.int32)
    visible = kv_visible.astype(jnp.int32)
    validate_attention_args(
        q, k_cache, v_cache, q_segment_ids=ones, kv_segment_ids=visible, impl=impl
    )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if impl == "auto" and jax.default_backend() == "gpu":
        kind, rows = jax.devices()[0].device_kind, q.shape[0] * k_cache.shape[1]
        choice = measured_choice(auto_table.DECODE, kind, (q.shape[-1],), rows, mode="fwd")
        if choice == "xla" or (choice == "pallas" and _pallas_available()):
            impl = choice
    impl = resolve_impl(q, k_cache, causal=False, q_segment_ids=ones, impl=impl)
    if impl in ("pallas", "pallas_mosaic"):  # flash-decoding has one (Triton) GPU kernel
        from kernels_pallas.flash_attention import flash_decode

        def kernel(q, k, v, q_seg, kv_seg):
            return flash_decode(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, scale=scale)

        heads = (q.shape[2], k_cache.shape[2], k_cache.shape[2], 0, 0)
        return shard_batch_heads(kernel, heads, q.shape[0], q, k_cache, v_cache, ones, visible)
    return _attention_xla(
        q, k_cache, v_cache, causal=False, window=None,
        q_segment_ids=ones, kv_segment_ids=visible, scale=scale,
    )  # fmt: skip
