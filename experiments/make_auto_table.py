"""Regenerate ``arjax/ops/auto_table.py``: what ``impl="auto"`` picks, from measurements.

Reads the newest ``experiments/bench_attention.py``, ``experiments/bench_scan.py``,
``experiments/bench_gated_delta.py`` and ``experiments/bench_decode_attention.py`` results
(``experiments/results/bench_attention.json``, ``bench_decode_attention.json``,
:data:`SCAN_RESULTS` and :data:`GATED_DELTA_RESULTS`) and keeps, for every measured call
class, the implementation with the smallest forward+backward time (training dominates; a
forward-only winner is recorded beside it for the record; decoding has only a forward). The
scan's candidates come from one run, :data:`SCAN_RESULTS`: the newest holding the fused
Mosaic GPU forward's (``mosaic``) columns beside the Triton kernel's (``pallas``); it has no
jnp column, but in ``bench_scan.json`` (2026-11-26) the jnp chunked form was 3.8-8.9x slower
than the Triton kernel fwd+bwd (6.8-8.9x forward), so leaving it out loses nothing. Run after
a new benchmark run and commit both:

    python experiments/make_auto_table.py && ruff format arjax/ops/auto_table.py

``tests/test_auto_table.py`` regenerates the table from the committed JSON and fails when the
committed module differs, so the table cannot drift from its measurements.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import pprint

from arjax.ops.measured import device_family

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
TABLE = ROOT / "arjax" / "ops" / "auto_table.py"
SCAN_RESULTS = "bench_scan_mosaic.json"  # one run: the newest with the fused forward's columns
# one run: the newest with the pallas, mosaic and jnp columns
GATED_DELTA_RESULTS = "bench_gated_delta_idle.json"
# arjax impl -> its column prefix in bench_scan / bench_gated_delta rows
OWN_IMPLS = {"pallas": "pallas", "xla": "jnp"}
# with the fused Hopper forward: "pallas" is the Triton lowering (scan and gated delta rule)
SCAN_IMPLS = {**OWN_IMPLS, "pallas_mosaic": "mosaic"}


def _mosaic_ms(row: dict, key: str) -> float | None:
    """The time of ``impl="pallas"`` on Hopper: its default lowering is Mosaic GPU for the
    benchmarked head dims (``kernels_pallas.flash_attention.tuning.gpu_lowering``)."""
    return row.get("arjax_mosaic_ms" if key == "dense" else "arjax_pallas_ms")


def attention_rows(bench: dict) -> dict:
    """``{(family, head_dim, mask, seq_len): {"fwd+bwd": impl, "fwd": impl}}``."""
    family = device_family(bench["meta"]["device"])
    table: dict = {}

    def put(mask: str, row: dict, times: dict[str, float | None]) -> None:
        times = {impl: ms for impl, ms in times.items() if ms is not None}
        if times:
            key = (family, int(row["D"]), mask, int(row["L"]))
            table.setdefault(key, {})[row["mode"]] = min(times, key=times.get)

    for row in bench["dense"]:
        put("causal", row, {"cudnn": row.get("cudnn_ms"), "pallas": _mosaic_ms(row, "dense")})
    for row in bench["sparse"]:
        if row["case"].startswith("window"):
            times = {"cudnn": row.get("cudnn_window_ms"), "pallas": row.get("arjax_pallas_ms")}
            put("window", row, times)
        else:  # packed documents: cuDNN takes no segment ids, only arjax's kernel is a candidate
            put("segments", row, {"pallas": row.get("arjax_pallas_ms")})
    return table


def _own_impls(row: dict, mode: str, impls: dict[str, str] = OWN_IMPLS) -> dict[str, float]:
    """arjax's candidates in a ``bench_scan``/``bench_gated_delta`` row, of ``impls`` (impl ->
    column prefix) those the row has: by default the ``"pallas"`` kernel and ``"xla"`` (the jnp
    chunked form)."""
    times = {impl: row.get(f"{column} {mode}") for impl, column in impls.items()}
    return {impl: ms for impl, ms in times.items() if ms is not None}


def scan_rows(bench: dict) -> dict:
    """``{(family, gate, seq_len): {"fwd+bwd": impl, "fwd": impl}}`` over arjax's own impls
    (:data:`SCAN_IMPLS`); the no-decay (``"none"``), ``"scalar"`` decay and GLA's ``"gated"``
    rows of ``bench_scan``."""
    family = device_family(bench["device"])
    gates = {"none": "none", "scalar": "scalar", "gla": "gated"}
    table: dict = {}
    for row in bench["rows"]:
        for mode in ("fwd", "fwd+bwd"):
            if times := _own_impls(row, mode, SCAN_IMPLS):
                key = (family, gates[row["variant"]], int(row["shape"][2]))
                table.setdefault(key, {})[mode] = min(times, key=times.get)
    return table


def gated_delta_rows(bench: dict) -> dict:
    """``{(family, seq_len): {"fwd+bwd": impl, "fwd": impl}}`` over arjax's own impls
    (:data:`SCAN_IMPLS`), from ``bench_gated_delta`` (gated rows; DeltaNet, without decay, does
    the same work)."""
    family = device_family(bench["device"])
    table: dict = {}
    for row in bench["rows"]:
        for mode in ("fwd", "fwd+bwd"):
            if times := _own_impls(row, mode, SCAN_IMPLS):
                table.setdefault((family, int(row["shape"][2])), {})[mode] = min(
                    times, key=times.get
                )
    return table


def decode_rows(bench: dict) -> dict:
    """``{(family, head_dim, kv_rows): {"fwd": impl}}`` from ``bench_decode_attention``:
    ``kv_rows`` = batch x cache length, the cache rows one call reads per KV head; where rows
    share it, the impl with the smaller summed time."""
    family = device_family(bench["metadata"]["device"])
    sums: dict = {}
    for row in bench["rows"]:
        key = (family, int(row["head_dim"]), int(row["batch"]) * int(row["cache_len"]))
        for impl in ("xla", "pallas"):
            sums.setdefault(key, {}).setdefault(impl, 0.0)
            sums[key][impl] += row[f"{impl}_us"]
    return {key: {"fwd": min(times, key=times.get)} for key, times in sums.items()}


def render(
    attention: dict, scan: dict, gated_delta: dict, decode: dict, sources: dict[str, str]
) -> str:
    lines = [
        '"""What ``impl="auto"`` picks where it was measured. GENERATED by',
        "``experiments/make_auto_table.py`` from the benchmark results named in ``SOURCES``;",
        "do not edit by hand (``tests/test_auto_table.py`` checks it matches them).",
        "",
        "``ATTENTION``: ``(device family, head_dim, mask, seq_len) -> {mode: impl}`` with mask",
        '``"causal"``, ``"window"`` or ``"segments"``; ``SCAN``: ``(device family, gate, seq_len)',
        "-> {mode: impl}``; ``GATED_DELTA``: ``(device family, seq_len) -> {mode: impl}``;",
        '``mode`` is ``"fwd+bwd"`` (what auto uses) or ``"fwd"``. ``DECODE``: ``(device family,',
        'head_dim, batch x cache_len) -> {"fwd": impl}`` for one-token decode attention.',
        '"""',
        "",
        f"SOURCES = {pprint.pformat(sources, width=92)}",
        "",
        f"ATTENTION = {pprint.pformat(attention, width=92)}",
        "",
        f"SCAN = {pprint.pformat(scan, width=92)}",
        "",
        f"GATED_DELTA = {pprint.pformat(gated_delta, width=92)}",
        "",
        f"DECODE = {pprint.pformat(decode, width=92)}",
        "",
    ]
    return "\n".join(lines)


def build() -> str:
    att = json.loads((RESULTS / "bench_attention.json").read_text())
    scan = json.loads((RESULTS / SCAN_RESULTS).read_text())
    gdn = json.loads((RESULTS / GATED_DELTA_RESULTS).read_text())
    dec = json.loads((RESULTS / "bench_decode_attention.json").read_text())
    sources = {
        "attention": f"experiments/results/bench_attention.json ({att['meta']['date']})",
        "scan": f"experiments/results/{SCAN_RESULTS} ({scan['date']})",
        "gated_delta": f"experiments/results/{GATED_DELTA_RESULTS} ({gdn['date']})",
        "decode": f"experiments/results/bench_decode_attention.json "
        f"({dec['metadata']['date_utc']})",
    }
    tables = attention_rows(att), scan_rows(scan), gated_delta_rows(gdn), decode_rows(dec)
    return render(*tables, sources)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    TABLE.write_text(build())
    print(f"wrote {TABLE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
