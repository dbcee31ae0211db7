"""HAT decoding on device, word by word (Neitemeier et al. 2025, Sec. 2; the public reference
implementation's cached ``generate`` runs the same computation as a host loop).

Prefill: the prompt (``[BOS] + bytes``, no BOS if the config has none) is split into words by
:func:`arjax.data.word_starts` and run through the whole model at once; its last text word is
treated as unfinished (the next byte may extend it). Then, at each iteration of the engine's
loop (:mod:`arjax.generate.engine`), for all rows at once:

1. each row that is fed a byte puts it through the encoder (KV cache) and into its current
   word's window: ``[batch, max_word_bytes + 1]`` bytes and encoder activations;
2. :func:`arjax.data.word_starts` re-splits that window (an unfinished UTF-8 character at its
   end stays in the current word, or starts a word of its own when the word would exceed
   ``max_word_bytes``; the host form of this rule is :func:`append_byte`, and
   ``tests/test_hat_window_split.py`` checks the two agree byte by byte); every word but the
   last is finished. A finished word is never revised, so where a later character changes an
   earlier boundary in :func:`arjax.data.splitter.split_word_bytes` of the whole text (a
   fraction slash between digits, U+202F after a space, a combining mark after ``_``), the
   generated words follow the text as it was when each word was finished;
3. a row whose window now holds a finished word is *parked*: its next byte depends on the
   backbone's step over that word. The word path runs when the parked rows are at least
   ``park`` of the rows still generating (``HATDecoder.park``; 0 = as soon as any row
   parks): for each finished word, masked over the batch, the encoder connector pools its
   bytes and the backbone takes ONE cached step, giving the next word's predictive
   embedding and from it each decoder cross-attention layer's output for that word (a
   byte's softmax there is over its word's one key: computed once per word, not per byte);
   a ``lax.while_loop`` runs this as many times as the most finished words in a parked row.
   Until then the parked rows wait, drawing nothing, while the others go on.
   Masked, not compacted: a decode-time backbone step reads all its weights whatever the
   number of rows (bandwidth-bound), so a smaller batch would save FLOPs, not time. At
   batch 64 some row ends a word at almost every byte: run at once (``park=0``) the
   backbone would step at nearly every iteration; waiting for more rows trades idle byte
   slots of the parked rows for fewer backbone steps (``experiments/bench_hat_decode.py``
   sweeps ``park``; ``experiments/hat_park_schedule.py`` models the trade with the host form
   of this schedule, :func:`park_schedule`, which ``tests/test_hat.py`` checks against the
   loop's counts);
4. bytes that the decoder had already seen as part of the old word but that now belong to a
   later word (the new current word's first bytes when a multi-byte character completes it;
   every word after the first when the window re-splits into three or more) are re-decoded,
   word by word, with their own word's embedding, rewriting their decoder cache slots for
   those rows only, so the state always equals an uncached forward over the current words;
5. the decoder takes each row's newest byte (KV cache), for the rows fed now that did not
   park and the rows just served by the word path, and gives their next byte's logits.

Rows advance at their own pace, so every cache has per-row slots: a byte's global index
(``t``, per row; prompts are left-aligned, so all rows start at the same index) picks its
slot in the byte caches, a word's position in the row its slot in the backbone cache. Byte
caches are ring buffers: a byte stack with a sliding window keeps only ``window +
max_word_bytes`` slots (the window, plus the current word's bytes that may be re-decoded;
rounded up to whole flash-decoding tiles), whatever the generated length; the encoder
activations are kept only for the current word. Every cache's last slot is a sink that no
query sees: rows that write nothing at a step write there, so that a cache write is one
in-place update, with no select of the old slot for those rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from arjax.data import word_starts
from arjax.data.splitter import split_word_bytes
from arjax.data.vocab import BOS_ID, PAD_ID
from arjax.generate.engine import Decoder, left_align, tree_bytes
from arjax.ops.attention import decode_cache_len


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def incomplete_tail(data: bytes) -> int:
    """Bytes at the end of ``data`` that begin a UTF-8 character not finished yet."""
    for back in range(1, min(4, len(data)) + 1):
        lead = data[-back]
        if lead & 0xC0 != 0x80:  # not a continuation byte
            need = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4
            return back if lead >= 0xC0 and back < need and lead >> 3 != 0b11111 else 0
    return 0


def append_byte(word: bytes, byte: int, max_word_bytes: int) -> list[bytes]:
    """Host reference of step 2: ``word + byte`` re-split into ``[finished..., current]``.

    The text up to an unfinished UTF-8 character is split with
    :func:`arjax.data.splitter.split_word_bytes`; the unfinished character joins the last
    word. A word that would then exceed ``max_word_bytes`` leaves the unfinished character to a
    word of its own, kept whole as ``split_word_bytes`` keeps it once complete; only a
    character longer than ``max_word_bytes`` itself (a limit under 4) is cut inside, before the
    new byte. (Text only: invalid UTF-8 before the end raises ``UnicodeDecodeError``, as does
    the byte after such a cut.)
    """
    data = word + bytes([byte])
    head = data[: len(data) - incomplete_tail(data)]
    pieces = split_word_bytes(head.decode("utf-8"), max_word_bytes) if head else [b""]
    unfinished = data[len(head) :]
    pieces[-1] += unfinished
    if len(pieces[-1]) > max_word_bytes:
        cut = len(unfinished) if len(pieces[-1]) > len(unfinished) else 1
        pieces[-1:] = [pieces[-1][:-cut], pieces[-1][-cut:]]
    return pieces


def park_schedule(words: np.ndarray, new_bytes: np.ndarray, park: float) -> tuple[int, int, int]:
    """Host reference of the loop's schedule (step 3, :class:`HATDecoder`). Row ``r`` feeds
    ``new_bytes[r]`` bytes, one per iteration unless parked; ``words[r, j]`` ``[batch,
    max_new]`` is the number of words in its window after it feeds its byte ``j``, and it parks
    where that is above 1. The word path runs when the parked rows are at least ``park`` of the
    rows still generating (fed now, or parked), for as many backbone steps as the most
    finished words in a parked row. Returns ``(loop iterations, backbone steps, row-iterations
    spent parked)``: the engine's ``steps`` and the decoder's ``stats`` for prompts the prefill
    fed whole and no EOS."""
    if not 0.0 <= park <= 1.0:  # above 1 the rows could wait for ever
        raise ValueError(f"park_schedule: park must be in [0, 1], got {park}")
    n = np.asarray(new_bytes)
    rows = np.arange(len(n))
    fed = np.zeros(len(n), int)
    count = np.ones(len(n), int)  # words in each row's window
    ready = np.ones(len(n), bool)
    steps = word_steps = waited = 0
    while (fed < n).any():  # the loop ends when every row is done, parked or not
        waiting = ~ready
        active = ready & (fed < n)
        count = np.where(active, words[rows, np.minimum(fed, words.shape[1] - 1)], count)
        fed += active
        parked = (active | waiting) & (count > 1)
        go = parked.any() and parked.sum() >= park * (active | waiting).sum()
        if go:
            word_steps += int(count[parked].max()) - 1
            count = np.where(parked, 1, count)
        ready = ~parked | go
        waited += int(waiting.sum())
        steps += 1
    return steps, word_steps, waited


def _tail_length(window: jax.Array, n: jax.Array) -> jax.Array:
    """Device form of :func:`incomplete_tail` for ``window[:, :n]``: ``[batch]``."""
    width = window.shape[1]
    tail = jnp.zeros_like(n)
    found = jnp.zeros(n.shape, bool)
    for back in range(1, 5):
        idx = n - back
        lead = jnp.take_along_axis(window, jnp.clip(idx, 0, width - 1)[:, None], 1)[:, 0]
        here = ~found & (idx >= 0) & ((lead & 0xC0) != 0x80)
        need = jnp.where(lead >> 5 == 0b110, 2, jnp.where(lead >> 4 == 0b1110, 3, 4))
        open_ = (lead >= 0xC0) & (back < need) & (lead >> 3 != 0b11111)
        tail = jnp.where(here & open_, back, tail)
        found = found | here | (idx < 0)
    return tail


def split_window(window: jax.Array, n: jax.Array, max_word_bytes: int) -> jax.Array:
    """Word starts ``[batch, width]`` of each row's current-word window ``window[:, :n]``:
    the device form of :func:`append_byte` (built on :func:`arjax.data.word_starts`)."""
    width = window.shape[1]
    complete = n - _tail_length(window, n)
    starts = word_starts(window, complete, max_word_bytes=max_word_bytes)
    pos = jnp.arange(width)[None, :]
    starts = (starts & (pos < complete[:, None])) | ((pos == 0) & (n[:, None] > 0))
    last = jnp.max(jnp.where(starts, pos, 0), axis=1)  # [batch] start of the current word
    too_long = n - last > max_word_bytes  # only with an unfinished character at the end
    cut = jnp.where(complete > last, complete, n - 1)  # before it, else inside it
    return starts | ((pos == cut[:, None]) & too_long[:, None])


def window_append(window: jax.Array, n: jax.Array, values: jax.Array, active: jax.Array):
    """Step 1's write into the current-word window ``[batch, width, ...]``: ``values``
    ``[batch, ...]`` (the bytes, or their encoder activations) at index ``n`` of each active row;
    the other rows are untouched."""
    at = jnp.where(active, n, window.shape[1])  # out of bounds: dropped
    rows = jnp.arange(window.shape[0])
    return window.at[rows, at].set(values.astype(window.dtype), mode="drop")


def current_word_start(starts: jax.Array) -> jax.Array:
    """Window index ``[batch]`` of each row's current (last) word start: 0 with one word."""
    pos = jnp.arange(starts.shape[1])[None, :]
    return jnp.max(jnp.where(starts, pos, 0), axis=1)


