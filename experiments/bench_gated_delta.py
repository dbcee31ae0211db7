"""Gated delta rule (Gated DeltaNet): arjax's Pallas kernel vs jla (Mosaic GPU) vs fla
(Triton) vs the jnp chunked form, forward and forward+backward, on one GPU.

``arjax.ops.gated_delta_rule(impl="pallas")`` (and, ``--impls mosaic``, ``impl="pallas_mosaic"``:
the Hopper kernels, all Pallas Mosaic GPU) beside ``gated_deltanet`` of
``jax-linear-attention`` (jla) and ``chunk_gated_delta_rule`` of ``fla-core``, all with
``scale=1`` on the same inputs (bf16, head dim 128, unit-norm keys, ``beta`` in (0, 1),
log decay ``log_sigmoid(x + 3)``), (batch, heads, len) = (8, 16, 2048) and (2, 16, 8192);
each peer's forward output is compared with arjax's. First checks the kernel on the GPU
against the float32 recurrence (odd length, initial state, packed documents, every
gradient; and bf16 outputs). Run (fla-core and jla as wheels under .whl/):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:. python3 experiments/bench_gated_delta.py

Writes ``experiments/results/bench_gated_delta.{json,md}``. Timing as in
``experiments/bench_scan.py`` (its helpers): jit, compiled first, median over ``--reps`` of
``--inner`` back-to-back calls; torch with CUDA events. fwd+bwd returns the output and the
gradients of q, k, v, log decay and beta for the cotangent ``do``.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_scan import (  # noqa: E402
    device_profile,
    fmt,
    header,
    new_results,
    peer_cells,
    ratio,
    rel_err,
    time_jax,
    time_torch,
)

from arjax.ops import gated_delta_rule, gated_delta_rule_reference  # noqa: E402

SHAPES = ((8, 16, 2048), (2, 16, 8192))  # (batch, heads, len)
DIM = 128
# --impls name -> column prefix; "mosaic": the Hopper kernels (Pallas Mosaic GPU)
IMPLS = {"pallas": "pallas", "mosaic": "mosaic", "jla": "jla", "fla": "fla", "xla": "jnp"}


def make_inputs(shape, dtype, seed=0, dim=DIM):
    """q, k (unit norm; q also scaled by dim^-1/2), v, do ``[b, len, h, d]``; g, beta
    ``[b, len, h]`` float32."""
    b, h, length = shape
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    x = lambda key, shp: jax.random.normal(key, shp, jnp.float32)  # noqa: E731
    unit = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    q = unit(x(ks[0], (b, length, h, dim))) * dim**-0.5
    k, v, do = unit(x(ks[1], q.shape)), x(ks[2], q.shape), x(ks[3], q.shape)
    g = jax.nn.log_sigmoid(x(ks[4], (b, length, h)) + 3.0)
    beta = jax.nn.sigmoid(x(ks[5], (b, length, h)))
    return tuple(a.astype(dtype) for a in (q, k, v)) + (g, beta, do.astype(dtype))


def _vjp_of(fwd):
    def fwd_bwd(q, k, v, g, beta, do):
        out, vjp = jax.vjp(lambda *a: fwd(*a)[0], q, k, v, g, beta)
        return out, vjp(do)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def arjax_fns(impl: str):
    """(fwd, fwd+bwd) jitted for ``arjax.ops.gated_delta_rule`` (``impl`` pallas / xla, or
    ``"mosaic"``: ``impl="pallas_mosaic"``, the Hopper kernels)."""
    impl = "pallas_mosaic" if impl == "mosaic" else impl
    return _vjp_of(lambda q, k, v, g, beta: gated_delta_rule(
        q, k, v, beta, log_decay=g, chunk_size=64, impl=impl))  # fmt: skip


def jla_fns():
    """(fwd, fwd+bwd) jitted for jla's Mosaic GPU ``gated_deltanet``."""
    from jla.ops import linear_attention as jla_linear_attention

    return _vjp_of(lambda q, k, v, g, beta: jla_linear_attention(
        "gated_deltanet", q, k, v, g=g, beta=beta, scale=1.0, output_final_state=True,
        impl="mosaic_gpu"))  # fmt: skip


