"""HAT word boundaries as arrays, on device (Neitemeier et al., 2025, Sec. 2.1).

`word_starts` marks where `split_word_bytes` starts a word, for a batch of UTF-8 byte rows, in
jittable jnp: UTF-8 decoding, the Unicode 16 properties of `splitter` as one sorted range table
(`property_table`, searched with ``jnp.searchsorted``), and the splitter rule written as
boundary rules over neighbouring characters (below). It is the host splitter's rule, not a call
back into it; tests check the two agree on every code point in several contexts, on random and
multilingual text, for every ``max_word_bytes``.

The rule at a character ``i`` (byte arrays; a character is looked at through its first byte):

* UAX #29 segments: no break inside CR LF, around a line break (CR, LF, Newline) always a
  break; no break before Extend/Format/ZWJ (WB4) nor between ZWJ and an Extended_Pictographic
  character (WB3c), nor between two raw-adjacent WSegSpace (WB3d); otherwise the pair rules
  WB5-WB16 look at ``q``, the last character before ``i`` that is not Extend/Format/ZWJ, at
  ``q``'s own ``q`` (WB7, WB7c, WB11) and at ``r``, the first such character after ``i``
  (WB6, WB7b, WB12: one character of lookahead past any Extend/Format/ZWJ). As in the
  reference, a pictograph joined by WB3c ends its segment: in the ``q`` role it is "Other".
* pieces: a segment is also cut after punctuation (P*) and between Ll and a following Lu;
* words: a piece starts a word unless it is a "word" piece after a single-space piece or a
  single punctuation character after a piece that is not whitespace (`splitter` module doc);
* ``max_word_bytes``: longer words are cut greedily at the last character start that fits
  (inside a character only when none fits), by pointer doubling over "where does a piece
  starting here end".

Byte ids outside ``[0, 256)`` (PAD/BOS/EOS) are words of one token of their own and separate
the text around them like document boundaries (as `arjax.data.words.document_words` puts BOS
and EOS around each document's words). Invalid UTF-8: encoded surrogates (``ED A0-BF 80-BF``)
are characters (``surrogatepass``, like `split_word_bytes` on text with lone surrogates); any
other ill-formed sequence counts as one U+FFFD per maximal subpart (Unicode Sec. 3.9; what
``bytes.decode("utf-8", "replace")`` shows), so every byte belongs to exactly one character.
The host path never sees such bytes (`arjax.data.words.bytes_to_words` rejects them).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import regex
from jax import lax

from . import splitter as _sp

# Word_Break classes as table codes (Format behaves as Extend everywhere in the rule);
# BARRIER: a special token, padding, or "no character" (before the row start / after its end).
(OTHER, CR, LF, NEWLINE, EXTEND, ZWJ, RI, KATAKANA, HEBREW, ALETTER, SINGLE_QUOTE,
 DOUBLE_QUOTE, MID_NUM_LET, MID_LETTER, MID_NUM, NUMERIC, EXTEND_NUM_LET, WSEG_SPACE,
 BARRIER) = range(19)  # fmt: skip
_WB_VALUES = {
    "Other": OTHER, "CR": CR, "LF": LF, "Newline": NEWLINE, "Extend": EXTEND, "Format": EXTEND,
    "ZWJ": ZWJ, "Regional_Indicator": RI, "Katakana": KATAKANA, "Hebrew_Letter": HEBREW,
    "ALetter": ALETTER, "Single_Quote": SINGLE_QUOTE, "Double_Quote": DOUBLE_QUOTE,
    "MidNumLet": MID_NUM_LET, "MidLetter": MID_LETTER, "MidNum": MID_NUM, "Numeric": NUMERIC,
    "ExtendNumLet": EXTEND_NUM_LET, "WSegSpace": WSEG_SPACE,
}  # fmt: skip
_CLASS_BITS = 31  # props & _CLASS_BITS = Word_Break class; flags above it
EXT_PICT, PUNCT, LOWER, UPPER, WHITE = (1 << k for k in range(5, 10))
_MAX_CODE_POINT = 0x10FFFF


@functools.lru_cache(maxsize=1)
def property_table() -> tuple[np.ndarray, np.ndarray]:
    """The splitter's Unicode 16 view as ranges: ``(starts, props)``, int32 ``[num_ranges]``;
    code point ``c`` has ``props[searchsorted(starts, c, "right") - 1]`` (Word_Break class code
    | `EXT_PICT` | `PUNCT` (P*) | `LOWER` (Ll) | `UPPER` (Lu) | `WHITE` (``\\s``)).

    Derived from the very patterns and tables `splitter` matches with (``regex`` properties of
    each character's Unicode 16 stand-in, `splitter._EXT_PICT_RANGES`), so the two paths share
    one source; every code point gets exactly one Word_Break class (checked)."""
    view = np.arange(_MAX_CODE_POINT + 1, dtype=np.uint32)
    for lo, hi in _sp.outside_unicode_16():
        view[lo : hi + 1] = ord(_sp._UNASSIGNED)
    for char, stand_in in _sp._CHANGED_SINCE_16.items():
        view[ord(char)] = ord(stand_in)
    text = view.tobytes().decode("utf-32-le", "surrogatepass")  # every code point, as split
    props = np.zeros(len(view), np.int32)
    num_classes = np.zeros(len(view), np.int32)
    patterns = [(_sp._wb(name), code, True) for name, code in _WB_VALUES.items()]
    patterns += [(r"\p{P}", PUNCT, False), (r"\p{Ll}", LOWER, False)]
    patterns += [(r"\p{Lu}", UPPER, False), (_sp._WHITE_RE.pattern[:-1], WHITE, False)]
    for pattern, value, is_class in patterns:
        for m in regex.finditer(f"(?:{pattern})+", text):
            props[m.start() : m.end()] |= value
            num_classes[m.start() : m.end()] += is_class
    if not (num_classes == 1).all():
        raise AssertionError("Word_Break classes do not partition the code points")
    for lo, hi in _sp._parse_ranges(_sp._EXT_PICT_RANGES):
        if not (view[lo : hi + 1] == np.arange(lo, hi + 1)).all():
            raise AssertionError("an Extended_Pictographic range has stand-ins")
        props[lo : hi + 1] |= EXT_PICT
    starts = np.flatnonzero(np.diff(props, prepend=-1)).astype(np.int32)
    return starts, props[starts]


def _shift(x: jax.Array, k: int, fill) -> jax.Array:
    """``x[:, i - k]`` (``fill`` outside); ``k < 0`` looks ahead. ``x``: ``[batch, len]``."""
    n = x.shape[1]
    if abs(k) >= n:
        return jnp.full_like(x, fill)
    if k >= 0:
        return jnp.pad(x[:, : n - k], ((0, 0), (k, 0)), constant_values=fill)
    return jnp.pad(x[:, -k:], ((0, 0), (0, -k)), constant_values=fill)


def _first_after(mask: jax.Array) -> jax.Array:
    """Index of the first True strictly after each position, ``len`` if none. ``[batch, len]``."""
    n = mask.shape[1]
    idx = jnp.arange(n, dtype=jnp.int32)
    return _shift(lax.cummin(jnp.where(mask, idx, n), axis=1, reverse=True), -1, n)


_CHAR_BYTES = 4  # the most bytes a character (or an ill-formed subpart) of UTF-8 spans


def _char_near(first: jax.Array, value: jax.Array, fill, *, reverse: bool = False):
    """``value`` at the nearest character start (``first``) strictly before each position (the
    nearest strictly after with ``reverse``), ``fill`` if none: a character spans at most 4
    bytes, so that start is at most 4 away (elementwise, where :func:`_fill` scans the row)."""
    out = jnp.full_like(value, fill)
    for k in range(_CHAR_BYTES, 0, -1):  # the nearest start last
        d = -k if reverse else k
        out = jnp.where(_shift(first, d, False), _shift(value, d, fill), out)
    return out


def _fill(mask: jax.Array, value: jax.Array, bits: int, fill, *, reverse: bool = False):
    """``value`` (``bits`` wide) at the last True of ``mask`` strictly before each position (the
    first strictly after with ``reverse``), ``fill`` if none: one cummax/cummin of position and
    value packed into an int32 (rows up to `MAX_LEN` bytes), no gather."""
    n = mask.shape[1]
    key = (jnp.arange(n, dtype=jnp.int32) << bits) | value
    if reverse:
        none = jnp.iinfo(jnp.int32).max
        key = _shift(lax.cummin(jnp.where(mask, key, none), axis=1, reverse=True), -1, none)
    else:
        none = -1
        key = _shift(lax.cummax(jnp.where(mask, key, none), axis=1), 1, none)
    return jnp.where(key == none, fill, key & ((1 << bits) - 1))


def _in(x: jax.Array, *codes: int) -> jax.Array:
    return functools.reduce(jnp.logical_or, [x == c for c in codes])


def decode_utf8(byte_ids: jax.Array, lengths: jax.Array) -> tuple[jax.Array, ...]:
    """Characters of byte rows ``[batch, len]``: ``(first, code_point, barrier)``, each
    ``[batch, len]``: whether a byte starts a character, its code point there (U+FFFD for an
    ill-formed maximal subpart, a surrogate for ``ED A0-BF 80-BF``), and whether the position is
    a special id or padding (a one-position "character" that joins nothing)."""
    n = byte_ids.shape[1]
    idx = jnp.arange(n, dtype=jnp.int32)[None]
    b = byte_ids.astype(jnp.int32)
    barrier = (idx >= lengths[:, None]) | (b < 0) | (b > 255)
    b = jnp.where(barrier, -1, b)
    b1, b2, b3 = (_shift(b, -k, -1) for k in (1, 2, 3))

    def cont(x):
        return (x >= 0x80) & (x <= 0xBF)

    size = jnp.select([b < 0x80, b < 0xC2, b < 0xE0, b < 0xF0, b < 0xF5], [1, 0, 2, 3, 4], 0)
    lo2 = jnp.select([b == 0xE0, b == 0xF0], [0xA0, 0x90], 0x80)
    hi2 = jnp.where(b == 0xF4, 0x8F, 0xBF)
    ok1 = (size >= 2) & (b1 >= lo2) & (b1 <= hi2)
    ok2 = ok1 & (size >= 3) & cont(b2)
    ok3 = ok2 & (size >= 4) & cont(b3)
    valid = (size == 1) | ((size == 2) & ok1) | ((size == 3) & ok2) | ((size == 4) & ok3)
    span = jnp.where(valid, size, 1 + ok1.astype(jnp.int32) + ok2 + ok3)  # bytes of the char
    lead = ~cont(b)  # every non-continuation byte (and barrier) starts a character
    # a continuation byte no lead's character covers (a lead 1-3 bytes back spanning past it)
    covered = functools.reduce(
        jnp.logical_or, [_shift(lead & (span > k), k, False) for k in range(1, _CHAR_BYTES)]
    )
    first = lead | ~covered
    c1, c2, c3 = b1 & 0x3F, b2 & 0x3F, b3 & 0x3F
    code = jnp.select(
        [size == 1, size == 2, size == 3],
        [b, ((b & 0x1F) << 6) | c1, ((b & 0x0F) << 12) | (c1 << 6) | c2],
        ((b & 0x07) << 18) | (c1 << 12) | (c2 << 6) | c3,
    )
    code = jnp.where(valid, code, 0xFFFD)
    return first, jnp.where(barrier, -1, code), barrier


@functools.lru_cache(maxsize=1)
def _block_tables() -> tuple[np.ndarray, np.ndarray]:
    """`property_table` as a two-level lookup: ``blocks[block_of[c >> 8], c & 255]``, with the
    distinct 256-code-point blocks stored once."""
    starts, props = property_table()
    every = np.repeat(props, np.diff(np.append(starts, _MAX_CODE_POINT + 1)))
    index: dict[bytes, int] = {}
    block_of = [index.setdefault(row.tobytes(), len(index)) for row in every.reshape(-1, 256)]
    blocks = np.stack([np.frombuffer(row, every.dtype) for row in index])
    return np.asarray(block_of, np.int32), blocks


def char_props(code_point: jax.Array) -> jax.Array:
    """`property_table` entry of each code point (any shape, int32); negative -> `BARRIER`. Two
    gathers (`_block_tables`), equal to `char_props_reference` (tested on every code point)."""
    block_of, blocks = (jnp.asarray(t) for t in _block_tables())
    c = jnp.clip(code_point, 0, _MAX_CODE_POINT)
    return jnp.where(code_point < 0, BARRIER, blocks[block_of[c >> 8], c & 255])


def char_props_reference(code_point: jax.Array) -> jax.Array:
    """`char_props` by binary search of the range table (``jnp.searchsorted``)."""
    starts, props = (jnp.asarray(t) for t in property_table())
    row = jnp.searchsorted(starts, jnp.maximum(code_point, 0), side="right") - 1
    return jnp.where(code_point < 0, BARRIER, props[row])


_AHLETTER = (ALETTER, HEBREW)
_MID_LETTER = (MID_LETTER, MID_NUM_LET, SINGLE_QUOTE)
_MID_NUM = (MID_NUM, MID_NUM_LET, SINGLE_QUOTE)


def segment_join(cls_p, cls_i, eff_q, eff_qq, cls_r, ep_i, ri_odd) -> jax.Array:
    """No UAX #29 break before character ``i`` (as the splitter's segment regex): ``cls_p`` raw
    previous class, ``cls_i`` its own, ``eff_q`` / ``eff_qq`` the classes of the previous
    (and the one before) non-Extend/Format/ZWJ characters with WB3c pictographs as Other,
    ``cls_r`` the next such character's class, ``ep_i`` Extended_Pictographic, ``ri_odd``:
    an odd number of regional indicators since the last other character (any shapes)."""
    newline = _in(cls_p, CR, LF, NEWLINE, BARRIER) | _in(cls_i, CR, LF, NEWLINE)
    alnum_q, alnum_i = _in(eff_q, *_AHLETTER, NUMERIC), _in(cls_i, *_AHLETTER, NUMERIC)
    pair = (
        (alnum_q & alnum_i)  # WB5, WB8-10
        | (_in(eff_q, *_AHLETTER) & _in(cls_i, *_MID_LETTER) & _in(cls_r, *_AHLETTER))  # WB6
        | (_in(eff_qq, *_AHLETTER) & _in(eff_q, *_MID_LETTER) & _in(cls_i, *_AHLETTER))  # WB7
        | ((eff_q == HEBREW) & (cls_i == SINGLE_QUOTE))  # WB7a
        | ((eff_q == HEBREW) & (cls_i == DOUBLE_QUOTE) & (cls_r == HEBREW))  # WB7b
        | ((eff_qq == HEBREW) & (eff_q == DOUBLE_QUOTE) & (cls_i == HEBREW))  # WB7c
        | ((eff_qq == NUMERIC) & _in(eff_q, *_MID_NUM) & (cls_i == NUMERIC))  # WB11
        | ((eff_q == NUMERIC) & _in(cls_i, *_MID_NUM) & (cls_r == NUMERIC))  # WB12
        | ((eff_q == KATAKANA) & (cls_i == KATAKANA))  # WB13
        | ((alnum_q | _in(eff_q, KATAKANA, EXTEND_NUM_LET)) & (cls_i == EXTEND_NUM_LET))  # 13a
        | ((eff_q == EXTEND_NUM_LET) & (alnum_i | (cls_i == KATAKANA)))  # WB13b
        | ((eff_q == RI) & (cls_i == RI) & ri_odd)  # WB15-16
    )
    inner = (
        _in(cls_i, EXTEND, ZWJ)  # WB4
        | (ep_i & (cls_p == ZWJ))  # WB3c
        | ((cls_p == WSEG_SPACE) & (cls_i == WSEG_SPACE))  # WB3d
        | pair
    )
    return ((cls_p == CR) & (cls_i == LF)) | (~newline & inner)


# Piece kinds (splitter step 2); NO_PIECE: before the row start. Barriers count as WHITE:
# nothing attaches to them and they attach to nothing.
NO_PIECE, SPACE_PIECE, WHITE_PIECE, PUNCT_PIECE, WORD_PIECE = range(5)


def attaches(kind: jax.Array, prev_kind: jax.Array) -> jax.Array:
    """Whether a piece joins the previous piece's word (splitter step 3)."""
    return ((kind == WORD_PIECE) & (prev_kind == SPACE_PIECE)) | (
        (kind == PUNCT_PIECE) & (prev_kind != WHITE_PIECE) & (prev_kind != NO_PIECE)
    )


MAX_LEN = 1 << 20  # bytes per row (`_fill` packs a position and 10 bits into an int32)
_PROP_BITS = 10


def _word_starts(byte_ids: jax.Array, lengths: jax.Array, max_word_bytes: int) -> jax.Array:
    batch, n = byte_ids.shape
    idx = jnp.arange(n, dtype=jnp.int32)[None]
    first, code, barrier = decode_utf8(byte_ids, lengths)
    props = jnp.where(first & ~barrier, char_props(code), BARRIER)
    cls = props & _CLASS_BITS
    ep, punct, white, upper = ((props & f) != 0 for f in (EXT_PICT, PUNCT, WHITE, UPPER))

    # UAX #29 segments
    ignorable = first & _in(cls, EXTEND, ZWJ)
    props_p = _char_near(first, props, BARRIER)  # the previous character's
    cls_p = props_p & _CLASS_BITS
    eff = jnp.where(ep & (cls_p == ZWJ), OTHER, cls)  # a WB3c pictograph ends its segment
    solid = first & ~ignorable
    eff_q = _fill(solid, eff, 5, BARRIER)
    ri = first & (cls == RI)
    ri_parity = jnp.cumsum(ri, axis=1, dtype=jnp.int32) & 1
    ri_run_parity = _fill(solid & ~ri, ri_parity, 1, 0)
    join = segment_join(
        cls_p, cls, eff_q, _fill(solid, eff_q, 5, BARRIER), _fill(solid, cls, 5, BARRIER,
        reverse=True), ep, (ri_parity ^ ri ^ ri_run_parity) == 1,
    )  # fmt: skip

    # pieces and words
    cut = ((props_p & PUNCT) != 0) | (((props_p & LOWER) != 0) & upper)
    piece = first & (barrier | ~join | cut)
    piece_end = _first_after(piece)
    next_nonwhite = lax.cummin(jnp.where(first & ~white, idx, n), axis=1, reverse=True)
    single = piece_end == _char_near(first, jnp.broadcast_to(idx, first.shape), n, reverse=True)
    kind = jnp.select(
        [barrier, single & (code == 0x20), next_nonwhite >= piece_end, single & punct],
        [WHITE_PIECE, SPACE_PIECE, WHITE_PIECE, PUNCT_PIECE],
        WORD_PIECE,
    )
    word = piece & ~attaches(kind, _fill(piece, kind, 3, NO_PIECE))
    if n <= max_word_bytes + 1:
        return _short_row_cuts(word | barrier, first, lengths, max_word_bytes)

    # max_word_bytes: greedy cuts. A piece starting at j ends at next_end[j]; the piece starts
    # are the orbit of position 0, found for all positions at once by binary lifting.
    ends = _first_after(word | barrier)
    limit = idx + max_word_bytes
    last_first = _shift(lax.cummax(jnp.where(first, idx, -1), axis=1), -max_word_bytes, n)
    next_end = jnp.where(ends <= limit, ends, jnp.where(last_first > idx, last_first, limit))
    table = jnp.pad(jnp.minimum(next_end, n), ((0, 0), (0, 1)), constant_values=n)
    offset = jnp.arange(batch, dtype=jnp.int32)[:, None] * (n + 1)
    jumps = [(table + offset).reshape(-1)]  # flat [batch * (len + 1)]: 1-d gathers
    while (1 << len(jumps)) <= n:
        jumps.append(jumps[-1][jumps[-1]])
    cur = jnp.broadcast_to(offset, (batch, n))
    for flat in reversed(jumps):
        step = flat[cur]
        cur = jnp.where(step - offset <= idx, step, cur)
    return (cur - offset == idx) & (idx < lengths[:, None])


def _short_row_cuts(
    starts: jax.Array, first: jax.Array, lengths: jax.Array, max_word_bytes: int
) -> jax.Array:
    """The greedy ``max_word_bytes`` cuts of rows at most ``max_word_bytes + 1`` bytes wide
    (the HAT decoder's current-word window), ``starts``: the word and barrier starts before the
    cuts. A word that starts after position 0 fits, so only a first word spanning a full row
    is cut, once, at its last character start within the limit (inside the character if there
    is none): elementwise and two row reductions, no binary lifting."""
    n = starts.shape[1]
    idx = jnp.arange(n, dtype=jnp.int32)[None]
    starts = starts | (idx == 0)
    if n == max_word_bytes + 1:
        whole = ~jnp.any(starts & (idx > 0), axis=1, keepdims=True)  # [batch, 1]
        last = jnp.max(jnp.where(first, idx, 0), axis=1, keepdims=True)
        starts = starts | (whole & (idx == jnp.where(last > 0, last, max_word_bytes)))
    return starts & (idx < lengths[:, None])


_word_starts_jit = jax.jit(_word_starts, static_argnums=2)


def word_starts(byte_ids: jax.Array, lengths: jax.Array, *, max_word_bytes: int) -> jax.Array:
    """Where HAT words start: ``bool[batch, len]``, True exactly at the first byte of each
    piece of ``split_word_bytes(text, max_word_bytes)`` of each row (Sec. 2.1).

    ``byte_ids``: int ``[batch, len]``, UTF-8 bytes of row ``b`` in ``[:lengths[b]]``;
    positions at or past ``lengths[b]`` are padding (False). Ids outside ``[0, 256)`` are
    one-token words that separate the text around them (documents); invalid UTF-8 is read as
    the module doc says. Jittable (``max_word_bytes`` is static); shapes and dtypes are checked
    here, before tracing.
    """
    for name, x, rank in (("byte_ids", byte_ids, 2), ("lengths", lengths, 1)):
        if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"{name}: expected an integer array, got {getattr(x, 'dtype', x)!r}")
        if x.ndim != rank:
            raise ValueError(f"{name}: expected rank {rank}, got shape {tuple(x.shape)}")
    if lengths.shape[0] != byte_ids.shape[0]:
        raise ValueError(
            f"lengths: expected shape ({byte_ids.shape[0]},) for byte_ids of shape "
            f"{tuple(byte_ids.shape)}, got {tuple(lengths.shape)}"
        )
    if isinstance(max_word_bytes, bool) or not isinstance(max_word_bytes, int):
        raise TypeError(f"max_word_bytes: expected a positive int, got {max_word_bytes!r}")
    if max_word_bytes < 1:
        raise ValueError(f"max_word_bytes: must be positive, got {max_word_bytes}")
    if byte_ids.shape[1] > MAX_LEN:
        raise ValueError(f"byte_ids: rows of at most {MAX_LEN} bytes, got {byte_ids.shape[1]}")
    if byte_ids.shape[1] == 0:
        return jnp.zeros(byte_ids.shape, bool)
    return _word_starts_jit(byte_ids, lengths, max_word_bytes)


