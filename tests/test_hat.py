"""HAT: config, batching, pooling, causality, cached generation, bad input, training smoke."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arjax.config import ConfigError
from arjax.data.pipeline import DataConfig
from arjax.data.splitter import split_word_bytes
from arjax.data.vocab import BOS_ID, EOS_ID, PAD_ID
from arjax.data.words import (
    bytes_to_words,
    make_word_eval_batches,
    pack_rows,
    pack_word_documents,
    text_to_word_batch,
    words_to_batch,
)
from arjax.generate import generate, sample
from arjax.generate.hat import HATDecoder, append_byte, park_schedule
from arjax.models import MODELS
from arjax.models.hat import HAT, PRESETS, HATConfig
from arjax.nn import RopeScaling
from arjax.train.data import DATA_BUILDERS

CFG = PRESETS["tiny"]
B, E, P = BOS_ID, EOS_ID, PAD_ID


def _jnp(batch: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _init_params(model: HAT, seed: int) -> dict:
    batch = _jnp(text_to_word_batch(["hi"], 16, 8, model.config.max_word_bytes))
    return jax.jit(lambda k: nn.meta.unbox(model.init(k, batch)["params"]))(jax.random.key(seed))


def _ascii_head(params: dict) -> dict:
    """The byte head with ids >= 128 zeroed: greedy text stays ASCII (valid UTF-8)."""
    return {**params, "lm_head": {"kernel": params["lm_head"]["kernel"].at[:, 128:].set(0.0)}}


@pytest.fixture(scope="module")
def model_params():
    model = HAT(CFG)
    return model, _init_params(model, 0)


@pytest.fixture(scope="module")
def forward(model_params):
    model, _ = model_params
    return jax.jit(lambda p, b: model.apply({"params": p}, b))


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(decoder=dataclasses.replace(CFG.decoder, d_model=64)), "decoder.d_model"),
        (dict(cross_kv_heads=3), "cross_kv_heads"),
        (dict(cross_head_dim=7), "cross_head_dim"),
        (dict(max_word_bytes=300), "max_word_bytes"),
        (dict(max_words=0), "max_words"),
        (dict(encoder="big"), "encoder"),
        (dict(encoder=dataclasses.replace(CFG.encoder, window=999)), "encoder.window"),
    ],
)
def test_config_errors_name_the_field(change, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        dataclasses.replace(CFG, **change)


def test_presets_param_counts_and_registration():
    """Abstract init of every preset (8b included) matches HATConfig.num_params exactly."""
    batch = _jnp(text_to_word_batch(["hi there"], 16, 8, 32))
    counts = {}
    for name, cfg in PRESETS.items():
        shapes = jax.eval_shape(
            lambda k, c=cfg: nn.meta.unbox(HAT(c).init(k, batch)["params"]), jax.random.key(0)
        )
        counts[name] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
        assert counts[name] == cfg.num_params(), name
    assert 7.0e9 < counts["8b"] < 7.5e9  # Llama-3.1-8B backbone without embeddings + byte stacks
    # 7b: the backbone's count is the model card's 6.98B; unlike 8b, no rope scaling
    assert round(PRESETS["7b"].backbone.num_params() / 1e9, 2) == 6.98
    assert PRESETS["7b"].backbone.rope_scaling == RopeScaling()
    assert PRESETS["8b"].backbone.rope_scaling != RopeScaling()
    assert MODELS["hat"].data == "words" and MODELS["hat"].config_cls is HATConfig
    assert "words" in DATA_BUILDERS and MODELS["hat"].decoder == "arjax.generate.hat:HATDecoder"


# ---------------------------------------------------------------- batching


def test_text_batch_values():
    b = text_to_word_batch(["Hi there, Bob.\n", "ab"], 20, 8, 32)
    text = list(b"Hi there, Bob.\n")
    assert b["inputs"][0].tolist() == [B, *text, E, P, P, P]
    assert b["targets"][0].tolist() == [*text, E, P, P, P, P]
    assert b["word_ids"][0].tolist() == [1, 2, 2, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 5, 6, 0, 0, 0]
    assert b["word_segment_ids"][0].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    assert b["word_positions"][0].tolist() == [0, 1, 2, 3, 4, 5, 0, 0]
    assert b["positions"][1].tolist() == [0, 1, 2, 3] + [0] * 16
    assert b["loss_mask"][1].tolist() == [1, 1, 1] + [0] * 17  # EOS -> PAD is no target


def test_packed_rows_cut_at_word_boundaries():
    """Words [B][ab][ cd][E] [B][e][E]; 6 bytes / 3 words per row; targets cross rows."""
    b = pack_word_documents(["ab cd", "e"], seq_len=6, max_words=3, max_word_bytes=32)
    a, bb, sp, c, d, e = (ord(x) for x in "ab cde")
    assert b["inputs"].tolist() == [[B, a, bb, sp, c, d], [E, B, e, P, P, P], [E, P, P, P, P, P]]
    assert b["targets"].tolist() == [[a, bb, sp, c, d, E], [B, e, E, P, P, P], [P] * 6]
    assert b["word_ids"].tolist() == [[1, 2, 2, 3, 3, 3], [1, 2, 3, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert b["segment_ids"].tolist() == [[1] * 6, [1, 2, 2, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert b["positions"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 0, 1, 0, 0, 0], [0] * 6]
    assert b["word_segment_ids"].tolist() == [[1, 1, 1], [1, 2, 2], [1, 0, 0]]
    assert b["word_positions"].tolist() == [[0, 1, 2], [0, 0, 1], [0, 0, 0]]
    assert b["loss_mask"].tolist() == [[1] * 6, [0, 1, 1, 0, 0, 0], [0] * 6]


def test_long_words_are_cut_and_word_limit_ends_rows():
    b = text_to_word_batch(["a" * 70], 80, 8, 32)  # [BOS] + 32 + 32 + 6 + [EOS]
    counts = np.bincount(b["word_ids"][0], minlength=6)[1:6].tolist()
    assert counts == [1, 32, 32, 6, 1]
    assert pack_rows(np.ones(7, np.int32), seq_len=100, max_words=3).tolist() == [
        [0, 3], [3, 3], [6, 1],
    ]  # fmt: skip


def test_train_iterator_state_and_process_shards(tmp_path):
    """get_state/set_state resume exactly; two processes' rows == the one-process batch."""
    from arjax.data.words import make_word_train_iterator

    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        for i in range(3):
            (tmp_path / split / f"{i}.txt").write_text(f"Doc {i}: " + "fair words, " * (9 + i))
    data = DataConfig(corpus=str(tmp_path), seq_len=32, batch_size=4, seed=3)
    sizes = dict(max_words=12, max_word_bytes=16)
    it = make_word_train_iterator(data, **sizes)
    next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    it.set_state(state)
    for want in expected:
        got = next(it)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    it.set_state(state)
    single = next(it)
    shards = [make_word_train_iterator(data, **sizes, process_index=p, process_count=2)
              for p in range(2)]  # fmt: skip
    for shard in shards:
        next(shard)
    parts = [next(shard) for shard in shards]
    rows = np.stack([parts[i % 2]["inputs"][i // 2] for i in range(4)])
    np.testing.assert_array_equal(rows, single["inputs"])
    assert int(single["word_ids"].max()) <= 12 and single["word_segment_ids"].shape == (4, 12)


def test_bad_input_errors(model_params, forward):
    model, params = model_params
    with pytest.raises(ValueError, match="invalid UTF-8 at byte offset 2"):
        bytes_to_words(b"ab\xff", 32)
    with pytest.raises(ValueError, match="invalid UTF-8"):
        text_to_word_batch([b"ok", b"\xc3("], 16, 8, 32)
    with pytest.raises(ValueError, match="empty text"):
        text_to_word_batch([""], 16, 8, 32)
    with pytest.raises(ValueError, match="max_words=4"):
        text_to_word_batch(["one two three four"], 32, 4, 32)  # 6 words with BOS/EOS
    with pytest.raises(ValueError, match="seq_len=8"):
        text_to_word_batch(["one two three"], 8, 8, 32)
    good = text_to_word_batch(["hi you"], 16, 8, 32)
    with pytest.raises(ValueError, match="max_words=80"):
        wide = {**good, "word_segment_ids": np.zeros((1, 81), np.int32)}
        forward(params, _jnp({**wide, "word_positions": wide["word_segment_ids"]}))
    with pytest.raises(ValueError, match="missing field 'word_ids'"):
        forward(params, _jnp({k: v for k, v in good.items() if k != "word_ids"}))
    with pytest.raises(ValueError, match="inputs must be integer"):
        forward(params, {**_jnp(good), "inputs": jnp.zeros((1, 16))})


# ---------------------------------------------------------------- model


def test_pooling_matches_isolated_words(model_params):
    """Packed, segment-masked pooling == pooling each word alone (a per-word loop)."""
    model, params = model_params
    b = text_to_word_batch(["To be, or not to be: that is\n the question."], 64, 16, 32)
    rng = np.random.default_rng(0)
    acts = jnp.asarray(rng.normal(size=(1, 64, CFG.encoder.d_model)), jnp.float32)
    w = int(b["word_ids"].max())
    slots = jnp.asarray(np.where(b["word_segment_ids"] > 0, np.arange(1, 17), 0))
    pool = jax.jit(lambda *a: model.apply({"params": params}, *a, method="pool_words"))
    packed = pool(acts, b["positions"], b["word_ids"], b["word_positions"], slots)
    for i in range(w):  # each word alone, its bytes left-aligned in a 32-slot buffer
        idx = np.flatnonzero(b["word_ids"][0] == i + 1)
        mine = np.zeros((1, 32), np.int32)
        mine[0, : len(idx)] = 1
        take = np.pad(idx, (0, 32 - len(idx)))
        alone = pool(
            acts[:, take], b["positions"][:, take], mine, b["word_positions"][:, i : i + 1],
            np.ones((1, 1), np.int32),
        )  # fmt: skip
        np.testing.assert_allclose(packed[0, i], alone[0, 0], rtol=1e-5, atol=1e-5)


EVERY_LAYER = dataclasses.replace(
    CFG, decoder=dataclasses.replace(CFG.decoder, num_layers=2), cross_attn_every_layer=True
)


@pytest.mark.parametrize("every_layer", [False, True])
def test_causality_over_bytes_and_words(model_params, forward, every_layer):
    """Logits at byte i never depend on bytes after i, nor on words after its own."""
    _, params = model_params
    text = "Now is the winter of our discontent made glorious summer"
    b = text_to_word_batch([text], 80, 16, 32)
    if every_layer:  # cross-attention before each of 2 decoder layers
        model = HAT(EVERY_LAYER)
        params = jax.jit(lambda k: nn.meta.unbox(model.init(k, _jnp(b))["params"]))(
            jax.random.key(1)
        )
        assert "cross_attention" in params["decoder"]["decoder_layers_1"]
        forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
    base = np.asarray(forward(params, _jnp(b)))
    rng = np.random.default_rng(1)
    n = len(text) + 2
    for i in (3, 7, 20, 40):  # keep the word structure, change every byte after i
        mod = dict(b)
        mod["inputs"] = b["inputs"].copy()
        mod["inputs"][0, i + 1 : n] = rng.integers(97, 123, n - i - 1)
        out = np.asarray(forward(params, _jnp(mod)))
        np.testing.assert_allclose(out[0, : i + 1], base[0, : i + 1], atol=1e-6)
        assert np.abs(out[0, i + 1 : n] - base[0, i + 1 : n]).max() > 1e-3
    # The first byte of word w sees words < w only: changing word w's later bytes and all
    # later words leaves it unchanged (checked above); changing an earlier word moves it.
    first = int(np.flatnonzero(b["word_ids"][0] == 5)[0])
    mod = dict(b)
    mod["inputs"] = b["inputs"].copy()
    mod["inputs"][0, 1] = ord("W")
    assert np.abs(np.asarray(forward(params, _jnp(mod)))[0, first] - base[0, first]).max() > 1e-4


# ---------------------------------------------------------------- generation


def prompt_words(prompt: str, max_word_bytes: int) -> tuple[list, bytes]:
    """(finished words, unfinished last word) of a prompt: ``[BOS] + words``, the last text
    word unfinished (host reference of the decoder's prefill split)."""
    words = split_word_bytes(prompt, max_word_bytes)
    if not words:
        return [(BOS_ID,)], b""
    return [(BOS_ID,), *words[:-1]], words[-1]


def _generated_words(prompt: str, tokens: list[int], max_word_bytes: int):
    """For each generated byte, in order: (the words before it, ``[BOS] + words`` with the
    current one last if begun; the pieces of its window once it is fed, :func:`append_byte`),
    starting from the prompt's split (host reference of the decoder's word boundaries)."""
    done, cur = prompt_words(prompt, max_word_bytes)
    for tok in tokens:
        pieces = append_byte(cur, tok, max_word_bytes)
        yield ([*done, cur] if cur else list(done)), pieces
        done, cur = [*done, *pieces[:-1]], pieces[-1]


def _full_forward_checks(forward, params, prompts, gen, greedy=True, config=CFG):
    """The engine's logits at every generated byte == those of an uncached forward over the
    words so far (host rule: :func:`append_byte`; all prefixes in one batch), and (``greedy``)
    the byte == their argmax (PAD, BOS excluded). Returns the bytes checked."""
    rows, where = [], []
    for r, prompt in enumerate(prompts):
        walk = _generated_words(prompt, gen.tokens[r], config.max_word_bytes)
        for step, (tok, (words, _)) in enumerate(zip(gen.tokens[r], walk)):
            rows.append(words)
            where.append((r, step, sum(len(x) for x in words) - 1, tok))
    logits = np.array(forward(params, _jnp(words_to_batch(rows, config.max_seq_len, 64))))
    logits[..., [PAD_ID, BOS_ID]] = -np.inf
    for k, (r, step, last, tok) in enumerate(where):
        np.testing.assert_allclose(gen.logits[step, r], logits[k, last], atol=2e-4)
        assert not greedy or int(logits[k, last].argmax()) == tok, (r, step)
    return len(where)


def test_append_byte_reference_rule():
    """The host rule the decoder's window split follows: an unfinished UTF-8 character
    stays in the current word; a word never exceeds max_word_bytes."""
    assert append_byte(b" Hel", ord("l"), 32) == [b" Hell"]
    assert append_byte(b"Hi", ord(" "), 32) == [b"Hi", b" "]
    assert append_byte(b"x", 0xE6, 32) == [b"x\xe6"]  # 日 begins: not split yet
    assert append_byte(b"x\xe6\x97", 0xA5, 32) == [b"x", "日".encode()]
    assert append_byte(b"abc", 0xE6, 3) == [b"abc", b"\xe6"]


def test_cached_generation_equals_full_forward_greedy(model_params, forward):
    """Greedy, float32; ragged prompts (batched, left-aligned): mid-word, empty, on a word
    boundary, multilingual with an emoji. ASCII-only head so the test covers many word
    boundaries without invalid UTF-8."""
    model, params = model_params
    params = _ascii_head(params)
    assert prompt_words("ROMEO. Hel", 32) == ([(B,), b"ROMEO."], b" Hel")
    prompts = ["ROMEO. Hel", "", "Speak.\n", "Grüße, 日本語 🙂👍🏽 x"]
    gen = generate(model, params, prompts, max_new_bytes=20, return_logits=True)
    assert _full_forward_checks(forward, params, prompts, gen) == 80
    assert all(len(t) == 20 for t in gen.tokens)


def _replayed(prompts: list[str], gen, park: float) -> tuple[int, int, int]:
    """:func:`park_schedule` of a generation: the words in each row's window after each
    generated byte (:func:`append_byte`, from the prompt's last word)."""
    words = np.ones((len(prompts), max(len(t) for t in gen.tokens)), int)
    for r, (prompt, tokens) in enumerate(zip(prompts, gen.tokens)):
        for j, (_, pieces) in enumerate(_generated_words(prompt, tokens, CFG.max_word_bytes)):
            words[r, j] = len(pieces)
    return park_schedule(words, np.array([len(t) for t in gen.tokens]), park)


@pytest.mark.parametrize("park", [0.0, HATDecoder.park, 1.0])  # the default in the middle
def test_parked_rows_give_the_same_generation(model_params, forward, park):
    """Rows that finished a word wait for the word path (``park``: until that share of the
    rows does) while the others go on: per-row byte and word slots keep every row's caches
    its own, so each row's bytes and logits are those of an uncached forward, whatever the
    schedule; waiting for more rows runs fewer backbone steps."""
    model, params = model_params
    params = _ascii_head(params)
    prompts = ["ROMEO. Hel", "", "Speak.\n", "Grüße, 日本語 🙂 x", "a b", "Nay", " ", "O, th"]
    gen = generate(
        model, params, prompts, max_new_bytes=16, return_logits=True,
        decoder=HATDecoder(model, park=park),
    )  # fmt: skip
    assert _full_forward_checks(forward, params, prompts, gen) == 8 * 16
    words = sum(len(prompt_words(p + t, CFG.max_word_bytes)[0]) for p, t in zip(prompts, gen.texts))
    words -= sum(len(prompt_words(p, CFG.max_word_bytes)[0]) for p in prompts)
    steps, waited = gen.stats["word_steps"], gen.stats["waited"]
    assert words >= 8 * 3  # every row crossed several word boundaries
    if park == 0.0:  # the word path runs whenever a row parks: nobody waits
        assert waited == 0 and gen.steps == 16
    else:  # rows wait, and the backbone steps for several rows' words at once
        assert waited > 0 and gen.steps > 16 and steps < words / 2
    if park == 1.0:  # every row finishes one word per backbone step
        assert steps <= max(len(prompt_words(p + t, CFG.max_word_bytes)[0]) for p, t in
                            zip(prompts, gen.texts)) + 1  # fmt: skip
    # the host reference of the schedule, fed where each row parked, gives the loop's counts
    assert _replayed(prompts, gen, park) == (gen.steps, steps, waited)
    if park != HATDecoder.park:
        return
    # sampled (other word lengths), then a stop string that ends row 2 early (which changes
    # the schedule of the others after it): the same checks
    sample = functools.partial(
        generate, model, params, prompts, max_new_bytes=16, return_logits=True,
        temperature=1.0, top_k=8, rng=jax.random.key(3), decoder=HATDecoder(model, park=park),
    )  # fmt: skip
    free = sample()
    assert _replayed(prompts, free, park) == (
        free.steps, free.stats["word_steps"], free.stats["waited"]
    )  # fmt: skip
    stop = free.texts[2][5:7]
    hot = sample(stop=[stop])
    assert hot.texts[2] == free.texts[2][: free.texts[2].index(stop)]
    for got in (free, hot):
        assert _full_forward_checks(forward, params, prompts, got, greedy=False) > 8 * 4


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(park=1.5), ValueError, r"park must be in \[0, 1\], got 1.5"),
        (dict(park=-0.1), ValueError, r"park must be in \[0, 1\], got -0.1"),
    ],
)
def test_decoder_settings_are_checked(model_params, kw, error, match):
    with pytest.raises(error, match=match):
        HATDecoder(model_params[0], **kw)


