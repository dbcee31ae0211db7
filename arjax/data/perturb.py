"""Seeded character-level perturbations of text, for robustness evaluations.

Neitemeier et al. 2025 (HAT), Sec. 4.3, test robustness to intra-word noise. Each
perturbation is ``fn(text, rate, rng) -> text``; ``rate`` is the probability per letter (per
word for ``swap``, per whitespace run for ``whitespace``), so the expected amount of noise
grows linearly with it:

- ``swap``: in a word of >= 2 letters, two adjacent letters exchanged;
- ``drop``: a letter deleted;
- ``insert``: a random lower-case ASCII letter inserted after a letter;
- ``case``: a letter's case flipped;
- ``whitespace``: a whitespace run doubled, or (half of the time) replaced by nothing
  inside a line (two words glued) -- tokenizers and word splitters see other units.

Letters are Unicode letters (``\\p{L}``), so German umlauts and ß are perturbed too. The same
``(text, kind, rate, seed)`` always gives the same output (:func:`perturb`).
"""

from __future__ import annotations

import string
from collections.abc import Callable

import numpy as np
import regex

_LETTER = regex.compile(r"\p{L}")
_WORD = regex.compile(r"\p{L}{2,}")
_SPACE = regex.compile(r"[ \t]+|\n")
_ASCII = string.ascii_lowercase


def swap(text: str, rate: float, rng: np.random.Generator) -> str:
    """Swap two adjacent letters inside each word of >= 2 letters with probability ``rate``."""

    def one(m: regex.Match) -> str:
        w = m.group()
        if rng.random() >= rate:
            return w
        i = int(rng.integers(len(w) - 1))
        return w[:i] + w[i + 1] + w[i] + w[i + 2 :]

    return _WORD.sub(one, text)


def drop(text: str, rate: float, rng: np.random.Generator) -> str:
    """Delete each letter with probability ``rate``."""
    return _LETTER.sub(lambda m: "" if rng.random() < rate else m.group(), text)


def insert(text: str, rate: float, rng: np.random.Generator) -> str:
    """After each letter, with probability ``rate``, insert a random ASCII lower-case letter."""

    def one(m: regex.Match) -> str:
        return m.group() + (_ASCII[int(rng.integers(26))] if rng.random() < rate else "")

    return _LETTER.sub(one, text)


def flip_case(text: str, rate: float, rng: np.random.Generator) -> str:
    """Flip the case of each letter with probability ``rate``."""
    return _LETTER.sub(lambda m: m.group().swapcase() if rng.random() < rate else m.group(), text)


def whitespace(text: str, rate: float, rng: np.random.Generator) -> str:
    """With probability ``rate`` per whitespace run: double it, or (half of those times, and
    only for spaces/tabs) remove it. Newlines are only ever doubled."""

    def one(m: regex.Match) -> str:
        s = m.group()
        if rng.random() >= rate:
            return s
        return "" if s != "\n" and rng.random() < 0.5 else s + s

    return _SPACE.sub(one, text)


PERTURBATIONS: dict[str, Callable[[str, float, np.random.Generator], str]] = {
    "swap": swap,
    "drop": drop,
    "insert": insert,
    "case": flip_case,
    "whitespace": whitespace,
}


def perturb(text: str, kind: str, rate: float, seed: int) -> str:
    """``text`` under perturbation ``kind`` at ``rate`` with a generator seeded by ``seed``."""
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {kind!r}; known: {', '.join(PERTURBATIONS)}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    return PERTURBATIONS[kind](text, rate, np.random.default_rng(seed))
