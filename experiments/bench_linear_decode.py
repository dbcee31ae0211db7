"""Per-token decode time vs context length: linear-attention LMs vs the KV-cache transformer.

A linear LM decodes from a fixed-size state (and BASED from a ``window``-token ring buffer),
so its step time is flat in the context; the transformer's step reads a KV cache that grows
with it. The cache/state contents do not change the work, so each context is set up as a
zero-filled cache of the right size (no prefill needed). Each step is the family decoder's
``step`` (:mod:`arjax.generate.engine`), jitted with the cache
donated (updated in place), compiled outside the timing, and timed as the median of
``--repeats`` blocked calls.

    python experiments/bench_linear_decode.py --quick        # CPU: tiny models
    python experiments/bench_linear_decode.py                # GPU: small models, batch 8
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp
from linear_common import median_seconds, write_results

from arjax.generate import decoder_for
from arjax.models import MODELS

CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)


def decode_step_seconds(name: str, preset: str, context: int, batch: int, repeats: int) -> float:
    cfg = MODELS[name].presets[preset]
    if name == "transformer":
        cfg = dataclasses.replace(cfg, max_seq_len=context)
    model = MODELS[name].module_cls(cfg)
    tok = jnp.zeros((batch, 1), jnp.int32)
    pos = jnp.full((batch, 1), context - 1, jnp.int32)
    params = jax.jit(model.init)(
        jax.random.key(0), {"inputs": tok, "positions": pos, "segment_ids": tok + 1}
    )
    # The generation engine's decoder step (layer stacks unrolled, in-place cache update).
    decoder = decoder_for(model)
    params = decoder.prepare(params["params"])
    lengths = jnp.ones((batch,), jnp.int32)
    # Decode state for this context: KV [.., context, ..] or the fixed recurrent state.
    shapes = jax.eval_shape(
        lambda: decoder.prefill(params, tok, lengths, layout=None, max_new=context - 1)[1]
    )
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    state["position"] = jnp.full((batch,), context - 1, jnp.int32)
    if "visible" in state:  # the new token attends to a full cache
        state["visible"] = jnp.ones(shapes["visible"].shape, bool)
        state["slot"] = jnp.int32(context - 1)
    active = jnp.ones((batch,), bool)

    stored = decoder.store(params)  # the step's params: in the loop's layout

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state):
        logits, new = decoder.step(stored, state, tok[:, 0], active)
        fixed = {k: state[k] for k in ("slot", "position") if k in state}  # stay at the end
        return {**new, **fixed}, logits

    holder = {"state": state}

    def run():
        holder["state"], out = step(holder["state"])
        return out

    return median_seconds(run, repeats, warmup=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny presets, batch 1 (CPU)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--models", default="transformer,based,gla,retnet,aaren")
    args = parser.parse_args()
    preset, batch = ("tiny", 1) if args.quick else ("small", 8)
    rows = []
    columns = ["model", "preset", "batch", *(f"{c // 1024}k ms" for c in CONTEXTS), "32k / 1k"]
    for name in args.models.split(","):
        row = {"model": name, "preset": preset, "batch": batch}
        for context in CONTEXTS:
            ms = 1e3 * decode_step_seconds(name, preset, context, batch, args.repeats)
            row[f"{context // 1024}k ms"] = ms
            print(f"{name:12s} context {context:6d}: {ms:.3f} ms/token", flush=True)
        row["32k / 1k"] = row["32k ms"] / row["1k ms"]
        rows.append(row)
        write_results(  # after every model, so a run cut short keeps what it measured
            "linear_decode" + ("_quick" if args.quick else ""),
            "Per-token decode time (ms) vs context: linear-attention LMs vs KV-cache transformer",
            rows,
            columns,
            "Median of repeated jitted decode steps, cache donated; zero-filled caches sized "
            "for each context; the step of the generation engine's decoder (arjax.generate). "
            "Flat rows = O(1) "
            "decoding.",
        )


if __name__ == "__main__":
    main()
