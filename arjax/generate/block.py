"""Batched cached decoding for the Block Transformer (Ho et al. 2024, sec. 2).

Per block: one block-decoder step (its KV cache holds one entry per block), then the token
decoder emits the block's ``L_B`` tokens with its own cache of ``token_len`` slots, rebuilt
from the context embedding at every block. Prompts are processed in one pass over their whole
blocks (prefill). All rows share block boundaries (blocks count from each row's start, exactly
as in the full forward); where prompts differ in length, the positions past the shortest
prompt's whole blocks are decoded with the prompt's own tokens forced in, so every row's
result equals greedy step-by-step decoding of the full forward. The whole loop runs inside
one ``jit`` (``lax.scan`` over blocks and, inside, over the block's tokens) with static shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from arjax.data.vocab import EOS_ID, PAD_ID
from arjax.generate.decode import generate_text, sample_text, trim_generated
from arjax.generate.sampling import sample_token, validate_sampling
from arjax.models.block_transformer import BlockTransformer, BlockTransformerConfig
from arjax.nn import unrolled
from arjax.ops.attention import decode_cache_len


@dataclasses.dataclass(frozen=True)
class BlockPrompts:
    """Prompts laid out on the block stream ``z = [PAD] * (L_B - 1) + tokens``.

    ``z``/``forced`` ``[batch, num_blocks * L_B]``: prompt tokens and where they are;
    ``first_block``: whole prompt blocks every row has (prefilled in one pass);
    ``ends``: per row, the z index where generation starts.
    """

    z: np.ndarray
    forced: np.ndarray
    first_block: int
    num_blocks: int
    ends: tuple[int, ...]


def layout_prompts(prompts: list[list[int]], block_len: int, max_new_tokens: int) -> BlockPrompts:
    """Right-pad prompts onto whole blocks; raise ``ValueError`` for empty prompts."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (BOS is prepended)")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    ends = tuple(block_len - 1 + len(p) for p in prompts)
    num_blocks = math.ceil((max(ends) + max_new_tokens) / block_len)
    z = np.full((len(prompts), num_blocks * block_len), PAD_ID, np.int32)
    forced = np.zeros(z.shape, bool)
    for i, p in enumerate(prompts):
        z[i, block_len - 1 : ends[i]] = p
        forced[i, : ends[i]] = True
    return BlockPrompts(z, forced, min(ends) // block_len, num_blocks, ends)


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


def unscanned_for_decoding(model: BlockTransformer, params: Any) -> tuple[BlockTransformer, Any]:
    """The same model with its block and token decoder stacks unrolled (each layer then
    updates its KV cache in place; see :func:`arjax.nn.unrolled`). The embedder's encoder
    (if any) shares the token decoder's config, so it is unrolled with it."""
    c, params, stacks = model.config, dict(params), {}
    for name in ("block_decoder", "token_decoder"):
        stacks[name], params[name] = unrolled(getattr(c, name), params[name])
    if "encoder" in params.get("embedder", {}):
        encoder = dataclasses.replace(c.token_decoder, num_layers=c.embedder_layers)
        params["embedder"] = {**params["embedder"]}
        _, params["embedder"]["encoder"] = unrolled(encoder, params["embedder"]["encoder"])
    return model.clone(config=dataclasses.replace(c, **stacks)), params


@functools.partial(
    jax.jit,
    static_argnames=("model", "first_block", "num_blocks", "temperature", "top_k", "top_p"),
)
def block_generate(
    model: BlockTransformer,
    params: Any,
    z: jax.Array,  # [batch, num_blocks * L_B] prompt tokens on the block stream
    forced: jax.Array,  # [batch, num_blocks * L_B] bool: take z's token here
    stop_ids: jax.Array,  # [n_stop] int32
    rng: jax.Array,
    *,
    first_block: int,
    num_blocks: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """Decode blocks ``first_block .. num_blocks - 1``; tokens ``[batch, (num_blocks - K) L_B]``."""
    lb = model.config.block_len
    off = model.config.prefix_offset
    model, params = unscanned_for_decoding(model, params)
    apply = functools.partial(model.apply, mutable=["cache"])
    blocks = rearrange(z, "b (n l) -> b n l", l=lb)
    # Two caches: the block decoder's (``[batch, num_blocks, ...]`` per layer, written once
    # per block) and the token decoder's (``token_len`` slots, rebuilt every block). The
    # inner per-token loop carries only the small one.
    cache_len = decode_cache_len(num_blocks)
    ctx, bvars = apply(
        {"params": params}, blocks[:, :first_block], cache_len, method=_block_prefill
    )
    first, tvars = apply({"params": params}, ctx, method=_token_prefill)

    def choose(logits, key, pos, done):
        tok = sample_token(logits, key, temperature=temperature, top_k=top_k, top_p=top_p)
        tok = jnp.where(done, PAD_ID, tok)
        take = jax.lax.dynamic_index_in_dim(forced, pos, axis=1, keepdims=False)
        tok = jnp.where(take, jax.lax.dynamic_index_in_dim(z, pos, axis=1, keepdims=False), tok)
        return tok, done | (~take & jnp.isin(tok, stop_ids))

    def token(carry, k):
        """Sample block token ``k`` from ``logits``, feed it, get the next token's logits."""
        tcache, ctx, logits, done, rng, j = carry
        rng, key = jax.random.split(rng)
        tok, done = choose(logits, key, j * lb + k, done)
        logits, var = apply(
            {"params": params, "cache": tcache}, ctx, tok, off + k + 1, method=_token_step
        )
        return (var["cache"], ctx, logits, done, rng, j), tok

    def body(carry, j):
        bcache, tcache, ctx, logits, done, rng = carry
        (_, ctx, logits, done, rng, _), toks = jax.lax.scan(
            token, (tcache, ctx, logits, done, rng, j), jnp.arange(lb - 1)
        )
        rng, key = jax.random.split(rng)
        last, done = choose(logits, key, j * lb + lb - 1, done)
        block = jnp.concatenate([toks.T, last[:, None]], axis=1)  # [batch, L_B]
        ctx, bvar = apply(
            {"params": params, "cache": bcache}, block, j, cache_len, method=_block_step
        )
        logits, tvar = apply({"params": params}, ctx, method=_token_prefill)
        return (bvar["cache"], tvar["cache"], ctx, logits, done, rng), block

    done = jnp.zeros((z.shape[0],), bool)
    carry = (bvars["cache"], tvars["cache"], ctx, first, done, rng)
    _, out = jax.lax.scan(body, carry, jnp.arange(first_block, num_blocks))
    return rearrange(out, "n b l -> b (n l)")


@functools.cache
def _param_shapes(model: BlockTransformer) -> dict:
    """``{path: shape}`` of the params ``model.config`` needs (traced once per config)."""
    tokens = jnp.zeros((1, model.config.block_len), jnp.int32)
    expected = jax.eval_shape(lambda: model.init(jax.random.key(0), {"inputs": tokens}))
    leaves = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(expected["params"]))
    return {jax.tree_util.keystr(path): tuple(x.shape) for path, x in leaves}


def check_params(model: BlockTransformer, params: Any) -> None:
    """``ValueError`` naming the first parameter whose shape does not match ``model.config``."""
    want = _param_shapes(model)
    got = {
        jax.tree_util.keystr(path): tuple(x.shape)
        for path, x in jax.tree_util.tree_leaves_with_path(params)
    }
    for name in sorted(set(want) | set(got)):
        if name not in got or name not in want:
            side = "missing from" if name not in got else "not expected by"
            raise ValueError(f"params {name} is {side} the model config; configs mismatch")
        if got[name] != want[name]:
            raise ValueError(
                f"params {name} has shape {got[name]}, the model config needs "
                f"{want[name]}; configs mismatch"
            )


def generate_block_tokens(
    model: BlockTransformer,
    params: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: tuple[int, ...] = (EOS_ID,),
    rng: jax.Array | None = None,
) -> list[list[int]]:
    """Continue each prompt (token ids, BOS included by the caller) by up to
    ``max_new_tokens``; a row stops after emitting one of ``stop_ids`` (kept)."""
    if not isinstance(getattr(model, "config", None), BlockTransformerConfig):
        raise TypeError(f"generate_block_tokens needs a BlockTransformer, got {type(model)}")
    validate_sampling(temperature, top_k, top_p)
    check_params(model, params)
    c = model.config
    lay = layout_prompts(prompts, c.block_len, max_new_tokens)
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > c.max_seq_len:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's max_seq_len={c.max_seq_len}"
        )
    out = block_generate(
        model, params, lay.z, lay.forced, jnp.asarray(stop_ids, jnp.int32),
        jax.random.key(0) if rng is None else rng, first_block=lay.first_block,
        num_blocks=lay.num_blocks, temperature=float(temperature), top_k=top_k, top_p=top_p,
    )  # fmt: skip
    out = np.asarray(out)
    starts = [end - lay.first_block * c.block_len for end in lay.ends]
    rows = [row[start : start + max_new_tokens].tolist() for row, start in zip(out, starts)]
    return trim_generated(rows, stop_ids)


def generate_block_text(
    model: BlockTransformer, params: Any, prompts: list[str], *, max_new_bytes: int, **kwargs: Any
) -> list[str]:
    """Byte-level convenience: text prompts in, generated continuations (text) out."""
    return generate_text(
        model,
        params,
        prompts,
        max_new_bytes=max_new_bytes,
        generate=generate_block_tokens,
        **kwargs,
    )


def sample_block(model, params, cfg, *, prompts, max_bytes, seed, png, **sampling) -> str:
    """``SAMPLERS["block"]``: a printable sample for ``arjax train`` / ``arjax sample``."""
    del cfg, png
    return sample_text(
        generate_block_tokens, model, params, prompts=prompts, max_bytes=max_bytes, seed=seed,
        max_len=model.config.max_seq_len, **sampling,
    )  # fmt: skip
