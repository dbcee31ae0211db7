"""Decoder of the token-level LMs: the transformer (KV cache) and the linear-attention LMs
(:mod:`arjax.models.linear_lm`: a fixed-size recurrent state per mixer, whatever its kind).

Prompts are left-aligned (padding is segment 0: never attended to, and a document of its own
for the recurrent mixers, whose state resets at the prompt's first token) and prefilled in one
pass. A KV cache gets ``decode_cache_len(width + max_new)`` slots; a recurrent mixer's state
and BASED's window ring buffer do not grow, so only the prompt is bounded by
``max_seq_len``. Layer stacks run unrolled (:func:`arjax.nn.unrolled`): a scanned cache would
be sliced and written back whole at every step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp

from arjax.data.vocab import PAD_ID
from arjax.generate.engine import Decoder, left_align, tree_bytes
from arjax.ops.attention import decode_cache_len


@dataclasses.dataclass(frozen=True)
class LMDecoder(Decoder):
    """:class:`arjax.generate.engine.Decoder` of :class:`arjax.models.TransformerLM` and
    :class:`arjax.models.linear_lm.LinearLM`."""

    @property
    def recurrent(self) -> bool:
        """True when the mixer keeps a recurrent state instead of a KV cache."""
        return self.model.config.mixer.kind != "attention"

    stacks: ClassVar[dict[str, str]] = {"transformer": ""}

    def check(self, width: int, max_new: int) -> None:
        limit = self.model.config.max_seq_len
        if not self.recurrent:
            super().check(width, max_new)
        elif width > limit:
            raise ValueError(
                f"prompt ({width} tokens) exceeds the model's max_seq_len={limit} (the "
                f"prefill's limit; a recurrent state has none)"
            )

    def budget(self, width: int, max_new: int) -> int:
        return max_new if self.recurrent else super().budget(width, max_new)

    def prefill(self, params, tokens, lengths, *, layout, max_new):
        del layout
        width = tokens.shape[1]
        left, segments, positions = left_align(tokens, lengths, PAD_ID)
        cache_len = None if self.recurrent else decode_cache_len(width + max_new)
        logits, variables = self.decoding_model.apply(
            {"params": params}, left, positions, segments, cache_len,
            method="prefill", mutable=["cache"],
        )  # fmt: skip
        state = dict(cache=variables["cache"], position=lengths)
        if not self.recurrent:
            state["slot"] = jnp.int32(width)
            state["visible"] = jnp.pad(segments > 0, ((0, 0), (0, cache_len - width)))
        return logits[:, -1], state, lengths

    def step(self, params, state, tokens, active):
        del active  # finished rows decode on; their slots are never read by the others
        params = self.load(params)
        slot, see = None, None
        if not self.recurrent:
            slot = state["slot"]
            slots = jnp.arange(state["visible"].shape[1])
            visible = state["visible"] | (slots == slot)[None, :]
            window = self.model.config.window
            see = visible if window is None else visible & (slots > slot - window)[None, :]
            state = dict(state, slot=slot + 1, visible=visible)
        logits, variables = self.decoding_model.apply(
            {"params": params, "cache": state["cache"]}, tokens[:, None],
            state["position"][:, None], slot, see, method="decode", mutable=["cache"],
        )  # fmt: skip
        state = dict(state, cache=variables["cache"], position=state["position"] + 1)
        return logits[:, -1], state

    def cache_bytes(self, state: Any) -> dict[str, int]:
        name = "recurrent state" if self.recurrent else "kv cache"
        return {name: tree_bytes(state["cache"])}
