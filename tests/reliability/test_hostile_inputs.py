"""Hostile inputs: random and invalid bytes for the data pipeline, invalid values for every
config class, bad shapes/dtypes for the attention op, and no pickle anywhere."""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arjax.cli import main
from arjax.config import ConfigError
from arjax.data import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, pack_documents, text_to_batch
from arjax.data.corpus import load_texts_from_dir
from arjax.data.pipeline import DataConfig, make_train_iterator
from arjax.models import MODELS
from arjax.nn.linear_attention import MIXER_CONFIGS
from arjax.nn.transformer import TransformerConfig
from arjax.ops.attention import attention, validate_attention_args
from arjax.train.config import TrainConfig
from arjax.train.sharding import MeshConfig

ROOT = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------- data pipeline


def _check_packing(docs: list[bytes], seq_len: int) -> None:
    """Windows must tile BOS doc EOS BOS doc EOS ... exactly, then PAD."""
    stream = np.concatenate([[BOS_ID, *d, EOS_ID] for d in docs]).astype(np.int32)
    out = pack_documents(docs, seq_len)
    n = out["inputs"].shape[0]
    assert n == math.ceil((len(stream) - 1) / seq_len)
    assert all(v.shape == (n, seq_len) and v.dtype == np.int32 for v in out.values())
    inputs, targets = out["inputs"].reshape(-1), out["targets"].reshape(-1)
    np.testing.assert_array_equal(inputs[: len(stream) - 1], stream[:-1])
    np.testing.assert_array_equal(targets[: len(stream) - 1], stream[1:])
    assert (targets[len(stream) - 1 :] == PAD_ID).all()
    assert ((inputs >= 0) & (inputs < VOCAB_SIZE)).all()
    # a prediction is counted unless the target is PAD or the next document's BOS
    mask = out["loss_mask"].reshape(-1)
    np.testing.assert_array_equal(mask, (targets != PAD_ID) & (targets != BOS_ID))


@settings(max_examples=150, deadline=None)
@given(docs=st.lists(st.binary(max_size=300), min_size=1, max_size=6), seq_len=st.integers(1, 64))
def test_pack_documents_of_random_bytes_tile_the_stream(docs, seq_len):
    _check_packing(docs, seq_len)


def test_pack_documents_empty_and_huge_documents():
    _check_packing([b"", b"", b"x", b""], 3)
    huge = np.random.default_rng(0).integers(0, 256, 2_000_003, dtype=np.uint8).tobytes()
    _check_packing([b"", huge, b"tail"], 4096)
    with pytest.raises(ValueError, match="no documents"):
        pack_documents([], 8)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(min_size=1, max_size=200))
