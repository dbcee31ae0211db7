"""Config plumbing: typed fields, --set overrides, JSON round trip, every family's presets."""

from __future__ import annotations

import dataclasses

import pytest

from arjax.config import ConfigError, apply_overrides, from_dict, to_dict
from arjax.models import MODELS
from arjax.nn.linear_attention import GLAConfig, mixer_config
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
    base = make_run_config("based", "tiny")
    cfg = make_run_config("based", "tiny", ["model.mixer.window=16"])
    assert base.model.mixer.window != 16
    # only the one field changed, in the mixer and nowhere else
    assert cfg.model.mixer == dataclasses.replace(base.model.mixer, window=16)
    assert cfg.model == dataclasses.replace(base.model, mixer=cfg.model.mixer)
    assert (cfg.data, cfg.train, cfg.mesh) == (base.data, base.train, base.mesh)


def test_mixer_kind_switches_config_class_keeping_shared_fields():
    base = make_run_config("based", "tiny")
    cfg = make_run_config("based", "tiny", ["model.mixer.kind=gla", "model.mixer.gate_rank=4"])
    assert cfg.model.mixer == GLAConfig(chunk_size=base.model.mixer.chunk_size, gate_rank=4)
    restored = from_dict(MODELS["based"].config_cls, to_dict(cfg.model))
    assert type(restored.mixer) is GLAConfig and restored == cfg.model


@pytest.mark.parametrize(
    "model, sets, named",
    [
        # attention-only fields of the stack, all named in one error
        ("gla", ["model.window=3", "model.qk_norm=true", "model.num_kv_heads=1",
                 "model.attention_impl=pallas"],
         ["window", "qk_norm", "num_kv_heads", "attention_impl"]),
        ("retnet", ["model.rope_theta=500"], ["rope_theta"]),
        # another kind's mixer fields
        ("gla", ["model.mixer.window=3", "model.mixer.feature_dim=2"],
         ["model.mixer.window", "model.mixer.feature_dim"]),
        ("aaren", ["model.mixer.chunk_size=8"], ["model.mixer.chunk_size"]),
        ("transformer", ["model.mixer.gate_rank=8"], ["model.mixer.gate_rank"]),
        ("based", ["model.mixer.kind=retnet", "model.mixer.feature_dim=8"],
         ["model.mixer.feature_dim"]),
    ],
)  # fmt: skip
def test_fields_the_model_does_not_use_are_rejected_naming_them(model, sets, named):
    with pytest.raises(ConfigError) as err:
        make_run_config(model, "tiny", sets)
    message = str(err.value)
    assert all(name in message for name in named), message
    # the same fields are accepted where they are used
    if model == "gla" and named[0] == "window":
        assert make_run_config("transformer", "tiny", sets).model.window == 3
    with pytest.raises(ConfigError, match="does not use window"):
        mixer_config("gla", window=3)
    assert make_run_config("based", "tiny", ["model.rope_theta=500"]).model.rope_theta == 500
