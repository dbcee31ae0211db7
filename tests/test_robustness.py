"""Perturbations (arjax.data.perturb) and the robustness scorer's rows (hat_robustness.py)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import regex

from arjax.data.corpus import load_corpus
from arjax.data.perturb import PERTURBATIONS, perturb
from arjax.train.config import make_run_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import hat_robustness as hr  # noqa: E402

TEXT = "Größere Fensterrahmen sind schön.\nThe quick brown fox  jumps over the lazy dog.\n"


def _letters(s: str) -> list[str]:
    return regex.findall(r"\p{L}", s)


def test_perturbations_values():
    for kind in PERTURBATIONS:
        assert perturb(TEXT, kind, 0.0, 1) == TEXT
        assert perturb(TEXT, kind, 0.3, 7) == perturb(TEXT, kind, 0.3, 7)  # seeded
    assert perturb(TEXT, "case", 1.0, 0) == TEXT.swapcase()
    assert _letters(perturb(TEXT, "drop", 1.0, 0)) == []
    assert perturb(TEXT, "drop", 1.0, 0) == regex.sub(r"\p{L}", "", TEXT)
    inserted = perturb(TEXT, "insert", 1.0, 0)
    assert _letters(inserted)[::2] == _letters(TEXT)  # every letter followed by a new one
    swapped = perturb(TEXT, "swap", 1.0, 0)
    assert Counter(swapped) == Counter(TEXT) and swapped != TEXT
    assert all(len(a) == len(b) for a, b in zip(swapped.split(), TEXT.split()))
    ws = perturb(TEXT, "whitespace", 1.0, 0)
    assert regex.sub(r"\s", "", ws) == regex.sub(r"\s", "", TEXT) and ws != TEXT
    # rate scales the noise: about rate x letters dropped
    long = " ".join(load_corpus("val"))[:20000]
    dropped = len(_letters(long)) - len(_letters(perturb(long, "drop", 0.1, 3)))
    assert 0.08 < dropped / len(_letters(long)) < 0.12
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb(TEXT, "shout", 0.1, 0)


def test_pairs_are_consecutive_and_end_at_lines():
    docs = [d[:3000] for d in load_corpus("val")]
    pairs = hr.context_target_pairs(docs, 120, 60, max_pairs=12)
    assert len(pairs) == 12
    for ctx, tgt in pairs:
        assert ctx.endswith("\n") and len(ctx.encode()) >= 120
        assert any(ctx + tgt in d for d in docs)
        assert 30 <= len(tgt.encode()) <= 60


@pytest.mark.parametrize("family", ["transformer", "bpe", "hat"])
def test_rows_score_exactly_the_continuation(family, tmp_path):
    """The targets the loss mask keeps are the continuation's bytes (tokens), each once; a
    context too long for the row keeps its newest part."""
    long_ctx = "".join(f"w{i} " for i in range(60)) + "\n"  # > 96 bytes: trimmed
    pairs = [("Ärger im Haus,\nund dann\n", " ging sie. Schön!"), ("", "noisy text only."),
             (long_ctx, "tail text")]  # fmt: skip
    overrides = ["data.seq_len=96", "model.max_seq_len=128"]
    tok = None
    if family == "bpe":
        pytest.importorskip("tokenizers")
        from arjax.data.bpe import train_bpe

        tok = train_bpe([load_corpus("train")[0][:20000]], 300, tmp_path / "t.json")
        overrides.append(f"data.tokenizer={tmp_path / 't.json'}")
    name = "hat" if family == "hat" else "transformer"
    if family == "hat":
        overrides = ["data.seq_len=96", "model.max_seq_len=96", "model.max_words=48"]
    cfg = make_run_config(name, "tiny", overrides)
    rows = hr.scored_rows(cfg, pairs)
    decode = tok.decode if tok else (lambda ids: bytes(ids.tolist()).decode())
    for i, (ctx, tgt) in enumerate(pairs):
        mask = rows["loss_mask"][i] > 0
        kept_ctx = int(np.argmax(mask))  # context tokens before the first scored target
        assert decode(rows["targets"][i][mask]) == tgt
        assert ctx.endswith(decode(rows["inputs"][i][1 : 1 + kept_ctx]))
        assert (decode(rows["inputs"][i][1 : 1 + kept_ctx]) == ctx) == (i < 2)
        if tok is not None:
            assert int(rows["target_bytes"][i].sum()) == len(tgt.encode())
