"""HAT at speed: the per-word connectors against the masked-attention reference, the FLOP
formula against an independent count, MFU against the datasheet peak."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jcore

from arjax.data.words import pack_word_documents
from arjax.models.hat import HAT, PRESETS
from arjax.nn.layers import apply_rope
from arjax.ops.word_attention import gather_words, word_attention_reference, word_pool_attention
from arjax.train.flops import forward_flops, mfu, peak_flops, train_step_flops
from arjax.train.step import loss_fn

TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. "
)


def _unscanned(cfg, **changes):
    st = lambda c: dataclasses.replace(c, scan_layers=False)  # noqa: E731
    return dataclasses.replace(
        cfg, encoder=st(cfg.encoder), backbone=st(cfg.backbone), decoder=st(cfg.decoder),
        **changes,
    )  # fmt: skip


def _batch(seq: int, words: int, texts: list[str]) -> dict:
    """Packed rows of ``texts`` (several documents per row, PAD at row ends)."""
    return pack_word_documents(texts, seq, words, PRESETS["tiny"].max_word_bytes)


def _word_ids(rng: np.random.Generator, b: int, s: int, w: int) -> np.ndarray:
    """Rows of consecutive words of 1-6 bytes, cut short: PAD (0) and empty word slots."""
    out = np.zeros((b, s), np.int32)
    for i in range(b):
        ids = np.repeat(np.arange(1, w + 1), rng.integers(1, 7, size=w))[: s - 5 * i]
        out[i, : len(ids)] = ids
    return out


# ------------------------------------------------------------------- ops


def _pool_inputs(rng, b, s, w, heads, kv_heads, d):
    """A shared query ``[heads, d]``, keys/values, word ids and RoPE positions of words and
    bytes (each row's bytes after its words, as in a document)."""
    wid = jnp.asarray(_word_ids(rng, b, s, w))
    q = jnp.asarray(rng.normal(size=(heads, d)), jnp.float32)
    k = 4.0 * jnp.asarray(rng.normal(size=(b, s, kv_heads, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, s, kv_heads, d)), jnp.float32)
    word_pos = jnp.asarray(np.cumsum(rng.integers(0, 3, size=(b, w)), axis=1), jnp.int32)
    byte_pos = jnp.asarray(np.cumsum(rng.integers(1, 4, size=(b, s)), axis=1), jnp.int32)
    return wid, q, k, v, word_pos, byte_pos


def _pool_pair(wid, word_pos, byte_pos, w):
    """(fast, reference) as functions of (q, k, v): the shared unrotated query over keys
    rotated relative to their word, against each word's rotated query over rotated keys."""

    def fast(q, k, v):
        byte_word_pos = jnp.take_along_axis(word_pos, jnp.clip(wid - 1, 0, w - 1), 1)
        k = apply_rope(k, byte_pos - byte_word_pos, 10_000.0)
        return word_pool_attention(q, k, v, wid, num_words=w)

    def reference(q, k, v):
        q = apply_rope(jnp.broadcast_to(q, (wid.shape[0], w, *q.shape)), word_pos, 10_000.0)
        return word_attention_reference(q, apply_rope(k, byte_pos, 10_000.0), v, wid)

    return fast, reference


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_word_pool_attention_matches_masked_reference(rng, heads, kv_heads):
    """Values and gradients of the shared-query segment-softmax form (keys rotated by their
    byte's position relative to their word's) equal the float32 masked attention of each
    word's rotated query over the rotated keys (word w over the bytes with word id w + 1),
    words without bytes included (zeros). Breaking the spill slot (invalid bytes into word
    0) or the per-word max (scores in the hundreds) makes it fail; a model rotating keys by
    byte position alone fails ``test_words_connectors_equal_dense_reference``."""
    b, s, w, d = 3, 48, 18, 16
    wid, q, k, v, word_pos, byte_pos = _pool_inputs(rng, b, s, w, heads, kv_heads, d)
    fast, reference = _pool_pair(wid, word_pos, byte_pos, w)
    # each side one compiled program (op by op, the dispatches' compiles dominated)
    out, ref = jax.jit(fast)(q, k, v), jax.jit(reference)(q, k, v)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    empty = ~(np.asarray(wid)[:, :, None] == np.arange(1, w + 1)).any(1)  # [b, w]
    assert empty.any() and np.all(np.asarray(out)[empty] == 0)
    # scores in the hundreds: exp overflows float32 unless each word's max is subtracted
    big = jax.jit(fast)(q, 50.0 * k, v), jax.jit(reference)(q, 50.0 * k, v)
    np.testing.assert_allclose(*big, atol=2e-5, rtol=2e-5)

    def grads(fn):
        loss = lambda *a: jnp.sum(jnp.sin(fn(*a)))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for g, gr in zip(grads(fast), grads(reference), strict=True):
        np.testing.assert_allclose(g, gr, atol=1e-4, rtol=1e-4)


def test_word_pool_attention_bf16_within_bf16_error(rng):
    """bf16 inputs: the error against the float32 reference stays within twice that of the
    masked XLA attention in bf16 (the baseline bf16 error, computed here)."""
    from arjax.ops import attention

    b, s, w, d = 2, 64, 20, 32
    wid, q, k, v, word_pos, byte_pos = _pool_inputs(rng, b, s, w, 4, 2, d)
    fast, reference = _pool_pair(wid, word_pos, byte_pos, w)
    ref = reference(q, k, v)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    qw = apply_rope(jnp.broadcast_to(bf[0], (b, w, 4, d)), word_pos, 10_000.0)
    slots = jnp.broadcast_to(jnp.arange(1, w + 1), (b, w))
    base = attention(
        qw, apply_rope(bf[1], byte_pos, 10_000.0), bf[2],
        q_segment_ids=slots, kv_segment_ids=wid, impl="xla",
    )  # fmt: skip
    err = np.abs(np.asarray(fast(*bf), np.float32) - ref).max()
    base_err = np.abs(np.asarray(base, np.float32) - ref).max()
    assert err <= 2 * base_err, (err, base_err)


def test_gather_words_values_and_errors():
    x = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
    wid = jnp.asarray([[1, 1, 2, 3, 0], [0, 3, 3, 4, 1]])
    out = np.asarray(gather_words(x, wid))
    want = np.stack([
        [x[0, 0], x[0, 0], x[0, 1], x[0, 2], np.zeros(2)],
        [np.zeros(2), x[1, 2], x[1, 2], np.zeros(2), x[1, 0]],  # id 4 > words: zeros
    ])  # fmt: skip
    np.testing.assert_array_equal(out, want)
    with pytest.raises(ValueError, match="word_ids must be"):
        gather_words(x, wid[0])
    with pytest.raises(ValueError, match="word_ids must be integer"):
        word_pool_attention(
            x[0, 0, :, None],
            x[..., None],
            x[..., None],
            wid.astype(jnp.float32)[:, :3],
            num_words=3,
        )
    with pytest.raises(ValueError, match="q must be"):
        word_pool_attention(x, x[..., None], x[..., None], wid[:, :3], num_words=3)


# ----------------------------------------------------------------- model


def test_words_connectors_equal_dense_reference():
    """``connector_impl="words"`` (per-word connectors) and ``"dense"`` (masked attention
    over the row, the previous formulation) have the same parameters and give the same
    logits at every real byte, the same loss and the same gradients (float32), with
    cross-attention in both decoder layers. Gathering word ``word_ids`` instead of
    ``word_ids - 1`` in ``gather_words`` makes it fail."""
    tiny = PRESETS["tiny"]
    decoder = dataclasses.replace(tiny.decoder, num_layers=2)
    cfg = dataclasses.replace(tiny, decoder=decoder, cross_attn_every_layer=True)
    batch = {k: jnp.asarray(v[:3]) for k, v in _batch(96, 24, [TEXT, TEXT[:70], "Hi!"]).items()}
    fast, dense = HAT(cfg), HAT(cfg, connector_impl="dense")
    params = nn.meta.unbox(jax.jit(fast.init)(jax.random.key(1), batch)["params"])
    dense_params = jax.eval_shape(dense.init, jax.random.key(1), batch)["params"]
    shapes = lambda t: jax.tree.map(jnp.shape, nn.meta.unbox(t))  # noqa: E731
    assert shapes(params) == shapes(dense_params)
    real = np.asarray(batch["word_ids"]) > 0
    assert 0 < real.mean() < 1  # padding present
    logits = jax.jit(fast.apply)({"params": params}, batch)
    ref = jax.jit(dense.apply)({"params": params}, batch)
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(ref)[real], atol=2e-5)

    def grads(model):
        def mean_loss(p):
            total, count = loss_fn(model, p, batch)
            return total / count

        return jax.jit(jax.value_and_grad(mean_loss))(params)

    (loss, g), (loss_ref, g_ref) = grads(fast), grads(dense)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    for path, a in jax.tree_util.tree_leaves_with_path(g):
        b = _at(g_ref, path)
        scale = float(np.abs(b).max()) + 1e-12
        np.testing.assert_allclose(a, b, atol=1e-4 * scale, err_msg=jax.tree_util.keystr(path))


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_connector_impl_is_checked():
    batch = {k: jnp.asarray(v[:1]) for k, v in _batch(32, 8, ["Hi"]).items()}
    with pytest.raises(ValueError, match="connector_impl"):
        HAT(PRESETS["tiny"], connector_impl="fast").init(jax.random.key(0), batch)


