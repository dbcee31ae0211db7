"""HAT word splitter: text -> words (Neitemeier et al., 2025, "Hierarchical Autoregressive
Transformers", Sec. 2.1, splitting rule).

The rule of the published splitter (package `hat-splitter`), implemented independently here
from its documented behaviour:

1. segment the text at Unicode default word boundaries (UAX #29, rules WB1-WB999), then cut
   each segment after every punctuation character (general category P*) and between a
   lowercase letter (Ll) and a following uppercase letter (Lu) -> pieces;
2. classify pieces: ``space`` (exactly " "), ``white`` (only White_Space characters),
   ``punct`` (exactly one P* character), ``word`` (anything else);
3. group pieces left to right into words ``space word? punct* | word punct* | punct+ | white``:
   a word keeps its single leading space and trailing punctuation; runs of several spaces,
   tabs and newlines are words of their own;
4. `split_word_bytes` additionally cuts words longer than ``max_bytes`` UTF-8 bytes greedily
   at the last character boundary that fits, inside a character only when none fits.

Unicode data comes from the `regex` module (Unicode 16 or later), except Extended_Pictographic
(WB3c), whose table in `regex` lacks 689 code points: we carry the emoji-data.txt ranges below.
The reference uses Unicode 16, so text is split as Unicode 16 sees it: characters unassigned in
16 (`_unicode16.ASSIGNED`) stand in as an unassigned code point, and the two whose properties
changed in 17 (checked against `regex` for Unicode 17 and 18) as characters with their Unicode 16
properties. Like the reference (and unlike the letter of UAX #29), a pictograph joined by
``ZWJ x Extended_Pictographic`` (WB3c) joins no following letter. ASCII lines, and lines made of
"simple" characters (letters, digits, kana, CJK, marks, punctuation, spaces), take one-regex
fast paths (the same rule specialised); others are cut at spaces into chunks split via UAX #29
segments (short chunks cached). Tests check the paths against each other and hat-splitter.

Lone surrogates (``"\\ud800"``), which are not Unicode scalar values, are treated as ordinary
"other" characters: each is a word of its own (plus any attached punctuation), and
`split_word_bytes` encodes them with ``surrogatepass`` (3 bytes each), so the pieces concatenate
to ``text.encode("utf-8", "surrogatepass")``. (hat-splitter rejects such strings.)
"""

from __future__ import annotations

import re
from functools import lru_cache

import regex

from arjax.data._unicode16 import ASSIGNED

# Extended_Pictographic, Unicode emoji-data.txt (identical in Unicode 14-16).
_EXT_PICT_RANGES = """
A9 AE 203C 2049 2122 2139 2194-2199 21A9-21AA 231A-231B 2328 2388 23CF 23E9-23F3 23F8-23FA 24C2
25AA-25AB 25B6 25C0 25FB-25FE 2600-2605 2607-2612 2614-2685 2690-2705 2708-2712 2714 2716 271D
2721 2728 2733-2734 2744 2747 274C 274E 2753-2755 2757 2763-2767 2795-2797 27A1 27B0 27BF
2934-2935 2B05-2B07 2B1B-2B1C 2B50 2B55 3030 303D 3297 3299 1F000-1F0FF 1F10D-1F10F 1F12F
1F16C-1F171 1F17E-1F17F 1F18E 1F191-1F19A 1F1AD-1F1E5 1F201-1F20F 1F21A 1F22F 1F232-1F23A
1F23C-1F23F 1F249-1F3FA 1F400-1F53D 1F546-1F64F 1F680-1F6FF 1F774-1F77F 1F7D5-1F7FF 1F80C-1F80F
1F848-1F84F 1F85A-1F85F 1F888-1F88F 1F8AE-1F8FF 1F90C-1F93A 1F93C-1F945 1F947-1FAFF 1FC00-1FFFD
"""
# Characters assigned in Unicode 16 whose properties later changed, and stand-ins with their
# Unicode 16 properties: U+00B8 (Word_Break=ALetter since 17; before: Other, Sk) and U+0295
# (General_Category=Lo since 17; before: Ll, which the Ll|Lu cut sees).
_CHANGED_SINCE_16 = {"\u00b8": "\u0378", "\u0295": "a"}
_UNASSIGNED = "\u0378"  # Word_Break=Other, General_Category=Cn in every version


