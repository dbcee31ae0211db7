"""Throughput of the HAT word splitter vs the published `hat-splitter` (reference only).

Text: the embedded Shakespeare corpus (all plays) and a multilingual text (the test corpus of
tests/test_splitter.py, once and repeated 300 times), separately and concatenated ("one run").
Each splitter is warmed up once, then timed over interleaved repeats; we report the median.
arjax's word caches are cleared before every timed call, so only repetition within the text
helps it (natural text repeats words; the 300x multilingual text repeats them unusually often,
the "once" and "random-script words" rows have almost none).

    python experiments/bench_splitter.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import random
import statistics
import sys
import time

import regex

from arjax.data import load_corpus, split_word_bytes, split_words
from arjax.data import splitter as _splitter

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_splitter import CORPUS  # noqa: E402


def random_script_words(n: int, seed: int = 0) -> str:
    """Words of random letters (Cyrillic, Arabic, CJK, Latin-1), almost never repeating."""
    rng = random.Random(seed)
    scripts = [(" ", 0x430, 0x44F), (" ", 0x627, 0x64A), ("", 0x4E00, 0x9FFF), (" ", 0xE0, 0xFF)]
    out = []
    for _ in range(n):
        lead, lo, hi = rng.choice(scripts)
        word = "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(2, 9)))
        out.append(lead + word + rng.choice(["", "", ",", ".", "!"]))
    return "".join(out)


def _clear_caches() -> None:
    _splitter._split_chunk.cache_clear()
    _splitter._pieces_cached.cache_clear()


def _median_seconds(fn, text: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _clear_caches()
        start = time.perf_counter()
        fn(text)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-bytes", type=int, default=32)
    args = parser.parse_args()

    import hat_splitter  # test-time reference only (non-commercial licence)

    ref = hat_splitter.HATSplitter()
    shakespeare = "\n".join(load_corpus("train") + load_corpus("val"))
    multilingual = "\n".join(CORPUS) * 300
    texts = {
        "shakespeare": shakespeare,
        "multilingual once": "\n".join(CORPUS),
        "multilingual x300": multilingual,
        "random-script words": random_script_words(40_000),
        "both (one run)": shakespeare + "\n" + multilingual,
    }
    mb = args.max_bytes
    cases = [
        ("split_words", split_words, ref.split),
        (
            f"split_word_bytes({mb})",
            lambda t: split_word_bytes(t, mb),
            lambda t: ref.split_with_limit(t, mb),
        ),
    ]
    rows = []
    for name, text in texts.items():
        assert split_words(text) == ref.split(text), name
        for op, ours, theirs in cases:
            ours(text), theirs(text)  # warm-up (caches, lazy regex compilation)
            t_ours, t_ref = [], []
            reps = args.repeats if len(text) > 100_000 else 50 * args.repeats
            for _ in range(reps):  # interleave so machine load hits both alike
                t_ours.append(_median_seconds(ours, text, 1))
                t_ref.append(_median_seconds(theirs, text, 1))
            s_ours, s_ref = statistics.median(t_ours), statistics.median(t_ref)
            rows.append(
                {
                    "text": name,
                    "op": op,
                    "chars": len(text),
                    "arjax_chars_per_s": len(text) / s_ours,
                    "hat_splitter_chars_per_s": len(text) / s_ref,
                    "speedup": s_ref / s_ours,
                }
            )
    header = (
        f"{'text':<20} {'op':<22} {'chars':>9} {'arjax Mch/s':>12} {'hat Mch/s':>10} {'ratio':>6}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['text']:<20} {r['op']:<22} {r['chars']:>9} {r['arjax_chars_per_s'] / 1e6:>12.2f}"
            f" {r['hat_splitter_chars_per_s'] / 1e6:>10.2f} {r['speedup']:>6.2f}"
        )
    meta = {
        "device": f"CPU ({platform.processor() or platform.machine()})",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "regex": regex.__version__,
        "hat_splitter": "0.1.10",
        "command": "python experiments/bench_splitter.py " + " ".join(sys.argv[1:]),
        "repeats": args.repeats,
    }
    out = ROOT / "experiments" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "splitter.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# HAT splitter throughput: arjax vs hat-splitter",
        "",
        ", ".join(f"{k}: {v}" for k, v in meta.items()),
        "",
        "| text | op | chars | arjax Mchar/s | hat-splitter Mchar/s | ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['text']} | {r['op']} | {r['chars']} | {r['arjax_chars_per_s'] / 1e6:.2f}"
            f" | {r['hat_splitter_chars_per_s'] / 1e6:.2f} | {r['speedup']:.2f} |"
        )
    (out / "splitter.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
