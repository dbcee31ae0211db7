"""Single-device training speed: tokens/s, step time, peak memory, MFU, compile time.

For the transformer at ~125M / ~350M / ~1B parameters (sequence 2048) and HAT ``small``
(when registered), one jitted train step (bf16 compute, fp32 master weights, AdamW,
donated state, remat per preset, fastest attention path) is compiled, warmed up and timed
over back-to-back steps (median over repeats; one block at the end of each repeat).
MFU = analytic model FLOPs (6 N per token + causal attention, no remat recompute)
/ step time / measured bf16 matmul peak of the same device; the analytic count is checked
against XLA's cost analysis of the compiled step (which includes remat and the optimizer).

    python experiments/bench_train.py                  # GPU, all sizes
    python experiments/bench_train.py --quick          # CPU smoke run, tiny shapes
    python experiments/bench_train.py --only 125m,1b --vocab 32768 --loss-chunk 1024 \
        --out experiments/results/bench_train_vocab   # + rows at a large vocabulary
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arjax.models import MODELS, build_model
from arjax.train.config import TrainConfig
from arjax.train.data import example_batch_for
from arjax.train.optim import make_optimizer
from arjax.train.step import init_train_state, make_train_step


def matmul_peak(n: int = 8192, repeats: int = 10) -> float:
    """Measured dense bf16 matmul FLOP/s (median of ``repeats`` chained products)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: (a @ b).astype(jnp.bfloat16))
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(5):
            out = f(a, b)
        out.block_until_ready()
        times.append((time.perf_counter() - t) / 5)
    return 2 * n**3 / statistics.median(times)


def unscanned(cfg: Any) -> Any:
    """``cfg`` with every ``scan_layers`` off (XLA's cost analysis counts a loop body once)."""
    changes = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "scan_layers":
            changes[f.name] = False
        elif dataclasses.is_dataclass(value):
            changes[f.name] = unscanned(value)
    return dataclasses.replace(cfg, **changes)


