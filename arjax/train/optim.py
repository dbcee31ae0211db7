"""AdamW with linear warmup + cosine decay and global-norm clipping (Loshchilov & Hutter 2019)."""

from __future__ import annotations

from typing import Any

import jax
import optax


def learning_rate_schedule(cfg: Any) -> optax.Schedule:
    """Linear warmup to ``learning_rate`` then cosine to ``min_lr_ratio * learning_rate``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices only (not norms' scales or other vectors)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: Any) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(
            learning_rate_schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=1e-8,
            weight_decay=cfg.weight_decay,
            mask=_decay_mask,
        ),
    )
