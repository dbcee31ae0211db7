"""One decoding protocol, one sampling loop: the whole generation runs inside one ``jit``.

Every byte-level family implements :class:`Decoder` (in ``arjax/generate/<family>.py``, named
by its :class:`arjax.models.registry.ModelSpec`):

- ``prefill(params, tokens, lengths, *, layout, max_new) -> (logits, state, fed)``: runs the
  ragged prompts (``tokens`` ``[batch, width]`` right-padded, ``lengths`` ``[batch]``) in
  parallel; ``logits`` ``[batch, vocab]`` predict token ``fed`` of each row, where ``fed``
  ``[batch]`` counts the prompt tokens consumed (a family whose prefill needs rows aligned,
  like the Block Transformer's blocks, consumes fewer and the loop feeds it the rest);
  ``layout`` is the family's static view of the prompts (``Decoder.layout``, on the host);
- ``step(params, state, tokens, active) -> (logits, state)``: feeds one token per row
  (``active`` ``[batch]`` marks rows whose token is real: not finished) and returns the
  logits of the next; ``params`` come in the loop's layout (:meth:`Decoder.store`), which
  ``step`` reads through :meth:`Decoder.load` in each region (loop body, conditional branch)
  that uses them;
- a decoder may hold rows back (HAT, while a row's finished word waits for the backbone):
  ``ready(state)`` ``[batch]`` marks the rows whose logits are valid; the others draw and feed
  nothing at that iteration (``active`` is False for them), and ``max_steps`` bounds the
  iterations that the waits can add;
- a decoder with a ``period`` (the Block Transformer: its block length) feeds every
  ``period``-th token through ``boundary`` instead (same signature), counting from the
  prefill; the state entries named in ``boundary_state`` (its big caches) are read and
  written only there, so the ``period - 1`` steps between boundaries run in an inner loop
  that does not carry them (no ``lax.cond`` over, and no copy of, those caches per token).

:func:`generate` draws token after token in a ``lax.while_loop`` (greedy, temperature, top-k,
top-p; :mod:`arjax.generate.sampling`) until every row has hit EOS, a stop string or
``max_new_bytes``: no host round trip per token. Special ids (PAD, BOS) are never drawn; EOS
ends a row and is not part of its text. The draws of loop iteration ``i`` use the key
``fold_in(rng, i)``. The loop carries the params as :meth:`Decoder.store` lays them out (on GPU
the attention and MLP kernels with their input axes last) and hands them so to ``step`` and
``boundary``; ``prefill`` sees the layout the modules read.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from arjax.data.vocab import BOS_ID, EOS_ID, PAD_ID
from arjax.generate.sampling import sample_token, validate_sampling
from arjax.models.registry import spec_for_module
from arjax.nn import cast_weights, inputs_last, unrolled


def decoding_stack(config: Any, params: Any) -> Any:
    """A layer stack's params as decoding runs them: unrolled (:func:`arjax.nn.unrolled`), its
    matrices in ``config.compute_dtype`` (:func:`arjax.nn.cast_weights`)."""
    return cast_weights(unrolled(config, params)[1], config.compute_dtype)


@dataclasses.dataclass(frozen=True)
class Decoder:
    """The decoding protocol (module doc). ``model`` is the family's Flax module; subclasses
    are frozen dataclasses (hashable: they are static arguments of the jitted loop)."""

    model: Any
    # The loop keeps attention and MLP kernels with their input axes last in memory
    # (:func:`arjax.nn.inputs_last`). None: on GPU, where it was measured faster
    # (experiments/results/bench_hat_decode_inputs_last.md); not measured on TPU.
    inputs_last: bool | None = None

    @property
    def bos(self) -> int | None:
        """Prepended to every prompt (None: nothing)."""
        return BOS_ID

    @property
    def eos(self) -> int | None:
        """Ends a row (not part of its text; None: no such id)."""
        return EOS_ID

    @property
    def never(self) -> tuple[int, ...]:
        """Ids never drawn."""
        return (PAD_ID, BOS_ID)

    @property
    def ends(self) -> tuple[int, ...]:
        """Ids that end a row when drawn (not part of its text): EOS."""
        return () if self.eos is None else (self.eos,)

    # Layer stacks that decode unrolled: params key -> config field ("" = the config itself).
    stacks: ClassVar[dict[str, str]] = {}
    # Other params whose matrices are cast like the stacks' (to the compute dtype of the stack
    # they run with): params key -> that stack's config field.
    cast_stacks: ClassVar[dict[str, str]] = {}
    # State entries only `boundary` reads and writes (module doc).
    boundary_state: ClassVar[tuple[str, ...]] = ()

    @property
    def period(self) -> int | None:
        """Every ``period``-th token goes through :meth:`boundary` (None: none does)."""
        return None

    def check(self, width: int, max_new: int) -> None:
        """``ValueError`` if prompts of ``width`` tokens plus ``max_new`` do not fit."""
        limit = self.model.config.max_seq_len
        if width + max_new > limit:
            raise ValueError(
                f"prompt ({width} tokens with BOS) + max_new_bytes ({max_new}) exceeds the "
                f"model's max_seq_len={limit}"
            )

    def budget(self, width: int, max_new: int) -> int:
        """The most new tokens (<= ``max_new``) that fit after prompts of ``width`` tokens."""
        return min(max_new, self.model.config.max_seq_len - width)

    def _stack_config(self, field: str) -> Any:
        c = self.model.config
        return c.stack_fields() if field == "" else getattr(c, field)

    @property
    def decoding_model(self) -> Any:
        """The module with its ``stacks`` unrolled (the layout :meth:`prepare` gives params)."""
        c = self.model.config
        if "" in self.stacks.values():
            return self.model.clone(config=dataclasses.replace(c, scan_layers=False))
        flat = {
            f: dataclasses.replace(getattr(c, f), scan_layers=False) for f in self.stacks.values()
        }
        return self.model.clone(config=dataclasses.replace(c, **flat))

    def prepare(self, params: Any) -> Any:
        """Params in the layout decoding wants, here the ``stacks`` unrolled (each layer then
        updates its cache in place: :func:`arjax.nn.unrolled`) and their matrices, and those
        of ``cast_stacks``, in the stack's compute dtype (:func:`arjax.nn.cast_weights`: once,
        not at every step); runs inside the jit."""
        if not self.stacks and not self.cast_stacks:
            return params
        params = dict(params)
        for key, field in self.stacks.items():
            params[key] = decoding_stack(self._stack_config(field), params[key])
        for key, field in self.cast_stacks.items():
            params[key] = cast_weights(params[key], self._stack_config(field).compute_dtype)
        return params

    def store(self, params: Any) -> Any:
        """:meth:`prepare`'s params as the loop carries them: with ``inputs_last``, kernels with
        their input axes last (:func:`arjax.nn.inputs_last`), moved once before the loop."""
        return inputs_last(params) if self._inputs_last else params

    def load(self, params: Any) -> Any:
        """:meth:`store`'s params as the modules read them, called inside the region (loop
        body, conditional branch) that reads them: a region is handed the stored params, since
        XLA lays out whatever enters a conditional or a loop in the layout the modules read,
        and so lays the loop's copy out that way too. The barrier keeps XLA from undoing the
        move (it would hoist these transposes out of the loop and cancel them with
        :meth:`store`'s); in a region they change the layout, not the bytes."""
        if not self._inputs_last:
            return params
        return inputs_last(jax.lax.optimization_barrier(params), inverse=True)

    @property
    def _inputs_last(self) -> bool:
        return jax.default_backend() == "gpu" if self.inputs_last is None else self.inputs_last

    def layout(self, tokens: np.ndarray, lengths: np.ndarray) -> Any:
        """Static (hashable) facts of the prompts that fix the prefill's shapes; runs on the
        host once per generation, before the jitted loop."""
        return None

    def prefill(
        self, params: Any, tokens: jax.Array, lengths: jax.Array, *, layout: Any, max_new: int
    ) -> tuple[jax.Array, Any, jax.Array]:
        raise NotImplementedError(f"{type(self).__name__}.prefill")

    def step(
        self, params: Any, state: Any, tokens: jax.Array, active: jax.Array
    ) -> tuple[jax.Array, Any]:
        raise NotImplementedError(f"{type(self).__name__}.step")

    def boundary(
        self, params: Any, state: Any, tokens: jax.Array, active: jax.Array
    ) -> tuple[jax.Array, Any]:
        """:meth:`step` for every ``period``-th token (module doc)."""
        raise NotImplementedError(f"{type(self).__name__}.boundary")

    def ready(self, state: Any) -> jax.Array | None:
        """Rows ``[batch]`` whose logits may be drawn from now (None: every row)."""
        return None

    def max_steps(self, width: int, max_new: int) -> int:
        """Loop iterations that suffice for prompts of ``width`` tokens and ``max_new`` new
        ones (a safety bound: the loop ends when every row is done)."""
        return width + max_new

    def stats(self, state: Any) -> dict[str, jax.Array]:
        """Counters the decoder keeps in its final ``state`` (:attr:`Generation.stats`)."""
        return {}

    def cache_bytes(self, state: Any) -> dict[str, int]:
        """Bytes of each cache in ``state`` (works on ``jax.eval_shape`` results)."""
        return {"cache": tree_bytes(state)}

    def sample_text(
        self, params: Any, *, prompts: list[str], max_bytes: int, seed: int, png: str | None,
        tokenizer: Any = None, **sampling: Any,
    ) -> str:  # fmt: skip
        """``prompt + continuation`` per prompt, separated by ``---`` (``arjax sample``);
        the continuation is cut to what fits the model (:meth:`budget`) and, with a
        ``tokenizer`` (a token holds at least one byte), to ``max_bytes`` UTF-8 bytes."""
        del png
        width = int(encode_prompts(prompts, self.bos, tokenizer, multiple=1)[1].max())
        gen = generate(
            self.model, params, prompts, max_new_bytes=max(1, self.budget(width, max_bytes)),
            rng=jax.random.key(seed), decoder=self, tokenizer=tokenizer, **sampling,
        )  # fmt: skip
        cut = lambda t: t.encode()[:max_bytes].decode(errors="ignore")  # noqa: E731
        return "\n---\n".join(p + cut(t) for p, t in zip(prompts, gen.texts, strict=True))


def tree_bytes(tree: Any) -> int:
    """Total bytes of the arrays (or shape structs) in ``tree``."""
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def decoder_for(model: Any) -> Decoder:
    """The registered decoder of ``model``'s family."""
    return spec_for_module(model).decoder_cls()(model)


def left_align(
    tokens: jax.Array, lengths: jax.Array, pad: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Right-padded ``[batch, width]`` -> left-padded tokens, segment ids (0 = pad) and
    positions, so that every row's last prompt token sits at ``width - 1``."""
    width = tokens.shape[1]
    src = jnp.arange(width)[None, :] - (width - lengths)[:, None]  # [batch, width]
    real = src >= 0
    moved = jnp.take_along_axis(tokens, jnp.maximum(src, 0), axis=1)
    return jnp.where(real, moved, pad), real.astype(jnp.int32), jnp.maximum(src, 0)


def _stop_hit(out: jax.Array, n: jax.Array, stops: jax.Array, stop_lens: jax.Array) -> jax.Array:
    """Rows ``[batch]`` whose output ``out[:, :n]`` ends with one of ``stops`` ``[k, len]``."""
    width = stops.shape[1]
    idx = n[:, None, None] - stop_lens[None, :, None] + jnp.arange(width)  # [batch, k, len]
    got = jnp.take_along_axis(out[:, None, :], jnp.clip(idx, 0, out.shape[1] - 1), axis=2)
    used = jnp.arange(width)[None, :] < stop_lens[:, None]  # [k, len]
    same = jnp.all((got == stops[None]) | ~used[None], axis=-1)  # [batch, k]
    return jnp.any(same & (n[:, None] >= stop_lens[None]) & (stop_lens[None] > 0), axis=-1)


@functools.partial(
    jax.jit,
    static_argnames=(
        "decoder", "max_new", "layout", "temperature", "top_k", "top_p", "return_logits",
    ),
)  # fmt: skip
def _run(
    decoder: Decoder,
    params: Any,
    tokens: jax.Array,  # [batch, width] right-padded prompts
    lengths: jax.Array,  # [batch]
    stops: jax.Array,  # [k, stop_len] stop strings' bytes
    stop_lens: jax.Array,  # [k]
    rng: jax.Array,
    *,
    max_new: int,
    layout: Any,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    return_logits: bool,
) -> dict[str, jax.Array]:
    batch, width = tokens.shape
    params = decoder.prepare(params)
    logits, state, fed = decoder.prefill(params, tokens, lengths, layout=layout, max_new=max_new)
    stored = decoder.store(params)
    rows = jnp.arange(batch)
    never = jnp.zeros((logits.shape[-1],), bool).at[jnp.asarray(decoder.never, jnp.int32)].set(True)
    ends = jnp.asarray(decoder.ends or (-1,), jnp.int32)
    carry = dict(
        i=jnp.int32(0),
        state=state,
        logits=logits,
        fed=fed.astype(jnp.int32),
        n=jnp.zeros((batch,), jnp.int32),  # tokens emitted per row
        done=jnp.zeros((batch,), bool),
        out=jnp.full((batch, max_new), PAD_ID, jnp.int32),
    )
    if return_logits:
        carry["seen"] = jnp.zeros((max_new, batch, logits.shape[-1]), jnp.float32)

    def cond(c: dict) -> jax.Array:
        return (c["i"] < decoder.max_steps(width, max_new)) & ~jnp.all(c["done"])

    def draw(c: dict, feed) -> dict:
        """Draw (or force) one token per row and ``feed`` it (``decoder.step``/``boundary``,
        handed the stored params)."""
        logits = jnp.where(never, -jnp.inf, c["logits"].astype(jnp.float32))
        key = jax.random.fold_in(rng, c["i"])
        drawn = sample_token(logits, key, temperature=temperature, top_k=top_k, top_p=top_p)
        ready = decoder.ready(c["state"])
        ready = jnp.ones((batch,), bool) if ready is None else ready
        prompting = c["fed"] < lengths  # rows whose next token is the prompt's
        forced = prompting & ready
        prompt = jnp.take_along_axis(tokens, jnp.minimum(c["fed"], width - 1)[:, None], axis=1)
        tok = jnp.where(forced, prompt[:, 0], drawn)
        live = ready & ~prompting & ~c["done"]
        end = jnp.isin(drawn, ends)
        emit = live & ~end
        slot = jnp.minimum(c["n"], max_new - 1)
        out = c["out"].at[rows, slot].set(jnp.where(emit, tok, c["out"][rows, slot]))
        n = c["n"] + emit
        done = c["done"] | (live & end) | (n >= max_new)
        done = done | (emit & _stop_hit(out, n, stops, stop_lens))
        new = dict(c, i=c["i"] + 1, fed=c["fed"] + forced, n=n, done=done, out=out)
        if return_logits:
            seen = (
                c["seen"]
                .at[slot, rows]
                .set(jnp.where(emit[:, None], logits, c["seen"][slot, rows]))
            )
            new["seen"] = seen
        new["logits"], new["state"] = feed(stored, c["state"], tok, forced | emit)
        return new

    def body(c: dict) -> dict:
        if decoder.period is None:
            return draw(c, decoder.step)
        heavy = {k: c["state"][k] for k in decoder.boundary_state}
        light = {k: v for k, v in c["state"].items() if k not in heavy}
        inner = lambda _, c: draw(c, decoder.step)  # noqa: E731
        c = jax.lax.fori_loop(0, decoder.period - 1, inner, dict(c, state=light))
        return draw(dict(c, state={**c["state"], **heavy}), decoder.boundary)

    final = jax.lax.while_loop(cond, body, carry)
    result = dict(out=final["out"], n=final["n"], steps=final["i"])
    result["stats"] = decoder.stats(final["state"])
    if return_logits:
        result["logits"] = final["seen"]
    return result


@dataclasses.dataclass
class Generation:
    """``texts``/``tokens``: each prompt's continuation (cut before a stop string);
    ``logits`` ``[max_new, batch, vocab]`` float32: what each emitted token was drawn from
    (special ids at -inf; when requested); ``steps``: loop iterations run; ``stats``: the
    decoder's counters (:meth:`Decoder.stats`)."""

    texts: list[str]
    tokens: list[list[int]]
    logits: np.ndarray | None
    steps: int
    stats: dict[str, int] = dataclasses.field(default_factory=dict)


def encode_prompts(
    prompts: Sequence[str | bytes], bos: int | None, tokenizer: Any = None, multiple: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``[batch, width]`` ids (``bos`` first; UTF-8 bytes, or the ids of
    ``tokenizer.encode``) and lengths; the width is rounded up to ``multiple`` so that similar
    prompts share one compiled loop."""
    if isinstance(prompts, str | bytes) or not prompts:
        raise ValueError("generate: prompts must be a non-empty list of strings or bytes")

    def ids_of(p: str | bytes) -> list[int]:
        if tokenizer is not None:
            return tokenizer.encode(p if isinstance(p, str) else p.decode("utf-8")).tolist()
        return list(p.encode("utf-8") if isinstance(p, str) else p)

    ids = [([] if bos is None else [bos]) + ids_of(p) for p in prompts]
    if any(not row for row in ids):
        raise ValueError("generate: every prompt needs at least one token (this model has no BOS)")
    width = -(-max(len(r) for r in ids) // multiple) * multiple
    tokens = np.full((len(ids), width), PAD_ID, np.int32)
    for i, row in enumerate(ids):
        tokens[i, : len(row)] = row
    return tokens, np.array([len(r) for r in ids], np.int32)


def _cut(row: list[int], stops: list[bytes]) -> list[int]:
    if not stops:  # token-level rows (ids past 255) never carry stop strings
        return row
    data = bytes(row)
    cuts = [data.find(s) for s in stops if s and s in data]
    return row[: min(cuts)] if cuts else row


def generate(
    model: Any,
    params: Any,
    prompts: Sequence[str | bytes],
    *,
    max_new_bytes: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop: Sequence[str] = (),
    rng: jax.Array | None = None,
    return_logits: bool = False,
    decoder: Decoder | None = None,
    tokenizer: Any = None,
) -> Generation:
    """Continue each prompt by up to ``max_new_bytes`` bytes with ``model``'s registered
    decoder (module doc); a row ends at EOS, at a stop string (its text cut before it) or
    after ``max_new_bytes``. A token-level model (``tokenizer``: e.g. an
    :class:`arjax.data.bpe.BPETokenizer`) counts tokens instead and takes no stop strings."""
    validate_sampling(temperature, top_k, top_p, max_new_bytes)
    if tokenizer is not None and any(stop):
        raise ValueError("generate: stop strings need a byte-level model (tokenizer is set)")
    decoder = decoder_for(model) if decoder is None else decoder
    tokens, lengths = encode_prompts(prompts, decoder.bos, tokenizer)
    decoder.check(int(lengths.max()), max_new_bytes)
    stop_bytes = [s.encode("utf-8") for s in stop if s]
    stops = np.zeros((len(stop_bytes), max([len(s) for s in stop_bytes], default=1)), np.int32)
    for i, s in enumerate(stop_bytes):
        stops[i, : len(s)] = list(s)
    res = _run(
        decoder, params, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(stops),
        jnp.asarray([len(s) for s in stop_bytes], jnp.int32),
        jax.random.key(0) if rng is None else rng, max_new=max_new_bytes,
        layout=decoder.layout(tokens, lengths), temperature=float(temperature), top_k=top_k,
        top_p=top_p, return_logits=return_logits,
    )  # fmt: skip
    out, n = np.asarray(res["out"]), np.asarray(res["n"])
    rows = [_cut(out[i, : n[i]].tolist(), stop_bytes) for i in range(len(n))]
    if tokenizer is not None:
        texts = [tokenizer.decode(r) for r in rows]
    else:
        texts = [bytes(r).decode("utf-8", errors="replace") for r in rows]
    logits = np.asarray(res["logits"]) if return_logits else None
    stats = {k: int(v) for k, v in res["stats"].items()}
    return Generation(texts, rows, logits, int(res["steps"]), stats)
