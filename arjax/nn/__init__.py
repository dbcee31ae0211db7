"""Flax Linen layers built on :mod:`arjax.ops`."""

from arjax.nn.layers import Attention, RMSNorm, RopeScaling, SwiGLU, apply_rope, rope_frequencies
from arjax.nn.partitioning import constrain, logical
from arjax.nn.transformer import (
    Block,
    Transformer,
    TransformerConfig,
    cast_weights,
    inputs_last,
    unrolled,
)

__all__ = [
    "Attention",
    "Block",
    "RMSNorm",
    "RopeScaling",
    "SwiGLU",
    "Transformer",
    "TransformerConfig",
    "apply_rope",
    "cast_weights",
    "constrain",
    "inputs_last",
    "logical",
    "rope_frequencies",
    "unrolled",
]