def keep_from(window: jax.Array, begin: jax.Array, n: jax.Array) -> jax.Array:
    """``window [batch, width, ...]`` holding ``n`` bytes per row, cut to the bytes from
    ``begin`` on: moved to the front, the rest zeroed."""
    width = window.shape[1]
    pos = jnp.arange(width)[None, :]
    src = jnp.clip(pos + begin[:, None], 0, width - 1)
    keep = pos < (n - begin)[:, None]
    extra = (1,) * (window.ndim - 2)
    moved = jnp.take_along_axis(window, src.reshape(src.shape + extra), axis=1)
    return jnp.where(keep.reshape(keep.shape + extra), moved, 0)


def _ring_visible(
    latest: jax.Array, query: jax.Array, first: jax.Array, size: int, window: int | None
) -> jax.Array:
    """Cache slots ``[batch, size + 1]`` a byte at global index ``query`` ``[batch]`` may
    attend to, when row ``r``'s newest byte written is at ``latest[r]`` and its first byte at
    ``first[r]``: ring slot ``s < size`` holds global index ``latest - (latest - s) mod
    size``; the sink (slot ``size``, :func:`_slots`) is never seen."""
    latest = latest[:, None]
    held = latest - jnp.mod(latest - jnp.arange(size)[None, :], size)  # [batch, size]
    query = query[:, None]
    see = (held <= query) & (held >= first[:, None])
    see = see if window is None else see & (held > query - window)
    return jnp.pad(see, ((0, 0), (0, 1)))


