"""Byte-level BPE tokenizers whose ids extend the byte vocabulary (:mod:`arjax.data.vocab`).

A tokenizer file is a Hugging Face ``tokenizers`` JSON (byte-level BPE, Sennrich et al. 2016
with the byte alphabet of Radford et al. 2019) laid out so that ids ``0..255`` are the 256
single bytes, ``PAD_ID``/``BOS_ID``/``EOS_ID`` (256-258) the specials of the byte pipeline
and ``259..`` the merged tokens. Byte-level runs and BPE runs therefore share the packing,
the batch format and the decoding loops; only the text <-> ids mapping differs. Encoding is
lossless: the bytes of a text's tokens, concatenated, are the text's UTF-8 bytes.

Bits per byte (every family on one axis): a BPE batch carries ``target_bytes``
``[batch, seq]``, the UTF-8 byte count of each target token (EOS counts 1, as the byte
models predict one EOS per document; PAD and BOS 0), so a model's summed nats over a split
divided by ``ln 2 * sum(target_bytes * loss_mask)`` is its bits per byte; for a byte model
the same sum is its target count.

The ``tokenizers`` package is optional (``pip install 'arjax[bpe]'``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .vocab import BOS_ID, BYTE_VOCAB, EOS_ID, PAD_ID, VOCAB_SIZE

SPECIALS = {"<pad>": PAD_ID, "<bos>": BOS_ID, "<eos>": EOS_ID}


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError(
            "BPE tokenizers need the 'tokenizers' package: pip install 'arjax[bpe]'"
        ) from None
    return tokenizers


def byte_alphabet() -> list[str]:
    """The byte-level pre-tokenizer's character for each byte value ``0..255``: printable
    Latin-1 bytes (``!``..``~``, ``\xa1``..``\xac``, ``\xae``..``\xff``) stand for
    themselves, the other 68 bytes, in order, for ``chr(256)``, ``chr(257)``, ...
    (Radford et al. 2019, sec. 2.2)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(256 + k) for k, b in enumerate(others)}
    return [table[b] for b in range(256)]


class BPETokenizer:
    """A tokenizer file (see the module doc) with numpy helpers for the data pipeline.

    ``token_bytes``: the bytes of every id (``b""`` for the specials); ``target_bytes``:
    int32 ``[vocab_size]`` byte counts used for bits/byte (EOS 1, PAD and BOS 0).
    """

    def __init__(self, path: str | Path) -> None:
        tk = _tokenizers()
        self.path = str(path)
        if not Path(path).is_file():
            raise ValueError(f"data.tokenizer: {path}: no such tokenizer file")
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
        vocab = spec.get("model", {}).get("vocab")
        if spec.get("model", {}).get("type") != "BPE" or not isinstance(vocab, dict):
            raise ValueError(f"data.tokenizer: {path} is not a BPE tokenizer file")
        alphabet = byte_alphabet()
        if any(vocab.get(ch) != b for b, ch in enumerate(alphabet)):
            raise ValueError(
                f"data.tokenizer: {path}: ids 0..255 are not the 256 bytes; train it with "
                "experiments/data/train_bpe.py (arjax.data.bpe.train_bpe)"
            )
        self.vocab_size = max(max(vocab.values()) + 1, VOCAB_SIZE)
        char_byte = {ch: b for b, ch in enumerate(alphabet)}
        self.token_bytes = [b""] * self.vocab_size
        for token, i in vocab.items():
            self.token_bytes[i] = bytes(char_byte[c] for c in token)
        lengths = [len(b) for b in self.token_bytes]
        lengths[EOS_ID] = 1
        self.target_bytes = np.asarray(lengths, np.int32)
        self._tok = tk.Tokenizer.from_file(str(path))

    def encode(self, text: str) -> np.ndarray:
        """Token ids (int32, no specials) of ``text``."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """:meth:`encode` of each text (the Rust encoder runs them in parallel)."""
        out = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in out]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids back to text; specials and out-of-range ids dropped, invalid UTF-8 replaced."""
        data = b"".join(self.token_bytes[i] for i in ids if 0 <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def stream(self, docs: list[str]) -> np.ndarray:
        """``BOS doc0 EOS BOS doc1 EOS ...`` as int32 token ids ``[tokens]``."""
        if not docs:
            raise ValueError("no documents to pack")
        parts = []
        for ids in self.encode_batch([d if isinstance(d, str) else d.decode() for d in docs]):
            parts += [np.array([BOS_ID], np.int32), ids, np.array([EOS_ID], np.int32)]
        return np.concatenate(parts)

    def add_target_bytes(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``batch`` plus ``target_bytes`` (the byte count of each target, 0 where masked)."""
        counts = self.target_bytes[batch["targets"]] * (batch["loss_mask"] > 0)
        return {**batch, "target_bytes": counts.astype(np.int32)}


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str) -> BPETokenizer:
    """The tokenizer in file ``path`` (cached per path)."""
    return BPETokenizer(path)


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | Path) -> BPETokenizer:
    """Train a byte-level BPE of ``vocab_size`` ids (bytes + specials + merges) on ``texts``
    and write it to ``path`` in the layout of the module doc."""
    if vocab_size <= VOCAB_SIZE:
        raise ValueError(f"vocab_size must exceed the {VOCAB_SIZE} byte ids, got {vocab_size}")
    tk = _tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tk.decoders.ByteLevel()
    alphabet = byte_alphabet()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIALS), initial_alphabet=alphabet, min_frequency=2,
        show_progress=False, special_tokens=[],
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer=trainer)
    spec = json.loads(tok.to_str())
    learned = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    merged = [t for t, _ in learned if t not in set(alphabet)]
    vocab = {ch: b for b, ch in enumerate(alphabet)}
    vocab.update({t: BYTE_VOCAB + len(SPECIALS) + i for i, t in enumerate(merged)})
    spec["model"]["vocab"] = vocab
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    load_tokenizer.cache_clear()
    return load_tokenizer(str(path))
