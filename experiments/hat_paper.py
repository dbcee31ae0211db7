"""HAT's paper claims at equal compute on real English + German data (issue 23).

Neitemeier et al. 2025 (HAT) claim that at equal training compute HAT matches a subword
(BPE) model, is more robust to perturbed input, and continues pretraining on a new language
faster while forgetting less. Three stages, each resumable (runs under ``--out``):

1. ``compare``: HAT, the BPE transformer (``data.tokenizer``) and the byte transformer at
   each ``--sizes`` entry (backbones of ~100M and ~400M parameters; ``tiny`` on CPU), every
   model trained for the same analytic training FLOPs (``hat_vs_transformer.step_flops``:
   3x forward over the padded batch) per seed; validation bits/byte (all of the English val
   split, every byte once, the same text for all three) against FLOPs, one plot per size.
2. ``robustness``: ``hat_robustness.robustness`` on the seed-0 models of each size: a
   perturbed context, the clean continuation scored in bits per clean byte.
3. ``adapt``: the English HAT and BPE models (BPE keeps its English tokenizer) continue on
   German for the same FLOPs (``--adapt-fraction`` of the English budget) from their
   English weights (fresh optimizer, new warmup); reported: the steps and FLOPs each needs
   to reach the BPE model's final German val bits/byte (linear interpolation between
   evaluations), and the English val bits/byte before and after.

Everything lands in ``experiments/results/hat_paper.{md,json}`` plus PNGs. Examples::

    python experiments/hat_paper.py --tiny --corpus data/corpus          # CPU, minutes
    python experiments/hat_paper.py --corpus data/corpus --tokenizer data/bpe32k.json \\
        --sizes 100m,400m --seeds 0,1                                    # one H200

The corpus comes from ``experiments/data/build_corpus.py`` (``CORPUS/en``, ``CORPUS/de``);
without ``--tokenizer`` (or when the file is missing) the BPE tokenizer is trained first on
the English train split (``experiments/data/train_bpe.py``).

On a device reached one command at a time (at most 10 minutes each, 64 MiB carried): build
the corpus and the tokenizer on the CPU machine, pack them (``build_corpus.py --pack
data/corpus.tar.xz --max-mb 160``), carry ``data/corpus.tar.xz`` and ``data/bpe32k.json``,
unpack with ``tar xJf data/corpus.tar.xz -C data``, and repeat the same command with
``--deadline-s 420``: it starts no new run or stage after that many seconds, finished runs
and stage results are reused, and compiled programs are cached under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from hat_common import RESULTS, markdown_table, write_results
from hat_robustness import (
    METRICS,
    degradation_table,
    restore_params,
    robustness,
    stand_in_trainer,
)
from hat_robustness import plot as plot_robustness
from hat_vs_transformer import read_curve, step_flops

from arjax.config import to_dict
from arjax.data.bpe import load_tokenizer, train_bpe
from arjax.data.corpus import load_texts_from_dir
from arjax.train.config import RunConfig, make_run_config
from arjax.train.loop import Trainer, train

MODELS = ("hat", "bpe", "byte")
# Stacks by size: backbone (the shared ~100M / ~400M part), HAT byte stacks, data shapes.
_BB = {"100m": (768, 12, 12, 3072), "400m": (1024, 24, 16, 4096)}
_BYTES_STACK = {"100m": (512, 2, 8, 1536), "400m": (768, 3, 12, 2048)}


def _stack(prefix: str, d: int, layers: int, heads: int, mlp: int) -> list[str]:
    return [f"{prefix}.d_model={d}", f"{prefix}.num_layers={layers}",
            f"{prefix}.num_heads={heads}", f"{prefix}.num_kv_heads={heads}",
            f"{prefix}.head_dim={d // heads}", f"{prefix}.mlp_dim={mlp}"]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Size:
    """One model size: per family (model name, preset, overrides), the data shapes, the
    English training budget and the robustness pair sizes."""

    runs: dict[str, tuple[str, str, list[str]]]
    budget_tflops: float
    context_bytes: int
    target_bytes: int


def sizes(tokenizer: str) -> dict[str, Size]:
    """``tiny`` (CPU), ``100m`` and ``400m`` (one H200)."""
    tok = [f"data.tokenizer={tokenizer}"]
    out = {
        "tiny": Size(
            runs={
                "hat": ("hat", "tiny", ["data.seq_len=256", "data.batch_size=16"]),
                "byte": ("transformer", "tiny", ["data.seq_len=256", "data.batch_size=16"]),
                "bpe": (
                    "transformer",
                    "tiny",
                    [*tok, "data.seq_len=96", "data.batch_size=16"],
                ),  # fmt: skip
            },
            budget_tflops=1.0,
            context_bytes=96,
            target_bytes=48,
        )
    }
    for name, (d, layers, heads, mlp) in _BB.items():
        bd, bl, bh, bm = _BYTES_STACK[name]
        lr = "6e-4" if name == "100m" else "3e-4"
        common = ["data.batch_size=64", f"train.learning_rate={lr}", "train.min_lr_ratio=0.1"]
        hat = [
            *_stack("model.backbone", d, layers, heads, mlp),
            *_stack("model.encoder", bd, bl, bh, bm), *_stack("model.decoder", bd, bl, bh, bm),
            "model.encoder.window=512", "model.decoder.window=512", "model.cross_heads=8",
            "model.cross_kv_heads=8", "model.cross_head_dim=64", "model.max_seq_len=2048",
            "model.max_words=640", "data.seq_len=2048", *common,
        ]  # fmt: skip
        lm = [*_stack("model", d, layers, heads, mlp), "model.remat=dots_no_batch"]
        out[name] = Size(
            runs={
                "hat": ("hat", "small", hat),
                "byte": (
                    "transformer",
                    "125m",
                    [*lm, "model.max_seq_len=2048", "data.seq_len=2048", *common],
                ),
                "bpe": (
                    "transformer",
                    "125m",
                    [
                        *lm,
                        *tok,
                        "model.max_seq_len=512",
                        "data.seq_len=512",
                        "model.loss_chunk=128",
                        *common,
                    ],
                ),
            },  # fmt: skip
            budget_tflops=2e4 if name == "100m" else 6e4,
            context_bytes=1024,
            target_bytes=512,
        )
    return out


def run_config(size: Size, model: str, corpus: str, seed: int, steps: int, evals: int,
               extra: list[str]) -> RunConfig:  # fmt: skip
    """The run of ``model`` at ``size`` for ``steps`` steps with ``evals`` evaluations."""
    name, preset, overrides = size.runs[model]
    every = max(1, steps // evals)
    return make_run_config(name, preset, [
        *overrides, f"data.corpus={corpus}", "data.val_batches=0", f"data.seed={seed}",
        f"train.seed={seed}", f"train.steps={steps}", f"train.eval_every={every}",
        f"train.log_every={max(1, every // 4)}", f"train.save_every={every}",
        f"train.warmup_steps={max(1, steps // 20)}", "train.sample_bytes=0",
        "train.progress=false", *extra,
    ])  # fmt: skip


def steps_for(size: Size, model: str, budget_tflops: float, corpus: str) -> int:
    """Optimizer steps of ``model`` that spend ``budget_tflops`` of training compute."""
    probe = run_config(size, model, corpus, 0, 1, 1, [])
    return max(1, round(budget_tflops * 1e12 / step_flops(probe)))


_START = time.monotonic()


def check_deadline(args: argparse.Namespace, what: str) -> None:
    """Stop before starting ``what`` once ``--deadline-s`` seconds have passed (the runs and
    stage results so far are kept: the same command continues where this one stopped)."""
    if args.deadline_s and time.monotonic() - _START > args.deadline_s:
        raise SystemExit(f"--deadline-s {args.deadline_s} reached before {what}; run the same "
                         "command again to continue")  # fmt: skip


def finished(run_dir: Path, steps: int) -> bool:
    """Whether ``run_dir``'s metrics hold the final evaluation at ``steps``."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return False
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return any(r.get("step") == steps and "val_bits_per_byte" in r for r in rows)