# ------------------------------------------------------------------ FLOPs


def _dot_flops(jaxpr: jcore.Jaxpr) -> int:
    """2 x MACs of every dot_general in ``jaxpr`` (sub-jaxprs included)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2 * math.prod(out) * math.prod(lhs[i] for i in contract)
        for value in eqn.params.values():
            for sub in value if isinstance(value, list | tuple) else [value]:
                if isinstance(sub, jcore.ClosedJaxpr):
                    total += _dot_flops(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    total += _dot_flops(sub)
    return total


def test_forward_flops_against_independent_counts():
    """``HATConfig.forward_flops`` against (1) the dot_general FLOPs of the traced forward,
    exactly, and (2) XLA's cost analysis of the lowered forward, within 4% (XLA adds the
    norms, RoPE, softmax and activations: 1.7% here). Both run the byte/word stacks' XLA
    attention, which scores full [len, len] matrices: the test adds that excess over the
    formula's causal / windowed count. In (1), the connector's weighted value sum is an
    elementwise product + segment sum (not a dot) and its latent query is projected once.
    Dropping the decoder cross-attention or the head from the formula fails (1)."""
    cfg = _unscanned(PRESETS["tiny"], cross_attn_every_layer=True)
    s, w = 256, 64
    batch = {k: jnp.asarray(v[:2]) for k, v in _batch(s, w, [TEXT * 4]).items()}
    b = 2
    model = HAT(cfg)
    params = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), batch)["params"]))
    fwd = lambda p, x: model.apply({"params": p}, x)  # noqa: E731

    def excess(stack, n):  # implemented full n x n scores minus the formula's count
        ctx = n if stack.window is None else min(n, stack.window)
        return b * stack.num_layers * (4 * n * n - 2 * n * ctx) * stack.num_heads * stack.head_dim

    formula = cfg.forward_flops(b * s, b * w, s, w)  # as executed: every slot
    full = formula + excess(cfg.encoder, s) + excess(cfg.decoder, s) + excess(cfg.backbone, w)
    h, hd = cfg.cross_heads, cfg.cross_head_dim
    dots = _dot_flops(jax.make_jaxpr(fwd)(params, batch).jaxpr)
    assert dots == full - b * s * 2 * h * hd + 2 * cfg.backbone.d_model * h * hd
    cost = jax.jit(fwd).lower(params, batch).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert 1.0 <= cost["flops"] / full <= 1.04, cost["flops"] / full


def test_batch_flops_count_real_bytes_and_words():
    """FLOPs come from each row's real bytes / words: the same rows with more padding (a
    wider batch) count the same; one more word of text counts more; the trainer's step
    FLOPs are 3x that; a preset without bytes_per_word is refused."""
    cfg = PRESETS["tiny"]
    narrow, wide = _batch(128, 40, [TEXT]), _batch(256, 80, [TEXT])
    nb = (narrow["word_ids"] > 0).sum(1)
    nw = (narrow["word_segment_ids"] > 0).sum(1)
    want = sum(cfg.forward_flops(x, y, x, y) for x, y in zip(nb, nw, strict=True))
    assert cfg.batch_flops(narrow) == pytest.approx(want, rel=1e-12)
    one_row = {k: v[:1] for k, v in wide.items()}
    assert (one_row["word_ids"] > 0).sum() == nb.sum()
    assert cfg.batch_flops(one_row) > cfg.batch_flops(narrow)  # longer context, same bytes
    more = _batch(256, 80, [TEXT + "Ay"])
    assert cfg.batch_flops({k: v[:1] for k, v in more.items()}) > cfg.batch_flops(one_row)
    assert forward_flops(cfg, narrow) == cfg.batch_flops(narrow)
    assert train_step_flops(cfg, narrow) == 3 * cfg.batch_flops(narrow)
    per_byte = cfg.flops_per_token(256, bytes_per_word=4.0)
    assert per_byte * 256 == pytest.approx(cfg.forward_flops(256, 64, 256, 64), rel=1e-12)
    with pytest.raises(TypeError):
        cfg.flops_per_token(256)  # no default corpus: the data's bytes/word is required


def test_1b_preset_shape():
    """The 1B-class preset: backbone = transformer ``1b`` stack; 1.0-1.2B params in all;
    byte stacks a quarter as wide; FLOPs per byte a fifth to a third of the byte transformer's."""
    from arjax.models.transformer import PRESETS as TF

    hat, tf = PRESETS["1b"], TF["1b"]
    for f in ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
        assert getattr(hat.backbone, f) == getattr(tf, f), f
    assert hat.encoder.d_model * 4 == hat.backbone.d_model == hat.cross_heads * hat.cross_head_dim
    assert 1.0e9 < hat.num_params() < 1.2e9
    ratio = hat.flops_per_token(8192, bytes_per_word=4.4) / tf.flops_per_token(2048)
    assert 0.2 < ratio < 0.3, ratio


