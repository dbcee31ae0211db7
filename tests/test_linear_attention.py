"""Linear attention: parallel == chunked == recurrent (values and gradients), Aaren scan ==
naive softmax == O(1) steps, mixers' decode == train, recurrent generation == the parallel
model's argmax.

Tolerances: float32 forms agree to atol=rtol=1e-4 (sums of <= 64 O(1) terms); gradients to
2e-4; model logits (several layers of float32 matmuls) to 2e-4.
"""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arjax.config import ConfigError, switch_kind
from arjax.generate import generate
from arjax.models import MODELS
from arjax.models.linear_lm import LINEAR_MIXERS, LinearLM, LinearLMConfig, presets_for
from arjax.nn.linear_attention import MIXER_CONFIGS, BasedConfig, mixer_config, taylor_features
from arjax.ops import (
    aaren,
    aaren_init_state,
    aaren_reference,
    aaren_step,
    linear_attention,
    linear_attention_reference,
    linear_attention_step,
)

TOL = dict(atol=1e-4, rtol=1e-4)
# Everything runs jitted: eager dispatch of the small ops is what makes tests slow on CPU.
lin_attn = jax.jit(linear_attention, static_argnames=("form", "chunk_size", "impl"))
lin_ref = jax.jit(linear_attention_reference)
lin_step = jax.jit(linear_attention_step)
aaren_scan = jax.jit(aaren)
aaren_naive = jax.jit(aaren_reference)
aaren_one = jax.jit(aaren_step)
B, L, H, DK, DV = 2, 37, 3, 5, 4
SEGMENTS = np.array([[1] * 10 + [2] * 20 + [3] * 7, [1] * 37], np.int32)  # packed row + plain row


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**31))


def _normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.normal(size=shape).astype(np.float32)


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x).astype(np.float32)


def _inputs(decay: str, rng: np.random.Generator):
    """Fresh numpy inputs (no eager JAX ops: those compile one by one)."""
    q, k = _normal(rng, B, L, H, DK), _normal(rng, B, L, H, DK)
    v, s0 = _normal(rng, B, L, H, DV), _normal(rng, B, H, DK, DV)
    shape = {"none": None, "scalar": (B, L, H), "gated": (B, L, H, DK)}[decay]
    log_decay = None if shape is None else _log_sigmoid(_normal(rng, *shape) + 2)
    return q, k, v, log_decay, s0


@pytest.mark.parametrize("decay", ["none", "scalar", "gated"])
def test_three_forms_agree_with_initial_state_and_resets(decay, rng):
    q, k, v, log_decay, s0 = _inputs(decay, rng)
    args = dict(log_decay=log_decay, initial_state=s0, segment_ids=jnp.asarray(SEGMENTS))
    ref_out, ref_state = lin_ref(q, k, v, **args)
    for form, chunk in (("chunked", 8), ("chunked", 64), ("recurrent", 8)):
        out, state = lin_attn(q, k, v, form=form, chunk_size=chunk, impl="xla", **args)
        np.testing.assert_allclose(out, ref_out, **TOL, err_msg=f"{form}/{chunk}")
        np.testing.assert_allclose(state, ref_state, **TOL, err_msg=f"{form}/{chunk}")
    # The state resets at boundaries: row 0's final state ignores documents 1 and 2 and s0.
    last = slice(30, 37)
    _, alone = lin_ref(
        q[:1, last], k[:1, last], v[:1, last],
        log_decay=None if log_decay is None else log_decay[:1, last],
    )  # fmt: skip
    np.testing.assert_allclose(ref_state[:1], alone, **TOL)


def test_plain_reference_matches_definition(rng):
    """Without decay or resets: o_t = sum_{s<=t} (q_t . k_s) v_s + q_t S_0."""
    q, k, v, _, s0 = _inputs("none", rng)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) * jnp.tril(jnp.ones((L, L)))
    want = jnp.einsum("bhts,bshe->bthe", scores, v) + jnp.einsum("bthd,bhde->bthe", q, s0)
    out, state = lin_ref(q, k, v, initial_state=s0)
    np.testing.assert_allclose(out, want, **TOL)
    np.testing.assert_allclose(state, s0 + jnp.einsum("bshd,bshe->bhde", k, v), **TOL)