def trained_params(cfg: RunConfig, out: Path, at: Path | Trainer) -> object:
    """The final params of the finished run in ``out``, for ``at`` (a trainer of ``cfg``, or
    a scratch directory to make one in)."""
    trainer = at if isinstance(at, Trainer) else stand_in_trainer(cfg, at)
    params, step = restore_params(trainer, out)
    if step != cfg.train.steps:
        raise SystemExit(f"{out}: expected a finished run of {cfg.train.steps} steps")
    return params


def compare(args, table: dict[str, Size], corpus: Path, out: Path) -> dict:
    """Stage 1: every model x size x seed at equal training FLOPs."""
    results = {}
    for size_name in args.sizes:
        size = table[size_name]
        budget = args.budget_tflops or size.budget_tflops
        for model in MODELS:
            steps = steps_for(size, model, budget, str(corpus / "en"))
            for seed in args.seeds:
                cfg = run_config(size, model, str(corpus / "en"), seed, steps, args.evals, [])
                run_dir = out / size_name / "en" / model / f"seed{seed}"
                t0 = time.perf_counter()
                if not finished(run_dir, steps):  # else skip loading its data again
                    check_deadline(args, f"training {run_dir}")
                    train(cfg, run_dir)
                wall = time.perf_counter() - t0
                curve = read_curve(run_dir, step_flops(cfg))
                results[f"{size_name}/{model}/{seed}"] = {
                    "size": size_name, "model": model, "seed": seed, "steps": steps,
                    "params": cfg.model.num_params(), "flops_per_step": step_flops(cfg),
                    "train_tflops": steps * step_flops(cfg) / 1e12, "wall_s_this_call": wall,
                    "curve": curve, "run_dir": str(run_dir), "run_config": to_dict(cfg),
                }  # fmt: skip
                print(f"{size_name} {model} seed {seed}: {steps} steps, val bits/byte "
                      f"{curve['val_bits_per_byte'][-1]:.4f}", flush=True)  # fmt: skip
    return results


