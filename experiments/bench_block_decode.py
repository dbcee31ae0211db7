"""Batched generation throughput: Block Transformer vs the vanilla transformer LM.

Two workloads (as in Ho et al. 2024): decode-heavy (prompt 128, generate 2048) and
prefill-heavy (prompt 2048, generate 128). Both models have (about) the same parameter count,
run in bf16 with their fastest attention path (every ``--impls`` entry is timed, the best is
kept), and use the largest power-of-two batch that fits (halving on out-of-memory, starting
from a cache-size estimate). The whole decode loop of each model is one jitted call
(the generation engine, :mod:`arjax.generate.engine`: prefill + ``lax.while_loop``);
compile and one warm-up run are outside the timing, the reported
time is the median of ``--repeats`` runs.

    python experiments/bench_block_decode.py            # GPU, full sizes
    python experiments/bench_block_decode.py --quick    # CPU smoke run, tiny sizes (< 1 min)

Prints a table and writes ``experiments/results/block_decode[_quick].{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from decode_common import engine_runner, random_prompts

from arjax.models.block_transformer import BlockTransformer, BlockTransformerConfig
from arjax.models.transformer import TransformerLM, TransformerLMConfig
from arjax.nn import TransformerConfig

RESULTS = Path(__file__).parent / "results"
WORKLOADS = {"decode_heavy": (128, 2048), "prefill_heavy": (2048, 128)}
QUICK_WORKLOADS = {"decode_heavy": (16, 128), "prefill_heavy": (128, 16)}


def configs(
    quick: bool, block_len: int, impl: str
) -> tuple[TransformerLMConfig, BlockTransformerConfig]:
    """Vanilla with 2N layers vs Block Transformer with N block + N token layers, same width."""
    if quick:
        width = dict(d_model=64, num_heads=2, num_kv_heads=2, head_dim=32, mlp_dim=192,
                     dtype="float32")  # fmt: skip
        layers, max_len = 1, 256
    else:
        width = dict(d_model=1024, num_heads=16, num_kv_heads=16, head_dim=64, mlp_dim=2816,
                     dtype="bfloat16")  # fmt: skip
        layers, max_len = 6, 2304
    stack = TransformerConfig(num_layers=layers, attention_impl=impl, **width)
    vanilla = TransformerLMConfig(num_layers=2 * layers, attention_impl=impl, max_seq_len=max_len,
                                  **width)  # fmt: skip
    block = BlockTransformerConfig(
        block_len=block_len, block_decoder=stack, token_decoder=stack, max_seq_len=max_len
    )
    return vanilla, block


def init_params(model: nn.Module, example: dict, dtype) -> dict:
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), example)["params"])
    return jax.tree.map(lambda x: x.astype(dtype), params)


def engine_runner_for(model, params, batch: int, prompt: int, gen: int):
    """The generation engine on ``batch`` random prompts; cache bytes per sequence."""
    run, caches = engine_runner(model, params, random_prompts(batch, prompt), gen)
    return run, lambda: sum(caches().values())


def is_oom(err: Exception) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def measure(make_runner, model, params, batch: int, prompt: int, gen: int, repeats: int):
    """Largest power-of-two batch <= ``batch`` that runs; (batch, median s, cache bytes/seq)."""
    while batch >= 1:
        run, cache_bytes = make_runner(model, params, batch, prompt, gen)
        try:
            jax.block_until_ready(run())  # compile + warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(run())
                times.append(time.perf_counter() - t0)
            return batch, statistics.median(times), cache_bytes()
        except Exception as err:  # noqa: BLE001 - only out-of-memory is retried
            if not is_oom(err):
                raise
            print(f"  batch {batch}: out of memory, halving", file=sys.stderr)
            batch //= 2
    raise RuntimeError("even batch 1 does not fit")


def start_batch(per_seq_bytes: float, quick: bool, cap: int) -> int:
    """Power of two whose caches fill about half the device memory (capped)."""
    if quick:
        return 8
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit", 40e9)
    fit = max(1, int(0.5 * limit / per_seq_bytes))
    return min(cap, 1 << (fit.bit_length() - 1))


def count(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))


def write_results(rows: list[dict], meta: dict, stem: Path, quick: bool) -> None:
    """Print the table; write ``stem.json`` and ``stem.md``."""
    header = ("| workload | model | impl | batch | params | tokens/s | cache MiB/seq | "
              "block/vanilla tok/s | vanilla/block cache |")  # fmt: skip
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['model']} | {r['impl']} | {r['batch']} | "
            f"{r['params'] / 1e6:.2f}M | {r['tokens_per_s']:.0f} | "
            f"{r['cache_bytes_per_seq'] / 2**20:.2f} | "
            f"{r.get('speedup', float('nan')):.2f} | {r.get('cache_ratio', float('nan')):.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    md = [f"# Block Transformer decode throughput ({'quick CPU' if quick else 'full'})", ""]
    md += [f"- {k}: `{v}`" for k, v in meta.items()] + ["", table, ""]
    stem.with_suffix(".md").write_text("\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny CPU sizes (< 1 min)")
    ap.add_argument("--block-len", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--impls", default=None, help="comma list of attention impls to try")
    ap.add_argument("--workloads", default="decode_heavy,prefill_heavy")
    ap.add_argument("--max-batch", type=int, default=4096)
    ap.add_argument("--out", default=None, help="results file stem")
    args = ap.parse_args()
    quick = args.quick
    impls = args.impls or ("xla" if quick or jax.default_backend() == "cpu" else "auto,xla")
    sizes = QUICK_WORKLOADS if quick else WORKLOADS
    dtype = jnp.float32 if quick else jnp.bfloat16
    stem = RESULTS / (args.out or ("block_decode_quick" if quick else "block_decode"))
    dev = jax.devices()[0]
    meta = dict(
        device=f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        jax=jax.__version__, flax=flax.__version__, python=platform.python_version(),
        command="python " + " ".join(sys.argv), block_len=args.block_len,
        repeats=args.repeats, dtype=str(np.dtype(dtype)),
        note="generated tokens/s = batch * generate / median wall time (prefill included)",
    )  # fmt: skip

    example = {"inputs": jnp.zeros((1, 8), jnp.int32), "positions": jnp.zeros((1, 8), jnp.int32),
               "segment_ids": jnp.ones((1, 8), jnp.int32)}  # fmt: skip
    vcfg, bcfg = configs(quick, args.block_len, "xla")
    params = {
        "transformer": init_params(TransformerLM(vcfg), example, dtype),
        "block": init_params(BlockTransformer(bcfg), example, dtype),
    }
    rows = []
    for name in args.workloads.split(","):
        prompt, gen = sizes[name]
        best = {}
        for impl in impls.split(","):
            vcfg, bcfg = configs(quick, args.block_len, impl)
            runner = engine_runner_for
            for kind, model in (
                ("transformer", TransformerLM(vcfg)),
                ("block", BlockTransformer(bcfg)),
            ):
                try:
                    _, probe = runner(model, params[kind], 1, prompt, gen)
                    batch0 = start_batch(probe(), quick, args.max_batch)
                    batch, seconds, per_seq = measure(
                        runner, model, params[kind], batch0, prompt, gen, args.repeats
                    )
                except Exception as err:  # noqa: BLE001 - a fast path may not support a shape
                    if impl == "xla":
                        raise
                    print(f"{name} {kind} impl={impl}: skipped ({type(err).__name__}: "
                          f"{str(err)[:200]})", file=sys.stderr)  # fmt: skip
                    continue
                tps = batch * gen / seconds
                mib = per_seq / 2**20
                print(f"{name:14s} {kind:12s} impl={impl:5s} batch={batch:5d} "
                      f"{tps:12.0f} tok/s  cache/seq={mib:8.2f} MiB", flush=True)  # fmt: skip
                row = dict(workload=name, model=kind, impl=impl, prompt=prompt, generate=gen,
                           batch=batch, seconds=seconds, tokens_per_s=tps,
                           cache_bytes_per_seq=per_seq, params=count(params[kind]))  # fmt: skip
                if kind not in best or tps > best[kind]["tokens_per_s"]:
                    best[kind] = row
        ratio = best["block"]["tokens_per_s"] / best["transformer"]["tokens_per_s"]
        mem = best["transformer"]["cache_bytes_per_seq"] / best["block"]["cache_bytes_per_seq"]
        rows += [dict(best["transformer"]), dict(best["block"], speedup=ratio, cache_ratio=mem)]
        write_results(rows, meta, stem, quick)


if __name__ == "__main__":
    main()