@pytest.mark.parametrize("decay", ["scalar", "gated"])
def test_gradients_agree(decay, rng):
    q, k, v, log_decay, s0 = _inputs(decay, rng)
    seg = jnp.asarray(SEGMENTS)
    w_out, w_state = _normal(rng, B, L, H, DV), _normal(rng, B, H, DK, DV)

    def loss(form):
        def f(q, k, v, g, s):
            out, state = linear_attention(
                q, k, v, log_decay=g, initial_state=s, segment_ids=seg, form=form, chunk_size=8
            )
            return jnp.sum(out * w_out) + jnp.sum(state * w_state)

        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4)))(q, k, v, log_decay, s0)

    ref = loss("parallel")
    for form in ("chunked", "recurrent"):
        for name, a, b in zip("qkvgs", loss(form), ref):
            np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-4, err_msg=f"{form} d{name}")


def test_split_sequence_with_state_equals_whole(rng):
    """Prefill then continue from the returned state == one pass (what decoding relies on)."""
    q, k, v, g, _ = _inputs("gated", rng)
    whole, final = lin_attn(q, k, v, log_decay=g, chunk_size=8)
    first, mid = lin_attn(q[:, :20], k[:, :20], v[:, :20], log_decay=g[:, :20])
    out, state = [], mid
    for t in range(20, L):
        o, state = lin_step(q[:, t], k[:, t], v[:, t], state, log_decay=g[:, t])
        out.append(o)
    np.testing.assert_allclose(jnp.concatenate([first, jnp.stack(out, 1)], 1), whole, **TOL)
    np.testing.assert_allclose(state, final, **TOL)


def test_chunked_is_stable_for_long_strongly_decaying_sequences(rng):
    """log-space gates: cumulative decay exp(-4 * 2048) underflows, yet every output is finite
    and matches the token-by-token recurrence."""
    n = 2048
    q, k, v = (_normal(rng, 1, n, 1, 4) for _ in range(3))
    g = -4.0 / (1.0 + np.exp(-_normal(rng, 1, n, 1, 4))) - 1.0  # log a_t in (-5, -1)
    out, state = lin_attn(q, k, v, log_decay=g, form="chunked", chunk_size=64)
    rec, rec_state = lin_attn(q, k, v, log_decay=g, form="recurrent")
    assert bool(jnp.isfinite(out).all())
    np.testing.assert_allclose(out, rec, **TOL)
    np.testing.assert_allclose(state, rec_state, **TOL)


def test_bad_inputs_raise_clear_errors():
    q, k, v, g, s0 = _inputs("gated", np.random.default_rng(0))
    with pytest.raises(ValueError, match="log_decay must be"):
        linear_attention(q, k, v, log_decay=g[..., :2])
    with pytest.raises(ValueError, match="initial_state must be"):
        linear_attention(q, k, v, initial_state=s0[..., :2])
    with pytest.raises(ValueError, match="initial_state must be float32"):
        linear_attention(q, k, v, initial_state=s0.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="v must be"):
        linear_attention(q, k, v[:, :3])
    with pytest.raises(ValueError, match="segment_ids must be"):
        linear_attention(q, k, v, segment_ids=jnp.ones((B, L + 1), jnp.int32))
    with pytest.raises(ValueError, match="form must be"):
        linear_attention(q, k, v, form="fast")
    with pytest.raises(ValueError, match="impl='pallas' needs form='chunked'"):
        linear_attention(q, k, v, form="recurrent", impl="pallas")
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention(q, k, v, chunk_size=0)
    # the GPU kernels, interpreted on CPU too: their tiles must divide the dims (dk=128, dv=96
    # gave NaN past the last whole value tile before this check)
    with pytest.raises(ValueError, match="powers of two >= 16, got dk=5, dv=4, chunk_size=16"):
        linear_attention(q, k, v, chunk_size=16, impl="pallas")


