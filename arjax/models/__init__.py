"""Model registry: ``--model NAME`` -> config class, module, presets, data pipeline kind."""

from __future__ import annotations

import dataclasses
from typing import Any

from arjax.models.axial import PRESETS as AXIAL_PRESETS
from arjax.models.axial import AxialConfig, AxialTransformer
from arjax.models.block_transformer import PRESETS as BLOCK_PRESETS
from arjax.models.block_transformer import BlockTransformer, BlockTransformerConfig
from arjax.models.hat import HAT, HATConfig
from arjax.models.hat import PRESETS as HAT_PRESETS
from arjax.models.linear_lm import LINEAR_MIXERS, LinearLM, LinearLMConfig, presets_for
from arjax.models.transformer import PRESETS as TRANSFORMER_PRESETS
from arjax.models.transformer import TransformerLM, TransformerLMConfig


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How the CLI and trainer build a model family.

    ``data`` names the batch pipeline: ``"text"`` (packed bytes, :mod:`arjax.data`),
    or a family-specific one registered in :mod:`arjax.train.data`.
    """

    name: str
    config_cls: type
    module_cls: type
    presets: dict[str, Any]
    data: str = "text"


MODELS: dict[str, ModelSpec] = {
    "axial": ModelSpec("axial", AxialConfig, AxialTransformer, AXIAL_PRESETS, data="images"),
    "block": ModelSpec("block", BlockTransformerConfig, BlockTransformer, BLOCK_PRESETS),
    "hat": ModelSpec("hat", HATConfig, HAT, HAT_PRESETS, data="words"),
    "transformer": ModelSpec(
        "transformer", TransformerLMConfig, TransformerLM, TRANSFORMER_PRESETS
    ),
    **{
        kind: ModelSpec(kind, LinearLMConfig, LinearLM, presets_for(kind)) for kind in LINEAR_MIXERS
    },
}


def get_model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def build_model(name: str, config: Any) -> Any:
    """The Flax module for ``config`` (validated against the family's config class)."""
    spec = get_model_spec(name)
    if not isinstance(config, spec.config_cls):
        raise TypeError(f"model {name!r} takes a {spec.config_cls.__name__}, got {type(config)}")
    return spec.module_cls(config)


__all__ = ["MODELS", "ModelSpec", "TransformerLM", "TransformerLMConfig", "build_model"]