def plot_compare(results: dict, size_name: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, model in enumerate(MODELS):
        runs = [r for r in results.values() if r["size"] == size_name and r["model"] == model]
        for j, r in enumerate(runs):
            c = r["curve"]
            ax.plot([f / 1e12 for f in c["flops"]], c["val_bits_per_byte"], marker="o",
                    color=f"C{i}", alpha=1.0 if j == 0 else 0.5,
                    label=model if j == 0 else None)  # fmt: skip
    ax.set_xlabel("training FLOPs (TFLOP, analytic)")
    ax.set_ylabel("English val bits/byte")
    ax.set_title(f"{size_name}: HAT vs BPE vs byte transformer (equal FLOPs)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}" if values else "n/a"


def first_reach(curve: dict, target: float) -> float | None:
    """Steps at which ``val_bits_per_byte`` first reaches ``target`` (linear interpolation
    between evaluations, from the English model's value at step 0); None if never."""
    steps = [0, *curve["step"]]
    vals = [curve["start_bits_per_byte"], *curve["val_bits_per_byte"]]
    for (s0, v0), (s1, v1) in zip(zip(steps, vals), zip(steps[1:], vals[1:])):
        if v1 <= target:
            return s1 if v0 == v1 else s0 + (v0 - target) / (v0 - v1) * (s1 - s0)
    return None


def adapt(args, table: dict[str, Size], corpus: Path, out: Path, compare_runs: dict) -> dict:
    """Stage 3: English HAT and BPE continue on German for the same FLOPs."""
    results, scratch = {}, Path(tempfile.mkdtemp())
    for size_name in args.sizes:
        size = table[size_name]
        budget = (args.budget_tflops or size.budget_tflops) * args.adapt_fraction
        for model in ("hat", "bpe"):
            steps = steps_for(size, model, budget, str(corpus / "de"))
            for seed in args.seeds:
                en = compare_runs[f"{size_name}/{model}/{seed}"]
                en_cfg = run_config(size, model, str(corpus / "en"), seed, en["steps"],
                                    args.evals, [])  # fmt: skip
                params = trained_params(en_cfg, Path(en["run_dir"]), scratch)
                cfg = run_config(size, model, str(corpus / "de"), seed, steps, args.evals, [])
                run_dir = out / size_name / "de" / model / f"seed{seed}"
                de_eval = stand_in_trainer(cfg, scratch, corpus / "de" / "val")
                start = de_eval.evaluate(params)["val_bits_per_byte"]
                if not (run_dir / "checkpoints").exists():  # warm start: step-0 checkpoint
                    warm = Trainer(cfg, run_dir)
                    state = warm._init(jax.random.key(seed))
                    warm.save(state.replace(params=params), force=True)
                    warm.ckpt.wait()
                if not finished(run_dir, steps):
                    check_deadline(args, f"training {run_dir}")
                    train(cfg, run_dir)
                curve = {**read_curve(run_dir, step_flops(cfg)), "start_bits_per_byte": start}
                en_eval = stand_in_trainer(en_cfg, scratch, corpus / "en" / "val")
                adapted = trained_params(cfg, run_dir, scratch)
                results[f"{size_name}/{model}/{seed}"] = {
                    "size": size_name, "model": model, "seed": seed, "steps": steps,
                    "flops_per_step": step_flops(cfg), "curve": curve,
                    "en_before": en["curve"]["val_bits_per_byte"][-1],
                    "en_after": en_eval.evaluate(adapted)["val_bits_per_byte"],
                    "run_dir": str(run_dir),
                }  # fmt: skip
    for key, r in results.items():
        bpe = results[key.replace(f"/{r['model']}/", "/bpe/")]
        r["target"] = bpe["curve"]["val_bits_per_byte"][-1]
        r["steps_to_target"] = first_reach(r["curve"], r["target"])
        r["tflops_to_target"] = (
            None if r["steps_to_target"] is None
            else r["steps_to_target"] * r["flops_per_step"] / 1e12
        )  # fmt: skip
    return results


def robustness_of(args, size: Size, size_name: str, runs: dict, corpus: Path,
                  docs: list[str]) -> list[dict]:  # fmt: skip
    """Stage 2 at one size: the seed-0 models under every perturbation, rate and seed."""
    models = {}
    for model in MODELS:
        r = runs[f"{size_name}/{model}/{args.seeds[0]}"]
        cfg = run_config(size, model, str(corpus / "en"), args.seeds[0], r["steps"],
                         args.evals, ["data.batch_size=16"])  # fmt: skip
        trainer = stand_in_trainer(cfg, Path(tempfile.mkdtemp()))  # batches come later
        models[model] = (trainer, trained_params(cfg, Path(r["run_dir"]), trainer))
    return robustness(
        models, docs, kinds=["swap", "drop", "insert", "case", "whitespace"],
        rates=[float(r) for r in args.rates.split(",")], seeds=args.seeds,
        context_bytes=size.context_bytes, target_bytes=size.target_bytes,
        max_pairs=args.pairs, batch_size=16,
    )  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU scale: size tiny, small subsets")
    p.add_argument("--corpus", default="data/corpus", help="build_corpus.py output")
    p.add_argument("--tokenizer", default=None, help="BPE file (trained here when missing)")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--sizes", default="100m,400m")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--evals", type=int, default=8, help="evaluations per run")
    p.add_argument("--budget-tflops", type=float, default=None, help="override per size")
    p.add_argument("--adapt-fraction", type=float, default=0.5)
    p.add_argument("--stages", default="compare,robustness,adapt")
    p.add_argument("--rates", default="0.05,0.1,0.2", help="robustness perturbation rates")
    p.add_argument("--pairs", type=int, default=256, help="robustness (context, text) pairs")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="start no new run or stage after this many seconds")  # fmt: skip
    p.add_argument("--out", default="runs/hat_paper")
    p.add_argument("--name", default="hat_paper")
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    out, corpus = Path(args.out), Path(args.corpus)
    # Seeds and the German runs repeat the same programs: compile each once.
    jax.config.update("jax_compilation_cache_dir", str((out / "jax_cache").absolute()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if args.tiny:
        args.sizes = "tiny"
        corpus = tiny_subset(corpus, out / "tiny_corpus")
    args.sizes = args.sizes.split(",")
    vocab = 1024 if args.tiny else args.vocab
    tokenizer = Path(args.tokenizer or out / f"bpe{vocab}.json")
    if not tokenizer.exists():
        train_bpe(load_texts_from_dir(corpus / "en" / "train"), vocab, tokenizer)
    table = sizes(str(tokenizer))
    stages = args.stages.split(",")

    payload = {"args": vars(args), "corpus": corpus_info(corpus),
               "tokenizer": tokenizer_info(tokenizer, corpus)}  # fmt: skip
    runs = compare(args, table, corpus, out)
    payload["compare"] = runs
    md = [compare_section(runs, args.sizes, args.name)]
    if "robustness" in stages:
        payload["robustness"] = {}
        docs = load_texts_from_dir(corpus / "en" / "val")
        for size_name in args.sizes:
            size = table[size_name]
            cache = out / f"robustness_{size_name}.json"
            key = {"seeds": args.seeds, "rates": args.rates, "pairs": args.pairs}
            cached = json.loads(cache.read_text()) if cache.exists() else {}
            if cached.get("key") == key:
                res = cached["results"]
            else:
                check_deadline(args, f"robustness at {size_name}")
                res = robustness_of(args, size, size_name, runs, corpus, docs)
                cache.write_text(json.dumps({"key": key, "results": res}))
            payload["robustness"][size_name] = res
            for metric in METRICS:
                plot_robustness(res, metric, RESULTS / f"{args.name}_robustness_{size_name}_"
                                f"{metric}.png", f"{size_name} {metric}")  # fmt: skip
            md.append(f"## Robustness, {size_name} (seed {args.seeds[0]} models; perturbation "
                      f"seeds {args.seeds})\n\nPerturbed context, clean continuation scored, "
                      f"bits per clean byte (`{args.name}_robustness_{size_name}_clean_target"
                      f".png`):\n\n{degradation_table(res, 'clean_target')[0]}\n\nContinuation "
                      f"perturbed too, bits per perturbed byte (`..._noisy_text.png`):\n\n"
                      f"{degradation_table(res, 'noisy_text')[0]}")  # fmt: skip
    if "adapt" in stages:
        adapted = adapt(args, table, corpus, out, runs)
        payload["adapt"] = adapted
        md.append(adapt_section(adapted, args.sizes))
    body = "\n\n".join(md)
    notes = (
        f"Corpus: `{corpus}` ({payload['corpus']}). Tokenizer: {payload['tokenizer']}.\n\n"
        "Training FLOPs are analytic (3x forward matmul + attention FLOPs over the padded "
        "batch, `hat_vs_transformer.step_flops`); wall times include compilation and "
        "evaluations. Every number with a ± is mean ± std over the seeds."
    )
    if args.tiny:
        notes += (
            "\n\n**CPU tiny scale**: tens of steps on a 0.3 MB subset, a check that the "
            "pipeline runs end to end (every stage, every family, seeds), not evidence for "
            "or against the claims."
        )
    write_results(args.name, "HAT vs BPE vs byte transformer: equal compute, robustness, "
                  "new-language adaptation", payload, body, notes)  # fmt: skip


def tiny_subset(corpus: Path, dest: Path, train_mb: float = 1.0, val_mb: float = 0.05) -> Path:
    """The leading documents of each split of ``corpus/{en,de}`` up to a size (CPU runs)."""
    for lang in ("en", "de"):
        for split, mb in (("train", train_mb), ("val", val_mb)):
            target = dest / lang / split
            if target.exists():
                continue
            target.mkdir(parents=True)
            total = 0
            for f in sorted((corpus / lang / split).glob("*.txt"))[::7]:  # spread over sources
                text = f.read_text(encoding="utf-8")[:20000]
                total += len(text.encode())
                if total > mb * 1e6:
                    break
                (target / f.name).write_text(text, encoding="utf-8")
    return dest


def corpus_info(corpus: Path) -> dict:
    """Sizes of the splits used and, when present, the build's manifest hash."""
    info = {
        f"{lang}/{split}_bytes": sum(f.stat().st_size for f in (corpus / lang / split).glob("*"))
        for lang in ("en", "de")
        for split in ("train", "val")
    }
    for manifest in (corpus / "MANIFEST.json", corpus / "PACKED.json"):
        if manifest.exists():
            info[manifest.name] = json.loads(manifest.read_text()).get("sha256")
    return info


def tokenizer_info(path: Path, corpus: Path) -> str:
    tok = load_tokenizer(str(path))
    val = load_texts_from_dir(corpus / "en" / "val")
    nbytes = sum(len(t.encode()) for t in val)
    tokens = sum(len(i) for i in tok.encode_batch(val))
    return f"`{path}`, {tok.vocab_size} ids, {nbytes / tokens:.2f} English val bytes/token"


def compare_section(runs: dict, size_names: list[str], name: str) -> str:
    rows = []
    for size_name in size_names:
        for model in MODELS:
            rs = [r for r in runs.values() if r["size"] == size_name and r["model"] == model]
            rows.append({
                "size": size_name, "model": model, "params": rs[0]["params"],
                "steps": rs[0]["steps"], "train_TFLOPs": rs[0]["train_tflops"],
                "val_bits_per_byte": _mean_std([r["curve"]["val_bits_per_byte"][-1] for r in rs]),
                "train_s": _mean_std([r["curve"]["train_seconds"] for r in rs]),
                "seeds": len(rs),
            })  # fmt: skip
        plot_compare(runs, size_name, RESULTS / f"{name}_{size_name}.png")
    cols = ["size", "model", "params", "steps", "train_TFLOPs", "val_bits_per_byte", "train_s",
            "seeds"]  # fmt: skip
    plots = ", ".join(f"`{name}_{s}.png`" for s in size_names)
    return f"## Equal training FLOPs, English val bits/byte ({plots})\n\n" + markdown_table(
        rows, cols
    )


def adapt_section(adapted: dict, size_names: list[str]) -> str:
    rows = []
    for size_name in size_names:
        for model in ("hat", "bpe"):
            rs = [r for r in adapted.values() if r["size"] == size_name and r["model"] == model]
            reached = [r["steps_to_target"] for r in rs if r["steps_to_target"] is not None]
            tflops = [r["tflops_to_target"] for r in rs if r["tflops_to_target"] is not None]
            rows.append({
                "size": size_name, "model": model, "steps": rs[0]["steps"],
                "de_start": _mean_std([r["curve"]["start_bits_per_byte"] for r in rs]),
                "de_final": _mean_std([r["curve"]["val_bits_per_byte"][-1] for r in rs]),
                "steps_to_bpe_final": f"{_mean_std(reached)} ({len(reached)}/{len(rs)} reached)",
                "TFLOPs_to_bpe_final": _mean_std(tflops),
                "en_before": _mean_std([r["en_before"] for r in rs]),
                "en_after": _mean_std([r["en_after"] for r in rs]),
                "en_lost": _mean_std([r["en_after"] - r["en_before"] for r in rs]),
            })  # fmt: skip
    cols = ["size", "model", "steps", "de_start", "de_final", "steps_to_bpe_final",
            "TFLOPs_to_bpe_final", "en_before", "en_after", "en_lost"]  # fmt: skip
    return (
        "## New-language adaptation (English -> German, same FLOPs for both)\n\n"
        "`steps_to_bpe_final`: steps (interpolated) until German val bits/byte reaches the BPE "
        "model's final German value of the same seed; `en_lost`: English val bits/byte after "
        "minus before.\n\n" + markdown_table(rows, cols)
    )


if __name__ == "__main__":
    main()
