"""BPE baseline: tokenizer layout, token batches with byte counts, bits/byte, sampling."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

pytest.importorskip("tokenizers")

from arjax.config import ConfigError  # noqa: E402
from arjax.data.bpe import byte_alphabet, load_tokenizer, train_bpe  # noqa: E402
from arjax.data.corpus import load_corpus  # noqa: E402
from arjax.data.pipeline import DataConfig, make_eval_batches  # noqa: E402
from arjax.data.vocab import BOS_ID, EOS_ID, PAD_ID  # noqa: E402
from arjax.generate import generate, sample  # noqa: E402
from arjax.train.config import make_run_config  # noqa: E402
from arjax.train.loop import train  # noqa: E402

VOCAB = 420
DOCS = [
    "Größenänderung der Fensterrahmen — naïve café.\nZweite Zeile: 42 Äpfel!\n",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "emoji 😀 and tabs\tand  double  spaces\n\n\nend",
]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    train_bpe([d[:20000] for d in load_corpus("train")[:4]], VOCAB, path)
    return str(path)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    plays = load_corpus("val")
    for split, docs in {"train": [p[:6000] for p in plays] + DOCS, "val": DOCS}.items():
        (root / split).mkdir()
        for i, doc in enumerate(docs):
            (root / split / f"{i:02d}.txt").write_text(doc, encoding="utf-8")
    return str(root)


def test_layout_and_lossless_encoding(tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    assert tok.vocab_size == VOCAB
    # ids 0..255 are the bytes, 256..258 the byte pipeline's specials.
    assert [tok.token_bytes[b] for b in range(256)] == [bytes([b]) for b in range(256)]
    assert tok.token_bytes[PAD_ID] == tok.token_bytes[BOS_ID] == tok.token_bytes[EOS_ID] == b""
    assert len(set(byte_alphabet())) == 256
    for text in DOCS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert b"".join(tok.token_bytes[i] for i in ids) == text.encode("utf-8")
        assert int(tok.target_bytes[ids].sum()) == len(text.encode("utf-8"))
    common = tok.encode(" the")
    assert len(common) == 1 and common[0] >= 259  # a frequent word is one merged token


def test_token_batches_count_every_byte_once(tokenizer_path, corpus_dir):
    """Over all val windows, target_bytes * loss_mask sums to the split's UTF-8 bytes plus
    one per document (its EOS), the byte models' target count on the same text."""
    cfg = DataConfig(corpus=corpus_dir, seq_len=16, batch_size=4, val_batches=0,
                     tokenizer=tokenizer_path)  # fmt: skip
    batches = make_eval_batches(cfg)
    counted = sum(int(np.sum(b["target_bytes"] * b["loss_mask"])) for b in batches)
    assert counted == sum(len(d.encode("utf-8")) + 1 for d in DOCS)
    byte_batches = make_eval_batches(DataConfig(corpus=corpus_dir, seq_len=16, batch_size=4,
                                                val_batches=0))  # fmt: skip
    assert counted == sum(int(b["loss_mask"].sum()) for b in byte_batches)
    tok = load_tokenizer(tokenizer_path)
    stream = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in batches])
    assert tok.decode(stream) == "".join(DOCS)


def _hand_bits_per_byte(model, params, batches) -> float:
    """Summed nats of the masked targets (numpy log-softmax) / (ln 2 * their bytes)."""
    nats, nbytes = 0.0, 0
    forward = jax.jit(model.apply)  # one compiled program, not op by op
    for b in batches:
        logits = np.asarray(forward({"params": params}, b), np.float64)
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        picked = np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
        nats -= float(np.sum(picked * b["loss_mask"]))
        nbytes += int(np.sum(b["target_bytes"] * b["loss_mask"]))
    return nats / (math.log(2) * nbytes)


def test_train_reports_bits_per_byte_and_samples_text(tokenizer_path, corpus_dir, tmp_path):
    overrides = [
        f"data.corpus={corpus_dir}", f"data.tokenizer={tokenizer_path}", "data.seq_len=32",
        "data.batch_size=4", "data.val_batches=0", "model.d_model=32", "model.num_layers=1",
        "model.num_heads=2", "model.num_kv_heads=1", "model.head_dim=16", "model.mlp_dim=64",
        "model.max_seq_len=64", "train.steps=4", "train.eval_every=4", "train.sample_bytes=0",
        "train.progress=false", "train.async_checkpoint=false", "train.warmup_steps=1",
    ]  # fmt: skip
    cfg = make_run_config("transformer", "tiny", overrides)
    assert cfg.model.vocab_size == VOCAB  # taken from the tokenizer
    last = train(cfg, tmp_path / "run")
    trainer, params = last["trainer"], last["state"].params
    hand = _hand_bits_per_byte(trainer.model, params, trainer.eval_batches)
    np.testing.assert_allclose(last["val_bits_per_byte"], hand, rtol=1e-5)
    # per token it is larger: every token holds >= 1 byte
    assert last["val_loss"] / math.log(2) > last["val_bits_per_byte"]

    tok = load_tokenizer(tokenizer_path)
    text = sample("transformer", trainer.model, params, cfg, prompts=["To be"], max_bytes=40,
                  seed=3, temperature=1.0, top_p=None)  # fmt: skip
    gen = generate(trainer.model, params, ["To be"], max_new_bytes=40, temperature=1.0,
                   rng=jax.random.key(3), tokenizer=tok)  # fmt: skip
    expected = gen.texts[0].encode()[:40].decode(errors="ignore")
    assert text == "To be" + expected and len(expected.encode()) > 0


def test_tokenizer_errors(tokenizer_path, tmp_path):
    with pytest.raises(ConfigError, match="model.vocab_size: 300"):
        from arjax.train.data import make_data

        make_data(make_run_config("transformer", "tiny", [
            f"data.tokenizer={tokenizer_path}", "model.vocab_size=300"]))  # fmt: skip
    with pytest.raises(ValueError, match="no such tokenizer file"):
        load_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="must exceed"):
        train_bpe(["abc"], 200, tmp_path / "t.json")
