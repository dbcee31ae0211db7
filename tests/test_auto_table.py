"""``impl="auto"`` follows the measured table, and the table follows its measurements."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import pathlib
import types

import jax
import jax.numpy as jnp
import pytest

from arjax.ops import auto_table
from arjax.ops.linear_attention import resolve_impl as scan_resolve_impl
from arjax.ops.measured import device_family, measured_choice

ROOT = pathlib.Path(__file__).resolve().parents[1]
attention_mod = importlib.import_module("arjax.ops.attention")


def _generator():
    spec = importlib.util.spec_from_file_location(
        "make_auto_table", ROOT / "experiments" / "make_auto_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_table_is_what_the_results_give():
    """Regenerating from the committed benchmark JSON gives the committed table: a hand edit
    of ``auto_table.py``, or a new results file without regenerating, fails here."""
    gen = _generator()
    results = ROOT / "experiments" / "results"
    att = json.loads((results / "bench_attention.json").read_text())
    scan = json.loads((results / gen.SCAN_RESULTS).read_text())
    gdn = json.loads((results / "bench_gated_delta.json").read_text())
    dec = json.loads((results / "bench_decode_attention.json").read_text())
    assert gen.attention_rows(att) == auto_table.ATTENTION
    assert gen.decode_rows(dec) == auto_table.DECODE
    assert gen.scan_rows(scan) == auto_table.SCAN
    assert auto_table.SOURCES["scan"].startswith(f"experiments/results/{gen.SCAN_RESULTS} (")
    assert gen.gated_delta_rows(gdn) == auto_table.GATED_DELTA


def test_table_rows_are_the_fastest_measured():
    """Independently of the generator: every dense causal row's fwd+bwd entry names the
    faster of cuDNN and arjax's Hopper default (Mosaic GPU) in the raw numbers."""
    bench = json.loads((ROOT / "experiments" / "results" / "bench_attention.json").read_text())
    for row in bench["dense"]:
        if row["mode"] != "fwd+bwd":
            continue
        faster = "pallas" if row["arjax_mosaic_ms"] < row["cudnn_ms"] else "cudnn"
        assert auto_table.ATTENTION["hopper", row["D"], "causal", row["L"]]["fwd+bwd"] == faster


def test_scan_table_takes_the_fused_forward_where_it_was_faster():
    """Independently of the generator: each scan row's fwd+bwd entry names the faster of the
    Triton kernel and the fused Mosaic GPU forward (with Triton's backward) in the raw numbers.
    In the committed run that is the fused forward at both lengths, for scalar decay (0.794 vs
    0.873 ms at (8,16,2048), 0.965 vs 1.067 at (2,16,8192)) and for GLA (1.593 vs 1.676, 1.772
    vs 1.963)."""
    bench = json.loads((ROOT / "experiments" / "results" / _generator().SCAN_RESULTS).read_text())
    gates = {"none": "none", "scalar": "scalar", "gla": "gated"}  # bench variant -> table gate
    for row in bench["rows"]:
        mosaic = row.get("mosaic fwd+bwd", float("inf"))
        faster = "pallas_mosaic" if mosaic < row["pallas fwd+bwd"] else "pallas"
        key = ("hopper", gates[row["variant"]], row["shape"][2])
        assert auto_table.SCAN[key]["fwd+bwd"] == faster
    fused = {
        key[1:] for key, modes in auto_table.SCAN.items() if modes["fwd+bwd"] == "pallas_mosaic"
    }
    assert fused == {("scalar", 2048), ("scalar", 8192), ("gated", 2048), ("gated", 8192)}


def test_measured_choice_takes_the_nearest_length_within_an_octave():
    table = {
        ("hopper", 64, "causal", 2048): {"fwd+bwd": "cudnn"},
        ("hopper", 64, "causal", 32768): {"fwd+bwd": "pallas"},
    }
    kind = "NVIDIA H200"
    assert measured_choice(table, kind, (64, "causal"), 4096) == "cudnn"  # 1 vs 3 octaves
    assert measured_choice(table, kind, (64, "causal"), 16384) == "pallas"  # 3 vs 1 octaves
    assert measured_choice(table, kind, (64, "causal"), 1024) == "cudnn"  # 1 octave
    assert measured_choice(table, kind, (64, "causal"), 1023) is None  # > 1 octave from any
    assert measured_choice(table, kind, (64, "causal"), 5) is None
    assert measured_choice(table, kind, (128, "causal"), 2048) is None
    assert measured_choice(table, "NVIDIA A100", (64, "causal"), 2048) is None
    assert device_family("NVIDIA H100 80GB HBM3") == "hopper"


