"""The GPU kernels lower for CUDA on this CPU machine (``jax.export``, ``platforms=["cuda"]``).

CI runs the kernels in Pallas interpret mode, which never lowers their compiled path: a Mosaic
GPU construct that the GPU lowering rejects (a misplaced fence, a wgmma operand of the wrong
shape or layout) would only show on a GPU. Exporting lowers that path (Pallas to Mosaic GPU
or Triton IR) without compiling it to machine code; the GPU suite (``experiments/gpu_suite.sh``)
still runs the kernels for real. (The gated delta rule's kernels are exported, and counted, in
``tests/test_gated_delta_kernel.py``.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import export

from kernels_pallas.flash_attention import flash_attention, flash_decode
from kernels_pallas.linear_attention_scan import chunked_linear_attention

B, L, H, D = 1, 256, 2, 64
GPU = dict(backend="gpu", interpret=False)


def _grads(fn, differentiated: int):
    """fwd + bwd: the gradient of ``fn``'s (first) output summed, w.r.t. its first
    ``differentiated`` arguments."""

    def loss(*args):
        out = fn(*args)
        out = out[0] if isinstance(out, tuple) else out
        return jnp.sum(out.astype(jnp.float32))

    return jax.grad(loss, argnums=tuple(range(differentiated)))


def _attention_case(lowering, segments=False, window=None):
    def fn(q, k, v, seg):
        ids = dict(q_segment_ids=seg, kv_segment_ids=seg) if segments else {}
        return flash_attention(q, k, v, causal=True, window=window, lowering=lowering, **GPU, **ids)

    x = jax.ShapeDtypeStruct((B, L, H, D), jnp.bfloat16)
    return _grads(fn, 3), (x, x, x, jax.ShapeDtypeStruct((B, L), jnp.int32))


def _decode_case():
    q = jax.ShapeDtypeStruct((4, 1, H, D), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((4, L, H, D), jnp.bfloat16)
    return (lambda q, k, v: flash_decode(q, k, v, **GPU)), (q, kv, kv)


def _scan_case(gated: bool, lowering: str = "triton", dk: int = D, segments: bool = False):
    x = jax.ShapeDtypeStruct((B, L, H, dk), jnp.bfloat16)
    g = jax.ShapeDtypeStruct((B, L, H, dk) if gated else (B, L, H), jnp.float32)

    def fn(q, k, v, g, seg, s0):  # segments: packed documents and an initial state
        more = dict(segment_ids=seg, initial_state=s0) if segments else {}
        return chunked_linear_attention(q, k, v, log_decay=g, lowering=lowering, **GPU, **more)

    s0 = jax.ShapeDtypeStruct((B, H, dk, dk), jnp.float32)
    return _grads(fn, 4), (x, x, x, g, jax.ShapeDtypeStruct((B, L), jnp.int32), s0)


CASES = {
    "flash mosaic fwd+bwd": (lambda: _attention_case("mosaic"), "mosaic_gpu"),
    "flash mosaic fwd+bwd, segment ids": (
        lambda: _attention_case("mosaic", segments=True), "mosaic_gpu"),
    "flash mosaic fwd+bwd, window": (lambda: _attention_case("mosaic", window=96), "mosaic_gpu"),
    "flash triton fwd+bwd, segment ids": (
        lambda: _attention_case("triton", segments=True), "triton"),
    "flash_decode": (_decode_case, "triton"),
    "linear-attention scan, scalar decay, fwd+bwd": (lambda: _scan_case(False), "triton"),
    "linear-attention scan, gated, fwd+bwd": (lambda: _scan_case(True), "triton"),
    "linear-attention scan, fused mosaic forward, fwd+bwd": (
        lambda: _scan_case(False, "mosaic"), "mosaic_gpu"),
    "linear-attention scan, fused mosaic forward, dk 128, segment ids, initial state": (
        lambda: _scan_case(False, "mosaic", 128, segments=True), "mosaic_gpu"),
    "linear-attention scan, fused mosaic forward, gated, fwd+bwd": (
        lambda: _scan_case(True, "mosaic"), "mosaic_gpu"),
    "linear-attention scan, fused mosaic forward, gated, dk 128, segment ids, initial state": (
        lambda: _scan_case(True, "mosaic", 128, segments=True), "mosaic_gpu"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_gpu_kernels_lower_for_cuda(name, gpu_target):
    make, kind = CASES[name]
    fn, args = make()
    # Triton kernels are not stable across versions, so export refuses them unless told
    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    with gpu_target():
        exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton])(*args)
    module = exported.mlir_module()
    calls = [line for line in module.splitlines() if "stablehlo.custom_call" in line]
    assert any(kind in line for line in calls), f"no {kind} kernel in the exported module"
    assert not any("callback" in line for line in calls), "the interpret path was lowered"
