"""The HAT decoder's word split, one byte at a time on device (:func:`split_window`, what the
generation engine runs at every step), equals its host rule (:func:`append_byte`: the text up to
an unfinished UTF-8 character split by :func:`split_word_bytes`), byte by byte, over many texts
at once: code points in contexts where the word-break rules act (letters, digits, spaces, the
fraction slash, combining marks, regional indicators, ZWJ sequences, white space), the
multilingual fixtures, and a small ``max_word_bytes`` where words are cut."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arjax.generate.hat import (
    append_byte,
    current_word_start,
    keep_from,
    split_window,
    window_append,
)

CONTEXTS = ("a{}b", "0{}1", " {}x", "1\u2044{}2", "{}\u0301a", "\U0001f1e9\U0001f1ea{}", "  {}\t")
MULTILINGUAL = (
    "Grüße, 日本語 🙂👍🏽 x", "ROMEO. Hel", "naïve café\u0301", "١٢٣ كلمة", "한국어 텍스트",
    "👨\u200d👩\u200d👧 family", "1\u20442 and 3\u2044x", "tab\t\tand  spaces \u3000x",
)  # fmt: skip


def _code_points() -> list[int]:
    """Latin-1 and Latin Extended-A whole; general punctuation, combining marks, regional
    indicators, skin tones and ZWJ whole; every 997th scalar value elsewhere."""
    ranges = [(0x20, 0x180), (0x300, 0x370), (0x2000, 0x2070), (0x1F1E6, 0x1F200),
              (0x1F3FB, 0x1F400), (0x200D, 0x200E)]  # fmt: skip
    picked = {cp for lo, hi in ranges for cp in range(lo, hi)}
    picked |= set(range(0x180, 0x110000, 997))
    breaks = {0x85, 0x2028, 0x2029}
    return sorted(cp for cp in picked if not 0xD800 <= cp < 0xE000 and cp not in breaks)


def host_starts(data: bytes, max_word_bytes: int) -> list[list[int]]:
    """Per byte of ``data``: the word starts in the current word + that byte (host rule)."""
    current, out = b"", []
    for byte in data:
        pieces = append_byte(current, byte, max_word_bytes)
        out.append(np.cumsum([0] + [len(p) for p in pieces[:-1]]).tolist())
        current = pieces[-1]
    return out


@functools.partial(jax.jit, static_argnames="max_word_bytes")
def _device_step(window, n, byte, active, *, max_word_bytes):
    """The engine's steps 1-2 for a batch (its own functions): append ``byte`` to each active
    row's window, split it, keep the current (last) word. The starts and the new window."""
    window, n = window_append(window, n, byte, active), n + active
    starts = split_window(window, n, max_word_bytes) & active[:, None]
    begin = current_word_start(starts)
    return starts, keep_from(window, begin, n), n - begin


def device_starts(texts: list[bytes], max_word_bytes: int) -> list[list[list[int]]]:
    """Per text, per byte: the word starts ``split_window`` gives (all texts in one batch)."""
    longest = max(len(t) for t in texts)
    data = np.zeros((len(texts), longest), np.int32)
    for r, t in enumerate(texts):
        data[r, : len(t)] = np.frombuffer(t, np.uint8)
    lengths = np.array([len(t) for t in texts])
    window = jnp.zeros((len(texts), max_word_bytes + 1), jnp.int32)
    n = jnp.zeros(len(texts), jnp.int32)
    out: list[list[list[int]]] = [[] for _ in texts]
    for step in range(longest):
        active = jnp.asarray(step < lengths)
        starts, window, n = _device_step(
            window, n, jnp.asarray(data[:, step]), active, max_word_bytes=max_word_bytes
        )
        starts = np.asarray(starts)
        for r in np.flatnonzero(step < lengths):
            out[r].append(np.flatnonzero(starts[r]).tolist())
    return out


@pytest.mark.parametrize("max_word_bytes", [32, 5])
def test_split_window_equals_the_host_rule_byte_by_byte(max_word_bytes):
    texts = [c.format(chr(cp)).encode() for c in CONTEXTS for cp in _code_points()]
    texts += [t.encode() for t in MULTILINGUAL]
    got = device_starts(texts, max_word_bytes)
    for text, steps in zip(texts, got):
        want = host_starts(text, max_word_bytes)
        assert steps == want, f"{text!r} (max_word_bytes={max_word_bytes})"
