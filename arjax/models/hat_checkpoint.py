"""Convert HAT checkpoints in the published format (safetensors + config.json) to and from arjax.

The published format is the one of Aleph Alpha's released HAT models (e.g. Hugging Face
``Aleph-Alpha/llama-3_1-8b-tfree-hat-base``, ``Aleph-Alpha/tfree-hat-pretrained-7b-base``),
read off their public reference code -- the Hugging Face remote code (``config.py``:
``HATArchitectureConfig`` with ``encoder_config`` / ``backbone_config`` / ``decoder_config``,
each a Llama config plus ``cross_attention_config``; ``model.py``: ``HATForCausalLM``) and the
vLLM port (github.com/Aleph-Alpha/vllm, ``vllm/model_executor/models/hat.py``, whose weight
loader lists the names). Paper: Neitemeier et al. 2025, arXiv:2501.10322, Sec. 2. Names
(PyTorch ``nn.Linear`` weights are ``[out, in]``; ``L`` = Llama layer naming below)::

    encoder.embedding_layer.weight                                   [vocab, enc_d]
    encoder.layers.N.L                                               (sliding-window byte stack)
    encoder_connector.latent_query                                   [1, 1, backbone_d]
    encoder_connector.cross_attention_encoder_connector.{q,k,v,o}_proj.weight
    encoder_connector.cross_attention_encoder_connector.{norm_query,norm_key}.weight  [head_dim]
    backbone.layers.N.L                                              (word stack, no final norm)
    decoder_connector.first_word_embedding                           [1, 1, backbone_d]
    decoder.decoder_layers.N.{query_norm,kv_norm}.weight             [dec_d], [backbone_d]
    decoder.decoder_layers.N.cross_attention.{q,k,v,o}_proj.weight   (N = 0, or every N)
    decoder.decoder_layers.N.cross_attention.{norm_query,norm_key}.weight
    decoder.decoder_layers.N.llama_layer.L
    layer_norm.weight                                                [dec_d]
    lm_head.weight                                                   [vocab, dec_d]

    L = input_layernorm.weight, self_attn.{q,k,v,o}_proj.weight,
        post_attention_layernorm.weight, mlp.{gate,up,down}_proj.weight

Layout changes (all exact, so round trips are bit-identical): ``[out, in]`` weights are
transposed to Flax ``[in, out]`` kernels; q/k/v weights ``[(heads head_dim), in]`` become
``[in, heads, head_dim]`` and o weights ``[out, (heads head_dim)]`` become
``[heads, head_dim, out]`` (heads outermost, as the reference's ``"(h d)"`` rearranges);
the ``[1, 1, d]`` latent query and first-word embedding become ``[d]``. RoPE needs no
permutation: the reference uses the half-split ("neox", ``rotate_half``) pairing, as
:func:`arjax.nn.apply_rope` does. GQA groups consecutive query heads per KV head in both.

Semantics, as the reference computes them (checked against fixtures made by running it,
``tests/data/hat_reference/``): the reference's ``sliding_window`` ``w`` lets a byte at
position ``p`` see keys ``p - w <= j <= p`` -- ``w + 1`` keys, flash-attention's
``window_size=(w, w)`` with ``causal=True``, which is how Hugging Face transformers (the
version the released files name, 4.46) passes ``sliding_window`` to flash-attention. arjax's
``window`` counts the keys a query sees, so ``window = sliding_window + 1`` (and back on
export). vLLM-style kernels that pass ``window_size=(w - 1, 0)`` see one key fewer: a model
served that way differs from the reference past the window. RMSNorm epsilons are per stack:
each Llama layer, the connectors' per-head q/k norms (encoder connector: encoder config;
decoder connector: decoder config), the decoder's ``query_norm``/``kv_norm`` and the final
``layer_norm`` (decoder config). The connectors' RoPE (theta and ``rope_scaling``) is the
encoder's / decoder's. ``rope_scaling`` ``{"rope_type": "llama3", ...}`` (Llama 3.1) maps to
:class:`arjax.nn.layers.RopeScaling`. Generation: the published models put no BOS before a
prompt (``bos_id`` None) and end at ``eos_token_id`` (the reference's default 192, the
``<|eot_id|>`` of ``special_token_dict``).

Reference quirks handled here: the reference builds ``query_norm``/``kv_norm`` in every
decoder layer, also those without cross-attention where they are unused -- they are written
as ones and dropped on import (with a warning if they are not ones). Tensors named
``*rotary_emb.inv_freq`` (non-trainable buffers some exporters add) are ignored.

Not representable (import raises :class:`arjax.config.ConfigError` naming the field): other
``rope_scaling`` types, biases, non-SiLU MLPs, qk-norm inside the Llama layers, non-per-head
cross-attention qk-norm, different cross-attention shapes in the encoder and decoder
connectors, a connector head_dim different from its stack's (the reference rotates the
connector heads with the stack's rotary table), and any config key this module does not know
(it might change the math).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from einops import rearrange

from arjax.config import check
from arjax.models.hat import HAT, HATConfig
from arjax.nn import RopeScaling, TransformerConfig

Kind = Literal["copy", "linear", "heads_in", "heads_out", "vector"]
Path_ = tuple[str, ...]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# arjax-only settings are kept under this key of config.json so that arjax -> published ->
# arjax restores the exact HATConfig; other readers ignore it.
ARJAX_KEY = "arjax"
_STACK_RUNTIME = ("dtype", "attention_impl", "remat", "scan_layers")
# The reference's eos_token_id default (HATArchitectureConfig), its special_token_dict's
# <|eot_id|>.
PUBLISHED_EOS = 192
LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# Every key the released config.json files (the reference's to_dict) and Hugging Face's
# PretrainedConfig write; any other key is refused, since it might change the math.
_STACK_KEYS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "intermediate_size",
        "max_position_embeddings",
        "rope_scaling",
        "rope_theta",
        "mlp_bias",
        "use_cache",
        "sliding_window",
        "transformers_version",
        "key_query_norm",
        "key_query_norm_per_head",
        "is_neox_style",
        "head_dim",
        "hidden_act",
        "attention_bias",
        "attention_dropout",
        "initializer_range",
        "pretraining_tp",
        "torch_dtype",
        "model_type",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "tie_word_embeddings",
        "cross_attention_config",
        "cross_attn_every_layer",
    }
)
_CROSS_KEYS = frozenset(
    {
        "hidden_size",
        "hidden_size_q",
        "hidden_size_kv",
        "num_attention_heads",
        "attention_num_kv_heads",
        "word_window_size",
        "key_query_norm",
        "key_query_norm_per_head",
    }
)
_TOP_KEYS = frozenset(
    {
        "encoder_config",
        "backbone_config",
        "decoder_config",
        "model_type",
        "transformers_version",
        "auto_map",
        "special_token_dict",
        "max_word_size",
        "sliding_window",
        "max_position_embeddings",
        "torch_dtype",
        "architectures",
        "eos_token_id",
        "_name_or_path",
        ARJAX_KEY,
    }
)

_LLAMA: tuple[tuple[str, Path_, Kind], ...] = (
    ("input_layernorm.weight", ("attn_norm", "scale"), "copy"),
    ("self_attn.q_proj.weight", ("attn", "q_proj", "kernel"), "heads_in"),
    ("self_attn.k_proj.weight", ("attn", "k_proj", "kernel"), "heads_in"),
    ("self_attn.v_proj.weight", ("attn", "v_proj", "kernel"), "heads_in"),
    ("self_attn.o_proj.weight", ("attn", "o_proj", "kernel"), "heads_out"),
    ("post_attention_layernorm.weight", ("mlp_norm", "scale"), "copy"),
    ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), "linear"),
    ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), "linear"),
    ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), "linear"),
)
_CROSS: tuple[tuple[str, Path_, Kind], ...] = (
    ("q_proj.weight", ("q_proj", "kernel"), "heads_in"),
    ("k_proj.weight", ("k_proj", "kernel"), "heads_in"),
    ("v_proj.weight", ("v_proj", "kernel"), "heads_in"),
    ("o_proj.weight", ("o_proj", "kernel"), "heads_out"),
)
_CROSS_NORMS: tuple[tuple[str, Path_, Kind], ...] = (
    ("norm_query.weight", ("q_norm", "scale"), "copy"),
    ("norm_key.weight", ("k_norm", "scale"), "copy"),
)


class CheckpointFormatError(ValueError):
    """A checkpoint's tensors do not match the expected names, shapes or dtypes."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """One published tensor <-> one arjax parameter (or one layer of a scanned stack).

    ``path`` None marks a tensor the reference creates but never uses (``shape`` given).
    """

    name: str
    path: Path_ | None
    kind: Kind = "copy"
    layer: int | None = None
    shape: tuple[int, ...] | None = None


# ----------------------------------------------------------------------------- config


def _required(sub: dict, where: str, *keys: str) -> None:
    for key in keys:
        check(key in sub, f"{where}.{key}", "missing from the HAT config.json")


def _known_keys(sub: dict, where: str, known: frozenset) -> None:
    for key in sub:
        check(
            key in known,
            f"{where}.{key}",
            "unknown key in the HAT config.json; arjax cannot tell whether it changes the "
            "model, so it refuses to convert",
        )


def _rope_scaling_from_published(value: Any, where: str) -> RopeScaling:
    if value is None:
        return RopeScaling()
    kind = value.get("rope_type", value.get("type")) if isinstance(value, dict) else None
    check(
        kind == "llama3",
        f"{where}.rope_scaling",
        f"arjax implements rope_type 'llama3' (Llama 3.1) only, got {value!r}",
    )
    _required(value, f"{where}.rope_scaling", *LLAMA3_ROPE)
    _known_keys(value, f"{where}.rope_scaling", frozenset({"rope_type", "type", *LLAMA3_ROPE}))
    return RopeScaling(
        factor=float(value["factor"]),
        low_freq_factor=float(value["low_freq_factor"]),
        high_freq_factor=float(value["high_freq_factor"]),
        original_max_position_embeddings=int(value["original_max_position_embeddings"]),
    )


def _rope_scaling_to_published(scaling: RopeScaling) -> dict | None:
    if scaling == RopeScaling():
        return None
    return {"rope_type": "llama3", **{k: getattr(scaling, k) for k in LLAMA3_ROPE}}


def _stack_from_published(
    sub: dict, where: str, final_norm: bool, **runtime: Any
) -> TransformerConfig:
    """A published Llama sub-config -> :class:`TransformerConfig` (unsupported: ConfigError).

    ``sliding_window`` ``w`` becomes ``window = w + 1`` (module docstring)."""
    _required(sub, where, "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size")  # fmt: skip
    _known_keys(sub, where, _STACK_KEYS)
    for key, ok, want in (
        ("mlp_bias", lambda v: not v, "false"),
        ("attention_bias", lambda v: not v, "false"),
        ("hidden_act", lambda v: v == "silu", "'silu'"),
        ("is_neox_style", lambda v: v, "true (half-split RoPE)"),
        ("key_query_norm", lambda v: not v, "false (no qk-norm inside Llama layers)"),
        ("tie_word_embeddings", lambda v: not v, "false"),
    ):
        if key in sub:
            check(ok(sub[key]), f"{where}.{key}", f"arjax supports only {want}, got {sub[key]!r}")
    heads = sub["num_attention_heads"]
    window = sub.get("sliding_window")
    check(
        window is None or (isinstance(window, int) and window >= 0),
        f"{where}.sliding_window",
        f"must be null or an int >= 0, got {window!r}",
    )
    return TransformerConfig(
        d_model=sub["hidden_size"],
        num_layers=sub["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=sub.get("num_key_value_heads", heads),
        head_dim=sub.get("head_dim") or sub["hidden_size"] // heads,
        mlp_dim=sub["intermediate_size"],
        window=None if window is None else window + 1,
        rope_theta=float(sub.get("rope_theta", 10_000.0)),
        rope_scaling=_rope_scaling_from_published(sub.get("rope_scaling"), where),
        norm_eps=float(sub.get("rms_norm_eps", 1e-6)),
        final_norm=final_norm,
        **runtime,
    )


def _cross_fields(enc: dict, dec: dict) -> dict[str, Any]:
    """The shared cross-attention shape of both connectors (they must agree)."""
    _required(enc, "encoder_config.cross_attention_config", "num_attention_heads", "hidden_size")
    for where, c in (("encoder_config", enc), ("decoder_config", dec)):
        _known_keys(c, f"{where}.cross_attention_config", _CROSS_KEYS)
    fields = {}
    for key in ("num_attention_heads", "attention_num_kv_heads", "hidden_size"):
        check(
            enc.get(key) == dec.get(key),
            f"decoder_config.cross_attention_config.{key}",
            f"arjax uses one cross-attention shape for both connectors; encoder has "
            f"{enc.get(key)!r}, decoder {dec.get(key)!r}",
        )
    heads = enc["num_attention_heads"]
    fields["cross_heads"] = heads
    fields["cross_kv_heads"] = enc.get("attention_num_kv_heads", heads)
    check(
        enc["hidden_size"] % heads == 0,
        "encoder_config.cross_attention_config.hidden_size",
        f"must be a multiple of num_attention_heads={heads}, got {enc['hidden_size']}",
    )
    fields["cross_head_dim"] = enc["hidden_size"] // heads
    norms = set()
    for where, c in (("encoder_config", enc), ("decoder_config", dec)):
        qk = bool(c.get("key_query_norm", False))
        if qk:
            check(
                bool(c.get("key_query_norm_per_head", False)),
                f"{where}.cross_attention_config.key_query_norm_per_head",
                "arjax normalises q/k per head only; got false with key_query_norm true",
            )
        norms.add(qk)
    check(
        len(norms) == 1,
        "decoder_config.cross_attention_config.key_query_norm",
        "must equal the encoder connector's setting",
    )
    fields["cross_qk_norm"] = norms.pop()
    return fields


def config_from_published(
    published: dict,
    *,
    max_seq_len: int | None = None,
    max_words: int | None = None,
    vocab_size: int | None = None,
    dtype: str | None = None,
) -> HATConfig:
    """A published HAT ``config.json`` dict -> :class:`HATConfig`.

    Fields the published format does not have (``max_seq_len``, ``max_words``, compute
    ``dtype``, ...) come from the file's ``"arjax"`` section when it was written by
    :func:`config_to_published`, else from the keyword arguments (defaults: 2048 bytes,
    ``max_seq_len // 4`` words, bfloat16). ``vocab_size`` larger than the published one
    adds rows (see :func:`params_from_published`), e.g. arjax's PAD/BOS/EOS ids. Unknown
    keys, unsupported settings and inconsistent shapes raise ``ConfigError`` naming the key.
    """
    _known_keys(published, "config.json", _TOP_KEYS)
    for key in ("encoder_config", "backbone_config", "decoder_config"):
        check(isinstance(published.get(key), dict), key, "missing from the HAT config.json")
    enc, bb, dec = (published[k] for k in ("encoder_config", "backbone_config", "decoder_config"))
    _required(enc, "encoder_config", "vocab_size", "cross_attention_config")
    _required(dec, "decoder_config", "cross_attention_config")
    extra = published.get(ARJAX_KEY, {})
    stacks = extra.get("stacks", {})
    runtime = lambda name: stacks.get(name, {"dtype": dtype or "bfloat16"})  # noqa: E731
    encoder = _stack_from_published(enc, "encoder_config", False, **runtime("encoder"))
    backbone = _stack_from_published(bb, "backbone_config", False, **runtime("backbone"))
    decoder = _stack_from_published(dec, "decoder_config", True, **runtime("decoder"))
    if dtype is not None:
        encoder, backbone, decoder = (
            dataclasses.replace(s, dtype=dtype) for s in (encoder, backbone, decoder)
        )
    check(
        enc.get("vocab_size") == dec.get("vocab_size"),
        "decoder_config.vocab_size",
        f"must equal encoder_config.vocab_size={enc.get('vocab_size')}, "
        f"got {dec.get('vocab_size')}",
    )
    seq = max_seq_len or extra.get("max_seq_len", 2048)
    pub_vocab = enc["vocab_size"]
    vocab = vocab_size or extra.get("vocab_size", pub_vocab)
    check(vocab >= pub_vocab, "vocab_size", f"must be >= published {pub_vocab}, got {vocab}")
    cross = _cross_fields(enc["cross_attention_config"], dec["cross_attention_config"])
    for where, stack in (("encoder_config", encoder), ("decoder_config", decoder)):
        check(
            stack.head_dim == cross["cross_head_dim"],
            f"{where}.cross_attention_config.hidden_size",
            f"the connector's head_dim ({cross['cross_head_dim']}) must equal the stack's "
            f"head_dim={stack.head_dim}: the reference rotates connector heads with the "
            "stack's rotary table",
        )
    eos = published.get("eos_token_id", PUBLISHED_EOS)
    check(
        isinstance(eos, int) and 0 <= eos < pub_vocab,
        "eos_token_id",
        f"must be an id < vocab_size={pub_vocab}, got {eos!r}",
    )
    return HATConfig(
        encoder=encoder,
        backbone=backbone,
        decoder=decoder,
        cross_attn_every_layer=bool(dec.get("cross_attn_every_layer", False)),
        max_word_bytes=int(published.get("max_word_size", 100)),
        max_words=max_words or extra.get("max_words", seq // 4),
        max_seq_len=seq,
        vocab_size=vocab,
        bos_id=extra.get("bos_id"),
        eos_id=extra.get("eos_id", eos),
        **cross,
    )


def _stack_to_published(s: TransformerConfig, vocab: int) -> dict:
    out = {
        "vocab_size": vocab,
        "hidden_size": s.d_model,
        "num_hidden_layers": s.num_layers,
        "num_attention_heads": s.num_heads,
        "num_key_value_heads": s.num_kv_heads,
        "rms_norm_eps": s.norm_eps,
        "intermediate_size": s.mlp_dim,
        "rope_theta": s.rope_theta,
        "rope_scaling": _rope_scaling_to_published(s.rope_scaling),
        "sliding_window": None if s.window is None else s.window - 1,
    }
    if s.head_dim * s.num_heads != s.d_model:
        out["head_dim"] = s.head_dim
    return out


def _stack_defaults(max_positions: int) -> dict:
    """Reference fields arjax does not model, at the reference's values."""
    return {
        "max_position_embeddings": max_positions,
        "mlp_bias": False,
        "use_cache": True,
        "key_query_norm": False,
        "key_query_norm_per_head": False,
        "is_neox_style": True,
        "hidden_act": "silu",
    }


def _check_exportable(config: HATConfig) -> None:
    for name in ("encoder", "backbone"):
        check(
            not getattr(config, name).final_norm,
            f"{name}.final_norm",
            "the published format has no final norm on this stack; must be False",
        )
    for name in ("encoder", "backbone", "decoder"):
        check(
            not getattr(config, name).qk_norm,
            f"{name}.qk_norm",
            "the published Llama layers have no qk-norm; must be False",
        )
        # The reference applies each byte stack's rotary embedding to the connectors' heads.
        if name != "backbone":
            check(
                getattr(config, name).head_dim == config.cross_head_dim,
                "cross_head_dim",
                f"must equal {name}.head_dim={getattr(config, name).head_dim} in the "
                f"published format, got {config.cross_head_dim}",
            )


def config_to_published(
    config: HATConfig, template: dict | None = None, *, vocab_size: int | None = None
) -> dict:
    """:class:`HATConfig` -> published ``config.json`` dict.

    With ``template`` (the original ``config.json``), its other keys are kept, so an
    unchanged config comes back identical. ``vocab_size`` writes a smaller published
    vocabulary (extra arjax rows are dropped by :func:`params_to_published`).
    """
    _check_exportable(config)
    vocab = vocab_size or config.vocab_size
    enc, bb, dec = config.encoder, config.backbone, config.decoder
    cross_size = config.cross_heads * config.cross_head_dim

    def cross(d_q: int, d_kv: int) -> dict:
        return {
            "hidden_size": cross_size,
            "hidden_size_q": d_q,
            "hidden_size_kv": d_kv,
            "num_attention_heads": config.cross_heads,
            "attention_num_kv_heads": config.cross_kv_heads,
            "key_query_norm": config.cross_qk_norm,
            "key_query_norm_per_head": config.cross_qk_norm,
        }

    arch = {
        "encoder_config": {
            **_stack_to_published(enc, vocab),
            "cross_attention_config": cross(bb.d_model, enc.d_model),
        },
        "backbone_config": _stack_to_published(bb, 0),
        "decoder_config": {
            **_stack_to_published(dec, vocab),
            "cross_attn_every_layer": config.cross_attn_every_layer,
            "cross_attention_config": cross(dec.d_model, bb.d_model),
        },
        "max_word_size": config.max_word_bytes,
    }
    if template is None:
        base = {
            "encoder_config": {
                **_stack_defaults(config.max_seq_len),
                "cross_attention_config": {"word_window_size": 1},
            },
            "backbone_config": _stack_defaults(config.max_words),
            "decoder_config": {
                **_stack_defaults(config.max_seq_len),
                "cross_attention_config": {"word_window_size": 1},
            },
            "model_type": "hierarchical_autoregressive_transformer",
            "architectures": ["HATDecoderForCausalLM"],
            "special_token_dict": {"<|eot_id|>": config.eos_id},
            "sliding_window": None if enc.window is None else enc.window - 1,
            "max_position_embeddings": config.max_seq_len,
            "torch_dtype": "bfloat16",
        }
    else:
        base = copy.deepcopy(template)
    out = _merge(base, arch)
    eos = config.eos_id
    if eos is not None and eos < vocab and out.get("eos_token_id", PUBLISHED_EOS) != eos:
        out["eos_token_id"] = eos
    out[ARJAX_KEY] = {
        "max_seq_len": config.max_seq_len,
        "max_words": config.max_words,
        "vocab_size": config.vocab_size,
        "bos_id": config.bos_id,
        "eos_id": config.eos_id,
        "stacks": {
            name: {k: getattr(getattr(config, name), k) for k in _STACK_RUNTIME}
            for name in ("encoder", "backbone", "decoder")
        },
    }
    if template is not None and ARJAX_KEY not in template:
        # Keep a published file published: record arjax settings only if it had them.
        del out[ARJAX_KEY]
    return out


def _merge(base: dict, new: dict) -> dict:
    out = dict(base)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _cli_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def run_overrides(config: HATConfig, base: HATConfig) -> list[str]:
    """``--set`` strings (``model.encoder.d_model=1024``, ...) that turn the preset ``base``
    into ``config``: how ``arjax train --model hat`` trains a converted architecture."""
    return _differences(config, base, "model.")


def _differences(new: Any, old: Any, prefix: str) -> list[str]:
    out = []
    for f in dataclasses.fields(new):
        a, b = getattr(new, f.name), getattr(old, f.name)
        if dataclasses.is_dataclass(a):
            out += _differences(a, b, f"{prefix}{f.name}.")
        elif a != b:
            out.append(f"{prefix}{f.name}={_cli_value(a)}")
    return out


# ----------------------------------------------------------------------------- tensors


def _stack_rules(prefix: str, path: Path_, stack: TransformerConfig) -> Iterator[Rule]:
    for i in range(stack.num_layers):
        for suffix, sub, kind in _LLAMA:
            if stack.scan_layers:
                yield Rule(f"{prefix}.{i}.{suffix}", (*path, "layers", *sub), kind, i)
            else:
                yield Rule(f"{prefix}.{i}.{suffix}", (*path, f"layers_{i}", *sub), kind)


def _cross_rules(prefix: str, path: Path_, qk_norm: bool) -> Iterator[Rule]:
    for suffix, sub, kind in _CROSS + (_CROSS_NORMS if qk_norm else ()):
        yield Rule(f"{prefix}.{suffix}", (*path, *sub), kind)


def rules(config: HATConfig) -> list[Rule]:
    """Every published tensor of ``config`` and where it lives in the arjax param tree."""
    out = [
        Rule("encoder.embedding_layer.weight", ("embedding", "embedding")),
        *_stack_rules("encoder.layers", ("encoder",), config.encoder),
        Rule("encoder_connector.latent_query", ("encoder_connector", "latent_query"), "vector"),
        *_cross_rules(
            "encoder_connector.cross_attention_encoder_connector",
            ("encoder_connector", "cross_attention"),
            config.cross_qk_norm,
        ),
        *_stack_rules("backbone.layers", ("backbone",), config.backbone),
        Rule("decoder_connector.first_word_embedding", ("first_word_embedding",), "vector"),
    ]
    for i in range(config.decoder.num_layers):
        pub, path = f"decoder.decoder_layers.{i}", ("decoder", f"decoder_layers_{i}")
        if i == 0 or config.cross_attn_every_layer:
            out += [
                Rule(f"{pub}.query_norm.weight", (*path, "query_norm", "scale")),
                Rule(f"{pub}.kv_norm.weight", (*path, "kv_norm", "scale")),
                *_cross_rules(f"{pub}.cross_attention", (*path, "cross_attention"),
                              config.cross_qk_norm),
            ]  # fmt: skip
        else:  # built but unused by the reference
            out += [
                Rule(f"{pub}.query_norm.weight", None, shape=(config.decoder.d_model,)),
                Rule(f"{pub}.kv_norm.weight", None, shape=(config.backbone.d_model,)),
            ]
        for suffix, sub, kind in _LLAMA:
            out.append(Rule(f"{pub}.llama_layer.{suffix}", (*path, "llama_layer", *sub), kind))
    out += [
        Rule("layer_norm.weight", ("decoder", "final_norm", "scale")),
        Rule("lm_head.weight", ("lm_head", "kernel"), "linear"),
    ]
    return out


def abstract_params(config: HATConfig) -> dict:
    """Shapes/dtypes of the arjax HAT params of ``config`` (no memory allocated)."""
    seq = min(8, config.max_seq_len, config.max_words)
    ids = jnp.ones((1, seq), jnp.int32)
    pos = jnp.arange(seq, dtype=jnp.int32)[None]
    batch = {
        "inputs": ids, "segment_ids": ids, "positions": pos, "word_ids": pos + 1,
        "word_segment_ids": ids, "word_positions": pos,
    }  # fmt: skip
    model = HAT(config)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), batch)["params"])
    return nn.meta.unbox(boxed)


