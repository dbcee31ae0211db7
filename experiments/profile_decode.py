"""Where a generation's GPU time goes: HAT 1B vs the byte transformer 1B, by model part.

Runs the generation engine (:mod:`arjax.generate.engine`, one jitted ``lax.while_loop``) at
``--batch`` rows for ``--new-bytes`` bytes with the models of ``bench_hat_decode.py`` (random
weights unless ``--params-cache`` holds trained ones: with random weights HAT ends a word at
almost every byte, so its word path runs far more often than on text), times it (median of 3
after a compiling warm-up) and, unless ``--no-trace``, profiles one more run with
``jax.profiler``: every GPU kernel's time is summed by the part of the model its HLO op
belongs to (the op's ``op_name`` metadata: HAT's word split, encoder, decoder, encoder
connector, backbone, the rest of its word path; the transformer's layers and head; sampling).
XLA's
command buffers (CUDA graphs) hide the ops from the trace, so a traced run wants
``XLA_FLAGS=--xla_gpu_enable_command_buffer=`` (and is then slower than the timed default).
``--decode-impl`` forces the implementation of every one-token attention call
(``arjax.ops.decode_attention``; default: what ``impl="auto"`` picks).

    XLA_FLAGS=--xla_gpu_enable_command_buffer= python experiments/profile_decode.py
    python experiments/profile_decode.py --no-trace --decode-impl pallas   # A/B, timing only
    python experiments/profile_decode.py --quick                           # CPU smoke run

Writes ``experiments/results/profile_decode[_quick].{json,md}`` (``--name`` changes it).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import importlib
import json
import os
import re
import tempfile
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
from bench_hat_decode import configs, load_cached, median_seconds, prompt_ids
from decode_common import engine_runner
from hat_common import markdown_table, write_results

from arjax.models import build_model
from arjax.train.data import example_batch_for

# substring of an op's op_name -> part of the model (first match wins)
PARTS = (
    ("_word_starts", "word split"),
    ("pool_words", "encoder connector"),
    ("run_backbone", "backbone"),
    ("decode_bytes", "decoder"),
    ("decoder_word_values", "decoder connector"),
    ("HAT.encode", "encoder"),
    ("branch_1_fun", "word path, other"),
    ("_gumbel", "sampling"),
    ("TransformerLM.hidden", "transformer layers"),
    ("TransformerLM.logits", "transformer head"),
)


def force_decode_impl(impl: str) -> None:
    """Make the layers' ``decode_attention`` calls with ``impl="auto"`` run ``impl``."""
    layers = importlib.import_module("arjax.nn.layers")
    decode = layers.decode_attention

    def forced(*args, impl: str = "auto", forced_impl: str = impl, **kwargs):
        return decode(*args, impl=forced_impl if impl == "auto" else impl, **kwargs)

    layers.decode_attention = forced


