"""Word-by-word HAT generation with KV caches (Neitemeier et al. 2025, Sec. 2; the public
reference implementation's cached ``generate``).

The prompt (``[BOS] + split_word_bytes(prompt)``, no BOS when ``config.bos_id`` is None, as
for the published models) is prefilled through the whole model; its
last word is treated as unfinished. Then, per byte and for all rows at once:

1. a byte is sampled (:func:`arjax.generate.sampling.sample_token`) from the decoder's logits;
2. on the host, :func:`append_byte` re-splits the current word plus that byte; if the splitter
   says a new word began, each finished word is pooled by the encoder connector from its
   bytes' cached encoder activations and goes through ONE backbone step with the KV cache,
   giving the new word's predictive embedding;
3. bytes of the new word that the decoder had already seen as part of the old word (a
   multi-byte character, or a re-split) are re-decoded with the new embedding, overwriting
   their decoder cache slots (rows without that change keep their cache) -- so the state
   always equals an uncached forward over the current text;
4. the encoder and decoder advance one byte with their KV caches.

Prompts of different lengths are left-padded in the byte caches (one shared slot index);
the backbone cache has one slot per word-completion event, marked visible only for the rows
whose word completed. Bytes that do not decode as UTF-8 yet (a partial or invalid sequence)
never start a word: they extend the current word until ``max_word_bytes``, where the word is
cut. Generation of a row stops at ``config.eos_id`` (or any special id >= 256, not part of
the text), at a stop string (the text is cut
before it) or after ``max_new_bytes``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arjax.data.splitter import split_word_bytes
from arjax.data.vocab import BOS_ID, BYTE_VOCAB
from arjax.data.words import Word
from arjax.generate.sampling import sample_token, validate_sampling


def append_byte(word: bytes, byte: int, max_word_bytes: int) -> list[bytes]:
    """``word + byte`` re-split into ``[finished words..., current word]``.

    Valid UTF-8 is split with :func:`arjax.data.splitter.split_word_bytes`; an undecodable
    tail stays in the current word, which is cut once it would exceed ``max_word_bytes``.
    """
    data = word + bytes([byte])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [word, data[-1:]] if len(data) > max_word_bytes else [data]
    return split_word_bytes(text, max_word_bytes)


def prompt_words(
    prompt: str, max_word_bytes: int, bos_id: int | None = BOS_ID
) -> tuple[list[Word], bytes]:
    """(finished words, unfinished last word) of a prompt: ``[BOS] + words`` (no BOS word if
    ``bos_id`` is None); the last text word is unfinished (the next byte may extend it). The
    empty prompt leaves it empty (ValueError without a BOS: nothing to condition on)."""
    words = split_word_bytes(prompt, max_word_bytes)
    bos = [] if bos_id is None else [(bos_id,)]
    if not words:
        if not bos:
            raise ValueError("generate_hat: empty prompt and the model has no bos_id")
        return bos, b""
    return [*bos, *words[:-1]], words[-1]


@dataclasses.dataclass
class HATGeneration:
    """``texts``/``tokens``: the continuation of each prompt; ``step_logits``
    ``[steps, batch, vocab]`` (float32) the logits each sampled byte was drawn from (when
    requested); ``refits``: bytes re-decoded because a new word began before them."""

    texts: list[str]
    tokens: list[list[int]]
    step_logits: np.ndarray | None
    refits: int


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _left_padded_prompt(rows: list[list[Word]]) -> dict[str, np.ndarray]:
    """Prompt batch with bytes left-padded (one slot index for all rows), words right-padded;
    widths rounded up (16 bytes, 8 words) so that similar prompts share compiled steps."""
    lengths = [sum(len(w) for w in r) for r in rows]
    width, num_words = _round_up(max(lengths), 16), _round_up(max(len(r) for r in rows), 8)
    batch = {k: np.zeros((len(rows), width), np.int32) for k in ("segment_ids", "positions")}
    batch["inputs"] = np.zeros((len(rows), width), np.int32)  # padding: masked by segment 0
    batch["word_ids"] = np.zeros((len(rows), width), np.int32)
    batch["word_segment_ids"] = np.zeros((len(rows), num_words), np.int32)
    batch["word_positions"] = np.zeros((len(rows), num_words), np.int32)
    for i, (words, n) in enumerate(zip(rows, lengths, strict=True)):
        pad = width - n
        batch["inputs"][i, pad:] = [t for w in words for t in w]
        batch["segment_ids"][i, pad:] = 1
        batch["positions"][i, pad:] = np.arange(n)
        batch["word_ids"][i, pad:] = np.repeat(
            np.arange(1, len(words) + 1), [len(w) for w in words]
        )
        batch["word_segment_ids"][i, : len(words)] = 1
        batch["word_positions"][i, : len(words)] = np.arange(len(words))
    return batch


def _windowed(visible: jax.Array, slot: jax.Array, window: int | None) -> jax.Array:
    """Cache slots ``[batch, cache_len]`` a query at ``slot`` may see."""
    slots = jnp.arange(visible.shape[1])
    see = visible & (slots <= slot)[None, :]
    return see if window is None else see & (slots > slot - window)[None, :]


@functools.partial(jax.jit, static_argnames=("model", "cache_len", "word_cache_len"))
def _prefill(model: nn.Module, params: Any, batch: dict, *, cache_len: int, word_cache_len: int):
    (logits, acts, states), variables = model.apply(
        {"params": params}, batch, mode="prefill", cache_len=cache_len,
        word_cache_len=word_cache_len, method="forward", mutable=["cache"],
    )  # fmt: skip
    return logits[:, -1], acts, states, variables["cache"]


_sample = jax.jit(sample_token, static_argnames=("temperature", "top_k", "top_p"))


def _merge_rows(write: jax.Array, new: Any, old: Any) -> Any:
    """Per-row select over a pytree whose leaves have batch as their first axis."""
    return jax.tree.map(
        lambda n, o: jnp.where(write.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old
    )


@functools.partial(jax.jit, static_argnames=("model",))
def _decoder_step(
    model: nn.Module,
    params: Any,
    cache: dict,
    act: jax.Array,  # [batch, enc_d] encoder activation of the byte at `slot`
    positions: jax.Array,  # [batch]
    slot: jax.Array,
    visible: jax.Array,  # [batch, cache_len]
    pred: jax.Array,  # [batch, backbone_d] predictive embedding of the byte's word
    write: jax.Array,  # [batch] bool: rows whose decoder cache/logits this step replaces
) -> tuple[jax.Array, dict]:
    ones = jnp.ones((act.shape[0], 1), jnp.int32)
    logits, new = model.apply(
        {"params": params, "cache": cache}, act[:, None], pred[:, None], positions[:, None],
        None, ones, jnp.zeros_like(ones), ones, mode="decode", cache_index=slot,
        kv_visible=_windowed(visible, slot, model.config.decoder.window),
        method="decode_bytes", mutable=["cache"],
    )  # fmt: skip
    decoder = _merge_rows(write, new["cache"]["decoder"], cache["decoder"])
    return logits[:, 0], {**cache, "decoder": decoder}


@functools.partial(jax.jit, static_argnames=("model",))
def _byte_step(
    model: nn.Module,
    params: Any,
    cache: dict,
    acts: jax.Array,  # [batch, cache_len, enc_d] encoder activations so far
    tokens: jax.Array,  # [batch]
    positions: jax.Array,  # [batch]
    slot: jax.Array,
    visible: jax.Array,  # [batch, cache_len] (slot already marked)
    pred: jax.Array,  # [batch, backbone_d]
) -> tuple[jax.Array, jax.Array, dict]:
    act, new = model.apply(
        {"params": params, "cache": cache}, tokens[:, None], positions[:, None], mode="decode",
        cache_index=slot, kv_visible=_windowed(visible, slot, model.config.encoder.window),
        method="encode", mutable=["cache"],
    )  # fmt: skip
    cache = {**cache, "encoder": new["cache"]["encoder"]}
    acts = jax.lax.dynamic_update_slice(acts, act.astype(acts.dtype), (0, slot, 0))
    write = jnp.ones(tokens.shape, bool)
    logits, cache = _decoder_step(
        model, params, cache, act[:, 0], positions, slot, visible, pred, write
    )
    return logits, acts, cache


@functools.partial(jax.jit, static_argnames=("model",))
def _word_step(
    model: nn.Module,
    params: Any,
    cache: dict,
    acts: jax.Array,  # [batch, cache_len, enc_d]
    start: jax.Array,  # [batch] first byte slot of the finished word
    length: jax.Array,  # [batch] its byte count (<= max_word_bytes)
    byte_position: jax.Array,  # [batch] position of its first byte
    word_position: jax.Array,  # [batch] its word index
    slot: jax.Array,  # backbone cache slot
    visible: jax.Array,  # [batch, word_cache_len] (slot marked for the finishing rows)
) -> tuple[jax.Array, dict]:
    """Encoder connector over the word's bytes + one backbone step: ``[batch, backbone_d]``."""
    m = model.config.max_word_bytes
    offs = jnp.arange(m)
    idx = jnp.minimum(start[:, None] + offs, acts.shape[1] - 1)  # [batch, max_word_bytes]
    word_acts = jnp.take_along_axis(acts, idx[..., None], axis=1)
    in_word = (offs[None, :] < length[:, None]).astype(jnp.int32)
    ones = jnp.ones((start.shape[0], 1), jnp.int32)
    word = model.apply(
        {"params": params}, word_acts, byte_position[:, None] + offs, in_word,
        word_position[:, None], ones, method="pool_words",
    )  # fmt: skip
    state, new = model.apply(
        {"params": params, "cache": cache}, word, word_position[:, None], mode="decode",
        cache_index=slot, kv_visible=visible, method="run_backbone", mutable=["cache"],
    )  # fmt: skip
    return state[:, 0], {**cache, "backbone": new["cache"]["backbone"]}


