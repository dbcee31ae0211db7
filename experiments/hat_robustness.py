"""Robustness to input perturbations of any trained text model: HAT, byte or BPE transformer.

The claim (Neitemeier et al. 2025, Sec. 4.3): HAT, reading bytes and pooling them into
words, degrades less than a subword model when the input is noisy. Perturbations:
:mod:`arjax.data.perturb` (swaps, drops, insertions, case flips, whitespace noise) at several
rates and seeds.

**What bits/byte means here.** A noisy text's own bits/byte mixes two things: how well the
model still reads, and the entropy of the injected noise (a random inserted letter costs
about log2(26) bits to any model), and the noisy texts have different byte counts. So the
main metric scores **clean bytes only**: each validation document is cut into (context,
continuation) pairs at line starts; the context is perturbed, the continuation is not, and
the model is scored on the continuation only, in bits per UTF-8 byte of the clean
continuation (summed nats / (ln 2 x its bytes)). Every model, whatever its tokenizer, is
scored on exactly the same bytes given the same noisy context, and the rate-0 row is the
clean baseline (``clean_target``). The second metric (``noisy_text``) is closer to the older
one: the continuation is perturbed too and scored per byte of the perturbed continuation.

Rows are one pair each (``[BOS] context continuation``, right-padded), built per family:
bytes (:func:`arjax.data.pipeline.window_features`), BPE tokens (``target_bytes`` from the
tokenizer; context and continuation encoded separately, which at a line start gives the
same tokens as encoding them together) or HAT words (:func:`arjax.data.words.words_to_batch`).

    python experiments/hat_robustness.py    # runs/hat_vs_transformer/{hat,transformer}
    python experiments/hat_robustness.py --run hat=runs/p/hat --run bpe=runs/p/bpe \\
        --run byte=runs/p/byte --corpus data/corpus/en --name hat_paper_robustness
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from hat_common import RESULTS, markdown_table, write_results  # noqa: E402

from arjax.cli import load_run_config  # noqa: E402
from arjax.data.bpe import load_tokenizer  # noqa: E402
from arjax.data.corpus import load_corpus, load_texts_from_dir  # noqa: E402
from arjax.data.perturb import PERTURBATIONS, perturb  # noqa: E402
from arjax.data.pipeline import window_features  # noqa: E402
from arjax.data.vocab import BOS_ID, PAD_ID  # noqa: E402
from arjax.data.words import document_words, words_to_batch  # noqa: E402
from arjax.train.checkpoint import Checkpointer  # noqa: E402
from arjax.train.config import RunConfig  # noqa: E402
from arjax.train.loop import Trainer  # noqa: E402

METRICS = ("clean_target", "noisy_text")


def context_target_pairs(
    docs: list[str], context_bytes: int, target_bytes: int, max_pairs: int
) -> list[tuple[str, str]]:
    """Consecutive (context, continuation) pairs from each document, in order, at most
    ``max_pairs`` (spread over the documents): the context is about ``context_bytes`` and
    ends with a newline, the continuation about ``target_bytes`` (whole characters)."""
    pairs_per_doc = []
    for doc in docs:
        pairs, pos = [], 0
        while True:
            cut = doc.find("\n", pos + _char_len(doc, pos, context_bytes))
            if cut < 0:
                break
            ctx = doc[pos : cut + 1]
            tgt = doc[cut + 1 : cut + 1 + _char_len(doc, cut + 1, target_bytes)]
            if len(tgt.encode("utf-8")) < target_bytes // 2 or not tgt.strip():
                break
            pairs.append((ctx, tgt))
            pos = cut + 1 + len(tgt)
        pairs_per_doc.append(pairs)
    out, i = [], 0
    while len(out) < max_pairs and any(i < len(p) for p in pairs_per_doc):
        out += [p[i] for p in pairs_per_doc if i < len(p)][: max_pairs - len(out)]
        i += 1
    return out


def _char_len(text: str, start: int, nbytes: int) -> int:
    """Characters from ``start`` whose UTF-8 fits in ``nbytes`` bytes."""
    return len(text[start : start + nbytes].encode("utf-8")[:nbytes].decode(errors="ignore"))


def scored_rows(cfg: RunConfig, pairs: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    """One row ``[BOS] context continuation`` per pair in ``cfg``'s batch format; the loss
    mask (and ``target_bytes``) cover the continuation only. A context too long for the row
    (``data.seq_len`` tokens, HAT's ``max_words``) loses its oldest tokens (words)."""
    seq = cfg.data.seq_len
    ctx_len = []
    if cfg.model_name == "hat":
        m = cfg.model
        rows = []
        for i, (ctx, tgt) in enumerate(pairs):
            bos, *tail, _ = document_words(tgt, m.max_word_bytes)  # [BOS] words [EOS]
            head = document_words(ctx, m.max_word_bytes)[1:-1] if ctx else []
            size = lambda ws: sum(len(w) for w in ws)  # noqa: E731
            drop = 0
            while drop <= len(head) and (
                1 + len(head) - drop + len(tail) > m.max_words
                or 1 + size(head[drop:]) + size(tail) > seq
            ):
                drop += 1
            if drop > len(head):
                raise ValueError(f"pair {i}: the continuation alone does not fit a HAT row")
            ctx_len.append(size(head[drop:]))
            rows.append([bos, *head[drop:], *tail])
        batch = words_to_batch(rows, seq, m.max_words)
    else:
        tok = load_tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer else None
        enc = (lambda s: tok.encode(s).tolist()) if tok else (lambda s: list(s.encode()))
        ids = np.full((len(pairs), seq + 1), PAD_ID, np.int32)
        for i, (ctx, tgt) in enumerate(pairs):
            tail = enc(tgt)
            room = seq - 1 - len(tail)
            if room < 0:
                raise ValueError(f"pair {i}: continuation of {len(tail)} tokens > seq_len")
            head = enc(ctx)[-room:] if room else []
            ctx_len.append(len(head))
            ids[i, : 1 + len(head) + len(tail)] = [BOS_ID, *head, *tail]
        batch = window_features(ids)
        if tok:
            batch = tok.add_target_bytes(batch)
    # target i predicts token i + 1: mask the context's targets
    keep = np.arange(seq)[None, :] >= np.asarray(ctx_len)[:, None]
    batch["loss_mask"] = (batch["loss_mask"] * keep).astype(np.int32)
    if "target_bytes" in batch:
        batch["target_bytes"] = (batch["target_bytes"] * keep).astype(np.int32)
    return batch


def bits_per_target_byte(
    trainer: Trainer, params, pairs: list[tuple[str, str]], batch_size: int
) -> float:
    """Summed nats over the continuations / (ln 2 x their UTF-8 bytes)."""
    rows = scored_rows(trainer.cfg, pairs)
    num_pad = -len(pairs) % batch_size
    if num_pad:
        pad = {k: np.zeros((num_pad, *v.shape[1:]), np.int32) for k, v in rows.items()}
        rows = {k: np.concatenate([v, pad[k]]) for k, v in rows.items()}
    n = len(pairs) + num_pad
    trainer.eval_batches = [
        {k: v[i : i + batch_size] for k, v in rows.items()} for i in range(0, n, batch_size)
    ]
    bits = trainer.evaluate(params)["val_bits_per_byte"]
    expected = sum(len(t.encode("utf-8")) for _, t in pairs)
    scored = sum(
        int(np.sum(b.get("target_bytes", b["loss_mask"]) * b["loss_mask"]))
        for b in trainer.eval_batches
    )
    if scored != expected:  # every continuation byte is scored exactly once
        raise AssertionError(f"scored {scored} bytes, continuations have {expected}")
    return bits


def restore_params(trainer: Trainer, run_dir: Path) -> tuple[object, int]:
    """Params and step of the newest valid checkpoint of the run in ``run_dir``, laid out
    for ``trainer`` (same model config); the trainer's own data state is left alone."""
    ckpt = Checkpointer(run_dir / "checkpoints")
    state, _, _ = ckpt.restore_latest_valid(
        trainer.abstract_state, shardings=trainer.state_shardings
    )
    if state is None:
        raise SystemExit(f"{run_dir}: no trained checkpoint")
    return state.params, int(state.step)


def stand_in_trainer(cfg: RunConfig, scratch: Path, val_dir: Path | None = None) -> Trainer:
    """A trainer for ``cfg`` reading a stand-in train split (shapes only) and ``val_dir``
    (all of it) or a stand-in too: evaluation without loading a large corpus."""
    root = Path(tempfile.mkdtemp(dir=scratch))
    for split in ("train", "val"):
        (root / split).mkdir()
        for i in range(2):
            (root / split / f"{i}.txt").write_text("stand-in text\n" * 64)
    if val_dir is not None:
        shutil.rmtree(root / "val")
        os.symlink(val_dir.absolute(), root / "val")
    data = dataclasses.replace(cfg.data, corpus=str(root), val_batches=0 if val_dir else 1)
    return Trainer(dataclasses.replace(cfg, data=data), root / "run")


def load_trained(out: Path, batch_size: int, scratch: Path) -> tuple[Trainer, object, int]:
    """Trainer (batches of ``batch_size`` rows), params and step of the run in ``out``."""
    cfg = load_run_config(out, None, [])
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch_size))
    trainer = stand_in_trainer(cfg, scratch)
    return trainer, *restore_params(trainer, out)


