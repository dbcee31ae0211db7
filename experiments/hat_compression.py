"""Compression of the HAT word splitter: bytes per word on the embedded corpus.

HAT's backbone runs once per word, so its sequence-length saving over a byte model is
the mean number of UTF-8 bytes per word (Neitemeier et al. 2025, sec. 3 and table 1).
This measures it for ``arjax.data.split_words`` (no length limit) and for
``split_word_bytes`` at a few byte limits (long words are cut into several pieces).

    python experiments/hat_compression.py [--limits 8 16 32 64]
"""

from __future__ import annotations

import argparse

import numpy as np
from hat_common import markdown_table, write_results

from arjax.data import split_word_bytes, split_words
from arjax.data.corpus import SPLITS, load_corpus


def word_stats(lengths: np.ndarray, num_bytes: int) -> dict[str, float | int]:
    """Summary of word lengths (bytes) over a split with ``num_bytes`` bytes."""
    return {
        "bytes": num_bytes,
        "words": int(lengths.size),
        "bytes_per_word": num_bytes / lengths.size,
        "median_word_bytes": float(np.median(lengths)),
        "p99_word_bytes": float(np.percentile(lengths, 99)),
        "max_word_bytes": int(lengths.max()),
    }


def measure(docs: list[str], limits: list[int]) -> list[dict]:
    """One row per splitting rule: unlimited words, then each byte limit."""
    num_bytes = sum(len(d.encode("utf-8")) for d in docs)
    words = [w for d in docs for w in split_words(d)]
    unlimited = np.array([len(w.encode("utf-8")) for w in words])
    rows = [{"rule": "split_words", **word_stats(unlimited, num_bytes)}]
    for limit in limits:
        pieces = np.array([len(p) for d in docs for p in split_word_bytes(d, limit)])
        row = {"rule": f"split_word_bytes(max_bytes={limit})", **word_stats(pieces, num_bytes)}
        row["words_over_limit"] = float(np.mean(unlimited > limit))
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--limits", type=int, nargs="+", default=[8, 16, 32, 64])
    args = p.parse_args()
    results = {}
    table_rows = []
    for split in SPLITS:
        rows = measure(load_corpus(split), args.limits)
        results[split] = rows
        table_rows += [{"split": split, **r} for r in rows]
    cols = ["split", "rule", "bytes", "words", "bytes_per_word", "median_word_bytes",
            "p99_word_bytes", "max_word_bytes", "words_over_limit"]  # fmt: skip
    notes = (
        "Corpus: the embedded Shakespeare plays (`arjax.data.corpus`, cleaned markdown). "
        "`bytes_per_word` is the factor by which HAT's backbone sequence is shorter than a "
        "byte-level model's; `words_over_limit` is the share of words longer than the limit "
        "(they become several backbone positions)."
    )
    write_results(
        "hat_compression",
        "HAT splitter compression (bytes per word)",
        {"limits": args.limits, "splits": results},
        markdown_table(table_rows, cols),
        notes,
    )


if __name__ == "__main__":
    main()
