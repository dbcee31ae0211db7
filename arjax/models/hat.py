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
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arjax.config import check, check_field_types, check_positive
from arjax.data.vocab import BOS_ID, EOS_ID, VOCAB_SIZE
from arjax.models.registry import ModelSpec, register_model
from arjax.nn import Attention, Block, RMSNorm, RopeScaling, Transformer, TransformerConfig, logical
from arjax.nn.layers import Mode, apply_rope, head_projection, output_projection
from arjax.ops.word_attention import gather_words, word_pool_attention

WORD_FIELDS = ("word_ids", "word_segment_ids", "word_positions")
BYTE_FIELDS = ("inputs", "segment_ids", "positions")


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

    def forward_flops(
        self, num_bytes: float, num_words: float, byte_context: float, word_context: float
    ) -> float:
        """Forward FLOPs of ``num_bytes`` bytes in ``num_words`` words (rows of
        ``byte_context`` bytes / ``word_context`` words; attention as in
        :meth:`TransformerConfig.flops_per_token`). Counts the matmuls the model needs:

        - per byte: encoder and decoder stacks, byte head, the encoder connector's K/V
          projections and its one score + weighted value per byte (a byte is a key of its
          own word only);
        - per word: backbone, the encoder connector's output projection (its shared latent
          query is projected once per call), and in every decoder cross-attention layer the
          value and output projections (each byte's softmax is over one key, its word's:
          the output is that word's value, so queries/keys do not enter it; Sec. 2.3).
        """
        enc, bb, dec = self.encoder, self.backbone, self.decoder
        h, kvh, hd = self.cross_heads, self.cross_kv_heads, self.cross_head_dim
        n_cross = dec.num_layers if self.cross_attn_every_layer else 1
        per_byte = (
            enc.flops_per_token(byte_context)
            + dec.flops_per_token(byte_context)
            + 2.0 * dec.d_model * self.vocab_size
            + 2.0 * (2 * enc.d_model * kvh * hd + 2 * h * hd)
        )
        per_word = (
            bb.flops_per_token(word_context)
            + 2.0 * h * hd * bb.d_model
            + 2.0 * n_cross * (bb.d_model * kvh * hd + h * hd * dec.d_model)
        )
        return num_bytes * per_byte + num_words * per_word

    def flops_per_token(self, context: int, bytes_per_word: float) -> float:
        """Forward FLOPs per byte of a full row of ``context`` bytes at ``bytes_per_word``
        (measure it on the data: :func:`arjax.data.words.bytes_per_word`)."""
        if bytes_per_word <= 0:
            raise ValueError(f"flops_per_token: bytes_per_word must be > 0, got {bytes_per_word}")
        words = context / bytes_per_word
        return self.forward_flops(context, words, context, words) / context

    def batch_flops(self, batch: dict) -> float:
        """Forward FLOPs of a HAT batch from its real bytes (``word_ids > 0``) and real
        words (``word_segment_ids > 0``) per row: padding bytes and word slots are not
        model FLOPs (they are the waste that MFU shows)."""
        num_bytes = np.count_nonzero(np.asarray(batch["word_ids"]) > 0, axis=1)
        num_words = np.count_nonzero(np.asarray(batch["word_segment_ids"]) > 0, axis=1)
        return float(
            sum(
                self.forward_flops(nb, nw, nb, nw)
                for nb, nw in zip(num_bytes.tolist(), num_words.tolist(), strict=True)
            )
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


def _one_b() -> HATConfig:
    """1B class: the word backbone shaped as the transformer ``1b``; byte stacks and
    connectors as in ``8b`` (the published model) at the same ratios to the backbone width:
    byte stacks a quarter as wide (head_dim 128, MLP 2.75x), cross-attention as wide as the
    backbone with 4 query heads per KV head; layers, window and cross-attention in every
    decoder layer as published. Rows of 8192 bytes; ``max_words`` 1920 (15 x 128) leaves few
    empty word slots at Shakespeare's bytes per word (``experiments/bench_train.py`` measures
    the padding). Trained from scratch, it reads arjax's byte vocabulary (BOS, EOS, PAD), not
    the released model's 256 ids."""
    from arjax.models.transformer import PRESETS as TRANSFORMER_PRESETS

    big, tf = PRESETS["8b"], TRANSFORMER_PRESETS["1b"]
    shape = ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim")
    backbone = dataclasses.replace(big.backbone, **{f: getattr(tf, f) for f in shape})
    width = backbone.d_model // 4
    byte_shape = dict(d_model=width, num_heads=width // 128, num_kv_heads=width // 128,
                      mlp_dim=width * 11 // 4)  # fmt: skip
    return dataclasses.replace(
        big,
        encoder=dataclasses.replace(big.encoder, **byte_shape),
        backbone=backbone,
        decoder=dataclasses.replace(big.decoder, **byte_shape),
        cross_heads=backbone.d_model // big.cross_head_dim,
        cross_kv_heads=backbone.d_model // big.cross_head_dim // 4,
        max_words=1920,
        max_seq_len=8192,
        vocab_size=VOCAB_SIZE,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
    )


PRESETS["1b"] = _one_b()


def _seven_b() -> HATConfig:
    """TFree-HAT-Pretrained-7B shape (``Aleph-Alpha/tfree-hat-pretrained-7b-base``, trained from
    scratch on English and German). Sources, value by value:

    - the model card: encoder 119M, backbone 6.98B, decoder 94M parameters; context 32,900
      words for the released (long-context) checkpoint, 3,500 words in pre-training;
    - backbone shaped as Llama 3.1 8B's transformer blocks (hidden 4096, 32 layers, 32 heads, 8
      KV heads of 128, MLP 14336): inferred, not published; it is the shape whose parameter
      count is the card's 6.98B (``tests/test_hat.py`` checks the count);
    - rope: no frequency scaling (public loader code for this checkpoint reports its
      ``rope_type`` as "default"); the theta and epsilons are not published and are taken
      as ``8b``'s;
    - byte stacks and connectors: NOT found (their published totals, 119M and 94M, do not
      determine the shapes), so ``8b``'s; ``max_words``/``max_seq_len`` are ``8b``'s planning
      values, not the 32,900-word context.

    ``load_published`` takes every value from the checkpoint's ``config.json`` instead."""
    big = PRESETS["8b"]
    return dataclasses.replace(
        big, backbone=dataclasses.replace(big.backbone, rope_scaling=RopeScaling())
    )


PRESETS["7b"] = _seven_b()


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


ConnectorImpl = Literal["words", "dense"]
CONNECTOR_IMPLS = ("words", "dense")


def _cross_attention(config: HATConfig, stack: TransformerConfig, name: str) -> Attention:
    """The connectors' cross-attention as masked attention over the whole row (``dense``;
    RoPE, qk-norm epsilon, impl and dtype of ``stack``)."""
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


class WordCrossAttention(nn.Module):
    """The connectors' cross-attention computed per word (:mod:`arjax.ops.word_attention`).

    Parameters are named and shaped as :class:`arjax.nn.Attention`'s (``q_proj``,
    ``k_proj``, ``v_proj``, ``o_proj``, ``q_norm``/``k_norm``), so ``connector_impl``
    ``"words"`` and ``"dense"`` share checkpoints. ``features``: the query (output) width.
    """

    config: HATConfig
    stack: TransformerConfig  # RoPE, qk-norm epsilon and compute dtype
    features: int

    def setup(self) -> None:
        c, dtype = self.config, self.stack.compute_dtype
        h, kvh, hd = c.cross_heads, c.cross_kv_heads, c.cross_head_dim
        self.q_proj = head_projection(h, hd, "heads", dtype, "q_proj")
        self.k_proj = head_projection(kvh, hd, "kv_heads", dtype, "k_proj")
        self.v_proj = head_projection(kvh, hd, "kv_heads", dtype, "v_proj")
        self.o_proj = output_projection(self.features, dtype, "o_proj")
        if c.cross_qk_norm:
            self.q_norm = RMSNorm(self.stack.norm_eps, axis_name="head_dim")
            self.k_norm = RMSNorm(self.stack.norm_eps, axis_name="head_dim")

    def _qk_norm(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.config.cross_qk_norm:
            return self.q_norm(q), self.k_norm(k)
        return q, k

    def pool(
        self,
        query: jax.Array,  # [q_d] one query vector shared by every word (the latent)
        byte_acts: jax.Array,  # [batch, seq, kv_d]
        word_positions: jax.Array,  # [batch, words]
        byte_positions: jax.Array,  # [batch, seq]
        word_ids: jax.Array,  # [batch, seq]
    ) -> jax.Array:
        """Encoder connector: word ``w``'s query over the bytes of ``w`` -> ``[batch, words,
        features]``. The query is shared, so it stays unrotated and each key is rotated by
        its byte's position relative to its word's (:func:`word_pool_attention`)."""
        q, k = self._qk_norm(self.q_proj(query), self.k_proj(byte_acts))
        w = word_positions.shape[1]
        byte_word_pos = jnp.take_along_axis(word_positions, jnp.clip(word_ids - 1, 0, w - 1), 1)
        k = apply_rope(
            k, byte_positions - byte_word_pos, self.stack.rope_theta, self.stack.rope_scaling
        )
        out = word_pool_attention(q, k, self.v_proj(byte_acts), word_ids, num_words=w)
        return self.o_proj(out)

    def values(self, words: jax.Array) -> jax.Array:
        """Decoder connector per word: a byte's softmax is over the one key of its word, so
        its output is that word's value, projected: ``[batch, words, features]`` from words
        ``[batch, words, kv_d]``."""
        c = self.config
        v = jnp.repeat(self.v_proj(words), c.cross_heads // c.cross_kv_heads, axis=2)
        return self.o_proj(v)

    def to_bytes(self, x: jax.Array, words: jax.Array, word_ids: jax.Array) -> jax.Array:
        """Decoder connector: each byte takes its word's :meth:`values`. x ``[batch, seq,
        features]`` (only its shape matters), words ``[batch, words, kv_d]``."""
        if self.is_initializing():  # q/k exist (checkpoints) but a one-key softmax is 1
            self._qk_norm(self.q_proj(x), self.k_proj(words))
        return gather_words(self.values(words), word_ids)


class EncoderConnector(nn.Module):
    """One latent query per word attends to its word's bytes only (Sec. 2.2)."""

    config: HATConfig
    impl: ConnectorImpl = "words"

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
        latent = latent.astype(c.encoder.compute_dtype)
        if self.impl == "words":  # word w's slot is w + 1 (HAT.forward, generation)
            attn = WordCrossAttention(c, c.encoder, d, name="cross_attention")
            return attn.pool(latent, byte_acts, word_positions, byte_positions, word_ids)
        queries = jnp.broadcast_to(latent, (*word_positions.shape, d))  # [batch, words, d]
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
    impl: ConnectorImpl = "words"

    @nn.compact
    def __call__(
        self, x: jax.Array, pred: jax.Array | None, ctx: dict, values: jax.Array | None = None
    ) -> jax.Array:
        """``values``: this layer's cross-attention output per word, when computed already
        (:meth:`HAT.decoder_word_values`; decoding does it once per word); ``pred`` is then
        not used."""
        c = self.config
        if self.cross and values is not None:
            x = x + gather_words(values, ctx["word_ids"])
        elif self.cross:
            kv = RMSNorm(c.decoder.norm_eps, name="kv_norm")(pred)
            if self.impl == "words":
                if self.is_initializing():  # the query only enters a one-key softmax
                    RMSNorm(c.decoder.norm_eps, name="query_norm")(x)
                attn = WordCrossAttention(c, c.decoder, x.shape[-1], name="cross_attention")
                x = x + attn.to_bytes(x, kv, ctx["word_ids"])
            else:
                q = RMSNorm(c.decoder.norm_eps, name="query_norm")(x)
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
    impl: ConnectorImpl = "words"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [batch, seq, dec_d]
        pred: jax.Array | None,  # [batch, words, backbone_d]
        ctx: dict,
        mode: Mode = "train",
        cache_len: int | None = None,
        word_values: dict[str, jax.Array] | None = None,  # HAT.decoder_word_values
    ) -> jax.Array:
        c = self.config
        x = x.astype(c.decoder.compute_dtype)
        for i in range(c.decoder.num_layers):
            cross, name = i == 0 or c.cross_attn_every_layer, f"decoder_layers_{i}"
            layer = DecoderLayer(c, cross, mode, cache_len, self.impl, name=name)
            x = layer(x, pred, ctx, None if word_values is None else word_values.get(name))
        return RMSNorm(c.decoder.norm_eps, name="final_norm")(x)


class HAT(nn.Module):
    """``__call__(batch)`` -> byte logits ``[batch, seq, vocab]`` aligned with ``targets``.

    ``connector_impl``: ``"words"`` computes the connectors' cross-attention per word
    (:mod:`arjax.ops.word_attention`, ``O(seq)``); ``"dense"`` as masked attention over the
    whole row (``O(words x seq)``), the reference it is tested against. Same parameters,
    same logits and gradients at every real byte.
    """

    config: HATConfig
    connector_impl: ConnectorImpl = "words"

    def setup(self) -> None:
        c = self.config
        self.embedding = nn.Embed(
            c.vocab_size,
            c.encoder.d_model,
            embedding_init=logical(nn.initializers.normal(1.0), "vocab", "embed"),
        )
        self.encoder = Transformer(c.encoder)
        if self.connector_impl not in CONNECTOR_IMPLS:
            raise ValueError(
                f"HAT: connector_impl must be one of {CONNECTOR_IMPLS}, got {self.connector_impl!r}"
            )
        self.encoder_connector = EncoderConnector(c, self.connector_impl)
        self.backbone = Transformer(c.backbone)
        self.decoder = Decoder(c, self.connector_impl)
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

    def decoder_word_values(self, pred: jax.Array) -> dict[str, jax.Array]:
        """Each cross-attention layer's output per word (``connector_impl="words"``): layer
        name -> ``[batch, words, dec_d]`` for ``pred`` ``[batch, words, backbone_d]``. A byte
        needs only its word's (:meth:`WordCrossAttention.values`), so decoding computes them
        once per word and passes them to :meth:`decode_bytes` for every byte of the word."""
        c = self.config
        params = self.variables["params"]["decoder"]
        # unbound modules (parent=None) applied to the layers' params: the same maths as theirs
        attn = WordCrossAttention(c, c.decoder, c.decoder.d_model, parent=None)
        norm = RMSNorm(c.decoder.norm_eps, parent=None)
        return {
            name: attn.apply(
                {"params": layer["cross_attention"]},
                norm.apply({"params": layer["kv_norm"]}, pred),
                method="values",
            )
            for name, layer in params.items()
            if "cross_attention" in layer
        }

    def decode_bytes(
        self,
        byte_acts: jax.Array,  # [batch, seq, enc_d]
        pred: jax.Array | None,  # [batch, words, backbone_d]
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
        word_values: dict[str, jax.Array] | None = None,
    ) -> jax.Array:
        """Decoder + final norm + head: float32 logits ``[batch, seq, vocab]``. With
        ``word_values`` (:meth:`decoder_word_values` of the words) ``pred`` is not used."""
        ctx = dict(
            positions=positions,
            segment_ids=segment_ids,
            cache_index=cache_index,
            kv_visible=kv_visible,
            word_ids=word_ids,
            word_positions=word_positions,
            word_slots=word_slots,
        )
        h = self.decoder(byte_acts, pred, ctx, mode, cache_len, word_values)
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


register_model(
    ModelSpec("hat", HATConfig, HAT, PRESETS, data="words", decoder="arjax.generate.hat:HATDecoder")
)
