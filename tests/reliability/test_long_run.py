"""In-process training faults: non-finite steps, host memory over long runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TINY

import arjax.train.loop as loop
from arjax.train.config import make_run_config
from arjax.train.loop import Trainer, train


class _Poisoned:
    """The real train iterator, but batches number ``bad`` (1-based) hold byte ids far out of
    the vocabulary: the embedding lookup yields NaN, so loss and gradients are non-finite."""

    def __init__(self, inner, bad: set[int]) -> None:
        self.inner, self.bad, self.calls = inner, bad, 0

    def __next__(self) -> dict:
        self.calls += 1
        batch = next(self.inner)
        if self.calls in self.bad:
            batch = {**batch, "inputs": np.full_like(batch["inputs"], 10**6)}
        return batch

    def get_state(self) -> dict:
        return self.inner.get_state()

    def set_state(self, state: dict) -> None:
        self.inner.set_state(state)


def test_non_finite_steps_are_skipped_counted_and_a_streak_stops_training(monkeypatch, tmp_path):
    real = loop.make_data

    def poisoned(cfg, index, count):
        it, evals = real(cfg, index, count)
        return _Poisoned(it, {3, 8, 9, 10}), evals

    monkeypatch.setattr(loop, "make_data", poisoned)
    extra = ["train.steps=20", "train.max_bad_steps=3", "train.save_every=1"]
    cfg = make_run_config("transformer", "tiny", [*TINY, *extra])
    with pytest.raises(FloatingPointError, match=r"3 consecutive steps.*max_bad_steps=3"):
        train(cfg, tmp_path)
    rows = {
        r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
    }
    assert max(rows) == 9  # step 10 raised before logging
    assert [rows[s]["skipped"] for s in range(1, 10)] == [0, 0, 1, 1, 1, 1, 1, 2, 3]
    assert [rows[s]["bad_streak"] for s in range(1, 10)] == [0, 0, 1, 0, 0, 0, 0, 1, 2]
    assert np.isnan(rows[3]["loss"]) and np.isfinite(rows[4]["loss"])

    # The checkpoints written during the streak hold the last good params, untouched.
    trainer = Trainer(cfg, tmp_path)
    ckpt = trainer.ckpt
    assert ckpt.all_steps() == [7, 8, 9]
    good, _, _ = ckpt.restore(trainer.abstract_state, step=7)
    for step in (8, 9):
        bad, _, _ = ckpt.restore(trainer.abstract_state, step=step)
        assert int(bad.skipped) == step - 6 and int(bad.bad_streak) == step - 7
        for a, b in zip(jax.tree.leaves((good.params, good.opt_state)),
                        jax.tree.leaves((bad.params, bad.opt_state))):  # fmt: skip
            np.testing.assert_array_equal(a, b)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(good.params))


# Run in a child process of its own: a pytest-xdist worker's resident set also holds what the
# tests before this one left behind (compiled executables, caches released lazily), and under
# load that background moves by megabytes. The child trains and nothing else, sampling its own
# resident set at each metrics row, and prints ``[[step, anon_bytes, file_bytes], ...]`` as its
# last line.
_CHILD = """
import ctypes, gc, json, os, sys
import arjax.train.loop as loop
from arjax.train.config import make_run_config

trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc
def rss():
    # resident anonymous and file-backed bytes (the kB lines of /proc/self/status)
    gc.collect()  # arrays held only by reference cycles are garbage, not a leak
    if trim is not None:  # hand the allocator's free pages back first: only live memory counts
        trim(0)
    with open("/proc/self/status") as f:
        kb = dict(line.split(":", 1) for line in f if line.startswith(("RssAnon", "RssFile")))
    return [int(kb[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile")]

samples, write = [], loop.MetricsWriter.write
def write_and_sample(self, row):
    write(self, row)
    samples.append((row["step"], *rss()))

loop.MetricsWriter.write = write_and_sample
loop.train(make_run_config("transformer", "tiny", json.loads(sys.argv[1])), sys.argv[2])
print(json.dumps(samples))
"""

# Steps 1100-2000 have no checkpoint or eval (each Orbax save keeps ~150 KiB resident for this
# state, inside TensorStore; see experiments/results/reliability.md); three 300-step stretches.
_STRETCHES = [(1100, 1400), (1400, 1700), (1700, 2000)]
_EDGE = 60  # a stretch's level at each end: the median of the samples within 60 steps of it


def _stretch_growth(rss: dict[int, int], lo: int, hi: int) -> float:
    """Resident-set growth over steps ``lo..hi``, robust to one-sample spikes: the median of the
    samples in the stretch's last ``_EDGE`` steps minus the median of those in its first."""
    first = [v for s, v in rss.items() if lo <= s <= lo + _EDGE]
    last = [v for s, v in rss.items() if hi - _EDGE <= s <= hi]
    return float(np.median(last) - np.median(first))


def test_host_memory_flat_over_thousands_of_steps(tmp_path: Path):
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc (Linux) to read the resident set size")
    extra = ["train.steps=2000", "train.log_every=10", "train.save_every=1000",
             "train.eval_every=1000", "train.keep_checkpoints=1",
             # a synchronous save ends at step 1000: under load an async one can still be
             # writing (and allocating) inside the measured window
             "train.async_checkpoint=false"]  # fmt: skip
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "MALLOC_ARENA_MAX": "2",  # as tests/conftest.py caps them in-process
        "JAX_DEFAULT_MATMUL_PRECISION": "highest",
    }
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps([*TINY, *extra]), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    samples = json.loads(done.stdout.strip().splitlines()[-1])
    # A leak is anonymous memory (heap, arrays). File-backed pages (jaxlib's ~100 MiB of mapped
    # code and data) are not: the kernel drops them under memory pressure and they fault back
    # in as code runs. CI failed this check at 0.66-0.77 MiB of resident-set growth in each
    # stretch with the whole suite beside it, where alone or beside 3 busy cores it grew 0.000;
    # the file-backed part is reported, not checked.
    rss = {step: anon for step, anon, _ in samples}
    rss_file = {step: file for step, _, file in samples}
    # Each sample follows gc and malloc_trim, so the resident set is live memory, not free pages
    # the allocator kept. A leak grows in every stretch of steps; a one-off allocation (a cache
    # filled on first use) lands in one stretch, and a transient one (a buffer alive at one
    # sample) in one sample, which the medians drop. So the check is on the smallest growth of
    # three stretches. Planted leaks (os.urandom bytes kept every 100 steps; 3 runs side by side
    # on 2 cores), anonymous growth per stretch: none -0.08-0.00 MiB, passes; 100 KiB
    # 0.19-0.21, passes; 200 KiB 0.39-0.40, fails.
    growth = [_stretch_growth(rss, lo, hi) for lo, hi in _STRETCHES]
    file_growth = [_stretch_growth(rss_file, lo, hi) for lo, hi in _STRETCHES]
    mib = lambda gs: [round(g / 2**20, 3) for g in gs]  # noqa: E731
    print("growth per stretch (MiB): anonymous", mib(growth), "file-backed", mib(file_growth))
    assert min(growth) < 0.3 * 2**20, (
        "resident anonymous memory grew in every stretch of steps: "
        + ", ".join(f"{g / 2**20:.2f} MiB in {lo}-{hi}" for g, (lo, hi) in zip(growth, _STRETCHES))
        + f" (a leak; file-backed pages grew {mib(file_growth)} MiB)"
    )
