"""Model registry: one registration per family, made from the family's own module.

``register_model(ModelSpec(...))`` at the bottom of ``arjax/models/<family>.py`` is all a new
family adds: the ``--model`` name, its config class, Flax module, presets, the batch kind its
data pipeline builds (``"text"``, ``"words"``, ``"images"``: builders per kind live in
:mod:`arjax.train.data`) and its decoder, named as ``"module:Class"`` so that models never
import :mod:`arjax.generate` (the decoder module imports the model; see DESIGN.md).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

DATA_KINDS = ("text", "words", "images")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How the CLI, the trainer and the generation engine build and run a model family.

    ``data``: the batch kind (DESIGN.md "Text batch format" and "Batch formats").
    ``decoder``: ``"package.module:Class"`` of its :class:`arjax.generate.engine.Decoder`.
    """

    name: str
    config_cls: type
    module_cls: type
    presets: dict[str, Any]
    data: str
    decoder: str

    def __post_init__(self) -> None:
        if self.data not in DATA_KINDS:
            raise ValueError(f"ModelSpec {self.name!r}: data must be one of {DATA_KINDS}")
        if ":" not in self.decoder:
            raise ValueError(
                f"ModelSpec {self.name!r}: decoder must be 'module:Class', got {self.decoder!r}"
            )

    def decoder_cls(self) -> type:
        """The decoder class (imported on first use)."""
        module, name = self.decoder.split(":")
        return getattr(importlib.import_module(module), name)


MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add a family under ``spec.name``; a second registration of the name is an error."""
    if spec.name in MODELS:
        raise ValueError(f"model {spec.name!r} is registered twice")
    MODELS[spec.name] = spec
    return spec


def get_model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def spec_for_module(model: Any) -> ModelSpec:
    """The spec whose module class is ``type(model)`` (families sharing a class share a
    decoder, so the first match is as good as any)."""
    for spec in MODELS.values():
        if type(model) is spec.module_cls:
            return spec
    raise ValueError(f"no registered model family has module class {type(model).__name__}")


def build_model(name: str, config: Any) -> Any:
    """The Flax module for ``config`` (validated against the family's config class)."""
    spec = get_model_spec(name)
    if not isinstance(config, spec.config_cls):
        raise TypeError(f"model {name!r} takes a {spec.config_cls.__name__}, got {type(config)}")
    return spec.module_cls(config)
