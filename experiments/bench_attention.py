"""Benchmark arjax's Pallas flash attention against XLA, cuDNN, the stock Pallas kernels and jla.

arjax columns: "arjax Pallas" (``lowering="triton"``: Triton forward and backward) and "arjax
Mosaic GPU" (``lowering="mosaic"``: the Hopper Mosaic GPU forward and backward kernels).

Peers: XLA, cuDNN (``jax.nn.dot_product_attention``), the stock kernels of
``jax.experimental.pallas.ops.gpu`` and "jla", the Mosaic GPU flash attention of
``jax-linear-attention`` (``jla.ops.mosaic_gpu.attention.flash_attention``; a wheel for Python
3.12 carried in ``.whl/``: ``python3 -m pip install -q --no-index --no-deps --target /tmp/site
.whl/*.whl`` and ``PYTHONPATH=/tmp/site:.``). In forward mode each column's output is compared
with cuDNN's (``*_maxdiff``).

Causal bf16 attention, batch*heads filling the GPU (B*L = 16384 tokens, H*D = 2048),
D = 64 and 128, L = 2048, 8192, 32768, forward and forward+backward; plus sliding-window and
packed-document (segment ids) cases (arjax's default lowering and Mosaic GPU) against dense
causal cuDNN and jla, and the bf16 matmul peak.

FLOPs: causal forward = 2 matmuls * 2*B*H*L*L*D / 2; forward+backward = 3.5x the forward
(FlashAttention-2 convention). Each timing: compile first, then ``--iters`` calls enqueued
back to back and blocked once; the median over ``--repeats`` such runs.

Run on a GPU:  PYTHONPATH=. python experiments/bench_attention.py [--tune-backward]
Checks correctness first (skip with ``--no-check``): each kernel's output and gradients must be
no farther from the float32 reference than plain XLA attention's in the same dtype, else the
run stops with exit status 1 after writing the results; ``--tune-backward`` first sweeps the
backward tiles and benchmarks the best per head_dim, which kernels_pallas/tuning.py records.
Writes experiments/results/bench_attention.{json,md} (``--name`` changes the file name).

Short run (Mosaic GPU check + D=128 causal timings of four implementations, a few minutes):
  PYTHONPATH=. python experiments/bench_attention.py --check mosaic --head-dims 128 \
      --impls cudnn,stock_pallas,arjax_pallas,arjax_mosaic --no-sparse --no-peak --variants \
      --iters 5 --repeats 3 --name bench_attention_mosaic
A failing implementation (e.g. a Mosaic GPU compile error) is recorded with its error text in
the JSON and the log, and the other rows go on.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from arjax.ops import attention, attention_reference
from kernels_pallas.flash_attention import flash_attention, flash_decode, mosaic_gpu_fwd
from kernels_pallas.flash_attention._common import Geometry
from kernels_pallas.flash_attention.tuning import (
    BlockSizes,
    MosaicForward,
    block_sizes,
    mosaic_forward,
)

RESULTS = Path(__file__).parent / "results"
IMPLS = (
    "xla", "cudnn", "stock_pallas", "stock_mosaic_gpu", "jla", "arjax_pallas", "arjax_mosaic"
)  # fmt: skip
PEERS = ("xla", "cudnn", "stock_pallas", "stock_mosaic_gpu", "jla")


def jla_attention(q, k, v, **kw):
    """jla's causal Mosaic GPU flash attention (``kw``: its ``sliding_window``,
    ``segment_ids``); imported on first use so the other columns run without it."""
    from jla.ops.mosaic_gpu.attention import flash_attention as jla_flash

    return jla_flash(q, k, v, **kw)


def error_text(e: Exception, limit: int = 4000) -> str:
    """Type, message and the innermost frames of an exception, cut to ``limit`` characters
    (Mosaic GPU compile errors carry long MLIR dumps: keep the head and the tail)."""
    text = f"{type(e).__name__}: {e}\n" + "".join(traceback.format_tb(e.__traceback__)[-3:])
    return text if len(text) <= limit else text[: limit // 2] + "\n[...]\n" + text[-limit // 2 :]


def causal_flops(b: int, h: int, length: int, d: int) -> float:
    """Causal forward FLOPs: 2 matmuls of 2*B*H*L*L*D, halved by the mask."""
    return 4 * b * h * length * length * d / 2


def time_fn(fn, args, iters: int, repeats: int) -> float:
    """Median seconds per call of a jitted fn (compiled outside the timing)."""
    jax.block_until_ready(fn(*args))
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        runs.append((time.perf_counter() - t0) / iters)
    return statistics.median(runs)


def make_inputs(b, length, h, d, seed=0, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return [jax.random.normal(kk, (b, length, h, d), dtype) for kk in ks]


def impls(d: int, causal: bool = True, mosaic_kw: dict | None = None, **kw):
    """name -> fn(q, k, v) for the dense causal comparisons (``kw``: arjax Triton options,
    ``mosaic_kw``: arjax Mosaic GPU options)."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu
    from jax.experimental.pallas.ops.gpu.attention import mha

    scale = 1.0 / math.sqrt(d)
    mosaic_kw = mosaic_kw or {}
    return {
        "xla": lambda q, k, v: attention(q, k, v, causal=causal, impl="xla"),
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn"
        ),
        "stock_pallas": lambda q, k, v: mha(q, k, v, None, sm_scale=scale, causal=causal),
        "stock_mosaic_gpu": lambda q, k, v: mgpu.attention(
            q,
            k,
            v,
            mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=causal),
        ),  # forward only: its backward has no causal support
        "jla": jla_attention,  # causal only
        "arjax_pallas": lambda q, k, v: flash_attention(
            q, k, v, causal=causal, lowering="triton", **kw
        ),
        "arjax_mosaic": lambda q, k, v: flash_attention(
            q, k, v, causal=causal, lowering="mosaic", **mosaic_kw
        ),
    }


