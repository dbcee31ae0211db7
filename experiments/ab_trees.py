"""A/B of source trees: one benchmark command run in each tree, one after another on the same
device in one call, and its timings side by side as ratios to the first tree.

A candidate kept on a branch is compared with main by exporting the branch into a folder
(``git archive BRANCH | tar -x -C scratch/ab_BRANCH``, carried to the device machine), then

    python experiments/ab_trees.py --tree main=. --tree stack=scratch/ab_gd_stack \\
        --name ab_gated_delta -- python3 experiments/bench_gated_delta.py --no-check \\
        --impls pallas,mosaic --reps 10

runs the command in each tree (its own process, ``PYTHONPATH`` that tree first), appending
``--out <results dir>/<name>_<tree>`` (the benchmarks' JSON + markdown), then reads each
``rows`` list (``bench_scan.py``, ``bench_gated_delta.py``: one row per shape, and variant,
with ``"<impl> fwd"`` / ``"<impl> fwd+bwd"`` milliseconds) and writes
``<results dir>/<name>.{json,md}``: every timing cell per tree and its speed-up over the first
tree's (>1: faster). A tree whose command fails or runs out of time is reported with its exit
status and the tail of its output, beside whatever rows it wrote; the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TIMED = (" fwd", " fwd+bwd")  # the row keys that are milliseconds


def row_key(row: dict) -> str:
    """A row's shape (and variant) as one label."""
    shape = "x".join(map(str, row.get("shape", ())))
    return f"{row['variant']} {shape}" if "variant" in row else shape


def cells(rows: list[dict]) -> dict[str, float]:
    """``"<row> <impl> <pass>" -> ms`` of a benchmark's rows."""
    return {
        f"{row_key(row)} {k}": float(v)
        for row in rows
        for k, v in row.items()
        if k.endswith(TIMED) and isinstance(v, (int, float))
    }


def run_tree(name: str, path: Path, command: list[str], out: Path, timeout: float) -> dict:
    """Run ``command --out out`` in tree ``path``; its rows, or its failure."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(path.resolve()), *filter(None, [os.environ.get("PYTHONPATH")])]))  # fmt: skip
    start = time.perf_counter()
    try:
        proc = subprocess.run([*command, "--out", str(out)], cwd=path, env=env, timeout=timeout,
                              capture_output=True, text=True)  # fmt: skip
        code, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
    except subprocess.TimeoutExpired as e:
        partial = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
        code, tail = "timeout", (partial or "")[-2000:]
    seconds = round(time.perf_counter() - start, 1)
    result = {"tree": name, "path": str(path), "seconds": seconds, "exit": code}
    json_path = Path(f"{out}.json")
    if json_path.exists():  # also the rows a failed or cut run wrote before it stopped
        result["cells"] = cells(json.loads(json_path.read_text()).get("rows", []))
    if code != 0:
        result["output_tail"] = tail
    print(f"{name}: exit {code} in {seconds} s", flush=True)
    return result


def table(results: list[dict]) -> str:
    """Markdown: one line per cell, ms per tree and each tree's speed-up over the first."""
    ok = [r for r in results if "cells" in r]
    if not ok:
        return "(no tree produced timings)"
    base, names = ok[0], [r["tree"] for r in ok]
    head = ["cell", *(f"{n} ms" for n in names), *(f"{n} vs {names[0]}" for n in names[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in base["cells"]:
        ms = [r["cells"].get(cell) for r in ok]
        ratios = [f"{ms[0] / m:.3f}x" if m else "-" for m in ms[1:]]
        lines.append("| " + " | ".join([cell, *(f"{m:.4f}" if m else "-" for m in ms), *ratios])
                     + " |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", action="append", required=True, metavar="NAME=PATH",
                    help="a source tree (repeat; the first is the baseline)")  # fmt: skip
    ap.add_argument("--name", required=True, help="results file stem")
    ap.add_argument("--results", type=Path, default=Path("experiments/results"),
                    help="where the trees' and the comparison's files go")  # fmt: skip
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per tree")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the benchmark command")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        sys.exit("ab_trees: no command after --")
    results_dir = args.results.resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in args.tree:
        name, _, path = spec.partition("=")
        if not path or not Path(path).is_dir():
            sys.exit(f"ab_trees: --tree {spec!r}: expected NAME=PATH of a folder")
        out = results_dir / f"{args.name}_{name}"
        results.append(run_tree(name, Path(path), command, out, args.timeout))
    text = table(results)
    failed = [f"- {r['tree']}: exit {r['exit']}\n\n```\n{r['output_tail']}\n```"
              for r in results if r["exit"] != 0]  # fmt: skip
    trees = ", ".join(f"{r['tree']} ({r['path']}, {r['seconds']} s)" for r in results)
    md = f"# A/B: {args.name}\n\ncommand: `{' '.join(command)}`, trees: {trees}\n\n{text}\n"
    if failed:
        md += "\nFailed:\n\n" + "\n".join(failed) + "\n"
    (results_dir / f"{args.name}.json").write_text(
        json.dumps({"command": command, "trees": results}, indent=2) + "\n"
    )
    (results_dir / f"{args.name}.md").write_text(md)
    print(text)


if __name__ == "__main__":
    main()