def _flat(tree: dict, prefix: Path_ = ()) -> dict[Path_, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def _nest(flat: dict[Path_, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def _published_shape(kind: Kind, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Published tensor shape for an arjax parameter (one layer) of ``shape``."""
    if kind == "linear":
        return shape[::-1]
    if kind == "heads_in":
        return (shape[1] * shape[2], shape[0])
    if kind == "heads_out":
        return (shape[2], shape[0] * shape[1])
    if kind == "vector":
        return (1, 1, *shape)
    return shape


def _to_arjax(kind: Kind, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if kind == "linear":
        return x.T
    if kind == "heads_in":
        return rearrange(x, "(h d) i -> i h d", h=shape[1])
    if kind == "heads_out":
        return rearrange(x, "o (h d) -> h d o", h=shape[0])
    if kind == "vector":
        return x.reshape(shape)
    return x


def _to_published(kind: Kind, y: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return y.T
    if kind == "heads_in":
        return rearrange(y, "i h d -> (h d) i")
    if kind == "heads_out":
        return rearrange(y, "h d o -> o (h d)")
    if kind == "vector":
        return y[None, None]
    return y


def published_shapes(config: HATConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a published checkpoint of ``config`` holds."""
    return dict(_expected(config)[2])


@functools.cache
def _expected(config: HATConfig) -> tuple[list[Rule], dict[Path_, Any], dict[str, tuple]]:
    """Rules, abstract arjax leaves, and each published tensor's expected shape (cached per
    config; callers must not mutate them)."""
    table = rules(config)
    leaves = _flat(abstract_params(config))
    mapped = {r.path for r in table if r.path is not None}
    unmapped = sorted("/".join(p) for p in leaves if p not in mapped)
    stale = sorted("/".join(p) for p in mapped if p not in leaves)
    if unmapped or stale:  # the model's parameter names changed: fix the rule table
        raise RuntimeError(
            f"hat_checkpoint rules out of date with arjax.models.hat: unmapped {unmapped}, "
            f"missing in model {stale}"
        )
    shapes = {}
    for r in table:
        if r.path is None:
            shapes[r.name] = r.shape
            continue
        shape = tuple(leaves[r.path].shape)
        shapes[r.name] = _published_shape(r.kind, shape[1:] if r.layer is not None else shape)
    return table, leaves, shapes


def _vocab_rows(name: str) -> int | None:
    """Axis of the vocabulary in a published tensor (embedding / head), else None."""
    return 0 if name in ("encoder.embedding_layer.weight", "lm_head.weight") else None


def _check_tensors(
    shape_of: dict[str, tuple[int, ...]], is_float: dict[str, bool], config: HATConfig
) -> None:
    """Names, shapes and dtypes of a checkpoint against ``config`` (nothing read yet)."""
    table, _, shapes = _expected(config)
    names = {n for n in shape_of if not n.endswith(IGNORED_SUFFIXES)}
    missing = [r.name for r in table if r.name not in names]
    if missing:
        raise CheckpointFormatError(
            f"checkpoint is missing tensor {missing[0]!r} (expected shape "
            f"{shapes[missing[0]]}); {len(missing)} missing in all"
        )
    unexpected = sorted(names - set(shapes))
    if unexpected:
        raise CheckpointFormatError(
            f"checkpoint has unexpected tensor {unexpected[0]!r} "
            f"(shape {shape_of[unexpected[0]]}); {len(unexpected)} unexpected in "
            "all -- does config.json match the weights?"
        )
    for r in table:
        got, want = shape_of[r.name], shapes[r.name]
        if _vocab_rows(r.name) is not None and len(got) == 2 and got[0] < config.vocab_size:
            want = (got[0], want[1])  # published vocab smaller: rows added on load
        if got != want:
            raise CheckpointFormatError(
                f"tensor {r.name!r} has shape {got}, expected {want} for this config"
            )
        if not is_float[r.name]:
            raise CheckpointFormatError(f"tensor {r.name!r} has a non-float dtype")


def _layer_sharding(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of one layer of a ``[layers, ...]`` array sharded by ``sharding``."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:])
        )
    return sharding


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stack: jax.Array, layer: jax.Array, i: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stack, layer.astype(stack.dtype), i, 0)


def _host_tensor(
    get: Callable[[str], np.ndarray], r: Rule, shape: tuple[int, ...], *, dtype: Any, vocab: int
) -> np.ndarray:
    """Published tensor ``r.name`` in ``dtype`` and arjax layout ``shape`` (zero rows added
    up to ``vocab`` for embedding and head)."""
    x = np.asarray(get(r.name)).astype(dtype)
    if _vocab_rows(r.name) is not None and x.shape[0] < vocab:
        x = np.concatenate([x, np.zeros((vocab - x.shape[0], x.shape[1]), dtype)])
    return np.ascontiguousarray(_to_arjax(r.kind, x, shape))


def _load_params(
    get: Callable[[str], np.ndarray],
    config: HATConfig,
    dtype: Any,
    shardings: Any,
) -> dict:
    """Each arjax leaf built from the published tensors ``get(name)`` one tensor at a time:
    cast to ``dtype`` and placed with its sharding (scanned stacks are allocated on the
    devices and filled layer by layer in place), so the host holds one tensor at most."""
    table, leaves, _ = _expected(config)
    dtype = jnp.dtype(dtype)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    where = {}
    if shardings is not None:  # any pytree (dict, FrozenDict) of Sharding leaves
        is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731
        for keys, sharding in jax.tree_util.tree_leaves_with_path(shardings, is_sharding):
            where[tuple(str(getattr(k, "key", k)) for k in keys)] = sharding
        missing = sorted("/".join(p) for p in leaves if p not in where)
        if missing:
            raise ValueError(f"shardings: no entry for param {missing[0]!r}")
    by_path: dict[Path_, list[Rule]] = {}
    for r in table:
        if r.path is None:
            x = np.asarray(get(r.name))
            if not np.all(x == 1.0):
                warnings.warn(
                    f"{r.name} is unused by the reference forward pass and dropped, but is "
                    "not all ones: exporting again will write ones",
                    stacklevel=3,
                )
            continue
        by_path.setdefault(r.path, []).append(r)
    flat = {}
    for path, rs in by_path.items():
        shape, sharding = tuple(leaves[path].shape), where.get(path, default)

        host = functools.partial(_host_tensor, get, dtype=dtype, vocab=config.vocab_size)
        if rs[0].layer is None:
            flat[path] = jax.device_put(host(rs[0], shape), sharding)
            continue
        zeros = functools.partial(jnp.zeros, shape, dtype)
        stack = jax.jit(zeros, out_shardings=sharding)()
        for r in rs:
            layer = jax.device_put(host(r, shape[1:]), _layer_sharding(sharding))
            stack = _set_layer(stack, layer, r.layer)
        flat[path] = stack
    return _nest(flat)


def params_from_published(
    tensors: dict[str, np.ndarray],
    config: HATConfig,
    *,
    dtype: Any = "float32",
    shardings: Any = None,
) -> dict:
    """Published tensors -> arjax HAT params (nested dict of ``dtype`` device arrays, placed
    with ``shardings``, a matching pytree of :class:`jax.sharding.Sharding`; default: the
    first device).

    Raises :class:`CheckpointFormatError` naming the first missing, unexpected, mis-shaped
    or non-floating tensor. If ``config.vocab_size`` exceeds the published vocabulary,
    embedding and head get zero rows for the extra ids.
    """
    _check_tensors(
        {n: tuple(np.shape(x)) for n, x in tensors.items()},
        {n: jnp.issubdtype(np.asarray(x).dtype, jnp.floating) for n, x in tensors.items()},
        config,
    )
    return _load_params(tensors.__getitem__, config, dtype, shardings)


def _published_tensors(
    params: dict, config: HATConfig, dtype: Any, vocab_size: int | None
) -> Iterator[tuple[str, np.ndarray]]:
    """(name, tensor in ``dtype``) of every published tensor, one at a time: each layer of a
    scanned stack is sliced on its device and only that slice comes to the host."""
    _check_exportable(config)
    table, leaves, _ = _expected(config)
    given = _flat(params)
    for path, leaf in leaves.items():
        name = "/".join(path)
        if path not in given:
            raise CheckpointFormatError(f"arjax params are missing {name!r}")
        if tuple(np.shape(given[path])) != tuple(leaf.shape):
            raise CheckpointFormatError(
                f"arjax param {name!r} has shape {tuple(np.shape(given[path]))}, "
                f"expected {tuple(leaf.shape)} for this config"
            )
    extra = sorted("/".join(p) for p in given if p not in leaves)
    if extra:
        raise CheckpointFormatError(f"arjax params have unexpected entry {extra[0]!r}")
    np_dtype = jnp.dtype(dtype)
    for r in table:
        if r.path is None:
            yield r.name, np.ones(r.shape, np_dtype)
            continue
        leaf = given[r.path]
        y = np.asarray(leaf[r.layer] if r.layer is not None else leaf)
        y = _to_published(r.kind, y.astype(np.promote_types(y.dtype, np_dtype)))
        if vocab_size is not None and _vocab_rows(r.name) is not None:
            y = y[:vocab_size]
        yield r.name, np.ascontiguousarray(y.astype(np_dtype))


def params_to_published(
    params: dict, config: HATConfig, *, dtype: Any = "bfloat16", vocab_size: int | None = None
) -> dict[str, np.ndarray]:
    """arjax HAT params -> published tensors in ``dtype`` (``"float32"`` keeps every bit of
    float32 params, a bf16 checkpoint loaded as bf16 or float32 comes back bit-identical).

    ``vocab_size`` keeps only the first rows of embedding and head (dropping arjax ids the
    published vocabulary lacks). Raises :class:`CheckpointFormatError` naming a missing,
    unexpected or mis-shaped arjax parameter.
    """
    return dict(_published_tensors(params, config, dtype, vocab_size))


# ----------------------------------------------------------------------------- files

_ST_DTYPES = {
    "BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
    "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64, "U8": np.uint8,
    "BOOL": np.bool_,
}  # fmt: skip
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class SafetensorsReader:
    """The tensors of a ``.safetensors`` file, of a directory holding ``model.safetensors``,
    or of a sharded ``model.safetensors.index.json``: headers parsed up front, each tensor
    memory-mapped on request (nothing is read until its bytes are used)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_file():
            files = [path]
        elif (path / INDEX_FILE).is_file():
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
            files = [path / f for f in sorted(set(weight_map.values()))]
        elif (path / WEIGHTS_FILE).is_file():
            files = [path / WEIGHTS_FILE]
        else:
            raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE} or {INDEX_FILE}")
        self._entries: dict[str, tuple[Path, int, dict]] = {}
        for file in files:
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            for name, entry in header.items():
                if entry["dtype"] not in _ST_DTYPES:
                    raise CheckpointFormatError(f"tensor {name!r}: unknown dtype {entry['dtype']}")
                self._entries[name] = (file, 8 + size, entry)
        if (path / INDEX_FILE).is_file():
            missing = sorted(set(weight_map) - set(self._entries))
            if missing:
                raise CheckpointFormatError(
                    f"{INDEX_FILE} lists {missing[0]!r}, absent from shards"
                )

    def names(self) -> list[str]:
        return sorted(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][2]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(_ST_DTYPES[self._entries[name][2]["dtype"]])

    def __getitem__(self, name: str) -> np.ndarray:
        file, base, entry = self._entries[name]
        begin, end = entry["data_offsets"]
        if end == begin:
            return np.zeros(entry["shape"], self.dtype(name))
        return np.memmap(
            file, dtype=self.dtype(name), mode="r", offset=base + begin, shape=tuple(entry["shape"])
        )


def read_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint (see :class:`SafetensorsReader`) in host memory."""
    reader = SafetensorsReader(path)
    return {name: np.array(reader[name]) for name in reader.names()}


def _write_file(
    file: Path, entries: list[tuple[str, np.dtype, tuple[int, ...]]], tensors: Iterator
) -> None:
    """A ``.safetensors`` file whose header lists ``entries``, data streamed from ``tensors``
    (``(name, array)`` in the same order)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for (name, dtype, shape), (got, x) in zip(entries, tensors, strict=True):
            if got != name or x.dtype != dtype or tuple(x.shape) != shape:
                raise RuntimeError(f"stream out of order at {name!r}: got {got!r}")
            f.write(np.ascontiguousarray(x).reshape(-1).view(np.uint8).data)


def write_tensor_stream(
    directory: str | Path,
    entries: list[tuple[str, np.dtype, tuple[int, ...]]],
    tensors: Iterator,
    max_shard_bytes: int | None,
) -> None:
    """Write ``model.safetensors`` (or shards + index when over ``max_shard_bytes``) whose
    tensors are ``entries`` ``(name, dtype, shape)``, their data taken one at a time from
    ``tensors`` (``(name, array)`` pairs in the order of ``entries``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    nbytes = lambda e: int(np.prod(e[2], dtype=np.int64)) * e[1].itemsize  # noqa: E731
    total = sum(nbytes(e) for e in entries)
    if max_shard_bytes is None or total <= max_shard_bytes:
        _write_file(directory / WEIGHTS_FILE, entries, tensors)
        return
    shards: list[list] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + nbytes(e) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes(e)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_file(directory / file, shard, itertools.islice(tensors, len(shard)))
        weight_map.update(dict.fromkeys((e[0] for e in shard), file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def write_tensors(
    tensors: dict[str, np.ndarray], directory: str | Path, *, max_shard_bytes: int | None = None
) -> None:
    """Write ``model.safetensors``, or shards + index when over ``max_shard_bytes``."""
    names = sorted(tensors)
    entries = [(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names]
    write_tensor_stream(directory, entries, ((n, tensors[n]) for n in names), max_shard_bytes)


def load_published(
    path: str | Path,
    *,
    param_dtype: Any = "float32",
    shardings: Any = None,
    **config_kwargs: Any,
) -> tuple[dict, HATConfig, dict]:
    """A published HAT checkpoint directory -> (arjax params, HATConfig, its config.json).

    Streams: each tensor is memory-mapped, cast to ``param_dtype`` and placed with its
    sharding (``shardings``: a pytree of :class:`jax.sharding.Sharding` matching the params,
    e.g. from :func:`arjax.train.sharding.logical_shardings`; default the first device), so
    the host never holds more than one tensor beyond what the devices hold
    (``experiments/results/hat_convert.md``). ``config_kwargs`` go to
    :func:`config_from_published`.
    """
    path = Path(path)
    published = json.loads((path / CONFIG_FILE).read_text())
    config = config_from_published(published, **config_kwargs)
    reader = SafetensorsReader(path)
    names = reader.names()
    _check_tensors(
        {n: reader.shape(n) for n in names},
        {n: jnp.issubdtype(reader.dtype(n), jnp.floating) for n in names},
        config,
    )
    return _load_params(reader.__getitem__, config, param_dtype, shardings), config, published


def save_published(
    path: str | Path,
    params: dict,
    config: HATConfig,
    *,
    template: dict | None = None,
    dtype: Any = "bfloat16",
    max_shard_bytes: int | None = None,
) -> Path:
    """Write arjax HAT params as a published checkpoint directory (config.json + weights),
    streaming one tensor (one layer) at a time from the devices to the file.

    ``template``: the original ``config.json`` (from :func:`load_published`); its vocabulary
    size is kept, so rows arjax added for its special ids are dropped again.
    """
    path = Path(path)
    vocab = None if template is None else template["encoder_config"]["vocab_size"]
    published = config_to_published(config, template, vocab_size=vocab)
    shapes, np_dtype = published_shapes(config), np.dtype(jnp.dtype(dtype))
    entries = []
    for r in _expected(config)[0]:  # the order _published_tensors yields them in
        shape = shapes[r.name]
        if vocab is not None and _vocab_rows(r.name) is not None:
            shape = (min(vocab, shape[0]), *shape[1:])
        entries.append((r.name, np_dtype, shape))
    tensors = _published_tensors(params, config, dtype, vocab)
    write_tensor_stream(path, entries, tensors, max_shard_bytes)
    (path / CONFIG_FILE).write_text(json.dumps(published, indent=2) + "\n")
    return path
