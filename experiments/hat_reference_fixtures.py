"""Fixtures of the published HAT reference (``HATForCausalLM``) for arjax's CI tests.

Run where the reference code and PyTorch are importable (a throwaway venv; nothing of the
reference is bundled here)::

    python experiments/hat_reference_fixtures.py --reference DIR [--out tests/data/hat_reference]

``DIR`` holds the reference's ``model.py``, ``config.py``, ``norm.py`` and ``splitter.py``
(the Hugging Face remote code of the released TFree-HAT checkpoints). For each case of
:data:`CASES` -- a tiny random config in the released ``config.json`` format -- the script
draws bf16 weights, builds the reference model from that ``config.json``, loads the weights,
runs it in float64 on CPU and writes ``<case>/config.json``, ``<case>/model.safetensors``,
``<case>/logits_<i>.npy`` (float32 logits ``[bytes, 256]`` of each text) and
``fixtures.json`` (texts, the reference splitter's words, greedy continuations of
:data:`GREEDY_BYTES` bytes from the reference's uncached ``generate``, versions).

What it must supply to run the released code on a CPU, each documented in the fixtures'
README: ``flash_attn`` is replaced by :func:`varlen_attention` (exact attention over
``cu_seqlens`` segments, GQA by consecutive query heads, as flash-attention); the Llama layers
run transformers' flash-attention path with :func:`flash_forward` in place of
``_flash_attention_forward``: causal attention where ``sliding_window`` ``w`` lets a query see
keys ``p - w <= j <= p`` once the keys outnumber ``w`` (transformers 4.46 passes
``window_size=(w, w)`` to flash-attention); ``device="cuda"`` in the reference becomes
``"cpu"``; ``transformer_backbone.py``, when ``DIR`` has none, is transformers' own
``LlamaDecoderLayer`` / ``LlamaRotaryEmbedding``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.metadata
import json
import shutil
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

GREEDY_BYTES = 48
EOS = 192  # the released special_token_dict's <|eot_id|>
TEXTS = (
    "Grüße aus Köln: ça va? e\u0301te\u0301 🙂👍🏽 日本語. Привет!",
    "The quick fox (ε = 1e-6) jumps; ½ sleep… 😴",
)


def _stack(hidden, layers, heads, kv, mlp, theta, eps, window=None, scaling=None, vocab=256):
    return {
        "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "rms_norm_eps": eps,
        "intermediate_size": mlp, "max_position_embeddings": 4096, "rope_scaling": scaling,
        "rope_theta": theta, "mlp_bias": False, "use_cache": True, "sliding_window": window,
        "transformers_version": "4.46.3", "key_query_norm": False,
        "key_query_norm_per_head": False, "is_neox_style": True,
    }  # fmt: skip


def _cross(hidden, heads, kv, q, k, qk_norm):
    return {
        "hidden_size_q": q, "hidden_size_kv": k, "hidden_size": hidden,
        "num_attention_heads": heads, "attention_num_kv_heads": kv, "word_window_size": 1,
        "key_query_norm": qk_norm, "key_query_norm_per_head": qk_norm,
    }  # fmt: skip


LLAMA3 = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}  # fmt: skip


def _config(enc, bb, dec, every, qk_norm):
    byte, word = enc["hidden_size"], bb["hidden_size"]
    e, d = _cross(byte, 4, 2, word, byte, qk_norm), _cross(byte, 4, 2, byte, word, qk_norm)
    return {
        "encoder_config": {**enc, "cross_attention_config": e},
        "backbone_config": bb,
        "decoder_config": {**dec, "cross_attn_every_layer": every, "cross_attention_config": d},
        "model_type": "hierarchical_autoregressive_transformer",
        "transformers_version": "4.46.3",
        "auto_map": {"AutoConfig": "config.HATArchitectureConfig",
                     "AutoModelForCausalLM": "model.HATForCausalLM"},
        "special_token_dict": {"<|eot_id|>": EOS},
        "max_word_size": 100, "sliding_window": enc["sliding_window"],
        "max_position_embeddings": 4096, "torch_dtype": "bfloat16",
        "architectures": ["HATDecoderForCausalLM"],
    }  # fmt: skip


# Byte stacks: hidden 24, 4 heads of 6 (GQA: 2 KV heads); backbone: hidden 32, 4 heads of 8,
# 1 KV head. Every stack has its own rope theta and epsilon; windows far shorter than the texts.
CASES = {
    "every_layer": _config(
        _stack(24, 2, 4, 2, 48, 1_000.0, 0.05, window=7),
        _stack(32, 2, 4, 1, 64, 500_000.0, 1e-5, scaling=LLAMA3, vocab=0),
        _stack(24, 2, 4, 2, 48, 20_000.0, 0.02, window=5),
        every=True, qk_norm=True,
    ),
    "first_layer": _config(
        _stack(24, 1, 4, 2, 48, 50_000.0, 0.01, window=12),
        _stack(32, 2, 4, 1, 64, 10_000.0, 0.03, vocab=0),
        _stack(24, 3, 4, 4, 48, 2_000.0, 1e-6, window=9),
        every=False, qk_norm=False,
    ),
}  # fmt: skip


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     causal=False, softmax_scale=None, **unused):  # fmt: skip
    """flash-attention's ``flash_attn_varlen_func`` (no causal mask), exact, in q's dtype:
    q ``[total_q, heads, d]``, k/v ``[total_k, kv_heads, d]``."""
    import torch

    assert not causal and not unused.get("window_size")
    rep = q.shape[1] // k.shape[1]
    scale = softmax_scale or q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    for i in range(len(cu_seqlens_q) - 1):
        qs = slice(int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]))
        ks = slice(int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1]))
        kk = k[ks].repeat_interleave(rep, dim=1)
        vv = v[ks].repeat_interleave(rep, dim=1)
        p = torch.softmax(torch.einsum("qhd,khd->hqk", q[qs], kk) * scale, dim=-1)
        out[qs] = torch.einsum("hqk,khd->qhd", p, vv)
    return out


def flash_forward(q, k, v, attention_mask, query_length, is_causal, dropout=0.0,
                  softmax_scale=None, sliding_window=None, **unused):  # fmt: skip
    """transformers' ``_flash_attention_forward`` with flash-attention's masks, exact:
    ``[batch, len, heads, d]``; causal bottom-right aligned; ``sliding_window`` w adds
    ``window_size=(w, w)`` when the keys outnumber w (as transformers 4.46 does)."""
    import torch

    assert attention_mask is None and dropout == 0.0
    rep = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scale = softmax_scale or q.shape[-1] ** -0.5
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    lq, lk = q.shape[1], k.shape[1]
    i = torch.arange(lq)[:, None] + (lk - lq)
    j = torch.arange(lk)[None, :]
    see = (j <= i) if is_causal else torch.ones(lq, lk, dtype=torch.bool)
    if sliding_window is not None and lk > sliding_window:
        see &= (j >= i - sliding_window) & (j <= i + sliding_window)
    s = s.masked_fill(~see, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), vv)


def import_reference(directory: Path):
    """The reference package, from a temporary copy with ``cuda`` devices set to ``cpu``."""
    from transformers.models.llama import modeling_llama

    fake = types.ModuleType("flash_attn")
    fake.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    fake.flash_attn_interface = types.ModuleType("flash_attn.flash_attn_interface")
    fake.flash_attn_interface.flash_attn_varlen_func = varlen_attention
    sys.modules["flash_attn"] = fake
    sys.modules["flash_attn.flash_attn_interface"] = fake.flash_attn_interface
    modeling_llama._flash_attention_forward = flash_forward
    # The released configs ask for flash-attention; the layers call no mask builder, so the
    # eager class (no mask without one) must not be used.
    modeling_llama.LLAMA_ATTENTION_CLASSES["eager"] = modeling_llama.LlamaFlashAttention2
    tmp = Path(tempfile.mkdtemp()) / "hat_reference_code"
    shutil.copytree(directory, tmp)
    for py in tmp.glob("*.py"):
        text = py.read_text()
        text = text.replace('device="cuda"', 'device="cpu"')
        py.write_text(text.replace('torch.device("cuda")', 'torch.device("cpu")'))
    (tmp / "__init__.py").touch()
    if not (tmp / "transformer_backbone.py").exists():
        (tmp / "transformer_backbone.py").write_text(
            "from transformers.models.llama.modeling_llama import (  # noqa: F401\n"
            "    LlamaDecoderLayer, LlamaRotaryEmbedding)\n"
        )
    sys.path.insert(0, str(tmp.parent))
    return importlib.import_module("hat_reference_code.model")


def draw_weights(model, seed: int) -> dict:
    """bf16 weights: linear N(0, 1/fan_in) (the head 3x wider on printable ASCII, so that
    greedy text forms words), embeddings N(0, 1), norms 1 + N(0, 0.3), but ones for the
    query/kv norms the reference builds in decoder layers without cross-attention."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.named_parameters():
        x = torch.randn(p.shape, generator=g, dtype=torch.float64)
        layer = model.get_submodule(name.rsplit(".", 2)[0])
        if "norm" in name and not getattr(layer, "add_cross_attention", True):
            x = torch.ones_like(x)
        elif "norm" in name:
            x = 1.0 + 0.3 * x
        elif p.ndim == 2 and "embedding" not in name:
            x = x / p.shape[1] ** 0.5
        if name == "lm_head.weight":
            x[32:127] *= 3.0
            x[:32] *= 0.3
            x[127:] *= 0.3
        out[name] = x.to(torch.bfloat16)
    return out


