"""Published HAT checkpoint format <-> arjax: round trips, reference forward, bad input."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import ml_dtypes
import numpy as np
import pytest
from einops import rearrange

from arjax.config import ConfigError, apply_overrides
from arjax.models import hat_checkpoint as hc
from arjax.models.hat import HAT, PRESETS, HATConfig
from arjax.nn import RopeScaling, TransformerConfig


def tiny_config(cross_every: bool = False, scan: bool = True) -> HATConfig:
    """Small shapes; backbone head_dim * heads != d_model exercises the head_dim key."""
    stack = lambda **kw: TransformerConfig(  # noqa: E731
        num_heads=2, num_kv_heads=1, head_dim=16, dtype="float32", scan_layers=scan, **kw
    )
    return HATConfig(
        encoder=stack(d_model=32, num_layers=1, mlp_dim=64, window=6, final_norm=False),
        backbone=stack(d_model=40, num_layers=2, mlp_dim=80, final_norm=False),
        decoder=stack(d_model=32, num_layers=2, mlp_dim=64, window=6),
        cross_heads=2, cross_kv_heads=1, cross_head_dim=16,
        cross_attn_every_layer=cross_every, max_word_bytes=8, max_words=16, max_seq_len=32,
    )  # fmt: skip


def random_published(config: HATConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A random bf16 checkpoint with the published names; unused norms are ones."""
    unused = {r.name for r in hc.rules(config) if r.path is None}
    out = {}
    for name, shape in hc.published_shapes(config).items():
        if name in unused:
            x = np.ones(shape)
        elif "norm" in name:
            x = 1.0 + 0.2 * rng.standard_normal(shape)
        else:
            x = rng.standard_normal(shape) / np.sqrt(shape[-1])
        out[name] = x.astype(ml_dtypes.bfloat16)
    return out


def example_batch() -> tuple[dict, np.ndarray]:
    """One document of 20 bytes in 6 words; also returns each byte's 0-based word."""
    lengths = [3, 5, 1, 4, 2, 5]
    word_of = np.repeat(np.arange(len(lengths)), lengths)
    s, w = len(word_of), len(lengths)
    ones = np.ones((1, s), np.int32)
    batch = {
        "inputs": np.random.default_rng(0).integers(0, 256, (1, s)).astype(np.int32),
        "segment_ids": ones,
        "positions": np.arange(s, dtype=np.int32)[None],
        "word_ids": (word_of + 1).astype(np.int32)[None],
        "word_segment_ids": np.ones((1, w), np.int32),
        "word_positions": np.arange(w, dtype=np.int32)[None],
    }
    return batch, word_of


# --- independent float32 reference of the published model (PyTorch layouts, HF semantics) ---


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, pos, theta):  # x [len, heads, d]; rotate_half pairing
    d = x.shape[-1]
    angle = pos[:, None] * theta ** (-np.arange(0, d, 2) / d)
    cos = np.concatenate([np.cos(angle)] * 2, -1)[:, None]
    sin = np.concatenate([np.sin(angle)] * 2, -1)[:, None]
    rotated = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rotated * sin


def _attend(q, k, v, mask):  # q [lq, h, d], k/v [lk, kvh, d], mask [lq, lk]
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return rearrange(np.einsum("hqk,khd->qhd", p, v), "q h d -> q (h d)")


def _proj(x, w, heads):
    return rearrange(x @ w.T, "l (h d) -> l h d", h=heads)


def _llama(x, t, pre, c: TransformerConfig, pos, mask):
    h = _rms(x, t[pre + "input_layernorm.weight"], c.norm_eps)
    q = _rope(_proj(h, t[pre + "self_attn.q_proj.weight"], c.num_heads), pos, c.rope_theta)
    k = _rope(_proj(h, t[pre + "self_attn.k_proj.weight"], c.num_kv_heads), pos, c.rope_theta)
    v = _proj(h, t[pre + "self_attn.v_proj.weight"], c.num_kv_heads)
    x = x + _attend(q, k, v, mask) @ t[pre + "self_attn.o_proj.weight"].T
    h = _rms(x, t[pre + "post_attention_layernorm.weight"], c.norm_eps)
    gate, up = h @ t[pre + "mlp.gate_proj.weight"].T, h @ t[pre + "mlp.up_proj.weight"].T
    return x + (gate / (1 + np.exp(-gate)) * up) @ t[pre + "mlp.down_proj.weight"].T