@pytest.fixture
def on_h200(monkeypatch):
    """Pretend the default backend is one H200 (only what ``resolve_impl`` reads)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(device_kind="NVIDIA H200")])
    monkeypatch.setattr(attention_mod, "_pallas_available", lambda: True)


def _qk(length, d, dtype=jnp.bfloat16, kv_len=None):
    q = jax.ShapeDtypeStruct((2, length, 4, d), dtype)
    k = jax.ShapeDtypeStruct((2, kv_len or length, 2, d), dtype)
    return q, k


@pytest.mark.parametrize(
    "length, d, dtype, kv_len, causal, window, segments, expected",
    [
        (8192, 64, jnp.bfloat16, None, True, None, False, "pallas"),  # measured: Pallas
        (6000, 128, jnp.bfloat16, None, True, None, False, "pallas"),  # nearest: 8192
        (8192, 128, jnp.bfloat16, None, True, 512, False, "pallas"),  # window row
        (8192, 128, jnp.bfloat16, None, True, None, True, "pallas"),  # segments: no cuDNN
        (2048, 64, jnp.float32, None, True, None, False, "pallas"),  # cuDNN can't: fp32
        (2048, 256, jnp.bfloat16, None, True, None, False, "pallas"),  # unmeasured, no cuDNN
        (2048, 64, jnp.bfloat16, None, False, None, False, "cudnn"),  # unmeasured: fallback
        (16, 64, jnp.bfloat16, 2048, False, None, False, "cudnn"),  # not self-attention
        (5, 64, jnp.bfloat16, None, True, None, False, "cudnn"),  # far from measured: fallback
    ],
)
def test_attention_auto_follows_the_table(
    on_h200, length, d, dtype, kv_len, causal, window, segments, expected
):
    q, k = _qk(length, d, dtype, kv_len)
    seg = jax.ShapeDtypeStruct((2, length), jnp.int32) if segments else None
    got = attention_mod.resolve_impl(
        q, k, causal=causal, q_segment_ids=seg, impl="auto", window=window
    )
    assert got == expected


@pytest.fixture
def scan_kernels(on_h200, monkeypatch):
    """``on_h200``, with the scan's Pallas kernels importable."""
    la = importlib.import_module("arjax.ops.linear_attention")
    monkeypatch.setattr(la, "_pallas_available", lambda: True)


def test_scan_auto_follows_the_table(scan_kernels, monkeypatch):
    """On an H200 a bf16 scan with dk = dv = 128 and chunk 64 (what the fused forward runs) takes
    what ``auto_table.SCAN`` measured faster near its length: the fused forward for scalar
    decay and GLA gates; the Triton kernel, unmeasured, for no decay or a far length."""
    resolve = functools.partial(
        scan_resolve_impl, "chunked", "auto", (128, 128, 64), dtype=jnp.bfloat16
    )
    assert resolve(gate="scalar", seq_len=2048) == "pallas_mosaic"
    assert resolve(gate="scalar", seq_len=6000) == "pallas_mosaic"  # nearest: 8192
    assert resolve(gate="scalar", seq_len=64) == "pallas"  # 5 octaves from any measurement
    assert resolve(gate="gated", seq_len=2048) == "pallas_mosaic"
    assert resolve(gate="none", seq_len=2048) == "pallas"
    monkeypatch.setattr(auto_table, "SCAN", {("hopper", "scalar", 2048): {"fwd+bwd": "xla"}})
    assert resolve(gate="scalar", seq_len=2048) == "xla"
    assert resolve(gate="gated", seq_len=2048) == "pallas"


@pytest.mark.parametrize(
    "dims, gate, dtype, expected",
    [
        ((128, 128, 64), "scalar", jnp.bfloat16, "pallas_mosaic"),
        ((64, 256, 64), "none", jnp.float16, "pallas_mosaic"),
        ((128, 128, 64), "scalar", jnp.float32, "pallas"),  # bf16/fp16 only
        ((128, 128, 64), "gated", jnp.bfloat16, "pallas_mosaic"),
        ((128, 128, 64), "gated", jnp.float32, "pallas"),
        ((32, 128, 64), "scalar", jnp.bfloat16, "pallas"),  # dk 64 or 128
        ((128, 32, 64), "scalar", jnp.bfloat16, "pallas"),  # dv a multiple of 64
        ((128, 128, 32), "scalar", jnp.bfloat16, "pallas"),  # chunk 64
    ],
)
def test_scan_auto_takes_the_fused_forward_only_where_it_runs(
    scan_kernels, monkeypatch, dims, gate, dtype, expected
):
    """Where the table names the fused forward for every gate, ``impl="auto"`` takes it only
    for calls it supports; the others get the Triton kernel, as before it existed."""
    fused = {("hopper", g, 2048): {"fwd+bwd": "pallas_mosaic"} for g in ("none", "scalar", "gated")}
    monkeypatch.setattr(auto_table, "SCAN", fused)
    got = scan_resolve_impl("chunked", "auto", dims, gate=gate, seq_len=2048, dtype=dtype)
    assert got == expected