def run_case(ref, name: str, published: dict, out: Path, seed: int) -> dict:
    import torch
    from safetensors.torch import save_file

    config = ref.HATArchitectureConfig.from_dict(json.loads(json.dumps(published)))
    model = ref.HATForCausalLM(config)
    weights = draw_weights(model, seed)
    model.load_state_dict({k: v.to(torch.float64) for k, v in weights.items()}, strict=True)
    model = model.to(torch.float64).eval()
    (out / name).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, out / name / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    (out / name / "config.json").write_text(json.dumps(published, indent=2) + "\n")
    result = {"texts": []}
    for i, text in enumerate(TEXTS):
        words = model.splitter.encode(text)
        ids, cu, logits = reference_logits(model, words)
        np.save(out / name / f"logits_{i}.npy", logits.numpy().astype(np.float32))
        completion, _ = model._generate_uncached(ids, GREEDY_BYTES, cu)
        greedy, gaps = greedy_bytes(model, words)
        assert model.splitter.decode(greedy) == completion, (greedy, completion)
        result["texts"].append({
            "text": text, "words": [bytes(w).decode("utf-8", "replace") for w in words],
            "word_lengths": list(map(len, words)), "greedy": greedy,
            "greedy_min_top2_gap": gaps,
        })  # fmt: skip
        print(f"{name} text {i}: {ids.shape[1]} bytes, {len(words)} words, greedy "
              f"{bytes(greedy)!r} (min top-2 logit gap {gaps:.3g})")  # fmt: skip
    return result


