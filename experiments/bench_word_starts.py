"""Time of `arjax.data.word_starts` (HAT word boundaries as arrays) against the host splitter
`split_word_bytes` on the same text, for a ``[batch, len]`` batch of byte rows.

Rows are consecutive ``len``-byte windows of a text (each cut back to a character start), so
a row is split as a text of its own by both paths; the outputs are checked equal before timing.
``word_starts`` is jitted once per backend (CPU always, and the default accelerator if any) and
timed as the median of ``--repeats`` calls (blocking on the result); the host path is the median
of ``--repeats`` runs over the rows with the splitter's caches cleared before each run. The
incremental form (`word_scan_step`, what a generation loop runs once per byte) is timed as one
jitted ``lax.scan`` over the ``len`` columns (+ one PAD that decides the rest), reported per step;
its decided flags are checked equal too.

    python experiments/bench_word_starts.py [--batch 64] [--len 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import numpy as np

from arjax.data import load_corpus, split_word_bytes, word_scan_init, word_scan_step, word_starts
from arjax.data import splitter as _splitter

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from bench_splitter import random_script_words  # noqa: E402
from test_splitter import CORPUS  # noqa: E402


def rows_of(text: str, batch: int, length: int) -> list[bytes]:
    """``batch`` consecutive windows of at most ``length`` bytes, each ending at a char start."""
    data = text.encode()
    rows, start = [], 0
    while len(rows) < batch:
        end = min(start + length, len(data))
        while end < len(data) and (data[end] & 0xC0) == 0x80:
            end -= 1
        rows.append(data[start:end])
        start = end if end < len(data) else 0
    return rows


def host_starts(rows: list[bytes], max_bytes: int) -> list[list[int]]:
    out = []
    for row in rows:
        offsets, pos = [], 0
        for piece in split_word_bytes(row.decode(), max_bytes):
            offsets.append(pos)
            pos += len(piece)
        out.append(offsets)
    return out


def scan_flags(ids: jax.Array, max_bytes: int) -> jax.Array:
    """Flags decided by `word_scan_step` over the columns of ``ids`` ``[batch, len]``."""
    batch, n = ids.shape

    def body(carry, column):
        state, flags = carry
        state, out = word_scan_step(state, column, max_word_bytes=max_bytes)
        k = jax.numpy.arange(33)
        bits = ((out.starts[:, None] >> jax.numpy.minimum(k, 31).astype("uint32")) & 1) == 1
        where = jax.numpy.where(k < out.count[:, None], out.first[:, None] + k, n + 33)
        flags = flags.at[jax.numpy.arange(batch)[:, None], where].set(bits, mode="drop")
        return (state, flags), None

    flags = jax.numpy.zeros((batch, n + 1), bool)
    (_, flags), _ = jax.lax.scan(body, (word_scan_init(batch), flags), ids.T)
    return flags[:, : n - 1]


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--len", type=int, default=4096, dest="length")
    parser.add_argument("--max-bytes", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    mb = args.max_bytes

    texts = {
        "shakespeare": "\n".join(load_corpus("val")),
        "multilingual": "\n".join(CORPUS) * 300,
        "random-script words": random_script_words(40_000),
    }
    backends = ["cpu"] + ([jax.default_backend()] if jax.default_backend() != "cpu" else [])
    fn = jax.jit(lambda ids, lengths: word_starts(ids, lengths, max_word_bytes=mb))
    scan = jax.jit(lambda ids: scan_flags(ids, mb))
    rows_out = []
    for name, text in texts.items():
        rows = rows_of(text, args.batch, args.length)
        ids = np.full((args.batch, args.length), 256, np.int32)
        lengths = np.array([len(r) for r in rows], np.int32)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = np.frombuffer(r, np.uint8)
        expected = host_starts(rows, mb)

        def host(rows=rows):
            _splitter._split_chunk.cache_clear()
            _splitter._pieces_cached.cache_clear()
            host_starts(rows, mb)

        t_host = _median(host, args.repeats)
        row = {"text": name, "batch": args.batch, "len": args.length, "bytes": int(lengths.sum())}
        row["host_s"] = t_host
        for backend in backends:
            dev = jax.devices(backend)[0]
            d_ids, d_lengths = jax.device_put(ids, dev), jax.device_put(lengths, dev)
            got = np.asarray(fn(d_ids, d_lengths))
            assert [np.flatnonzero(g).tolist() for g in got] == expected, (name, backend)
            row[f"{backend}_s"] = _median(
                lambda d_ids=d_ids, d_lengths=d_lengths: fn(d_ids, d_lengths).block_until_ready(),
                args.repeats,
            )
            # the scanner: rows of exactly len bytes + one PAD (rows shorter are PAD-filled)
            padded = jax.device_put(np.pad(ids, ((0, 0), (0, 1)), constant_values=256), dev)
            scanned = np.asarray(scan(padded))
            assert [np.flatnonzero(g[:n]).tolist() for g, n in zip(scanned, lengths)] == expected
            t_scan = _median(lambda p=padded: scan(p).block_until_ready(), args.repeats)
            row[f"{backend}_scan_step_us"] = t_scan / padded.shape[1] * 1e6
        rows_out.append(row)
        print(row, flush=True)

    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": platform.processor() or platform.machine(),
        "accelerator": str(jax.devices()[0]) if backends[-1] != "cpu" else "none",
        "jax": jax.__version__,
        "cpus": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 1),  # a shared machine slows both paths
        "max_word_bytes": mb,
        "command": "python experiments/bench_word_starts.py " + " ".join(sys.argv[1:]),
    }
    out = ROOT / "experiments" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "word_starts.json").write_text(
        json.dumps({"meta": meta, "rows": rows_out}, indent=2) + "\n"
    )
    cols = [f"{b} word_starts ms" for b in backends]
    scan_cols = [f"{b} word_scan_step us/step" for b in backends]
    lines = [
        f"# `word_starts` ({args.batch} x {args.length} bytes) vs the host splitter",
        "",
        ", ".join(f"{k}: {v}" for k, v in meta.items()),
        "",
        "Same rows, outputs checked equal; medians. MB/s = text bytes per second. The host path is"
        " one Python thread; `word_starts` uses every CPU core XLA gets.",
        "",
        "| text | bytes | host split_word_bytes ms (MB/s) | "
        + " | ".join(f"{c} (MB/s, x host)" for c in cols)
        + " | "
        + " | ".join(scan_cols)
        + " |",
        "|---|---:|---:|" + "---:|" * (2 * len(cols)),
    ]
    for r in rows_out:
        mbps = r["bytes"] / 1e6
        cells = [
            f"{r[f'{b}_s'] * 1e3:.1f} ({mbps / r[f'{b}_s']:.1f}, {r['host_s'] / r[f'{b}_s']:.1f}x)"
            for b in backends
        ]
        lines.append(
            f"| {r['text']} | {r['bytes']} | {r['host_s'] * 1e3:.1f} ({mbps / r['host_s']:.1f})"
            f" | "
            + " | ".join(cells)
            + " | "
            + " | ".join(f"{r[f'{b}_scan_step_us']:.0f}" for b in backends)
            + " |"
        )
    (out / "word_starts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
