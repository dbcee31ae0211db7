"""Pallas chunked linear-attention scan vs the float32 token-by-token recurrence.

On CPU both kernel variants (Triton-style "gpu" and Mosaic-style "tpu") run in interpret mode;
``@pytest.mark.gpu`` tests run the compiled Triton kernels when a GPU is present.
Tolerances: float32 values and gradients within 2e-4 relative to the reference's largest
magnitude (the chunked form reassociates sums); bf16 inputs within 2e-2 (q, k, v and the MMA
operands rounded to 8 mantissa bits, 4e-3 each, summed over a chunk).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.gated_delta import gated_delta_rule as gated_delta_kernel
from kernels_pallas.linear_attention_scan import (
    FACTOR_SPREAD,
    MosaicTpuTuning,
    TritonTuning,
    chunked_linear_attention,
    linear_attention_recurrence,
    mosaic_gpu_fwd,
    recurrent_step,
)

GATES = ("none", "scalar", "gated")


def rel_err(x, y) -> float:
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    return float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-12))


def make_inputs(seed, batch, length, heads, dk, dv, gate, gate_scale=1.0, dtype=jnp.float32):
    """q, k, v, log_decay (<= 0 or None), initial state; fresh random values per seed.

    ``gate_scale``: a float or a ``[length]`` array (per-token gate strength).
    """
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (batch, length, heads, dk)) * 0.5
    k = jax.random.normal(ks[1], (batch, length, heads, dk)) * 0.5
    v = jax.random.normal(ks[2], (batch, length, heads, dv))
    g = None
    if gate != "none":
        shape = (batch, length, heads) + ((dk,) if gate == "gated" else ())
        scale = jnp.reshape(jnp.asarray(gate_scale, jnp.float32), (1, -1) + (1,) * (len(shape) - 2))
        g = scale * jax.nn.log_sigmoid(jax.random.normal(ks[3], shape) + 1.0)
    s0 = jax.random.normal(ks[4], (batch, heads, dk, dv))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), g, s0


def check_against_reference(
    backend, gate, *, length, chunk, seg, seed, scale=1.0, tol=2e-4, tune=None, dims=(16, 16),
    kernels=None,
):  # fmt: skip
    """Outputs, final state and every input gradient (one vjp each) vs the recurrence.

    ``tune``: the lowering's tuning for the kernel (else the table's row); ``dims``: (dk,
    dv); ``kernels``: if given, the set of Pallas kernel names the call must run.
    """
    dk, dv = dims
    q, k, v, g, s0 = make_inputs(seed, 2, length, 1, dk, dv, gate, gate_scale=scale)
    args = (q, k, v, g, s0) if g is not None else (q, k, v, s0)

    def split(a):
        return (a[0], a[1], a[2], a[3], a[4]) if g is not None else (a[0], a[1], a[2], None, a[3])

    def kernel(*a):
        q, k, v, g, s0 = split(a)
        return chunked_linear_attention(
            q, k, v, log_decay=g, initial_state=s0, segment_ids=seg, chunk_size=chunk,
            backend=backend, interpret=True, tuning=tune,
        )  # fmt: skip

    def reference(*a):
        q, k, v, g, s0 = split(a)
        return linear_attention_recurrence(q, k, v, log_decay=g, initial_state=s0, segment_ids=seg)

    @jax.jit
    def run(args, cts):  # one compile per path: outputs and the vjp of both outputs
        out = {}
        for name, fn in (("kernel", kernel), ("reference", reference)):
            (o, s), vjp = jax.vjp(fn, *args)
            out[name] = (o, s, vjp(cts))
        return out

    cts = (jax.random.normal(jax.random.PRNGKey(seed + 1), v.shape),
           jax.random.normal(jax.random.PRNGKey(seed + 2), s0.shape))  # fmt: skip
    out = run(args, cts)
    if kernels is not None:
        jaxpr = str(jax.make_jaxpr(run)(args, cts))
        assert set(re.findall(r"\bla_[a-z_]+", jaxpr)) == kernels
    (o1, s1, g1), (o2, s2, g2) = out["kernel"], out["reference"]
    assert rel_err(o1, o2) < tol and rel_err(s1, s2) < tol
    names = ("q", "k", "v", "log_decay", "s0") if g is not None else ("q", "k", "v", "s0")
    for name, a, b in zip(names, g1, g2):
        assert rel_err(a, b) < tol, (name, rel_err(a, b))


# Row 0: documents start mid-chunk and exactly at a chunk start (16, 32); row 1: one document.
SEGMENTS = jnp.asarray(np.stack([np.repeat([3, 4, 5, 6], [5, 11, 16, 5]), np.ones(37, int)]))


SPLIT_BWD = {"la_state_fwd", "la_chunk_fwd", "la_state_bwd", "la_chunk_bwd_dq",
             "la_chunk_bwd_dkv"}  # fmt: skip


@pytest.mark.parametrize(
    "backend, gate, segments, tune, kernels",
    [("gpu", "none", True, TritonTuning(bwd_parts=1), None),
     ("gpu", "scalar", False, TritonTuning(bwd_parts=1), None),
     ("gpu", "none", True, None, SPLIT_BWD), ("gpu", "scalar", True, None, SPLIT_BWD),
     ("tpu", "scalar", True, None, None)],
)  # fmt: skip
def test_scan_matches_recurrence(backend, gate, segments, tune, kernels):
    """Odd length (37, padded), initial state, segment resets, fwd and all gradients: no decay
    and scalar decay on the Triton lowering, with one backward chunk kernel and with two
    (``bwd_parts=2``, their default: dq; dk, dv), scalar decay on the Mosaic TPU lowering (its
    sequential grid with VMEM state). GLA: ``test_gla_strong_gates``."""
    seg = SEGMENTS if segments else None
    check_against_reference(backend, gate, length=37, chunk=16, seg=seg, seed=3, tune=tune,
                            kernels=kernels)  # fmt: skip


# Per-token gate strength: log-gates about -0.4 per token on tokens 0-15 (a 16-row block spans
# < FACTOR_SPREAD: factored), about -5 on 16-31 (e^-80 across a block: exact loops) and about -40
# on 32-36 (a block's range far beyond FACTOR_SPREAD: the clamped factored values are discarded
# and only the exact loops count), so one call takes both paths of the GLA diagonal blocks.
MIXED_GATES = np.select([np.arange(37) < 16, np.arange(37) < 32], [1.0, 12.0], 100.0)
STAGED = {"la_chunk_gla_scores", "la_chunk_gla_scores_fix", "la_chunk_gla_out", "la_chunk_gla_da",
          "la_chunk_gla_dv", "la_chunk_gla_dqk", "la_chunk_gla_dqk_fix", "la_cumsum",
          "la_cumsum_rev"}  # fmt: skip
STATE = {"la_state_fwd", "la_state_bwd"}


@pytest.mark.parametrize(
    "backend, tune, chunk, dims, kernels",
    [("gpu", TritonTuning(staged_tile=32, bwd_staged_tile=16, bwd_staged_bk=16), 32, (32, 64),
      STAGED),
     ("gpu", TritonTuning(sub=32), 64, (16, 16), STAGED),
     ("tpu", MosaicTpuTuning(), 64, (16, 16),
      {"la_chunk_fwd", "la_chunk_bwd_dq", "la_chunk_bwd_dkv"})],
)  # fmt: skip
def test_gla_strong_gates(backend, tune, chunk, dims, kernels):
    """GLA, values and all gradients, odd length 37, segments, weak and strong gates in the same
    call (both paths of the diagonal blocks: ``lax.cond`` forward, branch-free backward).
    Triton: the "staged" kernels (scores, output, dA, dv, dq/dk/db and their strong-gate
    fix-ups, the Pallas log-gate cumsum) over several column tiles per chunk, then with 32-row
    sub-chunks; Mosaic TPU: the one-kernel forward (chunk 64: earlier blocks in 16 + 32 row
    slices) and the two-kernel backward. Asserts which kernels run."""
    q, _, _, g, _ = make_inputs(5, 2, 37, 1, 16, 16, "gated", gate_scale=MIXED_GATES)
    b = np.cumsum(np.asarray(g), axis=1)  # the first block is factored, the strong ones are not
    assert np.max(b[:, 0] - b[:, 15]) < FACTOR_SPREAD < np.min(b[:, 16] - b[:, 31])
    assert np.min(np.max(b[:, 32] - b[:, 36], axis=-1)) > 2 * 88.7
    check_against_reference(backend, "gated", length=37, chunk=chunk, seg=SEGMENTS, seed=5,
                            scale=MIXED_GATES, tune=tune, dims=dims,
                            kernels=kernels | STATE)  # fmt: skip


def test_bf16_inputs():
    """bf16 q/k/v, GLA (staged): float32 state and accumulation keep the output and the
    gradients within bf16 accuracy (the factored blocks' factors and the float32 scores A and
    dA are rounded to bf16 for their MMAs)."""
    q, k, v, g, _ = make_inputs(7, 1, 48, 2, 16, 32, "gated", dtype=jnp.bfloat16)
    w = jax.random.normal(jax.random.PRNGKey(8), v.shape)

    def loss(f, q, k, v, g):
        o, s = f(q, k, v, log_decay=g)
        return jnp.sum(o.astype(jnp.float32) * w) + jnp.sum(s), (o, s)

    kernel = functools.partial(chunked_linear_attention, chunk_size=32)
    grad = lambda f: jax.value_and_grad(functools.partial(loss, f), (0, 1, 2, 3), has_aux=True)  # noqa: E731
    (_, (o1, s1)), g1 = jax.jit(grad(kernel))(q, k, v, g)
    (_, (o2, s2)), g2 = grad(linear_attention_recurrence)(q, k, v, g)
    assert o1.dtype == jnp.bfloat16 and s1.dtype == jnp.float32
    assert rel_err(o1, o2) < 2e-2 and rel_err(s1, s2) < 2e-2
    for name, a, b in zip("qkvg", g1, g2):
        assert rel_err(a, b) < 2e-2, (name, rel_err(a, b))


@pytest.mark.parametrize("backend, gate", [("gpu", "none"), ("gpu", "gated"), ("tpu", "scalar")])
def test_recurrent_step_matches_recurrence(backend, gate):
    """Feeding tokens one by one through the fused decode step == the recurrence."""
    q, k, v, g, s0 = make_inputs(9, 2, 5, 3, 16, 8, gate)
    o2, s2 = linear_attention_recurrence(q, k, v, log_decay=g, initial_state=s0)
    step = jax.jit(recurrent_step, static_argnames=("backend", "interpret"))
    state, outs = s0, []
    for t in range(q.shape[1]):
        gt = None if g is None else g[:, t]
        o, state = step(q[:, t], k[:, t], v[:, t], state, log_decay=gt, backend=backend,
                        interpret=True)  # fmt: skip
        outs.append(o)
    assert rel_err(jnp.stack(outs, axis=1), o2) < 1e-5 and rel_err(state, s2) < 1e-5


@pytest.mark.parametrize("gate, kernels", [("none", 4), ("scalar", 4), ("gated", 5)])
def test_tpu_kernels_lower_without_the_device(gate, kernels):
    """Without a TPU, export for platform "tpu": forward + backward (bf16, head dim 128, packed
    documents, an initial state) lower to Mosaic TPU kernels: the state pass and the outputs
    forward, the state pass and the chunk gradients backward (GLA: dq and dk/dv apart)."""
    sd = jax.ShapeDtypeStruct
    x = sd((1, 256, 2, 128), jnp.bfloat16)
    g = sd((1, 256, 2, 128) if gate == "gated" else (1, 256, 2), jnp.float32)
    s0, seg = sd((1, 2, 128, 128), jnp.float32), sd((1, 256), jnp.int32)

    def grads(q, k, v, g, s0, seg):
        def loss(q, k, v, g, s0):
            out, state = chunked_linear_attention(
                q, k, v, log_decay=None if gate == "none" else g, initial_state=s0,
                segment_ids=seg, backend="tpu", interpret=False,
            )  # fmt: skip
            return jnp.sum(out.astype(jnp.float32)) + jnp.sum(state)

        return jax.value_and_grad(loss, argnums=tuple(range(5)))(q, k, v, g, s0)

    exported = jax.export.export(jax.jit(grads), platforms=["tpu"])(x, x, x, g, s0, seg)
    assert exported.mlir_module().count("tpu_custom_call") == kernels


def test_bad_inputs_raise_before_compiling():
    q, k, v, g, s0 = make_inputs(0, 1, 8, 2, 16, 16, "gated")
    cases = {
        "log_decay": dict(log_decay=g[..., :3]),
        "initial_state": dict(initial_state=s0.astype(jnp.bfloat16)),
        "segment_ids": dict(segment_ids=jnp.zeros((1, 8), jnp.float32)),
        "chunk_size": dict(chunk_size=24),
        "backend": dict(backend="cuda"),
        "tuning": dict(tuning=MosaicTpuTuning()),
    }
    for field, kwargs in cases.items():
        with pytest.raises(ValueError, match=field):
            chunked_linear_attention(q, k, v, **kwargs)
    with pytest.raises(ValueError, match="v must be"):
        chunked_linear_attention(q, k, v[:, :4])
    for parts in (0, 3):
        with pytest.raises(ValueError, match="TritonTuning.bwd_parts"):
            TritonTuning(bwd_parts=parts)
    with pytest.raises(ValueError, match="powers of two"):  # compiled Triton: dk = 12
        chunked_linear_attention(q[..., :12], k[..., :12], v, backend="gpu", interpret=False)
    with pytest.raises(ValueError, match="state"):
        recurrent_step(q[:, 0], k[:, 0], v[:, 0], s0[..., :8])
    with pytest.raises(ValueError, match="powers of two"):
        recurrent_step(q[:, 0, :, :12], k[:, 0, :, :12], v[:, 0], s0[:, :, :12], backend="gpu",
                       interpret=False)  # fmt: skip


def _fused_vs_recurrence(q, k, v, g, interpret: bool, seg=None, s0=None) -> dict[str, float]:
    """``lowering="mosaic"`` (the fused Hopper forward; Triton's backward on its saved states):
    relative errors of the output, final state and every input gradient vs the float32
    recurrence, and of the output vs ``lowering="triton"``; the forward alone (no states
    saved) must give the same output and state. ``seg``: segment ids (packed documents);
    ``s0``: an initial state (its gradient checked too)."""
    w = jax.random.normal(jax.random.PRNGKey(3), v.shape)
    f32 = lambda *xs: [x.astype(jnp.float32) for x in xs]  # noqa: E731

    def loss(f, q, k, v, g, s0):
        o, s = f(q, k, v, log_decay=g, segment_ids=seg, initial_state=s0)
        return jnp.sum(o.astype(jnp.float32) * w) + jnp.sum(s), (o, s)

    run = lambda f: jax.value_and_grad(functools.partial(loss, f), (0, 1, 2, 3, 4), has_aux=True)  # noqa: E731
    kernel = functools.partial(chunked_linear_attention, backend="gpu", interpret=interpret,
                               segment_ids=seg, initial_state=s0)  # fmt: skip
    (_, (o1, s1)), g1 = jax.jit(run(functools.partial(kernel, lowering="mosaic")))(q, k, v, g, s0)
    (_, (o2, s2)), g2 = run(linear_attention_recurrence)(*f32(q, k, v), g, s0)
    o3, _ = jax.jit(kernel)(q, k, v, log_decay=g)
    o4, s4 = jax.jit(functools.partial(kernel, lowering="mosaic"))(q, k, v, log_decay=g)
    assert rel_err(o4, o1) < 1e-6 and rel_err(s4, s1) < 1e-6  # forward alone: no states saved
    errs = {"out": rel_err(o1, o2), "state": rel_err(s1, s2), "vs triton": rel_err(o1, o3)}
    names = ["q", "k", "v", "g", "s0"]
    errs.update({f"d{n}": rel_err(a, b) for n, a, b in zip(names, g1, g2) if a is not None})
    return errs


# packed documents of 70, 58, 30 and 42 tokens, 200 in all: starts inside chunk 1 and at chunk
# 2's first token; the last document starts inside chunk 2 and goes on in chunk 3, which reads
# the state chunk 2 leaves (its rows of that document only, nothing carried through chunk 2);
# with weak gates (x 0.05), so that a leak across documents would not decay away
DOCS = np.repeat([[1, 2, 3, 4]], [70, 58, 30, 42], axis=1)


@pytest.mark.parametrize(
    "gate, dk, dv, dtype, docs, init",
    [("scalar", 64, 128, jnp.bfloat16, False, True), ("none", 128, 128, jnp.bfloat16, False, False),
     ("scalar", 128, 64, jnp.float16, False, False), ("scalar", 64, 64, jnp.bfloat16, True, True),
     ("gated", 128, 128, jnp.bfloat16, False, True), ("gated", 64, 64, jnp.float16, True, True)],
)  # fmt: skip
def test_mosaic_fused_forward(races, gate, dk, dv, dtype, docs, init):
    """The fused Mosaic GPU forward, interpreted with race detection: 4 chunks through a 2-slot
    ring (one padded), 1 or 2 value tiles, packed documents (``DOCS``), an initial state; GLA
    (``gated``) with the Triton scores. Output, final state and gradients within the bf16
    bound of the module doc (its states are the MMA operands the Triton path rounds the same
    way); its output within 1e-2 of the Triton forward's."""
    _check_fused_forward(races, 11, gate, dk, dv, dtype, docs, init)


def _check_fused_forward(races, seed, gate, dk, dv, dtype, docs, init) -> None:
    """:func:`test_mosaic_fused_forward`'s case on inputs of ``seed``: 200 tokens, packed
    documents (``DOCS``, weak gates) or not, an initial state or not."""
    q, k, v, g, s0 = make_inputs(seed, 1, 200, 2, dk, dv, gate, 0.05 if docs else 1.0, dtype)
    seg = jnp.asarray(DOCS) if docs else None
    errs = _fused_vs_recurrence(q, k, v, g, interpret=True, seg=seg, s0=s0 if init else None)
    races.check(kernels=2)  # with and without saving the states
    assert errs.pop("vs triton") < 1e-2
    assert all(e < 2e-2 for e in errs.values()), errs


@pytest.mark.parametrize(
    "gate, dk, dv, dtype, docs, init",
    [("scalar", 128, 64, jnp.bfloat16, True, True), ("none", 64, 128, jnp.float16, False, False)],
)  # fmt: skip
def test_mosaic_fused_forward_other_state_update(races, monkeypatch, gate, dk, dv, dtype, docs,
                                                 init):  # fmt: skip
    """The decay modes' other state update than this jax's default (``REGISTER_UPDATE``: ``K^T
    exp(B - b)`` as a register operand from jax 0.11, else the diagonal product), so that both
    run on either jax: as :func:`test_mosaic_fused_forward`."""
    monkeypatch.setattr(mosaic_gpu_fwd, "REGISTER_UPDATE", not mosaic_gpu_fwd.REGISTER_UPDATE)
    _check_fused_forward(races, 12, gate, dk, dv, dtype, docs, init)


def test_mosaic_fused_forward_strong_gla_gates(races):
    """GLA gates whose range inside a chunk exceeds ``FACTOR_SPREAD`` (the scores from Triton's
    fix-up kernel): the fused forward's output, state and gradients within the bf16 bound."""
    q, k, v, g, s0 = make_inputs(14, 1, 128, 2, 64, 64, "gated", 8.0, jnp.bfloat16)
    errs = _fused_vs_recurrence(q, k, v, g, interpret=True, s0=s0)
    races.check(kernels=2)
    assert errs.pop("vs triton") < 1e-2
    assert all(e < 2e-2 for e in errs.values()), errs


@pytest.mark.parametrize("op", ["linear attention", "gated delta rule"])
def test_mosaic_fused_forward_rejects_what_it_lacks(op):
    """Each unsupported feature of ``lowering="mosaic"`` raises naming it, before tracing: the
    scan's and the gated delta rule's (the same fused kernel)."""
    q, k, v, g, _ = make_inputs(0, 1, 64, 2, 64, 64, "scalar", dtype=jnp.bfloat16)
    if op == "linear attention":
        call, name = chunked_linear_attention, "chunked_linear_attention"
    else:
        beta = jnp.full(g.shape, 0.5)
        call = lambda q, k, v, **kw: gated_delta_kernel(q, k, v, beta, **kw)  # noqa: E731
        name = "gated_delta_rule"
    cases = {
        "chunk_size must be 64": dict(chunk_size=32),
        "dtype must be bfloat16 or float16": dict(dtype=jnp.float32),
        "dk must be one of": dict(dk=32),
        "lowering must be": dict(backend="tpu"),
    }
    for problem, kwargs in cases.items():
        dtype, dk = kwargs.pop("dtype", q.dtype), kwargs.pop("dk", 64)
        args = (q[..., :dk].astype(dtype), k[..., :dk].astype(dtype), v.astype(dtype))
        with pytest.raises(ValueError, match=rf"{name}.*{problem}"):
            call(*args, lowering="mosaic", **{"log_decay": g, **kwargs})


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("gate", GATES)
def test_gpu_mosaic_fused_forward(gate):
    """The fused forward compiled on a Hopper GPU: bf16 at width 128, 8 chunks, fwd + grads;
    the second row packs documents."""
    q, k, v, g, _ = make_inputs(12, 2, 512, 4, 128, 128, gate, dtype=jnp.bfloat16)
    seg = jnp.asarray(np.stack([np.ones(512, np.int32), np.repeat([1, 2, 3], [100, 300, 112])]))
    errs = _fused_vs_recurrence(q, k, v, g, interpret=False, seg=seg)
    assert errs.pop("vs triton") < 1e-2
    assert all(e < 2e-2 for e in errs.values()), errs


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("gate", GATES)
def test_gpu_kernels_match_recurrence(gate):
    """Compiled Triton kernels: float32 fwd + gradients, and bf16 forward at width 128."""
    seg = jnp.asarray(np.repeat([[1, 2, 3], [4, 4, 5]], [70, 64, 69], axis=1))
    q, k, v, g, s0 = make_inputs(1, 2, 203, 2, 32, 64, gate)
    args = dict(log_decay=g, initial_state=s0, segment_ids=seg)
    (o1, s1), (o2, s2) = (jax.jit(f)(q, k, v, **args) for f in
                          (chunked_linear_attention, linear_attention_recurrence))  # fmt: skip
    assert rel_err(o1, o2) < 2e-4 and rel_err(s1, s2) < 2e-4
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, **args)[0] ** 2)  # noqa: E731
    g1 = jax.jit(jax.grad(loss(chunked_linear_attention), (0, 1, 2)))(q, k, v)
    g2 = jax.jit(jax.grad(loss(linear_attention_recurrence), (0, 1, 2)))(q, k, v)
    assert all(rel_err(a, b) < 2e-4 for a, b in zip(g1, g2))
    q, k, v, g, _ = make_inputs(2, 2, 512, 4, 128, 128, gate, dtype=jnp.bfloat16)
    o1, _ = jax.jit(chunked_linear_attention)(q, k, v, log_decay=g)
    o2, _ = linear_attention_recurrence(q, k, v, log_decay=g)
    assert rel_err(o1, o2) < 2e-2
