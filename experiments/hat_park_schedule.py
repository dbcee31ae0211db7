"""How far can HAT's batched decoding get past the byte transformer? The park schedule, modelled.

At batch 64 some row ends a word at almost every byte. ``HATDecoder.park`` makes rows that
finished a word wait until enough rows have, so that one backbone step serves many rows
(:mod:`arjax.generate.hat`, step 3). Each loop iteration then costs the byte path ``b``
(every iteration) plus the word path ``W`` (when it runs), and a generation costs

    loop_steps * b + word_steps * W.

This script simulates the schedule: each row draws word lengths from the corpus
(:func:`arjax.data.splitter.split_word_bytes` of the validation split), feeds one byte per
iteration unless parked, and parks at the first byte of each next word. The word path runs
when the parked rows are at least ``park`` of the rows still generating
(:func:`arjax.generate.hat.park_schedule`, the decoder's rule; ``tests/test_hat.py`` checks
it against the loop's counts). The output is the loop and word steps for each ``park``.

With ``--fit`` (a ``bench_hat_decode.py`` JSON holding HAT rows at two or more ``park``
values of one batch size) it also:

* fits ``b`` and ``W`` by least squares to the measured seconds, loop steps and word steps;
* predicts HAT's time and its ratio to the transformer row of the same run for every
  ``park``;
* gives the ratio bound with a free byte path (``b = 0``) and the byte path ``b`` that would
  reach ``--target`` (issue 21: 2.5x) with the fitted ``W``; negative where even a free byte
  path would not.

Without ``--fit`` it gives, for each of ``--batches``, each ``park``'s speed against
``park = 0.5`` when a word-path iteration costs ``--word-costs`` byte-path iterations.

    python experiments/hat_park_schedule.py --batches 64 --fit experiments/results/X.json
    python experiments/hat_park_schedule.py --batches 2 8 64 256 --name hat_park_batches

Prints a table and writes ``experiments/results/hat_park_schedule.{json,md}`` (``--name``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from hat_common import markdown_table, write_results

from arjax.data.corpus import load_corpus
from arjax.data.splitter import split_word_bytes
from arjax.generate.hat import park_schedule


def word_lengths(max_word_bytes: int = 32) -> np.ndarray:
    """Bytes of each word of the validation text, in the splitter's words."""
    text = "".join(load_corpus("val"))
    return np.array([len(w) for w in split_word_bytes(text, max_word_bytes)])


def schedule(
    lengths: np.ndarray, batch: int, new_bytes: int, park: float, rng: np.random.Generator
) -> tuple[int, int]:
    """(loop steps, word steps) of one simulated generation of ``new_bytes`` per row: each
    row's words drawn from ``lengths``, a row parking at each next word's first byte
    (:func:`arjax.generate.hat.park_schedule`, the decoder's rule)."""
    ends = np.cumsum(rng.choice(lengths, (batch, new_bytes)), axis=1)  # [batch, words]
    words = np.ones((batch, new_bytes), int)  # words in the window after each byte
    rows, cols = np.nonzero(ends < new_bytes)
    words[rows, ends[rows, cols]] = 2
    return park_schedule(words, np.full(batch, new_bytes), park)[:2]


def path_costs(hat_rows: list[dict]) -> tuple[float, float]:
    """Seconds per loop iteration of the byte path ``b`` and of the word path ``W``, least
    squares over HAT rows of one batch size (``bench_hat_decode.py``: ``seconds``,
    ``loop_steps``, ``word_steps``) whose schedules differ (``park`` values; at one row every
    value gives the same schedule)."""
    a = np.array([[r["loop_steps"], r["word_steps"]] for r in hat_rows], float)
    if np.linalg.matrix_rank(a) < 2:
        raise ValueError("path_costs: need HAT rows of two or more different schedules")
    (b, w), *_ = np.linalg.lstsq(a, np.array([r["seconds"] for r in hat_rows]), rcond=None)
    return float(b), float(w)


