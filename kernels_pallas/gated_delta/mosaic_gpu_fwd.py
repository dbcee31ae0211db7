"""Hopper forward of the gated delta rule: the UT transform in parallel, then one fused pass.

Triton's :func:`.triton_fwd.prepare` gives every chunk's ``W = T kg`` and ``UV = T beta V``
(parallel over chunks); the fused Pallas Mosaic GPU kernel of the linear-attention scan
(:func:`kernels_pallas.linear_attention_scan.mosaic_gpu_fwd.forward_delta`) then walks the
chunks in order with the state tile on chip: its state warpgroup forms ``U = UV - W S`` and
publishes it with ``S``, its output warpgroup computes ``O = (Q g_read) S + (Q K^T *
decay_incl) U``, as :func:`._chunk.state_step` and :func:`._chunk.output`. Against the three
Triton kernels this drops the state pass's store of ``U`` and every chunk's state and the
output kernel's reads of them. The backward (:mod:`.mosaic_gpu_bwd`: Triton's kernels around a
Mosaic GPU reverse state pass) starts from the states and the ``U`` this pass saves and the
prepare kernel's ``T``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from kernels_pallas.gated_delta import triton_fwd
from kernels_pallas.gated_delta._chunk import Cfg
from kernels_pallas.linear_attention_scan import mosaic_gpu_fwd as fused


def check_supported(q: jax.Array, v: jax.Array, *, chunk: int) -> None:
    """Raise ``ValueError`` naming what the fused forward does not support (before tracing)."""
    fused.check_supported(q, v, chunk=chunk, who="gated_delta_rule")


def forward(inputs: dict, s0: jax.Array, cfg: Cfg, *, save_states: bool):
    """``(o, s_final, res)`` as :func:`.triton_fwd.forward` (same operands by name)."""
    dtype = inputs["q"].dtype
    w, uv, t_mat = triton_fwd.prepare(inputs, cfg, save_t=save_states)
    w, uv = w.astype(dtype), uv.astype(dtype)
    b = rearrange(inputs["gam_c"], "b h l 1 -> b l h 1")
    seg = None
    if cfg.segments:  # document index of each token and of its predecessor
        r = inputs["doc_c"]
        seg = (r, jnp.concatenate([r[:, :1], r[:, :-1]], axis=1))
    o, s_final, saved = fused.forward_delta(
        inputs["q"], inputs["k"], w, uv, b, s0, seg, save_states=save_states,
        interpret=cfg.interpret,
    )  # fmt: skip
    if not save_states:
        return o, s_final, None
    h, u = (x.astype(cfg.store) for x in saved)
    return o, s_final, (h, t_mat, u)
