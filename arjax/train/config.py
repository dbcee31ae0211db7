"""Run configuration: model + data + optimisation + mesh, with named presets.

``make_run_config("transformer", "tiny", ["train.steps=50"])`` is what ``arjax train
--model transformer --preset tiny --set train.steps=50`` builds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from arjax.config import ConfigError, apply_overrides, check, check_field_types, check_positive
from arjax.data.pipeline import DataConfig
from arjax.data.vocab import VOCAB_SIZE
from arjax.models import get_model_spec
from arjax.train.sharding import MeshConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping. ``steps`` is the run length in optimizer steps."""

    steps: int = 300
    learning_rate: float = 2e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    save_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    max_bad_steps: int = 10
    sample_prompt: str = "ROMEO.\n"
    sample_bytes: int = 160
    progress: bool = True

    def __post_init__(self) -> None:
        check_field_types(self)
        check_positive(self, "steps", "grad_accum", "log_every", "eval_every", "save_every")
        check_positive(self, "keep_checkpoints", "max_bad_steps")
        check(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(
            0 <= self.min_lr_ratio <= 1,
            "min_lr_ratio",
            f"must be in [0, 1], got {self.min_lr_ratio}",
        )
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(0 <= self.b1 < 1, "b1", f"must be in [0, 1), got {self.b1}")
        check(0 <= self.b2 < 1, "b2", f"must be in [0, 1), got {self.b2}")
        check(self.clip_norm > 0, "clip_norm", f"must be > 0, got {self.clip_norm}")
        check(self.sample_bytes >= 0, "sample_bytes", f"must be >= 0, got {self.sample_bytes}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one ``arjax train`` run needs; ``model`` is the family's config class."""

    model_name: str
    model: Any
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self) -> None:
        check_field_types(self)
        spec = get_model_spec(self.model_name)
        check(
            isinstance(self.model, spec.config_cls),
            "model",
            f"{self.model_name!r} needs a {spec.config_cls.__name__}",
        )
        max_len = getattr(self.model, "max_seq_len", None)
        if spec.data == "text" and max_len is not None:
            check(
                self.data.seq_len <= max_len,
                "data.seq_len",
                f"{self.data.seq_len} exceeds model.max_seq_len={max_len}",
            )
        check(
            self.data.batch_size % self.train.grad_accum == 0,
            "train.grad_accum",
            f"must divide data.batch_size={self.data.batch_size}, got {self.train.grad_accum}",
        )


# Data/optimisation defaults that go with a model preset name.
RUN_PRESETS: dict[str, tuple[DataConfig, TrainConfig]] = {
    "tiny": (DataConfig(seq_len=256, batch_size=16), TrainConfig(steps=400, learning_rate=3e-3)),
    "small": (
        DataConfig(seq_len=1024, batch_size=32),
        TrainConfig(steps=5000, learning_rate=1e-3, warmup_steps=200, eval_every=500),
    ),
}


def make_run_config(model_name: str, preset: str, overrides: list[str] | None = None) -> RunConfig:
    """Config for ``--model``/``--preset``/``--set`` (unknown preset or key: ConfigError)."""
    spec = get_model_spec(model_name)
    if preset not in spec.presets:
        raise ConfigError(
            f"preset: {preset!r} is not a preset of {model_name!r} "
            f"(known: {', '.join(spec.presets)})"
        )
    data, train = RUN_PRESETS.get(preset, (DataConfig(), TrainConfig()))
    cfg = apply_overrides(RunConfig(model_name, spec.presets[preset], data, train), overrides or [])
    return with_tokenizer_vocab(cfg)


def with_tokenizer_vocab(cfg: RunConfig) -> RunConfig:
    """With ``data.tokenizer`` set and ``model.vocab_size`` left at the byte vocabulary, the
    model takes the tokenizer's vocabulary size (any other mismatch is reported by the data
    builder)."""
    if cfg.data.tokenizer is None or getattr(cfg.model, "vocab_size", None) != VOCAB_SIZE:
        return cfg
    from arjax.data.bpe import load_tokenizer

    size = load_tokenizer(cfg.data.tokenizer).vocab_size
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=size))
