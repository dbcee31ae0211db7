"""Chunked linear-attention scan: Pallas kernels vs jla (Mosaic GPU) vs fla (Triton) vs jnp.

Scalar decay (``chunk_simple_gla``) and gated linear attention (``chunk_gla``) from the
flash-linear-attention package ``fla-core`` and ``simple_gla`` / ``gla`` of
``jax-linear-attention`` (jla: JAX, Mosaic GPU kernels; its forward output is compared with
arjax's; no decay is timed for arjax's kernels alone, the row ``impl="auto"`` reads), bf16,
head dim 128, (batch, heads, len) =
(8, 16, 2048) and (2, 16, 8192), forward and forward+backward, on one GPU. First checks the
kernels on the GPU against the float32 recurrence (odd length, initial state, segment
resets, gradients), then times everything, arjax's fused Mosaic GPU forward (``lowering=
"mosaic"``; GLA: with Triton's scores kernel) in a table of its own. Run (fla-core and jla
as wheels under .whl/):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:. python3 experiments/bench_scan.py

Writes ``experiments/results/bench_scan.{json,md}``. ``--tune`` instead sweeps the scan's
launch parameters (``kernels_pallas.linear_attention_scan.TritonTuning``, chunk size) at
(8, 16, 2048), checks
each config against the float32 recurrence, and writes ``experiments/results/tune_scan.json``
(about 150 s on an H200: ``--tune-budget``, 100 s, caps the candidates), then prints the GLA
device time per kernel (jax profiler) of the table's row and of the winner; ``--profile``
prints the table row's only, for each of ``--tune-variants``.

JAX timings: jit, compiled before timing, ``block_until_ready``; torch: CUDA events; both the
median over ``--reps`` samples of ``--inner`` back-to-back calls. fwd+bwd returns the output
and all input gradients (q, k, v, gate) for the cotangent ``do`` in every implementation; fla
also returns the final state.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch

import argparse  # noqa: E402
import collections  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from arjax.ops.linear_attention import linear_attention  # noqa: E402
from kernels_pallas.linear_attention_scan import (  # noqa: E402
    TritonTuning,
    chunked_linear_attention,
    linear_attention_recurrence,
    recurrent_step,
)
from kernels_pallas.linear_attention_scan.tuning import TRITON  # noqa: E402

SHAPES = ((8, 16, 2048), (2, 16, 8192))  # (batch, heads, len)
DIM = 128
VARIANTS = ("none", "scalar", "gla")  # "none": arjax's kernels only (what impl="auto" needs)


def make_inputs(shape, variant, dtype, seed=0):
    """q (pre-scaled by dim^-1/2), k, v ``[b, len, h, d]``, log-gate (fla's logsigmoid/16; None
    for ``"none"``), do."""
    b, h, length = shape
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    x = lambda key, shp: jax.random.normal(key, shp, jnp.float32)  # noqa: E731
    q = x(ks[0], (b, length, h, DIM)) * DIM**-0.5
    k, v, do = x(ks[1], q.shape), x(ks[2], q.shape), x(ks[3], q.shape)
    gshape = (b, length, h) if variant == "scalar" else (b, length, h, DIM)
    g = None if variant == "none" else jax.nn.log_sigmoid(x(ks[4], gshape) + 3.0) / 16.0
    return tuple(a.astype(dtype) for a in (q, k, v)) + (g, do.astype(dtype))


def time_jax(fn, *args, reps, inner) -> float:
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t) / inner)
    return statistics.median(samples) * 1e3


def time_torch(fn, *, reps, inner) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return statistics.median(samples)


def jax_fns(impl: str, chunk: int, tuning: TritonTuning | None = None):
    """(fwd, fwd+bwd) jitted for ``impl`` in {"pallas", "xla"} (arjax.ops.linear_attention)
    or "mosaic" (the kernel with ``lowering="mosaic"``: the fused Hopper forward, Triton's
    backward); with ``tuning`` the Pallas kernel itself with those launch parameters."""

    def fwd(q, k, v, g):
        if tuning is not None:
            return chunked_linear_attention(q, k, v, log_decay=g, chunk_size=chunk, tuning=tuning)
        if impl == "mosaic":
            return chunked_linear_attention(q, k, v, log_decay=g, chunk_size=chunk,
                                            lowering="mosaic")  # fmt: skip
        return linear_attention(q, k, v, log_decay=g, form="chunked", chunk_size=chunk, impl=impl)

    def fwd_bwd(q, k, v, g, do):
        out, vjp = jax.vjp(lambda *a: fwd(*a)[0], q, k, v, g)
        return out, vjp(do)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def jla_fns(variant: str):
    """(fwd, fwd+bwd) jitted for jla's Mosaic GPU kernels (``jax-linear-attention``:
    ``simple_gla`` for scalar decay, ``gla``), same inputs and ``scale=1`` as ours."""
    from jla.ops import linear_attention as jla_linear_attention

    kind = "simple_gla" if variant == "scalar" else "gla"

    def fwd(q, k, v, g):
        return jla_linear_attention(
            kind, q, k, v, g=g, scale=1.0, output_final_state=True, impl="mosaic_gpu"
        )

    def fwd_bwd(q, k, v, g, do):
        out, vjp = jax.vjp(lambda *a: fwd(*a)[0], q, k, v, g)
        return out, vjp(do)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def fla_fns(variant, q, k, v, g, do):
    import fla.ops.common.chunk_o
    import torch
    from fla.ops.gla import chunk_gla
    from fla.ops.simple_gla import chunk_simple_gla

    # fla-core 0.6 refuses its gated chunk_bwd_dqkwg (used by chunk_simple_gla's backward) on
    # Hopper with Triton < 3.7.1 (fla issue #640: possibly wrong values); the device has 3.6,
    # so the guard is lifted to time it (its values are not used here).
    fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True

    t = lambda a, grad: (
        torch.from_dlpack(np.asarray(a.astype(jnp.float32)))
        .cuda()
        .to(  # noqa: E731
            torch.bfloat16 if a.dtype == jnp.bfloat16 else torch.float32
        )
        .requires_grad_(grad)
    )
    tq, tk, tv, tg = (t(a, True) for a in (q, k, v, g))
    tdo = t(do, False)
    op = chunk_simple_gla if variant == "scalar" else chunk_gla

    def fwd():
        with torch.no_grad():
            return op(tq, tk, tv, g=tg, scale=1.0, output_final_state=True)

    def fwd_bwd():
        o, _ = op(tq, tk, tv, g=tg, scale=1.0, output_final_state=True)
        return o, torch.autograd.grad(o, (tq, tk, tv, tg), tdo)

    return fwd, fwd_bwd


def rel_err(x, y) -> float:
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    return float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-12))


def fp32_errors(variant: str, gate_scale: float | np.ndarray = 1.0) -> dict:
    """Kernel vs recurrence, float32, odd length, initial state, segment resets, gradients.

    ``gate_scale``: log-gate multiplier, a float or per token (``[203]``)."""
    b, length, h = 2, 203, 2
    ks = jax.random.split(jax.random.PRNGKey(1), 8)
    q, k = (jax.random.normal(kk, (b, length, h, 32)) * 0.3 for kk in ks[:2])
    v = jax.random.normal(ks[2], (b, length, h, 64))
    g = None
    if variant != "none":
        shp = (b, length, h) if variant == "scalar" else (b, length, h, 32)
        scale = np.reshape(np.asarray(gate_scale, np.float32), (1, -1) + (1,) * (len(shp) - 2))
        g = scale * jax.nn.log_sigmoid(jax.random.normal(ks[3], shp) + 1.0)
    s0 = jax.random.normal(ks[4], (b, h, 32, 64))
    seg = jnp.asarray(np.repeat([[1, 2, 3, 4], [1, 1, 2, 5]], [50, 60, 40, 53], axis=1))
    w = jax.random.normal(ks[5], v.shape)
    fns = {
        "kernel": lambda q, k, v, g, s0: chunked_linear_attention(
            q, k, v, log_decay=g, initial_state=s0, segment_ids=seg
        ),
        "ref": lambda q, k, v, g, s0: linear_attention_recurrence(
            q, k, v, log_decay=g, initial_state=s0, segment_ids=seg
        ),
    }
    argnums = (0, 1, 2, 3, 4) if g is not None else (0, 1, 2, 4)
    outs, grads = {}, {}
    for name, fn in fns.items():
        loss = lambda *a, fn=fn: jnp.sum(fn(*a)[0] * w) + jnp.sum(fn(*a)[1])  # noqa: E731
        outs[name] = jax.jit(fn)(q, k, v, g, s0)
        grads[name] = jax.jit(jax.grad(loss, argnums))(q, k, v, g, s0)
    return {
        f"fp32 {variant} out": rel_err(outs["kernel"][0], outs["ref"][0]),
        f"fp32 {variant} state": rel_err(outs["kernel"][1], outs["ref"][1]),
        f"fp32 {variant} grads": max(rel_err(x, y) for x, y in zip(grads["kernel"], grads["ref"])),
    }


def check(results: dict, variants: list[str]) -> None:
    """Kernels vs the float32 recurrence on the GPU (fp32 and bf16) and the decode step."""
    errs = {}
    for variant in variants:
        errs.update(fp32_errors(variant))
    for variant in VARIANTS:
        q, k, v, g, do = make_inputs((2, 4, 1024), variant, jnp.bfloat16, seed=2)
        o1, s1 = jax.jit(lambda *a: chunked_linear_attention(*a[:3], log_decay=a[3]))(q, k, v, g)
        o2, s2 = linear_attention_recurrence(q, k, v, log_decay=g)
        errs[f"bf16 {variant} out"] = rel_err(o1, o2)
        errs[f"bf16 {variant} state"] = rel_err(s1, s2)
    q, k, v, g, _ = make_inputs((2, 4, 1), "gla", jnp.float32, seed=3)
    s0 = jax.random.normal(jax.random.PRNGKey(4), (2, 4, DIM, DIM))
    o1, s1 = jax.jit(recurrent_step)(q[:, 0], k[:, 0], v[:, 0], s0, log_decay=g[:, 0])
    o2, s2 = linear_attention_recurrence(q, k, v, log_decay=g, initial_state=s0)
    errs["fp32 decode step out"] = rel_err(o1, o2[:, 0])
    errs["fp32 decode step state"] = rel_err(s1, s2)
    results["errors"] = errs
    for name, e in errs.items():
        print(f"  {name:28s} max rel err {e:.2e}")


def vs_pallas(fwd, q, k, v, g) -> float:
    """Max rel err of ``fwd``'s output against arjax's default Pallas forward's."""
    return rel_err(fwd(q, k, v, g)[0], jax_fns("pallas", 64)[0](q, k, v, g)[0])