def fwd_bwd(fn):
    """Jitted gradients in q, k, v of ``sum(fn(q, k, v, *rest))``."""

    def loss(q, k, v, *rest):
        return jnp.sum(fn(q, k, v, *rest).astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def errors_vs_reference(fn, q, k, v, ct, kw) -> dict:
    """Max abs errors of ``fn``'s out, dq, dk, dv (of ``sum(out * ct)``) vs the float32
    reference, and the bound each must meet: the error of plain XLA attention in the inputs'
    dtype (``impl="xla"``: bf16 logits, probabilities and gradient products), at least one ulp
    of the largest reference value (as ``within_xla_error`` in tests/conftest.py); ``ok`` when
    every error is within its bound."""

    def run(f, *qkv):
        loss = lambda *a: jnp.sum(f(*a, **kw).astype(jnp.float32) * ct)  # noqa: E731
        out = jax.jit(functools.partial(f, **kw))(*qkv)
        return [out, *jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*qkv)]

    def max_abs(a, b):
        return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))

    got = run(fn, q, k, v)
    ref = run(attention_reference, *(x.astype(jnp.float32) for x in (q, k, v)))
    xla = run(functools.partial(attention, impl="xla"), q, k, v)
    ulp = float(jnp.finfo(q.dtype).eps)
    err = [max_abs(a, r) for a, r in zip(got, ref)]
    bound = [max(max_abs(x, r), ulp * float(jnp.max(jnp.abs(r)))) for x, r in zip(xla, ref)]
    return {"err o,dq,dk,dv": err, "bound (plain XLA) o,dq,dk,dv": bound,
            "ok": all(e <= b for e, b in zip(err, bound))}  # fmt: skip


