"""Mosaic GPU (Hopper) flash-attention forward vs the float32 reference.

``flash_attention(..., lowering="mosaic")``: the forward is the warp-specialised Mosaic GPU
kernel (``kernels_pallas/flash_attention/mosaic_gpu_fwd.py``), the gradients its custom_vjp with
that lowering's backward kernels (``mosaic_gpu_bwd.py``) fed the kernel's log-sum-exp. On CPU both
run in interpret mode: the Mosaic GPU interpreter runs the kernel's TMA copies, mbarrier
pipeline and three warpgroups, but computes the two matrix products as ``jnp`` dots of the
same shared-memory / register operands (it cannot read wgmma's transposed or register
operands); the tests marked ``gpu`` run the real wgmma kernel. Interpreted kernels run under
the interpreter's race detector (shared-memory accesses against TMA copies and the other
warpgroups), which must have run on each kernel of a call (forward, dK/dV, dQ or fused) and
found no race there (``races`` in conftest.py). Fresh random inputs; bf16/fp16: the output
and each gradient no farther (max |.|) from the float32 reference than plain XLA attention in
that dtype (``within_xla_error`` in conftest.py). Each case is one
or two 128-row query tiles against 64-row KV tiles, lengths not multiples of either, so
boundary tiles are masked and padded; interpret mode costs a few seconds per CTA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from arjax.ops import attention, attention_reference
from kernels_pallas.flash_attention import flash_attention, mosaic_gpu_bwd, mosaic_gpu_fwd
from kernels_pallas.flash_attention._common import Geometry
from kernels_pallas.flash_attention.tuning import BlockSizes, block_sizes, gpu_lowering

# forward tiles of the Mosaic kernel (128 query rows, 64 KV rows, 2 buffers); tiny backward tiles
TILES = BlockSizes(128, 64, 16, 16, 16, 16, stages=2)
FAST_COMPILE = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}


def _inputs(rng, b=1, q_len=100, kv_len=150, h=2, kv_h=1, d=64, dtype=jnp.bfloat16):
    shapes = ((b, q_len, h, d), (b, kv_len, kv_h, d), (b, kv_len, kv_h, d))
    return [jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype) for s in shapes]


def _out_and_grads(fn, q, k, v, w):
    """fn's output and d/d(q, k, v) of sum(out * w), one forward, compiled once."""

    def run(q, k, v):
        out, pull = jax.vjp(lambda *qkv: fn(*qkv).astype(jnp.float32), q, k, v)
        return out, pull(w)

    return jax.jit(run).lower(q, k, v).compile(FAST_COMPILE)(q, k, v)


def _forward(fn, q, k, v, w):
    """fn's output alone, as ``_out_and_grads`` returns it but with no gradients."""
    del w
    run = jax.jit(lambda *qkv: fn(*qkv).astype(jnp.float32))
    return run.lower(q, k, v).compile(FAST_COMPILE)(q, k, v), ()


def _check(rng, case, races, within, *, blocks=TILES, interpret=True, grads=True):
    """``grads``: also the gradients through the custom_vjp (the Mosaic GPU backward)."""
    case = dict(case)
    kw = dict(causal=case.pop("causal", False), window=case.pop("window", None))
    runs = case.pop("segments", None)  # (id, length) runs of one row; a pair: (q's, kv's)
    q, k, v = _inputs(rng, **case)
    if runs is not None:
        q_runs, kv_runs = runs if isinstance(runs[0][0], tuple) else (runs, runs)
        row = lambda runs: jnp.asarray([[i for i, n in runs for _ in range(n)]], jnp.int32)  # noqa: E731
        kw.update(q_segment_ids=row(q_runs), kv_segment_ids=row(kv_runs))
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    mosaic = lambda q, k, v: flash_attention(
        q, k, v, lowering="mosaic", interpret=interpret, block_sizes=blocks, **kw
    )
    run = _out_and_grads if grads else _forward
    out, g = run(mosaic, q, k, v, w)
    if interpret:  # the forward kernel, then dK/dV and dQ (or the two fused)
        span = min(q.shape[1], k.shape[1], kw["window"] or k.shape[1])
        fused = mosaic_gpu_bwd.default_tiles(q.shape[-1], span, runs is not None).fused_dq
        races.check(kernels=(2 if fused else 3) if grads else 1)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = run(lambda q, k, v: attention_reference(q, k, v, **kw), *f32, w)
    xla = run(lambda q, k, v: attention(q, k, v, impl="xla", **kw), q, k, v, w)
    names = ("out", "dq", "dk", "dv")
    within(*(dict(zip(names, (o, *g))) for o, g in ((out, g), ref, xla)), dtype=q.dtype)


