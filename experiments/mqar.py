"""Multi-query associative recall (MQAR): recall vs recurrent state size.

Arora et al. 2023 ("Zoology", sec. 3) / 2024 (BASED, sec. 3): a row lists ``pairs`` random
key-value pairs, then queries those keys in random order; after each queried key the model
must emit its value. Loss and accuracy count only those value predictions. We train tiny
2-layer models of each family and report accuracy against the decoding state each keeps
(floats per layer): BASED's Taylor feature dim and window, sliding-window attention's
window, GLA / RetNet / Aaren / Gated DeltaNet / DeltaNet states (the delta rules' include
their short convolutions' buffers), and full attention (KV cache of the whole row) as the
upper bound. BASED's finding: recall grows with state size / window; attention is best.

    python experiments/mqar.py --quick     # CPU: 4 pairs, 9 models, 800 steps each
    python experiments/mqar.py --quick --only gdn,deltanet --keep   # rerun two, keep the rest
"""

from __future__ import annotations

import argparse
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from linear_common import RESULTS, write_results

from arjax.models.linear_lm import LinearLM, LinearLMConfig
from arjax.models.transformer import TransformerLM, TransformerLMConfig
from arjax.nn.linear_attention import mixer_config
from arjax.train.step import init_train_state, make_train_step


def mqar_batch(rng: np.random.Generator, batch: int, pairs: int, vocab: int) -> dict:
    """Keys from ``[0, vocab/2)``, values from ``[vocab/2, vocab)``; row length ``4 * pairs``."""
    half = vocab // 2
    keys = np.stack([rng.choice(half, pairs, replace=False) for _ in range(batch)])
    values = rng.integers(half, vocab, (batch, pairs))
    order = np.stack([rng.permutation(pairs) for _ in range(batch)])
    q_keys = np.take_along_axis(keys, order, 1)
    q_values = np.take_along_axis(values, order, 1)
    context = np.stack([keys, values], -1).reshape(batch, 2 * pairs)
    queries = np.stack([q_keys, q_values], -1).reshape(batch, 2 * pairs)
    seq = np.concatenate([context, queries, np.zeros((batch, 1), int)], 1)  # [b, 4p + 1]
    mask = np.zeros((batch, 4 * pairs), np.int32)
    mask[:, 2 * pairs :: 2] = 1  # input is a queried key -> target is its value
    length = 4 * pairs
    return {
        "inputs": seq[:, :-1].astype(np.int32),
        "targets": seq[:, 1:].astype(np.int32),
        "segment_ids": np.ones((batch, length), np.int32),
        "positions": np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
        "loss_mask": mask,
    }


def models(args: argparse.Namespace) -> list[tuple[str, str, object, int]]:
    """(family, label, module, decode-state floats per layer)."""
    length = 4 * args.pairs
    base = dict(
        d_model=args.d_model, num_layers=2, num_heads=args.heads, num_kv_heads=args.heads,
        head_dim=args.d_model // args.heads, mlp_dim=2 * args.d_model, vocab_size=args.vocab,
        max_seq_len=length, dtype="float32",
    )  # fmt: skip
    h, hd = args.heads, args.d_model // args.heads
    out = [
        (
            "attention",
            "full attention",
            TransformerLM(TransformerLMConfig(**base)),
            2 * length * h * hd,
        )
    ]
    small = max(args.pairs // 2, 1)  # a window that sees only part of the context
    for window in (small, 2 * args.pairs):
        cfg = TransformerLMConfig(**base, window=window)
        out.append(("sliding window", f"SWA w={window}", TransformerLM(cfg), 2 * window * h * hd))
    for feat, window in ((1, small), (4, small), (8, small)):
        mixer = mixer_config("based", feature_dim=feat, window=window, chunk_size=32)
        state = h * ((1 + feat + feat**2) * (hd + 1) + 2 * window * hd)
        out.append(
            (
                "based",
                f"BASED f={feat} w={window}",
                LinearLM(LinearLMConfig(**base, mixer=mixer)),
                state,
            )
        )
    for kind, state in (("gla", h * hd * hd), ("retnet", h * hd * hd), ("aaren", h * (hd + 2))):
        mixer = mixer_config(kind, **({} if kind == "aaren" else {"chunk_size": 32}))
        out.append((kind, kind, LinearLM(LinearLMConfig(**base, mixer=mixer)), state))
    for kind in ("gdn", "deltanet"):
        mixer = mixer_config(kind, chunk_size=32)
        state = h * hd * hd + 3 * (mixer.conv_size - 1) * h * hd  # + q, k, v conv buffers
        out.append((kind, kind, LinearLM(LinearLMConfig(**base, mixer=mixer)), state))
    return out


def train_and_eval(model: nn.Module, args: argparse.Namespace) -> float:
    rng = np.random.default_rng(args.seed)
    tx = optax.adamw(
        optax.warmup_cosine_decay_schedule(0, args.lr, 30, args.steps), weight_decay=0.1
    )
    example = mqar_batch(rng, args.batch, args.pairs, args.vocab)
    state = init_train_state(model, tx, jax.random.key(args.seed), example)
    state = state.replace(
        params=nn.meta.unbox(state.params), opt_state=nn.meta.unbox(state.opt_state)
    )
    step = jax.jit(make_train_step(model, tx))
    for _ in range(args.steps):
        state, _ = step(state, mqar_batch(rng, args.batch, args.pairs, args.vocab))
    test = mqar_batch(np.random.default_rng(10_000 + args.seed), 512, args.pairs, args.vocab)
    logits = jax.jit(model.apply)({"params": state.params}, test)
    hit = (jnp.argmax(logits, -1) == test["targets"]) * test["loss_mask"]
    return float(hit.sum() / test["loss_mask"].sum())


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for family in dict.fromkeys(r["family"] for r in rows):
        pts = sorted(
            (r["state floats/layer"], r["accuracy"]) for r in rows if r["family"] == family
        )
        ax.plot(*zip(*pts), marker="o", label=family)
    ax.set_xscale("log")
    ax.set_xlabel("decode state (floats per layer)")
    ax.set_ylabel("MQAR accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="CPU sizes (the committed run)")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="comma-separated families to run")
    parser.add_argument(
        "--keep", action="store_true",
        help="keep the other families' rows of the existing results file (same sizes)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.vocab, args.steps, args.lr = 4, 32, 800, 5e-3
        args.only = args.only or "attention,sliding window,based,gla,gdn,deltanet"
    name = "mqar" + ("_quick" if args.quick else "")
    rows, kept = [], ""
    if args.keep and (RESULTS / f"{name}.json").exists():
        old = json.loads((RESULTS / f"{name}.json").read_text())
        rows = [r for r in old["rows"] if r["family"] not in args.only.split(",")]
        kept = f" Rows of {sorted({r['family'] for r in rows})} kept from the run of {old['date']}."
    for family, label, model, state in models(args):
        if args.only and family not in args.only.split(","):
            continue
        acc = train_and_eval(model, args)
        rows.append(
            {"family": family, "model": label, "state floats/layer": state, "accuracy": acc}
        )
        print(rows[-1], flush=True)
    write_results(
        name, "MQAR accuracy vs decode state size", rows,
        ["family", "model", "state floats/layer", "accuracy"],
        f"{args.pairs} pairs, vocab {args.vocab}, d_model {args.d_model}, 2 layers, "
        f"{args.steps} steps x batch {args.batch}, accuracy on 512 fresh rows. Plot: {name}.png."
        + kept,
    )  # fmt: skip
    plot(rows, RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