def test_cached_generation_wraps_the_byte_ring_buffers():
    """Windows of 7 bytes and words of at most 8: the byte caches hold 16 slots (a ring of 7 +
    8 and the sink; whole flash-decoding tiles), so a 9-byte prompt and 40 new bytes wrap the
    ring three times, and a 21-byte prompt already fills it in the prefill (its last 15 bytes
    kept, rolled to their slots); each byte's logits still equal the full forward's (a slot
    read after it was overwritten, or a byte outside the window still visible, moves them)."""
    small = dict(window=7, dtype="float32")
    cfg = dataclasses.replace(
        CFG, encoder=dataclasses.replace(CFG.encoder, **small),
        decoder=dataclasses.replace(CFG.decoder, **small), max_word_bytes=8, max_seq_len=64,
        max_words=64,
    )  # fmt: skip
    model = HAT(cfg)
    assert HATDecoder(model).ring_len(10, 40) == 16
    params = _ascii_head(_init_params(model, 1))
    prompts = ["Hello th", "Grüß", "The quick brown fox."]
    gen = generate(model, params, prompts, max_new_bytes=40, return_logits=True)
    forward = jax.jit(lambda p, b: model.apply({"params": p}, b))
    assert _full_forward_checks(forward, params, prompts, gen, config=cfg) == 120


