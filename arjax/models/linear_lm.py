"""Byte-level linear-attention LMs: the transformer LM with a linear token mixer.

``mixer.kind`` picks BASED (Arora et al. 2024), GLA (Yang et al. 2024), RetNet-style
fixed decay (Sun et al. 2023), Aaren (Feng et al. 2024), Gated DeltaNet (Yang, Kautz,
Hatamizadeh 2025) or DeltaNet (Yang et al. 2024); everything else (embedding,
pre-norm blocks, SwiGLU, tied head, prefill / decode) is :class:`TransformerLM`'s. The
recurrent state replaces the KV cache, so decoding memory is constant in the context length
(see :mod:`arjax.generate.lm`).
"""

from __future__ import annotations

import dataclasses

from arjax.config import check, switch_kind
from arjax.models.registry import ModelSpec, register_model
from arjax.models.transformer import TransformerLM, TransformerLMConfig
from arjax.nn.linear_attention import MIXER_CONFIGS, BasedConfig, MixerConfig

LINEAR_MIXERS = ("based", "gla", "retnet", "aaren", "gdn", "deltanet")
DELTA_MIXERS = ("gdn", "deltanet")


@dataclasses.dataclass(frozen=True)
class LinearLMConfig(TransformerLMConfig):
    """:class:`TransformerLMConfig` whose ``mixer`` is a linear-attention mixer."""

    mixer: MixerConfig = BasedConfig()

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            self.mixer.kind in LINEAR_MIXERS,
            "mixer.kind",
            f"must be one of {list(LINEAR_MIXERS)}, got {self.mixer.kind!r}",
        )

    def _mixer_matmul_params(self) -> int:
        """Projection weights of one mixer."""
        m, d, hd = self.mixer, self.d_model, self.num_heads * self.head_dim
        if m.kind == "based":
            linear = 2 * d * self.num_heads * m.feature_dim + 2 * d * hd
            return linear + 4 * d * hd  # + sliding-window attention q, k, v, o
        if m.kind == "aaren":
            return 3 * d * hd
        if m.kind in DELTA_MIXERS:  # q, k, v, output gate, o; beta (and the decay's) per head
            return 5 * d * hd + d * self.num_heads * (2 if m.kind == "gdn" else 1)
        gate = m.gate_rank * (d + hd) if m.kind == "gla" else 0
        return 5 * d * hd + gate  # q, k, v, output gate, o

    def _state_flops(self, context: int) -> float:
        """Per token per layer: state read + update (chunked form about doubles the reads)."""
        m, h, hd = self.mixer, self.num_heads, self.head_dim
        if m.kind == "based":
            feat = 1 + m.feature_dim + m.feature_dim**2
            return 4.0 * h * feat * (hd + 1) + 4.0 * h * hd * min(context, m.window)
        if m.kind == "aaren":
            return 4.0 * h * hd
        if m.kind in DELTA_MIXERS:  # S^T k, the rank-1 update, S^T q
            return 6.0 * h * hd * hd
        return 4.0 * h * hd * hd

    def num_params(self) -> int:
        m, d = self.mixer, self.d_model
        hd = self.num_heads * self.head_dim
        if m.kind == "based":  # conv kernel
            extras = m.conv_size * d
        elif m.kind == "aaren":  # learned query
            extras = hd
        elif m.kind in DELTA_MIXERS:  # q/k/v conv kernels, per-head output norm (+ A_log, dt_bias)
            extras = 3 * m.conv_size * hd + self.head_dim
            extras += 2 * self.num_heads if m.kind == "gdn" else 0
        else:  # per-head output norm
            extras = self.head_dim
        layer = self._mixer_matmul_params() + extras + 3 * d * self.mlp_dim + 2 * d
        if m.kind == "gla":
            layer += self.num_heads * self.head_dim  # gate bias
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + d + embed

    def flops_per_token(self, context: int) -> float:
        matmul = self.num_layers * (self._mixer_matmul_params() + 3 * self.d_model * self.mlp_dim)
        state = self.num_layers * self._state_flops(context)
        return 2.0 * matmul + state + 2.0 * self.vocab_size * self.d_model


class LinearLM(TransformerLM):
    """:class:`TransformerLM` configured by a :class:`LinearLMConfig`."""

    config: LinearLMConfig


# BASED presets; presets_for(kind) swaps the mixer.
_TINY = LinearLMConfig(
    d_model=128, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=32, mlp_dim=384,
    max_seq_len=256, dtype="float32",
    mixer=BasedConfig(feature_dim=8, window=32, chunk_size=32),
)  # fmt: skip
_SMALL = LinearLMConfig(
    d_model=512, num_layers=8, num_heads=8, num_kv_heads=8, head_dim=64, mlp_dim=1536,
    max_seq_len=1024, mixer=BasedConfig(feature_dim=16, window=64),
)  # fmt: skip


def presets_for(kind: str) -> dict[str, LinearLMConfig]:
    """``tiny`` and ``small`` presets with mixer ``kind`` (keeping the fields it shares with
    BASED's, e.g. ``chunk_size``)."""
    with_kind = lambda c: dataclasses.replace(c, mixer=switch_kind(c.mixer, MIXER_CONFIGS[kind]))  # noqa: E731
    return {"tiny": with_kind(_TINY), "small": with_kind(_SMALL)}


PRESETS: dict[str, LinearLMConfig] = presets_for("based")

for _kind in LINEAR_MIXERS:  # one family per mixer, sharing the module and decoder
    register_model(
        ModelSpec(
            _kind, LinearLMConfig, LinearLM, presets_for(_kind), data="text",
            decoder="arjax.generate.lm:LMDecoder",
        )
    )  # fmt: skip
