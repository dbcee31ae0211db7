"""Flax Linen layers built on :mod:`arjax.ops`."""

from arjax.nn.layers import Attention, RMSNorm, SwiGLU, apply_rope
from arjax.nn.partitioning import constrain, logical
from arjax.nn.transformer import Block, Transformer, TransformerConfig, unrolled

__all__ = [
    "Attention",
    "Block",
    "RMSNorm",
    "SwiGLU",
    "Transformer",
    "TransformerConfig",
    "apply_rope",
    "constrain",
    "logical",
    "unrolled",
]