def test_pallas_mosaic_runs_the_fused_forward_or_raises(rng, monkeypatch, within_xla_error):
    """``impl="pallas_mosaic"`` calls the scan kernel with ``lowering="mosaic"`` (interpreted
    on CPU, as ``impl="pallas"`` is); where the fused forward cannot run (another backend, an
    unsupported call) the kernel's ``ValueError`` comes through, never another lowering."""
    kernels = importlib.import_module("kernels_pallas.linear_attention_scan")
    kernel, lowerings = kernels.chunked_linear_attention, []

    def spy(*args, lowering, **kwargs):
        lowerings.append(lowering)
        return kernel(*args, lowering=lowering, **kwargs)

    monkeypatch.setattr(kernels, "chunked_linear_attention", spy)
    q, k, v = (jnp.asarray(_normal(rng, 1, 64, 1, 64), jnp.bfloat16) for _ in range(3))
    g = jnp.asarray(_log_sigmoid(_normal(rng, 1, 64, 1) + 4))
    out, state = lin_attn(q, k, v, log_decay=g, impl="pallas_mosaic")
    assert lowerings == ["mosaic"]
    ref = lin_ref(*(x.astype(jnp.float32) for x in (q, k, v)), log_decay=g)
    xla = lin_attn(q, k, v, log_decay=g, impl="xla")
    named = (dict(zip(("out", "state"), r)) for r in ((out, state), ref, xla))
    within_xla_error(*named, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="dtype must be bfloat16 or float16, got float32"):
        linear_attention(*(x.astype(jnp.float32) for x in (q, k, v)), impl="pallas_mosaic")
    with pytest.raises(ValueError, match="dk must be one of"):
        linear_attention(q[..., :32], k[..., :32], v, log_decay=g, impl="pallas_mosaic")
    with pytest.raises(ValueError, match="impl='pallas_mosaic' needs form='chunked'"):
        linear_attention(q, k, v, form="recurrent", impl="pallas_mosaic")
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    with pytest.raises(ValueError, match="got 'mosaic' with backend 'tpu'"):
        linear_attention(q, k, v, log_decay=g, impl="pallas_mosaic")


def test_aaren_scan_equals_naive_softmax_with_resets_and_initial_state(rng):
    scores, prev = 30.0 * _normal(rng, 2, B, L, H)  # large: needs the running max
    v, v_prev = _normal(rng, 2, B, L, H, DV)
    seg, ones = jnp.asarray(SEGMENTS), jnp.ones((B, L), jnp.int32)
    empty = aaren_init_state(B, H, DV)
    _, init = aaren_scan(prev, v_prev, segment_ids=ones, initial_state=empty)  # a prefix state
    out, state = aaren_scan(scores, v, segment_ids=seg, initial_state=init)
    ref, ref_state = aaren_naive(scores, v, segment_ids=seg, initial_state=init)
    assert bool(jnp.isfinite(out).all())
    np.testing.assert_allclose(out, ref, **TOL)
    ratio = lambda s: s.numer / s.denom[..., None]  # noqa: E731
    np.testing.assert_allclose(ratio(state), ratio(ref_state), **TOL)
    # The O(1) step from the prefix state == the scan from it (one document).
    whole, _ = aaren_scan(scores, v, segment_ids=ones, initial_state=init)
    step_state, steps = init, []
    for t in range(L):
        o, step_state = aaren_one(scores[:, t], v[:, t], step_state)
        steps.append(o)
    np.testing.assert_allclose(jnp.stack(steps, 1), whole, **TOL)


def test_taylor_feature_map_expands_exp(rng):
    x, y = jnp.asarray(rng.normal(size=(2, 7, 5)), jnp.float32)
    dot = jnp.sum(x * y, -1)
    got = jnp.sum(taylor_features(x) * taylor_features(y), -1)
    np.testing.assert_allclose(got, 1 + dot + dot**2 / 2, **TOL)


def _tiny(kind: str) -> LinearLMConfig:
    return LinearLMConfig(
        d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=64,
        max_seq_len=64, dtype="float32",
        mixer=switch_kind(
            BasedConfig(feature_dim=4, window=4, conv_size=3, chunk_size=8), MIXER_CONFIGS[kind]
        ),
    )  # fmt: skip


def _packed_batch(rng: np.random.Generator, lengths=(9, 15)) -> dict:
    """One row: documents of ``lengths`` (ids 1, 2, ...), positions restarting per document."""
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
    pos = np.concatenate([np.arange(n) for n in lengths])[None]
    tokens = rng.integers(0, 256, seg.shape)
    return {"inputs": tokens, "positions": pos, "segment_ids": seg}


