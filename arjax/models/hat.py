"""Hierarchical Autoregressive Transformer (HAT): bytes -> words -> bytes.

Neitemeier et al. 2025, "Hierarchical Autoregressive Transformers: Combining Byte- and
Word-Level Processing for Robust, Adaptable Language Models" (Sec. 2, Fig. 1), following the
structure of the public reference implementation (Aleph Alpha, ``HATForCausalLM``):

1. **encoder** -- byte embedding, then a causal sliding-window transformer over bytes
   (no final norm, as published);
2. **encoder connector** -- one learned latent query per word cross-attends to that word's
   bytes only (RoPE: query position = word index, key position = byte index; optional
   per-head qk RMSNorm); its output projection maps to the backbone width (Sec. 2.2, eq. 1);
3. **backbone** -- a causal transformer over word embeddings (documents kept apart by
   segment ids);
4. **decoder connector** -- backbone outputs shifted right by one word; the first word of
   every document gets a learned ``first_word_embedding``, so the bytes of word ``w`` see only
   words ``< w`` (Sec. 2.3);
5. **decoder** -- starts from the encoder's byte activations; in its first layer (or every
   layer, ``cross_attn_every_layer``) each byte cross-attends, with query/kv RMSNorm (the
   decoder's epsilon, as published), to its own word's predictive embedding, then a
   sliding-window transformer layer; final RMSNorm and an untied byte head.

Batch format: the DESIGN.md text fields ``[batch, seq]`` plus (see :mod:`arjax.data.words`)
``word_ids`` ``[batch, seq]`` (1-based index of the byte's word in its row, 0 = padding),
``word_segment_ids`` ``[batch, words]`` (document id of each word, 0 = padding word) and
``word_positions`` ``[batch, words]`` (word index within its document). ``words`` is the
static word dimension (``<= config.max_words``). No Python loops over words run inside jit.

Parameter names (stable; the published-checkpoint converter maps them)::

    embedding/embedding                                 [vocab, enc_d]
    encoder/layers/{attn_norm,attn/{q,k,v,o}_proj,mlp_norm,mlp/{gate,up,down}_proj}
                                                        (scanned: leading [layers] axis)
    encoder_connector/latent_query                      [backbone_d]
    encoder_connector/cross_attention/{q,k,v,o}_proj, q_norm, k_norm (if cross_qk_norm)
    backbone/layers/...                                 (as encoder)
    first_word_embedding                                [backbone_d]  (decoder connector)
    decoder/decoder_layers_N/{query_norm,kv_norm,cross_attention/...}
                                            (N = 0; every N if cross_attn_every_layer)
    decoder/decoder_layers_N/llama_layer/{attn_norm,attn/...,mlp_norm,mlp/...}
    decoder/final_norm/scale                            [dec_d]   (published ``layer_norm``)
    lm_head/kernel                                      [dec_d, vocab]

``final_norm`` params exist under ``encoder``/``backbone`` only when those stacks set
``final_norm=True`` (the published model has none there).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from arjax.config import check, check_field_types, check_positive
from arjax.data.vocab import BOS_ID, EOS_ID, VOCAB_SIZE
from arjax.nn import Attention, Block, RMSNorm, RopeScaling, Transformer, TransformerConfig, logical
from arjax.nn.layers import Mode

WORD_FIELDS = ("word_ids", "word_segment_ids", "word_positions")
BYTE_FIELDS = ("inputs", "segment_ids", "positions")
# Mean bytes per word (incl. BOS/EOS words) of the embedded Shakespeare corpus at
# max_word_bytes=32, measured with arjax.data.words (~4.35); used by flops_per_token.
SHAKESPEARE_BYTES_PER_WORD = 4.35


@dataclasses.dataclass(frozen=True)
class HATConfig:
    """Encoder / backbone / decoder stacks plus the connectors' cross-attention shape.

    ``decoder.d_model`` must equal ``encoder.d_model`` (the decoder starts from the encoder's
    byte activations). ``max_word_bytes``: longer words are cut into pieces by the data
    pipeline (published default 100). ``max_words``: the largest static word dimension a
    batch may have. ``max_seq_len``: bytes per row.

    ``bos_id``: the id generation puts before a prompt (None: none, as the published models);
    ``eos_id``: the id that ends a generated text (published: the ``<|eot_id|>`` byte 192).
    The connectors' cross-attentions take RoPE (theta, scaling) and their per-head qk-norm
    epsilon from the encoder (encoder connector) and decoder (decoder connector) stacks.
    """

    encoder: TransformerConfig = TransformerConfig(final_norm=False)
    backbone: TransformerConfig = TransformerConfig(final_norm=False)
    decoder: TransformerConfig = TransformerConfig()
    cross_heads: int = 4
    cross_kv_heads: int = 4
    cross_head_dim: int = 64
    cross_qk_norm: bool = True
    cross_attn_every_layer: bool = False
    max_word_bytes: int = 32
    max_words: int = 96
    max_seq_len: int = 512
    vocab_size: int = VOCAB_SIZE
    bos_id: int | None = BOS_ID
    eos_id: int | None = EOS_ID

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("encoder", "backbone", "decoder"):
            check(
                isinstance(getattr(self, name), TransformerConfig),
                name,
                f"must be a TransformerConfig, got {type(getattr(self, name)).__name__}",
            )
        check_positive(self, "cross_heads", "cross_kv_heads", "cross_head_dim")
        check_positive(self, "max_word_bytes", "max_words", "max_seq_len", "vocab_size")
        check(
            self.cross_heads % self.cross_kv_heads == 0,
            "cross_kv_heads",
            f"must divide cross_heads={self.cross_heads}, got {self.cross_kv_heads}",
        )
        check(
            self.cross_head_dim % 2 == 0,
            "cross_head_dim",
            f"must be even for RoPE, got {self.cross_head_dim}",
        )
        check(
            self.decoder.d_model == self.encoder.d_model,
            "decoder.d_model",
            f"must equal encoder.d_model={self.encoder.d_model} (the decoder starts from the "
            f"encoder's byte activations), got {self.decoder.d_model}",
        )
        check(
            self.max_word_bytes <= self.max_seq_len,
            "max_word_bytes",
            f"must be <= max_seq_len={self.max_seq_len}, got {self.max_word_bytes}",
        )
        check(
            self.max_words <= self.max_seq_len,
            "max_words",
            f"must be <= max_seq_len={self.max_seq_len} (a word has >= 1 byte), "
            f"got {self.max_words}",
        )
        for name in ("bos_id", "eos_id"):
            value = getattr(self, name)
            check(
                value is None or 0 <= value < self.vocab_size,
                name,
                f"must be None or an id in [0, vocab_size={self.vocab_size}), got {value}",
            )
        for name in ("encoder", "decoder"):
            window = getattr(self, name).window
            check(
                window is None or window <= self.max_seq_len,
                f"{name}.window",
                f"must be <= max_seq_len={self.max_seq_len}, got {window}",
            )

    def num_params(self) -> int:
        """Parameter count (the connectors' cross-attentions and embeddings included)."""
        enc, bb, dec = self.encoder, self.backbone, self.decoder
        hd, h, kvh = self.cross_head_dim, self.cross_heads, self.cross_kv_heads
        norm = 2 * hd if self.cross_qk_norm else 0

        def cross(d_q: int, d_kv: int) -> int:
            return d_q * h * hd * 2 + d_kv * kvh * hd * 2 + norm

        n_cross = dec.num_layers if self.cross_attn_every_layer else 1

        def stack(cfg: TransformerConfig) -> int:  # num_params() counts a final norm
            return cfg.num_params() - (0 if cfg.final_norm else cfg.d_model)

        return (
            self.vocab_size * enc.d_model
            + stack(enc)
            + bb.d_model
            + cross(bb.d_model, enc.d_model)
            + stack(bb)
            + bb.d_model
            + n_cross * (cross(dec.d_model, bb.d_model) + dec.d_model + bb.d_model)
            + stack(dec)
            + dec.d_model * self.vocab_size
        )

    def flops_per_token(
        self, context: int, bytes_per_word: float = SHAKESPEARE_BYTES_PER_WORD
    ) -> float:
        """Forward FLOPs per byte: byte stacks + backbone amortised over a word's bytes."""
        enc, bb, dec = self.encoder, self.backbone, self.decoder
        hd, h, kvh = self.cross_head_dim, self.cross_heads, self.cross_kv_heads
        n_cross = dec.num_layers if self.cross_attn_every_layer else 1
        word_ctx = max(1, int(context / bytes_per_word))
        connector = 2.0 * (bb.d_model * h * hd * 2 + enc.d_model * kvh * hd * 2) / bytes_per_word
        decoder_cross = 2.0 * n_cross * (dec.d_model * h * hd * 2 + bb.d_model * kvh * hd * 2)
        return (
            enc.flops_per_token(context)
            + connector
            + bb.flops_per_token(word_ctx) / bytes_per_word
            + decoder_cross
            + dec.flops_per_token(context)
            + 2.0 * dec.d_model * self.vocab_size
        )


def _stack(**kw) -> TransformerConfig:
    return TransformerConfig(**kw)


PRESETS: dict[str, HATConfig] = {
    # CPU seconds: 1-layer byte stacks around a 2-layer word backbone.
    "tiny": HATConfig(
        encoder=_stack(d_model=128, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=32,
                       mlp_dim=384, window=64, dtype="float32", final_norm=False),
        backbone=_stack(d_model=192, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=48,
                        mlp_dim=576, dtype="float32", final_norm=False),
        decoder=_stack(d_model=128, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=32,
                       mlp_dim=384, window=64, dtype="float32"),
        cross_heads=4, cross_kv_heads=2, cross_head_dim=32,
        max_word_bytes=32, max_words=80, max_seq_len=256,
    ),
    "small": HATConfig(
        encoder=_stack(d_model=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                       mlp_dim=768, window=256, final_norm=False),
        backbone=_stack(d_model=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
                        mlp_dim=1536, final_norm=False),
        decoder=_stack(d_model=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                       mlp_dim=768, window=256),
        cross_heads=8, cross_kv_heads=4, cross_head_dim=64,
        max_word_bytes=32, max_words=320, max_seq_len=1024,
    ),
    # Llama-3.1-8B-TFree-HAT shape, for FLOP/memory planning and synthetic checkpoints
    # (experiments/hat_convert_8b.py). Sources, value by value:
    # - backbone = Llama 3.1 8B (meta-llama/Llama-3.1-8B config.json): hidden 4096, 32 layers,
    #   32 heads, 8 KV heads, head_dim 128, MLP 14336, rope_theta 5e5, rms_norm_eps 1e-5,
    #   rope_scaling llama3 (factor 8, low_freq_factor 1, high_freq_factor 4,
    #   original_max_position_embeddings 8192);
    # - the reference's config.py defaults (HATArchitectureConfig): sliding_window 768 (arjax
    #   window 769: the reference's attention sees w + 1 keys, see hat_checkpoint),
    #   max_word_size 100, eos_token_id 192 (<|eot_id|>), no BOS; byte vocabulary 256;
    # - NOT found in the sources searched (the released config.json was not available):
    #   the byte stacks' and connectors' sizes below (hidden 1024, encoder 6 / decoder 4
    #   layers, 8 heads of 128, MLP 2816, cross-attention 32 heads / 8 KV heads of 128 in
    #   every decoder layer, their epsilons and rope thetas). load_published takes every
    #   value from the checkpoint's config.json instead of this preset.
    "8b": HATConfig(
        encoder=_stack(d_model=1024, num_layers=6, num_heads=8, num_kv_heads=8, head_dim=128,
                       mlp_dim=2816, window=769, rope_theta=500_000.0, norm_eps=1e-5,
                       final_norm=False, remat="dots_no_batch"),
        backbone=_stack(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                        head_dim=128, mlp_dim=14336, rope_theta=500_000.0, norm_eps=1e-5,
                        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
                        final_norm=False, remat="dots_no_batch"),
        decoder=_stack(d_model=1024, num_layers=4, num_heads=8, num_kv_heads=8, head_dim=128,
                       mlp_dim=2816, window=769, rope_theta=500_000.0, norm_eps=1e-5,
                       remat="dots_no_batch"),
        cross_heads=32, cross_kv_heads=8, cross_head_dim=128, cross_attn_every_layer=True,
        max_word_bytes=100, max_words=2048, max_seq_len=16384,
        vocab_size=256, bos_id=None, eos_id=192,
    ),
}  # fmt: skip


def check_batch(batch: dict, config: HATConfig) -> None:
    """Shape/dtype checks naming the field; run at trace time, before compilation."""
    for name in (*BYTE_FIELDS, *WORD_FIELDS):
        if name not in batch:
            raise ValueError(f"HAT batch: missing field {name!r} (see arjax.data.words)")
        x = batch[name]
        if x.ndim != 2:
            raise ValueError(f"HAT batch: {name} must be 2-D, got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"HAT batch: {name} must be integer, got dtype {x.dtype}")
    b, s = batch["inputs"].shape
    for name in (*BYTE_FIELDS, "word_ids"):
        if batch[name].shape != (b, s):
            raise ValueError(
                f"HAT batch: {name} must be [batch, seq]={(b, s)}, got {batch[name].shape}"
            )
    w = batch["word_segment_ids"].shape[1]
    for name in ("word_segment_ids", "word_positions"):
        if batch[name].shape != (b, w):
            raise ValueError(
                f"HAT batch: {name} must be [batch, words]={(b, w)}, got {batch[name].shape}"
            )
    if s > config.max_seq_len:
        raise ValueError(f"HAT batch: seq {s} exceeds max_seq_len={config.max_seq_len}")
    if w > config.max_words:
        raise ValueError(f"HAT batch: words {w} exceeds max_words={config.max_words}")


def _cross_attention(config: HATConfig, stack: TransformerConfig, name: str) -> Attention:
    """Non-causal cross-attention of the connectors (RoPE, qk-norm epsilon, impl and dtype
    of ``stack``)."""
    return Attention(
        num_heads=config.cross_heads,
        num_kv_heads=config.cross_kv_heads,
        head_dim=config.cross_head_dim,
        rope_theta=stack.rope_theta,
        rope_scaling=stack.rope_scaling,
        causal=False,
        qk_norm=config.cross_qk_norm,
        qk_norm_eps=stack.norm_eps,
        dtype=stack.compute_dtype,
        impl=stack.attention_impl,
        name=name,
    )


class EncoderConnector(nn.Module):
    """One latent query per word attends to its word's bytes only (Sec. 2.2)."""

    config: HATConfig

    @nn.compact
    def __call__(
        self,
        byte_acts: jax.Array,  # [batch, seq, enc_d]
        byte_positions: jax.Array,  # [batch, seq]
        word_ids: jax.Array,  # [batch, seq] 1-based word of each byte, 0 = pad
        word_positions: jax.Array,  # [batch, words]
        word_slots: jax.Array,  # [batch, words] 1..words, 0 = pad word
    ) -> jax.Array:
        c = self.config
        d = c.backbone.d_model
        latent = self.param("latent_query", logical(nn.initializers.normal(1.0), "embed"), (d,))
        queries = jnp.broadcast_to(
            latent.astype(c.encoder.compute_dtype), (*word_positions.shape, d)
        )  # [batch, words, backbone_d]
        return _cross_attention(c, c.encoder, "cross_attention")(
            queries,
            byte_acts,
            q_positions=word_positions,
            kv_positions=byte_positions,
            q_segment_ids=word_slots,
            kv_segment_ids=word_ids,
        )


class DecoderLayer(nn.Module):
    """[cross-attention to the byte's predictive word embedding] + one transformer layer."""

    config: HATConfig
    cross: bool
    mode: Mode = "train"
    cache_len: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, pred: jax.Array, ctx: dict) -> jax.Array:
        c = self.config
        if self.cross:
            q = RMSNorm(c.decoder.norm_eps, name="query_norm")(x)
            kv = RMSNorm(c.decoder.norm_eps, name="kv_norm")(pred)
            x = x + _cross_attention(c, c.decoder, "cross_attention")(
                q,
                kv,
                q_positions=ctx["positions"],
                kv_positions=ctx["word_positions"],
                q_segment_ids=ctx["word_ids"],
                kv_segment_ids=ctx["word_slots"],
            )
        x, _ = Block(c.decoder, self.mode, self.cache_len, name="llama_layer")(x, ctx)
        return x


class Decoder(nn.Module):
    """Byte decoder: cross-attention layers interleaved with sliding-window layers (Sec. 2.3)."""

    config: HATConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [batch, seq, dec_d]
        pred: jax.Array,  # [batch, words, backbone_d]
        ctx: dict,
        mode: Mode = "train",
        cache_len: int | None = None,
    ) -> jax.Array:
        c = self.config
        x = x.astype(c.decoder.compute_dtype)
        for i in range(c.decoder.num_layers):
            cross = i == 0 or c.cross_attn_every_layer
            layer = DecoderLayer(c, cross, mode, cache_len, name=f"decoder_layers_{i}")
            x = layer(x, pred, ctx)
        return RMSNorm(c.decoder.norm_eps, name="final_norm")(x)