def robustness(
    models: dict[str, tuple[Trainer, object]],
    docs: list[str],
    *,
    kinds: list[str],
    rates: list[float],
    seeds: list[int],
    context_bytes: int,
    target_bytes: int,
    max_pairs: int,
    batch_size: int,
) -> list[dict]:
    """Rows ``{metric, kind, rate, model, mean, std, per_seed}`` over the grid."""
    pairs = context_target_pairs(docs, context_bytes, target_bytes, max_pairs)
    if not pairs:
        raise ValueError("no (context, continuation) pairs: documents too short")
    results = []
    for metric in METRICS:
        for kind in kinds:
            for rate in [0.0, *[r for r in rates if r > 0]]:
                per_model = {name: [] for name in models}
                for seed in seeds if rate > 0 else seeds[:1]:
                    noisy = [
                        (perturb(c, kind, rate, seed * 100003 + i), t)
                        for i, (c, t) in enumerate(pairs)
                    ]
                    if metric == "noisy_text":  # the continuation perturbed too, scored
                        noisy = [(c, perturb(t, kind, rate, seed * 100003 + len(pairs) + i))
                                 for i, (c, t) in enumerate(noisy)]  # fmt: skip
                    for name, (trainer, params) in models.items():
                        bits = bits_per_target_byte(trainer, params, noisy, batch_size)
                        per_model[name].append(bits)
                for name, vals in per_model.items():
                    results.append({
                        "metric": metric, "kind": kind, "rate": rate, "model": name,
                        "mean": float(np.mean(vals)), "std": float(np.std(vals)),
                        "per_seed": vals,
                    })  # fmt: skip
                print(f"{metric} {kind} {rate}: "
                      + ", ".join(f"{n} {np.mean(v):.4f}" for n, v in per_model.items()),
                      flush=True)  # fmt: skip
    return results


