"""Config plumbing: typed fields, --set overrides, JSON round trip, every family's presets."""

from __future__ import annotations

import dataclasses

import pytest

from arjax.config import ConfigError, apply_overrides, from_dict, to_dict
from arjax.models import MODELS
from arjax.train.config import RunConfig, TrainConfig, make_run_config
from arjax.train.sharding import MeshConfig


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: TrainConfig(learning_rate="3e-4"), "learning_rate: must be of type"),
        (lambda: TrainConfig(progress="yes"), "progress: must be of type"),
        (lambda: TrainConfig(steps=10.0), "steps: must be of type"),
        (lambda: MeshConfig(fsdp=2.0), "fsdp: must be of type"),
        (lambda: MeshConfig(coordinator=None), "coordinator: must be of type"),
    ],
)
def test_field_types_are_checked(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_family_presets_round_trip_through_json(name):
    for preset in ("tiny", "small"):
        cfg = make_run_config(name, preset)
        spec = MODELS[name]
        model = from_dict(spec.config_cls, to_dict(cfg.model))
        assert model == cfg.model
        rebuilt = RunConfig(name, model, cfg.data, cfg.train, cfg.mesh)
        assert to_dict(rebuilt) == to_dict(cfg)


def test_overrides_apply_together_then_validate():
    cfg = make_run_config("transformer", "tiny")
    # Each alone would fail the cross-field check; together they are valid.
    new = apply_overrides(cfg, ["model.max_seq_len=512", "data.seq_len=512"])
    assert (new.model.max_seq_len, new.data.seq_len) == (512, 512)
    assert new.train == cfg.train
    with pytest.raises(ConfigError, match="model.window: must be None or a positive int"):
        apply_overrides(cfg, ["model.window=-3"])
    assert apply_overrides(cfg, ["model.window=none"]).model.window is None
    with pytest.raises(ConfigError, match="model: is a section"):
        apply_overrides(cfg, ["model=3"])


def test_nested_section_override():
    cfg = make_run_config("based", "tiny", ["model.mixer.window=16"])
    assert cfg.model.mixer.window == 16
    assert dataclasses.replace(cfg.model.mixer, window=cfg.model.mixer.window) == cfg.model.mixer
