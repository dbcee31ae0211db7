"""Shared helpers for the linear-attention experiments: timing and result files."""

from __future__ import annotations

import datetime
import json
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable

import jax

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` (blocked until ready), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def environment() -> dict:
    dev = jax.devices()[0]
    return {
        "device": f"{dev.platform}: {getattr(dev, 'device_kind', '')} ({platform.machine()})",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "command": "python " + " ".join(sys.argv),
    }


def write_results(
    name: str, title: str, rows: list[dict], columns: list[str], notes: str = ""
) -> None:
    """Print a markdown table and write ``results/<name>.json`` and ``results/<name>.md``."""
    env = environment()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({**env, "rows": rows}, indent=1) + "\n")
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [
        f"# {title}",
        "",
        ", ".join(f"{k}: {v}" for k, v in env.items()),
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows),
    ]
    if notes:
        lines += ["", notes]
    text = "\n".join(lines) + "\n"
    (RESULTS / f"{name}.md").write_text(text)
    print(text)
