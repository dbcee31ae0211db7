"""Time arjax's Mosaic GPU flash-attention backward (``kernels_pallas/flash_attention/
mosaic_gpu_bwd.py``) against cuDNN and arjax's Triton kernels on Hopper.

Causal bf16, D=128 (or ``--head-dim 64``), H*D = 2048, B*L = 16384 tokens (as
``bench_attention.py``), per length:

* ``bwd``: the backward kernels alone, both fed the same residuals (``lse2`` of arjax's Triton
  forward, ``delta``): Mosaic GPU (``mosaic_gpu_bwd.backward``, each ``--tiles`` candidate, in
  order; by default the length's ``default_tiles`` first, then the other split/fused choices)
  and Triton (``triton_bwd.backward``), with the max difference of each candidate's dq/dk/dv
  from the first's, and of the first's from Triton's, relative to their max; cuDNN's backward is its
  fwd+bwd time minus its fwd time. Each timing is printed as soon as it is measured.
* ``fwd`` and ``fwd+bwd`` (``jax.grad``): cuDNN, ``flash_attention(lowering="triton")`` and
  ``flash_attention(lowering="mosaic")`` (Mosaic GPU forward and backward).

FLOPs: causal forward = 2 matmuls * 2*B*H*L*L*D / 2, backward 2.5x that, fwd+bwd 3.5x. A
failing kernel (e.g. a compile error) is recorded with its message and the run goes on.

Run on a GPU:  PYTHONPATH=. python experiments/bench_mgpu_bwd.py [--head-dim 64] [--tiles ...]
Writes experiments/results/<--name, default bench_mgpu_bwd>.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import sys
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp

from experiments.bench_attention import causal_flops, error_text, fwd_bwd, make_inputs, time_fn
from kernels_pallas.flash_attention import (
    flash_attention,
    mosaic_gpu_bwd,
    triton_bwd,
    triton_fwd,
)
from kernels_pallas.flash_attention._common import Geometry
from kernels_pallas.flash_attention.tuning import block_sizes

RESULTS = Path(__file__).parent / "results"
OTHER_TILES = {128: ("64,64,3", "64,64,2,fused"), 64: ("128,128,2", "128,128,2,fused")}


def _tiles(text: str) -> mosaic_gpu_bwd.Tiles:
    """``bq,bk,stages`` or ``bq,bk,stages,fused`` (dQ fused into the dK/dV kernel)."""
    bq, bk, stages, *fused = text.split(",")
    if fused not in ([], ["fused"]):
        raise argparse.ArgumentTypeError(f"tiles: expected bq,bk,stages[,fused], got {text!r}")
    return mosaic_gpu_bwd.Tiles(bq=int(bq), bk=int(bk), stages=int(stages), fused_dq=bool(fused))


def _timed(row: dict, name: str, fn, args, opts, flops: float) -> None:
    """Time ``fn(*args)`` into ``row`` (ms, TFLOP/s), or record why it failed; print either at
    once (a run cut short by a timeout keeps what it measured)."""
    try:
        t = time_fn(fn, args, opts.iters, opts.repeats)
        row[name + "_ms"] = t * 1e3
        row[name + "_tflops"] = flops / t / 1e12
        print(f"L={row['L']} {row['mode']} {name}: {t * 1e3:.3f} ms", flush=True)
    except Exception as e:  # noqa: BLE001 - report and keep benchmarking
        row[name + "_error"] = error_text(e, limit=1200)
        traceback.print_exc()
        print(f"L={row['L']} {row['mode']} {name}: {row[name + '_error']}", flush=True)


def _rel_diff(got, want) -> list[float]:
    """Max |got - want| / max |want| of each of dq, dk, dv."""
    f32 = lambda x: x.astype(jnp.float32)
    return [float(jnp.max(jnp.abs(f32(g) - f32(w))) / jnp.max(jnp.abs(f32(w))))
            for g, w in zip(got, want)]  # fmt: skip


def backward_row(length: int, d: int, tiles: list[mosaic_gpu_bwd.Tiles], opts) -> dict:
    """Backward kernels alone, from the residuals of arjax's Triton forward."""
    b, h = max(1, 16384 // length), 2048 // d
    q, k, v = make_inputs(b, length, h, d)
    do = make_inputs(b, length, h, d, seed=1)[0]
    bs = block_sizes("gpu", length, length, d)
    geo = Geometry(q_len=length, kv_len=length, bq=bs.bq, bk=bs.bk, causal=True, window=None,
                   has_segments=False, scale=1 / math.sqrt(d), groups=1)  # fmt: skip
    out, lse2 = jax.jit(lambda q, k, v: triton_fwd.forward(q, k, v, None, None, geo, bs, False))(
        q, k, v
    )
    delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), out.astype(jnp.float32))
    args = (q, k, v, do, lse2, delta)
    flops = 2.5 * causal_flops(b, h, length, d)
    row = {"L": length, "B": b, "H": h, "D": d, "mode": "bwd"}
    first = None  # grads of the first candidate that ran: the others are compared with it
    for n, t in enumerate(tiles):
        name = "mosaic" if n == 0 else f"mosaic_{t.bq}_{t.bk}_{t.stages}" + "_fused" * t.fused_dq
        row[name + "_tiles"] = dataclasses.asdict(t)
        mosaic = jax.jit(lambda *a, t=t: mosaic_gpu_bwd.backward(*a, geo, t, False))
        _timed(row, name, mosaic, args, opts, flops)
        if name + "_ms" in row:
            got = mosaic(*args)
            if first is None:
                first = got
            else:
                row[name + "_rel_diff_dq_dk_dv"] = _rel_diff(got, first)
                print(f"{name} vs the first candidate: {row[name + '_rel_diff_dq_dk_dv']}")
    triton = jax.jit(lambda *a: triton_bwd.backward(*a[:6], None, None, geo, bs, False))
    _timed(row, "triton", triton, args, opts, flops)
    if first is not None and "triton_ms" in row:
        row["first_rel_diff_vs_triton_dq_dk_dv"] = _rel_diff(first, triton(*args))
    return row


