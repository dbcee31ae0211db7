"""Chunked linear-attention scan in Pallas: plain, scalar decay and gated (GLA); fwd + bwd.

Recurrence (Katharopoulos et al. 2020, eq. 5; Yang et al. 2024 "Gated Linear Attention",
eq. 2): ``S_t = diag(a_t) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q_t``, ``a_t = exp(g_t)`` with
``g = log_decay`` None (a_t = 1), ``[batch, len, heads]`` (scalar decay) or
``[batch, len, heads, dk]`` (gated). A new segment (``segment_ids`` changes) zeroes the state
before its first update; the initial state belongs to the first token's segment.

Files: the chunk math shared by both lowerings (:mod:`._chunk`); Pallas Triton forward
(:mod:`.triton_fwd`: state pass, chunk launcher, staged GLA forward, log-gate cumsum) and
backward (:mod:`.triton_bwd`); Pallas Mosaic TPU forward and backward (:mod:`.mosaic_tpu`);
launch parameters, one frozen dataclass per lowering (:mod:`.tuning`); on Hopper, a fused Pallas
Mosaic GPU forward (:mod:`.mosaic_gpu_fwd`, ``lowering="mosaic"``: the state stays on chip;
GLA's scores come from the Triton staged kernel; the backward stays Triton's); the one-token decode
update (:mod:`.decode`); the float32 token-by-token recurrence the kernels are tested against
(:mod:`.reference`). This file validates, pads and dispatches.

Kernels: a state pass (sequential over chunks) gives the chunk-start states ``h[n]`` (stored
in the input dtype for the MMAs) and the final float32 state; a parallel chunk kernel gives
``o``. Backward: a reverse state pass for ``dh[n] = dL/dS_n`` and the initial-state gradient,
then parallel chunk kernels for ``dq, dk, dv`` and ``db = q*dq - k*dk`` (+ the ``e^B`` term on
the last row); ``dg`` follows from ``db`` by the transpose of the chunk-local cumsum.
``backend="gpu"`` (Pallas Triton; native ``[batch, len, heads, dim]`` layout) or ``"tpu"``
(Mosaic; ``[batch, heads, len, dim]``); both run in interpret mode on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange

from kernels_pallas._checks import check_state_and_segments
from kernels_pallas.linear_attention_scan import mosaic_gpu_fwd, mosaic_tpu, triton_bwd, triton_fwd
from kernels_pallas.linear_attention_scan._chunk import (
    BACKENDS,
    F32,
    FACTOR_SPREAD,
    SUB,
    Cfg,
    is_pow2,
    resolve,
)
from kernels_pallas.linear_attention_scan.decode import recurrent_step
from kernels_pallas.linear_attention_scan.reference import linear_attention_recurrence
from kernels_pallas.linear_attention_scan.tuning import (
    MosaicTpuTuning,
    TritonTuning,
    default_tuning,
)

__all__ = [
    "BACKENDS",
    "FACTOR_SPREAD",
    "MosaicTpuTuning",
    "TritonTuning",
    "chunked_linear_attention",
    "linear_attention_recurrence",
    "recurrent_step",
]

_LOWERINGS = {"gpu": (triton_fwd, triton_bwd), "tpu": (mosaic_tpu, mosaic_tpu)}


def _forward(q, k, v, b, s0, seg, cfg: Cfg, *, save: bool):
    """``((o, s_final), (h, A, b))``: ``A`` the staged GLA scores (else None); ``h`` is None
    from the fused forward unless ``save`` (the backward's residual); ``b`` the chunk-local
    log-gate cumsum (formed here from the gates ``b`` holds with ``cfg.gates_in``)."""
    if cfg.gates_in:  # GLA: Triton's scores (and the cumsum b of the gates), the fused pass
        a, qg, kg, b = triton_fwd.gla_scores(q, k, b, seg, cfg, scaled=True)
        decays = mosaic_gpu_fwd.state_decays(b, seg)
        o, s_final, h = mosaic_gpu_fwd.forward_gated(qg, kg, v, a, decays, s0, save_states=save,
                                                     interpret=cfg.interpret)  # fmt: skip
        return (o, s_final), (h, a, b)
    if cfg.lowering == "mosaic":
        o, s_final, h = mosaic_gpu_fwd.forward(q, k, v, b, s0, seg, save_states=save,
                                               interpret=cfg.interpret)  # fmt: skip
        return (o, s_final), (h, None, b)
    r, rp = seg if cfg.segments else (None, None)
    fwd = _LOWERINGS[cfg.backend][0]
    h, s_final = fwd.state_pass(k, v, b, s0, r, rp, cfg, reverse=False, h_dtype=q.dtype)
    o, a = fwd.forward(q, k, v, b, h, seg, cfg)
    return (o, s_final), (h, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _scan(q, k, v, b, s0, seg, cfg):
    return _forward(q, k, v, b, s0, seg, cfg, save=False)[0]


def _scan_fwd(q, k, v, b, s0, seg, cfg):
    out, (h, a, b) = _forward(q, k, v, b, s0, seg, cfg, save=True)
    return out, (q, k, v, b, seg, h, a)


def _scan_bwd(cfg, res, cts):
    q, k, v, b, seg, h, a = res
    do, ds_final = cts
    r, rp = seg if cfg.segments else (None, None)
    do = do.astype(q.dtype)
    fwd, bwd = _LOWERINGS[cfg.backend]
    dh, ds0 = fwd.state_pass(q, do, b, ds_final.astype(F32), r, rp, cfg, reverse=True,
                             h_dtype=q.dtype)  # fmt: skip
    dq, dk, dv, db = bwd.backward(q, k, v, b, seg, h, a, dh, do, cfg)
    if cfg.gates_in:  # the scan took g: the cumsum's transpose, the reverse cumsum
        db = triton_fwd.reverse_cumsum(db, cfg.chunk, cfg.interpret)
    seg_ct = None if seg is None else tuple(jnp.zeros(x.shape, jax.dtypes.float0) for x in seg)
    return dq, dk, dv, db, ds0, seg_ct


_scan.defvjp(_scan_fwd, _scan_bwd)


def _validate(q, k, v, log_decay, initial_state, segment_ids, chunk_size, backend):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"chunked_linear_attention: {name} must be 4-D, got {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"chunked_linear_attention: {name} must be floating, got {x.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"chunked_linear_attention: q {q.shape} and k {k.shape} differ")
    b, length, h, dk = q.shape
    if v.shape[:3] != (b, length, h):
        raise ValueError(
            f"chunked_linear_attention: v must be [batch, len, heads, dv] with "
            f"(batch, len, heads)={(b, length, h)}, got {v.shape}"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"chunked_linear_attention: dtypes differ: {q.dtype} {k.dtype} {v.dtype}")
    if log_decay is not None and log_decay.shape not in ((b, length, h), (b, length, h, dk)):
        raise ValueError(
            f"chunked_linear_attention: log_decay must be [batch, len, heads]={(b, length, h)} "
            f"or [batch, len, heads, dk], got {log_decay.shape}"
        )
    check_state_and_segments(
        "chunked_linear_attention", initial_state, segment_ids, (b, h, dk, v.shape[3]), (b, length)
    )
    if not isinstance(chunk_size, int) or chunk_size <= 0 or chunk_size % SUB:
        raise ValueError(
            f"chunked_linear_attention: chunk_size must be a positive multiple of {SUB}, "
            f"got {chunk_size!r}"
        )
    if backend not in BACKENDS:
        raise ValueError(
            f"chunked_linear_attention: backend must be one of {BACKENDS}, got {backend!r}"
        )
    # interpreted too: the Triton programs' tiles must divide the dims (a remainder would be
    # read out of bounds: NaN, not an error)
    if backend == "gpu" and not all(is_pow2(n) and n >= 16 for n in (dk, v.shape[3], chunk_size)):
        raise ValueError(
            "chunked_linear_attention: the Triton kernels need dk, dv and chunk_size powers of "
            f"two >= 16, got dk={dk}, dv={v.shape[3]}, chunk_size={chunk_size}"
        )


def _document_index(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per token: how many segment starts precede it (``[b, len, 1]``), and the previous one's."""
    starts = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
    r = jnp.concatenate([jnp.zeros_like(starts[:, :1]), jnp.cumsum(starts, axis=1)], axis=1)
    rp = jnp.concatenate([r[:, :1], r[:, :-1]], axis=1)
    return r[..., None], rp[..., None]


def chunked_linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    log_decay: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int = 64,
    backend: str | None = None,
    interpret: bool | None = None,
    tuning: TritonTuning | MosaicTpuTuning | None = None,
    lowering: str = "triton",
) -> tuple[jax.Array, jax.Array]:
    """Causal (gated) linear attention, chunked scan (GLA paper sec. 4); differentiable.

    q/k ``[batch, len, heads, dk]``, v ``[batch, len, heads, dv]``; returns
    ``(out [batch, len, heads, dv] in q.dtype, final_state [batch, heads, dk, dv] float32)``.
    ``backend`` "gpu" (Triton) or "tpu" (Mosaic), default from the platform; ``interpret``
    defaults to True on CPU. ``tuning``: the lowering's launch parameters (``TritonTuning`` for
    "gpu", ``MosaicTpuTuning`` for "tpu"), default the row of :mod:`.tuning` for the gate.
    ``lowering`` ("gpu" only): "triton", or "mosaic" for the fused Hopper forward
    (:mod:`.mosaic_gpu_fwd`: chunk 64, bf16/fp16, dk 64 or 128; the backward is Triton's
    either way).
    """
    backend, interpret = resolve(backend, interpret)
    _validate(q, k, v, log_decay, initial_state, segment_ids, chunk_size, backend)
    if lowering not in ("triton", "mosaic") or (lowering == "mosaic" and backend != "gpu"):
        raise ValueError(
            "chunked_linear_attention: lowering must be 'triton' or 'mosaic' (backend 'gpu'), "
            f"got {lowering!r} with backend {backend!r}"
        )
    bsz, length, heads, dk = q.shape
    dv = v.shape[3]
    c = chunk_size
    pad = -length % c
    gate = "none" if log_decay is None else ("scalar" if log_decay.ndim == 3 else "gated")
    tuning = default_tuning(backend, gate) if tuning is None else tuning
    want = MosaicTpuTuning if backend == "tpu" else TritonTuning
    if not isinstance(tuning, want):
        raise ValueError(
            f"chunked_linear_attention: tuning for backend {backend!r} must be a "
            f"{want.__name__}, got {type(tuning).__name__}"
        )
    if lowering == "mosaic":
        mosaic_gpu_fwd.check_supported(q, v, chunk=c)
    cfg = Cfg(backend, interpret, c, gate, segment_ids is not None, q.dtype == jnp.float32,
              tuning, lowering)  # fmt: skip

    def pad_len(x, mode="constant"):
        return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), mode=mode)

    q, k, v = (pad_len(x) for x in (q, k, v))
    b = None
    if log_decay is not None:  # chunk-local inclusive cumsum of the log-gates, float32
        g = pad_len(log_decay.astype(F32))
        g = g if g.ndim == 4 else g[..., None]
        if cfg.gates_in:
            b = g  # the scores kernel forms the cumsum
        elif cfg.staged:
            b = triton_fwd.local_cumsum(g, c, interpret)
        else:
            b = rearrange(jnp.cumsum(rearrange(g, "b (n c) h d -> b n c h d", c=c), axis=2),
                          "b n c h d -> b (n c) h d")  # fmt: skip
    seg = None if segment_ids is None else _document_index(pad_len(segment_ids, "edge"))
    s0 = jnp.zeros((bsz, heads, dk, dv), F32) if initial_state is None else initial_state
    if backend == "tpu":
        to_heads = lambda x: None if x is None else rearrange(x, "b l h d -> b h l d")
        q, k, v, b = (to_heads(x) for x in (q, k, v, b))
    out, s_final = _scan(q, k, v, b, s0, seg, cfg)
    if backend == "tpu":
        out = rearrange(out, "b h l d -> b l h d")
    return out[:, :length], s_final
