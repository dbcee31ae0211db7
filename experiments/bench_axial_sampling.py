"""Axial Transformer sampling time: semi-parallel (Ho et al. 2019, sec. 4) vs naive.

Semi-parallel: outer decoder once per row with column caches, inner decoder once per pixel
with row caches. Naive: one full forward pass per pixel. Both draw the same samples (checked
here too). Random-init weights (timing does not depend on them); float32, XLA attention (the decode
steps are q_len=1 calls on short caches).

    python experiments/bench_axial_sampling.py            # 32x32 (GPU)
    python experiments/bench_axial_sampling.py --quick    # 8x8, tiny model (CPU)

Writes experiments/results/bench_axial_sampling[_quick].{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import functools
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

from arjax.config import to_dict
from arjax.generate.axial import AxialDecoder, sample_axial_naive
from arjax.models.axial import AxialConfig, AxialTransformer

RESULTS = Path(__file__).parent / "results"


def environment() -> dict:
    """Device, date, versions and command line, for every results file."""
    return {
        "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
        "command": " ".join(["python", *sys.argv]),
    }


def write_results(name: str, env: dict, rows: list[dict], extra: dict | None = None) -> Path:
    """``results/NAME.json`` (env + rows + extra) and ``NAME.md`` (env + a table of rows)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {**env, **(extra or {}), "rows": rows}
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    cols = list(rows[0])
    lines = [f"# {name}", ""] + [f"- {k}: `{v}`" for k, v in env.items()] + [""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    return RESULTS / f"{name}.json"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def time_call(fn, repeats: int) -> float:
    """Median wall seconds of ``fn()`` (already compiled), synchronised on its result."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    # Exact float32 matmuls (no TF32 on GPU) so both samplers see the same logits bit for bit.
    jax.config.update("jax_default_matmul_precision", "highest")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="8x8 images, tiny model (CPU)")
    p.add_argument("--size", type=int, default=None, help="image side (default 32; quick: 8)")
    p.add_argument("--num", type=int, default=4, help="images sampled per call")
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args()
    size = args.size or (8 if args.quick else 32)
    repeats = args.repeats or (3 if args.quick else 5)
    width = dict(d_model=32, head_dim=8, mlp_dim=96) if args.quick else {}
    cfg = AxialConfig(
        shape=(size, size), d_model=width.get("d_model", 128), num_heads=4, num_kv_heads=4,
        head_dim=width.get("head_dim", 32), mlp_dim=width.get("mlp_dim", 384), outer_layers=2,
        inner_layers=2, dtype="float32", attention_impl="xla",
    )  # fmt: skip
    model = AxialTransformer(cfg)
    x = jnp.zeros((1, size, size, 1), jnp.int32)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), {"inputs": x})["params"])
    rng = jax.random.key(1)
    rows = []
    samples = {}
    semi_parallel = AxialDecoder(model).sample
    naive = functools.partial(sample_axial_naive, model)
    for name, fn in (("semi_parallel", semi_parallel), ("naive", naive)):
        call = lambda fn=fn: fn(params, rng, args.num, temperature=1.0)  # noqa: E731
        t = time.perf_counter()
        samples[name] = np.asarray(jax.block_until_ready(call()))
        compile_s = time.perf_counter() - t
        seconds = time_call(call, repeats)
        rows.append(
            {"sampler": name, "image": f"{size}x{size}", "batch": args.num,
             "seconds": seconds, "first_call_s": compile_s,
             "ms_per_pixel": 1e3 * seconds / (size * size)}
        )  # fmt: skip
        print(json.dumps(rows[-1]))
    ratio = rows[1]["seconds"] / rows[0]["seconds"]
    same = bool(np.array_equal(samples["semi_parallel"], samples["naive"]))
    for row in rows:
        row["naive_over_semi_parallel"] = ratio
    print(f"{'sampler':>14} {'seconds':>9} {'ms/pixel':>9}")
    for row in rows:
        print(f"{row['sampler']:>14} {row['seconds']:9.3f} {row['ms_per_pixel']:9.3f}")
    print(f"naive / semi-parallel time: {ratio:.2f}x; identical samples: {same}")
    name = "bench_axial_sampling" + ("_quick" if args.quick else "")
    extra = {"config": to_dict(cfg), "identical_samples": same, "ratio": ratio}
    print(f"wrote {write_results(name, environment(), rows, extra)}")


if __name__ == "__main__":
    main()
