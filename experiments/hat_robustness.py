"""Robustness to input perturbations: bits/byte of HAT vs the byte transformer on noisy text.

The paper's claim (Neitemeier et al. 2025, Sec. 4.3, "robustness to intra-word
perturbations"): HAT, reading bytes, degrades gracefully under spelling noise. This takes the
two checkpoints trained by ``hat_vs_transformer.py`` (matched training FLOPs) and measures
validation bits/byte on the held-out plays (the first ``--chars`` characters of each) clean
and under seeded perturbations:

- ``swap``: in ``--rate`` of the words (letter runs of >= 2), two adjacent letters swapped;
- ``delete``: each letter deleted with probability ``--rate / 2``;
- ``case``: each letter's case flipped with probability ``--rate``;
- ``upper``: the whole text upper-cased;
- ``whitespace``: after each space or newline, an extra space with probability ``--rate``.

Bits/byte are per byte of the text each model is given (the perturbed text), over all of
its rows (every byte transition once), so both models score exactly the same bytes.

    python experiments/hat_robustness.py [--runs runs/hat_vs_transformer]
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from hat_common import markdown_table, write_results

from arjax.cli import load_run_config
from arjax.data.corpus import load_corpus
from arjax.data.pipeline import make_eval_batches
from arjax.data.words import make_word_eval_batches
from arjax.train.loop import Trainer

_WORD = re.compile(r"[A-Za-z]{2,}")
_LETTER = re.compile(r"[A-Za-z]")


def swap(text: str, rate: float, rng: np.random.Generator) -> str:
    """Swap two adjacent letters inside ``rate`` of the words."""

    def one(m: re.Match) -> str:
        w = m.group()
        if rng.random() >= rate:
            return w
        i = int(rng.integers(len(w) - 1))
        return w[:i] + w[i + 1] + w[i] + w[i + 2 :]

    return _WORD.sub(one, text)


def delete(text: str, rate: float, rng: np.random.Generator) -> str:
    """Drop each letter with probability ``rate / 2``."""
    return _LETTER.sub(lambda m: "" if rng.random() < rate / 2 else m.group(), text)


def flip_case(text: str, rate: float, rng: np.random.Generator) -> str:
    """Flip the case of each letter with probability ``rate``."""
    return _LETTER.sub(lambda m: m.group().swapcase() if rng.random() < rate else m.group(), text)


def upper(text: str, rate: float, rng: np.random.Generator) -> str:
    """All caps (``rate``/``rng`` unused: a deterministic perturbation)."""
    del rate, rng
    return text.upper()


def whitespace(text: str, rate: float, rng: np.random.Generator) -> str:
    """Insert an extra space after a space or newline with probability ``rate``."""
    return re.sub(r"[ \n]", lambda m: m.group() + (" " if rng.random() < rate else ""), text)


PERTURBATIONS: dict[str, Callable[[str, float, np.random.Generator], str]] = {
    "clean": lambda text, rate, rng: text,
    "swap": swap,
    "delete": delete,
    "case": flip_case,
    "upper": upper,
    "whitespace": whitespace,
}


def eval_bits_per_byte(trainer: Trainer, params, docs: list[str], batch_size: int) -> float:
    """Bits/byte of the trainer's model over all rows of ``docs`` (its own packing)."""
    cfg = trainer.cfg
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "val").mkdir()
        for i, doc in enumerate(docs):
            (Path(tmp) / "val" / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
        data = dataclasses.replace(cfg.data, corpus=tmp, val_batches=0, batch_size=batch_size)
        if cfg.model_name == "hat":
            m = cfg.model
            batches = make_word_eval_batches(
                data, max_words=m.max_words, max_word_bytes=m.max_word_bytes
            )
        else:
            batches = make_eval_batches(data)
    trainer.eval_batches = batches
    return trainer.evaluate(params)["val_bits_per_byte"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="runs/hat_vs_transformer")
    p.add_argument("--chars", type=int, default=6000, help="characters per validation play")
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()

    docs = [d[: args.chars] for d in load_corpus("val")]
    trainers = {}
    for name in ("hat", "transformer"):
        out = Path(args.runs) / name
        trainer = Trainer(load_run_config(out, name, []), out)
        state = trainer.initial_state()
        if int(state.step) == 0:
            raise SystemExit(f"{out}: no trained checkpoint; run hat_vs_transformer.py first")
        trainers[name] = (trainer, state.params, int(state.step))
    rows = []
    for kind, fn in PERTURBATIONS.items():
        noisy = [fn(d, args.rate, np.random.default_rng(args.seed + i)) for i, d in enumerate(docs)]
        row = {"perturbation": kind, "bytes": sum(len(d.encode("utf-8")) for d in noisy)}
        for name, (trainer, params, _) in trainers.items():
            row[name] = eval_bits_per_byte(trainer, params, noisy, args.batch_size)
        rows.append(row)
        print(row, flush=True)
    clean = rows[0]
    for row in rows:
        for name in trainers:
            row[f"{name}_delta"] = row[name] - clean[name]
    steps = {name: s for name, (_, _, s) in trainers.items()}
    notes = (
        f"Checkpoints: `{args.runs}/{{hat,transformer}}` from `hat_vs_transformer.py` "
        f"(matched training FLOPs; steps {steps}). Text: the first {args.chars} characters of "
        f"each held-out play; perturbation rate {args.rate}, seed {args.seed}. Columns `hat`/"
        "`transformer`: bits/byte of the perturbed text; `*_delta`: increase over clean."
    )
    cols = ["perturbation", "bytes", "hat", "transformer", "hat_delta", "transformer_delta"]
    write_results(
        "hat_robustness",
        "Bits/byte under input perturbations: HAT vs byte transformer",
        {"args": vars(args), "train_steps": steps, "rows": rows},
        markdown_table(rows, cols),
        notes,
    )


if __name__ == "__main__":
    main()
