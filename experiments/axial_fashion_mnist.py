"""Axial Transformer vs a pixel-level transformer on real images: held-out bits/dim.

Both models see the same training images in the same order and are evaluated on the same
held-out images. The baseline is the vanilla :class:`arjax.models.TransformerLM` over the
raster sequence ``BOS p0 p1 ...`` (pixel values are its byte tokens), sized to the Axial
Transformer's parameter count (same width and depth; its MLP width is solved for).

    python experiments/axial_fashion_mnist.py                      # Fashion-MNIST 28x28
    python experiments/axial_fashion_mnist.py --dataset digits     # scikit-learn 8x8 digits

Writes experiments/results/axial_<dataset>.{json,md} and axial_<dataset>_samples.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from bench_axial_sampling import RESULTS, environment, write_results

from arjax.config import to_dict
from arjax.data.images import image_grid, load_images, write_png
from arjax.data.vocab import BOS_ID
from arjax.generate.axial import AxialDecoder
from arjax.models.axial import AxialConfig, AxialTransformer
from arjax.models.transformer import TransformerLM, TransformerLMConfig
from arjax.train.config import TrainConfig
from arjax.train.optim import make_optimizer
from arjax.train.step import LN2, init_train_state, make_eval_step, make_train_step


def raster_batch(images: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 ``[batch, h, w, 1]`` -> text batch over ``BOS p0 .. p_{n-1}`` (DESIGN.md format)."""
    pixels = images.reshape(len(images), -1).astype(np.int32)  # [batch, n]
    inputs = np.concatenate([np.full((len(images), 1), BOS_ID, np.int32), pixels[:, :-1]], 1)
    ones = np.ones_like(pixels)
    positions = np.broadcast_to(np.arange(pixels.shape[1], dtype=np.int32), pixels.shape)
    return {"inputs": inputs, "targets": pixels, "segment_ids": ones,
            "positions": np.ascontiguousarray(positions), "loss_mask": ones}  # fmt: skip


def image_batch(images: np.ndarray) -> dict[str, np.ndarray]:
    x = images.astype(np.int32)
    return {"inputs": x, "targets": x, "loss_mask": np.ones_like(x)}


def count_params(model: nn.Module, batch: dict) -> int:
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), batch)["params"])
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes)))


def matched_baseline(axial: AxialConfig, n_params: int, seq_len: int) -> TransformerLMConfig:
    """A TransformerLM of the axial model's width and block count whose MLP width makes its
    parameter count closest to ``n_params``."""
    blocks = (len(axial.shape) - 1) * axial.outer_layers * len(axial.shape) + axial.inner_layers
    base = TransformerLMConfig(
        d_model=axial.d_model, num_layers=blocks, num_heads=axial.num_heads,
        num_kv_heads=axial.num_kv_heads, head_dim=axial.head_dim, mlp_dim=8,
        max_seq_len=seq_len, dtype=axial.dtype,
    )  # fmt: skip
    per_mlp_unit = 3 * base.d_model * base.num_layers
    mlp = max(8, round((n_params - base.num_params() + 8 * per_mlp_unit) / per_mlp_unit))
    return dataclasses.replace(base, mlp_dim=mlp)


def train_and_eval(name, model, to_batch, train, val, tc: TrainConfig, batch_size, log):
    tx = make_optimizer(tc)
    example = jax.tree.map(lambda x: jnp.asarray(x[:1]), to_batch(train[:1]))
    state = jax.jit(lambda r: nn.meta.unbox(init_train_state(model, tx, r, example)))(
        jax.random.key(tc.seed)
    )
    step = jax.jit(make_train_step(model, tx), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(model))
    order = np.random.default_rng(tc.seed)
    perm = order.permutation(len(train))
    t0 = time.perf_counter()
    for i in range(tc.steps):
        if (i + 1) * batch_size > len(perm):
            perm = np.concatenate([perm, order.permutation(len(train))])
        idx = perm[i * batch_size : (i + 1) * batch_size]
        state, metrics = step(state, to_batch(train[idx]))
        if (i + 1) % tc.log_every == 0 or i + 1 == tc.steps:
            log(f"{name} step {i + 1}: train bits/dim {float(metrics['loss']) / LN2:.3f}")
    train_s = time.perf_counter() - t0
    total = count = 0.0
    for start in range(0, len(val), batch_size):
        t, c = eval_step(state.params, to_batch(val[start : start + batch_size]))
        total, count = total + float(t), count + float(c)
    return state.params, total / count / LN2, train_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "digits"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-images", type=int, default=500)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--samples", type=int, default=16)
    args = p.parse_args()
    train, val = load_images(args.dataset, "train"), load_images(args.dataset, "val")
    val = val[: args.eval_images]
    h, w, _ = train.shape[1:]
    axial_cfg = AxialConfig(
        shape=(h, w), d_model=args.d_model, num_heads=4, num_kv_heads=4,
        head_dim=args.d_model // 4, mlp_dim=3 * args.d_model, outer_layers=2, inner_layers=2,
        dataset=args.dataset,
    )  # fmt: skip
    axial = AxialTransformer(axial_cfg)
    n_axial = count_params(axial, image_batch(train[:1]))
    base_cfg = matched_baseline(axial_cfg, n_axial, h * w)
    baseline = TransformerLM(base_cfg)
    n_base = count_params(baseline, raster_batch(train[:1]))
    tc = TrainConfig(
        steps=args.steps, learning_rate=args.lr, warmup_steps=max(1, args.steps // 10),
        log_every=max(1, args.steps // 10),
    )  # fmt: skip
    rows, sample_params = [], None
    for name, model, to_batch, n in (
        ("axial", axial, image_batch, n_axial),
        ("pixel_transformer", baseline, raster_batch, n_base),
    ):
        params, bits, train_s = train_and_eval(
            name, model, to_batch, train, val, tc, args.batch_size, print
        )
        rows.append(
            {"model": name, "params": n, "steps": args.steps, "batch": args.batch_size,
             "heldout_images": len(val), "heldout_bits_per_dim": bits, "train_seconds": train_s}
        )  # fmt: skip
        print(rows[-1])
        sample_params = params if name == "axial" else sample_params
    t = time.perf_counter()
    values = AxialDecoder(axial).sample(
        sample_params, jax.random.key(0), args.samples, temperature=1.0
    )
    samples = np.asarray(jax.block_until_ready(values)).astype(np.uint8)
    sample_s = time.perf_counter() - t
    png = write_png(
        RESULTS / f"axial_{args.dataset}_samples.png",
        image_grid(samples, cols=math.ceil(math.sqrt(args.samples))),
        scale=4,
    )
    print(f"{'model':>18} {'params':>8} {'held-out bits/dim':>18}")
    for r in rows:
        print(f"{r['model']:>18} {r['params']:>8} {r['heldout_bits_per_dim']:>18.4f}")
    extra = {
        "dataset": args.dataset,
        "axial_config": to_dict(axial_cfg),
        "baseline_config": to_dict(base_cfg),
        "samples_png": png.name,
        "sampling_seconds_incl_compile": sample_s,
    }
    print(f"wrote {write_results(f'axial_{args.dataset}', environment(), rows, extra)}, {png}")


if __name__ == "__main__":
    main()