def plot(results: list[dict], metric: str, path: Path, title: str) -> None:
    """One panel per perturbation: bits/byte vs rate, a line per model (error bar: std)."""
    rows = [r for r in results if r["metric"] == metric]
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds), 3.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for model in dict.fromkeys(r["model"] for r in rows):
            pts = [r for r in rows if r["kind"] == kind and r["model"] == model]
            x, y = [r["rate"] for r in pts], [r["mean"] for r in pts]
            err = [r["std"] for r in pts]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=model)
        ax.set_title(kind)
        ax.set_xlabel("rate")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("bits / clean byte" if metric == "clean_target" else "bits / byte")
    axes[0][-1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def degradation_table(results: list[dict], metric: str) -> tuple[str, list[dict]]:
    """Markdown: per (kind, rate) each model's bits/byte (mean +- std over seeds) and its
    increase over the clean rate-0 value."""
    rows = [r for r in results if r["metric"] == metric]
    models = list(dict.fromkeys(r["model"] for r in rows))
    clean = {(r["kind"], r["model"]): r["mean"] for r in rows if r["rate"] == 0.0}
    table = []
    for kind, rate in dict.fromkeys((r["kind"], r["rate"]) for r in rows):
        row = {"perturbation": kind, "rate": rate}
        for r in rows:
            if (r["kind"], r["rate"]) == (kind, rate):
                row[r["model"]] = f"{r['mean']:.4f} ± {r['std']:.4f}"
                row[f"{r['model']} Δ"] = f"{r['mean'] - clean[(kind, r['model'])]:+.4f}"
        table.append(row)
    cols = ["perturbation", "rate", *models, *[f"{m} Δ" for m in models]]
    return markdown_table(table, cols), table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", action="append", default=[], metavar="NAME=DIR",
                   help="trained run (repeatable); default --runs/{hat,transformer}")  # fmt: skip
    p.add_argument("--runs", default="runs/hat_vs_transformer")
    p.add_argument("--corpus", default="shakespeare", help="its val split is perturbed")
    p.add_argument("--kinds", default=",".join(PERTURBATIONS))
    p.add_argument("--rates", default="0.05,0.1,0.2")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--context-bytes", type=int, default=128)
    p.add_argument("--target-bytes", type=int, default=64)
    p.add_argument("--max-pairs", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--name", default="hat_robustness", help="results file stem")
    args = p.parse_args()

    runs = dict(r.split("=", 1) for r in args.run) or {
        n: f"{args.runs}/{n}" for n in ("hat", "transformer")
    }
    models, steps, scratch = {}, {}, Path(tempfile.mkdtemp())
    for name, out in runs.items():
        trainer, params, steps[name] = load_trained(Path(out), args.batch_size, scratch)
        models[name] = (trainer, params)
    docs = (
        load_corpus("val")
        if args.corpus == "shakespeare"
        else load_texts_from_dir(Path(args.corpus) / "val")
    )
    results = robustness(
        models, docs, kinds=args.kinds.split(","),
        rates=[float(r) for r in args.rates.split(",")],
        seeds=[int(s) for s in args.seeds.split(",")], context_bytes=args.context_bytes,
        target_bytes=args.target_bytes, max_pairs=args.max_pairs, batch_size=args.batch_size,
    )  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    tables = {}
    for metric in METRICS:
        plot(results, metric, RESULTS / f"{args.name}_{metric}.png",
             f"{metric}: bits/byte vs perturbation rate")  # fmt: skip
        tables[metric] = degradation_table(results, metric)[0]
    notes = (
        f"Runs: {runs} (steps {steps}). Text: validation split of `{args.corpus}`, "
        f"{args.max_pairs} (context ~{args.context_bytes} B, continuation ~{args.target_bytes}"
        f" B) pairs; seeds {args.seeds}. `clean_target` (first table, `{args.name}_clean_target"
        ".png`): the context is perturbed, the clean continuation is scored, bits per clean "
        "byte; every model scores the same bytes. `noisy_text` (second table, "
        f"`{args.name}_noisy_text.png`): context and continuation perturbed, bits per "
        "perturbed continuation byte (includes the injected noise's own entropy). Δ: "
        f"increase over the clean value.\n\n### noisy_text\n\n{tables['noisy_text']}\n"
    )
    write_results(
        args.name,
        "Bits/byte under input perturbations",
        {"args": vars(args), "train_steps": steps, "results": results},
        tables["clean_target"],
        notes,
    )


if __name__ == "__main__":
    main()