# ---------------------------------------------------------------------------------------------
# Incremental form: one byte at a time, for generation.


class WordScanState(NamedTuple):
    """Per-row scanner state (every field ``[batch]``); start from `word_scan_init`.

    Decided positions are ``[0, frontier)``; the scanner holds ``[frontier, pos)``: a character
    still being decoded, and at most one *pending* word start at ``frontier`` whose value waits
    for a later character (see `word_scan_step`), with the greedy ``max_word_bytes`` cuts of the
    held bytes under both of its values (``mask_*`` bit ``k`` is position ``frontier + k``).
    """

    pos: jax.Array  # bytes consumed
    char_start: jax.Array  # first byte of the character being decoded, -1 if none
    char_len: jax.Array  # its bytes so far
    char_size: jax.Array  # its size if well-formed (1-4; 0: an invalid lead byte)
    char_lead: jax.Array  # its first byte
    char_code: jax.Array  # its code point bits so far
    props_p: jax.Array  # `property_table` entry of the last character (BARRIER at the start)
    eff_q: jax.Array  # class of the last non-Extend/Format/ZWJ character (WB3c pictograph: Other)
    eff_qq: jax.Array  # the same for the one before it
    ri_odd: jax.Array  # an odd number of regional indicators since the last other character
    piece_chars: jax.Array  # characters in the current piece (capped at 2)
    piece_first: jax.Array  # props of its first character | 1 << 15 if it is " "
    piece_white: jax.Array  # all its characters are white space
    pending: jax.Array  # 0: none, 1: a join waiting for the next character's class (WB6/7b/12),
    # 2: a white piece after a space piece, word or not by its end (splitter step 3)
    pending_if: jax.Array  # kind 1: word start if the next class is (Other, ALetter, HL, Numeric)
    pending_pos: jax.Array  # the held position
    frontier: jax.Array
    mask_start: jax.Array  # uint32: held flags if the pending position starts a word
    mask_not: jax.Array  # uint32: held flags if it does not
    bytes_start: jax.Array  # bytes since the last word/cut start, if the pending one is a start
    bytes_not: jax.Array  # the same if it is not
    overflow: jax.Array  # more than 32 bytes held: this row's output is no longer exact


