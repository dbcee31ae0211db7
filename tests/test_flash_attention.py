"""Pallas flash attention (GPU and TPU variants, interpret mode on CPU) vs the float32 reference.

Forward values and gradients of a random linear functional ``sum(out * w)`` are compared with
``arjax.ops.attention_reference`` on fresh random inputs; tolerances: float32 inputs
atol = rtol = 2e-5 (the kernels accumulate in float32, as the reference does); bf16 inputs:
each of out, dq, dk, dv no farther (max |.|) from the float32 reference than plain XLA
attention in bf16 is (``within_xla_error`` in conftest.py, computed in each test).
Tiny tiles (16) and odd lengths make every call span several, partly padded tiles. Tests
marked ``gpu`` run the real kernels and only run where a GPU is present.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.interpreters import partial_eval as pe

from arjax.ops import attention, attention_mask, attention_reference
from kernels_pallas.flash_attention import flash_attention, flash_decode
from kernels_pallas.flash_attention._common import Geometry, kv_block_range, q_block_range
from kernels_pallas.flash_attention.tuning import BlockSizes, block_sizes

F32_TOL = dict(rtol=2e-5, atol=2e-5)
TINY = BlockSizes(16, 16, 16, 16, 16, 16)
# interpret-mode kernels compile slowly on CPU; a lower backend optimisation level helps
FAST_COMPILE = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}


def _inputs(rng, b=2, q_len=37, kv_len=37, h=4, kv_h=2, d=32, dtype=jnp.float32):
    shape_q, shape_kv = (b, q_len, h, d), (b, kv_len, kv_h, d)
    q, k, v = (
        jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype)
        for s in (shape_q, shape_kv, shape_kv)
    )
    return q, k, v


def _segments(rng, b, n, n_docs=3, low=0):
    """Sorted (packed) segment ids; id 0 plays padding."""
    return jnp.asarray(np.sort(rng.integers(low, n_docs, (b, n)), axis=1), jnp.int32)


def _value_and_grads(fn, q, k, v, w, kw):
    """Output and d/d(q, k, v) of sum(fn(q, k, v) * w), compiled once."""

    def run(q, k, v):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v, **kw).astype(jnp.float32) * w)
        return fn(q, k, v, **kw), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    compiled = jax.jit(run).lower(q, k, v).compile(FAST_COMPILE)
    return compiled(q, k, v)


def _check(
    backend,
    rng,
    case,
    *,
    grads=True,
    tol=F32_TOL,
    blocks=TINY,
    interpret=True,
    within=None,
    wave=None,
):
    """Kernel vs float32 reference within ``tol``; for bf16 inputs pass ``within`` (the
    ``within_xla_error`` fixture): no farther from the reference than plain XLA attention.
    ``case["segments"]``: True for random packed documents, or ``(q_ids, kv_ids)``."""
    case = dict(case)
    seg = case.pop("segments", False)
    kw = dict(causal=case.pop("causal", False), window=case.pop("window", None))
    q, k, v = _inputs(rng, **case)
    if seg is True:
        seg = (_segments(rng, q.shape[0], q.shape[1]), _segments(rng, q.shape[0], k.shape[1]))
    if seg:
        kw["q_segment_ids"], kw["kv_segment_ids"] = (jnp.asarray(s, jnp.int32) for s in seg)
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    flash = lambda q, k, v, **kw: flash_attention(
        q, k, v, backend=backend, interpret=interpret, block_sizes=blocks, wave=wave, **kw
    )
    if not grads:
        out = jax.jit(lambda q, k, v: flash(q, k, v, **kw)).lower(q, k, v).compile(FAST_COMPILE)
        np.testing.assert_allclose(
            out(q, k, v).astype(jnp.float32),
            attention_reference(q, k, v, **kw).astype(jnp.float32),
            **tol,
        )
        return
    out, g = _value_and_grads(flash, q, k, v, w, kw)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref, g_ref = _value_and_grads(attention_reference, *f32, w, kw)
    if within is not None:
        xla = lambda q, k, v, **kw: attention(q, k, v, impl="xla", **kw)
        names = ("out", "dq", "dk", "dv")
        results = [
            (out, *g),
            (ref, *g_ref),
            (lambda o, g: (o, *g))(*_value_and_grads(xla, q, k, v, w, kw)),
        ]
        within(*(dict(zip(names, r)) for r in results))
        return
    np.testing.assert_allclose(out.astype(jnp.float32), ref.astype(jnp.float32), **tol)
    for name, a, r in zip("qkv", g, g_ref):
        np.testing.assert_allclose(
            a.astype(jnp.float32), r.astype(jnp.float32), err_msg=f"d{name}", **tol
        )


# Each case: float32, several tiles, lengths not multiples of the 16-wide tiles.
CASES = {
    "full,cross-lengths,gqa": dict(q_len=37, kv_len=45),
    "causal,decode-offset,window,mha,head_dim64": dict(
        causal=True, q_len=29, kv_len=45, window=9, h=2, kv_h=2, d=64
    ),
    "causal,segments,mqa": dict(causal=True, segments=True, kv_h=1),
    "full,segments,cross-lengths": dict(segments=True, q_len=21, kv_len=40),
}


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("name", list(CASES))
def test_flash_matches_reference_values_and_grads(rng, backend, name):
    _check(backend, rng, CASES[name])


def test_gpu_variant_bf16_window_segments_gqa(rng, within_xla_error):
    case = dict(causal=True, window=10, segments=True, q_len=30, kv_len=41, dtype=jnp.bfloat16)
    _check("gpu", rng, case, within=within_xla_error)


def test_gpu_variant_unsorted_segments(rng):
    """Segment ids in any layout (interleaved, repeated, ids absent from the keys): the tile
    ranges bound every segment's first and last key, so no visible key is skipped."""
    seg = (rng.integers(0, 4, (2, 45)), rng.integers(1, 3, (2, 61)))
    _check("gpu", rng, dict(q_len=45, kv_len=61, segments=seg))


