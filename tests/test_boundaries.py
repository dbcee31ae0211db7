"""`arjax.data.word_starts` (HAT word boundaries as arrays) against the host splitter
`split_word_bytes`: multilingual fixtures, random text (the strategies of test_splitter),
the code points at every edge of the property table in the exhaustive contexts (every code point
runs in test_splitter's slow exhaustive test), invalid UTF-8, special ids, ragged rows, bad input.

Checks can fail: dropping WB6/WB12's lookahead (``cls_r``, so "1\u20442" splits) or the WB3c
rule that a joined pictograph ends its segment (so "a\u200d\u24c2b" joins the b) each fails the
table-edge contexts ("0{}1", the pictograph-ZWJ context); both were tried.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st
from test_splitter import _TEXT, _TRICKY, CORPUS

from arjax.data import BOS_ID, EOS_ID, PAD_ID, split_word_bytes, split_words, word_starts
from arjax.data.boundaries import (
    PUNCT,
    char_props,
    char_props_reference,
    property_table,
    word_scan_init,
    word_scan_step,
)
from arjax.data.splitter import _as_unicode_16
from arjax.data.words import document_words


def host_starts(pieces) -> list[bool]:
    """Word-start flags of concatenated pieces (bytes or token tuples)."""
    return [j == 0 for piece in pieces for j in range(len(piece))]


def to_batch(rows: list[list[int]], width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ragged id rows -> (``[batch, width]`` PAD-filled, lengths); by default the width is 128 or
    2048 and the batch a multiple of 8 (padded with empty rows), so tests share compilations."""
    lengths = np.array([len(r) for r in rows], np.int32)
    if width is None:
        width = 128 if lengths.max(initial=0) <= 128 else 2048
        lengths = np.pad(lengths, (0, -len(rows) % 8))
    ids = np.full((len(lengths), width), PAD_ID, np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    return ids, lengths


def device_starts(rows, max_bytes, width=None) -> list[list[bool]]:
    ids, lengths = to_batch(rows, width)
    got = np.asarray(word_starts(ids, lengths, max_word_bytes=max_bytes))
    assert not got[np.arange(ids.shape[1])[None] >= lengths[:, None]].any(), "padding marked"
    return [got[i, :n].tolist() for i, n in zip(range(len(rows)), lengths)]


def assert_matches_host(texts: list[str], max_bytes: int, width=None) -> None:
    data = [t.encode("utf-8", "surrogatepass") for t in texts]
    got = device_starts([list(d) for d in data], max_bytes, width)
    for text, row in zip(texts, got):
        assert row == host_starts(split_word_bytes(text, max_bytes)), (text, max_bytes)


@pytest.mark.parametrize("max_bytes", [1, 4, 64])
def test_multilingual_fixtures_ragged_batch(max_bytes):
    assert_matches_host([*CORPUS, "\n".join(CORPUS)], max_bytes)


def test_documented_example():
    starts = device_starts([list(b"Hello, world!")], 4)
    assert starts == [host_starts([b"Hell", b"o,", b" wor", b"ld!"])]


@settings(max_examples=60, deadline=None)
@given(
    texts=st.lists(st.one_of(_TEXT, _TRICKY), min_size=4, max_size=4),
    max_bytes=st.sampled_from([1, 4, 64]),
)
def test_property_random_text_matches_host(texts, max_bytes):
    assert_matches_host(texts, max_bytes)


def _windows(text: str, width: int) -> list[str]:
    """From each character of ``text``: the longest run of whole characters that fits in
    ``width`` UTF-8 bytes."""
    out = []
    for i in range(len(text)):
        j = i
        while j < len(text) and len(text[i : j + 1].encode("utf-8", "surrogatepass")) <= width:
            j += 1
        out.append(text[i:j])
    return out


@pytest.mark.parametrize("max_bytes", [1, 4, 7, 32])
def test_short_rows_match_host(max_bytes):
    """Rows at most ``max_word_bytes + 1`` wide (the HAT decoder's word window) take the cut
    shortcut (`_short_row_cuts`, no binary lifting): every window of the fixtures at that width
    and one less, with a first word that exceeds the limit wherever one fits."""
    for width in (max_bytes + 1, max_bytes):
        texts = [w for text in CORPUS for w in _windows(text, width)]
        assert_matches_host(texts, max_bytes, width=width)


@settings(max_examples=30, deadline=None)
@given(texts=st.lists(st.one_of(_TEXT, _TRICKY), min_size=8, max_size=8))
def test_property_short_rows_match_host(texts):
    rows = [w for t in texts for w in _windows(t, 8)[:4]]
    assert_matches_host(rows + [""] * (32 - len(rows)), 7, width=8)  # one shape: one compile


# Lone surrogates are ordinary characters to the host path (encoded with surrogatepass).
_WITH_SURROGATES = st.text(alphabet=st.characters(), max_size=60)


@settings(max_examples=20, deadline=None)
@given(texts=st.lists(_WITH_SURROGATES, min_size=4, max_size=4), max_bytes=st.just(4))
def test_property_surrogates_match_host(texts, max_bytes):
    assert_matches_host(texts, max_bytes)


# The code points around every range edge of the property table (where a lookup slip would
# show), in the contexts of test_splitter's exhaustive test and a few more rules' contexts.
_CONTEXTS = [
    "a{}b", "0{}1", "a{}A", "\U0001f44d\u200d{}a", "{}", " {}.", "\u05d0{}\u05d0", "1{}\u0301,2",
    "\u30a2{}\u30a2", "\U0001f1e9{}\U0001f1ea", "_{}_", "a.{}",
]  # fmt: skip
_LINE_BREAKS = {0x0A, 0x0B, 0x0C, 0x0D, 0x85, 0x2028, 0x2029}


@pytest.mark.parametrize("context", _CONTEXTS)
def test_table_edges_in_contexts_match_host(context):
    starts, _ = property_table()
    edges = np.unique(np.clip(np.concatenate([starts, starts - 1]), 0, 0x10FFFF))
    edges = np.union1d(edges, [0x7F, 0x80, 0x7FF, 0x800, 0xFFFF, 0x10000, 0x10FFFF])
    cps = [int(c) for c in edges if int(c) not in _LINE_BREAKS]
    cps += [0x20] * (-len(cps) % 8192)  # one shape for every context
    lines = [context.format(chr(c)) for c in cps]
    text = "\n".join(lines)  # the host splits lines independently: one call for all
    flat = host_starts(split_word_bytes(text, 4))
    data = [line.encode("utf-8", "surrogatepass") for line in lines]
    got = device_starts([list(d) for d in data], 4, width=16)
    offset = 0
    for c, d, row in zip(cps, data, got):
        assert row == flat[offset : offset + len(d)], f"U+{c:04X} in {context!r}"
        offset += len(d) + 1


def test_char_props_equals_reference_on_every_code_point():
    """The two-level block lookup == binary search of the range table, and the table == the
    `regex` classes the host splitter matches with, on the ranges' first code points."""
    codes = jnp.arange(-2, 0x110000, dtype=jnp.int32)
    assert bool((char_props(codes) == char_props_reference(codes)).all())
    starts, props = property_table()
    for start, value in list(zip(starts, props))[::97]:
        char = chr(int(start))
        assert ((value & PUNCT) != 0) == bool(regex.match(r"\p{P}", _as_unicode_16(char)))


def test_special_ids_separate_documents():
    """[BOS] doc [EOS] [BOS] doc [EOS] in one row == `document_words` of each document."""
    docs = ["a:", "b c", '\u05d0"', "\u05d0 ,x", "\U0001f1e9", "\U0001f1ea\U0001f1e9"]
    words = [w for d in docs for w in document_words(d, 4)]
    row = [t for w in words for t in w]
    assert row.count(BOS_ID) == len(docs) and EOS_ID in row
    assert device_starts([row], 4) == [host_starts(words)]


def _decode_lenient(data: bytes) -> list[tuple[str, int]]:
    """(character, byte length) of each character as the module doc reads bytes: encoded
    surrogates pass, other ill-formed sequences are one U+FFFD per maximal subpart (the error
    span of Python's strict decoder), ``ED A0-BF`` being a cut-off surrogate."""
    out, i = [], 0
    while i < len(data):
        for size in (1, 2, 3, 4):
            try:
                char = data[i : i + size].decode("utf-8", "surrogatepass")
            except UnicodeDecodeError:
                continue
            if len(char) == 1:
                break
        else:
            char = "\ufffd"
            try:
                data[i : i + 4].decode("utf-8")
            except UnicodeDecodeError as e:
                size = e.end - e.start
            if data[i] == 0xED and 0xA0 <= data[i + 1 : i + 2].ljust(1, b"\0")[0] <= 0xBF:
                size = 2
        out.append((char, size))
        i += size
    return out


@settings(max_examples=50, deadline=None)
@given(
    data=st.lists(
        st.one_of(st.binary(max_size=6), st.sampled_from(["a", " ", "é", "€", "😀", "'", "1"])),
        max_size=20,
    )
)
def test_property_invalid_utf8_reads_as_replacement_characters(data):
    raw = b"".join(d if isinstance(d, bytes) else d.encode() for d in data)
    chars = _decode_lenient(raw)
    assert sum(size for _, size in chars) == len(raw)
    expected = [False] * len(raw)
    offset, char_index = 0, 0
    word_char_starts, pos = set(), 0
    for word in split_words("".join(c for c, _ in chars)):
        word_char_starts.add(pos)
        pos += len(word)
    for char_index, (_, size) in enumerate(chars):
        expected[offset] = char_index in word_char_starts
        offset += size
    assert device_starts([list(raw)], 64) == [expected]


def test_invalid_utf8_examples():
    # E2 82 is one cut-off character (a maximal subpart): " \ufffd" is one word; a lone
    # continuation byte is a character of its own; ED A0 80 is a surrogate
    got = device_starts([[0x20, 0xE2, 0x82, 0x41], [0x61, 0x80, 0x80], [0x61, 0xED, 0xA0, 0x80]], 4)
    assert got == [[True, False, False, True], [True, True, True], [True, True, False, False]]
    assert got[2] == host_starts(split_word_bytes("a\ud800", 4))


def test_padding_and_empty_rows():
    ids, lengths = to_batch([list(b"ab cd"), [], list(b"x")])
    ids[0, 5:] = ord("e")  # bytes past the length are ignored, whatever they are
    got = np.asarray(word_starts(ids, lengths, max_word_bytes=4))[:3, :8]
    assert got.tolist() == [
        [True, False, True, False, False, False, False, False],
        [False] * 8,
        [True] + [False] * 7,
    ]


def test_jittable_inside_a_caller():
    ids, lengths = to_batch([list("naïve café".encode())])

    @jax.jit
    def f(ids, lengths):
        return word_starts(ids, lengths, max_word_bytes=4).sum()

    assert int(f(ids, lengths)) == len(split_word_bytes("naïve café", 4))


@pytest.mark.parametrize(
    ("ids", "lengths", "max_bytes", "error", "match"),
    [
        (jnp.zeros((2, 4), jnp.float32), jnp.zeros(2, jnp.int32), 4, TypeError, "byte_ids"),
        (jnp.zeros(4, jnp.int32), jnp.zeros(1, jnp.int32), 4, ValueError, "byte_ids"),
        (jnp.zeros((2, 4), jnp.int32), jnp.zeros(3, jnp.int32), 4, ValueError, "lengths"),
        (jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 1), jnp.int32), 4, ValueError, "lengths"),
        (jnp.zeros((2, 4), jnp.int32), jnp.zeros(2, jnp.float32), 4, TypeError, "lengths"),
        (jnp.zeros((2, 4), jnp.int32), jnp.zeros(2, jnp.int32), 0, ValueError, "max_word"),
        (jnp.zeros((2, 4), jnp.int32), jnp.zeros(2, jnp.int32), True, TypeError, "max_word"),
        (jnp.zeros((2, 4), jnp.int32), jnp.zeros(2, jnp.int32), 2.0, TypeError, "max_word"),
    ],
)
def test_bad_input_raises_before_tracing(ids, lengths, max_bytes, error, match):
    with pytest.raises(error, match=match):
        word_starts(ids, lengths, max_word_bytes=max_bytes)


