"""Reliability suite helpers: a tiny transformer run driven through the real CLI.

Subprocesses share a persistent XLA compilation cache (one per test session) so that only the
first `arjax train` pays for compilation; the suite stays within its CI time budget.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

STEPS = 40
# A 1-layer, 32-wide byte transformer on 4 x 32-byte windows: milliseconds per step on CPU.
TINY = [
    "model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
    "model.head_dim=16", "model.mlp_dim=64", "model.max_seq_len=64",
    "data.seq_len=32", "data.batch_size=4", "data.val_batches=1",
    "train.log_every=1", "train.eval_every=1000", "train.save_every=4",
    "train.sample_bytes=0", "train.progress=false", "train.warmup_steps=5",
]  # fmt: skip
# Timing columns differ run to run; every other column must match exactly.
TIMING = {"step_time", "tokens_per_s", "mfu"}


def cli_args(out: Path, steps: int = STEPS, extra: tuple[str, ...] = ()) -> list[str]:
    sets = [f"--set={kv}" for kv in (*TINY, f"train.steps={steps}", *extra)]
    return [sys.executable, "-m", "arjax.cli", "train", "--model", "transformer",
            "--preset", "tiny", "--out", str(out), *sets]  # fmt: skip


def metric_rows(out: Path) -> dict[int, dict]:
    """``step -> merged row`` of ``out/metrics.jsonl`` without timing columns."""
    rows: dict[int, dict] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k not in TIMING})
    return rows


def finalised_steps(out: Path) -> list[int]:
    ckpt = out / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


def last_logged_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(x)["step"] for x in path.read_text().splitlines()[:-1]]  # last may be torn
    return max(steps, default=0)


class Cli:
    """Starts `arjax train` subprocesses with the session's shared compilation cache."""

    def __init__(self, cache_dir: Path) -> None:
        self.env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
            # same numerics as the in-process tests (tests/conftest.py)
            "JAX_DEFAULT_MATMUL_PRECISION": "highest",
        }

    def start(self, out: Path, **kw) -> subprocess.Popen:
        return subprocess.Popen(
            cli_args(out, **kw),
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(self, out: Path, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        proc = self.start(out, **kw)
        stdout, stderr = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    @staticmethod
    def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 90) -> int:
        """Poll until ``out`` has logged ``step`` (or more); returns the step seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = last_logged_step(out)
            if seen >= step:
                return seen
            if proc.poll() is not None:
                raise AssertionError(f"run exited early: {proc.communicate()}")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        raise AssertionError(f"step {step} not reached within {timeout}s")


@pytest.fixture(scope="session")
def cli(tmp_path_factory) -> Cli:
    return Cli(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="session")
def reference_runs(cli, tmp_path_factory) -> tuple[dict[int, dict], dict[int, dict]]:
    """Metrics of two uninterrupted runs of the same config, one after the other."""
    outs = [tmp_path_factory.mktemp("reference"), tmp_path_factory.mktemp("twin")]
    for out in outs:
        done = cli.run(out, timeout=300)
        assert done.returncode == 0, done.stderr
    return metric_rows(outs[0]), metric_rows(outs[1])


@pytest.fixture(scope="session")
def reference(reference_runs) -> dict[int, dict]:
    """The uninterrupted metrics every fault test must reproduce exactly."""
    rows = reference_runs[0]
    assert sorted(rows) == list(range(1, STEPS + 1))
    return rows
