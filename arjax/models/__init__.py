"""Model families. Importing this package registers every family (each from its own module,
see :mod:`arjax.models.registry`)."""

from __future__ import annotations

from arjax.models import axial, block_transformer, hat, linear_lm, transformer  # noqa: F401
from arjax.models.registry import (
    MODELS,
    ModelSpec,
    build_model,
    get_model_spec,
    register_model,
    spec_for_module,
)
from arjax.models.transformer import TransformerLM, TransformerLMConfig

__all__ = [
    "MODELS",
    "ModelSpec",
    "TransformerLM",
    "TransformerLMConfig",
    "build_model",
    "get_model_spec",
    "register_model",
    "spec_for_module",
]
