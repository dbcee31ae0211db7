"""Grain pipeline: documents -> packed byte windows in the DESIGN.md batch format.

Each document becomes ``BOS + utf8 bytes + EOS``; all documents of a split are concatenated into
one stream, which is cut into windows of ``seq_len + 1`` tokens with stride ``seq_len`` (the
final window right-padded with PAD). Every byte transition of the stream is thus a target
exactly once; short documents share windows and long ones span several. Within a window:

- ``inputs = w[:-1]``, ``targets = w[1:]``;
- ``segment_ids``: 1 for the document the window opens in, +1 at every BOS; 0 on PAD inputs;
- ``positions``: offset from the latest BOS (or from the window start); 0 on PAD inputs;
- ``loss_mask``: 0 where the target is BOS (EOS -> next document) or PAD, else 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain
import numpy as np

from arjax.config import ConfigError, check, check_field_types, check_positive

from .corpus import SPLITS, load_corpus, load_texts_from_dir
from .vocab import BOS_ID, EOS_ID, PAD_ID

SHAKESPEARE = "shakespeare"
FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
# Train iterators prefetch a few batches in background threads.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


@dataclass(frozen=True)
class DataConfig:
    """Data settings. ``corpus``: "shakespeare" or a directory holding ``train/`` and ``val/``
    folders of UTF-8 ``.txt`` files (one document per file). ``val_batches``: how many eval
    batches :func:`make_eval_batches` returns (evenly spread over the split; 0 = all).
    ``tokenizer``: a BPE tokenizer file (:mod:`arjax.data.bpe`); ``None``: bytes. With a
    tokenizer, ``seq_len`` counts tokens and batches add ``target_bytes``."""

    corpus: str = SHAKESPEARE
    seq_len: int = 256
    batch_size: int = 16
    seed: int = 0
    val_batches: int = 8
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        check_field_types(self)
        check(
            isinstance(self.corpus, str) and bool(self.corpus),
            "corpus",
            f"must be {SHAKESPEARE!r} or a directory path, got {self.corpus!r}",
        )
        check_positive(self, "seq_len", "batch_size")
        for name in ("seed", "val_batches"):
            value = getattr(self, name)
            check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                name,
                f"must be a non-negative int, got {value!r}",
            )


def _load_split(corpus: str, split: str) -> list[str]:
    if corpus == SHAKESPEARE:
        return load_corpus(split)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    layout = "a folder holding train/ and val/ folders of UTF-8 .txt files"
    if not Path(corpus).is_dir():
        raise ConfigError(f"data.corpus: {corpus!r} is neither {SHAKESPEARE!r} nor {layout}")
    try:
        texts = load_texts_from_dir(Path(corpus) / split)
    except ValueError as e:  # missing folder, no .txt files, invalid UTF-8
        raise ConfigError(f"data.corpus: {e}; it must be {layout}") from None
    if not any(texts):
        raise ConfigError(f"data.corpus: every .txt file in {Path(corpus) / split} is empty")
    return texts


def _split_windows(
    cfg: DataConfig, split: str
) -> tuple[np.ndarray, Callable[[np.ndarray], dict[str, np.ndarray]]]:
    """Windows ``[n, seq_len + 1]`` of ``split`` and the function making their features:
    bytes, or the tokens of ``cfg.tokenizer`` (features with ``target_bytes``)."""
    docs = _load_split(cfg.corpus, split)
    if cfg.tokenizer is None:
        return _windows(_stream(docs), cfg.seq_len), window_features
    from .bpe import load_tokenizer

    tok = load_tokenizer(cfg.tokenizer)
    return _windows(tok.stream(docs), cfg.seq_len), lambda w: tok.add_target_bytes(
        window_features(w)
    )


def _check_positive_int(value: int, name: str) -> None:
    """``ValueError`` unless ``value`` is a positive int."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _stream(docs: list[bytes | str]) -> np.ndarray:
    """``BOS doc0 EOS BOS doc1 EOS ...`` as int32 ids ``[tokens]``."""
    if not docs:
        raise ValueError("no documents to pack")
    raw = [d.encode("utf-8") if isinstance(d, str) else bytes(d) for d in docs]
    sizes = np.array([len(b) + 2 for b in raw])
    ends = np.cumsum(sizes)  # exclusive end of each document's tokens
    starts = ends - sizes
    stream = np.empty(int(ends[-1]), np.int32)
    is_byte = np.ones(len(stream), bool)
    is_byte[starts] = is_byte[ends - 1] = False
    stream[starts] = BOS_ID
    stream[ends - 1] = EOS_ID
    stream[is_byte] = np.frombuffer(b"".join(raw), np.uint8)
    return stream


