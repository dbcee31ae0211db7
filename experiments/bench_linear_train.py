"""Training throughput of linear attention: chunked form vs parallel (quadratic) form.

Times a jitted forward + backward of :func:`arjax.ops.linear_attention` (loss
``sum(out * w)``, gradients for q, k, v and the decay) at several sequence lengths, for a
scalar decay (RetNet / Lightning) and a per-key-dim gate (GLA). The parallel form needs
O(L^2) memory (O(L^2 dk) with a gate); runs that do not fit are reported as OOM.

    python experiments/bench_linear_train.py --quick    # CPU: L = 256, 512, 1024
    python experiments/bench_linear_train.py            # GPU: L = 2k, 8k, 32k
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from linear_common import median_seconds, write_results

from arjax.ops import linear_attention


def fwd_bwd_seconds(form: str, decay: str, length: int, args: argparse.Namespace) -> float:
    ks = jax.random.split(jax.random.key(0), 5)
    shape = (args.batch, length, args.heads, args.head_dim)
    q, k, v, w = (jax.random.normal(x, shape) for x in ks[:4])
    g_shape = shape[:3] if decay == "scalar" else shape
    log_decay = jax.nn.log_sigmoid(jax.random.normal(ks[4], g_shape) + 4.0)

    @jax.jit
    def grads(q, k, v, g):
        def loss(q, k, v, g):
            out, _ = linear_attention(
                q, k, v, log_decay=g, form=form, chunk_size=args.chunk_size, impl="xla"
            )
            return jnp.sum(out * w)

        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, g)

    return median_seconds(lambda: grads(q, k, v, log_decay), args.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short sequences (CPU)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if args.quick:
        args.heads, args.head_dim, args.repeats = 2, 32, 3
    lengths = (256, 512, 1024) if args.quick else (2048, 8192, 32768)
    rows = []
    for decay in ("scalar", "gated"):
        for length in lengths:
            row = {"decay": decay, "L": length}
            for form in ("parallel", "chunked"):
                try:
                    sec = fwd_bwd_seconds(form, decay, length, args)
                    row[f"{form} tok/s"] = args.batch * length / sec
                except Exception as e:  # noqa: BLE001 -- out of memory is a result here
                    if "RESOURCE_EXHAUSTED" not in str(e) and "memory" not in str(e).lower():
                        raise
                    row[f"{form} tok/s"] = "OOM"
                print(row, flush=True)
            par, chk = row["parallel tok/s"], row["chunked tok/s"]
            row["chunked / parallel"] = chk / par if isinstance(par, float) else "-"
            rows.append(row)
    write_results(
        "linear_train" + ("_quick" if args.quick else ""),
        "Linear attention fwd+bwd throughput: chunked vs parallel form",
        rows,
        ["decay", "L", "parallel tok/s", "chunked tok/s", "chunked / parallel"],
        f"batch {args.batch}, heads {args.heads}, head_dim {args.head_dim}, "
        f"chunk {args.chunk_size}, float32, median of {args.repeats} jitted steps.",
    )


if __name__ == "__main__":
    main()
