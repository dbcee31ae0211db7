"""Single-device training speed: bytes/s, step time, peak memory, MFU, compile time.

Jobs (one run, one device): the byte-level transformer at ~125M / ~350M / ~1B parameters
(sequence 2048), the 1B with packed documents and a sweep of batch / remat settings; HAT
``1b`` (sequence 8192 bytes, ~1900 words: its backbone, the transformer ``1b`` stack, sees
about as many words per row as the transformer sees bytes) with the per-word connectors
and, for comparison, with the dense (masked-attention) connectors; HAT ``small``. One
jitted train step (bf16 compute, fp32 master weights, AdamW, donated state, remat per
preset) is compiled, warmed up and timed over back-to-back steps (median over repeats).

MFU = model FLOPs / step time / the device's datasheet dense bf16 peak
(:data:`arjax.train.flops.PEAK_FLOPS`: 989 TFLOP/s on H100 SXM / H200); the bf16 matmul peak
measured in the same run is a second column. Model FLOPs are
:func:`arjax.train.flops.train_step_flops` of the batch: transformer 6N per token + causal
attention; HAT from the batch's real bytes and words (``HATConfig.batch_flops``), so padding
is waste, not work. The count is checked against XLA's cost analysis of the unscanned step
for one preset per family. HAT rows add a per-component profile (forward + backward of the
encoder, encoder connector, backbone, decoder with its cross-attention and byte head, the
loss, and the optimizer update, each jitted alone on the same batch) and the word-slot
padding's share of the backbone FLOPs. A row whose loss is not finite after the timed steps
is an error, left out of the summary: such steps skip their update, and NaN steps were
measured ~10% faster than real ones (``experiments/results/bench_train_b16_vocab.md``). The
summary: HAT ``1b`` MFU / transformer ``1b`` MFU
(target >= 0.85) and HAT bytes/s / transformer bytes/s (target >= 2.5; arjax's transformer
is byte-level).

    python experiments/bench_train.py                  # GPU, every job; the last two
    #   (unrolled layers) compile for ~3 min each: run them apart with --only
    python experiments/bench_train.py --quick          # CPU smoke run, tiny shapes
    python experiments/bench_train.py --only 1b,hat-1b --out experiments/results/bench_x
    python experiments/bench_train.py --only 125m,1b --vocab 32768 --loss-chunk 1024 \
        --out experiments/results/bench_train_vocab   # + rows at a large vocabulary
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from arjax.config import replace_everywhere
from arjax.models import MODELS, build_model
from arjax.models.hat import HAT, HATConfig
from arjax.ops.cross_entropy import cross_entropy
from arjax.train.config import TrainConfig
from arjax.train.data import example_batch_for
from arjax.train.flops import peak_flops, train_step_flops
from arjax.train.optim import make_optimizer
from arjax.train.step import init_train_state, make_train_step


@dataclasses.dataclass(frozen=True)
class Job:
    """One benchmark row: ``key`` selects it with ``--only``."""

    key: str
    model: str  # family
    preset: str
    cfg: Any
    batch: int
    seq: int
    connector_impl: str = "words"  # HAT only
    docs: bool = True  # keep segment ids (packed documents) for the transformer
    profile: bool = False  # HAT only: per-component timings
    check: bool = False  # XLA cost-analysis cross-check of the FLOP count


def matmul_peak(n: int = 8192, repeats: int = 10) -> float:
    """Measured dense bf16 matmul FLOP/s (median of ``repeats`` chained products)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: (a @ b).astype(jnp.bfloat16))
    return 2 * n**3 / time_call(f, (a, b), steps=5, repeats=repeats)


def time_call(f: Callable, args: tuple, *, steps: int, repeats: int, carry: bool = False) -> float:
    """Median seconds per call of jitted ``f(*args)`` (``carry``: ``f`` returns the next
    ``args[0]`` and its metrics, as a train step with donated state)."""
    out = None
    for _ in range(2):  # compile + warm up
        out = f(*args)
        if carry:
            args = (out[0], *args[1:])
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            out = f(*args)
            if carry:
                args = (out[0], *args[1:])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / steps)
    return statistics.median(times)