def _cross(xq, xkv, t, pre, cfg: HATConfig, stack: TransformerConfig, qpos, kpos, mask):
    q = _proj(xq, t[pre + "q_proj.weight"], cfg.cross_heads)
    k = _proj(xkv, t[pre + "k_proj.weight"], cfg.cross_kv_heads)
    if cfg.cross_qk_norm:  # per head, the stack's epsilon
        q, k = (
            _rms(q, t[pre + "norm_query.weight"], stack.norm_eps),
            _rms(k, t[pre + "norm_key.weight"], stack.norm_eps),
        )
    theta = stack.rope_theta
    v = _proj(xkv, t[pre + "v_proj.weight"], cfg.cross_kv_heads)
    out = _attend(_rope(q, qpos, theta), _rope(k, kpos, theta), v, mask)
    return out @ t[pre + "o_proj.weight"].T


def _causal(n, window=None):
    i, j = np.arange(n)[:, None], np.arange(n)[None]
    return (j <= i) & (True if window is None else j > i - window)


def reference_logits(t: dict, cfg: HATConfig, tokens: np.ndarray, word_of: np.ndarray):
    """Logits ``[seq, vocab]`` of the published model on one document (windows in arjax's
    convention: ``cfg.*.window`` keys per query)."""
    t = {k: np.asarray(v, np.float64) for k, v in t.items()}
    enc, bb, dec = cfg.encoder, cfg.backbone, cfg.decoder
    s, w = len(tokens), int(word_of.max()) + 1
    bpos, wpos = np.arange(s, dtype=np.float64), np.arange(w, dtype=np.float64)
    x = t["encoder.embedding_layer.weight"][tokens]
    for i in range(enc.num_layers):
        x = _llama(x, t, f"encoder.layers.{i}.", enc, bpos, _causal(s, enc.window))
    acts = x
    own = word_of[None, :] == np.arange(w)[:, None]  # [words, bytes]
    latent = np.broadcast_to(t["encoder_connector.latent_query"][0], (w, bb.d_model))
    pre = "encoder_connector.cross_attention_encoder_connector."
    h = _cross(latent, acts, t, pre, cfg, enc, wpos, bpos, own)
    for i in range(bb.num_layers):
        h = _llama(h, t, f"backbone.layers.{i}.", bb, wpos, _causal(w))
    pred = np.concatenate([t["decoder_connector.first_word_embedding"][0], h[:-1]])
    x = acts
    for i in range(dec.num_layers):
        pre = f"decoder.decoder_layers.{i}."
        if i == 0 or cfg.cross_attn_every_layer:
            xq = _rms(x, t[pre + "query_norm.weight"], dec.norm_eps)
            xkv = _rms(pred, t[pre + "kv_norm.weight"], dec.norm_eps)
            x = x + _cross(xq, xkv, t, pre + "cross_attention.", cfg, dec, bpos, wpos, own.T)
        x = _llama(x, t, pre + "llama_layer.", dec, bpos, _causal(s, dec.window))
    return _rms(x, t["layer_norm.weight"], dec.norm_eps) @ t["lm_head.weight"].T


@functools.cache
def _forward(cfg: HATConfig):
    return jax.jit(lambda params, batch: HAT(cfg).apply({"params": params}, batch))


def arjax_logits(params: dict, cfg: HATConfig, batch: dict) -> np.ndarray:
    return np.asarray(_forward(cfg)(params, batch))