class HAT(nn.Module):
    """``__call__(batch)`` -> byte logits ``[batch, seq, vocab]`` aligned with ``targets``."""

    config: HATConfig

    def setup(self) -> None:
        c = self.config
        self.embedding = nn.Embed(
            c.vocab_size,
            c.encoder.d_model,
            embedding_init=logical(nn.initializers.normal(1.0), "vocab", "embed"),
        )
        self.encoder = Transformer(c.encoder)
        self.encoder_connector = EncoderConnector(c)
        self.backbone = Transformer(c.backbone)
        self.decoder = Decoder(c)
        self.first_word_embedding = self.param(
            "first_word_embedding",
            logical(nn.initializers.normal(1.0), "embed"),
            (c.backbone.d_model,),
        )
        self.lm_head = nn.Dense(
            c.vocab_size,
            use_bias=False,
            dtype=c.decoder.compute_dtype,
            kernel_init=logical(nn.initializers.lecun_normal(), "embed", "vocab"),
        )

    # -- the five stages; each usable alone (generation calls them one by one) --

    def encode(
        self,
        tokens: jax.Array,  # [batch, seq]
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        *,
        mode: Mode = "train",
        cache_len: int | None = None,
        cache_index: jax.Array | None = None,
        kv_visible: jax.Array | None = None,
    ) -> jax.Array:
        """Byte activations ``[batch, seq, enc_d]`` of the encoder."""
        x = self.embedding(tokens)
        return self.encoder(
            x,
            positions=positions,
            segment_ids=segment_ids,
            mode=mode,
            cache_len=cache_len,
            cache_index=cache_index,
            kv_visible=kv_visible,
        )

    def pool_words(
        self,
        byte_acts: jax.Array,
        byte_positions: jax.Array,
        word_ids: jax.Array,
        word_positions: jax.Array,
        word_slots: jax.Array,
    ) -> jax.Array:
        """Word embeddings ``[batch, words, backbone_d]`` (encoder connector)."""
        return self.encoder_connector(
            byte_acts, byte_positions, word_ids, word_positions, word_slots
        )

    def run_backbone(
        self,
        words: jax.Array,  # [batch, words, backbone_d]
        word_positions: jax.Array,
        word_segment_ids: jax.Array | None = None,
        *,
        mode: Mode = "train",
        cache_len: int | None = None,
        cache_index: jax.Array | None = None,
        kv_visible: jax.Array | None = None,
    ) -> jax.Array:
        """Backbone states ``[batch, words, backbone_d]``; state ``w`` has seen words ``<= w``."""
        return self.backbone(
            words,
            positions=word_positions,
            segment_ids=word_segment_ids,
            mode=mode,
            cache_len=cache_len,
            cache_index=cache_index,
            kv_visible=kv_visible,
        )

    def predictive(self, backbone_out: jax.Array, word_positions: jax.Array) -> jax.Array:
        """Decoder connector: word ``w`` gets state ``w - 1``; a document's first word gets
        ``first_word_embedding``. ``[batch, words, backbone_d]``."""
        shifted = jnp.pad(backbone_out, ((0, 0), (1, 0), (0, 0)))[:, :-1]
        first = self.first_word_embedding.astype(backbone_out.dtype)
        return jnp.where((word_positions == 0)[..., None], first, shifted)

    def decode_bytes(
        self,
        byte_acts: jax.Array,  # [batch, seq, enc_d]
        pred: jax.Array,  # [batch, words, backbone_d]
        positions: jax.Array,  # [batch, seq]
        segment_ids: jax.Array | None,
        word_ids: jax.Array,  # [batch, seq]
        word_positions: jax.Array,  # [batch, words]
        word_slots: jax.Array,  # [batch, words]
        *,
        mode: Mode = "train",
        cache_len: int | None = None,
        cache_index: jax.Array | None = None,
        kv_visible: jax.Array | None = None,
    ) -> jax.Array:
        """Decoder + final norm + head: float32 logits ``[batch, seq, vocab]``."""
        ctx = dict(
            positions=positions,
            segment_ids=segment_ids,
            cache_index=cache_index,
            kv_visible=kv_visible,
            word_ids=word_ids,
            word_positions=word_positions,
            word_slots=word_slots,
        )
        h = self.decoder(byte_acts, pred, ctx, mode, cache_len)
        return self.lm_head(h).astype(jnp.float32)

    def forward(
        self,
        batch: dict,
        *,
        mode: Mode = "train",
        cache_len: int | None = None,
        word_cache_len: int | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Logits ``[batch, seq, vocab]``, encoder activations ``[batch, seq, enc_d]`` and
        backbone states ``[batch, words, backbone_d]``.

        ``mode="prefill"`` also fills the byte caches (length ``cache_len``) and the backbone
        cache (length ``word_cache_len``).
        """
        check_batch(batch, self.config)
        word_positions, word_ids = batch["word_positions"], batch["word_ids"]
        w = batch["word_segment_ids"].shape[1]
        word_slots = jnp.where(batch["word_segment_ids"] > 0, jnp.arange(1, w + 1), 0)
        acts = self.encode(
            batch["inputs"], batch["positions"], batch["segment_ids"],
            mode=mode, cache_len=cache_len,
        )  # fmt: skip
        words = self.pool_words(acts, batch["positions"], word_ids, word_positions, word_slots)
        states = self.run_backbone(
            words, word_positions, batch["word_segment_ids"],
            mode=mode, cache_len=word_cache_len,
        )  # fmt: skip
        pred = self.predictive(states, word_positions)
        logits = self.decode_bytes(
            acts, pred, batch["positions"], batch["segment_ids"], word_ids, word_positions,
            word_slots, mode=mode, cache_len=cache_len,
        )  # fmt: skip
        return logits, acts, states

    def __call__(self, batch: dict, *, train: bool = False) -> jax.Array:
        return self.forward(batch)[0]