@pytest.mark.parametrize(
    "backend, kind, expected",
    [("gpu", "NVIDIA A100", "pallas"), ("tpu", "TPU v5 lite", "pallas"), ("cpu", "cpu", "xla")],
)
def test_scan_auto_takes_the_fused_forward_only_on_hopper(
    scan_kernels, monkeypatch, backend, kind, expected
):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(device_kind=kind)])
    got = scan_resolve_impl(
        "chunked", "auto", (128, 128, 64), gate="scalar", seq_len=2048, dtype=jnp.bfloat16
    )
    assert got == expected


def test_gated_delta_auto_follows_the_table(on_h200, monkeypatch):
    """The gated delta rule's ``impl="auto"`` takes the jnp chunked form where it was measured
    faster for training, the kernel where the kernel was (and on unmeasured devices), its fused
    forward where that was fastest and runs the call (bf16, not float32)."""
    gd = importlib.import_module("arjax.ops.gated_delta_rule")
    table = {("hopper", 2048): {"fwd+bwd": "pallas"}, ("hopper", 8192): {"fwd+bwd": "xla"},
             ("hopper", 32768): {"fwd+bwd": "pallas_mosaic"}}  # fmt: skip
    monkeypatch.setattr(auto_table, "GATED_DELTA", table)
    dims = (128, 128, 64)
    assert gd.resolve_impl("chunked", "auto", dims, seq_len=2048) == "pallas"
    assert gd.resolve_impl("chunked", "auto", dims, seq_len=16384) == "xla"  # nearest: 8192
    assert gd.resolve_impl("chunked", "auto", (96, 128, 64), seq_len=2048) == "xla"  # tiles
    bf16 = dict(seq_len=32768, dtype=jnp.bfloat16)
    assert gd.resolve_impl("chunked", "auto", dims, **bf16) == "pallas_mosaic"
    assert gd.resolve_impl("chunked", "auto", dims, seq_len=32768) == "pallas"  # float32
    assert gd.resolve_impl("chunked", "auto", (128, 128, 32), **bf16) == "pallas"  # chunk 32
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(device_kind="NVIDIA A100")])
    assert gd.resolve_impl("chunked", "auto", dims, seq_len=8192) == "pallas"  # unmeasured


@pytest.mark.parametrize(
    "batch, cache_len, d, expected",
    [
        (1, 256, 128, "pallas"),  # measured: the kernel (12.5 vs 28 us)
        (64, 256, 128, "xla"),  # 16k cache rows: XLA
        (1, 16384, 128, "xla"),
        (64, 4096, 128, "xla"),
        (2, 1024, 128, "pallas"),  # 2048 rows: nearest measured 1024 (first of two at 1 octave)
        (64, 256, 64, "pallas"),  # head dim never measured: the rule (no cuDNN decode)
        (512, 16384, 128, "pallas"),  # 8M rows, 3 octaves past any measurement: the rule
    ],
)
def test_decode_auto_follows_the_table(on_h200, monkeypatch, batch, cache_len, d, expected):
    """``decode_attention(impl="auto")`` on an H200 runs what ``auto_table.DECODE`` measured
    faster for its head dim and cache rows; unmeasured classes keep ``resolve_impl``'s rule."""
    ran = []
    monkeypatch.setattr(attention_mod, "_attention_xla", lambda *a, **k: ran.append("xla"))
    kernels = importlib.import_module("kernels_pallas.flash_attention")
    monkeypatch.setattr(kernels, "flash_decode", lambda *a, **k: ran.append("pallas"))
    monkeypatch.setattr(attention_mod, "shard_batch_heads", lambda fn, heads, b, *a: fn(*a))
    monkeypatch.setattr(attention_mod, "_cudnn_supported", lambda *a, **k: False)
    q = jax.ShapeDtypeStruct((batch, 1, 4, d), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((batch, cache_len, 2, d), jnp.bfloat16)
    visible = jax.ShapeDtypeStruct((batch, cache_len), bool)
    jax.eval_shape(lambda q, k, m: attention_mod.decode_attention(q, k, k, kv_visible=m),
                   q, k, visible)  # fmt: skip
    assert ran == [expected]