def _parse_ranges(ranges: str) -> list[tuple[int, int]]:
    """``"A9 2194-2199 ..."`` -> ``[(0xA9, 0xA9), (0x2194, 0x2199), ...]``."""
    pairs = []
    for item in ranges.split():
        lo, _, hi = item.partition("-")
        pairs.append((int(lo, 16), int(hi or lo, 16)))
    return pairs


def _char_class(pairs: list[tuple[int, int]]) -> str:
    return "[" + "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in pairs) + "]"


def outside_unicode_16() -> list[tuple[int, int]]:
    """Code point ranges ``(lo, hi)`` that Unicode 16 leaves unassigned, plus
    ``_CHANGED_SINCE_16``: the characters split as a stand-in (`_as_unicode_16`). Unassigned
    code points of the Extended_Pictographic ranges are left out: they are pictographs to the
    reference too (and to our own table), and any later assignment there is a symbol."""
    gaps, start = [], 0
    for lo, hi in sorted(_parse_ranges(ASSIGNED + _EXT_PICT_RANGES)):
        if lo > start:
            gaps.append((start, lo - 1))
        start = max(start, hi + 1)
    if start <= 0x10FFFF:
        gaps.append((start, 0x10FFFF))
    return gaps + [(ord(c), ord(c)) for c in _CHANGED_SINCE_16]


def _not_unicode_16() -> tuple[re.Pattern, re.Pattern]:
    """The classes of `outside_unicode_16`, (BMP, astral), as stdlib ``re`` patterns (a BMP
    class compiles to a bitmap)."""
    gaps = outside_unicode_16()
    bmp = [(lo, min(hi, 0xFFFF)) for lo, hi in gaps if lo <= 0xFFFF]
    astral = [(max(lo, 0x10000), hi) for lo, hi in gaps if hi > 0xFFFF]
    return re.compile(_char_class(bmp)), re.compile(_char_class(astral))


_NOT_16_BMP, _NOT_16_ASTRAL = _not_unicode_16()
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")
_NOT_UNICODE_16 = re.compile(f"{_NOT_16_BMP.pattern}|{_NOT_16_ASTRAL.pattern}")


def _outside_unicode_16(text: str) -> bool:
    """Whether ``text`` holds a character that Unicode 16 sees otherwise (fast: most text is
    in the BMP, whose class is one bitmap lookup per character)."""
    if _NOT_16_BMP.search(text):
        return True
    return _ASTRAL.search(text) is not None and _NOT_16_ASTRAL.search(text) is not None


def _as_unicode_16(text: str) -> str:
    """``text`` with each character outside Unicode 16 replaced by its stand-in (same length)."""
    return _NOT_UNICODE_16.sub(lambda m: _CHANGED_SINCE_16.get(m[0], _UNASSIGNED), text)


def _wb(*values: str) -> str:
    return "[" + "".join(f"\\p{{Word_Break={v}}}" for v in values) + "]"


def _segment_pattern() -> str:
    """One UAX #29 word segment (longest match from a boundary), as a `regex` pattern."""
    ep = _char_class(_parse_ranges(_EXT_PICT_RANGES))
    zwj = f"\\u200d(?!{ep})"  # a ZWJ not followed by a pictograph (that is WB3c, below)
    ext_char = _wb("Extend", "Format")
    ext = f"(?:{ext_char}|{zwj})*+"  # WB4: attached to the preceding character
    ext_any = _wb("Extend", "Format", "ZWJ") + "*"
    ah, hl, num = _wb("ALetter", "Hebrew_Letter"), _wb("Hebrew_Letter"), _wb("Numeric")
    letter_digit = _wb("ALetter", "Hebrew_Letter", "Numeric")
    mid_letter = _wb("MidLetter", "MidNumLet", "Single_Quote")
    mid_num = _wb("MidNum", "MidNumLet", "Single_Quote")
    single_q, double_q = _wb("Single_Quote"), _wb("Double_Quote")
    alnum = (  # WB5, WB8-10 (letters and digits join), WB6-7, WB7b-c, WB11-12 (mid chars)
        f"{letter_digit}(?:{letter_digit}|{ext_char}|{zwj}"
        f"|(?<={ah}{ext_any}){mid_letter}(?={ext_any}{ah})"
        f"|(?<={num}{ext_any}){mid_num}(?={ext_any}{num})"
        f"|(?<={hl}{ext_any}){double_q}(?={ext_any}{hl}))*+"
    )
    kat = _wb("Katakana")
    katakana = f"{kat}(?:{kat}|{ext_char}|{zwj})*+"  # WB13
    run = f"(?:{alnum}|{katakana})"
    extend_num_let = f"(?:{_wb('ExtendNumLet')}{ext})"
    chain = (  # WB13a-b (ExtendNumLet bridges runs), WB7a (Hebrew letter x ')
        f"(?:{extend_num_let}*{run}(?:{extend_num_let}+{run})*+"
        f"(?:{extend_num_let}+|(?<={hl}{ext_any}){single_q}{ext})?|{extend_num_let}+)"
    )
    regional = _wb("Regional_Indicator")
    unit = (
        f"(?:{chain}"
        f"|{_wb('WSegSpace')}+{ext}"  # WB3d
        f"|{regional}{ext}(?:{regional}{ext})?"  # WB15-16
        f"|(?:[^\\u200d]|{zwj}){ext})"  # WB999
    )
    newline = _wb("Newline", "CR", "LF")
    pict = f"\\u200d{ep}{ext}"  # WB3c; the pictograph joins no following letter
    return f"(?s)\\r\\n|{newline}|{unit}(?:{pict})*|(?:{pict})+"  # WB3-3b


