"""The generation engine (arjax.generate.engine) on every token-level family: greedy output
== argmax of the full forward, sampled draws come from exactly the full forward's (filtered,
tempered) softmax, stop strings / EOS / special ids, the registry. HAT, Block Transformer and
Axial have their family tests (test_hat, test_block_transformer, test_axial)."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arjax.config import replace_everywhere
from arjax.data.vocab import BOS_ID, EOS_ID, PAD_ID
from arjax.generate import decoder_for, engine, filter_logits, generate
from arjax.generate.block import BlockDecoder
from arjax.generate.engine import Decoder, left_align
from arjax.generate.lm import LMDecoder
from arjax.models import MODELS, get_model_spec
from arjax.models.linear_lm import LINEAR_MIXERS
from arjax.nn import inputs_last
from arjax.train.data import example_batch_for

# multilingual + emoji, ragged (the empty prompt is BOS alone)
PROMPTS = ["Grüße, 世界", "", "🙂👍🏽 ok", "a"]
FAMILIES = ["transformer", "block", *LINEAR_MIXERS]


def _model_params(name: str):
    spec = MODELS[name]
    cfg = spec.presets["tiny"]
    if name == "transformer":
        cfg = dataclasses.replace(cfg, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                  head_dim=16, mlp_dim=64, window=6)  # fmt: skip
    model = spec.module_cls(cfg)
    tokens = jnp.zeros((1, 8), jnp.int32)
    batch = {"inputs": tokens, "positions": jnp.arange(8)[None], "segment_ids": tokens + 1}
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), batch)["params"])
    # larger weights than the init, so that argmax is far from constant and from ties
    return model, jax.tree.map(lambda p: p * 2.0, params)


def _full_logits(model, params, rows: list[list[int]]) -> np.ndarray:
    """Uncached forward over right-padded id rows: ``[rows, width, vocab]`` float32."""
    width = model.config.max_seq_len
    ids = np.full((len(rows), width), PAD_ID, np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    return np.array(_forward(model, params, jnp.asarray(ids)))


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, ids):
    """The full forward, one compiled program per model (not op by op: compiles dominate)."""
    if isinstance(decoder_for(model), BlockDecoder):
        return model.apply({"params": params}, ids, method="forward")
    batch = {"inputs": ids, "positions": jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape),
             "segment_ids": (ids != PAD_ID).astype(jnp.int32)}  # fmt: skip
    return model.apply({"params": params}, batch)


def _check_against_full_forward(model, params, gen, prompts, sampling, rng):
    """Each emitted token's logits == the full forward's at that prefix (specials at -inf);
    greedy: the token is their argmax; sampled: it lies in the full forward's nucleus and,
    where one loop step drew every row's token, it is the draw of ``fold_in(rng, step)``
    from the full forward's filtered, tempered logits of all rows. Returns tokens checked."""
    prefixes = [[BOS_ID, *p.encode()] for p in prompts]
    full = _full_logits(model, params, [p + g for p, g in zip(prefixes, gen.tokens, strict=True)])
    full[..., [PAD_ID, BOS_ID]] = -np.inf
    want = np.full(gen.logits.shape, -np.inf, np.float32)  # [steps, batch, vocab]
    for r, (prefix, out) in enumerate(zip(prefixes, gen.tokens, strict=True)):
        want[: len(out), r] = full[r, len(prefix) - 1 : len(prefix) - 1 + len(out)]
        np.testing.assert_allclose(gen.logits[: len(out), r], want[: len(out), r], atol=1e-3,
                                   rtol=1e-4)  # fmt: skip
        if not sampling:
            np.testing.assert_array_equal(np.argmax(want[: len(out), r], -1), out)
    checked = sum(len(t) for t in gen.tokens)
    if not sampling:
        return checked
    kept = np.asarray(filter_logits(jnp.asarray(want) / sampling["temperature"],
                                    top_k=sampling["top_k"], top_p=sampling["top_p"]))  # fmt: skip
    for r, out in enumerate(gen.tokens):
        assert all(kept[s, r, t] > -1e30 for s, t in enumerate(out))  # inside the nucleus
    if not isinstance(decoder_for(model), LMDecoder):  # prompt tokens fed: steps shift
        return checked
    steps = min(len(t) for t in gen.tokens)  # every row drew at these loop steps
    for step in range(steps):
        drawn = jax.random.categorical(jax.random.fold_in(rng, step), kept[step], axis=-1)
        np.testing.assert_array_equal(drawn, [t[step] for t in gen.tokens])
    return checked


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_and_sampled_generation_equal_the_full_forward(name):
    """Ragged multilingual/emoji prompts; the engine's per-step distribution is the full
    forward's (a cache bug, a wrong position or a skipped prompt token moves the logits)."""
    model, params = _model_params(name)
    greedy = generate(model, params, PROMPTS, max_new_bytes=10, return_logits=True)
    assert _check_against_full_forward(model, params, greedy, PROMPTS, None, None) > 0
    assert len({tuple(t) for t in greedy.tokens}) > 1
    sampling = dict(temperature=0.7, top_k=40, top_p=0.9)
    rng = jax.random.key(5)
    hot = generate(model, params, PROMPTS, max_new_bytes=10, return_logits=True, rng=rng,
                   **sampling)  # fmt: skip
    assert _check_against_full_forward(model, params, hot, PROMPTS, sampling, rng) > 0
    assert hot.tokens != greedy.tokens


