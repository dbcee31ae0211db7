"""Shared bits of the HAT experiments: run metadata and result files.

Every experiment writes ``experiments/results/<name>.json`` (numbers + metadata) and
``experiments/results/<name>.md`` (a short table with device, date, versions, command).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import jax

RESULTS = Path(__file__).resolve().parent / "results"


def metadata() -> dict[str, Any]:
    """Device, date, library versions and the command line of this run."""
    dev = jax.devices()[0]
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"{dev.platform}: {dev.device_kind} x{jax.device_count()}",
        "host": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "versions": {p: version(p) for p in ("jax", "flax", "optax", "numpy")},
        "python": platform.python_version(),
        "command": "python " + " ".join(sys.argv),
    }


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Rows of dicts -> a GitHub markdown table over ``columns`` (floats to 4 digits)."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(
    name: str, title: str, payload: dict[str, Any], table: str, notes: str = ""
) -> tuple[Path, Path]:
    """Write ``<name>.json`` (payload + metadata) and ``<name>.md``; print the table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = metadata()
    json_path = RESULTS / f"{name}.json"
    json_path.write_text(json.dumps({"metadata": meta, **payload}, indent=2) + "\n")
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    md = (
        f"# {title}\n\n{table}\n\n"
        f"- device: {meta['device']} ({meta['host']}, {meta['cpu_count']} CPU cores, load "
        f"average {meta['load_average_1min']} at the end)\n- date: {meta['date_utc']}\n"
        f"- versions: python {meta['python']}, {versions}\n- command: `{meta['command']}`\n"
    )
    if notes:
        md += f"\n{notes.strip()}\n"
    md_path = RESULTS / f"{name}.md"
    md_path.write_text(md)
    print(table)
    print(f"wrote {json_path} and {md_path}")
    return json_path, md_path