def api_rows(length: int, d: int, opts, names: tuple[str, ...]) -> list[dict]:
    """fwd and fwd+bwd through the public entry points ``names``."""
    b, h = max(1, 16384 // length), 2048 // d
    q, k, v = make_inputs(b, length, h, d)
    fns = {
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"
        ),
        "triton": lambda q, k, v: flash_attention(q, k, v, causal=True, lowering="triton"),
        "mosaic": lambda q, k, v: flash_attention(q, k, v, causal=True, lowering="mosaic"),
    }
    rows = []
    for mode, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
        row = {"L": length, "B": b, "H": h, "D": d, "mode": mode}
        for name in names:
            fn = fns[name]
            jf = jax.jit(fn) if mode == "fwd" else fwd_bwd(fn)
            _timed(row, name, jf, (q, k, v), opts, mult * causal_flops(b, h, length, d))
        rows.append(row)
    return rows


def _cell(row: dict, name: str) -> str:
    if row.get(name + "_ms") is None:
        return "error" if name + "_error" in row else "n/a"
    return f"{row[name + '_tflops']:.0f} ({row[name + '_ms']:.2f})"


def _ratio(row: dict, name: str) -> str:
    if row.get(name + "_ms") and row.get("mosaic_ms"):
        return f"{row[name + '_ms'] / row['mosaic_ms']:.2f}x"
    return "n/a"


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# bench_mgpu_bwd",
        "",
        f"- device: {meta['device']}; date: {meta['date']}; jax {meta['jax']}",
        f"- command: `{meta['command']}`",
        "",
        f"Causal bf16, D={meta['head_dim']}, H={2048 // meta['head_dim']}; TFLOP/s (ms). "
        "`bwd`: kernels alone from the same residuals "
        "(cuDNN: fwd+bwd minus fwd); speedup = other ms / Mosaic ms.",
        "",
        "| L | B | mode | cuDNN | arjax Triton | arjax Mosaic GPU | vs cuDNN | vs Triton |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['L']} | {row['B']} | {row['mode']} | {_cell(row, 'cudnn')} | "
            f"{_cell(row, 'triton')} | {_cell(row, 'mosaic')} | {_ratio(row, 'cudnn')} | "
            f"{_ratio(row, 'triton')} |"
        )
    extra = [
        (r["L"], k[:-3], r[k])
        for r in rows
        for k in r
        if k.startswith("mosaic_") and k.endswith("_ms") and k != "mosaic_ms"
    ]
    if extra:
        lines += ["", "Other Mosaic tiles (bq, bk, stages[, fused dQ]), backward ms:"]
        lines += [f"- L={L} {name}: {ms:.2f}" for L, name, ms in extra]
    errors = [(r["L"], r["mode"], k[:-6], r[k]) for r in rows for k in r if k.endswith("_error")]
    if errors:
        lines += ["", "Errors:"]
        lines += [f"- L={L} {mode} {name}: `{msg}`" for L, mode, name, msg in errors]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 2048, 32768])
    parser.add_argument("--head-dim", type=int, choices=sorted(OTHER_TILES), default=128)
    parser.add_argument(
        "--tiles",
        type=_tiles,
        nargs="+",
        help="Mosaic backward candidates bq,bk,stages[,fused] (the first is the 'mosaic' column; "
        "default: the length's default_tiles, then OTHER_TILES)",
    )
    parser.add_argument("--name", default="bench_mgpu_bwd", help="output file stem")
    parser.add_argument(
        "--bwd-only", action="store_true", help="fwd and fwd+bwd rows of cuDNN only"
    )
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    opts = parser.parse_args()
    meta = {
        "device": f"{jax.default_backend()} {jax.devices()[0].device_kind}",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "jax": jax.__version__,
        "head_dim": opts.head_dim,
        "command": "PYTHONPATH=. python experiments/bench_mgpu_bwd.py " + " ".join(sys.argv[1:]),
    }
    rows = []
    d = opts.head_dim
    for length in opts.lengths:
        default = mosaic_gpu_bwd.default_tiles(d, length)
        others = [t for t in map(_tiles, OTHER_TILES[d]) if t != default]
        bwd = backward_row(length, d, opts.tiles or [default, *others], opts)
        names = ("cudnn",) if opts.bwd_only else ("cudnn", "triton", "mosaic")
        fwd, both = api_rows(length, d, opts, names)
        if fwd.get("cudnn_ms") and both.get("cudnn_ms"):
            bwd["cudnn_ms"] = both["cudnn_ms"] - fwd["cudnn_ms"]
            flops = 2.5 * causal_flops(bwd["B"], bwd["H"], length, d)
            bwd["cudnn_tflops"] = flops / bwd["cudnn_ms"] / 1e9
        for row in (bwd, fwd, both):
            print(json.dumps(row), flush=True)
        rows += [bwd, fwd, both]
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{opts.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = markdown(meta, rows)
    (out / f"{opts.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