def reference_logits(model, words: list[list[int]]):
    """(byte ids ``[1, bytes]``, word boundaries ``cu_seqlens``, logits ``[bytes, vocab]``)
    of the reference's forward over ``words`` (one document)."""
    import torch

    ids = torch.tensor([sum(words, [])])
    cu = torch.tensor(np.cumsum([0, *map(len, words)]), dtype=torch.int32)
    with torch.no_grad():
        logits = model(
            ids, byte_position_ids=torch.arange(ids.shape[1])[None],
            cumulative_seq_lengths_per_word=cu, word_position_ids=torch.arange(len(words))[None],
        ).logits[0]  # fmt: skip
    return ids, cu, logits


def greedy_bytes(model, words: list[list[int]]) -> tuple[list[int], float]:
    """The reference's uncached greedy loop (argmax of the last logits, stop at EOS, words
    re-split by ``_append_byte``) keeping the bytes, and the smallest top-1 minus top-2
    logit over its steps (float32 rounding must stay far below it)."""
    import torch

    cur = [list(w) for w in words]
    out, gap = [], float("inf")
    while len(out) < GREEDY_BYTES:
        top = torch.topk(reference_logits(model, cur)[2][-1], 2)
        gap = min(gap, float(top.values[0] - top.values[1]))
        byte = int(top.indices[0])
        if byte == EOS:
            break
        out.append(byte)
        cur = model._append_byte(cur, byte)
    return out, gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("tests/data/hat_reference"))
    args = parser.parse_args()
    import torch
    import transformers

    torch.set_num_threads(1)  # tiny models: threads only contend
    ref = import_reference(args.reference)
    cases = {}
    for seed, (name, published) in enumerate(CASES.items()):
        cases[name] = run_case(ref, name, json.loads(json.dumps(published)), args.out, 10 + seed)
    versions = {
        "torch": torch.__version__, "transformers": transformers.__version__,
        "hat_splitter": importlib.metadata.version("hat-splitter"),
        "numpy": np.__version__, "python": sys.version.split()[0],
    }  # fmt: skip
    meta = {"greedy_bytes": GREEDY_BYTES, "eos": EOS, "versions": versions, "cases": cases}
    (args.out / "fixtures.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