def random_arjax_params(cfg: HATConfig, rng: np.random.Generator) -> dict:
    """Random float32 params with the model's tree and shapes (no slow eager init)."""
    return jax.tree.map(
        lambda x: (rng.standard_normal(x.shape) / np.sqrt(x.shape[-1])).astype(np.float32),
        hc.abstract_params(cfg),
    )


# --------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("cross_every", [False, True])
def test_published_arjax_published_is_bit_identical(tmp_path, rng, cross_every):
    cfg = tiny_config(cross_every)
    tensors = random_published(cfg, rng)
    published_cfg = hc.config_to_published(cfg)
    del published_cfg[hc.ARJAX_KEY]  # a file as the reference writes it
    (tmp_path / "src").mkdir()
    hc.write_tensors(tensors, tmp_path / "src")
    (tmp_path / "src" / hc.CONFIG_FILE).write_text(json.dumps(published_cfg))

    params, cfg2, template = hc.load_published(
        tmp_path / "src", max_seq_len=32, max_words=16, dtype="float32"
    )
    assert cfg2 == dataclasses.replace(cfg, bos_id=None)  # published models have no BOS
    hc.save_published(tmp_path / "dst", params, cfg2, template=template)
    back = hc.read_tensors(tmp_path / "dst")
    assert sorted(back) == sorted(tensors)
    for name, x in tensors.items():
        assert back[name].dtype == x.dtype, name
        assert np.array_equal(back[name].view(np.uint16), x.view(np.uint16)), name
    assert json.loads((tmp_path / "dst" / hc.CONFIG_FILE).read_text()) == published_cfg


@pytest.mark.parametrize("scan", [True, False])
def test_arjax_published_arjax_is_identical(tmp_path, rng, scan):
    cfg = tiny_config(cross_every=True, scan=scan)
    params = random_arjax_params(cfg, rng)
    hc.save_published(tmp_path, params, cfg, dtype="float32")
    params2, cfg2, _ = hc.load_published(tmp_path)
    assert cfg2 == cfg
    flat, flat2 = hc._flat(params), hc._flat(params2)
    assert sorted(flat) == sorted(flat2)
    for path, x in flat.items():
        assert x.dtype == flat2[path].dtype and np.array_equal(x, flat2[path]), path


def test_converted_model_matches_original_and_reference_forward(rng):
    """Round-tripped params give the same logits; converted published weights match an
    independent forward of the published model (catches wrong transpositions/head layouts,
    which round trips cannot)."""
    cfg = tiny_config(cross_every=True)  # one compiled forward for the whole test
    batch, word_of = example_batch()
    params = random_arjax_params(cfg, rng)
    tensors = hc.params_to_published(params, cfg, dtype="float32")
    params2 = hc.params_from_published(tensors, cfg)
    got = arjax_logits(params2, cfg, batch)
    assert np.array_equal(got, arjax_logits(params, cfg, batch))
    want = reference_logits(tensors, cfg, batch["inputs"][0], word_of)
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-4)
    published = random_published(cfg, rng)  # bf16 weights as released
    got = arjax_logits(hc.params_from_published(published, cfg), cfg, batch)[0]
    want = reference_logits(published, cfg, batch["inputs"][0], word_of)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_sharded_files_and_extra_vocab_rows(tmp_path, rng):
    cfg = tiny_config()
    small_vocab = dataclasses.replace(cfg, vocab_size=256, bos_id=None, eos_id=192)
    tensors = random_published(small_vocab, rng)
    published_cfg = hc.config_to_published(small_vocab)
    hc.write_tensors(tensors, tmp_path / "src", max_shard_bytes=20_000)
    assert (tmp_path / "src" / hc.INDEX_FILE).is_file()
    assert len(list((tmp_path / "src").glob("model-*.safetensors"))) > 1
    params = hc.params_from_published(hc.read_tensors(tmp_path / "src"), cfg)
    emb = params["embedding"]["embedding"]
    assert emb.shape == (259, 32) and not emb[256:].any()  # PAD/BOS/EOS rows start at zero
    assert not params["lm_head"]["kernel"][:, 256:].any()
    hc.save_published(tmp_path / "dst", params, cfg, template=published_cfg)
    back = hc.read_tensors(tmp_path / "dst")
    for name, x in tensors.items():
        assert np.array_equal(back[name].view(np.uint16), x.view(np.uint16)), name


