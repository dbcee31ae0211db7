"""Faults: preemption (SIGTERM), hard kills (SIGKILL, also mid-save), corrupt checkpoints,
non-finite steps, determinism. Every interrupted run must end with exactly the metrics of an
uninterrupted one."""

from __future__ import annotations

import json
import random
import signal
import time

from conftest import STEPS, finalised_steps, last_logged_step, metric_rows


def _summary(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[0])


def test_sigterm_finishes_step_saves_and_resume_matches(cli, reference, tmp_path):
    proc = cli.start(tmp_path)
    cli.wait_for_step(proc, tmp_path, 5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr  # 143, as the signal's own exit
    summary = _summary(stdout)
    assert summary["preempted"] == "SIGTERM"
    stopped = summary["step"]
    notice = f"stopped at step {stopped}, checkpoint saved; run the same command to resume\n"
    assert notice in stderr, stderr
    print(f"SIGTERM stopped the run at step {stopped}")
    assert 5 <= stopped < STEPS
    # the step in flight was finished and checkpointed before exiting
    assert finalised_steps(tmp_path)[-1] == stopped
    assert max(metric_rows(tmp_path)) == stopped
    # a kill while appending a metrics row leaves a torn last line: resume must drop it
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 99999, "loss": 1.')

    done = cli.run(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "preempted" not in _summary(done.stdout)
    assert metric_rows(tmp_path) == reference


def test_repeated_sigkill_then_corrupt_newest_checkpoint_resume_matches(cli, reference, tmp_path):
    """SIGKILL at random moments (after start-up, so during steps and async saves), 3 times;
    then the newest checkpoint is corrupted; the final run skips it with a message and still
    reproduces the uninterrupted metrics."""
    rng = random.Random(0)
    kills = []
    for _ in range(3):
        before = max(finalised_steps(tmp_path), default=0)
        # rows past `before` left by the previous kill are stale until the new run rewrites them
        target = max(before, last_logged_step(tmp_path)) + 3
        proc = cli.start(tmp_path)
        cli.wait_for_step(proc, tmp_path, target)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        kills.append(max(finalised_steps(tmp_path), default=0))
        assert kills[-1] >= before  # a kill never loses a complete checkpoint
    assert kills[-1] < STEPS, "the run finished before the last kill; lengthen STEPS"
    print(f"newest complete checkpoint after each SIGKILL: {kills}")

    steps = finalised_steps(tmp_path)
    newest = tmp_path / "checkpoints" / str(steps[-1])
    for f in (p for p in newest.rglob("*") if p.is_file() and p.stat().st_size > 0):
        f.write_bytes(b"\x00garbage" * 4)

    done = cli.run(tmp_path)
    assert done.returncode == 0, done.stderr
    # one line naming the step, why, and the step used instead; no TensorStore spec dump
    (line,) = [x for x in done.stderr.splitlines() if f"checkpoint step {steps[-1]}" in x]
    assert line.startswith("arjax: warning: ") and "could not be restored (" in line
    assert f"); using step {steps[-2]} instead" in line
    assert "tensorstore_spec" not in done.stderr and "ERROR:absl" not in done.stderr
    assert metric_rows(tmp_path) == reference


def test_same_seed_and_config_give_identical_metrics_run_to_run(reference_runs):
    first, second = reference_runs
    assert len(first) == STEPS and first == second