def _ranges_brute_force(row_seg, col_seg, row_block, col_block):
    """Per row tile, [lo, hi) of the column tiles holding a column of one of its segments, and
    [full_lo, full_hi) of those whose every column has the one id of all its rows (one
    contiguous run, else empty at lo)."""
    out = []
    for rows, cols in zip(row_seg, col_seg):
        line = []
        for t in range(len(rows) // row_block):
            tile = rows[t * row_block : (t + 1) * row_block]
            hits = np.flatnonzero(np.isin(cols, tile))
            lo, hi = (hits[0] // col_block, hits[-1] // col_block + 1) if len(hits) else (0, 0)
            col_tiles = [set(cols[c : c + col_block]) for c in range(0, len(cols), col_block)]
            whole = [c for c, ids in enumerate(col_tiles) if len(set(tile)) == 1 == len(ids)
                     and ids == set(tile)]  # fmt: skip
            run = whole and whole == list(range(whole[0], whole[-1] + 1))
            line += [lo, whole[0], whole[-1] + 1, hi] if run else [lo, lo, lo, hi]
        out.append(line)
    return np.asarray(out)


def _check_ranges(row_seg, col_seg, row_block, col_block, exact: bool):
    """``segment_tile_ranges`` vs the brute force: the same whole-tile runs, ``[lo, hi)``
    holding every shared column (``exact``: the brute force's, tile for tile)."""
    from kernels_pallas.flash_attention._common import segment_tile_ranges

    got = segment_tile_ranges(jnp.asarray(row_seg, jnp.int32), jnp.asarray(col_seg, jnp.int32),
                              row_block, col_block)  # fmt: skip
    got, want = np.asarray(got), _ranges_brute_force(row_seg, col_seg, row_block, col_block)
    if exact:
        np.testing.assert_array_equal(got, want)
    lo, full_lo, full_hi, hi = (got[:, i::4] for i in range(4))
    want_lo, want_full_lo, want_full_hi, want_hi = (want[:, i::4] for i in range(4))
    shared = want_hi > want_lo
    assert np.all(~shared | ((lo <= want_lo) & (hi >= want_hi))), "a shared column is skipped"
    np.testing.assert_array_equal(full_hi - full_lo, want_full_hi - want_full_lo)
    whole = want_full_hi > want_full_lo
    np.testing.assert_array_equal(np.where(whole, full_lo, 0), np.where(whole, want_full_lo, 0))
    assert np.all((lo <= full_lo) & (full_lo <= full_hi) & (full_hi <= hi))
    return got, want


def test_segment_tile_ranges_match_brute_force(rng):
    packed = np.repeat([[1, 2, 3, 4]], [24, 40, 8, 24], axis=1)  # documents of 24, 40, 8, 24
    got, _ = _check_ranges(packed, packed, 16, 32, exact=True)
    # q tiles of 16: [0,16) doc 1 -> key tile 0, not whole; [16,32) docs 1-2 -> keys 0..63 ->
    # tiles [0, 2); [32,48), [48,64) doc 2 -> [0, 2), key tile 1 (32..63) whole; [64,80) docs
    # 3-4 -> keys 64..95 -> [2, 3); [80,96) doc 4 -> [2, 3)
    want = [[0, 0, 0, 1, 0, 0, 0, 2, 0, 1, 2, 2, 0, 1, 2, 2, 2, 2, 2, 3, 2, 2, 2, 3]]
    np.testing.assert_array_equal(got, want)
    long_docs = np.repeat([[0, 1, 2]], [40, 72, 16], axis=1)
    padded = np.repeat([[3, 4, 0]], [50, 60, 18], axis=1)  # padding id 0 after the documents
    for row_seg, col_seg in ((long_docs, long_docs), (long_docs[:, :96], long_docs),
                             (padded, padded), (padded[:, 32:], padded)):  # fmt: skip
        for row_block, col_block in ((16, 16), (8, 32)):
            _, want = _check_ranges(row_seg, col_seg, row_block, col_block, exact=True)
            assert (want[:, 2::4] > want[:, 1::4]).any()  # some whole tiles
    for row_block, col_block in ((16, 16), (8, 32)):  # random ids: bounded
        _check_ranges(rng.integers(0, 6, (3, 64)), rng.integers(1, 5, (3, 96)), row_block,
                      col_block, exact=False)  # fmt: skip
    split = np.repeat([[1, 2, 1]], [32, 32, 32], axis=1)  # id 1 in two runs: whole tiles apart
    got, _ = _check_ranges(split, split, 16, 16, exact=True)
    np.testing.assert_array_equal(got[0, 1::4], [0, 0, 2, 2, 0, 0])  # id 1: no whole run
    np.testing.assert_array_equal(got[0, 2::4], [0, 0, 4, 4, 0, 0])


def test_segment_tile_ranges_random_runs(rng):
    """Ids in runs of random lengths, among them -1 and the int32 maximum: recurring apart
    (whole-tile runs split apart are left empty; the ranges hold every shared column), and
    ascending (the brute force's ranges exactly)."""
    ids = np.array([-1, 0, 1, 2, np.iinfo(np.int32).max])

    def uniform_ids(seg, block):  # [batch, n_tiles], NaN where a tile holds several ids
        tiles = seg.reshape(len(seg), -1, block)
        return np.where(tiles.min(-1) == tiles.max(-1), tiles.min(-1), np.nan)

    pairs = reported = 0  # (uniform row tile, column tile of its id) pairs; whole tiles found
    for row_block, col_block in ((8, 8), (8, 32), (32, 8), (16, 16)):
        for _ in range(8):
            seg = np.stack([np.repeat(ids[rng.integers(0, 5, 32)], rng.integers(1, 48, 32))[:256]
                            for _ in range(3)])  # fmt: skip
            row_seg = seg[:, : 128 * int(rng.integers(1, 3))]  # [3, 128 or 256]
            _, want = _check_ranges(row_seg, seg, row_block, col_block, exact=False)
            r, c = uniform_ids(row_seg, row_block), uniform_ids(seg, col_block)
            pairs += (r[:, :, None] == c[:, None, :]).sum()
            reported += (want[:, 2::4] - want[:, 1::4]).sum()
            ascending = np.sort(seg, axis=1)
            _check_ranges(ascending[:, -row_seg.shape[1] :], ascending, row_block, col_block,
                          exact=True)  # fmt: skip
    assert 0 < reported < pairs  # some whole runs, some split apart


@pytest.mark.parametrize("lowering", ["triton", "mosaic"])
def test_segment_ids_cost_no_sort(lowering):
    """Packed documents' forward and gradients lower without a sort: the per-call work on the
    ids is a few reductions (``segment_tile_ranges``; the Mosaic GPU kernels read the int32 ids
    as they are). Sorts of the ids took a third of the packed-document forward on an H200
    (experiments/results/bench_attention_masked.md)."""
    q = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((1, 256), jnp.int32)

    def loss(q, ids):
        out = flash_attention(q, q, q, causal=True, q_segment_ids=ids, kv_segment_ids=ids,
                              backend="gpu", interpret=True, lowering=lowering)  # fmt: skip
        return jnp.sum(out.astype(jnp.float32))

    text = jax.jit(jax.grad(loss)).lower(q, ids).as_text()
    assert "sort" not in text


@pytest.mark.parametrize("causal", [True, False])
def test_gpu_variant_long_packed_documents(rng, causal):
    """Documents spanning several tiles: tiles inside one document take the unmasked path
    (``segment_tile_ranges``' whole tiles); forward and gradients still match the reference,
    with padded rows (lengths not tile multiples) and a document starting mid-tile."""
    rows = np.stack([np.repeat([1, 2, 3], [37, 40, 13]), np.repeat([0, 1, 2], [16, 64, 10])])
    _check("gpu", rng, dict(causal=causal, q_len=90, kv_len=90, segments=(rows, rows)))


@pytest.mark.parametrize("wave", [1, 6])
def test_gpu_variant_grouped_launch_order(rng, wave):
    """The Triton kernels' 1-D grids in ``work_item`` order over several groups of heads: waves
    of 1 or 6 programs give groups of 1 or 2 of the 8 (batch, head)s of 3 tiles each."""
    _check("gpu", rng, dict(causal=True, segments=True, q_len=37, kv_len=45), wave=wave)


@pytest.mark.parametrize("d", [128, 256])
def test_gpu_variant_large_head_dims_forward(rng, d):
    _check("gpu", rng, dict(causal=True, q_len=20, kv_len=20, h=2, kv_h=1, d=d), grads=False)


def test_tpu_variant_lowers_to_mosaic_with_default_tiles():
    """Without a TPU, export for platform "tpu": forward + backward lower to three Mosaic kernels
    (forward, dQ, dK/dV) at the tuning table's 512-wide tiles, GQA + window + segments."""
    q = jax.ShapeDtypeStruct((1, 1024, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 1024, 2, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 1024), jnp.int32)

    def grads(q, k, v, s):
        kw = dict(causal=True, window=300, q_segment_ids=s, kv_segment_ids=s, backend="tpu")
        loss = lambda q, k, v: jnp.sum(flash_attention(q, k, v, interpret=False, **kw))
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    exported = jax.export.export(jax.jit(grads), platforms=["tpu"])(q, kv, kv, seg)
    assert exported.mlir_module().count("tpu_custom_call") == 3


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_fully_masked_queries_return_zero_with_zero_grads(rng, backend):
    q, k, v = _inputs(rng, b=1, q_len=20, kv_len=20)
    q_seg = jnp.asarray([[1] * 10 + [3] * 10], jnp.int32)  # segment 3 has no keys
    kv_seg = jnp.asarray([[1] * 12 + [2] * 8], jnp.int32)
    kw = dict(causal=True, q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    flash = lambda q, k, v, **kw: flash_attention(
        q, k, v, backend=backend, interpret=True, block_sizes=TINY, **kw
    )
    out, (dq, dk, dv) = _value_and_grads(flash, q, k, v, w, kw)
    assert np.all(np.asarray(out[:, 10:]) == 0.0)
    assert np.all(np.asarray(dq[:, 10:]) == 0.0)
    assert np.all(np.asarray(dk[:, 12:]) == 0.0) and np.all(np.asarray(dv[:, 12:]) == 0.0)
    np.testing.assert_allclose(out, attention_reference(q, k, v, **kw), **F32_TOL)


def test_ops_attention_dispatches_pallas_with_default_tiles(rng):
    q, k, v = _inputs(rng, q_len=19, kv_len=19)
    fn = jax.jit(lambda q, k, v: attention(q, k, v, causal=True, window=6, impl="pallas"))
    out = fn.lower(q, k, v).compile(FAST_COMPILE)(q, k, v)
    np.testing.assert_allclose(out, attention_reference(q, k, v, causal=True, window=6), **F32_TOL)


DECODE_CASES = {
    "one-token,gqa,segments,splits": dict(q_len=1, kv_len=70, segments=True, num_splits=3),
    "few-tokens,window,mqa": dict(q_len=3, kv_len=50, kv_h=1, window=20, num_splits=2),
}


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_flash_decode_matches_reference(rng, name):
    case = dict(DECODE_CASES[name])
    splits, window, seg = (
        case.pop("num_splits", None),
        case.pop("window", None),
        case.pop("segments", False),
    )
    q, k, v = _inputs(rng, **case)
    kw = dict(causal=True, window=window)
    if seg:  # a partly filled cache: slots beyond each row's length are invisible
        lengths = jnp.asarray([[55], [70]])
        kw["kv_segment_ids"] = (jnp.arange(k.shape[1])[None] < lengths).astype(jnp.int32)
        kw["q_segment_ids"] = jnp.ones(q.shape[:2], jnp.int32)
    kw_decode = dict(num_splits=splits, block_k=16, backend="gpu", interpret=True)
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    got = _value_and_grads(functools.partial(flash_decode, **kw_decode), q, k, v, w, kw)
    want = _value_and_grads(attention_reference, q, k, v, w, kw)
    for name, g, r in zip(("out", "dq", "dk", "dv"), (got[0], *got[1]), (want[0], *want[1])):
        np.testing.assert_allclose(g, r, **F32_TOL, err_msg=name)


def _kernel_kv_lengths(jaxpr) -> list[int]:
    """KV length (axis 1 of the K operand) of every ``pallas_call`` in ``jaxpr`` (nested too)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append(eqn.invars[1].aval.shape[1])
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _kernel_kv_lengths(inner)
    return found


@pytest.mark.parametrize("kv_len,want", [(80, 80), (70, 80)])
def test_flash_decode_pads_the_cache_to_whole_tiles_only(rng, kv_len, want):
    """5 KV tiles of 16 over 3 splits: a cache of whole tiles reaches the kernel as it is (no
    padded copy at every decoding step; it was padded to 3 x 2 tiles), a ragged one is padded
    to its last tile. Values: ``test_flash_decode_matches_reference``'s splits cases."""
    q, k, v = _inputs(rng, q_len=1, kv_len=kv_len)
    call = functools.partial(flash_decode, num_splits=3, block_k=16, backend="gpu", interpret=True)
    assert _kernel_kv_lengths(jax.make_jaxpr(call)(q, k, v).jaxpr) == [want]


def test_unused_flash_decode_is_dead_code():
    """An unused call is dropped from the jaxpr (a bare pallas_call never is): flax >= 0.12.9's
    ``nn.scan`` traces each layer once more and rejects inputs that trace still uses."""
    q, k, v = (jnp.ones(s) for s in ((2, 1, 4, 32), (2, 40, 2, 32), (2, 40, 2, 32)))

    def unused(q, k, v):
        flash_decode(q, k, v, backend="gpu", interpret=True)
        return jnp.float32(0)

    jaxpr, used_inputs = pe.dce_jaxpr(jax.make_jaxpr(unused)(q, k, v).jaxpr, [True])
    assert used_inputs == [False] * 3 and not jaxpr.eqns


@pytest.mark.parametrize(
    "causal,window,q_len,kv_len", [(False, None, 37, 45), (True, None, 29, 45), (True, 9, 29, 45),
                                   (True, 1, 45, 45), (True, 40, 64, 64)],
)  # fmt: skip
def test_tile_ranges_skip_only_invisible_tiles(causal, window, q_len, kv_len):
    """Tiles outside [lo, hi) have no visible entry; tiles in [full_lo, full_hi) are all visible;
    every tile in [lo, hi) has a visible entry (the skipping is tight for causal/window)."""
    bq, bk = 8, 16
    geo = Geometry(q_len, kv_len, bq, bk, causal, window, False, 1.0, 1)
    mask = attention_mask(q_len, kv_len, causal=causal, window=window)
    mask = np.ones((q_len, kv_len), bool) if mask is None else np.asarray(mask[0, 0])
    mask = np.pad(mask, ((0, geo.nq * bq - q_len), (0, geo.nk * bk - kv_len)))
    tiles = mask.reshape(geo.nq, bq, geo.nk, bk).transpose(0, 2, 1, 3)
    real_q = (np.arange(geo.nq * bq) < q_len).reshape(geo.nq, bq)
    for i, j in itertools.product(range(geo.nq), range(geo.nk)):
        lo, full_lo, full_hi, hi = (int(x) for x in kv_block_range(i * bq, i * bq + bq - 1, geo))
        assert (lo <= j < hi) == tiles[i, j].any(), (i, j)
        if full_lo <= j < full_hi:
            assert tiles[i, j][real_q[i]].all(), (i, j)
        lo, full_lo, full_hi, hi = (int(x) for x in q_block_range(j * bk, j * bk + bk - 1, geo))
        assert (lo <= i < hi) == tiles[i, j].any(), (i, j)
        if full_lo <= i < full_hi:
            assert tiles[i, j][real_q[i]].all(), (i, j)


def test_block_sizes_shrink_to_short_lengths_and_validate():
    bs = block_sizes("gpu", 20, 3000, 128)
    assert (bs.bq, bs.bk) == (32, 64)
    assert block_sizes("tpu", 5, 5, 64).bq == 8
    with pytest.raises(ValueError, match="BlockSizes.bk: must be a power of two"):
        BlockSizes(16, 24, 16, 16, 16, 16)
    with pytest.raises(ValueError, match="backend must be one of"):
        block_sizes("cpu", 8, 8, 8)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(window=4), "window must be positive and needs causal=True"),
        (dict(causal=True, window=0), "window must be positive"),
        (dict(q_segment_ids=jnp.ones((2, 5), jnp.int32)), "pass both q_segment_ids"),
        (dict(backend="cuda"), "backend must be one of"),
        (
            dict(q_segment_ids=jnp.ones((2, 4), jnp.int32), kv_segment_ids=jnp.ones((2, 5))),
            "q_segment_ids must be int",
        ),
    ],
)
def test_bad_arguments_raise_naming_the_field(rng, kwargs, match):
    q, k, v = _inputs(rng, q_len=5, kv_len=5)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, **kwargs)