def fit_costs(path: Path, batch: int) -> tuple[float, float, float, list[dict]]:
    """(b, W, transformer seconds, measured HAT rows) from a bench_hat_decode.py JSON."""
    rows = [r for r in json.loads(path.read_text())["rows"] if r["batch"] == batch]
    hat = [r for r in rows if r["model"] == "hat"]
    (tf,) = [r["seconds"] for r in rows if r["model"] == "transformer"]
    return *path_costs(hat), tf, hat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[64])
    ap.add_argument("--new-bytes", type=int, default=128)
    ap.add_argument("--parks", type=float, nargs="+",
                    default=[0.0, 0.25, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0])  # fmt: skip
    ap.add_argument("--word-costs", type=float, nargs="+", default=[3.0, 5.0],
                    help="W / b ratios for the relative speeds (without --fit)")  # fmt: skip
    ap.add_argument("--trials", type=int, default=50, help="simulated generations per park")
    ap.add_argument("--fit", type=Path, default=None, help="bench_hat_decode.py JSON")
    ap.add_argument("--target", type=float, default=2.5, help="HAT / transformer bytes/s")
    ap.add_argument("--name", default="hat_park_schedule")
    a = ap.parse_args()
    if a.fit and len(a.batches) != 1:
        raise ValueError("--fit: give the one batch size of the fitted run in --batches")
    lengths = word_lengths()
    rng = np.random.default_rng(0)
    b, w, tf, fitted_rows = fit_costs(a.fit, a.batches[0]) if a.fit else (0.0, 0.0, 0.0, [])
    measured = {r["park"]: r for r in fitted_rows}
    parks = sorted({*a.parks, *measured})
    rows = []
    for batch in a.batches:
        done = []
        for park in parks:
            runs = np.array([schedule(lengths, batch, a.new_bytes, park, rng)
                             for _ in range(a.trials)])  # fmt: skip
            steps, word_steps = runs.mean(axis=0)
            row = {"batch": batch, "park": park, "loop_steps": steps, "word_steps": word_steps}
            if park in measured:  # the simulation against the run it was fitted to
                got = measured[park]
                row["measured_steps"] = f"{got['loop_steps']} / {got['word_steps']}"
            if a.fit:
                row["predicted_ms"] = 1e3 * (steps * b + word_steps * w)
                row["predicted_ratio"] = tf / (steps * b + word_steps * w)
                row["ratio_if_b_0"] = tf / (word_steps * w)
                row["b_for_target_ms"] = 1e3 * (tf / a.target - word_steps * w) / steps
            done.append(row)
        for r in a.word_costs if not a.fit else []:  # speed against park 0.5 at W = r * b
            base = next((x for x in done if x["park"] == 0.5), done[0])
            for x in done:
                x[f"speed W={r:g}b"] = (base["loop_steps"] + r * base["word_steps"]) / (
                    x["loop_steps"] + r * x["word_steps"]
                )
        rows += done
        for x in done:
            print(x, flush=True)
    notes = (
        f"{a.new_bytes} new bytes per row, {a.trials} simulated generations per batch and "
        f"park; word lengths of the validation text (mean {lengths.mean():.2f} bytes)."
    )
    columns = ["batch", "park", "loop_steps", "word_steps"]
    if a.fit:
        columns += ["measured_steps", "predicted_ms", "predicted_ratio", "ratio_if_b_0"]
        columns += ["b_for_target_ms"]
        fitted = "; ".join(
            f"park {r['park']}: {r['loop_steps']} / {r['word_steps']} steps, "
            f"{1e3 * r['seconds']:.1f} ms measured, "
            f"{1e3 * (r['loop_steps'] * b + r['word_steps'] * w):.1f} ms fitted"
            for r in measured.values()
        )
        notes += (
            f" Costs fitted to `{a.fit}`: byte path b = {1e3 * b:.3f} ms, word path "
            f"W = {1e3 * w:.3f} ms per loop iteration; transformer {1e3 * tf:.1f} ms per "
            f"generation ({1e3 * tf / a.new_bytes:.3f} ms per step). Measured: {fitted}."
        )
    else:
        columns += [f"speed W={r:g}b" for r in a.word_costs]
        notes += (
            " `speed W=rb`: the speed against park 0.5 at the same batch when a word-path "
            "iteration costs r byte-path iterations."
        )
    write_results(a.name, "HAT's park schedule: simulated steps and predicted speed",
                  {"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows},
                  markdown_table(rows, columns), notes)  # fmt: skip


if __name__ == "__main__":
    main()
