"""Shared test fixtures: small configs and deterministic random inputs."""

from __future__ import annotations

import os

# The Mosaic GPU interpreter (tests/test_flash_attention_mosaic.py) runs a kernel's warpgroups as
# threads that block inside XLA host callbacks; with XLA's CPU thread pool sized to a 2-core
# machine they can starve each other (a hang). NPROC sizes that pool; it must be set before the
# CPU client is created.
os.environ.setdefault("NPROC", "8")

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
