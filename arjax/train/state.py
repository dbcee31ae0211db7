"""Training state: one pytree holding everything a resumed run needs on device."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
    """``step`` [] int32, ``params`` (fp32 master weights), ``opt_state`` (optax), ``rng`` key.

    ``skipped`` counts steps dropped for non-finite loss/gradients, and ``bad_streak``
    the current run of consecutive dropped steps.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    skipped: jax.Array
    bad_streak: jax.Array
