"""Sharded training step == single device, on 8 fake CPU devices (in a subprocess).

Includes the Pallas flash-attention kernels (interpret mode) shard_mapped inside the step,
and the chunked cross-entropy (``model.loss_chunk``) on a sharded mesh. Every value of every
leaf of the gradients, the updated parameters and the updated optimizer state is compared
with the single-device run (the subprocess writes whole trees to ``.npz`` files).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile
    import jax, numpy as np
    from arjax.train.config import make_run_config
    from arjax.train.loop import Trainer
    from arjax.train.step import loss_fn

    sets, out_dir = json.loads(sys.argv[1]), sys.argv[2]

    def flat(tree, prefix):
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {prefix + jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}

    # (2, 2, 2) twice: Pallas attention with the plain loss, XLA attention with the chunked one
    runs = [((1, 1, 1), "xla", ""), ((8, 1, 1), "xla", ""), ((2, 4, 1), "xla", ""),
            ((2, 2, 2), "pallas", ""), ((2, 2, 2), "xla", "model.loss_chunk=12")]
    summary = {}
    for i, (shape, impl, extra) in enumerate(runs):
        mesh = [f"mesh.data={shape[0]}", f"mesh.fsdp={shape[1]}", f"mesh.tensor={shape[2]}"]
        cfg = make_run_config(
            "transformer", "tiny",
            sets + mesh + [f"model.attention_impl={impl}"] + ([extra] if extra else []))
        n = shape[0] * shape[1] * shape[2]
        trainer = Trainer(cfg, tempfile.mkdtemp(), devices=jax.devices()[:n])
        state = trainer.initial_state()
        batch = {k: jax.device_put(v, trainer.batch_sharding)
                 for k, v in next(trainer.train_iter).items()}
        grads = jax.jit(jax.grad(lambda p: (lambda t, c: t / c)(
            *loss_fn(trainer.model, p, batch))))(state.params)
        new, metrics = trainer.train_step(state, batch)
        name = f"{shape} {impl} {extra}".strip()
        arrays = {"loss": np.asarray(metrics["loss"]), **flat(grads, "grads"),
                  **flat(new.params, "params"), **flat(new.opt_state, "opt_state")}
        np.savez(f"{out_dir}/{i}.npz", **arrays)
        summary[name] = {
            "file": f"{i}.npz",
            "shardings": sorted({str(p.sharding.spec) for p in jax.tree.leaves(new.params)}),
        }
    print(json.dumps(summary))
    """
)

# no warmup: the step's learning rate is not 0, so the parameters move
SETS = [
    "model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
    "model.head_dim=8", "model.mlp_dim=64", "model.max_seq_len=64", "data.seq_len=32",
    "data.batch_size=8", "data.val_batches=1", "train.warmup_steps=0",
]  # fmt: skip

# float32 with different reduction orders across shards. Gradients and Adam moments: every
# element within 1e-4 of its leaf's largest magnitude (a sum of n terms reordered moves by
# ~n * eps * max|term|). Updated parameters: within 1e-5 absolute (the first AdamW step moves
# each weight by about the learning rate, 3e-3, so this is 0.3% of the update; a gradient
# whose sign flipped between meshes would be off by twice that). Measured on these seeds:
# at most 0.41 of either bound.
GRAD_RTOL, PARAM_ATOL = 1e-4, 1e-5


def _compare(name: str, got: dict, ref: dict) -> None:
    assert sorted(got) == sorted(ref), (name, sorted(set(got) ^ set(ref)))
    for key, b in ref.items():
        a = got[key]
        assert a.shape == b.shape and a.dtype == b.dtype, (name, key, a.shape, b.shape)
        if not np.issubdtype(b.dtype, np.floating):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} {key}")
            continue
        if key.startswith("params"):
            tol = PARAM_ATOL
        else:
            tol = 1e-7 + GRAD_RTOL * float(np.max(np.abs(b), initial=0.0))
        err = float(np.max(np.abs(a - b), initial=0.0))
        assert err <= tol, f"{name} {key}: max |sharded - single| = {err:.3g} > {tol:.3g}"


def test_sharded_step_matches_single_device(tmp_path):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env = dict(os.environ, XLA_FLAGS=flags.strip())
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(SETS), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])

    def load(name: str) -> dict:
        with np.load(tmp_path / summary[name]["file"]) as f:
            return dict(f)

    ref = load("(1, 1, 1) xla")
    # Both layers of the scanned stack are in the trees (the layer axis is compared too).
    assert any(v.ndim >= 3 and v.shape[0] == 2 for k, v in ref.items() if k.startswith("params"))
    for name in summary:
        if name != "(1, 1, 1) xla":
            _compare(name, load(name), ref)
    # The meshes really shard: FSDP splits the embed dim, tensor splits heads/mlp.
    assert any("fsdp" in s for s in summary["(2, 4, 1) xla"]["shardings"])
    assert any("tensor" in s for s in summary["(2, 2, 2) pallas"]["shardings"])
    assert any("tensor" in s for s in summary["(2, 2, 2) xla model.loss_chunk=12"]["shardings"])
    # The Pallas kernels (interpret mode here) run shard_mapped inside the sharded step, and
    # the chunked loss (ragged: 32 positions in chunks of 12) on the sharded mesh.
    assert "(2, 2, 2) pallas" in summary
    assert "(2, 2, 2) xla model.loss_chunk=12" in summary