_SEGMENT = regex.compile(_segment_pattern())
# step 1 cuts inside a segment: after punctuation, between Ll and Lu
_CUT = regex.compile(r"(?s)(?<=\p{P})(?=.)|(?<=\p{Ll})(?=\p{Lu})")
_WHITE_RE = regex.compile(r"\s+")
_PUNCT_RE = regex.compile(r"\p{P}")

_NONE, _SPACE, _WHITE, _PUNCT, _WORD = range(5)


def _kind(piece: str) -> int:
    if piece == " ":
        return _SPACE
    if _WHITE_RE.fullmatch(piece):
        return _WHITE
    if len(piece) == 1 and _PUNCT_RE.match(piece):
        return _PUNCT
    return _WORD


def _pieces_of(segment: str) -> tuple[tuple[str, int], ...]:
    """Step 1 cuts and step 2 kinds of one UAX #29 segment."""
    return tuple((p, _kind(p)) for p in _CUT.split(segment))


_CACHED_LEN = 64  # segments and chunks repeat; cache the short ones (bounded memory)
_pieces_cached = lru_cache(maxsize=1 << 16)(_pieces_of)


def _pieces(segment: str) -> tuple[tuple[str, int], ...]:
    return _pieces_cached(segment) if len(segment) <= _CACHED_LEN else _pieces_of(segment)


# ASCII-only text (the common case) in one C-level pass: the same rule specialised to ASCII,
# where UAX #29 reduces to "letters and digits join" (the mid characters .:,;'" and "_" are all
# punctuation, which ends a piece anyway), giving words `space? (alnum | symbol) punct*`.
_A_PUNCT = r"""[!"#%&'()*,\-./:;?@\[\\\]_{}]"""
_A_SYMBOL = r"[$+<=>^`|~\x00-\x08\x0e-\x1f\x7f]"
_A_ALNUM = (
    r"[a-z]+(?:[0-9][A-Z0-9]*[a-z]*)*|[A-Z0-9]+(?:[a-z]+(?:[0-9][A-Z0-9]*[a-z]*)*)?"  # no Ll|Lu
)
_ASCII_WORD = re.compile(
    f" ?(?:{_A_ALNUM}|{_A_SYMBOL}){_A_PUNCT}*|  +|\r\n|[\t\n\x0b\x0c\r]| ?{_A_PUNCT}+| "
)
# A line holding a non-ASCII character. Words never span a "\n" (it is a word of its own and
# joins nothing), so lines can be split independently.
_NON_ASCII_LINE = re.compile(r"(?m)^[\x00-\x09\x0b-\x7f]*[^\x00-\x7f][^\n]*\n?")


# A " " after a non-space character always starts a word (UAX #29 breaks before a space unless
# it follows WSegSpace, and spaces start words), and no rule looks back across it: the text
# can be cut there and the chunks -- mostly one word each, and repeating -- split separately.
_CHUNK_CUT = re.compile(r"(?<=\S)(?= )")