class WordScanOut(NamedTuple):
    """Positions decided by one `word_scan_step`, each row: ``first`` (int32), ``count``
    (int32, 0-33 but at most 32 while ``overflow`` is False) and ``starts`` (uint32: bit ``k``
    is whether position ``first + k`` starts a word, for ``k < count``)."""

    first: jax.Array
    count: jax.Array
    starts: jax.Array


_HELD = 32  # bits of `WordScanState.mask_start` / `mask_not`
_SPACE_BIT = 1 << 15  # in `WordScanState.piece_first`: the character is " "
_R_CLASSES = (BARRIER, ALETTER, HEBREW, NUMERIC)  # the lookahead classes WB6/7b/12 tell apart


def word_scan_init(batch: int) -> WordScanState:
    """The state before a row's first byte (as at the start of a `word_starts` row)."""
    zero = jnp.zeros((batch,), jnp.int32)
    none = jnp.zeros((batch,), jnp.uint32)
    return WordScanState(
        pos=zero, char_start=zero - 1, char_len=zero, char_size=zero, char_lead=zero,
        char_code=zero, props_p=zero + BARRIER, eff_q=zero + BARRIER, eff_qq=zero + BARRIER,
        ri_odd=zero.astype(bool), piece_chars=zero, piece_first=zero,
        piece_white=zero.astype(bool), pending=zero, pending_if=zero, pending_pos=zero,
        frontier=zero, mask_start=none, mask_not=none, bytes_start=zero, bytes_not=zero,
        overflow=zero.astype(bool),
    )  # fmt: skip