def measure(row: dict, impl: str, variant, inputs, reps: int, inner: int) -> None:
    """Add ``{name} fwd`` and ``{name} fwd+bwd`` (ms) to ``row``, or ``{name} error``."""
    q, k, v, g, do = inputs
    name = {"pallas": "pallas", "mosaic": "mosaic", "fla": "fla", "xla": "jnp", "jla": "jla"}[impl]
    if variant == "none" and impl in ("fla", "jla"):
        return  # the peers' kernels take a gate: their rows are the decayed variants
    start = time.perf_counter()
    try:
        if impl == "fla":
            import torch

            f, fb = fla_fns(variant, q, k, v, g, do)
            row["fla fwd"] = time_torch(f, reps=reps, inner=inner)
            row["fla fwd+bwd"] = time_torch(fb, reps=reps, inner=inner)
            del f, fb
            torch.cuda.empty_cache()
        elif impl == "jla":
            f, fb = jla_fns(variant)
            row["jla fwd"] = time_jax(f, q, k, v, g, reps=reps, inner=inner)
            row["jla fwd+bwd"] = time_jax(fb, q, k, v, g, do, reps=reps, inner=inner)
            row["jla vs pallas out"] = vs_pallas(f, q, k, v, g)
            jax.clear_caches()
        else:
            # The jnp GLA form materialises [b, n, c, c, h, dk] weights: chunk 16 keeps that
            # at 4 GiB for these shapes (17 GiB at chunk 64).
            chunk = 16 if (impl, variant) == ("xla", "gla") else 64
            f, fb = jax_fns(impl, chunk)
            row[f"{name} fwd"] = time_jax(f, q, k, v, g, reps=reps, inner=inner)
            row[f"{name} fwd+bwd"] = time_jax(fb, q, k, v, g, do, reps=reps, inner=inner)
            if impl == "mosaic":
                row["mosaic vs pallas out"] = vs_pallas(f, q, k, v, g)
            jax.clear_caches()
    except Exception as e:  # noqa: BLE001 -- record (e.g. out of memory) and carry on
        row[f"{name} error"] = repr(e)[:300]
    row[f"{name} s"] = round(time.perf_counter() - start, 1)  # compile, autotune, timing
    print(json.dumps(row), flush=True)


