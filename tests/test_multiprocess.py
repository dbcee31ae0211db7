"""Two processes on localhost (CPU collectives via gloo) == one process, same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

SETS = [
    "model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
    "model.head_dim=16", "model.mlp_dim=64", "model.max_seq_len=64", "data.seq_len=32",
    "data.batch_size=4", "data.val_batches=1", "train.steps=3", "train.log_every=1",
    "train.eval_every=3", "train.save_every=3", "train.sample_bytes=0", "train.progress=false",
]  # fmt: skip


def _cmd(out):
    args = ["train", "--model", "transformer", "--preset", "tiny", "--out", str(out)]
    return [sys.executable, "-m", "arjax.cli", *args, *[x for s in SETS for x in ("--set", s)]]


def _losses(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [
        r["val_bits_per_byte"] for r in rows if "val_bits_per_byte" in r
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # one device each (conftest)
    single = subprocess.run(_cmd(tmp_path / "one"), env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]

    port = _free_port()
    procs = [
        subprocess.Popen(
            _cmd(tmp_path / "two"),
            env=dict(
                env,
                ARJAX_COORDINATOR=f"127.0.0.1:{port}",
                ARJAX_NUM_PROCESSES="2",
                ARJAX_PROCESS_ID=str(i),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    one_loss, one_val = _losses(tmp_path / "one")
    two_loss, two_val = _losses(tmp_path / "two")
    assert len(one_loss) == len(two_loss) == 3
    # float32; the cross-process all-reduce changes summation order only.
    for a, b in zip(one_loss + one_val, two_loss + two_val):
        assert abs(a - b) <= 1e-5 * abs(a)
    # Orbax wrote one checkpoint for the two processes.
    assert (tmp_path / "two" / "checkpoints" / "3").is_dir()
