"""Chunked cross-entropy: equal to the float32 reference (values and gradients), equal to the
default training step when wired through ``model.loss_chunk``, and much smaller in memory."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from arjax.config import ConfigError
from arjax.models import build_model
from arjax.models.transformer import TransformerLMConfig
from arjax.ops import chunked_cross_entropy, cross_entropy_reference
from arjax.train.config import make_run_config
from arjax.train.loop import Trainer
from arjax.train.step import make_eval_step, make_train_step


def _inputs(rng, b=2, s=13, d=16, v=37, dtype=jnp.float32):
    hidden = jnp.asarray(rng.normal(size=(b, s, d)), dtype)
    weight = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), dtype)
    targets = jnp.asarray(rng.integers(0, v, (b, s)), jnp.int32)
    mask = rng.random((b, s)) > 0.3
    mask[0, 0] = mask[-1, -1] = False  # at least one masked token (its gradient must be 0)
    return hidden, weight, targets, jnp.asarray(mask, jnp.int32)


def _mean_loss_and_grads(fn, hidden, weight, targets, mask):
    """Masked mean nats (what the step reports) and its grads w.r.t. hidden, weight, mask."""

    def mean(h, w, m):
        total, count = fn(h, w, targets, m)
        return total / count

    grads = jax.jit(jax.value_and_grad(mean, argnums=(0, 1, 2)))  # compiled, not op by op
    return grads(hidden, weight, mask.astype(jnp.float32))


@pytest.mark.parametrize("chunk_size", [1, 4, 13, 64])  # 4: ragged tail; 64 > seq: one chunk
def test_chunked_matches_reference(rng, chunk_size):
    args = _inputs(rng)
    chunked = lambda *a: chunked_cross_entropy(*a, chunk_size=chunk_size)  # noqa: E731
    want, want_grads = _mean_loss_and_grads(cross_entropy_reference, *args)
    got, got_grads = _mean_loss_and_grads(chunked, *args)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(got_grads, want_grads):  # d hidden, d weight, d mask
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    total, count = chunked_cross_entropy(*args, chunk_size=chunk_size)
    assert float(count) == float(args[3].sum())
    hidden, _, _, mask = args
    assert float(jnp.abs(got_grads[0][mask == 0]).max()) == 0.0  # masked tokens: no gradient


def test_chunked_weighted_mask_and_empty_mask(rng):
    hidden, weight, targets, mask = _inputs(rng)
    weights = jnp.asarray(rng.random(mask.shape), jnp.float32)
    want = cross_entropy_reference(hidden, weight, targets, weights)
    got = chunked_cross_entropy(hidden, weight, targets, weights, chunk_size=5)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    empty = jnp.zeros_like(mask)
    total, count = chunked_cross_entropy(hidden, weight, targets, empty, chunk_size=5)
    assert float(total) == 0.0 and float(count) == 0.0


def test_chunked_bf16_compute_vs_float32_reference(rng):
    """bf16 hidden/weight (logits computed in bf16, logsumexp in float32) vs the float32
    reference on the same bf16 values: loss within 1e-3 relative, gradients within 1e-2 of
    their largest entry (bf16 has an 8-bit mantissa: ~4e-3 per rounding; measured ~1e-5 and
    ~4e-3)."""
    args = _inputs(rng, s=24, d=32, v=300, dtype=jnp.bfloat16)
    chunked = lambda *a: chunked_cross_entropy(*a, chunk_size=7)  # noqa: E731
    want, want_grads = _mean_loss_and_grads(cross_entropy_reference, *args)
    got, got_grads = _mean_loss_and_grads(chunked, *args)
    assert got.dtype == jnp.float32
    assert [g.dtype for g in got_grads] == [jnp.bfloat16, jnp.bfloat16, jnp.float32]
    np.testing.assert_allclose(got, want, rtol=1e-3)
    for g, w in zip(got_grads, want_grads):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        np.testing.assert_allclose(g, w, atol=1e-2 * np.abs(w).max())


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(chunk_size=0), "chunk_size must be a positive int"),
        (dict(chunk_size=-8), "chunk_size must be a positive int"),
        (dict(chunk_size=2.0), "chunk_size must be a positive int"),
        (dict(targets=jnp.zeros((2, 13), jnp.float32)), "targets must be integer"),
        (dict(targets=jnp.zeros((2, 12), jnp.int32)), "targets must be integer"),
        (dict(mask=jnp.ones((13, 2))), "mask must be"),
        (dict(weight=jnp.ones((8, 37))), "weight .* is not"),
        (dict(hidden=jnp.ones((26, 16))), "hidden must be"),
        (
            dict(
                hidden=jnp.ones((2, 0, 16)),
                targets=jnp.zeros((2, 0), jnp.int32),
                mask=jnp.ones((2, 0)),
            ),
            "hidden has an empty sequence",
        ),  # fmt: skip
    ],
)
def test_chunked_rejects_bad_inputs_before_compiling(rng, change, message):
    hidden, weight, targets, mask = _inputs(rng)
    kw = dict(hidden=hidden, weight=weight, targets=targets, mask=mask, chunk_size=4) | change
    chunk_size = kw.pop("chunk_size")
    fn = jax.jit(lambda **a: chunked_cross_entropy(**a, chunk_size=chunk_size))
    with pytest.raises(ValueError, match=f"cross_entropy: {message}"):
        fn.lower(**kw)  # raised while tracing: nothing is compiled


def test_chunked_uses_far_less_temp_memory():
    """Compiled value-and-grad, vocab 32768, 2x1024 tokens: the reference holds the whole
    float32 logits and their gradient (256 MiB each), the chunked form one 128-position chunk
    (measured on CPU: 512 MiB vs 65 MiB, ratio 0.13)."""
    b, s, d, v = 2, 1024, 64, 32768
    args = (
        jax.ShapeDtypeStruct((b, s, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((b, s), jnp.int32),
        jax.ShapeDtypeStruct((b, s), jnp.float32),
    )

    def temp_bytes(fn):
        grad = jax.grad(lambda h, w, t, m: fn(h, w, t, m)[0], argnums=(0, 1))
        return jax.jit(grad).lower(*args).compile().memory_analysis().temp_size_in_bytes

    full = temp_bytes(cross_entropy_reference)
    chunked = temp_bytes(lambda *a: chunked_cross_entropy(*a, chunk_size=128))
    assert full >= b * s * v * 4  # at least the float32 logits
    assert chunked < 0.25 * full, (chunked, full)


# ---------------------------------------------------------------- through the model and step

TINY = [
    "model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
    "model.head_dim=16", "model.mlp_dim=64", "model.max_seq_len=64",
    "data.seq_len=40", "data.batch_size=4", "data.val_batches=1", "train.warmup_steps=0",
]  # fmt: skip


@pytest.mark.parametrize(
    "name, tie", [("transformer", True), ("transformer", False), ("gla", True)]
)
def test_train_step_with_loss_chunk_matches_default(tmp_path, name, tie):
    """``--set model.loss_chunk=16`` (40 positions: a ragged last chunk; two rows with masked
    tails) gives the default step's loss, token count and gradients (float32, rtol 1e-5 / atol
    1e-6) and the default eval step's sums. The gradients are compared as the params after one
    SGD step of rate 1: Adam's first step, ``g / (|g| + eps)``, turns float32 summation-order
    noise in a near-zero gradient into a difference of up to the learning rate (seen: 1.8e-5
    relative on one of 2048 values)."""
    kv_heads = "model.num_kv_heads=1" if name == "transformer" else "model.num_kv_heads=2"
    tiny = [kv_heads if "num_kv_heads" in x else x for x in TINY]  # a mixer takes no GQA
    sets = [*tiny, f"model.tie_embeddings={tie}", "model.loss_chunk=16"]
    trainer = Trainer(make_run_config(name, "tiny", sets), tmp_path)
    assert trainer.model.config.loss_chunk == 16
    default = build_model(name, dataclasses.replace(trainer.model.config, loss_chunk=None))
    sgd = optax.sgd(1.0)
    state = trainer.initial_state()
    state = state.replace(opt_state=sgd.init(state.params))
    batch = dict(next(trainer.train_iter))
    batch["loss_mask"] = batch["loss_mask"] * (np.arange(40) < [[40], [33], [40], [7]])
    want_state, want = jax.jit(make_train_step(default, sgd))(state, batch)
    got_state, got = jax.jit(make_train_step(trainer.model, sgd))(state, batch)
    assert float(got["tokens"]) == float(want["tokens"])
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
    np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    got_eval = jax.jit(make_eval_step(trainer.model))(state.params, batch)
    want_eval = jax.jit(make_eval_step(default))(state.params, batch)
    np.testing.assert_allclose(got_eval, want_eval, rtol=1e-6)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_head_reproduces_logits(rng, tie, dtype):
    """``einsum(*model.head(batch))`` is the model's logits in every head layout and dtype."""
    cfg = TransformerLMConfig(
        d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64,
        max_seq_len=16, vocab_size=50, tie_embeddings=tie, dtype=dtype, loss_chunk=4,
    )  # fmt: skip
    model = build_model("transformer", cfg)
    tokens = jnp.asarray(rng.integers(0, 50, (2, 16)), jnp.int32)
    batch = {"inputs": tokens, "positions": jnp.broadcast_to(jnp.arange(16), (2, 16))}
    params = jax.jit(model.init)(jax.random.key(0), batch)  # compiled: eager is op by op
    hidden, weight = jax.jit(lambda p, b: model.apply(p, b, method="head"))(params, batch)
    assert hidden.shape == (2, 16, 32) and weight.shape == (32, 50)
    logits = jnp.einsum("bsd,dv->bsv", hidden, weight).astype(jnp.float32)
    # The two contractions may sum in different orders, so they agree to rounding, not bit for
    # bit. Bound each against float64: a length-d dot product accumulated in precision u is off
    # by at most gamma_d * sum|h||w| with gamma_d = d u / (1 - d u) (Higham 2002, eq. 3.5), plus
    # one rounding of the result to the output dtype. A wrong or transposed head, a missing
    # scale or a dropped vocabulary row is orders of magnitude outside it.
    h64, w64 = np.asarray(hidden, np.float64), np.asarray(weight, np.float64)
    want = np.einsum("bsd,dv->bsv", h64, w64)
    u = float(jnp.finfo(dtype).eps) / 2  # unit roundoff of the compute dtype
    d = h64.shape[-1]
    bound = d * u / (1 - d * u) * np.einsum("bsd,dv->bsv", abs(h64), abs(w64)) + u * abs(want)
    for got in (logits, jax.jit(model.apply)(params, batch)):
        err = abs(np.asarray(got, np.float64) - want)
        assert (err <= bound).all(), f"max error {err.max():.3g}, worst bound {bound.max():.3g}"


@pytest.mark.parametrize("value", ["0", "-4"])
def test_loss_chunk_config_is_validated(value):
    with pytest.raises(ConfigError, match="model.loss_chunk: must be a positive int"):
        make_run_config("transformer", "tiny", [f"model.loss_chunk={value}"])
    with pytest.raises(ConfigError, match="loss_chunk: must be a positive int"):
        TransformerLMConfig(loss_chunk=int(value))
    assert (
        make_run_config("transformer", "tiny", ["model.loss_chunk=none"]).model.loss_chunk is None
    )