def bench(results: dict, impls: list[str], reps: int, inner: int, out: str) -> None:
    """Implementation-major (so a time limit still leaves whole columns); written after each."""
    rows = {}
    for impl in impls:
        for shape in SHAPES:
            for variant in VARIANTS:
                if (shape, variant) not in rows:
                    rows[shape, variant] = {"shape": shape, "variant": variant}
                    results["rows"].append(rows[shape, variant])
                inputs = make_inputs(shape, variant, jnp.bfloat16)
                measure(rows[shape, variant], impl, variant, inputs, reps, inner)
                write(results, out, quiet=True)


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def ratio(a, b) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}x"


def peer_cells(row: dict, p: str) -> str:
    """Table cells of pass ``p``: pallas, jla, fla, jnp times (ms), then each / pallas."""
    ours, jla, fla, jnp_ = (row.get(f"{n} {p}") for n in ("pallas", "jla", "fla", "jnp"))
    return (f"{fmt(ours)} | {fmt(jla)} | {fmt(fla)} | {fmt(jnp_)} | {ratio(jla, ours)} "
            f"| {ratio(fla, ours)} | {ratio(jnp_, ours)}")  # fmt: skip


def header(results: dict, title: str) -> list[str]:
    """The markdown's first lines: title, device / date / versions, command."""
    return [
        f"# {title}",
        "",
        f"device: {results['device']}; date: {results['date']}; {results['versions']}",
        f"command: `{results['command']}`",
        "",
    ]


