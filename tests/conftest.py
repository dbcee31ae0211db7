"""Shared test fixtures: small configs and deterministic random inputs."""

from __future__ import annotations

import os

# The Mosaic GPU interpreter (tests/test_flash_attention_mosaic.py) runs a kernel's warpgroups as
# threads that block inside XLA host callbacks; with XLA's CPU thread pool sized to a 2-core
# machine they can starve each other (a hang). NPROC sizes that pool; it must be set before the
# CPU client is created.
os.environ.setdefault("NPROC", "8")
# glibc would give each of the larger pool's threads its own malloc arena, and the resident set
# would creep (tests/reliability/test_long_run.py): cap the arenas (M_ARENA_MAX = -8).
try:
    import ctypes

    ctypes.CDLL(None).mallopt(-8, 2)
except (OSError, AttributeError):  # not glibc
    pass

import jax  # noqa: E402
import numpy as np
import pytest

# Tests compare against float32 references: keep matmuls exact on CPU.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def rng() -> np.random.Generator:
    """Fresh random inputs per test (seeded by the test id for reproducibility)."""
    seed = abs(hash(os.environ.get("PYTEST_CURRENT_TEST", ""))) % (2**32)
    return np.random.default_rng(seed)
