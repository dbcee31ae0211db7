"""The pure training step and evaluation step.

``train_step(state, batch) -> (state, metrics)``: masked next-token cross-entropy
(chunked over the output projection when the model config sets ``loss_chunk``),
gradient accumulation over micro-batches (``lax.scan``), AdamW update, and a guard that
drops a step whose loss or gradients are not finite (params/optimizer state unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from einops import rearrange

from arjax.ops.cross_entropy import chunked_cross_entropy, cross_entropy
from arjax.train.state import TrainState

LN2 = math.log(2.0)


def loss_fn(
    model: nn.Module, params: Any, batch: dict, *, train: bool = True
) -> tuple[jax.Array, jax.Array]:
    """(summed nats, predicted-token count) of ``model`` on ``batch``.

    A model whose config sets ``loss_chunk`` is scored by :func:`chunked_cross_entropy` on
    its ``head(batch)`` (hidden, head weight): the whole logits never materialise.
    """
    variables = {"params": params}
    chunk = getattr(model.config, "loss_chunk", None)
    if chunk is None:
        logits = model.apply(variables, batch, train=train)
        return cross_entropy(logits, batch["targets"], batch["loss_mask"])
    hidden, weight = model.apply(variables, batch, train=train, method="head")
    return chunked_cross_entropy(
        hidden, weight, batch["targets"], batch["loss_mask"], chunk_size=chunk
    )


def target_bytes(batch: dict, count: jax.Array) -> jax.Array:
    """UTF-8 bytes the batch's targets stand for: ``sum(target_bytes * loss_mask)`` for token
    batches (:mod:`arjax.data.bpe`), else ``count`` (one byte per target); at least 1."""
    if "target_bytes" not in batch:
        return jnp.maximum(count, 1.0)
    nbytes = jnp.sum(batch["target_bytes"] * batch["loss_mask"]).astype(jnp.float32)
    return jnp.maximum(nbytes, 1.0)


def make_train_step(
    model: nn.Module, tx: optax.GradientTransformation, grad_accum: int = 1
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Build ``train_step(state, batch)``; jit it with the caller's shardings."""

    def grads_of(params: Any, batch: dict) -> tuple[jax.Array, jax.Array, Any]:
        def mean_loss(p, b):
            total, count = loss_fn(model, p, b)
            return total / jnp.maximum(count, 1.0), (total, count)

        (_, (total, count)), grads = jax.value_and_grad(mean_loss, has_aux=True)(params, batch)
        # Scale back to a sum so micro-batches of different token counts weigh correctly.
        grads = jax.tree.map(lambda g: g * jnp.maximum(count, 1.0), grads)
        return total, count, grads

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        if grad_accum == 1:
            total, count, grads = grads_of(state.params, batch)
        else:
            micro = jax.tree.map(
                lambda x: rearrange(x, "(m b) ... -> m b ...", m=grad_accum), batch
            )

            def body(carry, mb):
                t, c, g = grads_of(state.params, mb)
                return (carry[0] + t, carry[1] + c, jax.tree.map(jnp.add, carry[2], g)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (total, count, grads), _ = jax.lax.scan(body, (0.0, 0.0, zeros), micro)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = total / denom
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        new_state = state.replace(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt, state.opt_state),
            skipped=state.skipped + (~ok).astype(jnp.int32),
            bad_streak=jnp.where(ok, 0, state.bad_streak + 1),
        )
        metrics = {
            "loss": loss,
            "bits_per_byte": total / target_bytes(batch, count) / LN2,
            "grad_norm": grad_norm,
            "tokens": count,
            "skipped": new_state.skipped,
            "bad_streak": new_state.bad_streak,
        }
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module) -> Callable[[Any, dict], tuple[jax.Array, jax.Array]]:
    """``eval_step(params, batch) -> (summed nats, token count)``."""

    def eval_step(params: Any, batch: dict) -> tuple[jax.Array, jax.Array]:
        return loss_fn(model, params, batch, train=False)

    return eval_step


def init_train_state(
    model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array, example_batch: dict
) -> TrainState:
    """A fresh (boxed, logically partitioned) state; unbox with ``nn.meta.unbox``."""
    init_rng, state_rng = jax.random.split(rng)
    params = model.init(init_rng, example_batch)["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=state_rng,
        skipped=jnp.zeros((), jnp.int32),
        bad_streak=jnp.zeros((), jnp.int32),
    )