def write(results: dict, out: str, quiet: bool = False) -> None:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as fh:
        json.dump(results, fh, indent=1)
    lines = [
        *header(results, "Chunked linear-attention scan (bf16, head dim 128), ms"),
        "| (B,H,L) | variant | pass | pallas | jla | fla | jnp chunked | jla / pallas "
        "| fla / pallas | jnp / pallas |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        for p in ("fwd", "fwd+bwd"):
            lines.append(f"| {tuple(r['shape'])} | {r['variant']} | {p} | {peer_cells(r, p)} |")
    fused = [r for r in results["rows"] if "mosaic fwd" in r]
    if fused:
        lines += ["", "arjax's fused Mosaic GPU forward (`lowering=\"mosaic\"`; fwd+bwd: with "
                  "the Triton backward), ms:", "",
                  "| (B,H,L) | variant | pass | mosaic | pallas (Triton) | jla | pallas / mosaic "
                  "| jla / mosaic |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in fused:
            for p in ("fwd", "fwd+bwd"):
                m, t, j = (r.get(f"{n} {p}") for n in ("mosaic", "pallas", "jla"))
                lines.append(f"| {tuple(r['shape'])} | {r['variant']} | {p} | {fmt(m)} | {fmt(t)} "
                             f"| {fmt(j)} | {ratio(t, m)} | {ratio(j, m)} |")  # fmt: skip
        lines += [""] + [f"- {tuple(r['shape'])} {r['variant']}: output vs the Triton forward's, "
                         f"max rel err {r['mosaic vs pallas out']:.2e}" for r in fused
                         if "mosaic vs pallas out" in r]  # fmt: skip
    diffs = [r for r in results["rows"] if "jla vs pallas out" in r]
    if diffs:
        lines += ["", "jla's forward output vs arjax's Pallas output (max rel err):", ""]
        lines += [
            f"- {tuple(r['shape'])} {r['variant']}: {r['jla vs pallas out']:.2e}" for r in diffs
        ]
    errors = [f"{r['shape']} {r['variant']}: {k} {v}" for r in results["rows"] for k, v in r.items()
              if k.endswith("error")]  # fmt: skip
    lines += ["", "GPU check vs float32 recurrence (max rel err):", ""]
    lines += [f"- {k}: {v:.2e}" for k, v in results.get("errors", {}).items()]
    lines += [""] + [f"- error: {e}" for e in errors]
    lines += [
        "",
        "Notes: fla `chunk_simple_gla` backward runs with fla's Triton<3.7.1-on-Hopper guard "
        "lifted (fla #640). The jnp GLA form runs at chunk 16 (memory); all else at chunk 64.",
    ]
    with open(out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines), flush=True)


# ----------------------------------------------------------------------------------------------
# --tune: coordinate descent over the scan's launch parameters

TUNE_SHAPE = (8, 16, 2048)
# bf16 inputs vs the float32 recurrence, relative to the largest reference magnitude: the
# output (q, k, v and MMA operands rounded to 8 mantissa bits) and the gradients (also the
# rounded cotangent; the gate gradient sums a chunk of rounded products).
TUNE_TOL = {"out": 2e-2, "grads": 5e-2}
# (forward fields, backward fields or None, candidates, variants). A candidate sets the
# forward fields and (if any) the backward fields to the same value in one run: the forward's
# time decides the forward fields, (fwd+bwd - fwd) the backward fields, so one run tries both
# Fields without a backward twin (chunk, sub) are decided on fwd+bwd. "chunk" is the
# ``chunk_size`` argument. Steps in order of expected gain (the budget may cut the tail).
TUNE_STEPS = (
    (("staged_tile",), ("bwd_staged_tile",), ((64,), (32,)), ("gla",)),
    (("warps",), ("bwd_warps",), ((8,),), ("scalar", "gla")),  # 2 warps: more spills (ptxas)
    (("state_stages",), ("bwd_state_stages",), ((1,), (3,)), ("scalar", "gla")),
    (("state_bk", "state_bv"), ("bwd_state_bk", "bwd_state_bv"),
     ((32, 64), (32, 32), (64, 128)), ("scalar", "gla")),
    (("state_warps",), ("bwd_state_warps",), ((8,), (2,)), ("scalar", "gla")),
    (("chunk",), None, ((128,),), ("scalar", "gla")),
    (("sub",), None, ((32,),), ("gla",)),
    (("bwd_staged_bk",), None, ((32,),), ("gla",)),  # 128: 1.1 KB of spills (ptxas)
    (("stages",), ("bwd_stages",), ((1,), (3,)), ("scalar", "gla")),
)  # fmt: skip


TABLE_ROW = {"scalar": "scalar", "gla": "gated"}  # bench variant -> tuning.TRITON row


# ``--tune-steps quick`` (a short GPU slot): GLA's tiles and warps only.
QUICK_STEPS = (
    (("staged_tile",), ("bwd_staged_tile",), ((64,),), ("gla",)),
    (("warps",), ("bwd_warps",), ((8,),), ("gla",)),  # dq/dk: no spills at 8 (ptxas)
)  # fmt: skip


def tune_strong_gate_check() -> dict:
    """Compiled GLA kernels, float32, with log-gates about -0.4, -5 and -40 per token in turns
    of 32 tokens, so blocks take both the factored form and the exact loops: max rel err of
    output, state and gradients vs the recurrence."""
    t = np.arange(203)
    scale = np.select([t % 96 < 32, t % 96 < 64], [1.0, 12.0], 100.0)
    try:
        check = fp32_errors("gla", gate_scale=scale)
    except Exception as e:  # noqa: BLE001 -- a compile failure: record it
        check = repr(e)[:500]
    print(f"  strong-gate check: {check}", flush=True)
    return check


def tune_reference(variant: str, inputs) -> tuple:
    """Float32 recurrence on batch row 0 (rows are independent): output and q/k/v/gate grads."""
    q, k, v, g, do = (x[:1] for x in inputs)

    def fb(q, k, v, g):
        out, vjp = jax.vjp(lambda *a: linear_attention_recurrence(*a[:3], log_decay=a[3])[0],
                           q, k, v, g)  # fmt: skip
        return out, vjp(do.astype(jnp.float32))

    return jax.jit(fb)(q, k, v, g)


def tune_trial(cfg: TritonTuning, chunk: int, inputs, ref, reps: int, inner: int) -> dict:
    """Compile, check (row 0 vs ``ref``) and time one config: fwd, then fwd+bwd."""
    trial = {"chunk": chunk, "config": dataclasses.asdict(cfg), "errors": {}}
    q, k, v, g, do = inputs
    f, fb = jax_fns("pallas", chunk, cfg)
    for name, fn, args in (("fwd", f, (q, k, v, g)), ("fwd+bwd", fb, (q, k, v, g, do))):
        t = time.perf_counter()
        try:
            res = jax.block_until_ready(fn(*args))
            trial[f"{name} compile s"] = round(time.perf_counter() - t, 2)
            if name == "fwd":
                trial["errors"]["out"] = rel_err(res[0][:1], ref[0])
            else:
                for n, a, b in zip(("dq", "dk", "dv", "dg"), res[1], ref[1]):
                    trial["errors"][n] = rel_err(a[:1], b)
            del res
            trial[f"{name} ms"] = time_jax(fn, *args, reps=reps, inner=inner)
        except Exception as e:  # noqa: BLE001 -- compile/launch failure: record, go on
            trial[f"{name} error"] = repr(e)[:500]
            break
    jax.clear_caches()
    errs = trial["errors"]
    trial["fwd ok"] = "fwd ms" in trial and errs["out"] < TUNE_TOL["out"]
    trial["bwd ok"] = "fwd+bwd ms" in trial and all(
        errs[n] < TUNE_TOL["grads"] for n in ("dq", "dk", "dv", "dg")
    )
    return trial


def tune_variant(variant: str, res: dict, save, reps: int, inner: int, deadline: float,
                 steps=TUNE_STEPS) -> None:  # fmt: skip
    """Coordinate descent from the table's row (``steps``), then its result re-timed.

    Fills ``res`` (``trials``, ``baseline``, ``best``: per pass the fastest trial that passed the
    check, the re-timed combination included, so timing noise in the descent cannot make it
    worse than the baseline) and calls ``save()`` after each trial, so a crash (a compiler
    abort) still leaves the trials before it on disk."""
    inputs = make_inputs(TUNE_SHAPE, variant, jnp.bfloat16)
    ref = tune_reference(variant, inputs)
    cur = TRITON[TABLE_ROW[variant]]
    chunk, trials = 64, res.setdefault("trials", [])

    def run(cfg, ch, label):
        print(f"  {variant} {label}: chunk {ch}, {cfg}", flush=True)
        trial = tune_trial(cfg, ch, inputs, ref, reps, inner)
        trial["step"] = label
        trials.append(trial)
        save()
        print(json.dumps({"variant": variant, **trial}), flush=True)
        return trial

    base = run(cur, chunk, "baseline")
    if not (base["fwd ok"] and base["bwd ok"]):
        res.update(best=None, note="baseline failed the check")
        return
    cur_fwd, cur_bwd = base["fwd ms"], base["fwd+bwd ms"] - base["fwd ms"]
    start_cfg = cur
    for fwd_fields, bwd_fields, candidates, variants in steps:
        if variant not in variants:
            continue
        for value in candidates:
            if time.perf_counter() > deadline:
                break
            fwd_set = dict(zip(fwd_fields, value))
            bwd_set = dict(zip(bwd_fields, value)) if bwd_fields else {}
            new_chunk = fwd_set.pop("chunk", chunk)
            cfg = dataclasses.replace(cur, **fwd_set, **bwd_set)
            trial = run(cfg, new_chunk, f"{fwd_fields}={value}")
            if "fwd error" in trial and bwd_set:  # the forward half failed: try the backward's
                trial = run(dataclasses.replace(cur, **bwd_set), chunk, f"{bwd_fields}={value}")
                fwd_set = {}
            fwd = trial.get("fwd ms") if trial["fwd ok"] else None
            bwd = trial["fwd+bwd ms"] - fwd if fwd is not None and trial["bwd ok"] else None
            if not bwd_set:  # shared fields: decided on fwd+bwd
                if fwd is not None and bwd is not None and fwd + bwd < cur_fwd + cur_bwd:
                    cur, chunk, cur_fwd, cur_bwd = cfg, new_chunk, fwd, bwd
                continue
            if fwd_set and fwd is not None and fwd < cur_fwd:
                cur, cur_fwd = dataclasses.replace(cur, **fwd_set), fwd
            if bwd is not None and bwd < cur_bwd:
                cur, cur_bwd = dataclasses.replace(cur, **bwd_set), bwd
    if (cur, chunk) != (start_cfg, 64):
        run(cur, chunk, "combined")
    res["baseline"] = {k: base.get(k) for k in ("fwd ms", "fwd+bwd ms")}
    res["best"] = {}
    for p, ok in (("fwd", ("fwd ok",)), ("fwd+bwd", ("fwd ok", "bwd ok"))):
        good = [t for t in trials if all(t[k] for k in ok)]
        t = min(good, key=lambda t: t[f"{p} ms"])
        res["best"][p] = {k: t[k] for k in ("step", "chunk", "config", f"{p} ms")}


IDLE = "(idle between kernels)"  # device_profile's entry for the stream's gaps
ENQUEUE = "host enqueue ms per call"  # device_profile's key for the host's dispatch time


def device_profile(fn, *args, calls: int = 3) -> dict:
    """Device time per kernel, ms per call of the jitted ``fn(*args)`` (compiled and run once
    first; jax profiler trace of ``calls`` calls enqueued back to back, as the timings run
    them; the 20 largest per line), and :data:`IDLE`: ms per call that the line sat idle
    between its first kernel and its last (launch gaps, or a host that enqueues slower than
    the GPU runs). Keys: ``{device line: {kernel: ms}}`` over the trace's stream lines (all
    device lines if it names none "Stream"), and :data:`ENQUEUE`: host ms per call to enqueue
    them (near the per-call time when the host is the bottleneck)."""
    with tempfile.TemporaryDirectory() as tmp:
        jax.block_until_ready(fn(*args))
        with jax.profiler.trace(tmp):
            start = time.perf_counter()
            outs = [fn(*args) for _ in range(calls)]
            enqueue = (time.perf_counter() - start) * 1e3 / calls
            jax.block_until_ready(outs)
        (path,) = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        planes = jax.profiler.ProfileData.from_file(path).planes
    lines = [(p.name, line) for p in planes if p.name.startswith("/device") for line in p.lines]
    streams = [x for x in lines if "Stream" in x[1].name] or lines
    out: dict = {ENQUEUE: round(enqueue, 4)}
    for plane, line in streams:
        times, spans = collections.Counter(), []
        for ev in line.events:
            times[ev.name] += ev.duration_ns / 1e6 / calls
            spans.append((ev.start_ns, ev.start_ns + ev.duration_ns))
        profile = {k: round(v, 4) for k, v in times.most_common(20)}
        if spans:
            busy = sum(times.values())
            span = (max(e for _, e in spans) - min(s for s, _ in spans)) / 1e6 / calls
            profile[IDLE] = round(max(span - busy, 0.0), 4)
        out[f"{plane} {line.name}"] = profile
    return out


def kernel_profile(variant: str, cfg: TritonTuning, chunk: int = 64, shape=TUNE_SHAPE,
                   calls: int = 3) -> dict:  # fmt: skip
    """:func:`device_profile` of a pallas fwd+bwd call (``chunk``, ``cfg``): which kernel to
    work on next."""
    inputs = make_inputs(shape, variant, jnp.bfloat16)
    _, fb = jax_fns("pallas", chunk, cfg)
    out = device_profile(fb, *inputs, calls=calls)
    jax.clear_caches()
    return out


def tune_profiles(res: dict, configs: dict, variant: str = "gla") -> None:
    """Per-kernel times (``kernel_profile``) of ``variant`` under ``configs`` ``{name:
    (TritonTuning, chunk)}``, printed."""
    for name, (cfg, chunk) in configs.items():
        try:
            res[name] = kernel_profile(variant, cfg, chunk)
        except Exception as e:  # noqa: BLE001 -- a profiler failure must not end the sweep
            res[name] = repr(e)[:300]
        print(f"  {variant} kernel profile ({name}, ms per fwd+bwd): {json.dumps(res[name])}",
              flush=True)  # fmt: skip


def tune_fla(variant: str, reps: int, inner: int) -> dict:
    """fla at the tuning shape, for the ratio (same timing method as ``measure``)."""
    row: dict = {}
    measure(row, "fla", variant, make_inputs(TUNE_SHAPE, variant, jnp.bfloat16), reps, inner)
    return row


def print_best(variant: str, res: dict) -> None:
    """One line per pass: the best config (its non-default fields), baseline and fla times."""
    best, base, fla = res.get("best"), res.get("baseline", {}), res.get("fla", {})
    if not best:
        print(f"  {variant}: {res.get('note')}", flush=True)
        return
    default = dataclasses.asdict(TritonTuning())
    for p in ("fwd", "fwd+bwd"):
        ours, fl = best[p][f"{p} ms"], fla.get(f"fla {p}")
        changed = {k: v for k, v in best[p]["config"].items() if default[k] != v}
        print(f"  {variant:6s} {p:7s} best {fmt(ours)} (baseline {fmt(base.get(f'{p} ms'))}, "
              f"fla {fmt(fl)}, fla/best {ratio(fl, ours)}): chunk_size={best[p]['chunk']} "
              f"TritonTuning(**{changed})", flush=True)  # fmt: skip


def tune(results: dict, reps: int, inner: int, budget: float, out: str,
         variants: tuple[str, ...] = ("gla", "scalar"), quick: bool = False) -> None:  # fmt: skip
    """The sweep, GLA first (60% of the budget with both variants: more steps, longer
    compiles), then scalar decay; the JSON is written after each trial. The budget covers the
    candidates; the GPU strong-gate checks come before it, each winner's re-timing, fla and
    (GLA) the per-kernel profiles after (~10 s each; fla's autotune longer on a fresh machine).
    ``quick``: ``QUICK_STEPS`` and only the winner's profile (a short GPU slot)."""
    results.update(shape=TUNE_SHAPE, dim=DIM, tolerances=TUNE_TOL, variants={})
    start = time.perf_counter()

    def save():
        results["elapsed s"] = round(time.perf_counter() - start, 1)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as fh:
            json.dump(results, fh, indent=1)

    results["strong-gate check"] = tune_strong_gate_check()
    save()
    sweep_start = time.perf_counter()
    shares = {"gla": 0.6 if "scalar" in variants else 1.0, "scalar": 1.0}
    steps = QUICK_STEPS if quick else TUNE_STEPS
    for variant in ("gla", "scalar"):
        if variant not in variants:
            continue
        res = results["variants"].setdefault(variant, {})
        tune_variant(variant, res, save, reps, inner, sweep_start + budget * shares[variant],
                     steps)  # fmt: skip
        print_best(variant, res)
        res["fla"] = tune_fla(variant, reps, inner)
        save()
        if variant == "gla" and res.get("best"):
            best = res["best"]["fwd+bwd"]
            configs = {"best": (TritonTuning(**best["config"]), best["chunk"])}
            if not quick:
                configs = {"table": (TRITON["gated"], 64), **configs}
            tune_profiles(res.setdefault("kernel profiles", {}), configs)
            save()
    print(f"\nbest per variant/pass at (B,H,L)={TUNE_SHAPE}, D={DIM} (ms; table row: non-defaults)")
    for variant, res in results["variants"].items():
        print_best(variant, res)
    print(f"wrote {out} ({results['elapsed s']} s)")


def new_results() -> dict:
    """The results record: device, date, versions (jax, torch, triton, fla, jla), command."""
    versions = f"jax {jax.__version__}"
    try:
        import fla
        import torch
        import triton

        versions += (
            f", torch {torch.__version__}, triton {triton.__version__}, fla {fla.__version__}"
        )
    except ImportError as e:
        versions += f" (fla unavailable: {e})"
    try:
        from importlib.metadata import version

        versions += f", jax-linear-attention {version('jax-linear-attention')}"
    except ImportError as e:
        versions += f" (jla unavailable: {e})"
    return {
        "device": jax.devices()[0].device_kind,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "versions": versions,
        "command": " ".join(["PYTHONPATH=/tmp/site:. python3", *sys.argv]),
        "rows": [],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--out", default="experiments/results/bench_scan")
    ap.add_argument("--check", default="none,scalar,gla", help="fp32 GPU checks ('' for none)")
    ap.add_argument(
        "--impls", default="pallas,mosaic,jla,fla,xla", help="what to time, in order ('': none)"
    )
    ap.add_argument("--tune", action="store_true", help="sweep TritonTuning instead (see above)")
    ap.add_argument("--tune-budget", type=float, default=100.0, help="seconds for candidates")
    ap.add_argument("--tune-out", default="experiments/results/tune_scan.json")
    ap.add_argument("--profile", action="store_true",
                    help="per-kernel times of --tune-variants' table rows")  # fmt: skip
    ap.add_argument("--tune-variants", default="gla,scalar", help="variants to sweep (in order)")
    ap.add_argument("--tune-steps", choices=("all", "quick"), default="all",
                    help="TUNE_STEPS, or QUICK_STEPS")  # fmt: skip
    args = ap.parse_args()
    results = new_results()
    if args.profile:
        for variant in args.tune_variants.split(","):
            row = TRITON[TABLE_ROW[variant]]
            tune_profiles(results.setdefault(variant, {}), {"table": (row, 64)}, variant)
        return
    if args.tune:
        del results["rows"]
        tune(results, args.reps, args.inner, args.tune_budget, args.tune_out,
             tuple(args.tune_variants.split(",")), args.tune_steps == "quick")  # fmt: skip
        return
    if args.check:
        check(results, args.check.split(","))
        write(results, args.out)
    bench(results, [i for i in args.impls.split(",") if i], args.reps, args.inner, args.out)
    write(results, args.out)


if __name__ == "__main__":
    main()
