"""Shared test fixtures: small configs and deterministic random inputs."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

# Tests compare against float32 references: keep matmuls exact on CPU.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def rng() -> np.random.Generator:
    """Fresh random inputs per test (seeded by the test id for reproducibility)."""
    seed = abs(hash(os.environ.get("PYTEST_CURRENT_TEST", ""))) % (2**32)
    return np.random.default_rng(seed)