@pytest.mark.parametrize("kind", LINEAR_MIXERS)
def test_prefill_and_decode_equal_train_mode(kind, rng):
    """Prefill across a document boundary, then decode token by token (the SWA ring wraps
    and the conv buffer rolls): logits equal the train-mode forward of the packed row."""
    model = LinearLM(_tiny(kind))
    batch = {k: jnp.asarray(v, jnp.int32) for k, v in _packed_batch(rng).items()}
    params = jax.jit(model.init)(jax.random.key(_seed(rng)), batch)["params"]
    full = jax.jit(model.apply)({"params": params}, batch)
    split = 13  # inside the second document
    tok, pos, seg = batch["inputs"], batch["positions"], batch["segment_ids"]
    prefill = jax.jit(
        lambda t, p, s: model.apply(
            {"params": params}, t, p, s, None, method="prefill", mutable=["cache"]
        )
    )
    logits, cache = prefill(tok[:, :split], pos[:, :split], seg[:, :split])
    np.testing.assert_allclose(logits, full[:, :split], atol=2e-4, rtol=2e-4)
    decode = jax.jit(
        lambda c, t, p: model.apply(
            {"params": params, "cache": c}, t, p, None, None, method="decode", mutable=["cache"]
        )
    )
    cache = cache["cache"]
    for t in range(split, tok.shape[1]):
        out, cache = decode(cache, tok[:, t : t + 1], pos[:, t : t + 1])
        cache = cache["cache"]
        np.testing.assert_allclose(out[:, 0], full[:, t], atol=2e-4, rtol=2e-4, err_msg=f"t={t}")


def test_recurrent_generation_equals_parallel_argmax(rng):
    model = LinearLM(_tiny("based"))  # conv buffer, SWA ring buffer and linear state
    prompts = [bytes([5, 9, 200]), bytes([77, 1, 2, 3, 4, 5, 6])]  # ragged: left padding
    dummy = {k: jnp.asarray(v, jnp.int32) for k, v in _packed_batch(rng).items()}
    params = jax.jit(model.init)(jax.random.key(_seed(rng)), dummy)["params"]
    new = 12
    out = generate(model, params, prompts, max_new_bytes=new).tokens
    assert [len(g) for g in out] == [new, new]
    # Teacher-forced parallel forward of prompt + generation (right-padded to one batch).
    prompts = [[257, *p] for p in prompts]
    seqs = [p + g for p, g in zip(prompts, out)]
    width = max(map(len, seqs))
    batch = {
        "inputs": jnp.asarray([s + [0] * (width - len(s)) for s in seqs], jnp.int32),
        "positions": jnp.tile(jnp.arange(width), (2, 1)),
        "segment_ids": jnp.asarray([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
    }
    logits = jax.jit(model.apply)({"params": params}, batch)
    for row, (prompt, gen) in enumerate(zip(prompts, out)):
        step_logits = logits[row, len(prompt) - 1 : len(prompt) - 1 + new]
        greedy = np.argmax(step_logits.at[:, 256:258].set(-np.inf), -1)
        np.testing.assert_array_equal(greedy, gen)


def test_configs_and_registry():
    for kind in LINEAR_MIXERS:
        spec = MODELS[kind]
        assert spec.data == "text" and set(spec.presets) >= {"tiny", "small"}
        assert spec.presets["tiny"].mixer.kind == kind
    for kind in ("based", "gla", "gdn", "deltanet"):
        cfg = _tiny(kind)
        params = jax.eval_shape(
            lambda cfg=cfg: LinearLM(cfg).init(
                jax.random.key(0), _packed_batch(np.random.default_rng(0))
            )
        )["params"]
        assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params(), kind
    with pytest.raises(ConfigError, match="mixer.kind"):
        dataclasses.replace(cfg, mixer=mixer_config("attention"))
    with pytest.raises(ConfigError, match="window"):
        mixer_config("based", window=0)
    # RetNet's FLOPs: 2 per weight of every matrix the forward multiplies by (the kernels of
    # the initialised tree, plus the tied head) and the state read/update 4 h d^2 per layer,
    # independent of the context
    cfg = presets_for("retnet")["tiny"]
    params = jax.eval_shape(
        lambda: LinearLM(cfg).init(jax.random.key(0), _packed_batch(np.random.default_rng(0)))
    )["params"]
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    kernels = sum(x.size for p, x in paths if "['kernel']" in jax.tree_util.keystr(p))
    head = cfg.vocab_size * cfg.d_model
    state = cfg.num_layers * 4 * cfg.num_heads * cfg.head_dim**2
    for context in (64, 4096):
        assert cfg.flops_per_token(context) == 2 * (kernels + head) + state