CASES = {  # causal GQA with a decode offset: ``test_ops_attention_pallas_mosaic_default_tiles``
    # and the backward's API test (``_check_api`` in test_flash_attention_mgpu_bwd.py)
    # two query tiles; 40-key window: each warpgroup skips tiles the other one attends
    "causal,window,two-q-tiles,head_dim128,fp16": dict(
        causal=True, window=40, q_len=150, kv_len=150, h=1, d=128, dtype=jnp.float16
    ),
    "full,cross-lengths,mqa,head_dim128": dict(q_len=70, kv_len=130, h=2, kv_h=1, d=128),
}


# ids 2^24 and 2^24 + 1 are one float32 (the kernels compare the int32 ids); the first id comes
# back after the second, so its runs are one segment apart (the masks compare ids, not runs)
SEGMENTS = ((2**24, 40), (2**24 + 1, 60), (2**24, 50))
SEGMENT_CASES = {
    "causal,window,gqa": dict(causal=True, window=70, q_len=150, kv_len=150, h=2, kv_h=1),
    "causal,head_dim128": dict(causal=True, q_len=150, kv_len=150, h=1, d=128),
    # packed documents: the last query tile skips the first document's KV tiles and runs the
    # tiles inside its own document unmasked (segment_tile_ranges)
    "causal,packed-documents": dict(
        causal=True, q_len=300, kv_len=300, h=2, kv_h=2, segments=((1, 140), (2, 160))
    ),
    # ids that differ between queries and keys: the second KV CTA's keys (id 5) share a
    # document only with queries before them, so its range is empty while its second
    # consumer's own range starts one query tile later (a hang before _hopper.nested)
    "causal,cross-ids,head_dim128": dict(
        causal=True,
        q_len=256,
        kv_len=256,
        h=1,
        d=128,
        segments=(((5, 128), (6, 128)), ((6, 128), (5, 128))),
    ),
}


@pytest.mark.parametrize("name", list(SEGMENT_CASES))
def test_mosaic_segment_ids_forward_and_gradients(rng, races, within_xla_error, name):
    """Segment ids through the Mosaic GPU forward and backward: tiles cut to each tile's
    documents (``segment_tile_ranges``), the others masked by int32 id equality
    (``_hopper.same_segment``)."""
    case = dict(SEGMENT_CASES[name])
    case.setdefault("segments", SEGMENTS)
    _check(rng, case, races, within_xla_error)


@pytest.mark.parametrize("name", list(CASES))
def test_mosaic_forward_matches_reference(rng, races, within_xla_error, name):
    """The forward kernel alone: the backward kernels' cases (windows, fp16, GQA, head dims,
    ragged lengths) are in test_flash_attention_mgpu_bwd.py, the custom_vjp from this forward's
    log-sum-exp into them below and there (``_check_api``)."""
    _check(rng, CASES[name], races, within_xla_error, grads=False)


def test_mosaic_single_kv_buffer_and_kv_tile_128(rng, races, within_xla_error):
    """One KV buffer (no overlap: every load waits for the previous tile's release); the
    forward (the backward's tiles: test_flash_attention_mgpu_bwd.py)."""
    blocks = BlockSizes(128, 128, 16, 16, 16, 16, stages=1)
    case = dict(causal=True, q_len=60, kv_len=140, h=1)
    _check(rng, case, races, within_xla_error, blocks=blocks, grads=False)


def test_mosaic_pingpong_kernel(rng, races, within_xla_error):
    """The kernel with the consumers taking turns (``pingpong``) and three KV buffers over 4 work
    items (2 heads x 2 query tiles). A window: each consumer also passes skipped KV tiles."""
    stages = 3
    q_len, kv_len, window = 150, 230, 70
    q, k, v = _inputs(rng, q_len=q_len, kv_len=kv_len, h=2, kv_h=2)
    geo = Geometry(q_len, kv_len, 128, 64, True, window, False, 0.125, 1)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))  # noqa: E731
    out, lse2 = mosaic_gpu_fwd.forward(
        pad(q, 256), pad(k, 256), pad(v, 256), geo, stages, True, pingpong=True
    )
    races.check(kernels=1)
    kw = dict(causal=True, window=window, scale=0.125)
    ref = attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), **kw)
    within_xla_error(
        dict(out=out[:, :q_len]), dict(out=ref), dict(out=attention(q, k, v, impl="xla", **kw))
    )


