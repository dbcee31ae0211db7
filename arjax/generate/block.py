"""Batched cached decoding for the Block Transformer (Ho et al. 2024, sec. 2).

Per block: one block-decoder step (its KV cache holds one entry per block), then the token
decoder emits the block's ``L_B`` tokens with its own cache of ``token_len`` slots, rebuilt
from the context embedding at every block. Prompts are processed in one pass over their whole
blocks (prefill). All rows share block boundaries (blocks count from each row's start, exactly
as in the full forward); where prompts differ in length, the prefill stops at the shortest
prompt's whole blocks and the engine's loop feeds the remaining prompt tokens one by one (the
protocol's ``fed``), so every row's result equals greedy step-by-step decoding of the full
forward. The decoder's ``period`` is the block length: a step runs the token decoder, and
every block's last token goes through ``boundary``: the block decoder and the next block's
token-decoder prefill. Only ``boundary`` touches the block decoder's cache, so the engine's
inner loop over a block's tokens does not carry it (as in the paper's two-level decoding).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from arjax.data.vocab import PAD_ID
from arjax.generate.engine import Decoder, decoding_stack, tree_bytes
from arjax.models.block_transformer import BlockTransformer
from arjax.ops.attention import decode_cache_len


def _token_prefill(m: BlockTransformer, ctx: jax.Array) -> jax.Array:
    """Fill the token decoder cache with the conditioning slots; logits of token 0 ``[B, V]``."""
    empty = jnp.zeros((ctx.shape[0], 0), jnp.int32)
    x = m.token_inputs(ctx, empty, start=True)
    pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    return m.decode_tokens(x, pos, mode="prefill")[:, -1]


def _token_step(m: BlockTransformer, ctx: jax.Array, tok: jax.Array, slot: jax.Array) -> jax.Array:
    """Feed one token ``[B]`` at token-decoder slot ``slot``; logits of the next ``[B, V]``."""
    x = m.token_inputs(ctx, tok[:, None], start=False)
    n = m.config.token_len
    visible = jnp.broadcast_to(jnp.arange(n) <= slot, (tok.shape[0], n))
    pos = jnp.broadcast_to(slot, (tok.shape[0], 1))
    return m.decode_tokens(x, pos, mode="decode", cache_index=slot, kv_visible=visible)[:, -1]


def _block_prefill(m: BlockTransformer, blocks: jax.Array, cache_len: int) -> jax.Array:
    """Block decoder over the prompt blocks ``[B, K, L_B]``; last context ``[B, d_block]``."""
    b, k = blocks.shape[:2]
    index = jnp.broadcast_to(jnp.arange(k), (b, k))
    return m.context(blocks, index, mode="prefill", cache_len=cache_len)[:, -1]


def _block_step(m: BlockTransformer, block: jax.Array, j: jax.Array, cache_len: int):
    """One block-decoder step for block ``[B, L_B]`` written at cache slot ``j``."""
    b = block.shape[0]
    visible = jnp.broadcast_to(jnp.arange(cache_len) <= j, (b, cache_len))
    index = jnp.broadcast_to(j, (b, 1))
    out = m.context(
        block[:, None], index, mode="decode", cache_index=j, kv_visible=visible
    )  # [B, 1, d_block]
    return out[:, 0]


@dataclasses.dataclass(frozen=True)
class BlockDecoder(Decoder):
    """:class:`arjax.generate.engine.Decoder` of :class:`BlockTransformer` (module doc)."""

    stacks: ClassVar[dict[str, str]] = {n: n for n in ("block_decoder", "token_decoder")}
    boundary_state: ClassVar[tuple[str, ...]] = ("block_cache",)

    @property
    def period(self) -> int:
        return self.model.config.block_len

    def prepare(self, params: Any) -> Any:
        """The stacks unrolled; the embedder's encoder (if any) shares the token decoder's
        config, so it is prepared as that stack (:func:`decoding_stack`)."""
        c, params = self.model.config, super().prepare(params)
        if "encoder" in params.get("embedder", {}):
            encoder = dataclasses.replace(c.token_decoder, num_layers=c.embedder_layers)
            params["embedder"] = {**params["embedder"]}
            params["embedder"]["encoder"] = decoding_stack(encoder, params["embedder"]["encoder"])
        return params

    def layout(self, tokens: np.ndarray, lengths: np.ndarray) -> int:
        """Whole prompt blocks every row has (prefilled in one pass)."""
        return (self.model.config.block_len - 1 + int(lengths.min())) // self.model.config.block_len

    def prefill(self, params, tokens, lengths, *, layout, max_new):
        lb = self.model.config.block_len
        first_block = layout
        num_blocks = -(-(lb - 1 + tokens.shape[1] + max_new) // lb)
        z = jnp.pad(tokens, ((0, 0), (lb - 1, 0)), constant_values=PAD_ID)[:, : first_block * lb]
        blocks = rearrange(z, "b (n l) -> b n l", l=lb)
        ctx, bvars = self._apply(
            {"params": params}, blocks, decode_cache_len(num_blocks), method=_block_prefill
        )
        logits, tvars = self._apply({"params": params}, ctx, method=_token_prefill)
        state = dict(
            block_cache=bvars["cache"], token_cache=tvars["cache"], ctx=ctx,
            block=jnp.zeros((tokens.shape[0], lb), jnp.int32),  # [batch, L_B] tokens so far
            k=jnp.int32(0), j=jnp.int32(first_block),  # position in the block, block index
        )  # fmt: skip
        fed = jnp.full_like(lengths, first_block * lb - (lb - 1))
        return logits, state, fed

    def step(self, params, state, tokens, active):
        """Token ``k < L_B - 1`` of the block: one token-decoder step."""
        del active  # all rows share block boundaries, so finished rows decode on
        params = self.load(params)
        k = state["k"]
        logits, tvar = self._apply(
            {"params": params, "cache": state["token_cache"]}, state["ctx"], tokens,
            self.model.config.prefix_offset + k + 1, method=_token_step,
        )  # fmt: skip
        block = state["block"].at[:, k].set(tokens)
        return logits, dict(state, token_cache=tvar["cache"], block=block, k=k + 1)

    def boundary(self, params, state, tokens, active):
        """The block's last token: block-decoder step, then the next block's token prefill."""
        del active
        params = self.load(params)
        block = state["block"].at[:, -1].set(tokens)
        cache_len = jax.tree.leaves(state["block_cache"])[0].shape[1]
        ctx, bvar = self._apply(
            {"params": params, "cache": state["block_cache"]}, block, state["j"], cache_len,
            method=_block_step,
        )  # fmt: skip
        logits, tvar = self._apply({"params": params}, ctx, method=_token_prefill)
        state = dict(
            block_cache=bvar["cache"], token_cache=tvar["cache"], ctx=ctx, block=block,
            k=jnp.int32(0), j=state["j"] + 1,
        )  # fmt: skip
        return logits, state

    @property
    def _apply(self):
        return functools.partial(self.decoding_model.apply, mutable=["cache"])

    def cache_bytes(self, state: Any) -> dict[str, int]:
        return {
            "block decoder kv cache": tree_bytes(state["block_cache"]),
            "token decoder kv cache": tree_bytes(state["token_cache"]),
        }