def xla_flops(name: str, cfg: Any, tx: Any, batch: dict) -> float:
    """FLOPs of one train step by XLA's cost analysis of the unscanned program."""
    model = build_model(name, unscanned(cfg))
    example = jax.tree.map(lambda x: x[:1], batch)
    state = jax.eval_shape(
        lambda r: nn.meta.unbox(init_train_state(model, tx, r, example)), jax.random.key(0)
    )
    # The lowered (pre-backend) HLO: the same count on every device, no compile needed.
    cost = jax.jit(make_train_step(model, tx)).lower(state, batch).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def bench(
    name: str, cfg, batch: dict, *, steps: int, repeats: int, peak: float | None, check: bool
) -> dict:
    model = build_model(name, cfg)
    tx = make_optimizer(TrainConfig(steps=1000))
    example = jax.tree.map(lambda x: jnp.asarray(x[:1]), batch)
    init = jax.jit(lambda r: nn.meta.unbox(init_train_state(model, tx, r, example)))
    state = init(jax.random.key(0))
    batch = jax.tree.map(jnp.asarray, batch)
    step = jax.jit(make_train_step(model, tx), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    flops_xla = xla_flops(name, cfg, tx, batch) if check else float("nan")
    for _ in range(3):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append((time.perf_counter() - t) / steps)
    dt = statistics.median(times)
    b, seq = batch["targets"].shape
    tokens = b * seq
    model_flops = 3 * cfg.flops_per_token(seq) * tokens
    mem = compiled.memory_analysis()
    step_bytes = (
        mem.argument_size_in_bytes + mem.output_size_in_bytes
        - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    )  # fmt: skip
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    return {
        "model": name,
        "params_m": n_params / 1e6,
        "batch": b,
        "seq_len": seq,
        "remat": cfg.remat if hasattr(cfg, "remat") else None,
        "step_ms": dt * 1e3,
        "tokens_per_s": tokens / dt,
        "model_tflops_per_step": model_flops / 1e12,
        "xla_tflops_per_step": flops_xla / 1e12,
        "achieved_tflops": model_flops / dt / 1e12,
        "mfu": model_flops / dt / peak if peak else None,
        "peak_mem_gib": step_bytes / 2**30,  # the compiled step's live buffers
        "compile_s": compile_s,
        "loss": float(metrics["loss"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke run at tiny shapes")
    ap.add_argument("--out", default="experiments/results/bench_train")
    ap.add_argument("--only", default="", help="comma-separated job names to run")
    ap.add_argument(
        "--vocab", type=int, default=None, help="also run each job at this vocabulary size"
    )
    ap.add_argument(
        "--loss-chunk",
        type=int,
        default=None,
        help="with --vocab: also run it with model.loss_chunk (chunked cross-entropy)",
    )
    args = ap.parse_args()
    if args.loss_chunk is not None and args.vocab is None:
        ap.error("--loss-chunk needs --vocab")
    tf = MODELS["transformer"].presets
    if args.quick:
        jobs = [("transformer", "tiny", tf["tiny"], 4, 256)]
        steps, repeats, peak = 2, 2, None
    else:
        # "+docs": packed documents (segment ids -> Pallas flash attention); the others are one
        # document per row without segment ids, which cuDNN's fused attention handles.
        jobs = [
            ("transformer", "125m", tf["125m"], 16, 2048),
            ("transformer", "350m", tf["350m"], 8, 2048),
            ("transformer", "1b", tf["1b"], 8, 2048),
            ("transformer", "1b+docs", tf["1b"], 8, 2048),
            ("transformer", "1b-noremat", dataclasses.replace(tf["1b"], remat="none"), 4, 2048),
        ]
        if "hat" in MODELS:
            hat = MODELS["hat"].presets["small"]
            jobs.append(("hat", "small", hat, 16, min(2048, hat.max_seq_len)))
        steps, repeats, peak = 10, 5, matmul_peak()
    if args.vocab is not None:  # the same shapes at a large vocab, full logits vs chunked loss
        variants = [(f"+v{args.vocab}", {"vocab_size": args.vocab})]
        if args.loss_chunk is not None:
            chunked = {"vocab_size": args.vocab, "loss_chunk": args.loss_chunk}
            variants.append((f"+v{args.vocab}+chunk{args.loss_chunk}", chunked))
        jobs += [
            (name, preset + suffix, dataclasses.replace(cfg, **changes), b, seq)
            for name, preset, cfg, b, seq in jobs
            if name == "transformer"
            for suffix, changes in variants
        ]
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "matmul_peak_tflops": peak / 1e12 if peak else None,
        "command": " ".join(["python experiments/bench_train.py", *sys.argv[1:]]),
    }
    rows = []
    for name, preset, cfg, b, seq in jobs:
        # e.g. --only 1b,1b+docs (a --vocab row goes with its base job)
        if args.only and preset.split("+v")[0] not in args.only.split(","):
            continue
        batch = example_batch_for(name, cfg, b, seq)
        if name == "transformer" and "+docs" not in preset:
            batch = {k: v for k, v in batch.items() if k != "segment_ids"}
        try:
            check = preset in ("tiny", "125m", "small")  # one FLOP cross-check per family
            row = bench(name, cfg, batch, steps=steps, repeats=repeats, peak=peak, check=check)
        except Exception as e:  # noqa: BLE001 - report OOM etc. and continue
            row = {"model": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        row["preset"] = preset
        print(json.dumps(row), flush=True)
        rows.append(row)
        write_results(args.out, meta, rows)  # after every row: a time limit loses nothing


def write_results(out: str, meta: dict, rows: list[dict]) -> None:
    with open(out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    lines = [
        f"# Training speed, one {meta['device']} ({meta['date']}, JAX {meta['jax']})",
        "",
        f"Command: `{meta['command']}`. Measured bf16 matmul peak: "
        f"{meta['matmul_peak_tflops'] or float('nan'):.0f} TFLOP/s. MFU counts model FLOPs "
        "(6N per token + causal attention; remat recompute not counted). XLA/analytic: XLA's "
        "cost analysis of the whole unscanned step (optimizer, norms, full non-causal score "
        "matrices included) over the analytic count.",
        "",
        "| model | preset | params (M) | batch x seq | step ms | tokens/s | TFLOP/s | MFU "
        "| XLA/analytic FLOPs | peak GiB | compile s |",
        "|" + "---|" * 11,
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['preset']} | error: {r['error'][:80]} |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
        lines.append(
            f"| {r['model']} | {r['preset']} | {r['params_m']:.0f} | {r['batch']}x{r['seq_len']} "
            f"| {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {r['achieved_tflops']:.0f} | {mfu} "
            f"| {r['xla_tflops_per_step'] / r['model_tflops_per_step']:.2f} "
            f"| {r['peak_mem_gib']:.1f} | {r['compile_s']:.0f} |"
        )
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
