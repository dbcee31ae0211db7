"""HAT batches: packed byte rows with per-byte word ids (Neitemeier et al. 2025, Sec. 2.1).

Each document becomes the words ``[BOS] + split_word_bytes(text, max_word_bytes) + [EOS]``
(BOS and EOS are one-token words of their own); the documents of a split form one word
stream. Rows are cut **at word boundaries**: a row takes whole words while they fit in
``seq_len`` input bytes and ``max_words`` words, so no word straddles two rows and nothing is
dropped (a row with many short words ends early and is PAD-filled). The target of a row's
last byte is the first token of the next row, so every transition of the stream is a target
exactly once, as in :mod:`arjax.data.pipeline`.

Fields (int32): the DESIGN.md text fields ``[batch, seq]`` (``inputs``, ``targets``,
``segment_ids``, ``positions``, ``loss_mask``) plus

- ``word_ids`` ``[batch, seq]``: 1-based index of the byte's word within its row, 0 on PAD;
- ``word_segment_ids`` ``[batch, max_words]``: document id of each word (as ``segment_ids``),
  0 for padding words;
- ``word_positions`` ``[batch, max_words]``: word index within its document (or from the row
  start when the row opens mid-document), 0 for padding words.

Bad input: text is ``str`` (always valid Unicode); :func:`bytes_to_words` decodes bytes
strictly and **rejects** invalid UTF-8 with a ``ValueError`` naming the byte offset. Empty
documents are rejected. Words longer than ``max_word_bytes`` are cut by the splitter.
:func:`words_to_batch` (one row per text) raises when a text has more words than
``max_words`` or more bytes than ``seq_len``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import grain
import numpy as np

from .pipeline import DataConfig, _check_positive_int, _load_split, shuffled_batches
from .splitter import split_word_bytes
from .vocab import BOS_ID, EOS_ID, PAD_ID

HAT_FIELDS = (
    "inputs", "targets", "segment_ids", "positions", "loss_mask",
    "word_ids", "word_segment_ids", "word_positions",
)  # fmt: skip

Word = Sequence[int]  # token ids of one word (a ``bytes`` object works)


def bytes_to_words(data: bytes, max_word_bytes: int) -> list[bytes]:
    """Words of UTF-8 ``data``; invalid UTF-8 raises ``ValueError`` naming the offset."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"invalid UTF-8 at byte offset {e.start} ({data[e.start : e.end]!r}); "
            "HAT input must be valid UTF-8 (rejected, not replaced)"
        ) from None
    return split_word_bytes(text, max_word_bytes)


