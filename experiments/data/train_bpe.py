"""Train the BPE baseline's tokenizer on a corpus' train split (offline, seconds to minutes).

    python experiments/data/train_bpe.py --corpus data/corpus/en --vocab 32768 \\
        --out data/bpe32k.json

Byte-level BPE (:func:`arjax.data.bpe.train_bpe`: ids 0-255 bytes, 256-258 PAD/BOS/EOS,
merges after), trained on the documents of ``CORPUS/train`` in file-name order, at most
``--max-mb`` MB of them. Prints the vocabulary size, the mean bytes per token on the val
split and the file's SHA-256. Use it with ``--set data.tokenizer=data/bpe32k.json``.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from arjax.data.bpe import train_bpe
from arjax.data.corpus import load_texts_from_dir


def capped(texts: list[str], max_mb: float) -> list[str]:
    """The leading documents of ``texts`` whose UTF-8 size stays within ``max_mb`` MB."""
    out, total = [], 0
    for t in texts:
        total += len(t.encode("utf-8"))
        if total > max_mb * 1e6:
            break
        out.append(t)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True, help="directory with train/ and val/")
    p.add_argument("--vocab", type=int, default=32768, help="ids in total (bytes + specials)")
    p.add_argument("--out", required=True, help="tokenizer JSON to write")
    p.add_argument("--max-mb", type=float, default=1e9, help="train on at most this much")
    args = p.parse_args()

    train = capped(load_texts_from_dir(Path(args.corpus) / "train"), args.max_mb)
    tok = train_bpe(train, args.vocab, args.out)
    val = load_texts_from_dir(Path(args.corpus) / "val")
    tokens = sum(len(ids) for ids in tok.encode_batch(val))
    nbytes = sum(len(t.encode("utf-8")) for t in val)
    digest = hashlib.sha256(Path(args.out).read_bytes()).hexdigest()
    print(f"{args.out}: {tok.vocab_size} ids, trained on {len(train)} documents; "
          f"val {nbytes / tokens:.3f} bytes/token; sha256 {digest}")  # fmt: skip


if __name__ == "__main__":
    main()