def _piece_kind(chars: jax.Array, first: jax.Array, white: jax.Array) -> jax.Array:
    """Kind of a piece (splitter step 2) from its running summary (`WordScanState`)."""
    single = chars == 1
    return jnp.select(
        [chars == 0, (first & _CLASS_BITS) == BARRIER, single & ((first & _SPACE_BIT) != 0),
         white, single & ((first & PUNCT) != 0)],
        [NO_PIECE, WHITE_PIECE, SPACE_PIECE, WHITE_PIECE, PUNCT_PIECE],
        WORD_PIECE,
    )  # fmt: skip


def _cut_lane(mask, since, start, size, offset, max_word_bytes):
    """Greedy ``max_word_bytes`` cuts of one character of ``size`` bytes at held bit ``offset``
    (whether it starts a word: ``start``; ``since``: bytes since the last start) -> the mask
    with its bytes' start flags, and ``since`` after it (a word of its own when it fits in no
    piece: cut inside, as `split_word_bytes`)."""
    first = start | (since + size > max_word_bytes)
    bits = first.astype(jnp.uint32)
    at = jnp.where(first, 0, since)
    for k in range(1, 4):
        inside = k < size
        at = jnp.where(inside, at + 1, at)
        cut = inside & (at == max_word_bytes)
        bits |= cut.astype(jnp.uint32) << k
        at = jnp.where(cut, 0, at)
    shift = jnp.clip(offset, 0, _HELD - 1).astype(jnp.uint32)
    return mask | jnp.where(offset < _HELD, bits << shift, 0).astype(jnp.uint32), at + 1


