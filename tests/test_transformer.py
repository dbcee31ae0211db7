"""Transformer LM: cached decoding == full forward, generation, sampling, bad input."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from arjax.config import ConfigError
from arjax.data.vocab import BOS_ID, EOS_ID
from arjax.generate import filter_logits, generate, sample_token
from arjax.models.transformer import PRESETS, TransformerLM, TransformerLMConfig
from arjax.nn import unrolled
from arjax.nn.transformer import Transformer, TransformerConfig

CFG = TransformerLMConfig(
    d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
    max_seq_len=64, dtype="float32",
)  # fmt: skip


def _batch(tokens):
    tokens = jnp.asarray(tokens, jnp.int32)
    b, n = tokens.shape
    return dict(
        inputs=tokens,
        positions=jnp.broadcast_to(jnp.arange(n), (b, n)),
        segment_ids=jnp.ones((b, n), jnp.int32),
    )


def _params(model, seed=0, scale=1.0):
    init = jax.jit(model.init)  # one compiled program, not op by op (compiles dominate)
    params = nn.meta.unbox(init(jax.random.key(seed), _batch(np.zeros((1, 8))))["params"])
    # Larger weights than the init so that argmax is not constant.
    return jax.tree.map(lambda p: p * scale, params)


@pytest.mark.parametrize("window", [None, 5])
def test_teacher_forced_decode_matches_full_forward(rng, window):
    """Prefill + one-token decode steps give the full forward's logits at every step."""
    cfg = dataclasses.replace(CFG, window=window)
    model = TransformerLM(cfg)
    params = _params(model, scale=3.0)
    b, prompt, total = 2, 4, 20
    seq = rng.integers(0, 256, (b, total))
    # each entry point compiled once (the decode step's position and index traced)
    full = jax.jit(model.apply)({"params": params}, _batch(seq))
    prefill = jax.jit(lambda p, *a: model.apply(p, *a, total, method="prefill", mutable=["cache"]))
    decode = jax.jit(lambda p, *a: model.apply(p, *a, method="decode", mutable=["cache"]))
    logits, vars_ = prefill(
        {"params": params}, jnp.asarray(seq[:, :prompt], jnp.int32),
        jnp.broadcast_to(jnp.arange(prompt), (b, prompt)), jnp.ones((b, prompt), jnp.int32),
    )  # fmt: skip
    # float32; decode and prefill multiply 1 or 4 rows where the full forward multiplies 20, so
    # sums run in another order. Logits reach ~40 with scale-3 weights: atol 5e-4 is ~1e-5 of
    # their range (atol 1e-4 failed once in several CI runs: an error of ~2e-4 near a logit ~0).
    tol = dict(rtol=1e-4, atol=5e-4)
    np.testing.assert_allclose(logits, full[:, :prompt], **tol)
    cache = vars_["cache"]
    for t in range(prompt, total):
        slots = jnp.arange(total)
        visible = slots <= t
        if window is not None:
            visible &= slots > t - window
        step, vars_ = decode(
            {"params": params, "cache": cache}, jnp.asarray(seq[:, t : t + 1], jnp.int32),
            jnp.full((b, 1), t), jnp.int32(t), jnp.broadcast_to(visible, (b, total)),
        )  # fmt: skip
        cache = vars_["cache"]
        np.testing.assert_allclose(step[:, 0], full[:, t], **tol)


