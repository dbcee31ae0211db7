"""Block Transformer: global-to-local language modelling (Ho et al. 2024, "Block Transformer:
Global-to-Local Language Modeling for Fast Inference", sec. 2).

Three parts (sec. 2, Figure 1):

* **embedder** -- turns each block of ``L_B`` tokens into one block embedding
  ``[batch, blocks, d_block]``; ``"lookup"`` concatenates ``L_B`` token embeddings of width
  ``d_block / L_B`` (the paper's best), ``"encoder"`` runs a small transformer over the block
  with a trailing learned summary token, ``"encoder_decoder"`` runs that transformer and pools
  its outputs with a learned query through cross-attention (the paper's embedder ablation
  compares the three);
* **block decoder** -- a causal :class:`arjax.nn.Transformer` over block embeddings; its output
  at block ``j`` (the context embedding) carries all the global context for block ``j + 1``;
* **token decoder** -- a :class:`arjax.nn.Transformer` over the ``L_B`` tokens of one block only,
  conditioned on the context embedding as ``prefix_len`` prefix vectors (the paper's choice),
  or, as in the paper's token-decoder ablation, by adding it to every token embedding
  (``"summation"``) or through a cross-attention layer over ``prefix_len`` context vectors
  (``"cross_attention"``, applied once at the token decoder's input).

Alignment with the text batch (``targets[t] = inputs[t + 1]``): the stream
``z = [PAD] * (L_B - 1) + inputs`` is cut into blocks ``Z_j = z[j L_B : (j + 1) L_B]``, so block
``j`` ends at ``inputs[j L_B]``; the context of blocks ``Z_0..Z_j`` predicts block
``Z_{j+1} = targets[j L_B : (j + 1) L_B]``. The token decoder for that block reads
``[prefix(ctx_j), inputs[j L_B + 1 : (j + 1) L_B]]`` and its last ``L_B`` outputs give the
logits. With ``L_B = 1`` the token decoder sees only the prefix, so the model is an ordinary
causal transformer (block decoder) with a position-wise stack on top.

Documents packed into one window are not masked from each other (the context is causal over
the whole window); the loss mask is the shared one, so bits/byte stay comparable.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from arjax.config import check, check_field_types, check_positive
from arjax.data.vocab import PAD_ID, VOCAB_SIZE
from arjax.models.registry import ModelSpec, register_model
from arjax.models.transformer import check_tokens
from arjax.nn import Attention, RMSNorm, Transformer, TransformerConfig, logical
from arjax.nn.layers import Mode

BLOCK_LENS = (1, 2, 4, 8)
EMBEDDERS = ("lookup", "encoder", "encoder_decoder")
CONDITIONINGS = ("prefix", "summation", "cross_attention")


@dataclasses.dataclass(frozen=True)
class BlockTransformerConfig:
    """Block length, the two decoder stacks and the embedder / conditioning variants."""

    block_len: int = 4
    block_decoder: TransformerConfig = TransformerConfig()
    token_decoder: TransformerConfig = TransformerConfig()
    embedder: Literal["lookup", "encoder", "encoder_decoder"] = "lookup"
    embedder_layers: int = 1
    conditioning: Literal["prefix", "summation", "cross_attention"] = "prefix"
    prefix_len: int = 1
    vocab_size: int = VOCAB_SIZE
    max_seq_len: int = 2048
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        check_field_types(self)
        check_positive(self, "embedder_layers", "prefix_len", "vocab_size", "max_seq_len")
        check(
            self.block_len in BLOCK_LENS,
            "block_len",
            f"must be one of {list(BLOCK_LENS)}, got {self.block_len!r}",
        )
        check(
            self.max_seq_len % self.block_len == 0,
            "max_seq_len",
            f"must be a multiple of block_len={self.block_len}, got {self.max_seq_len}",
        )
        for name in ("block_decoder", "token_decoder"):
            stack = getattr(self, name)
            check(
                isinstance(stack, TransformerConfig),
                name,
                f"must be a TransformerConfig, got {type(stack).__name__}",
            )
            check(
                stack.window is None,
                f"{name}.window",
                f"must be None (block attention is already local), got {stack.window}",
            )
        check(
            self.embedder in EMBEDDERS,
            "embedder",
            f"must be one of {list(EMBEDDERS)}, got {self.embedder!r}",
        )
        check(
            self.embedder != "lookup" or self.block_decoder.d_model % self.block_len == 0,
            "block_decoder.d_model",
            f"lookup embedder needs a multiple of block_len={self.block_len}, "
            f"got {self.block_decoder.d_model}",
        )
        check(
            self.conditioning in CONDITIONINGS,
            "conditioning",
            f"must be one of {list(CONDITIONINGS)}, got {self.conditioning!r}",
        )
        check(
            self.conditioning != "summation" or self.prefix_len == 1,
            "prefix_len",
            f"summation conditioning adds one context vector, needs 1, got {self.prefix_len}",
        )

    @property
    def num_blocks(self) -> int:
        return self.max_seq_len // self.block_len

    @property
    def token_len(self) -> int:
        """Token decoder sequence: conditioning slots then the block's first L_B - 1 tokens."""
        return self.prefix_offset + self.block_len

    @property
    def prefix_offset(self) -> int:
        """Index of the token decoder position whose output predicts the block's first token."""
        return self.prefix_len - 1 if self.conditioning == "prefix" else 0

    def num_params(self) -> int:
        d_b, d_t, v = self.block_decoder.d_model, self.token_decoder.d_model, self.vocab_size
        n = self.block_decoder.num_params() + self.token_decoder.num_params()
        n += v * d_t * (1 if self.tie_embeddings else 2)
        if self.embedder == "lookup":
            n += v * d_b // self.block_len
        else:
            enc = dataclasses.replace(self.token_decoder, num_layers=self.embedder_layers)
            n += v * d_t + enc.num_params() + (d_t + 1) * d_b + d_t
            if self.embedder == "encoder_decoder":
                n += 4 * d_t * enc.num_heads * enc.head_dim
        cond = self.prefix_len * d_t
        n += (d_b + 1) * cond
        if self.conditioning == "cross_attention":
            t = self.token_decoder
            n += d_t * t.head_dim * (2 * t.num_heads + 2 * t.num_kv_heads) + 2 * d_t
        return n

    def flops_per_token(self, context: int) -> float:
        """Forward FLOPs per token: block decoder once per block, token decoder per token."""
        blocks = max(context // self.block_len, 1)
        block = self.block_decoder.flops_per_token(blocks) / self.block_len
        token = self.token_decoder.flops_per_token(self.token_len) * self.token_len
        return block + token / self.block_len + 2.0 * self.vocab_size * self.token_decoder.d_model


def _stack(**kw) -> TransformerConfig:
    return TransformerConfig(**kw)


PRESETS: dict[str, BlockTransformerConfig] = {
    "tiny": BlockTransformerConfig(
        block_len=4,
        block_decoder=_stack(d_model=128, num_layers=2, num_heads=4, num_kv_heads=2,
                             head_dim=32, mlp_dim=384, dtype="float32"),
        token_decoder=_stack(d_model=128, num_layers=2, num_heads=4, num_kv_heads=2,
                             head_dim=32, mlp_dim=384, dtype="float32"),
        max_seq_len=256,
    ),
    "small": BlockTransformerConfig(
        block_len=4,
        block_decoder=_stack(d_model=512, num_layers=4, num_heads=8, num_kv_heads=4,
                             head_dim=64, mlp_dim=1536),
        token_decoder=_stack(d_model=512, num_layers=4, num_heads=8, num_kv_heads=4,
                             head_dim=64, mlp_dim=1536),
        max_seq_len=1024,
    ),
}  # fmt: skip


def block_stream(tokens: jax.Array, block_len: int) -> jax.Array:
    """Tokens ``[batch, seq]`` (seq a multiple of L_B) -> embedder blocks ``[batch, n, L_B]``.

    Block ``j`` is ``[PAD] * (L_B - 1) + tokens`` cut at ``j * L_B``: it ends at ``tokens[j L_B]``.
    """
    z = jnp.pad(tokens[:, : tokens.shape[1] - block_len + 1], ((0, 0), (block_len - 1, 0)),
                constant_values=PAD_ID)  # fmt: skip
    return rearrange(z, "b (n l) -> b n l", l=block_len)


class BlockEmbedder(nn.Module):
    """Block of tokens ``[batch, n, L_B]`` -> block embedding ``[batch, n, d_block]`` (sec. 2)."""

    config: BlockTransformerConfig

    @nn.compact
    def __call__(self, blocks: jax.Array) -> jax.Array:
        c = self.config
        d_b, d_t = c.block_decoder.d_model, c.token_decoder.d_model
        if c.embedder == "lookup":
            width = d_b // c.block_len
            emb = nn.Embed(
                c.vocab_size,
                width,
                embedding_init=logical(nn.initializers.normal(d_b**-0.5), "vocab", "embed"),
                name="embed",
            )(blocks)  # [batch, n, L_B, d_block / L_B]; unit RMS after the scale below
            return rearrange(emb, "b n l d -> b n (l d)") * jnp.sqrt(float(d_b))
        stack = dataclasses.replace(c.token_decoder, num_layers=c.embedder_layers)
        b, n, lb = blocks.shape
        x = nn.Embed(
            c.vocab_size,
            d_t,
            embedding_init=logical(nn.initializers.normal(d_t**-0.5), "vocab", "embed"),
            name="embed",
        )(rearrange(blocks, "b n l -> (b n) l")) * jnp.sqrt(float(d_t))  # [b n, L_B, d_tok]
        summary = self.param("summary", logical(nn.initializers.normal(1.0), "embed"), (d_t,))
        if c.embedder == "encoder":
            # Summary token last: under the causal stack it reads the whole block.
            x = jnp.concatenate([x, jnp.broadcast_to(summary, (b * n, 1, d_t))], axis=1)
            pos = jnp.broadcast_to(jnp.arange(lb + 1), (b * n, lb + 1))
            pooled = Transformer(stack, name="encoder")(x, positions=pos)[:, -1]
        else:
            pos = jnp.broadcast_to(jnp.arange(lb), (b * n, lb))
            enc = Transformer(stack, name="encoder")(x, positions=pos)
            query = jnp.broadcast_to(summary, (b * n, 1, d_t)).astype(enc.dtype)
            pooled = Attention(
                stack.num_heads, stack.num_heads, stack.head_dim, rope_theta=None,
                causal=False, dtype=stack.compute_dtype, impl=stack.attention_impl,
                name="pool",
            )(query, enc)[:, 0]  # fmt: skip
        out = nn.Dense(
            d_b, dtype=stack.compute_dtype,
            kernel_init=logical(nn.initializers.lecun_normal(), "mlp", "embed"), name="out",
        )(pooled)  # fmt: skip
        return rearrange(out, "(b n) d -> b n d", b=b)


class BlockTransformer(nn.Module):
    """Block Transformer LM. ``__call__(batch)`` -> logits ``[batch, seq, vocab]``."""

    config: BlockTransformerConfig

    def setup(self) -> None:
        c = self.config
        d_t = c.token_decoder.d_model
        dtype = c.token_decoder.compute_dtype
        self.embedder = BlockEmbedder(c, name="embedder")
        self.block_decoder = Transformer(c.block_decoder, name="block_decoder")
        self.token_embed = nn.Embed(
            c.vocab_size, d_t,
            embedding_init=logical(nn.initializers.normal(d_t**-0.5), "vocab", "embed"),
            name="token_embed",
        )  # fmt: skip
        self.cond_proj = nn.Dense(
            c.prefix_len * d_t, dtype=dtype,
            kernel_init=logical(nn.initializers.lecun_normal(), "mlp", "embed"), name="cond_proj",
        )  # fmt: skip
        if c.conditioning == "cross_attention":
            t = c.token_decoder
            self.start = self.param("start", logical(nn.initializers.normal(1.0), "embed"), (d_t,))
            self.cross_norm = RMSNorm(t.norm_eps, name="cross_norm")
            self.cross = Attention(
                t.num_heads, t.num_kv_heads, t.head_dim, rope_theta=None, causal=False,
                dtype=dtype, impl=t.attention_impl, name="cross",
            )  # fmt: skip
        self.token_decoder = Transformer(c.token_decoder, name="token_decoder")
        if not c.tie_embeddings:
            self.lm_head = nn.Dense(
                c.vocab_size, use_bias=False,
                kernel_init=logical(nn.initializers.lecun_normal(), "embed", "vocab"),
                name="lm_head",
            )  # fmt: skip

    # --- pieces -------------------------------------------------------------------------

    def logits(self, h: jax.Array) -> jax.Array:
        """Token decoder hidden ``[..., d_tok]`` -> float32 logits ``[..., vocab]``."""
        if self.config.tie_embeddings:
            w = self.token_embed.embedding.astype(h.dtype)
            return jnp.einsum("...d,vd->...v", h, w).astype(jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def context(
        self,
        blocks: jax.Array,  # [batch, n, L_B] token ids
        block_index: jax.Array,  # [batch, n] block positions
        *,
        mode: Mode = "train",
        cache_len: int | None = None,
        cache_index: jax.Array | None = None,
        kv_visible: jax.Array | None = None,  # [batch, cache_len] (decode)
    ) -> jax.Array:
        """Embedder + block decoder: context embeddings ``[batch, n, d_block]`` (sec. 2)."""
        return self.block_decoder(
            self.embedder(blocks), positions=block_index, mode=mode, cache_len=cache_len,
            cache_index=cache_index, kv_visible=kv_visible,
        )  # fmt: skip

    def token_inputs(self, ctx: jax.Array, tokens: jax.Array, *, start: bool) -> jax.Array:
        """Token decoder inputs ``[B, slots + t, d_tok]``; ctx ``[B, d_block]``, tokens ``[B, t]``.

        ``start`` prepends the conditioning slots (prefix vectors, or the summed context /
        learned start vector) that predict the block's first token (sec. 2).
        """
        c = self.config
        d_t = c.token_decoder.d_model
        emb = self.token_embed(tokens) * jnp.sqrt(float(d_t))  # [B, t, d_tok]
        cond = rearrange(self.cond_proj(ctx), "b (p d) -> b p d", p=c.prefix_len)
        emb = emb.astype(cond.dtype)
        if c.conditioning == "prefix":
            return jnp.concatenate([cond, emb], axis=1) if start else emb
        if c.conditioning == "summation":
            x = emb + cond
            return jnp.concatenate([cond, x], axis=1) if start else x
        if start:
            first = jnp.broadcast_to(self.start.astype(emb.dtype), (emb.shape[0], 1, d_t))
            emb = jnp.concatenate([first, emb], axis=1)
        return emb + self.cross(self.cross_norm(emb), cond)

    def decode_tokens(
        self,
        x: jax.Array,  # [B, t, d_tok]
        positions: jax.Array,  # [B, t]
        *,
        mode: Mode = "train",
        cache_index: jax.Array | None = None,
        kv_visible: jax.Array | None = None,
    ) -> jax.Array:
        """Token decoder (attention within the block only) -> logits ``[B, t, vocab]``."""
        h = self.token_decoder(
            x, positions=positions, mode=mode, cache_len=self.config.token_len,
            cache_index=cache_index, kv_visible=kv_visible,
        )  # fmt: skip
        return self.logits(h)

    # --- training / full forward --------------------------------------------------------

    def forward(self, tokens: jax.Array) -> jax.Array:
        """Logits ``[batch, seq, vocab]`` with ``logits[:, t]`` predicting ``tokens[:, t + 1]``.

        A sequence that is not a multiple of L_B is right-padded internally; by causality the
        padding changes no returned logit.
        """
        c = self.config
        check_tokens(tokens, c.max_seq_len, c.vocab_size)
        b, seq = tokens.shape
        lb = c.block_len
        padded = jnp.pad(tokens, ((0, 0), (0, -seq % lb)), constant_values=PAD_ID)
        n = padded.shape[1] // lb
        ctx = self.context(block_stream(padded, lb), jnp.broadcast_to(jnp.arange(n), (b, n)))
        # Tokens fed inside block j: inputs[j L_B + 1 : (j + 1) L_B].
        shifted = jnp.pad(padded[:, 1:], ((0, 0), (0, 1)), constant_values=PAD_ID)
        fed = rearrange(shifted, "b (n l) -> (b n) l", l=lb)[:, : lb - 1]
        x = self.token_inputs(rearrange(ctx, "b n d -> (b n) d"), fed, start=True)
        pos = jnp.broadcast_to(jnp.arange(c.token_len), x.shape[:2])
        logits = self.decode_tokens(x, pos)[:, c.prefix_offset :]  # [b n, L_B, vocab]
        return rearrange(logits, "(b n) l v -> b (n l) v", b=b)[:, :seq]

    def __call__(self, batch: dict, *, train: bool = False) -> jax.Array:
        return self.forward(batch["inputs"])


register_model(
    ModelSpec(
        "block", BlockTransformerConfig, BlockTransformer, PRESETS, data="text",
        decoder="arjax.generate.block:BlockDecoder",
    )
)  # fmt: skip