def test_dir_corpus_invalid_utf8_is_rejected_naming_file_and_offset(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("corpus")
    for split in ("train", "val"):
        (root / split).mkdir()
        (root / split / "a.txt").write_text("fine text\n")
        (root / split / "b.txt").write_bytes(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        with pytest.raises(ValueError, match=rf"b\.txt: invalid UTF-8 at byte offset {e.start}"):
            make_train_iterator(DataConfig(corpus=str(root), seq_len=8, batch_size=2))
    else:
        assert load_texts_from_dir(root / "train") == ["fine text\n", text]


def test_text_to_batch_rejects_empty_and_too_long_text():
    with pytest.raises(ValueError, match="text 1 is empty"):
        text_to_batch(["ok", ""], 8)
    with pytest.raises(ValueError, match="text 0 has 8 bytes"):
        text_to_batch(["é" * 4], 8)


# ---------------------------------------------------------------- configs


def _config_bases() -> dict[str, typing.Any]:
    """One valid instance of every config class (the registry's `tiny` presets included)."""
    classes = (DataConfig, TrainConfig, MeshConfig, *MIXER_CONFIGS.values())
    bases = {c.__name__: c() for c in classes}
    bases["TransformerConfig"] = TransformerConfig(
        d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64
    )
    for spec in MODELS.values():
        bases.setdefault(type(spec.presets["tiny"]).__name__, spec.presets["tiny"])
    return bases


BASES = _config_bases()
ANY_INT_IS_VALID = {("TrainConfig", "seed")}  # every integer is a usable PRNG seed


def _fields_of(kinds: tuple[type, ...]) -> list[tuple[str, str]]:
    out = []
    for name, base in BASES.items():
        hints = typing.get_type_hints(type(base))
        for f in dataclasses.fields(base):
            hint = hints[f.name]
            args = typing.get_args(hint) or (hint,)
            if any(a in kinds for a in args) and bool not in args:
                out.append((name, f.name))
    return out


INT_FIELDS = [f for f in _fields_of((int,)) if f not in ANY_INT_IS_VALID]
FLOAT_FIELDS = _fields_of((float,))


def _assert_rejected(cls_name: str, field: str, value: typing.Any) -> None:
    with pytest.raises(ConfigError, match=rf"(^|\b){re.escape(field)}\b"):
        dataclasses.replace(BASES[cls_name], **{field: value})


def test_every_config_class_is_covered():
    assert {"DataConfig", "TrainConfig", "MeshConfig", "TransformerConfig"} <= set(BASES)
    assert {spec.config_cls.__name__ for spec in MODELS.values()} <= set(BASES)
    assert len(INT_FIELDS) > 20 and len(FLOAT_FIELDS) > 5


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(INT_FIELDS), value=st.integers(max_value=-2))
def test_negative_int_fields_are_rejected_naming_the_field(field, value):
    _assert_rejected(*field, value)


@settings(max_examples=200, deadline=None)
@given(
    field=st.sampled_from(FLOAT_FIELDS),
    value=st.one_of(st.floats(max_value=-1e-9, allow_infinity=False), st.just(math.nan)),
)
def test_negative_or_nan_float_fields_are_rejected_naming_the_field(field, value):
    _assert_rejected(*field, value)


@pytest.mark.parametrize("override,field", [
    ("model.d_model=-3", "d_model"), ("data.seq_len=0", "seq_len"),
    ("train.learning_rate=nan", "learning_rate"), ("train.steps=ten", "train.steps"),
    ("model.no_such_field=1", "no_such_field"), ("mesh.fsdp=0", "fsdp"),
])  # fmt: skip
def test_cli_rejects_bad_overrides_before_any_work(tmp_path, capsys, override, field):
    assert main(["train", "--model", "transformer", "--out", str(tmp_path / "r"),
                 "--set", override]) == 2  # fmt: skip
    assert field in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # rejected before touching the run directory


def test_cli_validates_paths(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    assert main(["train", "--model", "transformer", "--out", str(a_file)]) == 2
    assert "is a file, not a run folder" in capsys.readouterr().err
    assert main(["eval", "--out", str(tmp_path / "missing")]) == 2
    assert "has no config.json" in capsys.readouterr().err


# ---------------------------------------------------------------- ops


_dims = st.integers(1, 4)


@settings(max_examples=400, deadline=None)
@given(
    q_shape=st.tuples(_dims, _dims, _dims, st.sampled_from([4, 8])),
    kv_shape=st.tuples(_dims, _dims, _dims, st.sampled_from([4, 8])),
    v_len=_dims, causal=st.booleans(), window=st.sampled_from([None, -1, 0, 2]),
    dtypes=st.sampled_from([("float32",) * 3, ("bfloat16",) * 3, ("float32", "float32", "int32"),
                            ("float32", "bfloat16", "float32")]),
)  # fmt: skip
def test_attention_validation_accepts_exactly_the_consistent_arguments(
    q_shape, kv_shape, v_len, causal, window, dtypes
):
    """Validation (at trace time, before compiling) raises iff the arguments are inconsistent."""
    b, q_len, h, d = q_shape
    v_shape = (kv_shape[0], v_len, kv_shape[2], kv_shape[3])
    q, k, v = (np.zeros(s, jnp.dtype(t)) for s, t in zip((q_shape, kv_shape, v_shape), dtypes))
    consistent = (
        dtypes[0] == dtypes[1] == dtypes[2] != "int32"
        and kv_shape[:3] == v_shape[:3]
        and (kv_shape[0], kv_shape[3]) == (b, d)
        and h % kv_shape[2] == 0
        and (window is None or (window > 0 and causal))
        and (not causal or q_len <= kv_shape[1])
    )
    if consistent:
        validate_attention_args(q, k, v, causal=causal, window=window)
    else:
        with pytest.raises(ValueError, match="^attention: "):
            validate_attention_args(q, k, v, causal=causal, window=window)


def _qkv(q_shape=(1, 4, 2, 8), kv_shape=(1, 4, 1, 8), dtype=jnp.float32, v_dtype=None):
    return (jnp.zeros(q_shape, dtype), jnp.zeros(kv_shape, dtype),
            jnp.zeros(kv_shape, v_dtype or dtype))  # fmt: skip


@pytest.mark.parametrize("args,kwargs,message", [
    (_qkv((1, 4, 8), (1, 4, 8)), {}, r"q must be \[batch, len, heads, head_dim\]"),
    (_qkv(dtype=jnp.int32), {}, "q must be floating point"),
    (_qkv(v_dtype=jnp.bfloat16), {}, "dtypes differ"),
    (_qkv((1, 4, 3, 8), (1, 4, 2, 8)), {}, "heads=3 is not a multiple of kv_heads=2"),
    (_qkv((1, 4, 2, 8), (1, 4, 1, 4)), {}, "does not match q"),
    (_qkv((2, 4, 2, 8), (1, 4, 1, 8)), {}, "does not match q"),
    (_qkv((1, 5, 2, 8), (1, 4, 1, 8)), {"causal": True}, "causal needs q_len <= kv_len"),
    (_qkv(), {"window": 2}, "window requires causal=True"),
    (_qkv(), {"window": 0, "causal": True}, "window must be a positive int"),
    (_qkv(), {"impl": "cuda"}, "impl must be one of"),
    (_qkv(), {"q_segment_ids": jnp.zeros((1, 4), jnp.int32)}, "pass both"),
    (_qkv(), {"q_segment_ids": jnp.zeros((1, 3), jnp.int32),
              "kv_segment_ids": jnp.zeros((1, 4), jnp.int32)}, r"q_segment_ids must be"),
])  # fmt: skip
def test_attention_rejects_bad_shapes_and_dtypes(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        attention(*args, **kwargs)


# ---------------------------------------------------------------- loading never runs code

UNSAFE = re.compile(
    r"\b(import\s+(c?pickle|dill|cloudpickle|joblib|shelve|marshal)|from\s+(c?pickle|dill|"
    r"cloudpickle|joblib|shelve|marshal)\s+import|allow_pickle\s*=\s*True|torch\.load|"
    r"yaml\.(unsafe_)?load\(|\beval\(|\bexec\()"
)


def test_no_module_uses_pickle_or_executes_loaded_code():
    sources = sorted((ROOT / "arjax").rglob("*.py")) + sorted(
        (ROOT / "kernels_pallas").rglob("*.py")
    )
    assert len(sources) > 20
    offenders = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in sources
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if UNSAFE.search(line) and not line.lstrip().startswith("#")
    ]
    assert offenders == []