@pytest.mark.parametrize("b", [1, 2])
def test_decode_with_per_row_slots_matches_full_forward(rng, b):
    """``cache_index`` ``[batch]``: each row writes its own slot, so rows advance at their own
    pace (the last row waits at every third step, writing into a sink slot past the text that
    no query sees); one row is written as an update slice, several by a scatter."""
    model = TransformerLM(CFG)
    params = _params(model, scale=3.0)
    prompt, total = 3, 16
    seq = rng.integers(0, 256, (b, total))
    full = jax.jit(model.apply)({"params": params}, _batch(seq))
    _, vars_ = jax.jit(lambda p, *a: model.apply(p, *a, total + 1, method="prefill",
                                                 mutable=["cache"]))(
        {"params": params}, jnp.asarray(seq[:, :prompt], jnp.int32),
        jnp.broadcast_to(jnp.arange(prompt), (b, prompt)), jnp.ones((b, prompt), jnp.int32),
    )  # fmt: skip
    decode = jax.jit(lambda p, *a: model.apply(p, *a, method="decode", mutable=["cache"]))
    cache, t = vars_["cache"], np.full(b, prompt)
    for step in range(2 * (total - prompt)):
        moves = (t < total) & ((np.arange(b) < b - 1) | (step % 3 != 2))
        index = np.where(moves, t, total)  # the sink: no query sees it
        pos = np.minimum(t, total - 1)
        logits, vars_ = decode(
            {"params": params, "cache": cache}, jnp.asarray(seq[np.arange(b), pos][:, None]),
            jnp.asarray(pos[:, None]), jnp.asarray(index, jnp.int32),
            jnp.asarray(np.arange(total + 1)[None, :] <= pos[:, None]),
        )  # fmt: skip
        cache = vars_["cache"]
        for r in np.flatnonzero(moves):
            np.testing.assert_allclose(logits[r, 0], full[r, t[r]], rtol=1e-4, atol=5e-4)
        t = t + moves
    assert (t == total).all()


@pytest.mark.parametrize("window", [None, 4])
def test_greedy_generation_equals_argmax_of_full_forward(rng, window):
    model = TransformerLM(dataclasses.replace(CFG, window=window))
    params = _params(model, seed=1, scale=3.0)
    prompts = [bytes(rng.integers(0, 256, n).tolist()) for n in (2, 8, 0)]
    outs = generate(model, params, prompts, max_new_bytes=12).tokens
    assert len(set(map(tuple, outs))) > 1
    # all rows in one forward, zero-padded on the right (causal: the tail changes no logit)
    rows = [[BOS_ID, *prompt, *out] for prompt, out in zip(prompts, outs, strict=True)]
    seqs = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for i, row in enumerate(rows):
        seqs[i, : len(row)] = row
    all_logits = (
        jax.jit(model.apply)({"params": params}, _batch(seqs)).at[..., 256:258].set(-jnp.inf)
    )
    for prompt, out, row, logits in zip(prompts, outs, rows, all_logits, strict=True):
        predicted = np.asarray(jnp.argmax(logits[: len(row)], -1))[len(prompt) :]
        np.testing.assert_array_equal(predicted[:-1], out)
        if len(out) < 12:  # the row ended because the full forward's next argmax is EOS
            assert predicted[-1] == EOS_ID


