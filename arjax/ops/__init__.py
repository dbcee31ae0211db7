"""Pure functional ops (no parameters): each has a float32 reference beside its fast forms."""

from arjax.ops.aaren import AarenState, aaren, aaren_init_state, aaren_reference, aaren_step
from arjax.ops.attention import attention, attention_mask, attention_reference, decode_attention
from arjax.ops.axial import axial_attention, axial_attention_reference, fold_axis
from arjax.ops.cross_entropy import (
    chunked_cross_entropy,
    cross_entropy,
    cross_entropy_reference,
)
from arjax.ops.gated_delta_rule import (
    gated_delta_rule,
    gated_delta_rule_reference,
    gated_delta_step,
)
from arjax.ops.linear_attention import (
    linear_attention,
    linear_attention_reference,
    linear_attention_step,
)

__all__ = [
    "AarenState",
    "aaren",
    "aaren_init_state",
    "aaren_reference",
    "aaren_step",
    "attention",
    "attention_mask",
    "attention_reference",
    "decode_attention",
    "axial_attention",
    "axial_attention_reference",
    "fold_axis",
    "gated_delta_rule",
    "gated_delta_rule_reference",
    "gated_delta_step",
    "chunked_cross_entropy",
    "cross_entropy",
    "cross_entropy_reference",
    "linear_attention",
    "linear_attention_reference",
    "linear_attention_step",
]
