"""Pure functional ops (no parameters): each has a float32 reference beside its fast forms."""

from arjax.ops.attention import attention, attention_mask, attention_reference

__all__ = ["attention", "attention_mask", "attention_reference"]