def check(log) -> dict:
    """Errors of the GPU kernels vs the float32 reference on small odd shapes
    (:func:`errors_vs_reference`)."""
    errs = {}
    cases = [
        dict(b=2, lq=300, lk=300, h=4, hk=2, d=64, causal=True),
        dict(b=1, lq=200, lk=333, h=4, hk=1, d=128, causal=True, window=64),
        dict(b=2, lq=256, lk=256, h=2, hk=2, d=128, causal=True, seg=True),
        dict(b=1, lq=100, lk=170, h=2, hk=2, d=256, causal=False),
        dict(b=1, lq=130, lk=130, h=2, hk=2, d=96, causal=True, dtype=jnp.float16),
    ]
    for n, c in enumerate(cases):
        dtype = c.get("dtype", jnp.bfloat16)
        ks = jax.random.split(jax.random.PRNGKey(n), 6)
        q = jax.random.normal(ks[0], (c["b"], c["lq"], c["h"], c["d"]), dtype)
        k = jax.random.normal(ks[1], (c["b"], c["lk"], c["hk"], c["d"]), dtype)
        v = jax.random.normal(ks[2], (c["b"], c["lk"], c["hk"], c["d"]), dtype)
        kw = dict(causal=c["causal"], window=c.get("window"))
        if c.get("seg"):
            kw["q_segment_ids"] = jnp.sort(jax.random.randint(ks[3], (c["b"], c["lq"]), 1, 4), 1)
            kw["kv_segment_ids"] = kw["q_segment_ids"]
        ct = jax.random.normal(ks[4], q.shape, jnp.float32)
        row = errors_vs_reference(flash_attention, q, k, v, ct, kw)
        errs[f"case{n}"] = {"case": {k_: str(v_) for k_, v_ in c.items()}, **row}
        log(f"check {n} {c}: {_check_text(row)}")
    # decode: 1 and 4 queries vs a long cache, GQA, with segment ids
    for lq in (1, 4):
        ks = jax.random.split(jax.random.PRNGKey(10 + lq), 3)
        q = jax.random.normal(ks[0], (2, lq, 8, 128), jnp.bfloat16)
        k = jax.random.normal(ks[1], (2, 3000, 2, 128), jnp.bfloat16)
        v = jax.random.normal(ks[2], (2, 3000, 2, 128), jnp.bfloat16)
        kv_seg = (jnp.arange(3000)[None] < jnp.array([[2500], [3000]])).astype(jnp.int32)
        kw = dict(causal=True, q_segment_ids=jnp.ones((2, lq), jnp.int32), kv_segment_ids=kv_seg)
        out = jax.jit(functools.partial(flash_decode, **kw))(q, k, v).astype(jnp.float32)
        ref = attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), **kw)
        xla = attention(q, k, v, impl="xla", **kw).astype(jnp.float32)
        e, b = (float(jnp.max(jnp.abs(x - ref))) for x in (out, xla))
        errs[f"decode_q{lq}"] = {"err o": e, "bound (plain XLA) o": b, "ok": e <= b}
        verdict = "" if e <= b else " FAIL"
        log(f"check decode q_len={lq}: err {e:.3g}, plain XLA {b:.3g}{verdict}")
    return errs


def _check_text(row: dict) -> str:
    err, bound = row["err o,dq,dk,dv"], row["bound (plain XLA) o,dq,dk,dv"]
    text = f"err out/dq/dk/dv {[f'{x:.3g}' for x in err]}, plain XLA {[f'{x:.3g}' for x in bound]}"
    return text + ("" if row["ok"] else " FAIL")


def failed_checks(checks: dict) -> list[str]:
    """Names of the check rows that failed (beyond their bound, or did not run)."""
    return [name for name, row in checks.items() if not row.get("ok", False)]


MOSAIC_CASES = [
    dict(b=2, lq=300, lk=300, h=4, hk=2, d=64, causal=True),
    dict(b=2, lq=300, lk=300, h=4, hk=2, d=64, causal=False),
    dict(b=1, lq=200, lk=333, h=4, hk=1, d=128, causal=True),
    dict(b=1, lq=200, lk=333, h=4, hk=1, d=128, causal=True, window=64),
    dict(b=2, lq=100, lk=170, h=2, hk=2, d=128, causal=False, dtype=jnp.float16),
    dict(b=1, lq=2048, lk=2048, h=8, hk=8, d=128, causal=True),
]


def check_mosaic(log) -> dict:
    """Errors of the Mosaic GPU forward (and of the gradients through its custom_vjp with the
    Mosaic GPU backward) vs the float32 reference (:func:`errors_vs_reference`); bf16 unless
    stated; a case that fails to compile or run records its error text."""
    errs = {}
    for n, c in enumerate(MOSAIC_CASES):
        dtype = c.get("dtype", jnp.bfloat16)
        ks = jax.random.split(jax.random.PRNGKey(100 + n), 4)
        q = jax.random.normal(ks[0], (c["b"], c["lq"], c["h"], c["d"]), dtype)
        k = jax.random.normal(ks[1], (c["b"], c["lk"], c["hk"], c["d"]), dtype)
        v = jax.random.normal(ks[2], (c["b"], c["lk"], c["hk"], c["d"]), dtype)
        ct = jax.random.normal(ks[3], q.shape, jnp.float32)
        kw = dict(causal=c["causal"], window=c.get("window"))
        case = {k_: str(v_) for k_, v_ in c.items()}
        mosaic = functools.partial(flash_attention, lowering="mosaic")
        log(f"check mosaic {n}: running")  # a hang in the kernel shows here
        try:
            row = errors_vs_reference(mosaic, q, k, v, ct, kw)
        except Exception as e:  # noqa: BLE001 - report and keep checking
            errs[f"mosaic{n}"] = {"case": case, "error": error_text(e)}
            log(f"check mosaic {n} {c}: FAILED\n{error_text(e)}")
            continue
        errs[f"mosaic{n}"] = {"case": case, **row}
        log(f"check mosaic {n} {c}: {_check_text(row)}")
    return errs


