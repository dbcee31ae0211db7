"""Gated delta rule: naive recurrence == chunked (WY / UT transform) == recurrent, values and
gradients, with ragged lengths, an initial state and packed documents; the decode step
continues a prefix exactly.

Tolerances: float32 forms agree to atol=rtol=1e-4 (the chunked form reassociates sums of
O(1) terms and solves a unit-triangular system per chunk); gradients to 2e-4. Each check was
seen to fail with the code broken on purpose (the chunked form without its ``W S`` term, a
wrong sign in the step's delta, the document masks dropped, the decay applied after the
update).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arjax.ops import gated_delta_rule, gated_delta_rule_reference, gated_delta_step

TOL = dict(atol=1e-4, rtol=1e-4)
gdr = jax.jit(gated_delta_rule, static_argnames=("form", "chunk_size", "impl"))
gdr_ref = jax.jit(gated_delta_rule_reference)
step = jax.jit(gated_delta_step)
B, L, H, DK, DV = 2, 37, 3, 8, 5  # L is not a multiple of any chunk size used
SEGMENTS = np.array([[1] * 10 + [2] * 20 + [3] * 7, [1] * 37], np.int32)  # packed + plain row


def _normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.normal(size=shape).astype(np.float32)


def inputs(rng: np.random.Generator, *, gated: bool, shape=(B, L, H, DK, DV)):
    """Fresh numpy inputs as the layer makes them: unit-norm keys, beta in (0, 1), log decay
    in (-inf, 0)."""
    b, length, h, dk, dv = shape
    q, k, v = (
        _normal(rng, b, length, h, dk),
        _normal(rng, b, length, h, dk),
        _normal(rng, b, length, h, dv),
    )
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    beta = (1.0 / (1.0 + np.exp(-_normal(rng, b, length, h)))).astype(np.float32)
    g = -np.logaddexp(0.0, -(_normal(rng, b, length, h) + 2.0)).astype(np.float32)
    s0 = _normal(rng, b, h, dk, dv)
    return q, k, v, beta, (g if gated else None), s0


@pytest.mark.parametrize("gated", [False, True])
def test_forms_agree_with_initial_state_and_resets(gated, rng):
    q, k, v, beta, g, s0 = inputs(rng, gated=gated)
    args = dict(log_decay=g, initial_state=s0, segment_ids=jnp.asarray(SEGMENTS))
    ref_out, ref_state = gdr_ref(q, k, v, beta, **args)
    for form, chunk in (("chunked", 8), ("chunked", 16), ("chunked", 64), ("recurrent", 8)):
        out, state = gdr(q, k, v, beta, form=form, chunk_size=chunk, impl="xla", **args)
        np.testing.assert_allclose(out, ref_out, **TOL, err_msg=f"{form}/{chunk}")
        np.testing.assert_allclose(state, ref_state, **TOL, err_msg=f"{form}/{chunk}")
    # Resets: row 0's last document alone (no initial state) gives the same final state.
    last = slice(30, 37)
    _, alone = gdr_ref(q[:1, last], k[:1, last], v[:1, last], beta[:1, last],
                       log_decay=None if g is None else g[:1, last])  # fmt: skip
    np.testing.assert_allclose(ref_state[:1], alone, **TOL)


def test_reference_is_the_recurrence_as_written(rng):
    """Two tokens by hand; and with orthonormal keys and beta = 1 the delta rule stores each
    value exactly (a key written twice keeps only its latest value), unlike linear attention."""
    q, k, v, beta, g, s0 = inputs(rng, gated=True, shape=(1, 2, 1, 3, 2))
    out, state = gdr_ref(q, k, v, beta, log_decay=g, initial_state=s0)
    s = s0[0, 0]
    for t in range(2):
        kt, bt = k[0, t, 0], beta[0, t, 0]
        s = np.exp(g[0, t, 0]) * (np.eye(3) - bt * np.outer(kt, kt)) @ s + bt * np.outer(
            kt, v[0, t, 0]
        )
        np.testing.assert_allclose(out[0, t, 0], s.T @ q[0, t, 0], **TOL)
    np.testing.assert_allclose(state[0, 0], s, **TOL)

    eye = np.eye(4, dtype=np.float32)
    keys = eye[[0, 1, 2, 1]][None, :, None]  # key 1 is written twice
    vals = _normal(rng, 1, 4, 1, 3)
    _, state = gdr_ref(eye[[0, 1, 2, 3]][None, :, None], keys, vals, np.ones((1, 4, 1), np.float32))
    np.testing.assert_allclose(state[0, 0, :3], vals[0, [0, 3, 2], 0], **TOL)


@pytest.mark.parametrize("gated", [False, True])
def test_gradients_agree(gated, rng):
    q, k, v, beta, g, s0 = inputs(rng, gated=gated)
    seg = jnp.asarray(SEGMENTS)
    w_out, w_state = _normal(rng, B, L, H, DV), _normal(rng, B, H, DK, DV)
    names = ["q", "k", "v", "beta", "s0"] + (["log_decay"] if gated else [])

    def grads(form):
        def loss(q, k, v, beta, s, g=None):
            out, state = gated_delta_rule(
                q, k, v, beta, log_decay=g, initial_state=s, segment_ids=seg, form=form,
                chunk_size=8, impl="xla",
            )  # fmt: skip
            return jnp.sum(out * w_out) + jnp.sum(state * w_state)

        args = (q, k, v, beta, s0) + ((g,) if gated else ())
        return jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)

    ref = grads("naive")
    for form in ("chunked", "recurrent"):
        for name, a, b in zip(names, grads(form), ref):
            np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-4, err_msg=f"{form} d{name}")


def test_prefix_state_then_steps_equals_whole(rng):
    """Prefill then continue from the returned state == one pass (what decoding relies on)."""
    q, k, v, beta, g, _ = inputs(rng, gated=True)
    whole, final = gdr(q, k, v, beta, log_decay=g, chunk_size=8)
    first, state = gdr(q[:, :20], k[:, :20], v[:, :20], beta[:, :20], log_decay=g[:, :20])
    out = []
    for t in range(20, L):
        o, state = step(q[:, t], k[:, t], v[:, t], beta[:, t], state, log_decay=g[:, t])
        out.append(o)
    np.testing.assert_allclose(jnp.concatenate([first, jnp.stack(out, 1)], 1), whole, **TOL)
    np.testing.assert_allclose(state, final, **TOL)


def test_chunked_is_stable_for_long_strongly_decaying_sequences(rng):
    """exp of the cumulative decay underflows over the row, yet the chunked form stays finite
    and matches the token-by-token recurrence."""
    q, k, v, beta, _, _ = inputs(rng, gated=False, shape=(1, 1024, 1, 4, 4))
    g = (-4.0 / (1.0 + np.exp(-_normal(rng, 1, 1024, 1))) - 1.0).astype(np.float32)
    out, state = gdr(q, k, v, beta, log_decay=g, chunk_size=64)
    rec, rec_state = gdr(q, k, v, beta, log_decay=g, form="recurrent")
    assert bool(jnp.isfinite(out).all())
    np.testing.assert_allclose(out, rec, **TOL)
    np.testing.assert_allclose(state, rec_state, **TOL)


def test_bad_inputs_raise_clear_errors(rng):
    q, k, v, beta, g, s0 = inputs(rng, gated=True)
    with pytest.raises(ValueError, match="gated_delta_rule: beta must be"):
        gated_delta_rule(q, k, v, beta[..., :2])
    with pytest.raises(ValueError, match="gated_delta_rule: log_decay must be"):
        gated_delta_rule(q, k, v, beta, log_decay=g[..., None])
    with pytest.raises(ValueError, match="gated_delta_rule: beta must be floating"):
        gated_delta_rule(q, k, v, beta.astype(np.int32))
    with pytest.raises(ValueError, match="gated_delta_rule: initial_state must be float32"):
        gated_delta_rule(q, k, v, beta, initial_state=s0.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="gated_delta_rule: v must be"):
        gated_delta_rule(q, k, v[:, :3], beta)
    with pytest.raises(ValueError, match="form must be"):
        gated_delta_rule(q, k, v, beta, form="parallel")
    with pytest.raises(ValueError, match="impl='pallas' needs form='chunked'"):
        gated_delta_rule(q, k, v, beta, form="naive", impl="pallas")
    with pytest.raises(ValueError, match="impl must be one of"):
        gated_delta_rule(q, k, v, beta, impl="mosaic")
    with pytest.raises(ValueError, match=r"\(lowering='mosaic'\): dtype must be bfloat16"):
        gated_delta_rule(q, k, v, beta, impl="pallas_mosaic")  # float32
    with pytest.raises(ValueError, match="chunk_size"):
        gated_delta_rule(q, k, v, beta, chunk_size=0)
    with pytest.raises(ValueError, match="gated_delta_step: beta must be"):
        gated_delta_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0, :1], s0)
