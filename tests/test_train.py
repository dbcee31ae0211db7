"""Training: exact resume, gradient accumulation, non-finite guard, CLI end to end."""

from __future__ import annotations

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from arjax.cli import main
from arjax.config import ConfigError
from arjax.train.config import make_run_config
from arjax.train.loop import Trainer, train
from arjax.train.step import cross_entropy, make_train_step

TINY = [
    "model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
    "model.head_dim=16", "model.mlp_dim=64", "model.max_seq_len=64",
    "data.seq_len=32", "data.batch_size=4", "data.val_batches=2",
    "train.log_every=1", "train.eval_every=3", "train.save_every=3", "train.sample_bytes=0",
    "train.progress=false", "train.async_checkpoint=false", "train.warmup_steps=2",
]  # fmt: skip


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _train_losses(path):
    return [(r["step"], r["loss"]) for r in _rows(path) if "loss" in r]


def test_resume_is_bit_exact(tmp_path):
    """2N steps straight == N steps, restart, N more steps: same losses to the bit."""
    cfg = make_run_config("transformer", "tiny", [*TINY, "train.steps=6"])
    straight = train(cfg, tmp_path / "a")
    first = train(cfg, tmp_path / "b", stop_at=3)
    assert first["preempted"] == "stop_at" and first["step"] == 3
    resumed = train(cfg, tmp_path / "b")
    assert _train_losses(tmp_path / "a" / "metrics.jsonl") == _train_losses(
        tmp_path / "b" / "metrics.jsonl"
    )
    assert [s for s, _ in _train_losses(tmp_path / "b" / "metrics.jsonl")] == list(range(1, 7))
    for a, b in zip(
        jax.tree.leaves(straight["state"].params), jax.tree.leaves(resumed["state"].params)
    ):
        np.testing.assert_array_equal(a, b)
    assert straight["val_bits_per_byte"] == resumed["val_bits_per_byte"]


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """Two micro-batches give the one big batch's loss and gradients (compared as the params
    after one SGD step of rate 1: Adam's first step, ``g / (|g| + eps)``, would blow float32
    summation-order noise in a near-zero gradient up to the learning rate)."""
    cfg = make_run_config("transformer", "tiny", [*TINY, "train.steps=2"])
    trainer = Trainer(cfg, tmp_path)
    sgd = optax.sgd(1.0)
    state = trainer.initial_state()
    state = state.replace(opt_state=sgd.init(state.params))
    batch = next(trainer.train_iter)
    one = jax.jit(make_train_step(trainer.model, sgd, 1))(state, batch)
    two = jax.jit(make_train_step(trainer.model, sgd, 2))(state, batch)
    np.testing.assert_allclose(one[1]["loss"], two[1]["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(one[0].params), jax.tree.leaves(two[0].params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_non_finite_step_is_skipped(tmp_path):
    cfg = make_run_config("transformer", "tiny", [*TINY, "train.steps=2"])
    trainer = Trainer(cfg, tmp_path)
    state = trainer.initial_state()
    step = jax.jit(make_train_step(trainer.model, trainer.tx, 1))
    bad = jax.tree.map(lambda p: p.at[...].set(jnp.nan) if p.ndim == 2 else p, state.params)
    new, metrics = step(state.replace(params=bad), next(trainer.train_iter))
    assert int(new.skipped) == 1 and int(new.bad_streak) == 1 and int(new.step) == 1
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(bad)):
        np.testing.assert_array_equal(a, b)  # NaN == NaN under assert_array_equal
    for a, b in zip(jax.tree.leaves(new.opt_state), jax.tree.leaves(state.opt_state)):
        np.testing.assert_array_equal(a, b)


def test_cross_entropy_values():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    total, count = cross_entropy(logits, jnp.array([[0, 1]]), jnp.array([[1, 0]]))
    np.testing.assert_allclose(total, np.log(2.0), rtol=1e-6)
    assert float(count) == 1.0


def _tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """``tag -> [(step, value)]`` from the TFRecord event files in ``folder`` (records are
    ``uint64 length, uint32 crc, Event proto, uint32 crc``)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + length])
            at += 16 + length
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_cli_train_eval_sample(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "transformer", "--preset", "tiny", "--out", str(out)]
    extra = ["train.steps=4", "train.sample_bytes=8", "train.progress=true"]
    sets = [x for s in [*TINY, *extra] for x in ("--set", s)]
    assert main(args + sets) == 0
    printed = capsys.readouterr().out
    assert "validation bits/byte:" in printed and "sample:" in printed
    rows = _rows(out / "metrics.jsonl")
    # stdout is not a terminal: plain progress lines, every log_every (1) steps and at evals
    lines = [x for x in printed.splitlines() if x.startswith("step ")]
    assert len(lines) == 6 and lines[3].startswith("step 3/4: val bits/byte ")
    assert lines[-2] == (
        f"step 4/4: loss {rows[-2]['loss']:.4f}, bits/byte {rows[-2]['bits_per_byte']:.4f}, "
        f"{rows[-2]['tokens_per_s']:,.0f} tokens/s"
    )
    # TensorBoard scalars, one per logged row, readable back
    scalars = _tensorboard_scalars(out / "tb")
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3, 4]
    assert scalars["loss"][-1][1] == pytest.approx(rows[-2]["loss"], rel=1e-6)
    assert scalars["val_bits_per_byte"][-1] == (4, pytest.approx(rows[-1]["val_bits_per_byte"]))
    assert main(["plot", "--out", str(out)]) == 0
    png = out / "curves.png"
    assert capsys.readouterr().out.strip() == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert all(
        np.isfinite(r[k])
        for r in rows
        for k in ("loss", "bits_per_byte", "tokens_per_s", "step_time")
        if "loss" in r
    )
    val = [r for r in rows if "val_bits_per_byte" in r]
    assert [r["step"] for r in val] == [3, 4]

    assert main(["eval", "--out", str(out)]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["step"] == 4
    assert evaluated["val_bits_per_byte"] == pytest.approx(val[-1]["val_bits_per_byte"], 1e-6)

    assert main(["sample", "--out", str(out), "--prompt", "KING.", "--max-bytes", "5"]) == 0
    assert capsys.readouterr().out.startswith("KING.")


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "train.stepz: unknown config key"),
        ("train.steps=abc", "train.steps: expected an int"),
        ("model.num_kv_heads=3", "model.num_kv_heads: must divide num_heads"),
        ("data.seq_len=4096", "data.seq_len: 4096 exceeds model.max_seq_len"),
        ("train", "expected key=value"),
    ],
)
def test_cli_config_errors(tmp_path, capsys, override, message):
    code = main(["train", "--model", "transformer", "--out", str(tmp_path), "--set", override])
    assert code == 2
    assert message in capsys.readouterr().err


def test_unknown_model_and_preset():
    with pytest.raises(ValueError, match="unknown model 'gpt9'"):
        make_run_config("gpt9", "tiny")
    with pytest.raises(ConfigError, match="preset: 'huge' is not a preset"):
        make_run_config("transformer", "huge")