def make(job: Job, cfg: Any | None = None) -> nn.Module:
    cfg = job.cfg if cfg is None else cfg
    if job.model == "hat":
        return HAT(cfg, connector_impl=job.connector_impl)
    return build_model(job.model, cfg)


def xla_cost(job: Job, tx: Any, batch: dict) -> tuple[float, float]:
    """(FLOPs, bytes accessed) of one train step by XLA's cost analysis of the unscanned
    program (the lowered, pre-backend HLO: the same count on every device, no compile)."""
    model = make(job, replace_everywhere(job.cfg, scan_layers=False))  # a scan: counted once
    example = jax.tree.map(lambda x: x[:1], batch)
    state = jax.eval_shape(
        lambda r: nn.meta.unbox(init_train_state(model, tx, r, example)), jax.random.key(0)
    )
    cost = jax.jit(make_train_step(model, tx)).lower(state, batch).cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    return float(cost.get("flops", np.nan)), float(cost.get("bytes accessed", np.nan))


def hat_padding(cfg: HATConfig, batch: dict) -> dict:
    """Word-slot padding's share of the backbone FLOPs as executed, and of the byte slots."""
    rows, words = batch["word_segment_ids"].shape
    real = (batch["word_segment_ids"] > 0).sum(1)
    bb = cfg.backbone
    used = sum(n * bb.flops_per_token(n) for n in real.tolist())
    executed = rows * words * bb.flops_per_token(words)
    return {
        "word_slots": int(words),
        "words_per_row": float(real.mean()),
        "bytes_per_word": float((batch["word_ids"] > 0).sum() / real.sum()),
        "backbone_pad_waste": 1.0 - used / executed,
        "byte_pad_waste": 1.0 - float((batch["word_ids"] > 0).mean()),
    }


def profile_hat(model: HAT, params: Any, tx: Any, batch: dict, *, steps: int, repeats: int):
    """Forward + backward seconds of each HAT stage alone (jitted, same batch), and the
    optimizer update. Each stage's input is the previous stage's output. The batch is an
    argument of every jitted stage, as of the train step: closed over, its constant segment ids
    would let XLA fold the attention's tile ranges (and spend seconds on it) at compile time."""
    w = batch["word_segment_ids"].shape[1]
    slots = lambda b: jnp.where(b["word_segment_ids"] > 0, jnp.arange(1, w + 1), 0)  # noqa: E731

    def encoder(m, b, tokens):
        return m.encode(tokens, b["positions"], b["segment_ids"])

    def pool(m, b, acts):
        return m.pool_words(acts, b["positions"], b["word_ids"], b["word_positions"], slots(b))

    def backbone(m, b, words):
        return m.run_backbone(words, b["word_positions"], b["word_segment_ids"])

    def decode(m, b, acts, states):
        pred = m.predictive(states, b["word_positions"])
        return m.decode_bytes(
            acts, pred, b["positions"], b["segment_ids"], b["word_ids"], b["word_positions"],
            slots(b),
        )  # fmt: skip

    def stage(method: Callable) -> Callable:
        """``f(params, batch, *xs)`` of one stage."""
        return lambda p, b, *xs: model.apply({"params": p}, b, *xs, method=method)

    acts = jax.jit(stage(encoder))(params, batch, batch["inputs"])
    words = jax.jit(stage(pool))(params, batch, acts)
    states = jax.jit(stage(backbone))(params, batch, words)
    stages = {
        "encoder": (stage(encoder), (batch["inputs"],)),
        "encoder connector": (stage(pool), (acts,)),
        "backbone": (stage(backbone), (words,)),
        "decoder + head": (stage(decode), (acts, states)),
    }
    logits = jax.jit(stage(decode))(params, batch, acts, states)
    out = {}
    for name, (f, xs) in stages.items():
        ct = jax.tree.map(jnp.ones_like, jax.eval_shape(f, params, batch, *xs))

        def fb(p, b, *xs, f=f, ct=ct):  # gradients in the params and the stage's inputs
            return jax.vjp(lambda p, *xs: f(p, b, *xs), p, *xs)[1](ct)

        out[name] = time_call(jax.jit(fb), (params, batch, *xs), steps=steps, repeats=repeats)

    def loss(z, b):
        return cross_entropy(z, b["targets"], b["loss_mask"])[0]

    out["loss"] = time_call(jax.jit(jax.value_and_grad(loss)), (logits, batch), steps=steps,
                            repeats=repeats)  # fmt: skip
    opt_state = tx.init(params)

    def update(p, o, g):
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o

    out["optimizer"] = time_call(jax.jit(update), (params, opt_state, params), steps=steps,
                                 repeats=repeats)  # fmt: skip
    return out


