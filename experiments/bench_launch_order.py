"""Time arjax's GPU flash-attention kernels under different launch orders of their CTAs, with
cuDNN in the same run: the Hopper kernels (Mosaic GPU forward and backward, the default) or,
with ``--lowering triton``, the Triton ones.

The kernels take their CTAs in ``_common.work_item`` order: heads in groups of
``tuning.heads_per_wave(tiles, heads)``, the heaviest causal tiles of a group's heads first.
That rule plans for one wave of CTAs per SM; ``--waves`` replays it for other wave sizes
(``flash_attention(wave=...)``, ``Geometry.wave``): 1 = one head at a time (each head's tiles
heaviest first, the order before the groups), 0 = the device's SM count (the default rule), a
huge value = all heads at once (strict heaviest-first over the whole launch).

Per head dim and length (causal bf16, H*D = 2048, B*L = 16384 tokens, as
``bench_attention.py``): the forward (``flash_attention(lowering=...)``), the backward kernels
alone (``mosaic_gpu_bwd.backward`` with the length's default tiles, or ``triton_bwd.backward``,
from the same residuals) and fwd+bwd (``jax.grad``), for every wave size, and cuDNN's forward
and fwd+bwd. Every function is compiled first; then ``--rounds`` rounds time each of them once
in turn (``--iters`` calls back to back, blocked on the last), and the table shows each one's
median round. Each wave size's outputs are compared with the first's (the order changes no
arithmetic, except the order of the fused backward's float32 dQ additions).

Run on a GPU:  PYTHONPATH=. python experiments/bench_launch_order.py
Writes experiments/results/<--name, default bench_launch_order>.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from experiments.bench_attention import causal_flops, fwd_bwd, make_inputs
from kernels_pallas.flash_attention import (
    flash_attention,
    mosaic_gpu_bwd,
    triton_bwd,
    triton_fwd,
    tuning,
)
from kernels_pallas.flash_attention._common import Geometry

RESULTS = Path(__file__).parent / "results"
ALL_HEADS = 1 << 30  # a wave that holds every head's tiles


def _wave_name(wave: int) -> str:
    return {0: "sms", 1: "one_head", ALL_HEADS: "all_heads"}.get(wave, f"wave_{wave}")


def _once(fn, args, iters: int) -> float:
    """Seconds per call of ``iters`` calls enqueued back to back."""
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def _max_diff(got, want) -> float:
    f32 = lambda x: x.astype(jnp.float32)
    leaves = zip(jax.tree.leaves(got), jax.tree.leaves(want))
    return max(float(jnp.max(jnp.abs(f32(g) - f32(w)))) for g, w in leaves)


def _backward(lowering: str, geo: Geometry, d: int, length: int):
    """The backward kernels alone, as a function of the residuals."""
    if lowering == "mosaic":
        tiles = mosaic_gpu_bwd.default_tiles(d, length)
        return lambda *a: mosaic_gpu_bwd.backward(*a, geo, tiles, False)
    bs = tuning.block_sizes("gpu", length, length, d)
    return lambda *a: triton_bwd.backward(*a, None, None, geo, bs, False)


def case_rows(d: int, length: int, waves: list[int], opts) -> list[dict]:
    """Rows ``(mode, impl, wave)`` with median ms and TFLOP/s for one head dim and length."""
    b, h = max(1, 16384 // length), 2048 // d
    q, k, v = make_inputs(b, length, h, d)
    do = make_inputs(b, length, h, d, seed=1)[0]
    flops = causal_flops(b, h, length, d)
    bs = tuning.block_sizes("gpu", length, length, d)
    geo = Geometry(q_len=length, kv_len=length, bq=bs.bq, bk=bs.bk, causal=True, window=None,
                   has_segments=False, scale=1 / math.sqrt(d), groups=1)  # fmt: skip
    out, lse2 = jax.jit(lambda q, k, v: triton_fwd.forward(q, k, v, None, None, geo, bs, False))(
        q, k, v
    )
    delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), out.astype(jnp.float32))
    residuals = (q, k, v, do, lse2, delta)
    cudnn = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn"
    )
    fns = {  # (mode, impl, wave) -> (compiled fn, args, flops)
        ("fwd", "cudnn", None): (jax.jit(cudnn), (q, k, v), flops),
        ("fwd+bwd", "cudnn", None): (fwd_bwd(cudnn), (q, k, v), 3.5 * flops),
    }
    first, diffs = None, {}
    for wave in waves:
        wave_arg = wave or None  # 0: the default rule
        ours = lambda q, k, v, w=wave_arg: flash_attention(
            q, k, v, causal=True, lowering=opts.lowering, wave=w
        )
        geo_w = dataclasses.replace(geo, wave=wave_arg)
        calls = {
            "fwd": (jax.jit(ours), (q, k, v), flops),
            "bwd": (jax.jit(_backward(opts.lowering, geo_w, d, length)), residuals, 2.5 * flops),
            "fwd+bwd": (fwd_bwd(ours), (q, k, v), 3.5 * flops),
        }
        results = {mode: jax.block_until_ready(fn(*a)) for mode, (fn, a, _) in calls.items()}
        group = tuning.heads_per_wave(length // 128, b * h, wave_arg)  # of 128-row tiles
        if first is None:
            first = results
        else:
            diffs[wave] = {mode: _max_diff(results[mode], first[mode]) for mode in results}
        for mode, call in calls.items():
            fns[mode, opts.lowering, wave] = call
        print(f"D={d} L={length} wave {_wave_name(wave)}: groups of {group} heads", flush=True)
    times = {key: [] for key in fns}
    for _ in range(opts.rounds):
        for key, (fn, args, _) in fns.items():
            times[key].append(_once(fn, args, opts.iters))
    rows = []
    for (mode, impl, wave), (_, _, fl) in fns.items():
        ms = statistics.median(times[mode, impl, wave]) * 1e3
        row = {"D": d, "L": length, "B": b, "H": h, "mode": mode, "impl": impl, "ms": ms,
               "tflops": fl / ms / 1e9, "wave": wave,
               "rounds_min_max_ms": [min(times[mode, impl, wave]) * 1e3,
                                     max(times[mode, impl, wave]) * 1e3]}  # fmt: skip
        if wave in diffs:
            row["max_abs_diff_vs_first_wave"] = diffs[wave][mode]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(meta: dict, rows: list[dict], waves: list[int], lowering: str) -> str:
    names = [_wave_name(w) for w in waves]
    lines = [
        "# bench_launch_order",
        "",
        f"- device: {meta['device']} ({meta['sms']} SMs); date: {meta['date']}; jax {meta['jax']}",
        f"- command: `{meta['command']}`",
        "",
        f"Causal bf16, TFLOP/s (median ms of the rounds). Columns: arjax's {lowering} kernels with "
        "their CTAs planned for waves of that many CTAs (`sms`: the default rule; `one_head`: "
        "each head's tiles in turn, the earlier order; `all_heads`: heaviest tiles of all heads "
        "first); `bwd` = the backward kernels alone. Last columns: ms ratios.",
        "",
        "| D | L | B | H | mode | cuDNN | " + " | ".join(names) + " | one_head / sms | "
        "cuDNN / sms |",
        "|---|---|---|---|---|---|" + "---|" * len(names) + "---|---|",
    ]
    by_key = {(r["D"], r["L"], r["mode"], r["impl"], r["wave"]): r for r in rows}
    for d, length, b, h, mode in dict.fromkeys(
        (r["D"], r["L"], r["B"], r["H"], r["mode"]) for r in rows
    ):
        cell = lambda r: f"{r['tflops']:.0f} ({r['ms']:.3f})" if r else "n/a"
        cud = by_key.get((d, length, mode, "cudnn", None))
        ours = [by_key.get((d, length, mode, lowering, w)) for w in waves]
        default = by_key.get((d, length, mode, lowering, 0))
        one = by_key.get((d, length, mode, lowering, 1))
        ratio = lambda a, z: f"{a['ms'] / z['ms']:.3f}x" if a and z else "n/a"
        lines.append(
            f"| {d} | {length} | {b} | {h} | {mode} | {cell(cud)} | "
            + " | ".join(map(cell, ours))
            + f" | {ratio(one, default)} | {ratio(cud, default)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument(
        "--waves", type=int, nargs="+", default=[1, 0, 264, ALL_HEADS],
        help="CTAs per wave to plan for (0: the device's SMs, the default rule)",
    )  # fmt: skip
    parser.add_argument("--lowering", choices=("mosaic", "triton"), default="mosaic")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--name", default="bench_launch_order")
    parser.add_argument("--out", default=str(RESULTS))
    opts = parser.parse_args()
    device = jax.devices()[0]
    meta = {
        "device": f"{device.platform} {device.device_kind}",
        "sms": getattr(device, "core_count", None),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "jax": jax.__version__,
        "command": "PYTHONPATH=. python experiments/bench_launch_order.py "
        + " ".join(sys.argv[1:]),
    }
    rows = []
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    for d in opts.head_dims:
        for length in opts.lengths:
            rows += case_rows(d, length, opts.waves, opts)
            (out / f"{opts.name}.json").write_text(
                json.dumps({"meta": meta, "rows": rows}, indent=1)
            )
    text = markdown(meta, rows, opts.waves, opts.lowering)
    (out / f"{opts.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