@dataclasses.dataclass(frozen=True)
class BigramDecoder(Decoder):
    """A decoder whose logits are ``params[last token]``: the loop's own behaviour, exactly.
    ``model`` (static) = how many prompt tokens the prefill consumes (None: all; else the
    loop feeds the rest, as for the Block Transformer)."""

    def check(self, width, max_new):  # no length limit
        pass

    def prefill(self, params, tokens, lengths, *, layout, max_new):
        fed = lengths if self.model is None else jnp.minimum(lengths, self.model)
        last = jnp.take_along_axis(tokens, (fed - 1)[:, None], axis=1)[:, 0]
        return params[last], None, fed

    def step(self, params, state, tokens, active):
        return params[tokens], state


def _bigram(eos_after_a: bool = False) -> jax.Array:
    """a -> b -> a ..., BOS and PAD always score highest (must never be drawn)."""
    table = np.zeros((259, 259), np.float32)
    table[:, BOS_ID], table[:, PAD_ID] = 10.0, 9.0
    table[ord("a"), ord("b")] = table[ord("b"), ord("a")] = 5.0
    table[ord("x"), ord("y")] = 5.0  # x -> y -> (all zero: argmax 0)
    if eos_after_a:
        table[ord("a"), EOS_ID] = 6.0
    return jnp.asarray(table)


@pytest.mark.parametrize("consumed", [None, 1])
def test_loop_stop_strings_eos_special_ids_and_fed_prompts(consumed):
    """Greedy over a bigram table: BOS/PAD never drawn; a stop string ends a row and cuts
    its text before it; EOS ends a row (not text) while the others go on; with a prefill
    that consumes one token the loop feeds the rest of the prompt (same result)."""
    dec = BigramDecoder(consumed)
    table = _bigram()
    free = generate(None, table, ["a", "xb"], max_new_bytes=6, decoder=dec)
    assert free.texts == ["bababa", "ababab"] and free.steps == 6 + (0 if consumed is None else 2)
    cut = generate(None, table, ["a", "xb"], max_new_bytes=6, stop=("bab", "zz"), decoder=dec)
    assert cut.tokens == [[], [ord("a")]]
    ended = generate(None, _bigram(True), ["b", "xa", "x"], max_new_bytes=6, decoder=dec)
    assert ended.texts == ["a", "", "y" + "\x00" * 5]
    sampled = generate(None, table, ["a"] * 64, max_new_bytes=3, temperature=1.0,
                       rng=jax.random.key(0), decoder=dec)  # fmt: skip
    drawn = {t for row in sampled.tokens for t in row}
    assert BOS_ID not in drawn and PAD_ID not in drawn and len(drawn) > 2