def progress(job: Job, what: str, since: float) -> None:
    """One line on stderr per phase, so that a run cut by a time limit shows where it was."""
    print(f"[{job.key}] {what} ({time.perf_counter() - since:.0f} s)", file=sys.stderr, flush=True)


def bench(
    job: Job, host_batch: dict, *, steps: int, repeats: int, peaks: dict, profile: bool = True
) -> dict:
    start = time.perf_counter()
    model = make(job)
    tx = make_optimizer(TrainConfig(steps=1000))
    example = jax.tree.map(lambda x: jnp.asarray(x[:1]), host_batch)
    init = jax.jit(lambda r: nn.meta.unbox(init_train_state(model, tx, r, example)))
    state = init(jax.random.key(0))
    batch = jax.tree.map(jnp.asarray, host_batch)
    step = jax.jit(make_train_step(model, tx), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    progress(job, "compiled", start)
    flops_xla, bytes_xla = xla_cost(job, tx, batch) if job.check else (np.nan, np.nan)
    mem = compiled.memory_analysis()
    step_bytes = (
        mem.argument_size_in_bytes + mem.output_size_in_bytes
        - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    )  # fmt: skip
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    profile_ms = None
    if job.profile and profile:  # before the timed steps, which donate (invalidate) state
        profile_ms = profile_hat(model, state.params, tx, batch, steps=steps, repeats=repeats)
        progress(job, "profiled", start)
    holder = {}

    def run(s, b):
        s, holder["metrics"] = compiled(s, b)
        return s, holder["metrics"]

    dt = time_call(run, (state, batch), steps=steps, repeats=repeats, carry=True)
    progress(job, "timed", start)
    rows, seq = host_batch["targets"].shape
    real_field = "word_ids" if job.model == "hat" else "segment_ids"  # absent: all real
    real = host_batch.get(real_field, np.ones((rows, seq), np.int32))
    model_flops = train_step_flops(job.cfg, host_batch)
    row = {
        "key": job.key,
        "model": job.model,
        "preset": job.preset,
        "connector_impl": job.connector_impl if job.model == "hat" else None,
        "params_m": n_params / 1e6,
        "batch": rows,
        "seq_len": seq,
        "remat": getattr(job.cfg, "remat", None) or getattr(job.cfg.backbone, "remat", None),
        "step_ms": dt * 1e3,
        "bytes_per_s": float((real > 0).sum()) / dt,
        "model_tflops_per_step": model_flops / 1e12,
        "xla_tflops_per_step": flops_xla / 1e12,
        "xla_gb_accessed_per_step": bytes_xla / 1e9,
        "achieved_tflops": model_flops / dt / 1e12,
        "mfu": model_flops / dt / peaks["datasheet"] if peaks["datasheet"] else None,
        "mfu_measured_peak": model_flops / dt / peaks["measured"] if peaks["measured"] else None,
        "peak_mem_gib": step_bytes / 2**30,  # the compiled step's live buffers
        "compile_s": compile_s,
        "loss": float(holder["metrics"]["loss"]),
    }
    if not np.isfinite(row["loss"]):  # the step skipped its update: not a training step
        row["error"] = f"loss {row['loss']} after the timed steps: the row is not a valid timing"
    if job.model == "hat":
        row.update(hat_padding(job.cfg, host_batch))
    if profile_ms is not None:
        row["profile_ms"] = {k: v * 1e3 for k, v in profile_ms.items()}
    return row


def jobs_for(quick: bool) -> list[Job]:
    tf, hat = MODELS["transformer"].presets, MODELS["hat"].presets
    if quick:
        return [
            Job("tiny", "transformer", "tiny", tf["tiny"], 4, 256, check=True),
            Job("hat-tiny", "hat", "tiny", hat["tiny"], 4, 256, profile=True, check=True),
            Job("hat-tiny-dense", "hat", "tiny", hat["tiny"], 4, 256, "dense", check=True),
        ]
    one_b = tf["1b"]
    remat_none = dataclasses.replace(one_b, remat="none")
    flat_tf, flat_hat = (
        replace_everywhere(c, scan_layers=False, remat="none") for c in (one_b, hat["1b"])
    )
    # Rows without "docs" are one document per row without segment ids (cuDNN attention);
    # "+docs" keeps packed documents (segment ids -> Pallas flash attention). The order puts
    # what the summary needs first (each row is written as it finishes).
    return [
        Job("1b", "transformer", "1b", one_b, 8, 2048, docs=False),
        Job("hat-1b", "hat", "1b", hat["1b"], 8, 8192, profile=True),
        Job("hat-1b-dense", "hat", "1b", hat["1b"], 8, 8192, "dense"),
        # The MFU sweep: a larger batch amortises the optimizer and per-step overheads;
        # without remat nothing is recomputed (memory allows it at 1B on 141 GB).
        Job("1b-b16", "transformer", "1b", one_b, 16, 2048, docs=False),
        Job("hat-1b-b16", "hat", "1b", hat["1b"], 16, 8192),
        Job("1b-b8-noremat", "transformer", "1b", remat_none, 8, 2048, docs=False),
        Job("1b-b32", "transformer", "1b", one_b, 32, 2048, docs=False),
        Job("1b-b16-noremat", "transformer", "1b", remat_none, 16, 2048, docs=False),
        Job("1b+docs", "transformer", "1b", one_b, 8, 2048),
        Job("125m", "transformer", "125m", tf["125m"], 16, 2048, docs=False, check=True),
        Job("350m", "transformer", "350m", tf["350m"], 8, 2048, docs=False),
        Job("hat-small", "hat", "small", hat["small"], 16, 1024, check=True),
        # last, as each compiles for ~3 min: unrolled (no nn.scan), the backward reads each
        # layer's residuals in place instead of slicing them out of a stacked [layers, ...]
        # buffer (device copies)
        Job("1b-b16-unrolled-noremat", "transformer", "1b", flat_tf, 16, 2048, docs=False),
        Job("hat-1b-b16-unrolled-noremat", "hat", "1b", flat_hat, 16, 8192, profile=True),
        # HAT always masks attention at document boundaries (byte and word segment ids); this
        # transformer row does too, for the like-for-like pair in the summary
        Job("1b-b16-unrolled-noremat+docs", "transformer", "1b", flat_tf, 16, 2048),
    ]


def summary(rows: list[dict]) -> dict:
    """HAT ``1b`` against the transformer ``1b`` at the same batch, in this run: MFU ratio
    (target >= 0.85) and bytes/s ratio (target >= 2.5; arjax's transformer is byte-level).
    The transformer rows without ``docs`` attend across the documents packed in a row; HAT
    never does, so the ``+docs`` row (documents masked too) is the like-for-like pair."""
    by_key = {r["key"]: r for r in rows if "error" not in r}
    out: dict[str, Any] = {}
    pairs = (
        ("hat-tiny", "tiny"),
        ("hat-1b", "1b"),
        ("hat-1b-b16", "1b-b16"),
        ("hat-1b-b16-unrolled-noremat", "1b-b16-unrolled-noremat"),
        ("hat-1b-b16-unrolled-noremat", "1b-b16-unrolled-noremat+docs"),
    )
    for hat_key, tf_key in pairs:
        hat, tf = by_key.get(hat_key), by_key.get(tf_key)
        if not hat or not tf:
            continue
        pair = {"bytes_per_s_ratio": hat["bytes_per_s"] / tf["bytes_per_s"]}
        if hat["mfu"] and tf["mfu"]:
            pair["mfu_ratio"] = hat["mfu"] / tf["mfu"]
        dense = by_key.get(hat_key + "-dense")
        if dense:
            pair["speedup_vs_dense_connectors"] = dense["step_ms"] / hat["step_ms"]
        out[f"{hat_key} vs {tf_key}"] = pair
    best = max((r for r in by_key.values() if r["key"].startswith("1b") and r["mfu"]),
               key=lambda r: r["mfu"], default=None)  # fmt: skip
    if best:
        out["best_transformer_1b"] = {"key": best["key"], "mfu": best["mfu"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke run at tiny shapes")
    ap.add_argument("--out", default="experiments/results/bench_train")
    ap.add_argument("--only", default="", help="comma-separated job keys to run, in that order")
    ap.add_argument(
        "--vocab", type=int, default=None, help="also run each transformer job at this vocab"
    )
    ap.add_argument(
        "--loss-chunk",
        type=int,
        default=None,
        help="with --vocab: also run it with model.loss_chunk (chunked cross-entropy)",
    )
    ap.add_argument(
        "--no-profile", action="store_true", help="skip HAT's per-component profile (faster)"
    )
    args = ap.parse_args()
    if args.loss_chunk is not None and args.vocab is None:
        ap.error("--loss-chunk needs --vocab")
    jobs = jobs_for(args.quick)
    if args.only:
        keys = args.only.split(",")
        unknown = set(keys) - {j.key for j in jobs}
        if unknown:
            ap.error(f"--only: unknown job keys {sorted(unknown)}; known {[j.key for j in jobs]}")
        by_key = {j.key: j for j in jobs}
        jobs = [by_key[k] for k in dict.fromkeys(keys)]  # in the order given
    if args.vocab is not None:  # the same shapes at a large vocab, full logits vs chunked loss
        variants = [(f"+v{args.vocab}", {"vocab_size": args.vocab})]
        if args.loss_chunk is not None:
            chunked = {"vocab_size": args.vocab, "loss_chunk": args.loss_chunk}
            variants.append((f"+v{args.vocab}+chunk{args.loss_chunk}", chunked))
        jobs += [
            dataclasses.replace(j, key=j.key + suffix, cfg=dataclasses.replace(j.cfg, **changes))
            for j in jobs
            if j.model == "transformer"
            for suffix, changes in variants
        ]
    steps, repeats = (2, 2) if args.quick else (10, 3)
    device = jax.devices()[0]
    peaks = {
        "datasheet": peak_flops(device),
        "measured": None if args.quick else matmul_peak(),
    }
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device.device_kind),
        "versions": {p: version(p) for p in ("jax", "jaxlib", "flax", "optax")},
        "datasheet_peak_tflops": peaks["datasheet"] / 1e12 if peaks["datasheet"] else None,
        "matmul_peak_tflops": peaks["measured"] / 1e12 if peaks["measured"] else None,
        "command": " ".join(["python experiments/bench_train.py", *sys.argv[1:]]),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    rows: list[dict] = []
    for job in jobs:
        host = example_batch_for(job.model, job.cfg, job.batch, job.seq)
        if job.model == "transformer" and not job.docs:
            host = {k: v for k, v in host.items() if k != "segment_ids"}
        try:
            row = bench(
                job, host, steps=steps, repeats=repeats, peaks=peaks, profile=not args.no_profile
            )
        except Exception as e:  # noqa: BLE001 - report OOM etc. and continue
            row = {"key": job.key, "model": job.model, "preset": job.preset,
                   "error": f"{type(e).__name__}: {str(e)[:300]}"}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
        write_results(args.out, meta, rows)  # after every row: a time limit loses nothing


def _pct(x: float | None) -> str:
    return f"{100 * x:.1f}%" if x is not None else "n/a"


def write_results(out: str, meta: dict, rows: list[dict]) -> None:
    summ = summary(rows)
    with open(out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "summary": summ}, f, indent=2)
    peak = meta["datasheet_peak_tflops"]
    flags = meta.get("xla_flags")
    command = f"XLA_FLAGS='{flags}' {meta['command']}" if flags else meta["command"]
    lines = [
        f"# Training speed, one {meta['device']} ({meta['date']}, JAX {meta['versions']['jax']})",
        "",
        f"Command: `{command}`. MFU: model FLOPs / step time / the datasheet dense "
        f"bf16 peak ({f'{peak:.0f} TFLOP/s' if peak else 'unknown device: no MFU'}); "
        f"'MFU (matmul)': against the bf16 matmul peak measured in this run "
        f"({meta['matmul_peak_tflops'] or float('nan'):.0f} TFLOP/s). Model FLOPs: "
        "transformer 6N per token + causal attention; HAT from each batch's real bytes and "
        "words (`HATConfig.batch_flops`); remat recompute not counted. bytes/s: real (non-PAD) "
        "bytes. XLA/analytic and XLA GB accessed: XLA's cost analysis of the whole unscanned "
        "step (optimizer, norms, full score matrices; one job per family) over the model "
        "count, and its bytes accessed.",
        "",
        "| job | model | params (M) | batch x seq | remat | step ms | bytes/s | TFLOP/s | MFU "
        "| MFU (matmul) | XLA/analytic | XLA GB accessed | peak GiB | compile s |",
        "|" + "---|" * 14,
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['key']} | {r['model']} | error: {r['error'][:100]} |")
            continue
        lines.append(
            f"| {r['key']} | {r['model']} {r['preset']} | {r['params_m']:.0f} "
            f"| {r['batch']}x{r['seq_len']} | {r['remat']} | {r['step_ms']:.1f} "
            f"| {r['bytes_per_s']:.0f} | {r['achieved_tflops']:.1f} | {_pct(r['mfu'])} "
            f"| {_pct(r['mfu_measured_peak'])} "
            f"| {r['xla_tflops_per_step'] / r['model_tflops_per_step']:.2f} "
            f"| {r['xla_gb_accessed_per_step']:.2f} | {r['peak_mem_gib']:.1f} "
            f"| {r['compile_s']:.0f} |"
        )
    hats = [r for r in rows if r.get("model") == "hat" and "error" not in r]
    if hats:
        lines += ["", "HAT padding (measured on the batch): share of the backbone FLOPs spent "
                  "on empty word slots, and of the byte slots that are PAD.", "",
                  "| job | word slots | words/row | bytes/word | backbone pad waste "
                  "| byte pad waste |", "|---|---|---|---|---|---|"]  # fmt: skip
        for r in hats:
            lines.append(
                f"| {r['key']} | {r['word_slots']} | {r['words_per_row']:.0f} "
                f"| {r['bytes_per_word']:.2f} | {_pct(r['backbone_pad_waste'])} "
                f"| {_pct(r['byte_pad_waste'])} |"
            )
    for r in hats:
        if "profile_ms" not in r:
            continue
        prof = r["profile_ms"]
        lines += ["", f"Per-component profile of `{r['key']}` (each stage's forward + backward "
                  f"jitted alone on the same batch; optimizer: AdamW update). Full step "
                  f"{r['step_ms']:.1f} ms; sum of stages {sum(prof.values()):.1f} ms.", "",
                  "| stage | ms | share of the step |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {k} | {v:.2f} | {_pct(v / r['step_ms'])} |" for k, v in prof.items()]
    if summ:
        lines += ["", "Summary: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in summ.items())]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def _fmt(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return f"{v:.3f}" if isinstance(v, float) else json.dumps(v)


if __name__ == "__main__":
    main()