# --- incremental form ----------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=1)
def _scan(ids, max_bytes):
    """Feed ``ids`` ``[batch, len]`` one column per step -> final state, per-step outputs."""

    def body(state, column):
        return word_scan_step(state, column, max_word_bytes=max_bytes)

    return jax.lax.scan(body, word_scan_init(ids.shape[0]), ids.T)


def scanned_starts(ids: np.ndarray, max_bytes: int):
    """Flags the scanner decided ``[batch, len]``, how often each position was decided, the
    step that decided it, and the final state."""
    state, out = _scan(jnp.asarray(ids), max_bytes)
    first, count, starts = (np.asarray(x) for x in out)
    flags = np.zeros(ids.shape, bool)
    times = np.zeros(ids.shape, int)
    step_of = np.full(ids.shape, -1)
    for t, b in zip(*np.nonzero(count)):
        for k in range(count[t, b]):
            flags[b, first[t, b] + k] = (int(starts[t, b]) >> k) & 1
            times[b, first[t, b] + k] += 1
            step_of[b, first[t, b] + k] = t
    return flags, times, step_of, state


def assert_scan_matches(rows: list[list[int]], max_bytes: int) -> None:
    """Scanner over each row then one PAD (which decides what is held) == `word_starts`."""
    ids, lengths = to_batch([[*r, PAD_ID] for r in rows])
    expected = np.asarray(word_starts(ids, lengths - (lengths > 0), max_word_bytes=max_bytes))
    flags, times, _, state = scanned_starts(ids, max_bytes)
    assert not np.asarray(state.overflow).any()
    for i, row in enumerate(rows):
        n = len(row)
        assert (times[i, : n + 1] == 1).all(), f"row {i}: each position decided exactly once"
        assert flags[i, :n].tolist() == expected[i, :n].tolist(), (i, bytes(row))


