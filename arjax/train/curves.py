"""Training curves of a run folder as a PNG: ``arjax plot --out DIR``.

Reads ``DIR/metrics.jsonl`` (written by :func:`arjax.train.loop.train`) and draws training
loss (bits per byte) and validation bits per byte (per dim for image models) against the step.
Needs matplotlib (``pip install 'arjax[plot]'``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_metrics(out: str | os.PathLike) -> list[dict]:
    """The rows of ``out/metrics.jsonl``, skipping a line torn by a hard kill."""
    path = Path(out) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"--out: {out} has no metrics.jsonl; train there first")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def curves(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """``name -> (steps, values)`` for ``bits_per_byte`` (train) and ``val_bits_per_byte``."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for key in ("bits_per_byte", "val_bits_per_byte"):
        pts = sorted({r["step"]: r[key] for r in rows if key in r}.items())
        if pts:
            out[key] = ([s for s, _ in pts], [v for _, v in pts])
    return out


def plot_run(out: Path, png: Path | None = None) -> Path:
    """Write the curves of the run in ``out`` to ``png`` (default ``out/curves.png``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("`arjax plot` needs matplotlib: pip install 'arjax[plot]'") from None
    rows = read_metrics(out)
    lines = curves(rows)
    if not lines:
        raise ValueError(f"--out: {out}/metrics.jsonl has no loss rows yet")
    unit = "dim" if any("val_bits_per_dim" in r for r in rows) else "byte"
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    labels = {"bits_per_byte": "train", "val_bits_per_byte": "validation"}
    for key, (steps, values) in lines.items():
        ax.plot(steps, values, marker="o" if key.startswith("val") else None, label=labels[key])
    ax.set_xlabel("step")
    ax.set_ylabel(f"bits per {unit}")
    ax.set_title(out.name)
    ax.grid(alpha=0.3)
    ax.legend()
    png = out / "curves.png" if png is None else png
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
