"""Decode-time attention (one query token against a KV cache): XLA vs the flash-decoding kernel.

``arjax.ops.decode_attention`` with ``impl="xla"`` (plain jnp: two einsums and a softmax over
the cache) and ``impl="pallas"`` (:func:`kernels_pallas.flash_attention.flash_decode`,
split-KV flash-decoding, Dao et al. 2023), in bf16, at batch 1 and 64 over KV caches of 256
to 16k slots (all visible), GQA 16 query heads over 8 KV heads of 128, as the 1B models'
layers decode. Each call is timed inside one jitted ``lax.fori_loop`` of ``--iters`` calls,
each fed the previous output (no host dispatch in the timing); the median of ``--repeats``.
Outputs are compared with the float32 reference (``arjax.ops.attention_reference``).
``experiments/make_auto_table.py`` turns the rows into ``auto_table.DECODE``: which of the two
``impl="auto"`` runs for decoding on this GPU.

    python experiments/bench_decode_attention.py           # GPU
    python experiments/bench_decode_attention.py --quick   # CPU smoke run (interpret mode)

Prints a table and writes ``experiments/results/bench_decode_attention[_quick].{json,md}``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
from hat_common import markdown_table, write_results

from arjax.ops import attention_reference, decode_attention

IMPLS = ("xla", "pallas")


def timed_us(impl: str, q, k, v, visible, iters: int, repeats: int) -> float:
    """Median microseconds per call of ``iters`` chained calls in one compiled loop."""

    def loop(q, k, v, visible):
        def body(_, q):
            return decode_attention(q, k, v, kv_visible=visible, impl=impl)

        return jax.lax.fori_loop(0, iters, body, q)

    fn = jax.jit(loop)
    jax.block_until_ready(fn(q, k, v, visible))
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(q, k, v, visible))
        runs.append((time.perf_counter() - t0) / iters * 1e6)
    return statistics.median(runs)


def row(batch: int, cache: int, heads: int, kv_heads: int, d: int, args) -> dict:
    keys = jax.random.split(jax.random.key(batch * 100_003 + cache), 3)
    q = jax.random.normal(keys[0], (batch, 1, heads, d), jnp.bfloat16)
    k, v = (jax.random.normal(x, (batch, cache, kv_heads, d), jnp.bfloat16) for x in keys[1:])
    visible = jnp.ones((batch, cache), bool)
    seg = dict(q_segment_ids=jnp.ones((batch, 1), jnp.int32), kv_segment_ids=visible.astype(int))
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = attention_reference(*f32, **seg)
    out = dict(batch=batch, cache_len=cache, heads=heads, kv_heads=kv_heads, head_dim=d)
    for impl in IMPLS:
        attend = functools.partial(decode_attention, impl=impl)
        got = jax.jit(lambda q, k, v, m, attend=attend: attend(q, k, v, kv_visible=m))(
            q, k, v, visible
        )
        out[f"{impl}_max_err"] = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
        out[f"{impl}_us"] = timed_us(impl, q, k, v, visible, args.iters, args.repeats)
    out["xla_over_pallas"] = out["xla_us"] / out["pallas_us"]
    out["fastest"] = min(IMPLS, key=lambda i: out[f"{i}_us"])
    print(out, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU, interpret mode)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--cache-lens", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    heads, kv_heads, d = 16, 8, 128
    if args.quick:
        args.batches, args.cache_lens, args.iters, args.repeats = [1, 4], [32, 64], 2, 1
        heads, kv_heads, d = 4, 2, 32
    rows = [row(b, n, heads, kv_heads, d, args) for b in args.batches for n in args.cache_lens]
    for r in rows:  # bf16 inputs, float32 softmax in both: errors of bf16's resolution
        for impl in IMPLS:
            if not r[f"{impl}_max_err"] < 2e-2:
                raise SystemExit(f"{impl} differs from the float32 reference: {r}")
    cols = ["batch", "cache_len", "heads", "kv_heads", "head_dim", "xla_us", "pallas_us",
            "xla_over_pallas", "fastest", "xla_max_err", "pallas_max_err"]  # fmt: skip
    notes = (
        "Microseconds per decode-attention call (one query token per row, every cache slot "
        "visible), bf16; `xla_over_pallas` > 1: the flash-decoding kernel is faster. Max "
        "errors: against the float32 reference on the same bf16 inputs."
    )
    name = "bench_decode_attention" + ("_quick" if args.quick else "")
    title = "Decode attention: XLA vs flash-decoding (Pallas)"
    write_results(name, title, {"rows": rows}, markdown_table(rows, cols), notes)


if __name__ == "__main__":
    main()