def test_cached_generation_redecodes_bytes_of_a_new_multibyte_word(model_params, forward):
    """A CJK character starts a new word only once its 3rd byte arrives: its first two bytes
    were decoded with the old word's embedding and must be re-decoded.

    Residual branches of the byte stacks are shrunk (not removed) and the head reads off a
    designed bigram E6->97->A5->E6 ("日日日..."), so greedy decoding crosses many such words
    while every logit still depends on the caches. Without the re-decoding (step 4 of
    arjax.generate.hat) the logits differ from the full forward's by ~2e-3 (checked)."""
    model, params = model_params
    params = _bigram_params(params, {0xE6: 0x97, 0x97: 0xA5, 0xA5: 0xE6, 0xAC: 0xE6})
    prompts = ["日", "x日本"]
    gen = generate(model, params, prompts, max_new_bytes=12, return_logits=True)
    assert gen.texts == ["日日日日", "日日日日"]
    _full_forward_checks(forward, params, prompts, gen)


def test_cached_generation_finishes_several_words_at_one_byte(model_params, forward):
    """The prompt's last word, split in the whole prompt, is one word ("\U0001f3fd\u202f;", kept
    together by the "_" before it); re-split on its own with the first new byte it is four, so
    one byte finishes three words and the word path steps the backbone three times for that row
    (past the first: the rare branch of step 3). Each byte's logits equal the full forward's."""
    model, params = model_params
    params = _ascii_head(params)
    prompt = "_\U0001f3fd\u202f;"
    last = prompt_words(prompt, CFG.max_word_bytes)[1]
    assert len(append_byte(last, ord("a"), CFG.max_word_bytes)) == 4
    prompts = [prompt, "ROMEO. Hel"]
    gen = generate(model, params, prompts, max_new_bytes=8, return_logits=True)
    assert _full_forward_checks(forward, params, prompts, gen) == 16