def test_bad_tensors_are_named(rng):
    cfg = tiny_config()
    good = random_published(cfg, rng)
    name = "backbone.layers.1.self_attn.k_proj.weight"
    with pytest.raises(hc.CheckpointFormatError, match=f"missing tensor '{name}'"):
        hc.params_from_published({k: v for k, v in good.items() if k != name}, cfg)
    with pytest.raises(hc.CheckpointFormatError, match="unexpected tensor 'backbone.layers.2"):
        hc.params_from_published({**good, "backbone.layers.2.mlp.up_proj.weight": good[name]}, cfg)
    with pytest.raises(hc.CheckpointFormatError, match=rf"'{name}' has shape \(16, 48\)"):
        hc.params_from_published({**good, name: np.zeros((16, 48), np.float32)}, cfg)
    with pytest.raises(hc.CheckpointFormatError, match="non-float"):
        hc.params_from_published({**good, name: good[name].astype(np.int32)}, cfg)
    unused = "decoder.decoder_layers.1.query_norm.weight"
    with pytest.warns(UserWarning, match=unused):
        hc.params_from_published({**good, unused: np.zeros(32, np.float32)}, cfg)
    ignored = {**good, "encoder.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}
    hc.params_from_published(ignored, cfg)
    params = hc.params_from_published(good, cfg)
    del params["lm_head"]
    with pytest.raises(hc.CheckpointFormatError, match="missing 'lm_head/kernel'"):
        hc.params_to_published(params, cfg)


def test_unsupported_published_configs_name_the_field():
    published = hc.config_to_published(tiny_config())
    del published[hc.ARJAX_KEY]
    cases = [
        ("backbone_config", "rope_scaling", {"rope_type": "llama3", "factor": 8.0}),
        ("backbone_config", "rope_scaling", {"rope_type": "dynamic", "factor": 2.0}),
        ("encoder_config", "mlp_bias", True),
        ("decoder_config", "hidden_act", "gelu"),
        ("decoder_config", "attn_logit_softcapping", 30.0),  # unknown: might change the math
        ("backbone_config", "tie_word_embeddings", True),
    ]
    for section, key, value in cases:
        bad = json.loads(json.dumps(published))
        bad[section][key] = value
        with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
            hc.config_from_published(bad)
    bad = json.loads(json.dumps(published))
    bad["encoder_config"]["cross_attention_config"]["word_windows"] = 2
    with pytest.raises(ConfigError, match="cross_attention_config.word_windows: unknown"):
        hc.config_from_published(bad)
    bad = json.loads(json.dumps(published))
    bad["rope_type"] = "yarn"
    with pytest.raises(ConfigError, match="config.json.rope_type: unknown"):
        hc.config_from_published(bad)
    bad = json.loads(json.dumps(published))
    for section in ("encoder_config", "decoder_config"):
        bad[section]["cross_attention_config"]["hidden_size"] = 64  # head_dim 32 != 16
    with pytest.raises(ConfigError, match="encoder_config.cross_attention_config.hidden_size"):
        hc.config_from_published(bad)
    bad = json.loads(json.dumps(published))
    bad["encoder_config"]["cross_attention_config"]["key_query_norm_per_head"] = False
    with pytest.raises(ConfigError, match="key_query_norm_per_head"):
        hc.config_from_published(bad)
    bad = json.loads(json.dumps(published))
    del bad["backbone_config"]["intermediate_size"]
    with pytest.raises(ConfigError, match="backbone_config.intermediate_size: missing"):
        hc.config_from_published(bad)
    bad = json.loads(json.dumps(published))
    bad["decoder_config"]["cross_attention_config"]["num_attention_heads"] = 4
    with pytest.raises(ConfigError, match="num_attention_heads"):
        hc.config_from_published(bad)
    with pytest.raises(ConfigError, match="encoder.final_norm"):
        hc.config_to_published(dataclasses.replace(
            tiny_config(), encoder=dataclasses.replace(tiny_config().encoder, final_norm=True)
        ))  # fmt: skip


def test_streaming_load_in_bf16_onto_a_mesh_and_back_is_bit_exact(tmp_path, rng):
    """Tensors are memory-mapped, placed one by one with their sharding in the target dtype,
    and written back one by one: the bf16 round trip keeps every bit."""
    cfg = tiny_config(cross_every=True)
    tensors = random_published(cfg, rng)
    published = hc.config_to_published(cfg)
    del published[hc.ARJAX_KEY]
    hc.write_tensors(tensors, tmp_path / "src", max_shard_bytes=20_000)
    (tmp_path / "src" / hc.CONFIG_FILE).write_text(json.dumps(published))
    reader = hc.SafetensorsReader(tmp_path / "src")
    assert isinstance(reader[sorted(tensors)[0]], np.memmap)  # nothing read up front
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
    shardings = jax.tree.map(
        lambda x: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
        hc.abstract_params(cfg),
    )
    params, cfg2, template = hc.load_published(
        tmp_path / "src", param_dtype="bfloat16", shardings=shardings, max_seq_len=32,
        max_words=16, dtype="float32",
    )  # fmt: skip
    for leaf in jax.tree.leaves(params):
        assert leaf.dtype == jax.numpy.bfloat16 and leaf.sharding.mesh == mesh
    partial = {k: v for k, v in shardings.items() if k != "lm_head"}
    with pytest.raises(ValueError, match="no entry for param 'lm_head/kernel'"):
        hc.load_published(tmp_path / "src", shardings=partial, max_seq_len=32, max_words=16)
    hc.save_published(tmp_path / "dst", params, cfg2, template=template, max_shard_bytes=20_000)
    back = hc.read_tensors(tmp_path / "dst")
    assert sorted(back) == sorted(tensors)
    for name, x in tensors.items():
        assert np.array_equal(back[name].view(np.uint16), x.view(np.uint16)), name


def test_window_rope_scaling_and_special_ids_follow_the_reference():
    """``sliding_window`` w = w + 1 keys per query in arjax; Llama-3 rope scaling and the
    end-of-text id come from config.json; no BOS unless the file's arjax section has one."""
    published = hc.config_to_published(tiny_config())
    del published[hc.ARJAX_KEY]
    assert published["encoder_config"]["sliding_window"] == 5
    assert published["decoder_config"]["sliding_window"] == 5
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    published["backbone_config"]["rope_scaling"] = scaling
    published["eos_token_id"] = 192
    cfg = hc.config_from_published(published, max_seq_len=32, max_words=16, dtype="float32")
    assert cfg.encoder.window == cfg.decoder.window == 6
    assert cfg.backbone.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert cfg.encoder.rope_scaling == RopeScaling()
    assert (cfg.bos_id, cfg.eos_id) == (None, 192)
    again = hc.config_to_published(cfg, published)
    assert again["backbone_config"]["rope_scaling"] == scaling
    assert again["encoder_config"]["sliding_window"] == 5 and again["eos_token_id"] == 192
    del published["eos_token_id"]  # the reference's default
    assert hc.config_from_published(published).eos_id == 192


def test_run_overrides_rebuild_the_config_from_a_preset():
    cfg = tiny_config(cross_every=True)
    cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(
        cfg.backbone, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64)))  # fmt: skip
    sets = hc.run_overrides(cfg, PRESETS["tiny"])
    assert "model.cross_attn_every_layer=true" in sets
    assert "model.backbone.rope_scaling.factor=8.0" in sets
    assert apply_overrides(PRESETS["tiny"], [s.removeprefix("model.") for s in sets]) == cfg
