"""HAT word splitter: exact agreement with the published `hat-splitter` (test-time reference
only, non-commercial licence), concatenation identity, byte limits."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arjax.data import PAD_ID, split_word_bytes, split_words, word_starts
from arjax.data.splitter import _split_general, _split_segments, _split_simple

# A multilingual corpus of our own: every line exercises a different part of the rule.
CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.  Twice!!  And... then?",
    "def split_words(text: str) -> list[str]:\n    return [w for w in text.split()]  # ok",
    "if (x != y && z >= 3) { arr[i++] = foo->bar; } else { return -1; }",
    "camelCase PascalCaseWord HTTPServerError getHTTPResponseCode iPhone eBay XMLHttpRequest",
    "snake_case_name __dunder__ kebab-case-name CONSTANT_VALUE",
    "Die Straße ist schön, aber Größenwahn führt zu Überraschungen: Äpfel & Öl.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю! ПриветМир",
    "مرحبا بالعالم، كيف حالك؟ هذا نصٌّ عربيٌّ مشكول.",
    "你好，世界！我们今天学习自然语言处理。",
    "こんにちは、世界。カタカナとひらがなと漢字が混ざった文章です。ﾊﾝｶｸｶﾀｶﾅ",
    "한국어 문장도 있습니다. 안녕하세요!",
    "emoji 👍🏽 family 👨‍👩‍👧‍👦 flags 🇩🇪🇫🇷🇯 keycap 1️⃣ heart ❤️ robot🤖pizza🍕",
    "Numbers: 3.14159, 1,000,000, 42nd, 7x7, v2.0.1, 0xFF, 1e-9, $5.99, 50%, 12:30",
    "abc123def 123abc H2O CO2e x86_64 utf8 Route66",
    "tabs\tand\t\tspaces   and\nnewlines\n\n\r\nand\u00a0nbsp\u2003em\u3000ideo\u200bzwsp",
    "   leading spaces and trailing   ",
    "Punctuation runs?!?! ... --- ((nested)) [[x]] {{y}} «quotes» „Anführung“ ‘single’",
    "e.g. i.e. U.S.A. can't won't it's rock'n'roll 'quoted' \"double\"",
    "https://example.com/path?q=1&r=two#frag user@example.org C:\\Windows\\System32",
    "a\u0301e\u0301 combining marks; Zalgo: Z\u0351\u0352a\u0353l\u0354g\u0355o",
    "Devanagari: नमस्ते दुनिया; Thai: สวัสดีชาวโลก; Hebrew: שלום עולם",
    "Supercalifragilisticexpialidocious Donaudampfschifffahrtsgesellschaftskapitän",
    "𓀀✨𝒜𝓁𝑔𝑜𝓇𝒾𝓉𝒽𝓂 𝔽(λx.𝑥²) 🜚 𝔽↦𝑒ⁿω₀📡;𝑧𝑎<𝔱𝓇𝑢∃>🛠️ҀЋހ±(Δ𝓧) 乁( •_• )ㄏ ⿰木日👾",
    "",
    " ",
    "\n",
    "x",
]


@pytest.fixture(scope="module")
def hat():
    hat_splitter = pytest.importorskip("hat_splitter")
    return hat_splitter.HATSplitter()


@pytest.mark.parametrize("text", CORPUS)
def test_split_words_matches_hat_splitter(hat, text):
    assert split_words(text) == hat.split(text)


def test_split_words_matches_on_whole_corpus(hat):
    text = "\n".join(CORPUS)
    words = split_words(text)
    assert words == hat.split(text)
    assert "".join(words) == text


@pytest.mark.parametrize("max_bytes", [1, 2, 3, 4, 5, 7, 16])
def test_split_word_bytes_matches_hat_splitter(hat, max_bytes):
    text = "\n".join(CORPUS)
    pieces = split_word_bytes(text, max_bytes)
    assert pieces == hat.split_with_limit(text, max_bytes)
    assert b"".join(pieces) == text.encode("utf-8")
    assert max(len(p) for p in pieces) <= max_bytes


# Characters outside Unicode 16 (the reference's version): unassigned in 16 but assigned in 17
# (U+10940) or 18 (U+0558, U+12550), unassigned in all (U+0378), and two whose properties
# changed in 17: U+0295 (Ll, then Lo) and U+00B8 (Word_Break Other, then ALetter).
def test_characters_outside_unicode_16_split_as_in_16():
    for c in ("\U00010940", "\u0558", "\U00012550", "\u0378"):
        assert split_words(f"a{c}b") == ["a", c, "b"], hex(ord(c))
        assert split_words(f"0{c}1") == ["0", c, "1"], hex(ord(c))
    assert split_words("\u0295A") == ["\u0295", "A"]
    assert split_words("a\u0295A x") == ["a\u0295", "A", " x"]
    assert split_words("a\u00b8b") == ["a", "\u00b8", "b"]


@pytest.mark.slow
@pytest.mark.parametrize("context", ["a{}b", "0{}1", "a{}A", "\U0001f44d\u200d{}a"])
def test_every_code_point_matches_hat_splitter(hat, context):
    """Each Unicode scalar value but the line breaks, between letters/digits (where Word_Break
    and the Ll|Lu cut show) and after a pictograph's ZWJ (Extended_Pictographic), against the
    reference, 4096 lines per call; and the same words from `word_starts` on device, all code
    points of the context in one batched call (one row each)."""
    breaks = {0x0A, 0x0B, 0x0C, 0x0D, 0x85, 0x2028, 0x2029}
    cps = [cp for cp in range(0x110000) if not 0xD800 <= cp < 0xE000 and cp not in breaks]
    starts = []  # per line: byte offsets of its words
    for i in range(0, len(cps), 4096):
        text = "\n".join(context.format(chr(cp)) for cp in cps[i : i + 4096])
        words = split_words(text)
        assert words == hat.split(text), f"code points from {cps[i]:X}"
        line, offset = [], 0
        for word in words:
            if word == "\n":
                starts.append(line)
                line, offset = [], 0
            else:
                line.append(offset)
                offset += len(word.encode())
        starts.append(line)
    lines = [context.format(chr(cp)).encode() for cp in cps]
    lengths = np.array([len(line) for line in lines], np.int32)
    ids = np.full((len(lines), int(lengths.max())), PAD_ID, np.int32)
    ids[np.arange(ids.shape[1]) < lengths[:, None]] = np.frombuffer(b"".join(lines), np.uint8)
    got = np.asarray(word_starts(ids, lengths, max_word_bytes=64))
    expected = np.zeros_like(got)
    for row, line in enumerate(starts):
        expected[row, line] = True
    bad = np.flatnonzero((got != expected).any(axis=1))
    assert not len(bad), f"word_starts differs at U+{cps[bad[0]]:04X} ({len(bad)} code points)"


def test_documented_examples():
    assert split_words("Hello, world!") == ["Hello,", " world!"]
    assert split_words("howAreYou") == ["how", "Are", "You"]
    assert split_words("how_are_you") == ["how_", "are_", "you"]
    assert split_words("a  b\n\nc") == ["a", "  ", "b", "\n", "\n", "c"]
    assert split_words("你好") == ["你", "好"]
    assert split_word_bytes("Hello, world!", 4) == [b"Hell", b"o,", b" wor", b"ld!"]
    # a 2-byte character is kept whole when a boundary fits ...
    assert split_word_bytes("für", 2) == [b"f", "ü".encode(), b"r"]
    # ... and cut inside only when not even one character fits
    assert split_word_bytes("🌝", 3) == ["🌝".encode()[:3], "🌝".encode()[3:]]
    assert split_words("") == []
    assert split_word_bytes("", 4) == []


def test_lone_surrogates_are_documented_behaviour():
    text = "ab\ud800cd \udfff!"
    words = split_words(text)
    assert "".join(words) == text
    assert b"".join(split_word_bytes(text, 2)) == text.encode("utf-8", "surrogatepass")


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, None])
def test_bad_max_bytes_raises(bad):
    with pytest.raises(ValueError, match="max_bytes"):
        split_word_bytes("abc", bad)


def test_bad_text_type_raises():
    with pytest.raises(TypeError, match="text"):
        split_words(b"bytes")


# Any code point but surrogates (hat-splitter takes only valid str), assigned or not.
_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)
# Characters that drive the interesting rules (WB3c/WB4/WB6-7/WB11-13/WB15, camel case, spaces).
_TRICKY = st.text(
    alphabet=st.sampled_from(
        list(" \t\n\r\x0b\x85\u00a0\u3000'\".,:;_-aZ1\u0301\u00ad\u200d\u05d0\u30a2\u30fc©Ⓜ·\u203f")
        + ["\U0001f1e9", "\U0001f1ea", "\U0001f3fd", "\U0001f44d", "\U0001f000", "\u4e00"]
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(text=_TEXT, max_bytes=st.integers(1, 12))
def test_property_identity_and_limits(text, max_bytes):
    assert "".join(split_words(text)) == text
    pieces = split_word_bytes(text, max_bytes)
    assert b"".join(pieces) == text.encode("utf-8")
    assert all(1 <= len(p) <= max_bytes for p in pieces)


@settings(max_examples=400, deadline=None)
@given(text=st.one_of(_TEXT, _TRICKY), max_bytes=st.integers(1, 12))
def test_property_agrees_with_hat_splitter(hat, text, max_bytes):
    assert split_words(text) == hat.split(text)
    assert split_word_bytes(text, max_bytes) == hat.split_with_limit(text, max_bytes)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=80))
def test_ascii_fast_path_equals_general_path(text):
    assert split_words(text) == _split_general(text)


def test_mixed_lines_use_both_paths(hat):
    text = "plain ascii line,\r\nzweite Zeile: grün!\nthird\n\n日本語\n"
    assert split_words(text) == hat.split(text) == _join_lines_separately(text)


def _join_lines_separately(text):
    return [w for line in text.splitlines(keepends=True) for w in split_words(line)]


# Characters the one-pass "simple" path handles (letters of several scripts, digits, CJK,
# kana, marks, punctuation, spaces) plus a few that force the general path.
_SIMPLE_ALPHABET = list("aZbYé Ñ1,.'\"_:;!?-(") + [
    "п",
    "Р",
    "\u05d0",
    "\u05f3",
    "\u30a2",
    "\u30fc",
    "\u3042",
    "\u4e00",
    "\u3001",
    "\uff01",
    "\u203f",
    "\u0301",
    "\u064b",
    "\u00ad",
    "\U0001f44d",
    "\U0001f3fd",
    "\uff21",
    "\u0660",
    "\u00b7",
    "\u2019",
    "\u0e01",
    "\uac00",
    "\u01c5",
    "\u2160",
    "\u00b2",
    "\u066b",
    "\u2044",
]


@settings(max_examples=400, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(_SIMPLE_ALPHABET), max_size=40))
def test_simple_path_equals_segment_path(text):
    words = _split_simple(text)
    if words is not None:
        assert words == list(_split_segments(text))
    assert split_words(text) == list(_split_segments(text))
