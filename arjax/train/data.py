"""Batch sources per data kind (see :class:`arjax.models.ModelSpec`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from arjax.config import ConfigError
from arjax.data.images import load_images, make_image_eval_batches, make_image_train_iterator
from arjax.data.pipeline import make_eval_batches, make_train_iterator
from arjax.data.vocab import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE
from arjax.data.words import make_word_eval_batches, make_word_train_iterator

# kind -> (run config, process index, process count) -> (train iterator, eval batches).
DataBuilder = Callable[[Any, int, int], tuple[Any, list[dict]]]


def check_vocab(cfg: Any) -> None:
    """Text data fits the model's embedding: byte rows use ids up to ``EOS_ID`` (PAD, BOS,
    EOS beside the 256 bytes), so ``model.vocab_size`` >= ``VOCAB_SIZE`` (an id past the table
    embeds as NaN, it does not fail); ``data.tokenizer`` needs a token-level family whose
    ``model.vocab_size`` matches it."""
    if cfg.data.tokenizer is None:
        have = getattr(cfg.model, "vocab_size", None)
        if have is not None and have < VOCAB_SIZE:
            raise ConfigError(
                f"model.vocab_size: {have}, but arjax's byte data uses {VOCAB_SIZE} ids (256 "
                f"bytes, PAD {PAD_ID}, BOS {BOS_ID}, EOS {EOS_ID}); a {have}-id model (e.g. a "
                f"converted released checkpoint's config) cannot train on it "
                f"(--set model.vocab_size={VOCAB_SIZE})"
            )
        return
    from arjax.data.bpe import load_tokenizer

    size = load_tokenizer(cfg.data.tokenizer).vocab_size
    have = getattr(cfg.model, "vocab_size", None)
    if have is None:
        raise ConfigError(f"data.tokenizer: model {cfg.model_name!r} reads bytes, not tokens")
    if have != size:
        raise ConfigError(
            f"model.vocab_size: {have}, but the tokenizer {cfg.data.tokenizer} has {size} ids "
            f"(--set model.vocab_size={size})"
        )


def _text(cfg: Any, process_index: int, process_count: int) -> tuple[Any, list[dict]]:
    check_vocab(cfg)
    it = make_train_iterator(cfg.data, process_index=process_index, process_count=process_count)
    return it, make_eval_batches(cfg.data)


def _images(cfg: Any, process_index: int, process_count: int) -> tuple[Any, list[dict]]:
    """Image models: ``cfg.model`` names ``dataset``, ``shape`` and ``channels``."""
    if cfg.data.tokenizer is not None:
        raise ConfigError(f"data.tokenizer: model {cfg.model_name!r} reads images, not text")
    m = cfg.model
    train, val = load_images(m.dataset, "train"), load_images(m.dataset, "val")
    if train.shape[1:] != (*m.shape, m.channels):
        raise ConfigError(
            f"model.shape: dataset {m.dataset!r} has images {train.shape[1:-1]} x "
            f"{train.shape[-1]} channels, the model expects {m.shape} x {m.channels}"
        )
    it = make_image_train_iterator(
        train, cfg.data.batch_size, seed=cfg.data.seed,
        process_index=process_index, process_count=process_count,
    )  # fmt: skip
    return it, make_image_eval_batches(val, cfg.data.batch_size, cfg.data.val_batches)


def _words(cfg: Any, process_index: int, process_count: int) -> tuple[Any, list[dict]]:
    """HAT: packed byte rows with word ids; ``cfg.model`` gives ``max_words``/``max_word_bytes``."""
    check_vocab(cfg)
    m = cfg.model
    if cfg.data.seq_len > m.max_seq_len:
        raise ConfigError(
            f"data.seq_len: {cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}"
        )
    sizes = dict(max_words=m.max_words, max_word_bytes=m.max_word_bytes)
    it = make_word_train_iterator(
        cfg.data, **sizes, process_index=process_index, process_count=process_count
    )
    return it, make_word_eval_batches(cfg.data, **sizes)


DATA_BUILDERS: dict[str, DataBuilder] = {"text": _text, "images": _images, "words": _words}


def make_data(cfg: Any, process_index: int = 0, process_count: int = 1) -> tuple[Any, list[dict]]:
    """Train iterator (``next``, ``get_state``, ``set_state``) and eval batches for ``cfg``."""
    from arjax.models import get_model_spec

    kind = get_model_spec(cfg.model_name).data
    if kind not in DATA_BUILDERS:
        raise ValueError(f"no data pipeline registered for kind {kind!r}")
    return DATA_BUILDERS[kind](cfg, process_index, process_count)


def example_batch_for(model_name: str, model_cfg: Any, batch: int, seq: int) -> dict:
    """One real validation batch of ``batch`` rows x ``seq`` positions for any family
    (benchmarks and AOT compilation; image families ignore ``seq``)."""
    import dataclasses

    from arjax.data.pipeline import DataConfig
    from arjax.models import get_model_spec
    from arjax.train.config import RunConfig, TrainConfig

    spec = get_model_spec(model_name)
    data = DataConfig(seq_len=seq, batch_size=batch, val_batches=1)
    if spec.data != "images" and hasattr(model_cfg, "max_seq_len"):
        model_cfg = dataclasses.replace(model_cfg, max_seq_len=max(seq, model_cfg.max_seq_len))
    cfg = RunConfig(model_name, model_cfg, data, TrainConfig(grad_accum=1))
    return make_data(cfg)[1][0]
