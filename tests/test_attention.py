"""attention(impl="xla") vs the float32 reference: values and gradients, every mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arjax.ops import attention, attention_mask, attention_reference, decode_attention
from arjax.ops.attention import decode_cache_len

TOL = dict(rtol=2e-5, atol=2e-5)  # float32, xla vs reference


def _qkv(rng, b=2, q_len=7, kv_len=7, h=4, kv_h=2, d=16):
    q = jnp.asarray(rng.standard_normal((b, q_len, h, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, kv_len, kv_h, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, kv_len, kv_h, d)), jnp.float32)
    return q, k, v


CASES = [
    dict(),
    dict(causal=True),
    dict(causal=True, window=3),
    dict(causal=True, kv_len=11),  # decode convention: queries are the last 7 positions
    dict(causal=True, window=2, kv_len=11),
    dict(kv_len=5),  # cross-attention
    dict(segments=True),
    dict(causal=True, segments=True),
    dict(causal=True, window=4, segments=True, kv_h=1),  # MQA
    dict(kv_h=4),  # MHA
]


def _segments(rng, b, n):
    return jnp.asarray(np.sort(rng.integers(0, 3, (b, n)), axis=1), jnp.int32)


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_xla_matches_reference_values_and_grads(rng, case):
    case = dict(case)
    seg = case.pop("segments", False)
    causal, window = case.pop("causal", False), case.pop("window", None)
    q, k, v = _qkv(rng, **case)
    kw = dict(causal=causal, window=window)
    if seg:
        if q.shape[1] == k.shape[1]:
            s = _segments(rng, q.shape[0], q.shape[1])
            kw.update(q_segment_ids=s, kv_segment_ids=s)
        else:
            kw.update(
                q_segment_ids=_segments(rng, q.shape[0], q.shape[1]),
                kv_segment_ids=_segments(rng, q.shape[0], k.shape[1]),
            )
    # each side one compiled program (op by op, the dispatches' compiles dominated)
    out = jax.jit(lambda *a: attention(*a, impl="xla", **kw))(q, k, v)
    ref = jax.jit(lambda *a: attention_reference(*a, **kw))(q, k, v)
    np.testing.assert_allclose(out, ref, **TOL)

    w = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)
    g = jax.grad(lambda *a: jnp.sum(attention(*a, impl="xla", **kw) * w), argnums=(0, 1, 2))
    g_ref = jax.grad(lambda *a: jnp.sum(attention_reference(*a, **kw) * w), argnums=(0, 1, 2))
    for a, b in zip(jax.jit(g)(q, k, v), jax.jit(g_ref)(q, k, v)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_reference_matches_explicit_softmax(rng):
    """The reference itself against a hand-written loop on one head."""
    q, k, v = _qkv(rng, b=1, q_len=3, kv_len=5, h=1, kv_h=1, d=4)
    out = np.asarray(attention_reference(q, k, v, causal=True, window=2))
    qn, kn, vn = (np.asarray(x[0, :, 0], np.float64) for x in (q, k, v))
    for i in range(3):
        p = 5 - 3 + i
        keys = [j for j in range(5) if p - 2 < j <= p]
        s = np.array([qn[i] @ kn[j] / 2.0 for j in keys])
        a = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        np.testing.assert_allclose(out[0, i, 0], a @ vn[keys], rtol=1e-5, atol=1e-6)


def test_query_seeing_nothing_returns_zero(rng):
    q, k, v = _qkv(rng, b=1, q_len=2, kv_len=3)
    qs = jnp.array([[1, 5]], jnp.int32)
    ks = jnp.array([[1, 1, 2]], jnp.int32)
    for impl_fn in (
        lambda: attention(q, k, v, q_segment_ids=qs, kv_segment_ids=ks, impl="xla"),
        lambda: attention_reference(q, k, v, q_segment_ids=qs, kv_segment_ids=ks),
    ):
        out = np.asarray(impl_fn())
        assert np.all(out[0, 1] == 0.0)
        assert np.all(np.isfinite(out))


def test_bf16_close_to_float32_reference(rng):
    q, k, v = _qkv(rng, q_len=16, kv_len=16)
    out = attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), causal=True, impl="xla")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        out.astype(jnp.float32), attention_reference(q, k, v, causal=True), atol=3e-2, rtol=3e-2
    )


def test_mask_values():
    m = attention_mask(2, 4, causal=True, window=2)
    expected = np.array([[False, True, True, False], [False, False, True, True]])
    np.testing.assert_array_equal(np.asarray(m[0, 0]), expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(q=(2, 4, 4)), "q must be"),
        (dict(k=(2, 4, 3, 8)), "not a multiple of kv_heads"),
        (dict(k=(2, 4, 2, 4), v=(2, 4, 2, 4)), "does not match q"),
        (dict(window=0, causal=True), "window must be"),
        (dict(window=2), "window requires causal"),
        (dict(q=(2, 6, 4, 8), causal=True), "q_len <= kv_len"),
        (dict(impl="fast"), "impl must be"),
        (dict(seg_q=(2, 3)), "q_segment_ids must be"),
        (dict(dtype=jnp.int32), "floating point"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(kwargs, message):
    kwargs = dict(kwargs)
    dtype = kwargs.pop("dtype", jnp.float32)
    q = jnp.zeros(kwargs.pop("q", (2, 4, 4, 8)), dtype)
    k = jnp.zeros(kwargs.pop("k", (2, 4, 2, 8)), dtype)
    v = jnp.zeros(kwargs.pop("v", k.shape), dtype)
    if "seg_q" in kwargs:
        kwargs["q_segment_ids"] = jnp.zeros(kwargs.pop("seg_q"), jnp.int32)
        kwargs["kv_segment_ids"] = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(ValueError, match=message):
        jax.jit(lambda q, k, v: attention(q, k, v, **kwargs)).lower(q, k, v)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_decode_attention_matches_reference(rng, impl):
    """Few queries against a partly filled cache; pallas = flash-decoding (interpret on CPU)."""
    q, k, v = _qkv(rng, b=2, q_len=1, kv_len=37, h=4, kv_h=2, d=16)
    visible = jnp.asarray(rng.random((2, 37)) < 0.6)
    out = decode_attention(q, k, v, kv_visible=visible, impl=impl)
    ref = attention_reference(
        q, k, v, q_segment_ids=jnp.ones((2, 1), jnp.int32),
        kv_segment_ids=visible.astype(jnp.int32),
    )  # fmt: skip
    np.testing.assert_allclose(out, ref, **TOL)


def test_decode_cache_len_rounds_to_whole_kernel_tiles():
    """Caches in whole flash-decoding KV tiles: 128 slots, a power of two >= 16 when shorter."""
    lengths = (1, 5, 16, 17, 100, 128, 129, 545, 2176)
    assert [decode_cache_len(n) for n in lengths] == [16, 16, 16, 32, 128, 128, 256, 640, 2176]
    with pytest.raises(ValueError, match="length must be > 0"):
        decode_cache_len(0)