def _scan_char(s: WordScanState, active, code, start, size, max_word_bytes) -> WordScanState:
    """One whole character (code point, -1 for a special id; first byte ``start``; ``size``
    bytes) through the rule, for the rows where ``active``."""
    props = char_props(code)
    barrier = code < 0
    cls = props & _CLASS_BITS
    ep, punct, white, upper = ((props & f) != 0 for f in (EXT_PICT, PUNCT, WHITE, UPPER))
    cls_p = s.props_p & _CLASS_BITS
    solid = ~_in(cls, EXTEND, ZWJ)
    eff = jnp.where(ep & (cls_p == ZWJ), OTHER, cls)
    cut = ((s.props_p & PUNCT) != 0) | (((s.props_p & LOWER) != 0) & upper)
    kind_before = _piece_kind(s.piece_chars, s.piece_first, s.piece_white)
    kind = jnp.select([barrier, punct, white], [WHITE_PIECE, PUNCT_PIECE, WHITE_PIECE], WORD_PIECE)
    # word start under each lookahead class (an Extend/Format/ZWJ run later decides)
    starts = []
    for r in _R_CLASSES:
        piece = barrier | cut | ~segment_join(cls_p, cls, s.eff_q, s.eff_qq, r, ep, s.ri_odd)
        starts.append(piece & ~attaches(kind, kind_before))
    piece = barrier | cut | ~segment_join(cls_p, cls, s.eff_q, s.eff_qq, BARRIER, ep, s.ri_odd)
    word = starts[0]
    waits_class = functools.reduce(jnp.logical_or, [w != word for w in starts[1:]])
    waits_end = piece & white & ~punct & ~barrier & (kind_before == SPACE_PIECE)
    pending_if = sum(w.astype(jnp.int32) << k for k, w in enumerate(starts))

    # this character settles the held decision: kind 1 by its class, kind 2 by ending the
    # white piece (a word start) or joining it while not white (none)
    r_index = jnp.select([cls == c for c in _R_CLASSES[1:]], [1, 2, 3], 0)
    settles = ((s.pending == 1) & solid) | ((s.pending == 2) & (piece | ~white))
    value = jnp.where(s.pending == 1, ((s.pending_if >> r_index) & 1) == 1, piece)
    mask = jnp.where(value, s.mask_start, s.mask_not)
    since = jnp.where(value, s.bytes_start, s.bytes_not)
    mask_start = jnp.where(settles, mask, s.mask_start)
    mask_not = jnp.where(settles, mask, s.mask_not)
    bytes_start = jnp.where(settles, since, s.bytes_start)
    bytes_not = jnp.where(settles, since, s.bytes_not)
    pending = jnp.where(settles, 0, s.pending)

    # this character's own start: held if it waits, else decided (both lanes alike)
    waits = waits_class | waits_end
    offset = start - s.frontier
    lane = (max_word_bytes,)
    mask_start, bytes_start = _cut_lane(mask_start, bytes_start, word | waits, size, offset, *lane)
    mask_not, bytes_not = _cut_lane(mask_not, bytes_not, word & ~waits, size, offset, *lane)
    new = WordScanState(
        pos=s.pos, char_start=s.char_start, char_len=s.char_len, char_size=s.char_size,
        char_lead=s.char_lead, char_code=s.char_code, props_p=props,
        eff_q=jnp.where(solid, eff, s.eff_q), eff_qq=jnp.where(solid, s.eff_q, s.eff_qq),
        ri_odd=jnp.where(cls == RI, ~s.ri_odd, s.ri_odd & ~solid),
        piece_chars=jnp.where(piece, 1, jnp.minimum(s.piece_chars + 1, 2)),
        piece_first=jnp.where(piece, props | jnp.where(code == 0x20, _SPACE_BIT, 0),
                              s.piece_first),
        piece_white=jnp.where(piece, white, s.piece_white & white),
        pending=jnp.select([waits_class, waits_end], [1, 2], pending),
        pending_if=jnp.where(waits_class, pending_if, s.pending_if),
        pending_pos=jnp.where(waits, start, s.pending_pos),
        frontier=s.frontier, mask_start=mask_start, mask_not=mask_not,
        bytes_start=bytes_start, bytes_not=bytes_not, overflow=s.overflow,
    )  # fmt: skip
    return jax.tree.map(lambda a, b: jnp.where(active, a, b), new, s)


