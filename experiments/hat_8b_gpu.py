"""The 8B-shaped HAT on one GPU, from a synthetic checkpoint in the released layout (issue 20,
item 5): convert (streaming, bf16, straight onto the device), forward, greedy generation.

Makes a random finite bf16 checkpoint of ``PRESETS["8b"]`` (:mod:`hat_convert_8b`), loads it
with :func:`load_published` onto the first device in bf16 (peak host RSS, device memory),
checks the conversion (every tensor of a save back is bit-identical), runs a forward pass on a
prompt batch (bytes/s) and greedy generation (bytes/s), and deletes the checkpoints. Writes
``experiments/results/hat_8b_gpu.{md,json}``::

    python experiments/hat_8b_gpu.py [--dir /tmp/hat8b] [--new-bytes 64] [--batch 4]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from hat_common import markdown_table, write_results
from hat_convert_8b import GIB, identical, make_checkpoint, rss_bytes

from arjax.data.splitter import split_word_bytes
from arjax.generate import generate
from arjax.models import hat_checkpoint as hc
from arjax.models.hat import HAT

PROMPT = "Grüße aus Köln! The quick brown fox jumps over the lazy dog. 日本語もOK 🙂 "


def device_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/hat8b"))
    parser.add_argument("--new-bytes", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--preset", default="8b", help="another HAT preset: a quick CPU check")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    src, dst = args.dir / "src", args.dir / "dst"
    rows = {}
    try:
        t0 = time.perf_counter()
        size = make_checkpoint(src, args.preset, None)
        made_s = time.perf_counter() - t0
        rows["checkpoint (bf16)"] = f"{size / GIB:.2f} GiB, written in {made_s:.0f} s"
        base = rss_bytes("VmRSS")
        t0 = time.perf_counter()
        params, config, published = hc.load_published(
            src, param_dtype="bfloat16", dtype="bfloat16", max_seq_len=4096, max_words=1024
        )
        jax.block_until_ready(params)
        load_s = time.perf_counter() - t0
        rows["load onto the GPU"] = f"{load_s:.0f} s ({size / GIB / load_s:.2f} GiB/s)"
        rows["peak host RSS through the load (RSS before it)"] = (
            f"{rss_bytes('VmHWM') / GIB:.2f} GiB ({base / GIB:.2f} GiB)"
        )
        rows["device peak after load"] = f"{(device_bytes() or 0) / GIB:.2f} GiB"
        hc.save_published(dst, params, config, template=published, max_shard_bytes=4 * GIB)
        same, count = identical(src, dst)
        rows["round trip bit-exact"] = f"{same} ({count} tensors)"
        shutil.rmtree(args.dir, ignore_errors=True)

        model = HAT(config)
        prompts = [PROMPT * 8] * args.batch
        gen = lambda n: generate(model, params, prompts, max_new_bytes=n)  # noqa: E731
        gen(args.new_bytes)  # compile (the same cache lengths as the timed call)
        t0 = time.perf_counter()
        out = gen(args.new_bytes)
        gen_s = time.perf_counter() - t0
        made = sum(len(t) for t in out.tokens)
        rows["greedy generation"] = (
            f"{made} bytes in {gen_s:.1f} s ({made / gen_s:.1f} bytes/s, batch {args.batch})"
        )
        words = split_word_bytes(PROMPT * 8, config.max_word_bytes)
        lengths = [len(w) for w in words]
        s, w = sum(lengths), len(lengths)
        word_of = np.repeat(np.arange(w), lengths)
        batch = {
            "inputs": jnp.asarray([[b for wd in words for b in wd]] * args.batch, jnp.int32),
            "segment_ids": jnp.ones((args.batch, s), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(s), (args.batch, s)),
            "word_ids": jnp.asarray(np.tile(word_of + 1, (args.batch, 1)), jnp.int32),
            "word_segment_ids": jnp.ones((args.batch, w), jnp.int32),
            "word_positions": jnp.broadcast_to(jnp.arange(w), (args.batch, w)),
        }
        fwd = jax.jit(lambda p, b: model.apply({"params": p}, b))
        logits = fwd(params, batch).block_until_ready()
        t0 = time.perf_counter()
        for _ in range(5):
            logits = fwd(params, batch)
        logits.block_until_ready()
        fwd_s = (time.perf_counter() - t0) / 5
        finite = bool(jnp.isfinite(logits).all())
        rows["forward"] = (
            f"{args.batch}x{s} bytes in {fwd_s * 1e3:.1f} ms "
            f"({args.batch * s / fwd_s:.0f} bytes/s), logits finite: {finite}"
        )
        rows["device peak"] = f"{(device_bytes() or 0) / GIB:.2f} GiB"
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    table = markdown_table([{"quantity": k, "value": v} for k, v in rows.items()],
                           ["quantity", "value"])  # fmt: skip
    name = "hat_8b_gpu" if args.preset == "8b" else f"hat_{args.preset}_gpu_check"
    write_results(
        name, f"HAT {args.preset} shape: streaming conversion, forward, generation",
        {"rows": rows}, table,
        notes="Command: `python experiments/hat_8b_gpu.py`; synthetic random bf16 weights.",
    )  # fmt: skip


if __name__ == "__main__":
    main()
