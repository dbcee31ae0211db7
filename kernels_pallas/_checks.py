"""Input checks shared by the recurrent-state kernels (linear-attention scan, gated delta)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_state_and_segments(
    who: str,
    initial_state: jax.Array | None,
    segment_ids: jax.Array | None,
    want_state: tuple[int, int, int, int],  # [batch, heads, dk, dv]
    want_segments: tuple[int, int],  # [batch, len]
) -> None:
    """``ValueError`` naming ``who`` unless the state is float32 ``want_state`` and the
    document ids are integer ``want_segments`` (each may be None)."""
    if initial_state is not None and (
        initial_state.shape != want_state or initial_state.dtype != jnp.float32
    ):
        raise ValueError(
            f"{who}: initial_state must be float32 {want_state}, "
            f"got {initial_state.dtype} {initial_state.shape}"
        )
    if segment_ids is not None and (
        segment_ids.shape != want_segments or not jnp.issubdtype(segment_ids.dtype, jnp.integer)
    ):
        raise ValueError(
            f"{who}: segment_ids must be integer [batch, len]={want_segments}, "
            f"got {segment_ids.dtype} {segment_ids.shape}"
        )