def generate_hat(
    model: nn.Module,
    params: Any,
    prompts: list[str],
    *,
    max_new_bytes: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop: tuple[str, ...] = (),
    rng: jax.Array | None = None,
    return_logits: bool = False,
) -> HATGeneration:
    """Continue each prompt by up to ``max_new_bytes`` bytes, word by word (module doc)."""
    validate_sampling(temperature, top_k, top_p)
    c = model.config
    if not prompts:
        raise ValueError("generate_hat: prompts must be a non-empty list of strings")
    if max_new_bytes <= 0:
        raise ValueError(f"max_new_bytes must be > 0, got {max_new_bytes}")
    split = [prompt_words(p, c.max_word_bytes, c.bos_id) for p in prompts]
    rows = [[*done, cur] if cur else done for done, cur in split]
    cur0 = [cur for _, cur in split]
    batch = _left_padded_prompt(rows)
    b, width = batch["inputs"].shape
    longest = max(sum(len(w) for w in r) for r in rows)
    if longest + max_new_bytes > c.max_seq_len:
        raise ValueError(
            f"prompt ({longest} bytes with BOS) + max_new_bytes ({max_new_bytes}) exceeds the "
            f"model's max_seq_len={c.max_seq_len}"
        )
    num_words = batch["word_segment_ids"].shape[1]
    cache_len = _round_up(width + max_new_bytes, 64)
    # every finished word holds >= 1 byte of the unfinished prompt word or of the new bytes
    word_cache_len = _round_up(num_words + max_new_bytes + max(len(w) for w in cur0), 64)
    logits, prompt_acts, states, cache = _prefill(
        model, params, {k: jnp.asarray(v) for k, v in batch.items()},
        cache_len=cache_len, word_cache_len=word_cache_len,
    )  # fmt: skip
    acts = jnp.pad(prompt_acts, ((0, 0), (0, cache_len - width), (0, 0)))
    finished = np.array([len(done) for done, _ in split])  # finished words per row
    # [batch, backbone_d]: a row with no finished word predicts from first_word_embedding
    first = params["first_word_embedding"].astype(states.dtype)
    pred = jnp.where(
        jnp.asarray(finished == 0)[:, None], first, states[jnp.arange(b), finished - 1]
    )
    cur = list(cur0)
    pad = width - np.array([sum(len(w) for w in r) for r in rows])  # left padding per row
    cur_start = width - np.array([len(w) for w in cur])  # slot of the current word's first byte
    visible = np.zeros((b, cache_len), bool)
    visible[:, :width] = batch["segment_ids"] > 0
    word_visible = np.zeros((b, word_cache_len), bool)
    word_visible[:, :num_words] = np.arange(num_words)[None, :] < finished[:, None]
    word_slot, refits = num_words, 0
    out: list[list[int]] = [[] for _ in range(b)]
    active = np.ones(b, bool)
    rng = jax.random.key(0) if rng is None else rng
    step_logits = []
    for t in range(width, width + max_new_bytes):
        rng, key = jax.random.split(rng)
        if return_logits:
            step_logits.append(np.asarray(logits))
        toks = np.asarray(_sample(logits, key, temperature=temperature, top_k=top_k, top_p=top_p))
        pieces = [[w] for w in cur]
        for r in np.flatnonzero(active):
            tok = int(toks[r])
            if tok == c.eos_id or tok >= BYTE_VOCAB:  # EOS or another special id ends the row
                active[r] = False
                continue
            out[r].append(tok)
            pieces[r] = append_byte(cur[r], tok, c.max_word_bytes)
            if stop and _hit_stop(out[r], stop):
                active[r] = False
        if not active.any():
            break
        # Finished words: encoder connector + one backbone step each.
        done = [p[:-1] if active[r] else [] for r, p in enumerate(pieces)]
        for i in range(max(len(d) for d in done)):
            rows_i = np.array([len(d) > i for d in done])
            length = np.array([len(d[i]) if len(d) > i else 1 for d in done])
            word_visible[rows_i, word_slot] = True
            state, cache = _word_step(
                model, params, cache, acts, jnp.asarray(cur_start), jnp.asarray(length),
                jnp.asarray(cur_start - pad), jnp.asarray(finished), word_slot,
                jnp.asarray(word_visible),
            )  # fmt: skip
            pred = jnp.where(jnp.asarray(rows_i)[:, None], state, pred)
            cur_start = np.where(rows_i, cur_start + length, cur_start)
            finished = finished + rows_i
            word_slot += 1
        # Bytes of a new word already decoded as part of the old one: re-decode them.
        moved = np.array([bool(d) for d in done]) & (cur_start < t)
        for j in range(int(cur_start[moved].min()) if moved.any() else t, t):
            write = moved & (cur_start <= j)
            refits += int(write.sum())
            _, cache = _decoder_step(
                model, params, cache, acts[:, j], jnp.asarray(j - pad), j,
                jnp.asarray(visible), pred, jnp.asarray(write),
            )  # fmt: skip
        cur = [p[-1] if active[r] else cur[r] for r, p in enumerate(pieces)]
        visible[:, t] = True
        toks = toks.clip(0, c.vocab_size - 1)  # finished rows: any valid id
        logits, acts, cache = _byte_step(
            model, params, cache, acts, jnp.asarray(toks), jnp.asarray(t - pad),
            t, jnp.asarray(visible), pred,
        )  # fmt: skip
    texts = [_cut_stop(bytes(o).decode("utf-8", errors="replace"), stop) for o in out]
    logits_out = np.stack(step_logits) if return_logits else None
    return HATGeneration(texts, out, logits_out, refits)


def _hit_stop(tokens: list[int], stop: tuple[str, ...]) -> bool:
    text = bytes(tokens).decode("utf-8", errors="replace")
    return any(s and s in text for s in stop)


def _cut_stop(text: str, stop: tuple[str, ...]) -> str:
    cuts = [text.index(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text


def sample_hat(model, params, cfg, *, prompts, max_bytes, seed, png, **sampling) -> str:
    """``arjax.generate.SAMPLERS["hat"]``: prompts + continuations, separated by ``---``."""
    del cfg, png
    longest = max(len(p.encode("utf-8")) for p in prompts) + 1
    budget = max(1, min(max_bytes, model.config.max_seq_len - longest))
    gen = generate_hat(
        model, params, prompts, max_new_bytes=budget, rng=jax.random.key(seed), **sampling
    )
    return "\n---\n".join(p + t for p, t in zip(prompts, gen.texts, strict=True))
