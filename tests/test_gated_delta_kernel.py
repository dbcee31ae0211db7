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
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from einops import rearrange
from test_gated_delta_rule import inputs

from arjax.ops import gated_delta_rule, gated_delta_rule_reference
from kernels_pallas.gated_delta import (
    TritonTuning,
    _documents,
    mosaic_gpu_fwd,
    triton_bwd,
)
from kernels_pallas.gated_delta import _inputs as gated_delta_inputs
from kernels_pallas.gated_delta import gated_delta_rule as kernel
from kernels_pallas.gated_delta._chunk import Cfg

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


@pytest.mark.parametrize(
    "backend, segments, grad_tiles",
    [("gpu", SEGMENTS, 1), ("gpu", SEGMENTS, 2), ("gpu", None, 2), ("tpu", SEGMENTS, None)],
)
def test_kernel_matches_the_recurrence(backend, segments, grad_tiles, rng, monkeypatch):
    """``grad_tiles``: value tiles of the GPU gradient kernel (its default tile takes all of
    DV here; 2 sums each term over two tiles, :class:`._chunk.TileSums`), set by
    ``TritonTuning.grad_tile``; the kernel is seen to sum over that many."""
    tuning, summed = None, []
    if grad_tiles is not None:
        tuning = TritonTuning(grad_tile=DK * DV // grad_tiles)
        assert triton_bwd.grad_block_v(DK, DV, 16, tuning.grad_tile) == DV // grad_tiles

        class Sums(triton_bwd.TileSums):  # records how many tiles each kernel trace sums
            def __init__(self, ch, tiles, dbeta):
                summed.append(len(tiles))
                super().__init__(ch, tiles, dbeta)

        monkeypatch.setattr(triton_bwd, "TileSums", Sums)
    q, k, v, beta, g, s0 = inputs(rng, gated=True, shape=(B, L, H, DK, DV))
    seed = int(rng.integers(2**31))

    def pallas(q, k, v, beta, g, s0):
        return kernel(q, k, v, beta, log_decay=g, initial_state=s0, segment_ids=segments,
                      chunk_size=16, block_v=16, backend=backend, interpret=True,
                      tuning=tuning)  # fmt: skip

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
    if grad_tiles is not None:
        assert summed and set(summed) == {grad_tiles}, summed


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
    with pytest.raises(TypeError, match="tuning must be a TritonTuning, got dict"):
        kernel(q, k, v, beta, tuning={"warps": 4})
    x64 = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
    b64 = jnp.full((1, 64, 1), 0.5, jnp.float32)
    with pytest.raises(ValueError, match=r"lowering='mosaic'\): dv must be a multiple of 64"):
        kernel(x64, x64, x64[..., :32], b64, lowering="mosaic")
    with pytest.raises(ValueError, match="lowering must be 'triton' or 'mosaic'"):
        kernel(x64, x64, x64, b64, lowering="cuda")
    with pytest.raises(ValueError, match=r"kernel_warps\['gated_delta_bwd'\]: must be a power"):
        TritonTuning(kernel_warps=(("gated_delta_bwd", 6),))
    with pytest.raises(ValueError, match="TritonTuning.grad_tile: must be a positive int, got 0"):
        TritonTuning(grad_tile=0)
    assert TritonTuning(kernel_warps=(("gated_delta_bwd", 8),)).warps_of("gated_delta_bwd") == 8


def _fused_errors(q, k, v, beta, g, s0, seg, *, interpret: bool, rng) -> dict:
    """Max errors (of the largest reference value) of ``lowering="mosaic"`` against the
    float32 recurrence on float32 copies of the same inputs: output, state and every gradient;
    ``vs triton``: its output against the Triton forward's. Asserts that the fused pass run
    alone (saving no states) gives the output and state it gave under ``jax.grad``."""
    w_out = rng.normal(size=v.shape).astype(np.float32)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731

    def grads(fn):
        def loss(*a):
            out, state = fn(*a)
            return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(state), (out, state)

        return jax.jit(jax.grad(loss, argnums=tuple(range(6)), has_aux=True))(q, k, v, beta, g, s0)

    def pallas(*a, lowering):
        return kernel(*a[:4], log_decay=a[4], initial_state=a[5], segment_ids=seg,
                      backend="gpu", interpret=interpret, lowering=lowering)  # fmt: skip

    got_grads, got = grads(functools.partial(pallas, lowering="mosaic"))
    want_grads, want = grads(lambda q, k, v, beta, g, s0: gated_delta_rule_reference(
        f32(q), f32(k), f32(v), beta, log_decay=g, initial_state=s0, segment_ids=seg))  # fmt: skip
    triton_out, _ = jax.jit(functools.partial(pallas, lowering="triton"))(q, k, v, beta, g, s0)
    alone = jax.jit(functools.partial(pallas, lowering="mosaic"))(q, k, v, beta, g, s0)
    err = lambda a, b: float(jnp.abs(f32(a) - f32(b)).max() / jnp.abs(f32(b)).max())  # noqa: E731
    # the forward alone (no states saved) gives what the differentiated one gave
    assert err(alone[0], got[0]) < 1e-6 and err(alone[1], got[1]) < 1e-6
    names = ("dq", "dk", "dv", "dbeta", "dlog_decay", "ds0", "out", "state")
    pairs = zip(names, (*got_grads, *got), (*want_grads, *want))
    errs = {n: err(a, b) for n, a, b in pairs if b is not None}  # no log_decay: no gradient
    return {**errs, "vs triton": err(got[0], triton_out)}


# packed documents of 70, 58, 30 and 42 tokens: starts inside chunk 1 and at chunk 2's first
# token; the last document starts inside chunk 2 and goes on in chunk 3
DOCS = np.repeat([[1, 2, 3, 4]], [70, 58, 30, 42], axis=1)


@pytest.mark.parametrize(
    "dk, dv, dtype, docs, gated",
    [(64, 64, jnp.bfloat16, True, True),
     (128, 128, jnp.bfloat16, False, True),
     (64, 128, jnp.float16, True, False),
     (64, 192, jnp.bfloat16, True, True),
     (128, 64, jnp.bfloat16, True, False)],
)  # fmt: skip
def test_mosaic_fused_forward(races, dk, dv, dtype, docs, gated, rng):
    """``lowering="mosaic"`` (the Mosaic GPU UT transform and fused pass; in the backward the
    Mosaic GPU reverse state pass, its producer forming its operands, and gradient kernel, or
    Triton's backward for float16 and dv = 192), interpreted with race detection: 4 chunks
    through a 2-slot ring (one padded), 1 to 3 value tiles, packed documents (``DOCS``), an
    initial state, DeltaNet (no decay) too. Output, final state and every gradient within 2% of
    the largest float32 reference value, the bound of ``test_bf16_inputs_within_bf16_rounding``
    (seen: <= 0.86%); the output within 1% of the Triton forward's (seen: <= 0.29%)."""
    q, k, v, beta, g, s0 = inputs(rng, gated=gated, shape=(1, 200, 2, dk, dv))
    q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    seg = jnp.asarray(DOCS) if docs else None
    errs = _fused_errors(q, k, v, beta, g, s0, seg, interpret=True, rng=rng)
    # UT transform + fused pass with and without saving the states, and for bf16 with dv 64 or
    # 128 the Mosaic GPU backward's state pass and gradient kernel
    races.check(kernels=4 + 2 * (dtype == jnp.bfloat16 and dv in (64, 128)))
    assert errs.pop("vs triton") < 1e-2
    assert all(e < 2e-2 for e in errs.values()), errs


def _ut_reference(k, v, beta, g, docs) -> tuple[np.ndarray, ...]:
    """``(W, UV, T)`` of every chunk of 64 in float64 numpy, ``T = (I + A)^{-1}`` by
    ``np.linalg.solve`` (none of the kernels' code): ``[batch, heads, len, dk]``, ``[batch,
    heads, len, dv]``, ``[batch, heads, chunks, 64, 64]``."""
    k, v, beta, g = (np.asarray(x, np.float64) for x in (k, v, beta, g))
    bsz, length, heads, _ = k.shape
    c, n_chunks = 64, length // 64
    ts = np.zeros((bsz, heads, n_chunks, c, c))
    w, uv = np.zeros((bsz, heads, length, k.shape[3])), np.zeros((bsz, heads, length, v.shape[3]))
    for b, h, n in np.ndindex(bsz, heads, n_chunks):
        t = slice(n * c, (n + 1) * c)
        kk, vv, bb = k[b, t, h], v[b, t, h], beta[b, t, h]
        gam = np.cumsum(g[b, t, h])
        doc = docs[b, t]
        same = doc[:, None] == doc[None, :]
        a = np.tril(kk @ kk.T * np.exp(gam[:, None] - gam[None, :]), -1) * same * bb[:, None]
        inv = np.linalg.solve(np.eye(c) + a, np.eye(c))
        reads = doc == docs[b, max(n * c - 1, 0)]  # rows in the document entering the chunk
        ts[b, h, n] = inv
        w[b, h, t] = inv @ (kk * (bb * np.exp(gam) * reads)[:, None])
        uv[b, h, t] = inv @ (vv * bb[:, None])
    return w, uv, ts


@pytest.mark.parametrize(
    "dk, dv, dtype, docs",
    [(64, 64, jnp.bfloat16, True), (128, 128, jnp.bfloat16, False), (64, 192, jnp.float16, True)],
)  # fmt: skip
def test_mosaic_ut_transform(races, dk, dv, dtype, docs, rng):
    """``lowering="mosaic"``'s UT transform (:func:`mosaic_gpu_fwd.ut_transform`)
    interpreted with race detection, against float64 numpy on the same rounded inputs: 3
    chunks, 2 heads, packed documents (one starts at a chunk's first token), dv in 64-column
    blocks (192). ``T`` (stored in bf16): within ``2^-8`` of the largest reference entry (half
    a bf16 ulp at 1, ``T``'s diagonal; seen <= 8.5e-4, the bf16 rounding), and at least 90% of
    its entries the correctly rounded reference (seen: 91-92% with the doubling's products on
    float16 operands; 99.9% with three-pass bf16 products, which gave the same ``W`` and
    ``UV``; 83% with one-pass bf16 products); ``W``, ``UV`` within 1% of their largest
    reference value (seen: <= 0.53%)."""
    shape = (1, 192, 2, dk, dv)
    _, k, v, beta, g, _ = inputs(rng, gated=True, shape=shape)
    k, v = jnp.asarray(k, dtype), jnp.asarray(v, dtype)
    ids = np.repeat([[1, 2, 3]], [70, 58, 64], axis=1) if docs else np.ones((1, 192), np.int32)
    cfg = Cfg("gpu", True, 64, 64, docs, False, "mosaic")
    beta_t, g_t = (rearrange(jnp.asarray(x), "b l h -> b h l") for x in (beta, g))
    gam = rearrange(jnp.cumsum(rearrange(g_t, "b h (n c) -> b h n c", c=64), axis=-1),
                    "b h n c -> b h (n c)")  # fmt: skip
    ops = gated_delta_inputs(k, k, v, beta_t, gam, _documents(jnp.asarray(ids), 0, 64) if docs
                             else None, cfg)  # fmt: skip
    got = jax.jit(lambda ops: mosaic_gpu_fwd.ut_transform(ops, cfg, save_t=True))(ops)
    races.check(kernels=1)
    want = _ut_reference(k.astype(jnp.float32), v.astype(jnp.float32), beta, g, ids)
    for name, a, b in zip(("W", "UV", "T"), got, want, strict=True):
        a, scale = np.asarray(a, np.float64), np.abs(b).max()
        assert np.abs(a - b).max() < (2**-8 if name == "T" else 1e-2) * scale, name
    rounded = np.asarray(jnp.asarray(want[2], jnp.float32).astype(jnp.bfloat16), np.float64)
    assert np.mean(np.asarray(got[2], np.float64) == rounded) >= 0.9


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_gpu_mosaic_fused_forward(rng):
    """``lowering="mosaic"`` compiled on a Hopper GPU (every kernel Mosaic GPU's): bf16 at
    width 128, 8 chunks, fwd + grads; the second row packs documents. Bounds as in interpret
    mode."""
    q, k, v, beta, g, s0 = inputs(rng, gated=True, shape=(2, 512, 4, 128, 128))
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    seg = jnp.asarray(np.stack([np.ones(512, np.int32), np.repeat([1, 2, 3], [100, 300, 112])]))
    errs = _fused_errors(q, k, v, beta, g, s0, seg, interpret=False, rng=rng)
    assert errs.pop("vs triton") < 1e-2
    assert all(e < 2e-2 for e in errs.values()), errs


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
    "backend, lowering, platform, calls",
    [("gpu", "triton", "cuda", {"__gpu$xla.gpu.triton": 6}),
     ("gpu", "mosaic", "cuda", {"__gpu$xla.gpu.triton": 0, "mosaic_gpu_v2": 4}),
     ("tpu", "triton", "tpu", {"tpu_custom_call": 2})],
)  # fmt: skip
def test_kernels_lower_without_the_device(backend, lowering, platform, calls, gpu_target):
    """Without a GPU/TPU, export for the platform: forward + backward (bf16, head dim 128,
    packed documents, an initial state) lower through Pallas Triton / Mosaic GPU / Mosaic
    TPU: on the GPU three kernels forward (prepare, the state pass, the output; with
    ``lowering="mosaic"`` the UT transform and the fused pass) and three backward (``W`` from
    the saved ``T``, the state pass, the gradients; with ``lowering="mosaic"`` two in Mosaic
    GPU, the state pass forming its operands), on the TPU one each way."""
    sd = jax.ShapeDtypeStruct
    qk = sd((1, 128, 2, 128), jnp.bfloat16)
    gate, seg = sd((1, 128, 2), jnp.float32), sd((1, 128), jnp.int32)
    s0 = sd((1, 2, 128, 128), jnp.float32)

    def grads(q, k, v, beta, g, s0, s):
        def loss(*a):
            out, state = kernel(*a[:4], log_decay=a[4], initial_state=a[5], segment_ids=s,
                                backend=backend, interpret=False, lowering=lowering)  # fmt: skip
            return jnp.sum(out.astype(jnp.float32)) + jnp.sum(state)

        return jax.value_and_grad(loss, argnums=tuple(range(6)))(q, k, v, beta, g, s0)

    checks = [jax.export.DisabledSafetyCheck.custom_call(call) for call in calls]
    with gpu_target() if backend == "gpu" else contextlib.nullcontext():
        exported = jax.export.export(jax.jit(grads), platforms=[platform], disabled_checks=checks)(
            qk, qk, qk, gate, gate, s0, seg
        )
    module = exported.mlir_module()
    assert {call: module.count(f"@{call}(") for call in calls} == calls