def test_top_k_top_p_filtering_values():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda x: np.isfinite(np.asarray(x)) & (np.asarray(x) > -1e30)  # noqa: E731
    np.testing.assert_array_equal(kept(filter_logits(logits, top_k=2)), [[1, 1, 0, 0, 0]])
    # Nucleus 0.6: 0.5 alone < 0.6, so the second token is needed too.
    np.testing.assert_array_equal(kept(filter_logits(logits, top_p=0.6)), [[1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(kept(filter_logits(logits, top_p=0.5)), [[1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(kept(filter_logits(logits, top_p=0.86)), [[1, 1, 1, 1, 0]])


def test_sampling_follows_the_distribution():
    probs = jnp.array([0.6, 0.3, 0.1])
    logits = jnp.broadcast_to(jnp.log(probs), (20000, 3))
    draws = sample_token(logits, jax.random.key(0), temperature=1.0)
    freq = np.bincount(np.asarray(draws), minlength=3) / 20000
    np.testing.assert_allclose(freq, probs, atol=0.015)
    assert np.all(np.asarray(sample_token(logits, jax.random.key(0), temperature=0.0)) == 0)


def test_over_long_sequence_is_rejected_before_compilation():
    model = TransformerLM(CFG)
    params = _params(model)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=64"):
        model.apply({"params": params}, _batch(np.zeros((1, 65))))
    with pytest.raises(ValueError, match="max_seq_len=64"):
        generate(model, params, ["x" * 59], max_new_bytes=10)
    with pytest.raises(ValueError, match="integer token ids"):
        model.apply({"params": params}, _batch(np.zeros((1, 4))) | {"inputs": jnp.zeros((1, 4))})


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_kv_heads", 3, "num_kv_heads: must divide num_heads"),
        ("head_dim", 7, "head_dim: must be even"),
        ("window", 0, "window: must be None or a positive int"),
        ("dtype", "float8", "dtype: must be one of"),
        ("d_model", -1, "d_model: must be a positive int"),
        ("remat", "some", "remat: must be one of"),
        ("max_seq_len", 0, "max_seq_len: must be a positive int"),
    ],
)
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(CFG, **{field: value})


def test_unrolled_rejects_mismatched_params():
    stack = _params(TransformerLM(CFG))["transformer"]
    config, flat = unrolled(CFG, stack)
    assert not config.scan_layers
    np.testing.assert_array_equal(
        flat["layers_1"]["mlp"]["down_proj"]["kernel"],
        stack["layers"]["mlp"]["down_proj"]["kernel"][1],
    )
    with pytest.raises(ValueError, match="unrolled already"):
        unrolled(CFG, flat)
    with pytest.raises(ValueError, match=r"stack \[2\] layers, config.num_layers=3"):
        unrolled(dataclasses.replace(CFG, num_layers=3), stack)


def test_presets_param_counts():
    """Analytic parameter counts agree with the initialised trees."""
    cfg = PRESETS["tiny"]
    shapes = jax.eval_shape(
        lambda: TransformerLM(cfg).init(jax.random.key(0), _batch(np.zeros((1, 8))))
    )
    boxed = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert sum(np.prod(x.value.shape) for x in boxed) == cfg.num_params()
    assert 0.9e9 < PRESETS["1b"].num_params() < 1.2e9
    assert 110e6 < PRESETS["125m"].num_params() < 140e6


@pytest.mark.parametrize(
    "scan, remat", [(False, "none"), (True, "full"), (True, "dots"), (True, "dots_attention")]
)
def test_scan_and_remat_do_not_change_values(rng, scan, remat):
    base = TransformerLM(CFG)
    params = _params(base)
    batch = _batch(rng.integers(0, 256, (2, 10)))
    ref = jax.jit(base.apply)({"params": params}, batch)
    config = dataclasses.replace(CFG, remat=remat)
    if not scan:  # unstacked parameter layout: layers_0, layers_1, ...
        config, stack = unrolled(config, params["transformer"])
        assert sorted(stack) == ["final_norm", "layers_0", "layers_1"]
        params = {**params, "transformer": stack}
    other = TransformerLM(config)
    out = jax.jit(other.apply)({"params": params}, batch)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    g = jax.jit(jax.grad(lambda p: other.apply({"params": p}, batch).sum()))(params)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g))


@pytest.mark.parametrize("remat, kept", [("dots_no_batch", False), ("dots_attention", True)])
def test_dots_attention_remat_keeps_the_flash_kernel_outputs(capsys, remat, kept):
    """``remat="dots_attention"`` saves the Pallas attention's output and log-sum-exp for the
    backward pass (so the forward kernel is not recomputed); ``dots_no_batch`` does not."""
    cfg = TransformerConfig(
        d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64,
        dtype="float32", attention_impl="pallas", remat=remat, scan_layers=False,
    )  # fmt: skip
    model = Transformer(cfg)
    x, positions = jnp.ones((1, 16, 32)), jnp.arange(16)[None]
    params = model.init(jax.random.key(0), x, positions=positions)
    print_saved_residuals(lambda p: model.apply(p, x, positions=positions).sum(), params)
    saved = capsys.readouterr().out
    for name in ("attention_out", "attention_lse"):
        assert (f"named '{name}'" in saved) == kept, saved