def document_words(text: str, max_word_bytes: int) -> list[Word]:
    """``[BOS] + words + [EOS]`` of one document; empty text raises ``ValueError``."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected str, got {type(text).__name__}")
    if not text:
        raise ValueError("empty text: a HAT document needs at least one byte")
    return [(BOS_ID,), *split_word_bytes(text, max_word_bytes), (EOS_ID,)]


def _flatten(words: Sequence[Word]) -> tuple[np.ndarray, np.ndarray]:
    """Word list -> (tokens ``[n]``, word lengths ``[num_words]``), int32."""
    lengths = np.fromiter((len(w) for w in words), np.int32, len(words))
    tokens = np.fromiter((t for w in words for t in w), np.int32, int(lengths.sum()))
    return tokens, lengths


@functools.lru_cache(maxsize=8)
def _split_stream(corpus: str, split: str, max_word_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    words: list[Word] = []
    for i, doc in enumerate(_load_split(corpus, split)):
        if not doc:
            raise ValueError(f"{corpus}/{split}: document {i} is empty")
        words.extend(document_words(doc, max_word_bytes))
    return _flatten(words)


def pack_rows(lengths: np.ndarray, seq_len: int, max_words: int) -> np.ndarray:
    """Greedy rows of whole words: ``[num_rows, 2]`` (first word, word count) per row."""
    _check_positive_int(seq_len, "seq_len")
    _check_positive_int(max_words, "max_words")
    if len(lengths) and int(lengths.max()) > seq_len:
        raise ValueError(f"a word has {int(lengths.max())} bytes > seq_len={seq_len}")
    rows, start, nbytes = [], 0, 0
    for i, n in enumerate(lengths.tolist()):
        if nbytes + n > seq_len or i - start == max_words:
            rows.append((start, i - start))
            start, nbytes = i, 0
        nbytes += n
    if start < len(lengths):
        rows.append((start, len(lengths) - start))
    return np.asarray(rows, np.int64).reshape(-1, 2)


def row_features(
    tokens: np.ndarray,  # [n] the stream
    lengths: np.ndarray,  # [num_words]
    offsets: np.ndarray,  # [num_words + 1] token offset of each word
    rows: np.ndarray,  # [r, 2] (first word, word count)
    seq_len: int,
    max_words: int,
) -> dict[str, np.ndarray]:
    """Batch dict (see module doc) for ``rows`` of the stream."""
    r = len(rows)
    byte_fields = ("inputs", "targets", "segment_ids", "positions", "word_ids")
    out = {k: np.zeros((r, seq_len), np.int32) for k in byte_fields}
    out["inputs"][:] = PAD_ID
    out["targets"][:] = PAD_ID
    out["word_segment_ids"] = np.zeros((r, max_words), np.int32)
    out["word_positions"] = np.zeros((r, max_words), np.int32)
    for i, (w0, k) in enumerate(rows.tolist()):
        if k == 0:
            continue
        s, e = int(offsets[w0]), int(offsets[w0 + k])
        n = e - s
        inp = tokens[s:e]
        out["inputs"][i, :n] = inp
        tgt = tokens[s + 1 : e + 1]
        out["targets"][i, : len(tgt)] = tgt
        wl = lengths[w0 : w0 + k]
        out["word_ids"][i, :n] = np.repeat(np.arange(1, k + 1), wl)
        is_bos = inp == BOS_ID
        seg = np.cumsum(is_bos) + (not is_bos[0])
        out["segment_ids"][i, :n] = seg
        idx = np.arange(n)
        out["positions"][i, :n] = idx - np.maximum.accumulate(np.where(is_bos, idx, 0))
        first = offsets[w0 : w0 + k] - s  # first byte of each word in the row
        word_bos = is_bos[first]
        widx = np.arange(k)
        out["word_segment_ids"][i, :k] = seg[first]
        out["word_positions"][i, :k] = widx - np.maximum.accumulate(np.where(word_bos, widx, 0))
    t = out["targets"]
    out["loss_mask"] = ((t != BOS_ID) & (t != PAD_ID) & (out["word_ids"] > 0)).astype(np.int32)
    return out


class _Stream:
    """A packed word stream: tokens, word lengths/offsets and the row table."""

    def __init__(self, tokens: np.ndarray, lengths: np.ndarray, seq_len: int, max_words: int):
        self.tokens, self.lengths = tokens, lengths
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.rows = pack_rows(lengths, seq_len, max_words)
        self.seq_len, self.max_words = seq_len, max_words

    def features(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return row_features(
            self.tokens, self.lengths, self.offsets, rows, self.seq_len, self.max_words
        )


def pack_word_documents(
    docs: Sequence[str], seq_len: int, max_words: int, max_word_bytes: int
) -> dict[str, np.ndarray]:
    """All rows of ``docs`` packed as one stream: int32 ``[num_rows, ...]`` per field."""
    if not docs:
        raise ValueError("no documents to pack")
    words = [w for d in docs for w in document_words(d, max_word_bytes)]
    stream = _Stream(*_flatten(words), seq_len, max_words)
    return stream.features(stream.rows)


def words_to_batch(rows: Sequence[Sequence[Word]], seq_len: int, max_words: int) -> dict:
    """One batch row per word list (e.g. from :func:`document_words`), right-padded.

    The target of a row's last token is PAD (nothing follows). Raises ``ValueError`` when a
    row has more than ``seq_len`` tokens or more than ``max_words`` words.
    """
    feats = []
    for i, words in enumerate(rows):
        tokens, lengths = _flatten(words)
        if len(lengths) == 0:
            raise ValueError(f"row {i} has no words")
        if len(tokens) > seq_len:
            raise ValueError(f"row {i} has {len(tokens)} tokens > seq_len={seq_len}")
        if len(lengths) > max_words:
            raise ValueError(
                f"row {i} has {len(lengths)} words > max_words={max_words} (the static word "
                "dimension); shorten the text or raise max_words"
            )
        stream = _Stream(tokens, lengths, seq_len, max_words)
        feats.append(stream.features(np.array([[0, len(lengths)]])))
    return {k: np.concatenate([f[k] for f in feats]) for k in HAT_FIELDS}


def text_to_word_batch(
    texts: Sequence[str | bytes], seq_len: int, max_words: int, max_word_bytes: int
) -> dict[str, np.ndarray]:
    """One row per text (``BOS words EOS``); bytes are decoded strictly (see module doc)."""
    rows = []
    for t in texts:
        if isinstance(t, bytes):
            if not t:
                raise ValueError("empty text: a HAT document needs at least one byte")
            t = b"".join(bytes_to_words(t, max_word_bytes)).decode("utf-8")
        rows.append(document_words(t, max_word_bytes))
    return words_to_batch(rows, seq_len, max_words)


def _corpus_stream(cfg: DataConfig, split: str, max_words: int, max_word_bytes: int) -> _Stream:
    _check_positive_int(max_word_bytes, "max_word_bytes")
    if max_word_bytes > cfg.seq_len:
        raise ValueError(f"max_word_bytes={max_word_bytes} exceeds seq_len={cfg.seq_len}")
    tokens, lengths = _split_stream(cfg.corpus, split, max_word_bytes)
    return _Stream(tokens, lengths, cfg.seq_len, max_words)


def bytes_per_word(cfg: DataConfig, *, max_word_bytes: int, split: str = "train") -> float:
    """Mean bytes per word (BOS/EOS words included) of ``split`` of ``cfg.corpus``, as the
    pipeline splits it; what HAT's FLOPs per byte depend on (``HATConfig.flops_per_token``)."""
    _check_positive_int(max_word_bytes, "max_word_bytes")
    tokens, lengths = _split_stream(cfg.corpus, split, max_word_bytes)
    return len(tokens) / len(lengths)