def op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its ``op_name`` metadata, from a compiled module's text. A fusion
    without one (XLA drops it from some GEMM fusions) gets the first ``op_name`` inside the
    computation it calls."""
    named = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"")
    calls = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?\bcalls=%?([\w.\-]+)")
    names: dict[str, str] = {}
    inside: dict[str, str] = {}  # computation -> first op_name in it
    computation = None
    lines = hlo_text.splitlines()
    for line in lines:
        if line[:1] not in ("", " ") and line.rstrip().endswith("{"):
            computation = line.split()[0].lstrip("%")
        elif m := named.match(line):
            names.setdefault(m.group(1), m.group(2))
            if computation is not None:
                inside.setdefault(computation, m.group(2))
    for m in filter(None, map(calls.match, lines)):
        if m.group(1) not in names and m.group(2) in inside:
            names[m.group(1)] = inside[m.group(2)]
    return names


def kernel_times(trace_dir: str, module: str) -> tuple[dict[str, float], dict[str, int]]:
    """Microseconds and launches per HLO op of ``module`` on the GPU in a profiler trace."""
    path = sorted(Path(trace_dir).rglob("perfetto_trace.json.gz"))[-1]
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    gpu = {pid for pid, name in procs.items() if "GPU" in name}
    us, launches = collections.Counter(), collections.Counter()
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") == "X" and e["pid"] in gpu and module in args.get("hlo_module", ""):
            us[args.get("hlo_op", "?")] += e.get("dur", 0.0)
            launches[args.get("hlo_op", "?")] += 1
    return us, launches


def profile(name: str, model, params, prompts, args) -> dict:
    run, _ = engine_runner(model, params, prompts, args.new_bytes, temperature=0.8)
    seconds, out = median_seconds(run, 3)
    steps = int(out["steps"])
    row = dict(model=name, batch=prompts.shape[0], wall_ms=1e3 * seconds, loop_steps=steps,
               ms_per_step=1e3 * seconds / steps)  # fmt: skip
    row |= {k: int(v) for k, v in out["stats"].items()}
    if args.no_trace or jax.default_backend() != "gpu":
        return row
    names = op_names(run.lower().compile().as_text())
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            jax.block_until_ready(run())
        us, launches = kernel_times(trace_dir, "_run")
    part_of = {op: next((p for key, p in PARTS if key in names.get(op, "")), "other") for op in us}
    parts, part_launches = collections.Counter(), collections.Counter()
    for op, t in us.items():
        parts[part_of[op]] += t
        part_launches[part_of[op]] += launches[op]
    row["kernel_ms_per_step"] = sum(us.values()) / 1e3 / steps
    row["launches_per_step"] = sum(launches.values()) / steps
    row["parts_ms_per_step"] = {p: t / 1e3 / steps for p, t in parts.most_common()}
    row["parts_launches_per_step"] = {p: part_launches[p] / steps for p in parts}
    row["top_ops"] = [
        dict(op=op, part=part_of[op], us_per_step=t / steps, launches_per_step=launches[op] / steps,
             op_name="/".join(names.get(op, "?").split("/")[-3:]))
        for op, t in us.most_common(args.top)
    ]  # fmt: skip
    return row


def random_params(name: str, model, config):
    example = jax.tree.map(jnp.asarray, example_batch_for(name, config, 1, 64))
    return jax.jit(lambda k: nn.meta.unbox(model.init(k, example)["params"]))(jax.random.key(0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, CPU smoke run")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-bytes", type=int, default=128)
    ap.add_argument("--decode-impl", choices=["auto", "xla", "pallas"], default="auto")
    ap.add_argument("--no-trace", action="store_true", help="timing only")
    ap.add_argument("--top", type=int, default=30, help="costliest ops listed per model")
    ap.add_argument(
        "--models", nargs="+", choices=["hat", "transformer"], default=["hat", "transformer"]
    )
    ap.add_argument(
        "--params-cache",
        type=Path,
        default=None,
        help="folder of bench_hat_decode.py --params-cache (trained weights)",
    )
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    if args.quick:
        args.batch, args.new_bytes = 4, 16
    if args.decode_impl != "auto":
        force_decode_impl(args.decode_impl)
    hat_config, transformer_config = configs(args.quick)
    prompts = prompt_ids(args.batch, 64)
    rows = []
    configs_ = {"hat": hat_config, "transformer": transformer_config}
    for name in args.models:
        config = configs_[name]
        model = build_model(name, config)
        saved = args.params_cache / f"{name}.pkl" if args.params_cache else None
        if saved is not None and saved.exists():
            params = load_cached(saved)[0]
        else:
            params = random_params(name, model, config)
        rows.append(profile(name, model, params, prompts, args) | {"decode_impl": args.decode_impl})
        print(json.dumps(rows[-1]), flush=True)
    columns = ["model", "batch", "decode_impl", "loop_steps", "word_steps", "wall_ms",
               "ms_per_step", "kernel_ms_per_step", "launches_per_step"]  # fmt: skip
    lines = [markdown_table(rows, columns)]
    for r in rows:
        if "parts_ms_per_step" in r:
            parts = [dict(part=p, ms_per_step=t, launches_per_step=r["parts_launches_per_step"][p])
                     for p, t in r["parts_ms_per_step"].items()]  # fmt: skip
            columns = ["part", "ms_per_step", "launches_per_step"]
            lines += [f"\n{r['model']}, kernel time by part:\n", markdown_table(parts, columns)]
            columns = ["op", "part", "us_per_step", "launches_per_step", "op_name"]
            lines += [f"\n{r['model']}, costliest ops:\n", markdown_table(r["top_ops"], columns)]
    name = args.name or "profile_decode" + ("_quick" if args.quick else "")
    flags = os.environ.get("XLA_FLAGS", "")
    write_results(name, f"Decode profile (XLA_FLAGS='{flags}')", {"rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
