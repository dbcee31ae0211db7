"""Mosaic GPU flash-attention backward (``kernels_pallas/flash_attention/mosaic_gpu_bwd.py``) vs the
float32 reference.

Given q, k, v, an output cotangent dO and the forward residuals (base-2 log-sum-exp ``lse2``
and ``delta = rowsum(dO * O)``, computed here in float32), the kernels' dq, dk, dv must match
``jax.vjp`` of ``arjax.ops.attention_reference`` in float32 on fresh random bf16/fp16 inputs,
each no farther (max |.|) from it than the gradients of plain XLA attention in the same dtype
(``within_xla_error`` in conftest.py: a baseline computed in each test). On CPU the kernels
run in the Mosaic GPU interpreter (tiny shapes: one or two 128-row CTAs, lengths not multiples
of the tiles, so boundary tiles are partly padded) with its happens-before race detector on,
and each kernel of a call (dK/dV and dQ, or the fused one; the forward too through
``flash_attention``) must have run under it and be race-free (``races`` in conftest.py); tests
marked ``gpu`` compile the real kernels and only run where a GPU is present
(``pytest -m gpu -s`` prints their errors).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.extend import core as jax_core

from arjax.ops import attention, attention_mask, attention_reference
from kernels_pallas import _hopper
from kernels_pallas.flash_attention import (
    flash_attention,
    mosaic_gpu_bwd,
    mosaic_gpu_fwd,
    tuning,
)
from kernels_pallas.flash_attention._common import LOG2_E, Geometry, work_item

FAST_COMPILE = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


def _inputs(rng, b, q_len, kv_len, h, kv_h, d, dtype):
    """q, do ``[b, q_len, h, d]`` and k, v ``[b, kv_len, kv_h, d]``, standard normal."""
    shapes = [(b, q_len, h, d), (b, kv_len, kv_h, d), (b, kv_len, kv_h, d), (b, q_len, h, d)]
    return [jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype) for s in shapes]


@functools.partial(jax.jit, static_argnums=(4, 5, 6))  # one program, not op by op
def _residuals(q, k, v, do, causal: bool, window: int | None, scale: float, segs=(None, None)):
    """Float32 reference grads (dq, dk, dv) and the forward residuals the kernels take:
    ``lse2 [b, h, q_len]`` (base 2, +inf for rows that see no key) and ``delta``; ``segs``:
    query and key segment ids, or Nones."""
    f32 = lambda x: x.astype(jnp.float32)
    seg_kw = dict(q_segment_ids=segs[0], kv_segment_ids=segs[1])
    ref = lambda q, k, v: attention_reference(
        q, k, v, causal=causal, window=window, scale=scale, **seg_kw
    )
    out, vjp = jax.vjp(ref, f32(q), f32(k), f32(v))
    groups = q.shape[2] // k.shape[2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", f32(q), jnp.repeat(f32(k), groups, axis=2)) * scale
    mask = attention_mask(q.shape[1], k.shape[1], causal=causal, window=window, **seg_kw)
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)
    lse2 = jnp.where(jnp.isfinite(lse), lse * LOG2_E, jnp.inf)
    # the kernels see O rounded to the input dtype, as the forward kernels return it
    delta = jnp.einsum("bqhd,bqhd->bhq", f32(do), f32(out.astype(q.dtype)))
    return vjp(f32(do)), lse2, delta


def _check_backward(rng, case, within, tiles=None, interpret=True, races=None):
    case = dict(case)
    causal, window = case.pop("causal"), case.pop("window", None)
    seg_of = case.pop("segments", None)  # length -> ids [b, length]: both sides', or a pair
    q, k, v, do = _inputs(rng, dtype=case.pop("dtype", jnp.bfloat16), **case)
    scale = 1.0 / math.sqrt(case["d"])
    q_of, kv_of = seg_of if isinstance(seg_of, tuple) else (seg_of, seg_of)
    segs = (None, None) if seg_of is None else (q_of(case["q_len"]), kv_of(case["kv_len"]))
    grads_ref, lse2, delta = _residuals(q, k, v, do, causal, window, scale, segs)
    geo = Geometry(
        q_len=case["q_len"], kv_len=case["kv_len"], bq=64, bk=64, causal=causal, window=window,
        has_segments=seg_of is not None, scale=scale, groups=case["h"] // case["kv_h"],
    )  # fmt: skip
    tiles = tiles or mosaic_gpu_bwd.default_tiles(case["d"], min(case["q_len"], case["kv_len"]))
    bwd = lambda *args: mosaic_gpu_bwd.backward(*args[:6], geo, tiles, interpret, *args[6:])
    args = (q, k, v, do, lse2, delta, *(() if seg_of is None else segs))
    compiled = jax.jit(bwd).lower(*args).compile(FAST_COMPILE)
    grads = jax.block_until_ready(compiled(*args))
    if interpret:  # dK/dV then dQ, or the fused kernel
        races.check(kernels=1 if tiles.fused_dq else 2)
    for name, g, x in zip(("dq", "dk", "dv"), grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype, (name, g.shape, g.dtype)
    kw = dict(causal=causal, window=window, scale=scale, q_segment_ids=segs[0],
              kv_segment_ids=segs[1])  # fmt: skip
    xla = lambda q, k, v, do: jax.vjp(lambda *a: attention(*a, impl="xla", **kw), q, k, v)[1](do)
    print(f"{case} causal={causal} window={window}")
    names = ("dq", "dk", "dv")
    within(*(dict(zip(names, g)) for g in (grads, grads_ref, jax.jit(xla)(q, k, v, do))))


FUSED = {64: mosaic_gpu_bwd.Tiles(bq=128, stages=2, fused_dq=True),  # dQ blocks split by rows
         128: mosaic_gpu_bwd.Tiles(bq=64, stages=2, fused_dq=True)}  # by columns  # fmt: skip
CASES = {
    # GQA (2 query heads per KV head), q_len < kv_len (queries at the end), padded boundary
    # tiles, a sliding window: tiles below it are skipped, its lower edge is masked
    "window_d64_gqa_short_q": dict(
        b=1, q_len=70, kv_len=190, h=2, kv_h=1, d=64, causal=True, window=50
    ),
    # the D=128 default tiles: 64 wide, three ring slots
    "noncausal_d128_long_q": dict(b=1, q_len=130, kv_len=70, h=1, kv_h=1, d=128, causal=False),
}
# dQ fused into the dK/dV kernel: its D=128 (dQ blocks by columns) and D=64 (by rows) forms
FUSED_CASES = {
    "causal_d128_gqa_short_q": dict(b=1, q_len=70, kv_len=150, h=2, kv_h=1, d=128, causal=True),
    "window_d64_fp16_gqa": dict(
        b=1, q_len=40, kv_len=130, h=2, kv_h=1, d=64, causal=True, window=50, dtype=jnp.float16
    ),
}


# segment ids (cross lengths: the keys' ids run on past the queries'; ids 5 and 2^24 + 1 each
# come back); the fused kernel masks its dS^T by them, the split ones their tiles
SEGMENT_CASES = {
    "causal_d128_fused": (dict(b=1, q_len=70, kv_len=150, h=2, kv_h=1, d=128, causal=True),
                          FUSED[128]),
    "window_d64_split": (dict(b=1, q_len=130, kv_len=130, h=2, kv_h=1, d=64, causal=True,
                              window=60), None),
    # packed documents (more in DOCUMENT_CASES)
    "packed_d64_split": (dict(b=1, q_len=260, kv_len=260, h=2, kv_h=2, d=64, causal=True,
                              docs=True), None),
    "packed_d128_fused": (dict(b=1, q_len=260, kv_len=260, h=2, kv_h=1, d=128, causal=True,
                               docs=True), FUSED[128]),
}  # fmt: skip


def _segment_ids(length: int) -> jax.Array:
    ids = [5] * 30 + [2**24 + 1] * 45 + [5] * 40 + [2**24 + 1] * 100
    return jnp.asarray([ids[:length]], jnp.int32)


def _documents(length: int) -> jax.Array:
    """Three packed documents, the second ending at row 128."""
    return jnp.asarray([[1] * 40 + [2] * 88 + [3] * (length - 128)], jnp.int32)


@pytest.mark.parametrize("name", sorted(SEGMENT_CASES))
def test_mosaic_backward_with_segment_ids(rng, races, within_xla_error, name):
    case, tiles = SEGMENT_CASES[name]
    case = dict(case)
    case["segments"] = _documents if case.pop("docs", False) else _segment_ids
    _check_backward(rng, case, within_xla_error, tiles=tiles, races=races)


def _packed(*rows):
    """length -> int32 ids ``[len(rows), length]``: the last ``length`` positions of rows of
    packed documents of the given lengths (each row's summing to kv_len), so queries at the end
    of the keys (causal, q_len < kv_len) share their positions' documents."""
    full = [[7 * doc + 3 for doc, n in enumerate(row) for _ in range(n)] for row in rows]
    return lambda length: jnp.asarray([r[len(r) - length :] for r in full], jnp.int32)


Tiles = mosaic_gpu_bwd.Tiles
# packed documents: each tile streams only the tiles of its documents (segment_tile_ranges of
# the 128-row CTA tiles) and runs those inside its one document unmasked (per 64-row consumer)
DOCUMENT_CASES = {
    # row 0: documents cut mid-tile; row 1: one document (every tile of the causal range whole
    # but the diagonal); one 128-row ring slot, so the dK/dV CTAs stream 1 to 3 steps
    "causal_d64_split_stages1": (dict(b=2, q_len=300, kv_len=300, h=1, kv_h=1, d=64,
                                      causal=True, docs=((90, 110, 100), (300,))),
                                 Tiles(bq=128, bk=128, stages=1)),
    # one document over five 64-row tiles between two short ones; three ring slots
    "causal_d128_split_stages3": (dict(b=1, q_len=400, kv_len=400, h=1, kv_h=1, d=128,
                                       causal=True, docs=((30, 330, 40),)),
                                  Tiles(bq=64, bk=64, stages=3)),
    # no causal bound: the documents alone. Row 0: a boundary at row 192 splits a CTA between
    # its consumers, each inside one document; row 1: the second CTA inside one document, the
    # first's second consumer not (each consumer has its own whole tiles)
    "noncausal_d64_split_stages2": (dict(b=2, q_len=330, kv_len=330, h=1, kv_h=1, d=64,
                                         causal=False, docs=((70, 122, 138), (100, 160, 70))),
                                    Tiles(bq=64, bk=64, stages=2)),
    # dQ fused (D=128: blocks by columns): a window and GQA
    "window_d128_fused_gqa": (dict(b=1, q_len=300, kv_len=300, h=2, kv_h=1, d=128,
                                   causal=True, window=100, docs=((50, 200, 50),)),
                              FUSED[128]),
    # dQ fused (D=64: blocks by rows), 150 queries at the end of 330 keys (decode-like offset)
    "short_q_d64_fused": (dict(b=1, q_len=150, kv_len=330, h=2, kv_h=2, d=64, causal=True,
                               docs=((100, 80, 150),)), FUSED[64]),
    # fused, two rows, a single document in row 1 (three ring slots do not fit with segment
    # ids: test_shared_memory_is_counted_as_allocated)
    "causal_d128_fused_two_rows": (dict(b=2, q_len=260, kv_len=260, h=1, kv_h=1, d=128,
                                        causal=True, docs=((150, 40, 70), (260,))),
                                   FUSED[128]),
    # ids that differ between queries and keys: the second KV CTA's keys share a document only
    # with queries before them, so its range is empty while its second consumer's own range
    # starts a query tile later (clipped to the CTA's by _hopper.nested, else a hang)
    "cross_ids_d128_fused": (dict(b=1, q_len=256, kv_len=256, h=1, kv_h=1, d=128, causal=True,
                                  segments=(lambda n: jnp.asarray([[5] * 128 + [6] * 128]),
                                            lambda n: jnp.asarray([[6] * 128 + [5] * 128]))),
                             FUSED[128]),
}  # fmt: skip


def _document_case(name: str) -> tuple[dict, Tiles]:
    """``DOCUMENT_CASES[name]`` with its documents as segment-id makers."""
    case, tiles = DOCUMENT_CASES[name]
    case = dict(case)
    if "docs" in case:
        case["segments"] = _packed(*case.pop("docs"))
    return case, tiles


@pytest.mark.parametrize("name", sorted(DOCUMENT_CASES))
def test_mosaic_backward_with_packed_documents(rng, races, within_xla_error, name):
    case, tiles = _document_case(name)
    _check_backward(rng, case, within_xla_error, tiles=tiles, races=races)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", sorted(DOCUMENT_CASES))
def test_gpu_mosaic_backward_with_packed_documents(rng, within_xla_error, name):
    """The same packed-document cases, compiled: real ring waits on the streamed tile ranges."""
    case, tiles = _document_case(name)
    print(f"\n{name}: compiling and running", flush=True)
    _check_backward(rng, case, within_xla_error, tiles=tiles, interpret=False)


# the default tiles, except a one-slot ring (128-wide streamed tiles) for the D=64 case
RING = {"window_d64_gqa_short_q": mosaic_gpu_bwd.Tiles(bq=128, bk=128, stages=1)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_mosaic_backward_matches_reference_grads(rng, races, within_xla_error, name):
    _check_backward(rng, CASES[name], within_xla_error, tiles=RING.get(name), races=races)


@pytest.mark.parametrize("name", sorted(FUSED_CASES))
def test_mosaic_backward_fused_dq_matches_reference_grads(rng, races, within_xla_error, name):
    tiles = FUSED[FUSED_CASES[name]["d"]]
    _check_backward(rng, FUSED_CASES[name], within_xla_error, tiles=tiles, races=races)


def _api_grads(fn, q, k, v, w):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile(FAST_COMPILE)(q, k, v)


def _check_api(rng, within, interpret: bool, races=None, fused: bool = False, wave=None):
    """``flash_attention(lowering="mosaic")``: Mosaic GPU forward, whose ``lse2`` feeds this
    backward through the custom_vjp (GQA, ragged lengths, q_len < kv_len, causal)."""
    q, k, v, _ = _inputs(rng, b=1, q_len=70, kv_len=130, h=4, kv_h=2, d=64, dtype=jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    mosaic = lambda q, k, v: flash_attention(
        q, k, v, causal=True, backend="gpu", lowering="mosaic", interpret=interpret, wave=wave
    )
    f32 = lambda x: x.astype(jnp.float32)
    ref = lambda q, k, v: attention_reference(f32(q), f32(k), f32(v), causal=True)
    grads = _api_grads(mosaic, q, k, v, w)
    if interpret:  # the forward, then dK/dV and dQ or the fused kernel
        races.check(kernels=2 if fused else 3)
    assert all(g.dtype == jnp.bfloat16 for g in grads), [g.dtype for g in grads]
    xla = lambda q, k, v: attention(q, k, v, causal=True, impl="xla")
    names = ("dq", "dk", "dv")
    within(*(dict(zip(names, g)) for g in (grads, _api_grads(ref, q, k, v, w),
                                           _api_grads(xla, q, k, v, w))))  # fmt: skip


def test_flash_attention_mosaic_lowering_uses_this_backward(rng, races, within_xla_error,
                                                            monkeypatch):  # fmt: skip
    """The call's default tiles (``FUSED_DQ_MIN_LEN`` lowered here to the call's length 70:
    dQ fused into the dK/dV kernel; the split kernels are the default below it, checked by
    ``test_default_tiles_fuse_dq_where_faster``); the Mosaic forward and backward with their
    CTAs in ``work_item`` order over several groups of heads: waves of 2 CTAs (the tiny calls
    fit one real wave; every other test runs all heads as one group)."""
    calls, backward = [], mosaic_gpu_bwd.backward

    def spy(*args):
        calls.append(args[7])  # the tiles (after q, k, v, dO, lse2, delta, geo)
        return backward(*args)

    monkeypatch.setattr(mosaic_gpu_bwd, "backward", spy)
    monkeypatch.setattr(mosaic_gpu_bwd, "FUSED_DQ_MIN_LEN", {64: 70})
    _check_api(rng, within_xla_error, interpret=True, races=races, fused=True, wave=2)
    assert calls == [mosaic_gpu_bwd.Tiles(bq=128, bk=128, stages=2, fused_dq=True)]


def test_launch_order_runs_heavy_tiles_of_each_head_group_first():
    """``work_item``: a bijection from programs to (tile, batch, head); each group of (batch,
    head) pairs in turn, rank by rank (the heaviest tile first: the last query tile, the first
    KV tile), its pairs fastest. ``heads_per_wave``: the largest divisor of the heads that keeps
    a group's CTAs within one wave."""
    tiles, batch, heads, group = 3, 2, 3, 2
    p = jnp.arange(tiles * batch * heads, dtype=jnp.int32)
    for last_first in (True, False):
        got = zip(*(np.asarray(x).tolist() for x in work_item(p, tiles, batch, heads, group,
                                                             last_first)))  # fmt: skip
        want = [((tiles - 1 - r) if last_first else r, divmod(g * group + j, heads))
                for g in range(batch * heads // group) for r in range(tiles)
                for j in range(group)]  # fmt: skip
        assert list(got) == [(t, *bh) for t, bh in want], last_first
    groups = [
        tuning.heads_per_wave(t, h, 132) for t, h in ((16, 128), (64, 32), (256, 16), (16, 12))
    ]
    assert groups == [8, 2, 1, 6]


def test_default_tiles_fuse_dq_where_faster():
    """dQ is fused from 8192 keys per query on, for both head dims, never with segment ids;
    ``flash_attention`` passes a shorter window as that length (H200 runs)."""
    lengths = (2048, 4096, 8192, 32768)
    for d in (64, 128):
        fused = [mosaic_gpu_bwd.default_tiles(d, n).fused_dq for n in lengths]
        assert fused == [False, False, True, True], d
        assert not any(mosaic_gpu_bwd.default_tiles(d, n, segments=True).fused_dq for n in lengths)
    calls, default_tiles = [], mosaic_gpu_bwd.default_tiles

    def record(*args):
        calls.append(args)
        return default_tiles(*args)

    q = jax.ShapeDtypeStruct((1, 8192, 2, 128), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((1, 8192), jnp.int32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mosaic_gpu_bwd, "default_tiles", record)
        for kw in (dict(window=1024), dict(q_segment_ids=ids, kv_segment_ids=ids), {}):
            attend = functools.partial(flash_attention, causal=True, lowering="mosaic", **kw)
            jax.eval_shape(lambda q, kw=kw, attend=attend: attend(
                q, q, q, **{n: jnp.zeros(ids.shape, ids.dtype) for n in kw if "segment" in n}
            ), q)  # fmt: skip
    assert calls == [(128, 1024, False), (128, 8192, True), (128, 8192, False)]


@pytest.mark.parametrize(
    "args, match",
    [
        ((jnp.float32, 64, False, mosaic_gpu_bwd.Tiles()), "dtype must be"),
        ((jnp.bfloat16, 96, False, mosaic_gpu_bwd.Tiles()), "head_dim must be"),
        ((jnp.bfloat16, 64, False, mosaic_gpu_bwd.Tiles(bq=32)), "tile bq must be"),
        ((jnp.bfloat16, 64, False, mosaic_gpu_bwd.Tiles(stages=0)), "stages must be"),
        ((jnp.bfloat16, 128, False, mosaic_gpu_bwd.Tiles(128, 128, stages=4)), "shared memory"),
        ((jnp.bfloat16, 128, False, mosaic_gpu_bwd.Tiles(fused_dq=1)), "fused_dq must be a bool"),
        (
            (jnp.bfloat16, 64, False, mosaic_gpu_bwd.Tiles(bq=64, fused_dq=True)),
            "one 64x64 dQ block",
        ),
    ],
)
def test_unsupported_calls_raise_naming_the_problem(args, match):
    with pytest.raises(ValueError, match=match):
        mosaic_gpu_bwd.check_supported(*args)


def test_default_tiles_are_supported():
    for d in _hopper.HEAD_DIMS:
        for dtype in _hopper.DTYPES:
            for tiles in (
                mosaic_gpu_bwd.default_tiles(d, 2048),
                mosaic_gpu_bwd.default_tiles(d, 8192),
                FUSED[d],
            ):
                for segments in (False, True):
                    mosaic_gpu_bwd.check_supported(dtype, d, segments, tiles)


def test_shared_memory_is_counted_as_allocated():
    """``smem_bytes`` counts what Mosaic GPU allocates: each buffer rounded up to 1 KiB, then
    8 B per mbarrier. The fused D=128 backward with three ring slots and segment ids needs
    233,688 B (the figure Mosaic GPU reported when compiling it on an H200), over the 232,448 B
    limit, so ``check_supported`` rejects it; without segment ids it fits (231,600 B)."""
    scratch = (plgpu.SMEM((3, 64), jnp.float32), plgpu.Barrier(num_barriers=3))
    assert _hopper.smem_footprint(scratch) == 1024 + 3 * 8
    fused3 = Tiles(bq=64, stages=3, fused_dq=True)
    assert mosaic_gpu_bwd.smem_bytes(jnp.bfloat16, 128, fused3, segments=True) == 233_688
    assert mosaic_gpu_bwd.smem_bytes(jnp.bfloat16, 128, fused3, segments=False) == 231_600
    with pytest.raises(ValueError, match="233688 B of shared memory"):
        mosaic_gpu_bwd.check_supported(jnp.bfloat16, 128, True, fused3)
    mosaic_gpu_bwd.check_supported(jnp.bfloat16, 128, False, fused3)


def test_register_budgets_fit_the_launch():
    """setmaxnreg budgets: multiples of 8 in [24, 256], summing to at most what the kernel
    launches with (168 per thread), else the consumers' increase never returns."""
    assert _hopper.LAUNCH_REGS == 168
    for kernels in (mosaic_gpu_fwd, mosaic_gpu_bwd):
        regs = (kernels.CONSUMER_REGS, kernels.PRODUCER_REGS)
        assert all(r % 8 == 0 and 24 <= r <= 256 for r in regs), regs
        launch = (_hopper.CONSUMERS + 1) * _hopper.LAUNCH_REGS
        assert _hopper.CONSUMERS * regs[0] + regs[1] <= launch, regs


def _run_state_literal_operands(jaxpr) -> list:
    """Constant scalar (``Literal``) operands of ``run_state`` anywhere in ``jaxpr``. jax
    0.11.2's Mosaic GPU lowering rejects them ("Shaped arrays must be represented by
    ir.Values"): a wgmma ``run_state`` whose body closed over refs indexed by Python ints. The
    CPU interpreter and jax 0.10's lowering accept them, so only this check sees it off a GPU."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "run_state":
            found += [v.val for v in eqn.invars if isinstance(v, jax_core.Literal)]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else [param]:
                sub = sub.jaxpr if isinstance(sub, jax_core.ClosedJaxpr) else sub
                if isinstance(sub, jax_core.Jaxpr):
                    found += _run_state_literal_operands(sub)
    return found


@pytest.mark.parametrize("d, causal, fused, segments", [(64, True, False, True),
                                                        (64, False, True, False),
                                                        (128, True, True, True),
                                                        (128, False, False, False)])  # fmt: skip
def test_gpu_kernels_give_run_state_no_literal_operands(d, causal, fused, segments):
    """The GPU (not interpreted) forward and backward kernels, traced on any platform."""
    n, pingpong = 256, d == 128
    q = jax.ShapeDtypeStruct((1, n, 2, d), jnp.bfloat16)
    vec = jax.ShapeDtypeStruct((1, 2, n), jnp.float32)
    ids = lambda dtype, length=n: jax.ShapeDtypeStruct((1, length), dtype)  # noqa: E731
    geo = Geometry(q_len=n, kv_len=n, bq=128, bk=128, causal=causal, window=None,
                   has_segments=segments, scale=d**-0.5, groups=1)  # fmt: skip
    tiles = FUSED[d] if fused else mosaic_gpu_bwd.default_tiles(d, n)
    fwd = lambda *a: mosaic_gpu_fwd.forward(*a[:3], geo, 2, False, pingpong, *a[3:])
    fwd_segs = (ids(jnp.int32),) * 2 + (ids(jnp.int32, n // 128 * 4),) if segments else ()
    bwd = lambda *a: mosaic_gpu_bwd.backward(*a[:6], geo, tiles, False, *a[6:])
    bwd_segs = (ids(jnp.int32),) * 2 if segments else ()
    for fn, args in ((fwd, (q, q, q, *fwd_segs)), (bwd, (q, q, q, q, vec, vec, *bwd_segs))):
        assert _run_state_literal_operands(jax.jit(fn).trace(*args).jaxpr.jaxpr) == []


def test_identical_call_sites_share_the_lowered_kernels():
    """Two identical ``flash_attention`` calls (a model's layers) with their gradients, lowered
    for a GPU on any host: the program holds one copy of each Mosaic GPU kernel (forward,
    dK/dV, dQ), called from both sites, not one per site (each copy costs seconds to lower)."""
    x = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((1, 256), jnp.int32)

    def loss(q, k, v, seg):
        for layer in range(2):
            with jax.named_scope(f"layer_{layer}"):
                q = flash_attention(q, k * (layer + 1), v, causal=True, backend="gpu",
                                    interpret=False, lowering="mosaic", q_segment_ids=seg,
                                    kv_segment_ids=seg)  # fmt: skip
        return q.astype(jnp.float32).sum()

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    text = grads.trace(x, x, x, ids).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 3


GPU_CASES = {  # (call, dQ fused into the dK/dV kernel); ragged lengths, GQA, both head dims
    "split_causal_d128_gqa": (dict(b=2, q_len=1000, kv_len=1000, h=4, kv_h=2, d=128), False),
    "split_causal_d64_short_q": (dict(b=1, q_len=700, kv_len=1500, h=4, kv_h=1, d=64), False),
    "fused_causal_d128_gqa": (dict(b=2, q_len=1000, kv_len=1000, h=4, kv_h=2, d=128), True),
    "fused_window_d64_short_q": (
        dict(b=1, q_len=700, kv_len=1500, h=4, kv_h=1, d=64, window=300),
        True,
    ),
    "fused_noncausal_d128_fp16": (
        dict(b=2, q_len=777, kv_len=513, h=2, kv_h=2, d=128, causal=False, dtype=jnp.float16),
        True,
    ),
}


@pytest.mark.gpu
@gpu
def test_gpu_flash_attention_mosaic_lowering_on_device(rng, within_xla_error):
    print("\nflash_attention(lowering='mosaic') grads: compiling and running", flush=True)
    _check_api(rng, within_xla_error, interpret=False)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_mosaic_backward_on_device(rng, within_xla_error, name):
    case, fused = GPU_CASES[name]
    print(f"\n{name}: compiling and running", flush=True)
    tiles = FUSED[case["d"]] if fused else None
    case = {"causal": True, **case}
    _check_backward(rng, case, within_xla_error, tiles=tiles, interpret=False)