def _windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Read-only view ``[num_windows, seq_len + 1]``, stride ``seq_len``, last one PAD-padded."""
    _check_positive_int(seq_len, "seq_len")
    num_windows = -(-(len(stream) - 1) // seq_len)
    padded = np.full(num_windows * seq_len + 1, PAD_ID, np.int32)
    padded[: len(stream)] = stream
    return np.lib.stride_tricks.sliding_window_view(padded, seq_len + 1)[::seq_len]


def window_features(windows: np.ndarray) -> dict[str, np.ndarray]:
    """Windows ``[n, seq + 1]`` -> batch dict of int32 ``[n, seq]`` arrays."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    is_bos = inputs == BOS_ID  # [n, seq]
    is_pad = inputs == PAD_ID
    segment_ids = np.cumsum(is_bos, axis=1) + ~is_bos[:, :1]  # ids start at 1 in every row
    index = np.arange(inputs.shape[1])
    latest_bos = np.maximum.accumulate(np.where(is_bos, index, 0), axis=1)
    batch = {
        "inputs": inputs,
        "targets": targets,
        "segment_ids": np.where(is_pad, 0, segment_ids),
        "positions": np.where(is_pad, 0, index - latest_bos),
        "loss_mask": (targets != BOS_ID) & (targets != PAD_ID),
    }
    return {k: np.ascontiguousarray(v, np.int32) for k, v in batch.items()}


def pack_documents(docs: list[bytes | str], seq_len: int) -> dict[str, np.ndarray]:
    """Pack documents into all windows of their stream: int32 ``[num_windows, seq_len]`` each."""
    return window_features(_windows(_stream(docs), seq_len))


def text_to_batch(texts: list[str], seq_len: int) -> dict[str, np.ndarray]:
    """One row per text (``BOS text EOS``, right-padded): int32 ``[len(texts), seq_len]``."""
    _check_positive_int(seq_len, "seq_len")
    rows = np.full((len(texts), seq_len + 1), PAD_ID, np.int32)
    for i, text in enumerate(texts):
        data = text.encode("utf-8")
        if not data:
            raise ValueError(f"text {i} is empty")
        if len(data) > seq_len - 1:
            raise ValueError(
                f"text {i} has {len(data)} bytes; at most seq_len - 1 = {seq_len - 1} fit"
            )
        rows[i, : len(data) + 2] = _stream([data])
    return window_features(rows)


def shuffled_batches(
    rows: Any,
    features: Callable[[np.ndarray], dict[str, np.ndarray]],
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """Endless shuffled batches of ``batch_size // process_count`` of ``rows`` through
    ``features``, a fresh permutation every epoch.

    Process ``p`` reads records ``p::process_count`` of the single-process order, so the
    processes' batches at step ``k`` together hold exactly the rows of the single-process
    batch ``k``. ``get_state()`` / ``set_state()`` restore the exact position.
    """
    _check_positive_int(process_count, "process_count")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if batch_size % process_count:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by process_count {process_count}"
        )
    ds = grain.MapDataset.source(rows).shuffle(seed=seed).repeat()
    ds = ds[process_index::process_count]
    ds = ds.batch(batch_size // process_count, drop_remainder=True).map(features)
    return iter(ds.to_iter_dataset(_READ_OPTIONS))


def make_train_iterator(
    cfg: DataConfig, *, process_index: int = 0, process_count: int = 1
) -> grain.DatasetIterator:
    """Endless shuffled (by ``cfg.seed``) train batches of ``cfg.batch_size // process_count``
    windows of the corpus' train split (sharding and resuming: :func:`shuffled_batches`)."""
    windows, features = _split_windows(cfg, "train")
    return shuffled_batches(
        windows, features, batch_size=cfg.batch_size, seed=cfg.seed,
        process_index=process_index, process_count=process_count,
    )  # fmt: skip


def make_eval_batches(cfg: DataConfig, split: str = "val") -> list[dict[str, np.ndarray]]:
    """Deterministic, in-order eval batches of ``split``: int32 ``[cfg.batch_size, seq_len]``
    (bytes, or ``cfg.tokenizer``'s tokens plus ``target_bytes``).

    Uses ``cfg.val_batches * cfg.batch_size`` windows evenly spread over the split (all of them
    if ``val_batches`` is 0 or they are fewer); the last batch is filled with PAD rows.
    """
    windows, features = _split_windows(cfg, split)
    n, size = len(windows), cfg.batch_size
    k = min(n, cfg.val_batches * size) if cfg.val_batches else n
    rows = windows[np.arange(k) * n // k]  # [k, seq + 1]
    num_pad = -k % size
    rows = np.concatenate([rows, np.full((num_pad, rows.shape[1]), PAD_ID, np.int32)])
    packed = features(rows)
    return [{f: v[i : i + size] for f, v in packed.items()} for i in range(0, len(rows), size)]