def test_ops_attention_pallas_mosaic_default_tiles(rng, races, within_xla_error):
    q, k, v = _inputs(rng, q_len=90, kv_len=90)
    fn = jax.jit(lambda q, k, v: attention(q, k, v, causal=True, impl="pallas_mosaic"))
    out = fn.lower(q, k, v).compile(FAST_COMPILE)(q, k, v)
    races.check(kernels=1)
    ref = attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), causal=True)
    xla = attention(q, k, v, causal=True, impl="xla")
    within_xla_error(dict(out=out), dict(out=ref), dict(out=xla))


def test_mosaic_tiles_and_lowering_rule():
    bs = block_sizes("gpu", 20, 3000, 128, lowering="mosaic")
    assert (bs.bq, bs.bk, bs.stages) == (128, 128, 2)
    assert block_sizes("gpu", 20, 20, 64, lowering="mosaic").bk == 64  # shrunk, floor 64
    assert bs.bwd_bq_dq == block_sizes("gpu", 20, 3000, 128).bwd_bq_dq  # Triton backward tiles
    assert gpu_lowering("NVIDIA A100-SXM4-80GB", 128, mosaic_ok=True) == "triton"
    assert gpu_lowering("NVIDIA H200", 128, mosaic_ok=False) == "triton"
    assert gpu_lowering("NVIDIA H100 80GB HBM3", 128, mosaic_ok=True) == "mosaic"
    assert gpu_lowering("NVIDIA H100 80GB HBM3", 64, mosaic_ok=True) == "mosaic"
    assert gpu_lowering("NVIDIA H200", 256, mosaic_ok=True) == "triton"  # no Mosaic kernel


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dtype=jnp.float32), "dtype must be bfloat16 or float16"),
        (dict(d=96), "head_dim must be one of"),
        (dict(blocks=BlockSizes(64, 64, 16, 16, 16, 16)), "query tile bq must be 128"),
        (dict(blocks=BlockSizes(128, 32, 16, 16, 16, 16)), "KV tile bk must be one of"),
        (dict(blocks=BlockSizes(128, 128, 16, 16, 16, 16, stages=8)), "shared memory"),
        (dict(backend="tpu"), "lowering needs backend='gpu'"),
        (dict(lowering="cuda"), "lowering must be one of"),
    ],
)
def test_mosaic_bad_arguments_raise_before_compiling(rng, kwargs, match):
    kwargs = dict(kwargs)
    q, k, v = _inputs(
        rng, q_len=8, kv_len=8, **{n: kwargs.pop(n) for n in ("dtype", "d") if n in kwargs}
    )
    kwargs.setdefault("lowering", "mosaic")
    kwargs["block_sizes"] = kwargs.pop("blocks", None)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, **kwargs)


gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    "case",
    [
        dict(causal=True, b=2, q_len=300, kv_len=300, h=4, kv_h=2, d=64),
        dict(causal=True, window=100, q_len=200, kv_len=333, h=4, kv_h=1, d=128),
        dict(b=2, q_len=100, kv_len=170, h=2, kv_h=2, d=128, dtype=jnp.float16),
        dict(causal=True, b=1, q_len=1024, kv_len=1024, h=2, kv_h=2, d=128),
        dict(
            causal=True,
            window=100,
            q_len=300,
            kv_len=300,
            h=4,
            kv_h=1,
            d=128,
            segments=SEGMENTS + ((7, 150),),
        ),
        dict(
            causal=True, q_len=1024, kv_len=1024, h=2, kv_h=2, d=64, segments=((1, 500), (2, 524))
        ),
    ],
)
def test_mosaic_kernel_on_device(rng, within_xla_error, case):
    """The real wgmma kernel with the tuning table's tiles."""
    blocks = block_sizes("gpu", case["q_len"], case["kv_len"], case["d"], lowering="mosaic")
    _check(rng, case, None, within_xla_error, blocks=blocks, interpret=None)
