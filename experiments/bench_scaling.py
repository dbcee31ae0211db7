"""Multi-GPU scaling on one host: the 350M transformer, data-parallel and FSDP vs one GPU.

Same global batch everywhere (so the losses must match the one-GPU run); throughput is
the median over back-to-back steps after compilation and warm-up.

    python experiments/bench_scaling.py                # needs >= 2 GPUs
    python experiments/bench_scaling.py --quick        # 2 fake CPU devices, tiny model
"""

from __future__ import annotations

import argparse
import os
import sys

if "--quick" in sys.argv:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from arjax.train.config import make_run_config  # noqa: E402
from arjax.train.loop import Trainer, to_global  # noqa: E402


def run(preset: str, sets: list[str], mesh: tuple[int, int], steps: int) -> dict:
    data, fsdp = mesh
    n = data * fsdp
    cfg = make_run_config(
        "transformer", preset, [*sets, f"mesh.data={data}", f"mesh.fsdp={fsdp}", "mesh.tensor=1"]
    )
    trainer = Trainer(cfg, tempfile.mkdtemp(), devices=jax.devices()[:n])
    state = trainer.initial_state()
    size = (steps - 3) // 3  # steps per timed window (after 1 compile + 2 warm-up steps)
    batches = [
        to_global(next(trainer.train_iter), trainer.batch_sharding) for _ in range(3 + 3 * size)
    ]
    t0 = time.perf_counter()
    state, metrics = trainer.train_step(state, batches[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    history = [metrics]
    # Steps are enqueued back to back (no host sync inside a window), as in training; the
    # first two are warm-up, the rest form three timed windows whose median is reported.
    rest = batches[1:]
    windows = [rest[:2]] + [rest[2 + i * size : 2 + (i + 1) * size] for i in range(3)]
    times = []
    for window in windows:
        t = time.perf_counter()
        for batch in window:
            state, metrics = trainer.train_step(state, batch)
            history.append(metrics)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - t) / len(window))
    dt = statistics.median(times[1:])
    losses = [float(m["loss"]) for m in history]
    tokens = cfg.data.batch_size * cfg.data.seq_len
    return {
        "mesh": f"data={data}, fsdp={fsdp}",
        "devices": n,
        "step_ms": dt * 1e3,
        "tokens_per_s": tokens / dt,
        "losses": losses,
        "compile_s": compile_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-sizes", default="16,32", help="global batches (full run)")
    ap.add_argument("--out", default="experiments/results/bench_scaling")
    ap.add_argument("--set", action="append", default=[], help="extra config override (repeat)")
    args = ap.parse_args()
    if args.steps < 6:
        ap.error("--steps must be >= 6 (1 compile, 2 warm-up, 3 timed windows)")
    if args.quick:
        preset, steps, batches = "tiny", 8, [8]
        sets = ["data.seq_len=128", "train.steps=100"]
    else:
        preset, steps = "350m", args.steps
        batches = [int(b) for b in args.batch_sizes.split(",")]
        sets = ["data.seq_len=2048", "train.steps=1000"]
    sets += args.set
    if jax.device_count() < 2:
        raise SystemExit(f"needs >= 2 devices, have {jax.device_count()}")
    rows = []
    for global_batch in batches:
        sized = [*sets, f"data.batch_size={global_batch}"]
        group = [run(preset, sized, m, steps) for m in [(1, 1), (2, 1), (1, 2)]]
        for r in group:
            r["global_batch"] = global_batch
            r["speedup"] = r["tokens_per_s"] / group[0]["tokens_per_s"]
            r["max_loss_diff"] = max(abs(a - b) for a, b in zip(r["losses"], group[0]["losses"]))
            print(json.dumps(r), flush=True)
        rows += group
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "jax": jax.__version__,
        "model": f"transformer {preset}",
        "command": "python " + " ".join(sys.argv),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "timing": "median over 3 windows of steps enqueued back to back, after 2 warm-up steps",
    }
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    lines = [
        f"# Scaling on one host: {meta['device']} ({meta['date']}, JAX {meta['jax']})",
        "",
        f"Command: `{meta['command']}`; {meta['model']}, seq {sets[0]}; within a global "
        f"batch the same data on every mesh. XLA_FLAGS: `{meta['xla_flags'] or 'unset'}`. "
        f"Timing: {meta['timing']}.",
        "",
        "| global batch | mesh | GPUs | step ms | tokens/s | speedup | max loss diff vs 1 GPU "
        "| compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['global_batch']} | {r['mesh']} | {r['devices']} | {r['step_ms']:.1f} "
            f"| {r['tokens_per_s']:.0f} | {r['speedup']:.2f}x | {r['max_loss_diff']:.2e} "
            f"| {r['compile_s']:.0f} |"
        )
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
