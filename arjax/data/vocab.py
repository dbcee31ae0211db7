"""Byte vocabulary shared by every byte-level model: 256 byte values + specials."""

BYTE_VOCAB = 256
PAD_ID = 256  # padding; never a target
BOS_ID = 257  # start of a document
EOS_ID = 258  # end of a document
VOCAB_SIZE = 259


def encode(text: str) -> list[int]:
    """UTF-8 bytes of ``text`` as ids (no specials)."""
    return list(text.encode("utf-8"))


def decode(ids: list[int] | tuple[int, ...]) -> str:
    """Ids back to text; specials are dropped, invalid UTF-8 is replaced (U+FFFD)."""
    return bytes(i for i in ids if 0 <= i < BYTE_VOCAB).decode("utf-8", errors="replace")