# -------------------------------------------------------------------- MFU


def test_peak_flops_datasheet_table():
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("TPU v5 lite") == 197e12
    assert peak_flops("TPU v5") == 459e12
    assert peak_flops("TPU v6 lite") == 918e12
    assert peak_flops("cpu") is None
    assert peak_flops(jax.devices()[0]) is None  # CPU here: no MFU rather than a guess
    assert mfu(989e12 * 0.5, 1.0, 989e12) == pytest.approx(0.5)
    assert mfu(1e12, 1.0, None) is None


def test_trainer_mfu_counts_each_batch(tmp_path, monkeypatch):
    """The trainer's logged ``mfu`` is 3x ``HATConfig.batch_flops`` of the very batch that
    step trained on / step time / peak: with a stand-in peak of 1 TFLOP/s, ``mfu x
    step_time x 1e12`` reproduces the FLOPs of the data iterator's batches, in order."""
    import json

    import arjax.train.loop as loop
    from arjax.train.config import make_run_config
    from arjax.train.data import make_data

    monkeypatch.setattr(loop, "peak_flops", lambda device: 1e12)
    sets = [
        "data.seq_len=64", "data.batch_size=2", "data.val_batches=1", "train.steps=2",
        "train.log_every=1", "train.eval_every=100", "train.save_every=100",
        "train.sample_bytes=0", "train.progress=false", "train.async_checkpoint=false",
    ]  # fmt: skip
    cfg = make_run_config("hat", "tiny", sets)
    loop.train(cfg, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "mfu" in r]
    assert [r["step"] for r in rows] == [1, 2]
    it, _ = make_data(cfg)
    for r in rows:
        want = train_step_flops(cfg.model, next(it)) / jax.device_count()
        assert r["mfu"] * r["step_time"] * 1e12 == pytest.approx(want, rel=1e-9)
