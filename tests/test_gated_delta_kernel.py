"""Pallas gated delta rule (kernels_pallas/gated_delta) in interpret mode, both drivers,
against the float32 recurrence (:func:`arjax.ops.gated_delta_rule_reference`): outputs,
final state and the gradients of every input, with a ragged length (40 tokens, chunks of
16), two value tiles, an initial state and packed documents (the GPU driver also without).

Tolerances: values atol=rtol=1e-4; gradients rtol=1e-4 and atol 1e-5 of the largest
reference gradient (float32 throughout; seen about 3e-7 of it). Each was seen to fail with
the backward broken on purpose (the ``dL/dgam_last`` term dropped, ``dA`` without its
minus sign).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_gated_delta_rule import inputs

from arjax.ops import gated_delta_rule, gated_delta_rule_reference
from kernels_pallas.gated_delta import gated_delta_rule as kernel

B, L, H, DK, DV = 1, 40, 2, 16, 32
SEGMENTS = jnp.asarray([[1] * 10 + [2] * 20 + [3] * 10], jnp.int32)


def _values_and_grads(fn, q, k, v, beta, g, s0, rng):
    """``(out, state), grads`` of a fixed random projection of both outputs, in one jit."""
    w_out = rng.normal(size=(B, L, H, DV)).astype(np.float32)
    w_state = rng.normal(size=(B, H, DK, DV)).astype(np.float32)

    def loss(*args):
        out, state = fn(*args)
        return jnp.sum(out * w_out) + jnp.sum(state * w_state), (out, state)

    grad = jax.grad(loss, argnums=tuple(range(6)), has_aux=True)
    grads, values = jax.jit(grad)(q, k, v, beta, g, s0)
    return values, grads


@pytest.mark.parametrize("backend, segments", [("gpu", SEGMENTS), ("gpu", None), ("tpu", SEGMENTS)])
def test_kernel_matches_the_recurrence(backend, segments, rng):
    q, k, v, beta, g, s0 = inputs(rng, gated=True, shape=(B, L, H, DK, DV))
    seed = int(rng.integers(2**31))

    def pallas(q, k, v, beta, g, s0):
        return kernel(q, k, v, beta, log_decay=g, initial_state=s0, segment_ids=segments,
                      chunk_size=16, block_v=16, backend=backend, interpret=True)  # fmt: skip

    def reference(q, k, v, beta, g, s0):
        return gated_delta_rule_reference(q, k, v, beta, log_decay=g, initial_state=s0,
                                          segment_ids=segments)  # fmt: skip

    got, got_grads = _values_and_grads(pallas, q, k, v, beta, g, s0, np.random.default_rng(seed))
    want, want_grads = _values_and_grads(
        reference, q, k, v, beta, g, s0, np.random.default_rng(seed)
    )
    for name, a, b in zip(("out", "state"), got, want):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=name)
    for name, a, b in zip(("q", "k", "v", "beta", "log_decay", "s0"), got_grads, want_grads):
        scale = float(jnp.abs(b).max())
        np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=1e-4, err_msg=f"d{name}")


def test_bf16_inputs_within_bf16_rounding(rng):
    """bf16 q, k, v (the GPU driver's MMAs take bf16 operands, :attr:`Cfg.precision`, and it
    keeps ``W``, ``U``, the chunk states and their gradients in bf16 between kernels,
    :attr:`Cfg.store`): every output and gradient within 2% of its largest reference value,
    the float32 recurrence on the same bf16 inputs (seen: <= 0.99%, 0.93% with float32 MMA
    operands and partials; float8 storage instead fails at 3-6%)."""
    shape = (1, 64, 2, 32, 32)
    q, k, v, beta, g, s0 = inputs(rng, gated=True, shape=shape)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    w_out = rng.normal(size=shape[:3] + shape[4:]).astype(np.float32)
    w_state = rng.normal(size=s0.shape).astype(np.float32)

    def grads(fn):
        def loss(*a):
            out, state = fn(*a)
            loss = jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(state * w_state)
            return loss, (out, state)

        return jax.jit(jax.grad(loss, argnums=tuple(range(6)), has_aux=True))(q, k, v, beta, g, s0)

    got = grads(lambda q, k, v, beta, g, s0: kernel(
        q, k, v, beta, log_decay=g, initial_state=s0, chunk_size=16, block_v=16, backend="gpu",
        interpret=True))  # fmt: skip
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = grads(lambda q, k, v, beta, g, s0: gated_delta_rule_reference(
        f32(q), f32(k), f32(v), beta, log_decay=g, initial_state=s0))  # fmt: skip
    names = ("dq", "dk", "dv", "dbeta", "dlog_decay", "ds0", "out", "state")
    for name, a, b in zip(names, (*got[0], *got[1]), (*want[0], *want[1]), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, atol=2e-2 * np.abs(b).max(), rtol=0, err_msg=name)


def test_default_value_tile_divides_dv(rng):
    """dv = 96 with dk = 128: the default value tile is 32 (64 would not divide dv)."""
    q, k, v, beta, g, _ = inputs(rng, gated=True, shape=(1, 16, 1, 128, 96))
    out, state = kernel(q, k, v, beta, log_decay=g, chunk_size=16, interpret=True)
    want, want_state = gated_delta_rule_reference(q, k, v, beta, log_decay=g)
    np.testing.assert_allclose(out, want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(state, want_state, atol=1e-4, rtol=1e-4)


def test_deltanet_through_the_op(rng):
    """``arjax.ops.gated_delta_rule(impl="pallas")`` without decay (DeltaNet) dispatches to the
    kernel (interpret mode on CPU) and matches the recurrence."""
    q, k, v, beta, _, _ = inputs(rng, gated=False, shape=(2, 21, 1, 16, 16))
    op = jax.jit(gated_delta_rule, static_argnames=("chunk_size", "impl"))
    out, state = op(q, k, v, beta, chunk_size=16, impl="pallas")
    want, want_state = gated_delta_rule_reference(q, k, v, beta)
    np.testing.assert_allclose(out, want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(state, want_state, atol=1e-4, rtol=1e-4)


def test_bad_arguments_raise_before_compiling(rng):
    q, k, v, beta, g, _ = inputs(rng, gated=True, shape=(B, L, H, DK, DV))
    with pytest.raises(ValueError, match="chunk_size must be a power of two >= 16"):
        kernel(q, k, v, beta, chunk_size=48)
    with pytest.raises(ValueError, match="block_v must divide dv=32"):
        kernel(q, k, v, beta, block_v=24)
    with pytest.raises(ValueError, match="log_decay must be floating"):
        kernel(q, k, v, beta, log_decay=g[:, :3])
    with pytest.raises(ValueError, match="powers of two"):
        kernel(q[..., :12], k[..., :12], v, beta, backend="gpu", interpret=False)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernel(q, k, v, beta, backend="cuda")
    wide = jnp.zeros((1, 16, 1, 64), jnp.float32), jnp.zeros((1, 16, 1, 256), jnp.float32)
    with pytest.raises(ValueError, match="dk x block_v = 64 x 256 exceeds 8192"):
        kernel(wide[0], wide[0], wide[1], beta[:1, :16, :1], block_v=256, backend="gpu",
               interpret=False)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_compiled_gpu_kernel_matches_the_recurrence(rng):
    """The compiled Triton kernels (head dim 64, value tiles of 32 and 64 columns, chunk 64)
    against the recurrence in float32: the same checks as in interpret mode."""
    shape = (2, 200, 2, 64, 128)
    q, k, v, beta, g, s0 = inputs(rng, gated=True, shape=shape)
    seg = jnp.asarray(np.repeat([[1, 2, 3], [1, 1, 2]], [50, 90, 60], axis=1), jnp.int32)
    w_out = rng.normal(size=v.shape).astype(np.float32)

    def grads(fn):
        def loss(*args):
            out, state = fn(*args)
            return jnp.sum(out * w_out) + jnp.sum(state), (out, state)

        return jax.jit(jax.grad(loss, argnums=tuple(range(6)), has_aux=True))(q, k, v, beta, g, s0)

    want_grads, want = grads(lambda q, k, v, beta, g, s0: gated_delta_rule_reference(
        q, k, v, beta, log_decay=g, initial_state=s0, segment_ids=seg))  # fmt: skip
    for block_v in (32, 64):
        got_grads, got = grads(lambda q, k, v, beta, g, s0, bv=block_v: kernel(
            q, k, v, beta, log_decay=g, initial_state=s0, segment_ids=seg, block_v=bv))  # fmt: skip
        for name, a, b in zip(("out", "state"), got, want):
            np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-3, err_msg=f"{name} bv={block_v}")
        for name, a, b in zip(["q", "k", "v", "beta", "log_decay", "s0"], got_grads, want_grads):
            scale = float(jnp.abs(b).max())
            np.testing.assert_allclose(a, b, atol=1e-4 * scale, rtol=1e-3, err_msg=f"d{name}")


@pytest.mark.parametrize(
    "backend, platform, call, kernels",
    [("gpu", "cuda", "__gpu$xla.gpu.triton", 7), ("tpu", "tpu", "tpu_custom_call", 2)],
)
def test_kernels_lower_without_the_device(backend, platform, call, kernels, gpu_target):
    """Without a GPU/TPU, export for the platform: forward + backward (bf16, head dim 128,
    packed documents) lower through Pallas Triton / Mosaic TPU: on the GPU three kernels
    forward (prepare, the state pass, the output) and four backward (prepare, the state pass,
    the value tiles' gradients, the rest), on the TPU one each way."""
    sd = jax.ShapeDtypeStruct
    qk = sd((1, 128, 2, 128), jnp.bfloat16)
    gate, seg = sd((1, 128, 2), jnp.float32), sd((1, 128), jnp.int32)

    def grads(q, k, v, beta, g, s):
        def loss(*a):
            out, state = kernel(*a[:4], log_decay=a[4], segment_ids=s, backend=backend,
                                interpret=False)  # fmt: skip
            return jnp.sum(out.astype(jnp.float32)) + jnp.sum(state)

        return jax.value_and_grad(loss, argnums=tuple(range(5)))(q, k, v, beta, g)

    checks = [jax.export.DisabledSafetyCheck.custom_call(call)]
    with gpu_target() if backend == "gpu" else contextlib.nullcontext():
        exported = jax.export.export(jax.jit(grads), platforms=[platform], disabled_checks=checks)(
            qk, qk, qk, gate, gate, seg
        )
    assert exported.mlir_module().count(f"@{call}(") == kernels
