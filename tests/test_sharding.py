"""Sharded training step == single device, on 8 fake CPU devices (in a subprocess).

Includes the Pallas flash-attention kernels (interpret mode) shard_mapped inside the step,
and the chunked cross-entropy (``model.loss_chunk``) on a sharded mesh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile
    import jax, numpy as np
    from arjax.train.config import make_run_config
    from arjax.train.loop import Trainer
    from arjax.train.step import loss_fn

    sets = json.loads(sys.argv[1])
    results = {}
    runs = [((1, 1, 1), "xla", ""), ((8, 1, 1), "xla", ""), ((2, 4, 1), "xla", ""),
            ((2, 2, 2), "xla", ""), ((2, 2, 2), "pallas", ""),
            ((2, 2, 2), "xla", "model.loss_chunk=12")]
    for shape, impl, extra in runs:
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
        results[f"{shape} {impl} {extra}".strip()] = {
            "loss": float(metrics["loss"]),
            "grads": [np.asarray(g).ravel()[:64].tolist() for g in jax.tree.leaves(grads)],
            "params": [np.asarray(p).ravel()[:64].tolist() for p in jax.tree.leaves(new.params)],
            "shardings": sorted({str(p.sharding.spec) for p in jax.tree.leaves(new.params)}),
        }
    print(json.dumps(results))
    """
)

SETS = [
    "model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
    "model.head_dim=8", "model.mlp_dim=64", "model.max_seq_len=64", "data.seq_len=32",
    "data.batch_size=8", "data.val_batches=1",
]  # fmt: skip


def test_sharded_step_matches_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(SETS)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = results.pop("(1, 1, 1) xla")
    for shape, res in results.items():
        # float32; different reduction orders across shards -> tolerance 1e-5 relative.
        assert abs(res["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), shape
        for a, b in zip(res["grads"], ref["grads"]):
            assert len(a) == len(b)
            assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5 + 1e-4 * max(map(abs, b)), shape
        for a, b in zip(res["params"], ref["params"]):
            assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, shape
    # The meshes really shard: FSDP splits the embed dim, tensor splits heads/mlp.
    assert any("fsdp" in s for s in results["(2, 4, 1) xla"]["shardings"])
    assert any("tensor" in s for s in results["(2, 2, 2) xla"]["shardings"])
    # The Pallas kernels (interpret mode here) run shard_mapped inside the sharded step.
    assert "(2, 2, 2) pallas" in results
    # The chunked loss (ragged: 32 positions in chunks of 12) on the sharded mesh.
    assert "(2, 2, 2) xla model.loss_chunk=12" in results