def make_word_train_iterator(
    cfg: DataConfig,
    *,
    max_words: int,
    max_word_bytes: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """Endless shuffled HAT train batches of ``cfg.batch_size // process_count`` rows.

    Same sharding and checkpointing contract as :func:`arjax.data.make_train_iterator`
    (``get_state()`` / ``set_state()`` restore the exact position).
    """
    stream = _corpus_stream(cfg, "train", max_words, max_word_bytes)
    return shuffled_batches(
        stream.rows, stream.features, batch_size=cfg.batch_size, seed=cfg.seed,
        process_index=process_index, process_count=process_count,
    )  # fmt: skip


def make_word_eval_batches(
    cfg: DataConfig, *, max_words: int, max_word_bytes: int, split: str = "val"
) -> list[dict[str, np.ndarray]]:
    """Deterministic eval batches of ``split`` (rows spread as in ``make_eval_batches``);
    the last batch is filled with all-PAD rows."""
    stream = _corpus_stream(cfg, split, max_words, max_word_bytes)
    n, size = len(stream.rows), cfg.batch_size
    k = min(n, cfg.val_batches * size) if cfg.val_batches else n
    feats = stream.features(stream.rows[np.arange(k) * n // k])
    num_pad = -k % size
    if num_pad:
        pad = stream.features(np.zeros((num_pad, 2), np.int64))  # zero words -> all PAD
        feats = {f: np.concatenate([feats[f], pad[f]]) for f in HAT_FIELDS}
    return [{f: feats[f][i : i + size] for f in HAT_FIELDS} for i in range(0, k + num_pad, size)]
