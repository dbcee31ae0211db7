"""Compile cost of flash attention per call site: seconds to lower and to compile ``n``
stacked causal fwd+bwd calls (``jax.grad`` of their sum) at HAT 1b's byte and word shapes,
with segment ids, for each GPU lowering. The growth per added call site is what an unrolled
model pays per attention layer (Mosaic GPU kernels are lowered and compiled once per call
site; Triton's are cached).

    python experiments/bench_flash_compile.py              # GPU: 1 and 3 call sites
    python experiments/bench_flash_compile.py --sites 1,2,4 --lowerings mosaic
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import jax
import jax.numpy as jnp

from kernels_pallas.flash_attention import flash_attention

# name -> (batch, length, heads, head_dim, window): HAT 1b's byte stacks and word backbone
SHAPES = {"byte": (16, 8192, 8, 128, 769), "word": (16, 1920, 16, 128, None)}


def stacked(sites: int, lowering: str, shape: str):
    """``jax.grad`` of ``sites`` chained attention calls (distinct call sites), jitted, and
    abstract arguments (q, k, v, segment ids)."""
    b, n, h, d, window = SHAPES[shape]

    def loss(q, k, v, seg):
        out = q
        for i in range(sites):
            ids = dict(q_segment_ids=seg, kv_segment_ids=seg)
            with jax.named_scope(f"layer_{i}"):  # as a model's layers
                out = flash_attention(
                    out, k * (i + 1), v, causal=True, window=window, lowering=lowering, **ids
                )
        return out.astype(jnp.float32).sum()

    x = jax.ShapeDtypeStruct((b, n, h, d), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((b, n), jnp.int32)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (x, x, x, seg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites", default="1,3", help="call-site counts, comma-separated")
    ap.add_argument("--lowerings", default="mosaic,triton")
    ap.add_argument("--shapes", default="word,byte")
    ap.add_argument("--out", default="experiments/results/flash_attention_compile_time")
    args = ap.parse_args()
    if jax.default_backend() != "gpu":
        ap.error("needs a GPU (Mosaic GPU kernels are compiled for the device)")
    rows = []
    for shape in args.shapes.split(","):
        for lowering in args.lowerings.split(","):
            for sites in map(int, args.sites.split(",")):
                grad, abstract = stacked(sites, lowering, shape)
                t0 = time.perf_counter()
                lowered = grad.trace(*abstract).lower()
                t1 = time.perf_counter()
                lowered.compile()
                t2 = time.perf_counter()
                row = dict(shape=shape, lowering=lowering, sites=sites, lower_s=t1 - t0,
                           compile_s=t2 - t1)  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "shapes": {
            k: dict(zip(("batch", "len", "heads", "head_dim", "window"), v))
            for k, v in SHAPES.items()
        },  # fmt: skip
    }
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print("| shape | lowering | call sites | lower s | compile s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['lowering']} | {r['sites']} | {r['lower_s']:.1f} "
              f"| {r['compile_s']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