def fla_fns(q, k, v, g, beta, do):
    """(fwd, fwd+bwd) closures over torch copies for fla's ``chunk_gated_delta_rule``."""
    import torch
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    def t(a, grad):
        dtype = torch.bfloat16 if a.dtype == jnp.bfloat16 else torch.float32
        host = torch.from_dlpack(np.asarray(a.astype(jnp.float32)))
        return host.cuda().to(dtype).requires_grad_(grad)

    tq, tk, tv, tg, tb = (t(a, True) for a in (q, k, v, g, beta))
    tdo = t(do, False)

    def fwd():
        with torch.no_grad():
            return chunk_gated_delta_rule(tq, tk, tv, tg, tb, scale=1.0, output_final_state=True)

    def fwd_bwd():
        o, _ = chunk_gated_delta_rule(tq, tk, tv, tg, tb, scale=1.0, output_final_state=True)
        return o, torch.autograd.grad(o, (tq, tk, tv, tg, tb), tdo)

    return fwd, fwd_bwd


def check(results: dict) -> None:
    """The kernel vs the float32 recurrence on the GPU: float32 with an odd length, an initial
    state and packed documents (output, state, every gradient); bf16 output and state."""
    b, length, h, dk, dv = 2, 203, 2, 64, 128
    q, k, v, g, beta, _ = make_inputs((b, h, length), jnp.float32, seed=1, dim=dk)
    v = jax.random.normal(jax.random.PRNGKey(2), (b, length, h, dv))
    s0 = jax.random.normal(jax.random.PRNGKey(3), (b, h, dk, dv))
    seg = jnp.asarray(np.repeat([[1, 2, 3, 4], [1, 1, 2, 5]], [50, 60, 40, 53], axis=1))
    w = jax.random.normal(jax.random.PRNGKey(4), v.shape)
    fns = {
        "kernel": lambda q, k, v, g, beta, s0: gated_delta_rule(
            q, k, v, beta, log_decay=g, initial_state=s0, segment_ids=seg, impl="pallas"
        ),
        "ref": lambda q, k, v, g, beta, s0: gated_delta_rule_reference(
            q, k, v, beta, log_decay=g, initial_state=s0, segment_ids=seg
        ),
    }
    outs, grads = {}, {}
    for name, fn in fns.items():
        loss = lambda *a, fn=fn: jnp.sum(fn(*a)[0] * w) + jnp.sum(fn(*a)[1])  # noqa: E731
        outs[name] = jax.jit(fn)(q, k, v, g, beta, s0)
        grads[name] = jax.jit(jax.grad(loss, tuple(range(6))))(q, k, v, g, beta, s0)
    errs = {
        "fp32 out": rel_err(outs["kernel"][0], outs["ref"][0]),
        "fp32 state": rel_err(outs["kernel"][1], outs["ref"][1]),
    }
    for name, x, y in zip(("q", "k", "v", "g", "beta", "s0"), grads["kernel"], grads["ref"]):
        errs[f"fp32 d{name}"] = rel_err(x, y)
    q, k, v, g, beta, _ = make_inputs((2, 4, 1024), jnp.bfloat16, seed=5)
    o1, s1 = arjax_fns("pallas")[0](q, k, v, g, beta)
    o2, s2 = gated_delta_rule_reference(q, k, v, beta, log_decay=g)
    errs["bf16 out"], errs["bf16 state"] = rel_err(o1, o2), rel_err(s1, s2)
    results["errors"] = errs
    for name, e in errs.items():
        print(f"  {name:12s} max rel err {e:.2e}", flush=True)