# Mosaic GPU forward candidates timed by --variants (the table's row first)
MOSAIC_VARIANTS = [
    MosaicForward(bk=128, stages=2),
    MosaicForward(bk=128, stages=2, pingpong=True),
    MosaicForward(bk=64, stages=4, pingpong=True),
]


def mosaic_variant_rows(args, log) -> list[dict]:
    """The Mosaic GPU forward kernel alone (causal bf16, lengths multiples of its tiles, no
    padding) for the table's row and ``MOSAIC_VARIANTS``; ``max_diff``: max abs difference of
    each variant's output from the table row's (a check of the variants on the device)."""
    rows = []
    for d in args.head_dims:
        h = 2048 // d
        candidates = [mosaic_forward(d), *(c for c in MOSAIC_VARIANTS if c != mosaic_forward(d))]
        for length in args.lengths:
            b = max(1, 16384 // length)
            q, k, v = make_inputs(b, length, h, d)
            flops = causal_flops(b, h, length, d)
            first = None
            for c in candidates:
                geo = Geometry(length, length, 128, c.bk, True, None, False, d**-0.5, 1)
                fn = jax.jit(
                    lambda q, k, v, geo=geo, c=c: mosaic_gpu_fwd.forward(
                        q, k, v, geo, c.stages, False, c.pingpong
                    )[0]
                )
                row = {"D": d, "L": length, "B": b, "H": h, **dataclasses.asdict(c)}
                try:
                    out = jax.block_until_ready(fn(q, k, v))
                    first = out if first is None else first
                    row["max_diff"] = float(jnp.max(jnp.abs(out - first).astype(jnp.float32)))
                    t = time_fn(fn, (q, k, v), args.iters, args.repeats)
                    row.update(ms=t * 1e3, tflops=flops / t / 1e12)
                except Exception as e:  # noqa: BLE001 - report and keep going
                    row["error"] = error_text(e)
                rows.append(row)
                log(json.dumps(row))
    return rows


def dense_rows(args, log, tiles: dict[int, BlockSizes], rows: list[dict], save) -> None:
    """Appends one row per (D, L, mode) to ``rows``, calling ``save()`` after each."""
    for d in args.head_dims:
        h = 2048 // d
        for length in args.lengths:
            b = max(1, 16384 // length)
            q, k, v = make_inputs(b, length, h, d)
            fwd_flops = causal_flops(b, h, length, d)
            outputs = {}  # forward outputs of this (D, L), float32, compared with cuDNN's
            for mode in args.modes:
                flops = fwd_flops * (1 if mode == "fwd" else 3.5)
                row = {"D": d, "L": length, "B": b, "H": h, "mode": mode}
                kw = {"block_sizes": tiles[d]} if d in tiles else {}
                for name, fn in impls(d, **kw).items():
                    if name not in args.impls:
                        continue
                    if (name == "xla" and length > 8192) or (
                        name == "stock_mosaic_gpu" and mode != "fwd"
                    ):
                        row[name + "_ms"] = None  # XLA: [B, H, L, L] float32 logits do not fit
                        continue
                    jf = jax.jit(fn) if mode == "fwd" else fwd_bwd(fn)
                    # the stock Mosaic GPU kernel takes float16 only (same speed class as bf16)
                    qkv = [x.astype(jnp.float16) for x in (q, k, v)]
                    qkv = qkv if name == "stock_mosaic_gpu" else (q, k, v)
                    try:
                        t = time_fn(jf, qkv, args.iters, args.repeats)
                        row[name + "_ms"] = t * 1e3
                        row[name + "_tflops"] = flops / t / 1e12
                        if mode == "fwd":
                            outputs[name] = jf(*qkv).astype(jnp.float32)
                    except Exception as e:  # noqa: BLE001 - report and keep benchmarking
                        row[name + "_ms"] = None
                        row[name + "_error"] = error_text(e)
                if "cudnn" in outputs:
                    for name, out in outputs.items():
                        row[name + "_maxdiff"] = float(jnp.max(jnp.abs(out - outputs["cudnn"])))
                outputs.clear()
                for ours in ("arjax_pallas", "arjax_mosaic"):
                    for name in PEERS:
                        if row.get(ours + "_ms") and row.get(name + "_ms"):
                            prefix = "" if ours == "arjax_pallas" else "mosaic_"
                            row[prefix + "speedup_vs_" + name] = (
                                row[name + "_ms"] / row[ours + "_ms"]
                            )
                rows.append(row)
                log(json.dumps(row))
                save()


def _sparse_fns(window: int | None, dense, blocks: BlockSizes | None) -> list:
    """``(name, fn(q, k, v, ids))`` of the sparse rows: a sliding ``window``, or (None) packed
    documents with segment ids ``ids`` (unused by the window's); ``blocks``: the Triton tiles
    picked by the sweep (explicit tiles keep the default lowering on Triton)."""
    kw = dict(window=window) if window else {}
    tile_kw = {"block_sizes": blocks} if blocks else {}
    ids_kw = (lambda ids: {}) if window else (  # noqa: E731
        lambda ids: dict(q_segment_ids=ids, kv_segment_ids=ids))  # fmt: skip
    fns = [
        ("cudnn_dense_causal", lambda q, k, v, ids: dense(q, k, v)),
        ("arjax_pallas", lambda q, k, v, ids: flash_attention(
            q, k, v, causal=True, **kw, **ids_kw(ids), **tile_kw)),
        ("arjax_mosaic", lambda q, k, v, ids: flash_attention(
            q, k, v, causal=True, lowering="mosaic", **kw, **ids_kw(ids))),
    ]  # fmt: skip
    if window:
        fns.append(("cudnn_window", lambda q, k, v, ids: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn",
            local_window_size=(window - 1, 0))))  # fmt: skip
        fns.append(("jla", lambda q, k, v, ids: jla_attention(q, k, v, sliding_window=window)))
    else:
        fns.append(("jla", lambda q, k, v, ids: jla_attention(q, k, v, segment_ids=ids)))
    return fns


def sparse_rows(args, log, tiles: dict[int, BlockSizes], rows: list[dict], save) -> None:
    """Sliding window / packed documents (ours skips tiles), with the default lowering and
    with ``lowering="mosaic"``, vs dense causal cuDNN and jla, and the window case also vs
    cuDNN's own sliding window; appended to ``rows``, saved after each. The segment ids are an
    argument of every timed call, as in training: closed over, XLA would compute their tile
    ranges at compile time."""
    d, h, b, length = 128, 16, 2, 8192
    q, k, v = make_inputs(b, length, h, d, seed=1)
    seg = jnp.repeat(jnp.arange(8, dtype=jnp.int32) + 1, length // 8)[None].repeat(b, 0)
    for case, window in (("window=1024", 1024), ("8 docs of 1024 (segment ids)", None)):
        fns = _sparse_fns(window, impls(d)["cudnn"], tiles.get(d))
        for mode in ("fwd", "fwd+bwd"):
            row = {"case": case, "D": d, "L": length, "B": b, "H": h, "mode": mode}
            outputs = {}
            for name, fn in fns:
                jf = jax.jit(fn) if mode == "fwd" else fwd_bwd(fn)
                try:
                    row[name + "_ms"] = time_fn(jf, (q, k, v, seg), args.iters, args.repeats) * 1e3
                    if mode == "fwd" and name != "cudnn_dense_causal":
                        outputs[name] = jf(q, k, v, seg).astype(jnp.float32)
                except Exception as e:  # noqa: BLE001 - e.g. cuDNN without window support
                    row[name + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            for name, out in outputs.items():  # same masked function: compare with arjax's
                row[name + "_maxdiff"] = float(jnp.max(jnp.abs(out - outputs["arjax_pallas"])))
            row["speedup_vs_dense_cudnn"] = row["cudnn_dense_causal_ms"] / row["arjax_pallas_ms"]
            for peer in ("cudnn_window", "jla"):
                if row.get(peer + "_ms"):
                    row["speedup_vs_" + peer] = row[peer + "_ms"] / row["arjax_pallas_ms"]
            for peer in ("cudnn_dense_causal", "cudnn_window", "jla", "arjax_pallas"):
                if row.get(peer + "_ms") and row.get("arjax_mosaic_ms"):
                    row["mosaic_speedup_vs_" + peer] = row[peer + "_ms"] / row["arjax_mosaic_ms"]
            rows.append(row)
            log(json.dumps(row))
            save()


def matmul_peak(args) -> float:
    n = 8192
    a, bm = make_inputs(1, n, 1, n)[:2]
    a, bm = a[0, :, 0], bm[0, :, 0]
    t = time_fn(jax.jit(jnp.matmul), (a, bm), args.iters, args.repeats)
    return 2 * n**3 / t / 1e12


# backward candidates: (dq tile q, dq tile kv, dkv tile q, dkv tile kv, warps, stages).
BWD_CANDIDATES = [
    (64, 64, 64, 64, 4, 2), (64, 64, 64, 64, 8, 2), (64, 64, 64, 64, 4, 3),
    (32, 64, 64, 64, 4, 2), (64, 64, 32, 64, 4, 2), (64, 32, 64, 64, 4, 2),
]  # fmt: skip


def sweep_backward(args, log) -> tuple[list[dict], dict[int, BlockSizes]]:
    """Time backward tiles at causal B=2, L=8192 (fwd tiles from the table); best per D.

    The forward tiles in the table come from an earlier fwd sweep with the same setup
    (experiments/results/tune_attention.json)."""
    rows, best = [], {}
    for d in (64, 128):
        h, b, length = 2048 // d, 2, 8192
        q, k, v = make_inputs(b, length, h, d)
        flops = 3.5 * causal_flops(b, h, length, d)
        base = block_sizes("gpu", length, length, d)
        best_t = float("inf")
        for a, bb, c, dd, w, st in BWD_CANDIDATES:
            bs = dataclasses.replace(base, bwd_bq_dq=a, bwd_bk_dq=bb, bwd_bq_dkv=c, bwd_bk_dkv=dd,
                                     bwd_warps=w, bwd_stages=st)  # fmt: skip
            fn = fwd_bwd(functools.partial(flash_attention, causal=True, block_sizes=bs))
            row = {"D": d, "kind": "fwd+bwd", "tiles": [a, bb, c, dd, w, st]}
            try:
                t = time_fn(fn, (q, k, v), args.iters, 3)
                row.update(ms=t * 1e3, tflops=flops / t / 1e12)
                if t < best_t:
                    best_t, best[d] = t, bs
            except Exception as e:  # noqa: BLE001 - report and keep sweeping
                row["error"] = str(e)[:160]
            rows.append(row)
            log(json.dumps(row))
        log(f"best backward tiles D={d}: {best[d]}")
    return rows, best


def markdown(
    meta: dict, dense: list[dict], sparse: list[dict], checks: dict, variants: list[dict]
) -> str:
    peak = meta.get("matmul_tflops")
    lines = [
        f"# {meta['name']}",
        "",
        f"- device: {meta['device']}; date: {meta['date']}; jax {meta['jax']}",
        f"- command: `{meta['command']}`",
        f"- bf16 matmul peak (8192^3): {'not measured' if peak is None else f'{peak:.0f} TFLOP/s'}",
        f"- arjax tiles per head_dim: {meta.get('tiles', 'kernels_pallas/tuning.py table')}",
        "",
        "Causal bf16, TFLOP/s (ms); speedup = other ms / arjax ms (arjax Pallas = Triton forward,"
        " arjax Mosaic GPU = Mosaic GPU forward and backward).",
        "",
        "| D | L | B | H | mode | XLA | cuDNN | stock Pallas | stock Mosaic GPU (fwd only) | jla "
        "| arjax Pallas | arjax Mosaic GPU | vs XLA | vs cuDNN | vs stock Pallas "
        "| Mosaic vs cuDNN | Mosaic vs stock Pallas | Mosaic vs jla |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(row, name):
        if row.get(name + "_ms") is None:
            return "n/a"
        return f"{row[name + '_tflops']:.0f} ({row[name + '_ms']:.2f})"

    def ratio(row, name, ours=""):
        x = row.get(ours + "speedup_vs_" + name)
        return "n/a" if x is None else f"{x:.2f}x"

    for r in dense:
        lines.append(
            f"| {r['D']} | {r['L']} | {r['B']} | {r['H']} | {r['mode']} | {cell(r, 'xla')} "
            f"| {cell(r, 'cudnn')} | {cell(r, 'stock_pallas')} | {cell(r, 'stock_mosaic_gpu')} "
            f"| {cell(r, 'jla')} | {cell(r, 'arjax_pallas')} | {cell(r, 'arjax_mosaic')} "
            f"| {ratio(r, 'xla')} | {ratio(r, 'cudnn')} | {ratio(r, 'stock_pallas')} "
            f"| {ratio(r, 'cudnn', 'mosaic_')} | {ratio(r, 'stock_pallas', 'mosaic_')} "
            f"| {ratio(r, 'jla', 'mosaic_')} |"
        )
    diffs = [
        f"D={r['D']} L={r['L']}: "
        + ", ".join(
            f"{k[: -len('_maxdiff')]} {v:.3g}" for k, v in r.items() if k.endswith("_maxdiff")
        )
        for r in dense
        if any(k.endswith("_maxdiff") for k in r)
    ]
    if diffs:
        lines += ["", "Forward outputs, max abs difference from cuDNN's:", ""]
        lines += [f"- {d}" for d in diffs]
    failed = [(r, k[: -len("_error")]) for r in dense for k in r if k.endswith("_error")]
    if failed:
        lines += ["", "Failed cells (first line of the error; full text in the JSON):", ""]
        for r, name in failed:
            first = r[name + "_error"].splitlines()[0][:300]
            lines.append(f"- D={r['D']} L={r['L']} {r['mode']} {name}: `{first}`")
    cases = {k: c for k, c in checks.items() if "case" in c}
    if cases:
        lines += ["", "Correctness checks (max abs error vs the float32 reference, and in brackets"
                  " the bound: plain XLA attention's error in the same dtype; mosaic: grads via"
                  " the Mosaic GPU backward):", "", "| check | case | out | dq | dk | dv | ok |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, c in cases.items():
            if "error" in c:
                lines.append(f"| {name} | {c['case']} | failed: "
                             f"`{c['error'].splitlines()[0][:200]}` | | | | no |")  # fmt: skip
            else:
                pairs = zip(c["err o,dq,dk,dv"], c["bound (plain XLA) o,dq,dk,dv"])
                e = " | ".join(f"{x:.3g} ({b:.3g})" for x, b in pairs)
                lines.append(f"| {name} | {c['case']} | {e} | {'yes' if c['ok'] else 'NO'} |")
    if variants:
        lines += ["", "Mosaic GPU forward kernel alone, causal bf16 (first row per length: the"
                  " table's; max diff: vs that row's output):", "",
                  "| D | L | bk | stages | pingpong | TFLOP/s (ms) | max diff |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in variants:
            cfg = f"| {r['D']} | {r['L']} | {r['bk']} | {r['stages']} | {r['pingpong']} "
            if "error" in r:
                lines.append(cfg + f"| failed: `{r['error'].splitlines()[0][:200]}` | |")
            else:
                lines.append(cfg + f"| {r['tflops']:.0f} ({r['ms']:.2f}) | {r['max_diff']:.3g} |")
    if not sparse:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "Masked cases (D=128, L=8192, B=2, H=16), ms; speedup = other ms / arjax ms. arjax is"
        " `flash_attention` with its default lowering (on Hopper the Mosaic GPU kernels, segment"
        ' ids included), and with `lowering="mosaic"`; max diff: forward outputs vs the default'
        " lowering's:",
        "",
        "| case | mode | cuDNN dense causal | cuDNN sliding window | jla "
        "| arjax (default lowering) | vs dense cuDNN | vs cuDNN window | vs jla "
        "| arjax Mosaic GPU | Mosaic vs dense cuDNN | Mosaic vs cuDNN window | Mosaic vs jla "
        "| Mosaic vs default | jla max diff | Mosaic max diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(r, name):
        return "n/a" if r.get(name + "_ms") is None else f"{r[name + '_ms']:.2f}"

    def diff(r, name):
        x = r.get(name + "_maxdiff")
        return "n/a" if x is None else f"{x:.3g}"

    for r in sparse:
        mosaic = [ratio(r, peer, "mosaic_") for peer in
                  ("cudnn_dense_causal", "cudnn_window", "jla", "arjax_pallas")]  # fmt: skip
        lines.append(
            f"| {r['case']} | {r['mode']} | {r['cudnn_dense_causal_ms']:.2f} "
            f"| {ms(r, 'cudnn_window')} | {ms(r, 'jla')} | {r['arjax_pallas_ms']:.2f} "
            f"| {r['speedup_vs_dense_cudnn']:.2f}x | {ratio(r, 'cudnn_window')} "
            f"| {ratio(r, 'jla')} | {ms(r, 'arjax_mosaic')} | {' | '.join(mosaic)} "
            f"| {diff(r, 'jla')} | {diff(r, 'arjax_mosaic')} |"
        )
    return "\n".join(lines) + "\n"


def _csv(cast):
    return lambda text: [cast(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--tune-backward", action="store_true", help="sweep backward tiles first and use the best"
    )
    parser.add_argument(
        "--check",
        choices=("all", "triton", "mosaic", "none"),
        default="all",
        help="correctness checks first: the Triton kernels, the Mosaic GPU forward, both, none",
    )
    parser.add_argument("--no-check", action="store_true", help="same as --check none")
    parser.add_argument("--impls", type=_csv(str), default=list(IMPLS), help="dense columns")
    parser.add_argument("--head-dims", type=_csv(int), default=[64, 128])
    parser.add_argument("--lengths", type=_csv(int), default=[2048, 8192, 32768])
    parser.add_argument("--modes", type=_csv(str), default=["fwd", "fwd+bwd"])
    parser.add_argument("--no-sparse", action="store_true", help="skip the window/segment rows")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense causal rows")
    parser.add_argument("--no-peak", action="store_true", help="skip the matmul peak")
    parser.add_argument(
        "--variants", action="store_true", help="time Mosaic GPU forward kernel variants too"
    )
    parser.add_argument("--name", default="bench_attention", help="results file name")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if unknown := set(args.impls) - set(IMPLS):
        parser.error(f"--impls: unknown {sorted(unknown)}; choose from {IMPLS}")
    if unknown := set(args.modes) - {"fwd", "fwd+bwd"}:
        parser.error(f"--modes: unknown {sorted(unknown)}")
    check_what = "none" if args.no_check else args.check
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    dev = jax.devices()[0]
    meta = {
        "name": args.name,
        "device": f"{dev.platform} {getattr(dev, 'device_kind', '')}",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "command": "PYTHONPATH=. python " + " ".join(sys.argv),
    }
    log(json.dumps(meta))
    result = {"meta": meta, "check": {}, "dense": [], "sparse": [], "mosaic_variants": []}

    def save():  # after every section, so a later crash keeps what was measured
        (out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=1))
        md = markdown(
            meta, result["dense"], result["sparse"], result["check"], result["mosaic_variants"]
        )
        (out_dir / f"{args.name}.md").write_text(md)
        return md

    if check_what in ("all", "mosaic"):
        result["check"].update(check_mosaic(log))
        save()
    if check_what in ("all", "triton"):
        result["check"].update(check(log))
    if failed := failed_checks(result["check"]):
        save()
        sys.exit(f"correctness checks failed: {failed} (see {out_dir / args.name}.md)")
    tiles = {}
    if args.tune_backward:  # the forward tiles come from an earlier sweep (tune_attention.json)
        result["backward_sweep"], tiles = sweep_backward(args, log)
        meta["tiles"] = {d: dataclasses.asdict(bs) for d, bs in tiles.items()}
    if not args.no_peak:
        meta["matmul_tflops"] = matmul_peak(args)
        log(f"matmul peak {meta['matmul_tflops']:.0f} TFLOP/s")
    if not args.no_dense:
        dense_rows(args, log, tiles, result["dense"], save)
    if args.variants:
        result["mosaic_variants"] = mosaic_variant_rows(args, log)
        save()
    if not args.no_sparse:
        sparse_rows(args, log, tiles, result["sparse"], save)
    print(save())


if __name__ == "__main__":
    main()