def _ring(cache: Any) -> int:
    """Ring slots of a byte cache: all but its last, the sink (:func:`_slots`)."""
    return jax.tree.leaves(cache)[0].shape[1] - 1


def _slots(write: jax.Array, index: jax.Array, size: int) -> jax.Array:
    """Cache slots ``[batch]``: ``index mod size`` where ``write``, else ``size``: the sink, a
    ring's extra last slot that no query sees (:func:`_ring_visible`)."""
    return jnp.where(write, jnp.mod(index, size), size)


@dataclasses.dataclass(frozen=True)
class HATDecoder(Decoder):
    """:class:`arjax.generate.engine.Decoder` of :class:`arjax.models.hat.HAT` (module doc).

    ``park``: the word path runs once the rows waiting for it are at least this fraction of
    the rows still generating (0: whenever a row finishes a word). Greedy output and the
    distribution of every draw do not depend on it, only the loop's schedule does. The
    default, 0.75, ran 7% faster than 0.5 at batch 64 on an H200
    (``experiments/results/bench_hat_decode_b64.md``); the simulated schedule, with a
    word-path iteration costing ~5 byte-path iterations as fitted to that run, puts it within
    2% of the best share (0.7) from batch 8 to 256 (``hat_park_batches.md``).
    """

    park: float = 0.75

    def __post_init__(self) -> None:
        if not 0.0 <= self.park <= 1.0:
            raise ValueError(f"HATDecoder: park must be in [0, 1], got {self.park}")

    @property
    def bos(self) -> int | None:
        return self.model.config.bos_id

    @property
    def eos(self) -> int | None:
        return self.model.config.eos_id

    @property
    def never(self) -> tuple[int, ...]:
        """PAD and BOS when the model has a BOS (arjax's own byte vocabulary)."""
        if self.bos is None:
            return ()
        ids = {PAD_ID, BOS_ID, self.bos} - {self.eos}
        return tuple(sorted(i for i in ids if i < self.model.config.vocab_size))

    @property
    def ends(self) -> tuple[int, ...]:
        """``eos_id`` and every other non-byte id that may be drawn (a converted released
        model's specials end a row, as in the reference's generation)."""
        vocab = self.model.config.vocab_size
        other = (i for i in range(256, vocab) if i not in self.never)
        return tuple(sorted({*other, *super().ends}))

    stacks: ClassVar[dict[str, str]] = {"encoder": "encoder", "backbone": "backbone"}
    cast_stacks: ClassVar[dict[str, str]] = {
        "decoder": "decoder", "encoder_connector": "encoder", "lm_head": "decoder"
    }  # fmt: skip

    def ring_len(self, width: int, max_new: int) -> int:
        """Byte cache slots: the windows plus a word's bytes (that may be re-decoded), or the
        whole text when a byte stack attends to all of it, and the sink (:func:`_slots`); in
        whole flash-decoding tiles (:func:`arjax.ops.attention.decode_cache_len`: no padded
        copy per step)."""
        c = self.model.config
        total = width + max_new
        if c.encoder.window is not None and c.decoder.window is not None:
            total = min(total, max(c.encoder.window, c.decoder.window + c.max_word_bytes))
        return decode_cache_len(total + 1)

    def layout(self, tokens: np.ndarray, lengths: np.ndarray) -> int:
        """Static word dimension of the prompts (rounded up to 8): their words counted on
        device with :func:`arjax.data.word_starts`, once per generation."""
        starts = _jit_prompt_starts(self, jnp.asarray(tokens), jnp.asarray(lengths))
        words = int(jnp.max(jnp.sum(starts, axis=1)))
        return min(_round_up(words, 8), max(words, self.model.config.max_words))

    def _prompt_starts(self, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
        """Word starts ``[batch, width]`` of right-padded prompts (BOS is a word of its own)."""
        if self.bos is None:
            return word_starts(tokens, lengths, max_word_bytes=self.model.config.max_word_bytes)
        text = word_starts(
            tokens[:, 1:], lengths - 1, max_word_bytes=self.model.config.max_word_bytes
        )
        return jnp.concatenate([lengths[:, None] > 0, text], axis=1)

    def prefill(self, params, tokens, lengths, *, layout, max_new):
        c = self.model.config
        m = c.max_word_bytes
        batch, width = tokens.shape
        num_words = layout
        cache_len = self.ring_len(width, max_new)
        ring = cache_len - 1  # the last slot is the sink
        word_cache = decode_cache_len(num_words + max_new + m + 2)  # words, then the sink
        pad = PAD_ID if c.vocab_size > PAD_ID else 0  # never seen; inside the embedding
        left, segments, positions = left_align(tokens, lengths, pad)
        starts, _, _ = left_align(
            self._prompt_starts(tokens, lengths).astype(jnp.int32), lengths, 0
        )
        word_ids = jnp.cumsum(starts, axis=1) * segments  # [batch, width] 1-based, 0 = pad
        words = word_ids[:, -1]  # [batch] words in the prompt
        slots = jnp.arange(num_words)[None, :]
        batch_in = dict(
            inputs=left, segment_ids=segments, positions=positions, word_ids=word_ids,
            word_segment_ids=(slots < words[:, None]).astype(jnp.int32),
            word_positions=jnp.broadcast_to(slots, (batch, num_words)),
        )  # fmt: skip
        (logits, acts, states), variables = self.decoding_model.apply(
            {"params": params}, batch_in, mode="prefill", cache_len=max(width, cache_len),
            word_cache_len=word_cache, method="forward", mutable=["cache"],
        )  # fmt: skip
        cache = dict(variables["cache"])
        if width > ring:  # keep the last `ring` bytes, slot = global index mod ring; the sink
            sink = lambda x: jnp.pad(x, ((0, 0), (0, 1), *((0, 0),) * (x.ndim - 2)))  # noqa: E731
            for name in ("encoder", "decoder"):
                cache[name] = jax.tree.map(
                    lambda x: sink(jnp.roll(x[:, width - ring :], width % ring, axis=1)),
                    cache[name],
                )
        has_text = lengths > (0 if self.bos is None else 1)
        finished = words - has_text  # the last text word is unfinished
        current = jnp.where(has_text, jnp.sum(word_ids == words[:, None], axis=1), 0)
        # current word's window: its bytes and encoder activations, then room for one more
        idx = width - current[:, None] + jnp.arange(m + 1)[None, :]  # [batch, m + 1]
        in_word = jnp.arange(m + 1)[None, :] < current[:, None]
        take = jnp.clip(idx, 0, width - 1)
        window = jnp.where(in_word, jnp.take_along_axis(left, take, axis=1), 0)
        window_acts = jnp.where(
            in_word[..., None], jnp.take_along_axis(acts, take[..., None], axis=1), 0
        )
        first = params["first_word_embedding"].astype(states.dtype)  # [backbone_d]
        last_state = jnp.take_along_axis(
            states, jnp.maximum(finished - 1, 0)[:, None, None], axis=1
        )[:, 0]
        state = dict(
            cache=cache,
            t=jnp.full((batch,), width, jnp.int32),  # [batch] global index of each row's next byte
            first=width - lengths,  # [batch] global index of each row's first byte
            window=window, window_acts=window_acts.astype(acts.dtype), n=current,
            word_start=width - current - (width - lengths),  # position of the window's byte 0
            words=finished,  # [batch] finished words = the current word's word position
            word_values=self._word_values(
                params, jnp.where((finished > 0)[:, None], last_state, first)
            ),
            ready=jnp.ones((batch,), bool),  # [batch] not parked: the logits are valid
            word_steps=jnp.int32(0),  # backbone steps run
            waited=jnp.int32(0),  # row-iterations spent parked
        )  # fmt: skip
        return logits[:, -1], state, lengths

    def ready(self, state):
        return state["ready"]

    def max_steps(self, width: int, max_new: int) -> int:
        """A row parks for at most ``max_word_bytes + 1`` iterations: every other row finishes
        a word (and parks) or ends within that many bytes, and then the word path runs."""
        return width + (max_new + 1) * (self.model.config.max_word_bytes + 2)

    def stats(self, state):
        """``word_steps``: backbone steps run; ``waited``: row-iterations spent parked."""
        return {k: state[k] for k in ("word_steps", "waited")}

    def _word_values(self, params, pred: jax.Array) -> dict[str, jax.Array]:
        """The decoder's cross-attention outputs for each row's current word, from its
        predictive embedding ``pred`` ``[batch, backbone_d]``: layer -> ``[batch, 1, dec_d]``
        (:meth:`arjax.models.hat.HAT.decoder_word_values`; once per word, not per byte)."""
        return self.decoding_model.apply(
            {"params": params}, pred[:, None], method="decoder_word_values"
        )

    def _decode_byte(self, params, state, act, g, write):
        """Decoder over each row's byte at global index ``g`` ``[batch]`` (encoder activation
        ``act`` ``[batch, enc_d]``) with its current word's cross-attention outputs; its cache
        slot is written for the rows in ``write``. Logits ``[batch, vocab]`` and the new
        cache. ``params`` as the modules read them (loaded by the caller's region)."""
        c = self.model.config
        cache = state["cache"]
        ring = _ring(cache["decoder"])
        ones = jnp.ones((act.shape[0], 1), jnp.int32)
        logits, new = self.decoding_model.apply(
            {"params": params, "cache": cache}, act[:, None], None,
            (g - state["first"])[:, None], None, ones, jnp.zeros_like(ones), ones,
            mode="decode", cache_index=_slots(write, g, ring),
            kv_visible=_ring_visible(state["t"] - 1, g, state["first"], ring, c.decoder.window),
            word_values=state["word_values"], method="decode_bytes", mutable=["cache"],
        )  # fmt: skip
        return logits[:, 0], {**cache, "decoder": new["cache"]["decoder"]}

    def _finish_word(self, stored, state, starts, j):
        """Word ``j`` of each row's window (rows with more than ``j + 1`` words in it):
        encoder connector over its bytes + one backbone step (at the row's word position, in
        its own cache slot) -> its cross-attention outputs for the next word, for those rows.
        ``stored``: the params in the loop's layout, loaded here (:meth:`Decoder.load`), as
        every method of the word path takes them."""
        params = self.load(stored)
        index = jnp.cumsum(starts, axis=1) - 1  # [batch, m + 1] word of each window byte
        finishing = jnp.sum(starts, axis=1) > j + 1
        in_word = (index == j) & (jnp.arange(starts.shape[1])[None, :] < state["n"][:, None])
        ones = jnp.ones((starts.shape[0], 1), jnp.int32)
        word = self.decoding_model.apply(
            {"params": params}, state["window_acts"],
            state["word_start"][:, None] + jnp.arange(starts.shape[1]),
            in_word.astype(jnp.int32), state["words"][:, None], ones, method="pool_words",
        )  # fmt: skip
        slots = jax.tree.leaves(state["cache"]["backbone"])[0].shape[1]  # the last: the sink
        words = state["words"]
        out, new = self.decoding_model.apply(
            {"params": params, "cache": state["cache"]}, word, words[:, None],
            mode="decode", cache_index=jnp.where(finishing, words, slots - 1),
            kv_visible=jnp.arange(slots)[None, :] <= words[:, None],
            method="run_backbone", mutable=["cache"],
        )  # fmt: skip
        return dict(
            state, cache={**state["cache"], "backbone": new["cache"]["backbone"]},
            word_values=jax.tree.map(
                lambda new, old: jnp.where(finishing[:, None, None], new, old),
                self._word_values(params, out[:, 0]), state["word_values"],
            ),
            words=words + finishing, word_steps=state["word_steps"] + 1,
        )  # fmt: skip

    def _redecode(self, stored, state, lo: jax.Array, size: jax.Array):
        """Step 4: each row's window bytes ``lo .. lo + size - 1`` (``[batch]`` each; 0: none),
        in order, through the decoder again with the row's current word values: bytes decoded
        under a word they no longer belong to. Rewrites their decoder cache slots."""
        m = self.model.config.max_word_bytes
        newest, last = state["t"] - 1, state["n"] - 1  # the newest byte: global / window index

        def body(c):
            st, k = c
            i = jnp.clip(lo + k, 0, m)
            a = jnp.take_along_axis(st["window_acts"], i[:, None, None], axis=1)[:, 0]
            params = self.load(stored)  # in this loop's body: its own region
            _, cache = self._decode_byte(params, st, a, newest - (last - i), k < size)
            return dict(st, cache=cache), k + 1

        return jax.lax.while_loop(lambda c: c[1] < jnp.max(size), body, (state, jnp.int32(0)))[0]

    def _new_words(self, stored, state, starts, count, begin):
        """Steps 3 and 4 for the rows whose window holds a finished word (``count > 1``;
        ``begin``: the window index of the new current word). Word 0 starts where the old
        current word did, so its bytes were decoded under the right word; every later word's
        were not (a re-split of the window into three or more words, or a character that
        starts the new current word only once complete), and are decoded again, word by word,
        each after the backbone step that gives its word values. The common case, one
        finished word per row and nothing to re-decode, reads one device predicate (a host
        read on GPU) instead of one per loop trip."""
        index = jnp.cumsum(starts, axis=1) - 1  # [batch, m + 1] word of each window byte
        n = state["n"]
        redo = jnp.where(count > 1, n - 1 - begin, 0)  # current word's bytes before the newest

        def middle(c):  # finished word j >= 1: its bytes under its own values, then its step
            st, j = c
            in_j = (index == j) & (count - 1 > j)[:, None]
            st = self._redecode(stored, st, jnp.argmax(in_j, axis=1), jnp.sum(in_j, axis=1))
            return self._finish_word(stored, st, starts, j), j + 1

        def rest(s):
            more = lambda c: jnp.any(count - 1 > c[1])  # noqa: E731
            s, _ = jax.lax.while_loop(more, middle, (s, jnp.int32(1)))
            return self._redecode(stored, s, begin, redo)

        # (3) each row's first finished word (some row has one: the word path runs), batched
        state = self._finish_word(stored, state, starts, 0)
        return jax.lax.cond(jnp.any(count > 2) | jnp.any(redo > 0), rest, lambda s: s, state)

    def step(self, stored, state, tokens, active):
        """Each region of the step (this body, the word path's conditionals and loops) loads
        the ``stored`` params it reads itself (:meth:`Decoder.load`)."""
        params = self.load(stored)
        c = self.model.config
        m = c.max_word_bytes
        t, first = state["t"], state["first"]
        ring = _ring(state["cache"]["encoder"])
        act, enc = self.decoding_model.apply(
            {"params": params, "cache": state["cache"]}, tokens[:, None], (t - first)[:, None],
            mode="decode", cache_index=_slots(active, t, ring),
            kv_visible=_ring_visible(t, t, first, ring, c.encoder.window),
            method="encode", mutable=["cache"],
        )  # fmt: skip
        n_old = state["n"]
        waiting = ~state["ready"]  # parked at an earlier iteration: fed nothing now
        state = dict(
            state,
            cache={**state["cache"], "encoder": enc["cache"]["encoder"]},
            window=window_append(state["window"], n_old, tokens, active),
            window_acts=window_append(state["window_acts"], n_old, act[:, 0], active),
            n=n_old + active, t=t + active,
            waited=state["waited"] + jnp.sum(waiting),
        )  # fmt: skip
        going = active | waiting  # rows still generating
        state = self._split_words(stored, state, going)
        decode = going & state["ready"]  # fed now and not parked, or served by the word path
        newest = jnp.take_along_axis(
            state["window_acts"], jnp.clip(state["n"] - 1, 0, m)[:, None, None], axis=1
        )[:, 0]
        logits, cache = self._decode_byte(params, state, newest, state["t"] - 1, decode)
        return logits, dict(state, cache=cache)

    def _split_words(self, stored, state, going):
        """Steps 2-4 for the rows ``going`` (fed now, or parked before): the window split, the
        word path when enough rows wait, and the cut of each window to its current word for
        the rows that decode now (``ready``)."""
        starts = split_window(state["window"], state["n"], self.model.config.max_word_bytes)
        starts = starts & going[:, None]
        count = jnp.sum(starts, axis=1)  # words in the window; all but the last finished
        begin = current_word_start(starts)  # [batch] window index (0: no new word)
        parked = count > 1
        # (3) and (4) only when enough rows wait: one device predicate (a host read on GPU)
        # per iteration, instead of one per loop inside
        go = jnp.any(parked) & (jnp.sum(parked) >= self.park * jnp.sum(going))
        state = jax.lax.cond(
            go, lambda s: self._new_words(stored, s, starts, count, begin), lambda s: s, state
        )
        ready = ~parked | go
        begin = jnp.where(going & ready, begin, 0)  # rows that decode keep their current word
        n = state["n"]
        return dict(
            state, ready=ready, n=n - begin, word_start=state["word_start"] + begin,
            window=keep_from(state["window"], begin, n),
            window_acts=keep_from(state["window_acts"], begin, n),
        )  # fmt: skip

    def cache_bytes(self, state: Any) -> dict[str, int]:
        cache = state["cache"]
        return {
            "byte encoder kv cache": tree_bytes(cache["encoder"]),
            "byte decoder kv cache": tree_bytes(cache["decoder"]),
            "word backbone kv cache": tree_bytes(cache["backbone"]),
            "current word window": tree_bytes([state["window"], state["window_acts"]]),
        }


_jit_prompt_starts = jax.jit(HATDecoder._prompt_starts, static_argnums=0)