def test_scan_equals_word_starts_on_fixtures():
    assert_scan_matches([list(t.encode()) for t in CORPUS], 4)


@settings(max_examples=40, deadline=None)
@given(
    texts=st.lists(st.one_of(_TEXT, _TRICKY, _WITH_SURROGATES), min_size=4, max_size=4),
    max_bytes=st.sampled_from([1, 4, 64]),
)
def test_property_scan_equals_word_starts(texts, max_bytes):
    assert_scan_matches([list(t.encode("utf-8", "surrogatepass")) for t in texts], max_bytes)


# what the scanner holds: U+2044 after a digit (WB12), white after a space, U+202F runs
_HELD_TEXTS = st.text(
    alphabet=st.sampled_from(list(" \t1a.\u2044\u0301\u200d\u202f\u05d0\"'") + ["\U0001f44d"]),
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.one_of(
            _HELD_TEXTS.map(lambda t: list(t.encode())),
            st.lists(
                st.sampled_from([0x80, 0xE2, 0x82, 0xED, 0xA0, 0xF0, 0x61, BOS_ID]), max_size=12
            ),
        ),
        min_size=4,
        max_size=4,
    ),
    max_bytes=st.sampled_from([1, 4, 64]),
)
def test_property_scan_held_cases_and_invalid_bytes(rows, max_bytes):
    assert_scan_matches(rows, max_bytes)


def test_scan_decides_as_soon_as_the_bytes_fix_it():
    rows = [list(b"ab cd"), list("1\u2044\u03012".encode()), list(" \t\u0301".encode())]
    ids, _ = to_batch(rows)
    _, _, step_of, _ = scanned_starts(ids, 64)
    assert step_of[0, :5].tolist() == [0, 1, 2, 3, 4]  # ASCII: each byte at once
    # U+2044 (bytes 1-3) and the mark (4-5) wait for the digit (byte 6): no word start there
    assert step_of[1, :7].tolist() == [0, 6, 6, 6, 6, 6, 6]
    # "\t" after " " waits for the next character: the mark joins it, so it is no word start
    assert step_of[2, :4].tolist() == [0, 3, 3, 3]


def test_scan_overflow_is_flagged():
    rows = [list(("1\u2044" + "\u0301" * 20 + "2").encode()), list(b"ok")]
    ids, _ = to_batch(rows)
    *_, state = scanned_starts(ids, 64)
    assert np.asarray(state.overflow)[:2].tolist() == [True, False]