@dataclasses.dataclass(frozen=True)
class PeriodicBigramDecoder(BigramDecoder):
    """The bigram decoder with ``period`` 3: ``boundary`` (given ``state["blocks"]``, which
    ``step`` must never see) adds 10 to "z"'s logit when exactly two ``step``s ran since the
    previous boundary, and counts its calls in ``blocks``."""

    boundary_state = ("blocks",)

    @property
    def period(self):
        return 3

    def prefill(self, params, tokens, lengths, *, layout, max_new):
        logits, _, fed = super().prefill(params, tokens, lengths, layout=layout, max_new=max_new)
        return logits, dict(blocks=jnp.int32(0), since=jnp.int32(0)), fed

    def step(self, params, state, tokens, active):
        assert "blocks" not in state, "step was given the boundary's state"
        return params[tokens], dict(state, since=state["since"] + 1)

    def boundary(self, params, state, tokens, active):
        bonus = jnp.where(state["since"] == 2, 10.0, 0.0)
        logits = params[tokens].at[:, ord("z")].add(bonus)
        return logits, dict(blocks=state["blocks"] + 1, since=jnp.int32(0))


def test_loop_period_runs_boundary_every_period_tokens():
    """Every third token goes through ``boundary`` after two ``step``s: the token drawn after
    each boundary is "z" (z -> a -> b -> boundary); whole periods are run."""
    table = _bigram().at[ord("z"), ord("a")].set(5.0)
    got = generate(None, table, ["a", "xb"], max_new_bytes=7, decoder=PeriodicBigramDecoder(None))
    assert got.texts == ["babzabz", "abazabz"] and got.steps == 9


def test_left_align_values():
    tokens = jnp.asarray([[7, 8, 9, 0], [5, 0, 0, 0]])
    left, seg, pos = left_align(tokens, jnp.asarray([3, 1]), pad=-1)
    np.testing.assert_array_equal(left, [[-1, 7, 8, 9], [-1, -1, -1, 5]])
    np.testing.assert_array_equal(seg, [[0, 1, 1, 1], [0, 0, 0, 1]])
    np.testing.assert_array_equal(pos, [[0, 0, 1, 2], [0, 0, 0, 0]])


def _bf16_model_params(name: str):
    """A tiny bfloat16 model of family ``name`` with params off the bfloat16 grid (noise)."""
    if name == "hat":
        spec = MODELS["hat"]
        model = spec.module_cls(replace_everywhere(spec.presets["tiny"], dtype="bfloat16"))
        batch = {
            k: jnp.asarray(v) for k, v in example_batch_for("hat", model.config, 1, 64).items()
        }
        params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), batch)["params"])
    else:
        model, params = _model_params(name)
        model = model.clone(config=replace_everywhere(model.config, dtype="bfloat16"))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    params = tree.unflatten(
        [x * (1 + 0.01 * jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys, strict=True)]
    )
    return model, params


@pytest.mark.parametrize("name", [*FAMILIES, "hat"])
def test_weights_cast_once_before_the_loop_give_the_same_bits(name, monkeypatch):
    """``Decoder.prepare`` casts the stacks' matrices to bfloat16 once: the bfloat16 model's
    generated logits are bitwise those of casting at every use. Params get noise off the
    bfloat16 grid (casting a norm scale too fails this)."""
    model, params = _bf16_model_params(name)
    prompts = PROMPTS[:2]
    cast = generate(model, params, prompts, max_new_bytes=4, return_logits=True)
    monkeypatch.setattr(engine, "cast_weights", lambda p, dtype: p)
    jax.clear_caches()  # the loop is jitted: recompile it without the cast
    per_use = generate(model, params, prompts, max_new_bytes=4, return_logits=True)
    jax.clear_caches()
    np.testing.assert_array_equal(cast.logits, per_use.logits)