def _simple_word_pattern() -> str:
    """HAT words of "simple" text in one pass: letters/digits (ALetter, Hebrew_Letter, Numeric)
    joined into runs cut at Ll|Lu, Katakana runs, single other characters (each a UAX #29
    segment of its own), each with attached Extend/Format marks, then trailing punctuation;
    single spaces lead words. Joiners the run rules need context for (ZWJ, non-punctuation
    mid/ExtendNumLet characters, regional indicators) and all whitespace but " " are not simple.
    Splitting a text entirely covered by these matches gives the words of the full rule, since
    a cut after punctuation makes "word + punct" and "word-ending-in-punct" group alike."""
    punct = r"\p{P}"
    mark = "[" + "".join(f"\\p{{Word_Break={v}}}" for v in ("Extend", "Format")) + "]*"
    alnum = f"[{_wb('ALetter', 'Hebrew_Letter', 'Numeric')}--{punct}--\\p{{Ll}}]"
    lower = f"[{_wb('ALetter', 'Hebrew_Letter', 'Numeric')}&&\\p{{Ll}}]"
    run = f"(?:(?:{alnum}|{lower}(?!\\p{{Lu}})){mark})*+(?:{lower}{mark})?"
    katakana = f"(?:[{_wb('Katakana')}--{punct}]{mark})+"
    other = f"[{_wb('Other')}--{punct}--\\s]{mark}"
    return f"(?V1) ?(?:(?={alnum}|{lower}){run}|{katakana}|{other}){punct}*| ?{punct}+|  +| "


_SIMPLE_WORD = regex.compile(_simple_word_pattern())


def _split_general(text: str) -> list[str]:
    if not _outside_unicode_16(text):
        return _split_chunks(text)
    words, start = [], 0  # rare: split the Unicode 16 view, then cut the original alike
    for word in _split_chunks(_as_unicode_16(text)):
        words.append(text[start : start + len(word)])
        start += len(word)
    return words


def _split_chunks(text: str) -> list[str]:
    words: list[str] = []
    for chunk in _CHUNK_CUT.split(text):
        words += _split_chunk(chunk) if len(chunk) <= _CACHED_LEN else _split_chunk_of(chunk)
    return words


def _split_simple(text: str) -> list[str] | None:
    """Words of ``text`` if it is all "simple" (see `_simple_word_pattern`), else None."""
    words = _SIMPLE_WORD.findall(text)
    return words if sum(map(len, words)) == len(text) else None  # nothing left out


def _split_chunk_of(text: str) -> tuple[str, ...]:
    words = _split_simple(text)
    return tuple(words) if words is not None else _split_segments(text)


def _split_segments(text: str) -> tuple[str, ...]:
    """Steps 1-3 on UAX #29 segments: the general rule for any text."""
    words: list[str] = []
    last = _NONE  # kind of the last piece of the current word
    for segment in _SEGMENT.findall(text):
        for piece, kind in _pieces(segment):
            if (kind == _WORD and last == _SPACE) or (
                kind == _PUNCT and last != _WHITE and last != _NONE
            ):
                words[-1] += piece
            else:
                words.append(piece)
            last = kind
    return tuple(words)


_split_chunk = lru_cache(maxsize=1 << 16)(_split_chunk_of)


def split_words(text: str) -> list[str]:
    """Split ``text`` into HAT words (Sec. 2.1); ``"".join(split_words(text)) == text``."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected str, got {type(text).__name__}")
    if text.isascii():
        return _ASCII_WORD.findall(text)
    words: list[str] = []
    start = 0
    for line in _NON_ASCII_LINE.finditer(text):
        words += _ASCII_WORD.findall(text, start, line.start())
        words += _split_general(line.group())
        start = line.end()
    words += _ASCII_WORD.findall(text, start)
    return words


def split_word_bytes(text: str, max_bytes: int) -> list[bytes]:
    """HAT words of ``text`` as UTF-8 bytes, each at most ``max_bytes`` long (Sec. 2.1).

    A longer word is cut greedily: each piece ends at the last UTF-8 character boundary within
    ``max_bytes`` bytes; only when no boundary fits is a character itself cut at ``max_bytes``.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes: must be a positive int, got {max_bytes!r}")
    out: list[bytes] = []
    for data in [word.encode("utf-8", "surrogatepass") for word in split_words(text)]:
        n = len(data)
        if n <= max_bytes:
            out.append(data)
            continue
        start = 0
        while start < n:
            end = min(start + max_bytes, n)
            cut = end
            while start < cut < n and (data[cut] & 0xC0) == 0x80:  # continuation byte
                cut -= 1
            if cut == start:
                cut = end
            out.append(data[start:cut])
            start = cut
    return out