def test_bad_shapes_and_dtypes_raise(rng):
    q, k, v = _inputs(rng, q_len=5, kv_len=5)
    with pytest.raises(ValueError, match="q must be \\[batch, len, heads, head_dim\\]"):
        flash_attention(q[0], k, v)
    with pytest.raises(ValueError, match="dtypes differ"):
        flash_attention(q.astype(jnp.bfloat16), k, v)
    with pytest.raises(ValueError, match="heads=4 is not a multiple of kv_heads=3"):
        flash_decode(q, *_inputs(rng, q_len=5, kv_len=5, kv_h=3)[1:])
    with pytest.raises(ValueError, match="causal needs q_len <= kv_len"):
        flash_attention(*_inputs(rng, q_len=6, kv_len=5), causal=True)


gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    "case",
    [
        dict(causal=True, q_len=300, kv_len=300, d=64),
        dict(causal=True, window=64, q_len=200, kv_len=333, d=128, kv_h=1),
        dict(causal=True, segments=True, q_len=256, kv_len=256, d=128),
        dict(q_len=100, kv_len=170, d=256),
    ],
)
def test_gpu_kernels_bf16_on_device(rng, within_xla_error, case):
    """Real Triton kernels, default tiles; bf16: within plain XLA attention's error."""
    blocks = block_sizes("gpu", case["q_len"], case["kv_len"], case["d"])
    _check("gpu", rng, dict(case, dtype=jnp.bfloat16), blocks=blocks, interpret=None,
           within=within_xla_error)  # fmt: skip


@pytest.mark.gpu
@gpu
def test_gpu_flash_decode_on_device(rng, within_xla_error):
    q, k, v = _inputs(rng, b=2, q_len=1, kv_len=3000, h=8, kv_h=2, d=128, dtype=jnp.bfloat16)
    kw = dict(causal=True, window=1000)
    out = jax.jit(lambda q, k, v: flash_decode(q, k, v, **kw))(q, k, v)
    ref = attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), **kw)
    within_xla_error(dict(out=out), dict(out=ref), dict(out=attention(q, k, v, impl="xla", **kw)))