def _bigram_params(params, bigrams: dict[int, int]):
    """Byte stacks' residual branches shrunk (not removed) and a head that reads off the
    designed ``bigrams`` (byte -> next byte) from the current byte's embedding."""

    def shrink(path, x):
        keys = [getattr(p, "key", "") for p in path]
        byte_stack = keys[0] in ("encoder", "decoder")
        return x * 0.05 if byte_stack and keys[-2] in ("o_proj", "down_proj") else x

    params = jax.tree_util.tree_map_with_path(shrink, params)
    emb = np.asarray(params["embedding"]["embedding"])
    unit = emb / np.sqrt((emb**2).mean(-1, keepdims=True))
    head = np.zeros((CFG.decoder.d_model, CFG.vocab_size), np.float32)
    for a, b in bigrams.items():
        head[:, b] += unit[a] * 30.0 / CFG.decoder.d_model
    return {**params, "lm_head": {"kernel": jnp.asarray(head)}}


def test_cached_generation_moves_an_unfinished_character_past_max_word_bytes(model_params, forward):
    """A 3-byte character whose first byte fills a word to ``max_word_bytes`` (32): its second
    byte moves it, whole, to a new word (as the whole text's split keeps it), and its first
    byte is re-decoded there; the engine's logits equal the full forward's at every byte."""
    model, params = model_params
    params = _bigram_params(params, {0x61: 0xE6, 0xE6: 0x97, 0x97: 0xA5, 0xA5: 0xE6})
    prompts = ["b" + "a" * 30]  # one word of 31 bytes
    gen = generate(model, params, prompts, max_new_bytes=6, return_logits=True)
    assert gen.texts == ["日日"]
    assert split_word_bytes(prompts[0] + "日", CFG.max_word_bytes)[-1] == "日".encode()
    assert _full_forward_checks(forward, params, prompts, gen) == 6


