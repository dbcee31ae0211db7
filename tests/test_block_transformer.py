"""Block Transformer: causality, L_B = 1 == transformer LM, cached decoding == full forward,
config and input validation."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from arjax.config import ConfigError
from arjax.generate import generate, sample
from arjax.models import MODELS, TransformerLM, TransformerLMConfig
from arjax.models.block_transformer import (
    PRESETS,
    BlockTransformer,
    BlockTransformerConfig,
    block_stream,
)
from arjax.nn import TransformerConfig
from arjax.train.config import make_run_config

STACK = TransformerConfig(
    d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64,
    dtype="float32", attention_impl="xla",
)  # fmt: skip
BASE = BlockTransformerConfig(block_len=4, block_decoder=STACK, token_decoder=STACK, max_seq_len=32)
LM_CFG = TransformerLMConfig(
    **{f.name: getattr(STACK, f.name) for f in dataclasses.fields(STACK)}, max_seq_len=32
)
VARIANTS = {
    "lookup-prefix2-4": dict(prefix_len=2),
    "lookup-prefix-1": dict(block_len=1),
    "encoder-summation-2": dict(block_len=2, embedder="encoder", conditioning="summation"),
    "encdec-cross-8": dict(
        block_len=8, embedder="encoder_decoder", conditioning="cross_attention", prefix_len=2
    ),
}


def _random_params(init, seed: int, keep: str = "~") -> dict:
    """Random params of ``init``'s shapes, made with numpy (no init compile): embeddings
    N(0, 1) so logits are far from ties, norm scales 1 + N(0, 0.2^2), weights 1/sqrt(fan-in).
    Leaves whose path contains ``keep`` are ones (norm scales) or zeros."""
    rng = np.random.default_rng(seed)
    shapes = nn.meta.unbox(jax.eval_shape(init, jax.random.key(0)))

    def make(path, s):
        name = jax.tree_util.keystr(path)
        if keep in name:
            return jnp.ones(s.shape) if "scale" in name else jnp.zeros(s.shape)
        x = rng.standard_normal(s.shape).astype(np.float32)
        if "embedding" in name:
            return jnp.asarray(x)
        if "scale" in name:
            return jnp.asarray(1.0 + 0.2 * x)
        return jnp.asarray(x / np.sqrt(max(x.size // s.shape[-1], 1)))

    return jax.tree_util.tree_map_with_path(make, shapes)


def _model(**kw) -> tuple[BlockTransformer, dict]:
    """Model with random params whose logits are far from uniform."""
    model = BlockTransformer(dataclasses.replace(BASE, **kw))
    example = {"inputs": jnp.zeros((1, 4), jnp.int32)}
    return model, _random_params(lambda key: model.init(key, example)["params"], 2)


def _tokens(shape, seed=0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, 256, jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, tokens):
    return model.apply({"params": params}, tokens, method="forward")


def test_block_stream_alignment():
    toks = jnp.arange(1, 9)[None]  # [1, 8]
    blocks = np.asarray(block_stream(toks, 4))
    np.testing.assert_array_equal(blocks, [[[256, 256, 256, 1], [2, 3, 4, 5]]])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_causal(variant):
    """Changing token t changes no logit before t, and some logit at t."""
    model, params = _model(**VARIANTS[variant])
    tokens = _tokens((2, 24))
    base = _forward(model, params, tokens)
    for t in (0, 5, 8, 17):
        other = tokens.at[:, t].set((tokens[:, t] + 1) % 256)
        out = _forward(model, params, other)
        np.testing.assert_allclose(out[:, :t], base[:, :t], atol=1e-5, rtol=1e-5)
        assert float(jnp.max(jnp.abs(out[:, t] - base[:, t]))) > 1e-3


def test_unaligned_length_is_right_padded_exactly():
    """seq not a multiple of L_B: same logits as the prefix of a longer input."""
    model, params = _model()
    tokens = _tokens((2, 24), seed=3)
    full = _forward(model, params, tokens)
    for seq in (3, 13):
        np.testing.assert_allclose(
            _forward(model, params, tokens[:, :seq]), full[:, :seq], atol=1e-5, rtol=1e-5
        )
    batch = {"inputs": tokens}
    via_batch = jax.jit(model.apply)({"params": params}, batch)
    np.testing.assert_allclose(via_batch, full, atol=1e-5, rtol=1e-5)


def test_block_len_1_is_a_transformer_lm():
    """L_B = 1: with the token decoder's residual branches zeroed and an identity prefix
    projection, the Block Transformer computes exactly the transformer LM."""
    lm = TransformerLM(LM_CFG)
    tokens = _tokens((2, 20), seed=4)
    init = lambda key: lm.init(key, tokens, jnp.zeros_like(tokens), method="hidden")["params"]
    lm_params = _random_params(init, 6, keep="final_norm")

    model, params = _model(block_len=1)
    params = jax.tree.map(lambda x: x, params)  # a mutable copy
    params["embedder"]["embed"]["embedding"] = lm_params["embed"]["embedding"]
    params["token_embed"]["embedding"] = lm_params["embed"]["embedding"]
    params["block_decoder"] = lm_params["transformer"]
    params["cond_proj"] = {"kernel": jnp.eye(32), "bias": jnp.zeros(32)}
    layers = params["token_decoder"]["layers"]
    layers["attn"]["o_proj"]["kernel"] = jnp.zeros_like(layers["attn"]["o_proj"]["kernel"])
    layers["mlp"]["down_proj"]["kernel"] = jnp.zeros_like(layers["mlp"]["down_proj"]["kernel"])
    params["token_decoder"]["final_norm"]["scale"] = jnp.ones(32)

    positions = jnp.broadcast_to(jnp.arange(20), tokens.shape)
    want = lm.apply({"params": lm_params}, tokens, positions, method="hidden")
    want = lm.apply({"params": lm_params}, want, method="logits")
    got = _forward(model, params, tokens)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)


def _next_logits(model, params, seq) -> jax.Array:
    """The full forward's logits for the token after ``seq`` (fixed width: right padding is
    exact)."""
    row = np.full((1, model.config.max_seq_len), 256, np.int32)
    row[0, : len(seq)] = seq
    return _forward(model, params, jnp.asarray(row))[0, len(seq) - 1]


def _greedy_reference(model, params, prompt, steps):
    """Step-by-step argmax of the full forward, PAD and BOS never drawn, ending at EOS (as
    the engine)."""
    seq = list(prompt)
    for _ in range(steps):
        logits = _next_logits(model, params, seq)
        seq.append(int(jnp.argmax(logits.at[jnp.array([256, 257])].set(-jnp.inf))))
        if seq[-1] == 258:
            return seq[len(prompt) : -1]
    return seq[len(prompt) :]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_generation_matches_full_forward(variant):
    """Ragged prompts (one shorter than a block, one past the shortest's whole blocks: fed
    by the loop) decode exactly like step-by-step argmax of the full forward."""
    model, params = _model(**VARIANTS[variant])
    rng = np.random.default_rng(0)
    prompts = [bytes(rng.integers(0, 256, n).tolist()) for n in (0, 5, 10)]
    gen = generate(model, params, prompts, max_new_bytes=9)
    for prompt, got in zip(prompts, gen.tokens, strict=True):
        assert got == _greedy_reference(model, params, [257, *prompt], 9)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(block_len=3), "block_len"),
        (dict(max_seq_len=30), "max_seq_len"),
        (dict(block_len=8, block_decoder=dataclasses.replace(STACK, d_model=36)), "d_model"),
        (dict(conditioning="summation", prefix_len=2), "prefix_len"),
        (dict(embedder="mean"), "embedder"),
        (dict(conditioning="film"), "conditioning"),
        (dict(token_decoder=dataclasses.replace(STACK, window=4)), "token_decoder.window"),
        (dict(prefix_len=0), "prefix_len"),
    ],
)
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        dataclasses.replace(BASE, **kw)


def test_bad_inputs_raise_clear_errors():
    model, params = _model()
    with pytest.raises(ValueError, match="integer"):
        _forward(model, params, jnp.zeros((1, 8), jnp.float32))
    with pytest.raises(ValueError, match="max_seq_len=32"):
        _forward(model, params, jnp.zeros((1, 33), jnp.int32))
    with pytest.raises(ValueError, match="max_seq_len=32"):
        generate(model, params, ["x" * 29], max_new_bytes=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, params, ["x"], max_new_bytes=0)


def test_registered_and_trains():
    """`--model block` runs on the text pipeline; a few AdamW steps fit one batch."""
    assert MODELS["block"].data == "text" and set(PRESETS) >= {"tiny", "small"}
    cfg = make_run_config("block", "tiny", ["data.seq_len=30", "model.block_len=8"])
    assert cfg.model.block_len == 8 and cfg.data.seq_len == 30
    with pytest.raises(ConfigError, match="block_len"):
        make_run_config("block", "tiny", ["model.block_len=5"])

    model = BlockTransformer(dataclasses.replace(BASE, block_len=2))
    tokens = _tokens((4, 17), seed=7)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    params = _random_params(lambda key: model.init(key, batch)["params"], 0)
    tx = optax.adam(1e-2)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        def loss_fn(p):
            logits = model.apply({"params": p}, batch)
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(params, updates), opt, loss

    losses = []
    for _ in range(30):
        params, opt, loss = step(params, opt)
        losses.append(float(loss))
    assert losses[-1] < 0.3 * losses[0]

    text = sample(
        "block", model, params, cfg, prompts=["ab"], max_bytes=5, temperature=0.0, top_p=None
    )
    assert text.startswith("ab") and len(text) <= 2 + 5