@pytest.mark.parametrize("name", [*FAMILIES, "hat"])
def test_kernels_stored_inputs_last_give_the_same_logits(name):
    """``Decoder.inputs_last`` (the GPU default) only changes where the loop keeps the
    kernels' bytes: the generated logits are bitwise those of the modules' own layout (the
    CPU default). A wrong inverse permutation hands the layers misshapen kernels and fails."""
    model, params = _bf16_model_params(name)
    decoder = decoder_for(model)
    runs = [
        generate(model, params, PROMPTS[:2], max_new_bytes=4, return_logits=True,
                 decoder=dataclasses.replace(decoder, inputs_last=flag))
        for flag in (True, False)
    ]  # fmt: skip
    assert runs[0].tokens == runs[1].tokens
    np.testing.assert_array_equal(runs[0].logits, runs[1].logits)


def test_inputs_last_moves_projection_kernels_only():
    """Attention and MLP kernels and LM heads get their input axes last (two for an output
    projection), and back with ``inverse``; norm scales, embeddings and other kernels are
    untouched."""
    x = lambda *shape: jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)  # noqa: E731
    params = {
        "embedding": {"embedding": x(11, 4)},
        "layers_0": {
            "attn": {"q_proj": {"kernel": x(4, 2, 3)}, "o_proj": {"kernel": x(2, 3, 4)}},
            "mlp": {"down_proj": {"kernel": x(5, 4)}},
            "attn_norm": {"scale": x(4)},
        },
        "conv": {"kernel": x(3, 4)},
        "lm_head": {"kernel": x(4, 7)},
    }
    moved = inputs_last(params)
    layer = moved["layers_0"]
    np.testing.assert_array_equal(layer["attn"]["q_proj"]["kernel"],
                                  jnp.transpose(x(4, 2, 3), (1, 2, 0)))  # fmt: skip
    np.testing.assert_array_equal(layer["attn"]["o_proj"]["kernel"],
                                  jnp.transpose(x(2, 3, 4), (2, 0, 1)))  # fmt: skip
    np.testing.assert_array_equal(layer["mlp"]["down_proj"]["kernel"], x(5, 4).T)
    np.testing.assert_array_equal(moved["lm_head"]["kernel"], x(4, 7).T)
    for path in (("embedding", "embedding"), ("conv", "kernel")):
        np.testing.assert_array_equal(moved[path[0]][path[1]], params[path[0]][path[1]])
    np.testing.assert_array_equal(layer["attn_norm"]["scale"], x(4))
    back = inputs_last(moved, inverse=True)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_registry_one_entry_per_family():
    """Each family registers itself once (model, config, presets, data kind, decoder); the
    decoder named by the spec is importable and built from the module."""
    for name, spec in MODELS.items():
        assert set(spec.presets) >= {"tiny", "small"}, name
        assert spec.decoder_cls().__name__ in ("LMDecoder", "BlockDecoder", "HATDecoder",
                                               "AxialDecoder"), name  # fmt: skip
    assert MODELS["gla"].decoder_cls() is LMDecoder and MODELS["hat"].data == "words"
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        get_model_spec("nope")
    from arjax.models.registry import ModelSpec, register_model

    with pytest.raises(ValueError, match="registered twice"):
        register_model(dataclasses.replace(MODELS["block"]))
    with pytest.raises(ValueError, match="module:Class"):
        ModelSpec("x", object, object, {}, data="text", decoder="nowhere")


def test_bad_arguments_raise_before_compilation():
    model, params = _model_params("transformer")
    with pytest.raises(ValueError, match="non-empty list"):
        generate(model, params, "abc", max_new_bytes=2)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, params, ["a"], max_new_bytes=2, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, params, ["a"], max_new_bytes=10_000)