def word_scan_step(
    state: WordScanState, byte_id: jax.Array, *, max_word_bytes: int
) -> tuple[WordScanState, WordScanOut]:
    """Feed one byte id per row (``[batch]`` int) -> the new state and the positions it decided.

    Exactly `word_starts`, one byte at a time: over a row's bytes, the decided flags are those of
    ``word_starts`` on the whole row; feeding one special id (e.g. ``PAD_ID``; it is a word of its
    own at position ``pos``) decides every held position as at the end of a row. A position is
    decided once the bytes so far fix it:

    * a character's first byte, when the character is complete (its last byte came, or for
      invalid UTF-8 the byte that does not continue it);
    * unless it waits for a later character: after a letter/digit, U+2044 FRACTION SLASH joins
      the word only if the next character past any Extend/Format/ZWJ is a digit (WB12; held
      until that character is complete); a white space character (not " ") after a single space
      starts a word unless a non-white character joins its piece (held until the piece ends or
      such a character comes). The other lookahead rules (WB6/7b/12 with punctuation) never
      change a word start, so they hold nothing;
    * the ``max_word_bytes`` cuts of held bytes are tracked under both values of the held start.

    So a word is complete when the start of the next word is decided: ``count > 0`` with a set
    bit. At most 32 bytes are held (only a held start followed by a long run of combining marks
    goes past it: ``state.overflow`` then turns True and the row's later output is not exact).
    Jittable; ``max_word_bytes`` is static.
    """
    s = state
    b = jnp.asarray(byte_id).astype(jnp.int32)
    special = (b < 0) | (b > 255)
    held = s.char_start >= 0
    lo = jnp.where(s.char_len == 1, jnp.select([s.char_lead == 0xE0, s.char_lead == 0xF0],
                                                [0xA0, 0x90], 0x80), 0x80)  # fmt: skip
    hi = jnp.where((s.char_len == 1) & (s.char_lead == 0xF4), 0x8F, 0xBF)
    continues = held & ~special & (b >= lo) & (b <= hi) & (s.char_len < s.char_size)
    code = (s.char_code << 6) | (b & 0x3F)
    complete = continues & (s.char_len + 1 == s.char_size)
    ends_invalid = held & ~continues
    s = _scan_char(
        s, complete | ends_invalid, jnp.where(complete, code, 0xFFFD), s.char_start,
        jnp.where(complete, s.char_size, s.char_len), max_word_bytes,
    )  # fmt: skip
    size = jnp.select([b < 0x80, b < 0xC2, b < 0xE0, b < 0xF0, b < 0xF5], [1, 0, 2, 3, 4], 0)
    alone = ~continues & (special | (size <= 1))  # a character of one byte
    lead = ~continues & ~alone
    alone_code = jnp.where(special, -1, jnp.where(size == 1, b, 0xFFFD))
    s = _scan_char(s, alone, alone_code, s.pos, jnp.ones_like(b), max_word_bytes)
    lead_code = b & jnp.select([size == 2, size == 3], [0x1F, 0x0F], 0x07)
    s = s._replace(
        char_start=jnp.select([lead, continues & ~complete], [s.pos, s.char_start], -1),
        char_len=jnp.where(lead, 1, s.char_len + continues),
        char_size=jnp.where(lead, size, s.char_size),
        char_lead=jnp.where(lead, b, s.char_lead),
        char_code=jnp.where(lead, lead_code, code),
        pos=s.pos + 1,
    )
    # emit what is decided: everything before the held position / the character being decoded
    limit = jnp.select([s.pending != 0, s.char_start >= 0], [s.pending_pos, s.char_start], s.pos)
    count = limit - s.frontier
    shift = jnp.minimum(count, _HELD - 1).astype(jnp.uint32)
    one = jnp.uint32(1)
    keep = jnp.where(count >= _HELD, ~jnp.uint32(0), (one << shift) - one)
    starts = s.mask_start & keep

    def drop(mask):
        return jnp.where(count >= _HELD, 0, mask >> shift).astype(jnp.uint32)

    s = s._replace(
        frontier=limit, mask_start=drop(s.mask_start), mask_not=drop(s.mask_not),
        overflow=s.overflow | (s.pos - limit > _HELD),
    )  # fmt: skip
    return s, WordScanOut(first=limit - count, count=count, starts=starts)
