"""Gated delta rule (Gated DeltaNet; DeltaNet without decay) in Pallas: forward and backward.

``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``o_t = S_t^T q_t``
(Yang, Kautz, Hatamizadeh 2025 "Gated Delta Networks", sec. 3.1) by the chunkwise WY / UT
transform form of sec. 3.3 (and Yang et al. 2024, "Parallelizing Linear Transformers with
the Delta Rule over Sequence Length", sec. 3); the chunk math is :mod:`._chunk`.

Only the state update runs in order over chunks. On the GPU the forward is three kernels:
it computes the state-independent ``W = T kg``, ``T beta V`` in parallel over chunks (and,
for the backward, saves ``T``), carries the state tile through the chunks (two MMAs each,
storing the state entering each chunk and ``U``), then the outputs in parallel over chunks.
The backward is three: it recomputes ``W`` from ``T``, carries ``dL/dS`` through the chunks
in reverse (storing it and ``dU`` per chunk), then every chunk's gradients in parallel from
the saved states, each term summed over the value columns where it is used. On
the TPU each direction is one kernel whose ``arbitrary`` chunk axis does a whole chunk per
step, parallel over (batch, head, value tile). ``(I + A)^{-1}`` is built by block doubling
(MMAs only), so ``chunk_size`` is a power of two. The in-chunk cumulative log decay and its
transpose (a reverse cumsum) are XLA around the kernels.

Drivers (one file per lowering and pass): ``backend="gpu"`` Pallas Triton (:mod:`.triton_fwd`,
:mod:`.triton_bwd`), ``"tpu"`` Pallas Mosaic TPU (:mod:`.mosaic_tpu_fwd`,
:mod:`.mosaic_tpu_bwd`; the Triton launch parameters: :mod:`.tuning`); all run in interpret
mode on CPU. On Hopper, ``lowering="mosaic"`` runs Pallas Mosaic GPU kernels only: the UT
transform and one fused pass that keeps the state on chip (:mod:`.mosaic_gpu_fwd`); the
backward's warp-specialized reverse state pass, which forms its operands itself, and the
gradient kernel (:mod:`.mosaic_gpu_bwd`; Triton's whole backward where those do not apply:
float16, or ``dk``/``dv`` outside 64 and 128).
The float32 reference is :func:`arjax.ops.gated_delta_rule_reference` (the recurrence).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange

from kernels_pallas._checks import check_state_and_segments
from kernels_pallas.gated_delta import (
    mosaic_gpu_bwd,
    mosaic_gpu_fwd,
    mosaic_tpu_bwd,
    mosaic_tpu_fwd,
    triton_bwd,
    triton_fwd,
)
from kernels_pallas.gated_delta._chunk import F32, Cfg
from kernels_pallas.gated_delta.tuning import TritonTuning

BACKENDS = ("gpu", "tpu")
# dk * block_v: 64 x 128 overflows an H200's shared memory in the backward; 128 x 64 fits
# (experiments/results/gpu_suite.md, run 7a).
MAX_GPU_TILE = 8192
_DRIVERS = {"gpu": (triton_fwd, triton_bwd), "tpu": (mosaic_tpu_fwd, mosaic_tpu_bwd)}


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def _validate(q, k, v, beta, log_decay, initial_state, segment_ids, chunk_size, block_v,
              backend: str, compiled_gpu: bool) -> None:  # fmt: skip
    """``ValueError`` naming the bad argument, before tracing the kernels."""
    who = "gated_delta_rule (Pallas)"
    if backend not in BACKENDS:
        raise ValueError(f"{who}: backend must be one of {BACKENDS}, got {backend!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{who}: {name} must be 4-D floating, got {x.dtype} {x.shape}")
    b, length, h, dk = q.shape
    if k.shape != q.shape or v.shape[:3] != (b, length, h):
        raise ValueError(
            f"{who}: q, k must be [batch, len, heads, dk] and v [batch, len, heads, dv], "
            f"got {q.shape}, {k.shape}, {v.shape}"
        )
    for name, x in (("beta", beta), ("log_decay", log_decay)):
        if x is not None and (
            x.shape != (b, length, h) or not jnp.issubdtype(x.dtype, jnp.floating)
        ):
            raise ValueError(
                f"{who}: {name} must be floating [batch, len, heads]={(b, length, h)}, "
                f"got {x.dtype} {x.shape}"
            )
    check_state_and_segments(who, initial_state, segment_ids, (b, h, dk, v.shape[3]), (b, length))
    if not isinstance(chunk_size, int) or not _pow2(chunk_size):
        raise ValueError(f"{who}: chunk_size must be a power of two >= 16, got {chunk_size!r}")
    if not isinstance(block_v, int) or block_v <= 0 or v.shape[3] % block_v:
        raise ValueError(f"{who}: block_v must divide dv={v.shape[3]}, got {block_v!r}")
    if compiled_gpu and not (_pow2(dk) and _pow2(block_v)):
        raise ValueError(
            f"{who}: the Triton kernels need dk and block_v powers of two >= 16, "
            f"got {dk}, {block_v}"
        )
    if compiled_gpu and dk * block_v > MAX_GPU_TILE:
        raise ValueError(
            f"{who}: the Triton kernels' state tile dk x block_v = {dk} x {block_v} exceeds "
            f"{MAX_GPU_TILE} values (the backward's shared memory); pass a smaller block_v"
        )


def _default_block_v(dk: int, dv: int) -> int:
    """The GPU value tile: the largest ``min(dv, MAX_GPU_TILE // dk)`` halved down to 16 that
    divides ``dv``, else all of ``dv``."""
    bv = min(dv, max(16, MAX_GPU_TILE // dk))
    while bv > 16 and dv % bv:
        bv //= 2
    return bv if dv % bv == 0 else dv


def _documents(segment_ids: jax.Array, pad: int, c: int) -> dict:
    """Document masks of the padded rows: ids (column and row layouts), ``reads`` (in the
    document entering the chunk) and ``last`` (in the document leaving it)."""
    starts = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))
    doc = jnp.pad(jnp.cumsum(starts.astype(jnp.int32), axis=1), ((0, 0), (0, pad)), mode="edge")
    dc = rearrange(doc, "b (n c) -> b n c", c=c)
    doc_in = jnp.concatenate([jnp.zeros_like(dc[:, :1, -1]), dc[:, :-1, -1]], axis=1)  # [b, n]
    col = lambda x: rearrange(x, "b n c -> b (n c) 1")  # noqa: E731
    return {
        "doc_c": col(dc),
        "doc_r": rearrange(dc, "b n c -> b n 1 c"),
        "reads": col((dc == doc_in[..., None]).astype(F32)),
        "last": col((dc == dc[..., -1:]).astype(F32)),
    }


def _inputs(q, k, v, beta, gam, docs, cfg: Cfg) -> dict:
    """Kernel operands by name (``beta``/``gam`` ``[batch, heads, len]`` f32)."""
    row = lambda x: rearrange(x, "b h (n c) -> b h n 1 c", c=cfg.chunk)  # noqa: E731
    ins = dict(q=q, k=k, v=v, beta_c=beta[..., None], gam_c=gam[..., None], gam_r=row(gam))
    return {**ins, **(docs or {})}


def _forward(q, k, v, beta, gam, s0, docs, cfg: Cfg, *, save_states: bool):
    driver = mosaic_gpu_fwd if cfg.lowering == "mosaic" else _DRIVERS[cfg.backend][0]
    inputs = _inputs(q, k, v, beta, gam, docs, cfg)
    return driver.forward(inputs, s0, cfg, save_states=save_states)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _core(q, k, v, beta, gam, s0, docs, cfg: Cfg):
    out, s_final, _ = _forward(q, k, v, beta, gam, s0, docs, cfg, save_states=False)
    return out, s_final


def _core_fwd(q, k, v, beta, gam, s0, docs, cfg: Cfg):
    out, s_final, saved = _forward(q, k, v, beta, gam, s0, docs, cfg, save_states=True)
    return (out, s_final), (q, k, v, beta, gam, docs, saved)


def _core_bwd(cfg: Cfg, res, cts):
    q, k, v, beta, gam, docs, saved = res  # saved: the forward driver's residuals
    do, ds_final = cts
    driver = mosaic_gpu_bwd if cfg.lowering == "mosaic" else _DRIVERS[cfg.backend][1]
    dq, dk, dv, dbeta, dgam_c, dgam_r, ds0 = driver.backward(
        _inputs(q, k, v, beta, gam, docs, cfg), saved, do.astype(q.dtype), ds_final, cfg
    )
    dgam = dgam_c[..., 0] + rearrange(dgam_r, "b h n 1 c -> b h (n c)")
    return dq.astype(q.dtype), dk.astype(k.dtype), dv, dbeta[..., 0], dgam, ds0, None


_core.defvjp(_core_fwd, _core_bwd)


def _resolve(backend: str | None, interpret: bool | None) -> tuple[str, bool]:
    platform = jax.default_backend()
    backend = backend or ("tpu" if platform == "tpu" else "gpu")
    return backend, (platform != backend if interpret is None else interpret)


def gated_delta_rule(
    q: jax.Array,  # [batch, len, heads, dk]
    k: jax.Array,  # [batch, len, heads, dk]
    v: jax.Array,  # [batch, len, heads, dv]
    beta: jax.Array,  # [batch, len, heads]
    *,
    log_decay: jax.Array | None = None,  # [batch, len, heads] <= 0; None: DeltaNet
    initial_state: jax.Array | None = None,  # [batch, heads, dk, dv] float32
    segment_ids: jax.Array | None = None,  # [batch, len] int; a change starts a new document
    chunk_size: int = 64,
    block_v: int | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
    lowering: str = "triton",
    tuning: TritonTuning | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(out [batch, len, heads, dv] in q's dtype, final_state [batch, heads, dk, dv] f32)``,
    differentiable in every float argument.

    ``block_v``: value columns per program (default on GPU: the largest of ``min(dv, 8192 //
    dk)`` halved down to 16 that divides dv, else dv; all of dv on TPU);
    ``backend`` defaults to the platform's (the GPU kernels on CPU), ``interpret`` to True
    off that platform. Lengths need not be multiples of ``chunk_size`` (zero padding).
    ``lowering`` (``backend="gpu"`` only): "triton", or "mosaic" for the Hopper kernels
    (:mod:`.mosaic_gpu_fwd`, :mod:`.mosaic_gpu_bwd`; chunk 64, bf16/fp16, dk 64 or 128, dv a
    multiple of 64). ``tuning``: the Triton kernels' launch parameters
    (:class:`.tuning.TritonTuning`; default: its measured defaults).
    """
    backend, interpret = _resolve(backend, interpret)
    if lowering not in ("triton", "mosaic") or (lowering == "mosaic" and backend != "gpu"):
        raise ValueError(
            "gated_delta_rule (Pallas): lowering must be 'triton' or 'mosaic' (backend 'gpu'), "
            f"got {lowering!r} with backend {backend!r}"
        )
    if lowering == "mosaic":
        mosaic_gpu_fwd.check_supported(q, v, chunk=chunk_size)
    tuning = TritonTuning() if tuning is None else tuning
    if not isinstance(tuning, TritonTuning):
        raise TypeError(
            f"gated_delta_rule (Pallas): tuning must be a TritonTuning, got {type(tuning).__name__}"
        )
    dv = v.shape[-1]
    if block_v is None:
        block_v = _default_block_v(q.shape[-1], dv) if backend == "gpu" else dv
    _validate(q, k, v, beta, log_decay, initial_state, segment_ids, chunk_size, block_v,
              backend, backend == "gpu" and not interpret)  # fmt: skip
    b, length, h, dk = q.shape
    c, pad = chunk_size, -length % chunk_size
    g = jnp.zeros(beta.shape, F32) if log_decay is None else log_decay.astype(F32)
    beta, g = (jnp.pad(rearrange(x.astype(F32), "b l h -> b h l"), ((0, 0), (0, 0), (0, pad)))
               for x in (beta, g))  # fmt: skip
    gam = rearrange(jnp.cumsum(rearrange(g, "b h (n c) -> b h n c", c=c), axis=-1),
                    "b h n c -> b h (n c)")  # fmt: skip
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    if backend == "tpu":
        q, k, v = (rearrange(x, "b l h d -> b h l d") for x in (q, k, v))
    docs = None if segment_ids is None else _documents(segment_ids, pad, c)
    s0 = jnp.zeros((b, h, dk, dv), F32) if initial_state is None else initial_state
    segments, exact = segment_ids is not None, q.dtype == F32
    cfg = Cfg(backend, interpret, c, block_v, segments, exact, lowering, tuning)
    out, s_final = _core(q, k, v, beta, gam, s0, docs, cfg)
    if backend == "tpu":
        out = rearrange(out, "b h l d -> b l h d")
    return out[:, :length], s_final


__all__ = ["BACKENDS", "TritonTuning", "gated_delta_rule"]
