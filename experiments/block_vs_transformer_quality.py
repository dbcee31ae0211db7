"""Quality cost of the Block Transformer: validation bits/byte after the same training budget.

Trains the vanilla transformer LM and the Block Transformer at (about) equal parameter count
(vanilla: 2N layers; block: N block-decoder + N token-decoder layers, same width) with the same
data (Shakespeare, packed byte windows), optimizer, steps and seed via ``arjax.train.train``,
and reports the final validation bits/byte of each.

    python experiments/block_vs_transformer_quality.py --steps 300

Writes ``experiments/results/block_vs_transformer_quality.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import flax
import jax

from arjax.train.config import make_run_config
from arjax.train.loop import train

RESULTS = Path(__file__).parent / "results"


def run(model: str, overrides: list[str], out: str) -> dict:
    cfg = make_run_config(model, "tiny", overrides)
    t0 = time.perf_counter()
    last = train(cfg, out)
    seconds = time.perf_counter() - t0
    params = sum(x.size for x in jax.tree.leaves(last["state"].params))
    return dict(
        model=model, overrides=overrides, params=int(params), seconds=seconds,
        val_bits_per_byte=last["val_bits_per_byte"], train_loss=last["loss"] / 0.6931471805599453,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--block-len", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2, help="N: block/token decoder layers each")
    args = ap.parse_args()
    common = [f"train.steps={args.steps}", f"train.eval_every={args.steps}",
              f"train.save_every={args.steps}", "train.progress=false",
              f"train.log_every={args.steps}"]  # fmt: skip
    runs = {
        "transformer": common + [f"model.num_layers={2 * args.layers}"],
        "block": common
        + [
            f"model.block_len={args.block_len}",
            f"model.block_decoder.num_layers={args.layers}",
            f"model.token_decoder.num_layers={args.layers}",
        ],
    }
    rows = []
    for model, overrides in runs.items():
        with tempfile.TemporaryDirectory() as out:
            row = run(model, overrides, out)
        bpb, secs = row["val_bits_per_byte"], row["seconds"]
        print(
            f"{model:12s} params={row['params'] / 1e6:.3f}M  val bits/byte={bpb:.4f} ({secs:.0f} s)"
        )
        rows.append(row)
    cfg = make_run_config("transformer", "tiny")
    meta = dict(
        device=f"{jax.devices()[0].platform}:{getattr(jax.devices()[0], 'device_kind', '')}",
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        jax=jax.__version__, flax=flax.__version__, python=platform.python_version(),
        command="python " + " ".join(sys.argv), steps=args.steps,
        data=f"shakespeare, seq_len={cfg.data.seq_len}, batch={cfg.data.batch_size}, "
        f"val_batches={cfg.data.val_batches}",
        note="wall s measured on a shared 2-core CPU under varying load: not a speed comparison",
    )  # fmt: skip
    lines = ["| model | params | steps | val bits/byte | train bits/byte (last step) | wall s |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.3f}M | {args.steps} | "
            f"{r['val_bits_per_byte']:.4f} | {r['train_loss']:.4f} | {r['seconds']:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / "block_vs_transformer_quality"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    md = ["# Block Transformer vs transformer: validation bits/byte, same budget", ""]
    md += [f"- {k}: `{v}`" for k, v in meta.items()] + ["", table, ""]
    stem.with_suffix(".md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
