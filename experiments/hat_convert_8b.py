"""Host memory of the streaming HAT conversion at the released 8B shape (issue 20, item 4).

Writes a synthetic checkpoint in the released layout (``PRESETS["8b"]``: random finite bf16
values, sharded files of at most 4 GiB, config.json as published), then, each in a fresh
process so that peaks do not mix:

1. ``load``: :func:`load_published` onto the first device in bf16; peak host RSS;
2. ``save``: the same load, then :func:`save_published` from the device params to a second
   directory; the peak RSS during the save above the RSS before it (Linux ``clear_refs``);
3. the two checkpoints compared tensor by tensor, bit for bit.

Both checkpoints are deleted afterwards. Writes ``experiments/results/hat_convert.{md,json}``::

    nice python experiments/hat_convert_8b.py [--dir /work/tmp_hat8b] [--preset 8b]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GIB = 1 << 30
RESULTS = Path(__file__).parent / "results"


def rss_bytes(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process from /proc (bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def published_config(preset: str, backbone_layers: int | None):
    from arjax.models import hat_checkpoint as hc
    from arjax.models.hat import PRESETS

    config = dataclasses.replace(PRESETS[preset], max_seq_len=4096, max_words=1024)
    if backbone_layers is not None:
        backbone = dataclasses.replace(config.backbone, num_layers=backbone_layers)
        config = dataclasses.replace(config, backbone=backbone)
    published = hc.config_to_published(config)
    del published[hc.ARJAX_KEY]
    return config, published


def make_checkpoint(directory: Path, preset: str, backbone_layers: int | None) -> int:
    """Random finite bf16 tensors under the released names; returns the bytes written."""
    import ml_dtypes

    from arjax.models import hat_checkpoint as hc

    config, published = published_config(preset, backbone_layers)
    shapes = hc.published_shapes(config)
    names = [r.name for r in hc.rules(config)]
    entries = [(n, np.dtype(ml_dtypes.bfloat16), shapes[n]) for n in names]
    rng = np.random.default_rng(0)

    def tensors():
        for name in names:
            bits = rng.integers(0, 1 << 16, size=shapes[name], dtype=np.uint16)
            yield name, (bits & np.uint16(0xBFFF)).view(ml_dtypes.bfloat16)  # |x| < 2

    hc.write_tensor_stream(directory, entries, tensors(), max_shard_bytes=4 * GIB)
    (directory / hc.CONFIG_FILE).write_text(json.dumps(published, indent=2) + "\n")
    return sum(int(np.prod(s)) * 2 for s in shapes.values())


def child(mode: str, src: Path, dst: Path) -> dict:
    """One measurement in this (fresh) process."""
    import jax

    from arjax.models import hat_checkpoint as hc

    jax.numpy.zeros(1).block_until_ready()  # runtime up before the baseline
    base = rss_bytes("VmRSS")
    t0 = time.perf_counter()
    params, config, published = hc.load_published(src, param_dtype="bfloat16", dtype="bfloat16")
    jax.block_until_ready(params)
    out = {
        "baseline_rss": base,
        "load_s": time.perf_counter() - t0,
        "load_peak_rss": rss_bytes("VmHWM"),
        "rss_after_load": rss_bytes("VmRSS"),
        "param_bytes": sum(x.nbytes for x in jax.tree.leaves(params)),
    }
    if mode == "save":
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = rss_bytes("VmRSS")
        t0 = time.perf_counter()
        hc.save_published(dst, params, config, template=published, max_shard_bytes=4 * GIB)
        out |= {
            "save_s": time.perf_counter() - t0,
            "rss_before_save": before,
            "save_peak_rss": rss_bytes("VmHWM"),
        }
    out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def identical(a: Path, b: Path) -> tuple[bool, int]:
    from arjax.models import hat_checkpoint as hc

    ra, rb = hc.SafetensorsReader(a), hc.SafetensorsReader(b)
    if ra.names() != rb.names():
        return False, 0
    for name in ra.names():
        x, y = ra[name], rb[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            return False, len(ra.names())
        if not np.array_equal(x.view(np.uint16), y.view(np.uint16)):
            return False, len(ra.names())
    return True, len(ra.names())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/work/tmp_hat8b"))
    parser.add_argument("--preset", default="8b")
    parser.add_argument(
        "--backbone-layers", type=int, help="fewer backbone layers (a host with less memory)"
    )
    parser.add_argument("--child", choices=["load", "save"])
    args = parser.parse_args()
    src, dst = args.dir / "src", args.dir / "dst"
    if args.child:
        print(json.dumps(child(args.child, src, dst)))
        return
    shutil.rmtree(args.dir, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        size = make_checkpoint(src, args.preset, args.backbone_layers)
        made_s = time.perf_counter() - t0
        runs = {}
        for mode in ("load", "save"):
            cmd = [sys.executable, __file__, "--dir", str(args.dir), "--preset", args.preset,
                   "--child", mode]  # fmt: skip
            res = subprocess.run(cmd, check=True, capture_output=True, text=True)
            runs[mode] = json.loads(res.stdout.strip().splitlines()[-1])
        same, count = identical(src, dst)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    load, save = runs["load"], runs["save"]
    result = {
        "preset": args.preset, "backbone_layers": args.backbone_layers,
        "checkpoint_bytes": size, "tensors": count,
        "make_s": made_s, "round_trip_bit_exact": same, "load": load, "save": save,
        "load_peak_over_model_gib": (load["load_peak_rss"] - size) / GIB,
        "save_extra_gib": (save["save_peak_rss"] - save["rss_before_save"]) / GIB,
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hat_convert.json").write_text(json.dumps(result, indent=2) + "\n")
    gib = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    md = [
        "# HAT checkpoint conversion: host memory at the 8B shape",
        "",
        f"Command: `nice python experiments/hat_convert_8b.py {' '.join(sys.argv[1:])}` (CPU as",
        "the device; synthetic random bf16 checkpoint in the released layout, deleted after).",
        f"Backbone layers: {args.backbone_layers or 'all'} (fewer when the host lacks the memory",
        "for the whole model; every other shape is the preset's).",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| checkpoint (bf16) | {gib(size)} in {count} tensors |",
        f"| params on the device (bf16) | {gib(load['param_bytes'])} |",
        f"| process RSS before loading (JAX runtime) | {gib(load['baseline_rss'])} |",
        f"| peak RSS, load onto the device | {gib(load['load_peak_rss'])} "
        f"(model + {result['load_peak_over_model_gib']:.2f} GiB) |",
        f"| load time | {load['load_s']:.0f} s |",
        f"| extra peak RSS while streaming the params to a file | "
        f"{result['save_extra_gib']:.2f} GiB |",
        f"| save time | {save['save_s']:.0f} s |",
        f"| round trip bit-exact | {same} |",
        "",
        "On a CPU device the params live in host memory, so the load peak includes them; the "
        "target is model + 1 GiB. Streaming out adds one tensor (one layer of a stack) at a "
        "time.",
    ]
    (RESULTS / "hat_convert.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
