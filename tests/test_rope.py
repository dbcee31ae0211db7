"""RoPE frequencies with Llama 3.1 scaling against a plain per-frequency formula."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from arjax.config import ConfigError, apply_overrides
from arjax.models.hat import PRESETS
from arjax.nn import RopeScaling, apply_rope, rope_frequencies


def plain_llama3(head_dim: int, theta: float, s: RopeScaling) -> list[float]:
    """Meta's Llama 3.1 rule, one frequency at a time, in float64."""
    out = []
    for i in range(0, head_dim, 2):
        f = theta ** (-i / head_dim)
        wavelength = 2 * math.pi / f
        if wavelength < s.original_max_position_embeddings / s.high_freq_factor:
            out.append(f)
        elif wavelength > s.original_max_position_embeddings / s.low_freq_factor:
            out.append(f / s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelength - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            out.append((1 - smooth) * f / s.factor + smooth * f)
    return out


@pytest.mark.parametrize(
    "head_dim, theta, scaling",
    [
        (128, 500_000.0, RopeScaling(8.0, 1.0, 4.0, 8192)),  # Llama 3.1 8B backbone
        (12, 500_000.0, RopeScaling(8.0, 1.0, 4.0, 32)),
        (64, 10_000.0, RopeScaling(4.0, 2.0, 8.0, 256)),
    ],
)
def test_scaled_frequencies_match_the_plain_formula(head_dim, theta, scaling):
    got = np.asarray(rope_frequencies(head_dim, theta, scaling))
    want = np.asarray(plain_llama3(head_dim, theta, scaling))
    np.testing.assert_allclose(got, want, rtol=2e-6)
    unscaled = np.asarray(rope_frequencies(head_dim, theta))
    changed = ~np.isclose(got, unscaled, rtol=1e-6)
    assert changed.any() and not changed.all()  # low frequencies scaled, high ones kept


def test_default_scaling_changes_nothing_and_apply_rope_uses_it():
    d, theta = 16, 1000.0
    s = RopeScaling(8.0, 1.0, 4.0, 16)
    assert np.array_equal(rope_frequencies(d, theta, RopeScaling()), rope_frequencies(d, theta))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 5, 2, d)), jnp.float32)
    pos = jnp.arange(5)[None] * 7
    angle = np.asarray(pos[0])[:, None] * np.asarray(plain_llama3(d, theta, s))[None]
    x1, x2 = np.split(np.asarray(x[0]), 2, axis=-1)
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    want = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    np.testing.assert_allclose(np.asarray(apply_rope(x, pos, theta, s))[0], want, atol=1e-5)


def test_rope_scaling_is_a_config_section():
    cfg = apply_overrides(
        PRESETS["tiny"],
        [
            "backbone.rope_scaling.factor=8",
            "backbone.rope_scaling.original_max_position_embeddings=64",
        ],
    )
    assert cfg.backbone.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64)
    with pytest.raises(ConfigError, match="rope_scaling.factor"):
        apply_overrides(PRESETS["tiny"], ["backbone.rope_scaling.factor=0.5"])
