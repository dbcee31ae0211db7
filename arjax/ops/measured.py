"""Look-ups into the measured ``impl="auto"`` table (:mod:`arjax.ops.auto_table`)."""

from __future__ import annotations

import math
from collections.abc import Collection

import jax

from arjax.ops import auto_table

_HOPPER = ("H100", "H200", "H800", "GH200")


def device_family(device_kind: str) -> str:
    """``"hopper"`` for H100/H200-class GPUs, else the lower-cased ``device_kind``."""
    return "hopper" if any(name in device_kind for name in _HOPPER) else device_kind.lower()


def measured_choice(
    table: dict, device_kind: str, shape_class: tuple, seq_len: int, mode: str = "fwd+bwd"
) -> str | None:
    """The implementation measured fastest in ``table`` (``auto_table.ATTENTION`` or
    ``auto_table.SCAN``, keyed ``(family, *shape_class, seq_len)``) at the measured length
    nearest ``seq_len`` in octaves; ``None`` where nothing of this class was measured within
    one octave of ``seq_len`` (a kernel tuned for 2k-token training says nothing about a
    5-token prefill)."""
    prefix = (device_family(device_kind), *shape_class)
    octaves = lambda length: abs(math.log2(length / max(seq_len, 1)))  # noqa: E731
    rows = {key[-1]: modes for key, modes in table.items() if key[:-1] == prefix}
    near = [length for length in rows if octaves(length) <= 1]
    if not near:
        return None
    return rows[min(near, key=octaves)].get(mode)


def kernel_unless_measured_slower(
    table: dict, shape_class: tuple, seq_len: int, allowed: Collection[str] = ("xla",)
) -> str:
    """``"pallas"`` (the chunked op's kernel), or the impl measured faster for training near
    ``seq_len`` on this GPU (``auto_table.SCAN`` or ``GATED_DELTA``) where it is one of
    ``allowed`` (those that can run the call; by default ``"xla"``, the op's jnp form)."""
    choice = measured_choice(table, jax.devices()[0].device_kind, shape_class, seq_len)
    return choice if choice in allowed and jax.default_backend() == "gpu" else "pallas"


__all__ = ["auto_table", "device_family", "kernel_unless_measured_slower", "measured_choice"]