def test_stop_strings_and_sampler(model_params):
    model, params = model_params
    params = _ascii_head(params)
    free = generate(model, params, ["Ab"], max_new_bytes=10).texts[0]
    stop = free[5:7]
    cut = generate(model, params, ["Ab"], max_new_bytes=10, stop=(stop,)).texts[0]
    assert cut == free[: free.index(stop)]
    text = sample("hat", model, params, None, prompts=["Ab"], max_bytes=10, temperature=0.0)
    assert text == "Ab" + free
    with pytest.raises(ValueError, match="max_seq_len=256"):
        generate(model, params, ["x" * 250], max_new_bytes=10)


# ---------------------------------------------------------------- training


def test_training_loss_decreases_on_shakespeare():
    from arjax.train.config import TrainConfig
    from arjax.train.optim import make_optimizer
    from arjax.train.step import init_train_state, make_train_step

    data = DataConfig(seq_len=128, batch_size=4, val_batches=1)
    batch = _jnp(make_word_eval_batches(data, max_words=48, max_word_bytes=32)[0])
    cfg = dataclasses.replace(CFG, max_words=48, max_seq_len=128)
    model = HAT(cfg)
    tx = make_optimizer(TrainConfig(learning_rate=3e-3, warmup_steps=0))
    init = jax.jit(lambda key: nn.meta.unbox(init_train_state(model, tx, key, batch)))
    state = init(jax.random.key(0))  # compiled: eager, op by op, it took 4x longer
    step = jax.jit(make_train_step(model, tx))
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 1.0, losses  # from ~ln(259)=5.6 nats down
    assert metrics["tokens"] == float(np.sum(batch["loss_mask"]))  # every predicted byte