def measure(row: dict, impl: str, inputs, reps: int, inner: int) -> None:
    """Add ``{name} fwd`` and ``{name} fwd+bwd`` (ms) to ``row``, or ``{name} error``."""
    q, k, v, g, beta, do = inputs
    name = IMPLS[impl]
    start = time.perf_counter()
    try:
        if impl == "fla":
            import torch

            f, fb = fla_fns(q, k, v, g, beta, do)
            row["fla fwd"] = time_torch(f, reps=reps, inner=inner)
            row["fla fwd+bwd"] = time_torch(fb, reps=reps, inner=inner)
            ours = arjax_fns("pallas")[0](q, k, v, g, beta)[0]
            row["fla vs pallas out"] = rel_err(f()[0].float().cpu().numpy(), ours)
            del f, fb
            torch.cuda.empty_cache()
        else:
            f, fb = jla_fns() if impl == "jla" else arjax_fns(impl)
            row[f"{name} fwd"] = time_jax(f, q, k, v, g, beta, reps=reps, inner=inner)
            row[f"{name} fwd+bwd"] = time_jax(fb, q, k, v, g, beta, do, reps=reps, inner=inner)
            if impl in ("jla", "mosaic"):
                ours = arjax_fns("pallas")[0](q, k, v, g, beta)[0]
                row[f"{name} vs pallas out"] = rel_err(f(q, k, v, g, beta)[0], ours)
        jax.clear_caches()
    except Exception as e:  # noqa: BLE001 -- record (e.g. out of memory) and carry on
        row[f"{name} error"] = repr(e)[:300]
    row[f"{name} s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(row), flush=True)


def profiles(results: dict, impls: list[str], shape=SHAPES[0]) -> None:
    """Device time per kernel (:func:`bench_scan.device_profile`), ms per call, of each
    ``impl`` (arjax's pallas, mosaic, or jla) at ``shape``, forward and fwd+bwd: where the
    time goes."""
    inputs = make_inputs(shape, jnp.bfloat16)
    for impl in impls:
        f, fb = jla_fns() if impl == "jla" else arjax_fns(impl)
        for p, fn, args in (("fwd", f, inputs[:5]), ("fwd+bwd", fb, inputs)):
            try:
                prof = device_profile(fn, *args)
            except Exception as e:  # noqa: BLE001 -- a profiler failure must not end the run
                prof = {"error": repr(e)[:300]}
            results.setdefault("profiles", {})[f"{impl} {p} {shape}"] = prof
            print(f"  {impl} {p} {shape} kernels (ms per call): {json.dumps(prof)}", flush=True)
        jax.clear_caches()


def write(results: dict, out: str) -> None:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as fh:
        json.dump(results, fh, indent=1)
    lines = [
        *header(results, "Gated delta rule (bf16, head dim 128), ms"),
        "| (B,H,L) | pass | pallas | jla | fla | jnp chunked | jla / pallas | fla / pallas "
        "| jnp / pallas | mosaic | jla / mosaic |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        for p in ("fwd", "fwd+bwd"):
            mosaic, jla = (r.get(f"{name} {p}") for name in ("mosaic", "jla"))
            lines.append(f"| {tuple(r['shape'])} | {p} | {peer_cells(r, p)} | {fmt(mosaic)} "
                         f"| {ratio(jla, mosaic)} |")  # fmt: skip
    lines += ["", "Forward outputs vs arjax's Pallas (Triton) output (max rel err):", ""]
    lines += [f"- {tuple(r['shape'])} {k}: {v:.2e}" for r in results["rows"]
              for k, v in r.items() if k.endswith("vs pallas out")]  # fmt: skip
    lines += ["", "GPU check vs the float32 recurrence (max rel err):", ""]
    lines += [f"- {k}: {v:.2e}" for k, v in results.get("errors", {}).items()]
    lines += [f"- check error: {results['check error']}"] if "check error" in results else []
    lines += [f"- error: {tuple(r['shape'])} {k} {v}" for r in results["rows"]
              for k, v in r.items() if k.endswith("error")]  # fmt: skip
    for name, prof in results.get("profiles", {}).items():
        lines += ["", f"Device time per kernel, {name}, ms per call:", ""]
        for line, kernels in prof.items():
            if isinstance(kernels, dict):
                lines += [f"- {line}: " + ", ".join(f"{k} {v}" for k, v in kernels.items())]
            else:
                lines += [f"- {line}: {kernels}"]
    with open(out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--out", default="experiments/results/bench_gated_delta")
    ap.add_argument(
        "--impls",
        default="pallas,mosaic,xla,jla,fla",
        help="what to time, in this order (arjax's two first: the auto table needs both)",
    )
    ap.add_argument("--no-check", action="store_true", help="skip the float32 GPU check")
    ap.add_argument(
        "--profile",
        default="",
        help="impls (pallas, mosaic, jla) to profile per kernel at the first shape, after timing",
    )
    args = ap.parse_args()
    results = new_results()
    if not args.no_check:
        try:
            check(results)
        except Exception as e:  # noqa: BLE001 -- record a compile failure, still time the peers
            results["check error"] = repr(e)[:600]
        write(results, args.out)
    for impl in args.impls.split(","):  # implementation-major: a time limit leaves columns
        for shape in SHAPES:
            row = next((r for r in results["rows"] if r["shape"] == shape), None)
            if row is None:
                row = {"shape": shape}
                results["rows"].append(row)
            measure(row, impl, make_inputs(shape, jnp.bfloat16), args.reps, args.inner)
            write(results, args.out)
    if args.profile:
        profiles(results, args.profile.split(","))
        write(results, args.out)


if __name__ == "__main__":
    main()
