"""Decoder-only byte-level transformer LM: the baseline every model is compared with.

Pre-norm RMSNorm, RoPE, SwiGLU, grouped-query attention, optional sliding window,
tied or untied embeddings (Touvron et al. 2023, sec. 2.2 "Architecture"). Parameters are
float32; compute runs in ``dtype``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from arjax.config import check, check_positive
from arjax.data.vocab import VOCAB_SIZE
from arjax.models.registry import ModelSpec, register_model
from arjax.nn import Transformer, TransformerConfig, logical
from arjax.nn.layers import Mode


@dataclasses.dataclass(frozen=True)
class TransformerLMConfig(TransformerConfig):
    """A :class:`TransformerConfig` stack plus the token embedding and head."""

    vocab_size: int = VOCAB_SIZE
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    # Train/eval loss over chunks of this many positions (arjax.ops.chunked_cross_entropy):
    # the [batch, seq, vocab] logits never materialise. None: whole logits.
    loss_chunk: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "vocab_size", "max_seq_len")
        if self.loss_chunk is not None:
            check_positive(self, "loss_chunk")
        check(
            self.window is None or self.window <= self.max_seq_len,
            "window",
            f"must be <= max_seq_len={self.max_seq_len}, got {self.window}",
        )

    def num_params(self) -> int:
        embed = self.vocab_size * self.d_model
        return super().num_params() + embed * (1 if self.tie_embeddings else 2)

    def flops_per_token(self, context: int) -> float:
        return super().flops_per_token(context) + 2.0 * self.vocab_size * self.d_model


PRESETS: dict[str, TransformerLMConfig] = {
    "tiny": TransformerLMConfig(
        d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384,
        max_seq_len=256, dtype="float32",
    ),
    "small": TransformerLMConfig(
        d_model=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64, mlp_dim=1536,
        max_seq_len=1024,
    ),
    "125m": TransformerLMConfig(
        d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, head_dim=64, mlp_dim=3072,
        max_seq_len=2048, remat="dots_no_batch",
    ),
    "350m": TransformerLMConfig(
        d_model=1024, num_layers=24, num_heads=16, num_kv_heads=16, head_dim=64, mlp_dim=3072,
        max_seq_len=2048, remat="dots_no_batch",
    ),
    "1b": TransformerLMConfig(
        d_model=2048, num_layers=20, num_heads=16, num_kv_heads=16, head_dim=128, mlp_dim=5632,
        max_seq_len=2048, remat="dots_no_batch",
    ),
}  # fmt: skip


def check_tokens(tokens: jax.Array, max_len: int, vocab_size: int, name: str = "inputs") -> None:
    """Shape/dtype checks that run at trace time, before compilation."""
    if tokens.ndim != 2:
        raise ValueError(f"{name} must be [batch, seq] token ids, got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer token ids, got dtype {tokens.dtype}")
    if tokens.shape[1] > max_len:
        raise ValueError(
            f"{name}: sequence length {tokens.shape[1]} exceeds the model's max_seq_len={max_len}"
        )


class TransformerLM(nn.Module):
    """Byte-level causal LM. ``__call__(batch)`` -> logits ``[batch, seq, vocab]``."""

    config: TransformerLMConfig

    def setup(self) -> None:
        c = self.config
        self.embed = nn.Embed(
            c.vocab_size,
            c.d_model,
            embedding_init=logical(nn.initializers.normal(c.d_model**-0.5), "vocab", "embed"),
            name="embed",
        )
        self.stack = Transformer(c.stack_fields(), name="transformer")
        if not c.tie_embeddings:
            self.lm_head = nn.Dense(
                c.vocab_size,
                use_bias=False,
                kernel_init=logical(nn.initializers.lecun_normal(), "embed", "vocab"),
                name="lm_head",
            )

    def logits(self, h: jax.Array) -> jax.Array:
        """Hidden ``[..., d_model]`` -> float32 logits ``[..., vocab]``."""
        if self.config.tie_embeddings:
            w = self.embed.embedding.astype(h.dtype)
            return jnp.einsum("...d,vd->...v", h, w).astype(jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def hidden(
        self,
        tokens: jax.Array,  # [batch, seq]
        positions: jax.Array,  # [batch, seq]
        segment_ids: jax.Array | None = None,
        *,
        mode: Mode = "train",
        cache_len: int | None = None,
        cache_index: jax.Array | None = None,
        kv_visible: jax.Array | None = None,
    ) -> jax.Array:
        c = self.config
        check_tokens(tokens, c.max_seq_len, c.vocab_size)
        x = self.embed(tokens) * jnp.sqrt(float(c.d_model))  # [batch, seq, d_model], unit RMS
        return self.stack(
            x,
            positions=positions,
            segment_ids=segment_ids,
            mode=mode,
            cache_len=cache_len,
            cache_index=cache_index,
            kv_visible=kv_visible,
        )

    def batch_hidden(self, batch: dict) -> jax.Array:
        """Final hidden ``[batch, seq, d_model]`` of a text batch (training mode)."""
        # Unpacked batches may omit segment_ids (one document per row: cuDNN-eligible).
        return self.hidden(batch["inputs"], batch["positions"], batch.get("segment_ids"))

    def __call__(self, batch: dict, *, train: bool = False) -> jax.Array:
        return self.logits(self.batch_hidden(batch))

    def head(self, batch: dict, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """Hidden ``[batch, seq, d_model]`` and head weight ``[d_model, vocab]`` such that
        ``einsum(hidden, weight)`` (promoted dtypes) is :meth:`logits`: the chunked loss's
        inputs (``loss_chunk``). Call after init (the untied head reads ``lm_head``'s kernel)."""
        h = self.batch_hidden(batch)
        if self.config.tie_embeddings:
            return h, rearrange(self.embed.embedding.astype(h.dtype), "v d -> d v")
        return h, nn.meta.unbox(self.lm_head.variables["params"]["kernel"])  # boxed params too

    def prefill(
        self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache_len: int
    ) -> jax.Array:
        """Run the prompt, fill the ``cache`` collection; logits ``[batch, seq, vocab]``."""
        h = self.hidden(tokens, positions, segment_ids, mode="prefill", cache_len=cache_len)
        return self.logits(h)

    def decode(
        self,
        tokens: jax.Array,  # [batch, 1]
        positions: jax.Array,  # [batch, 1]
        cache_index: jax.Array,  # [] slot of the new token
        kv_visible: jax.Array,  # [batch, cache_len] bool
    ) -> jax.Array:
        """One step with the KV cache; logits ``[batch, 1, vocab]``."""
        h = self.hidden(
            tokens, positions, mode="decode", cache_index=cache_index, kv_visible=kv_visible
        )
        return self.logits(h)


register_model(
    ModelSpec(
        "transformer", TransformerLMConfig, TransformerLM, PRESETS, data="text",
        decoder="arjax.generate.lm:LMDecoder",
    )
)  # fmt: skip
