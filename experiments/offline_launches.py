"""Kernel launches per decoding-loop iteration, counted without a GPU.

XLA compiles for a GPU it does not have ("deviceless" compilation: a compile-only device of
the CUDA PJRT plugin, described by a target config). This script compiles the generation
engine's whole loop (``arjax.generate.engine._run``, the call ``bench_hat_decode.py`` times)
for an H100 target and counts, in the optimized HLO, the instructions that launch a kernel
(fusions, custom calls, copies) in the loop body and in each branch and inner loop below it:
for HAT the byte path (every iteration) and the word path (a conditional), for the byte
transformer its one step. At batch 1 both loops are launch-bound (``profile_decode.py``), so
launches are a proxy for their time that needs no device; the trace on a GPU counted 379
launches per transformer step where this counts 374.

Needs the CUDA plugin (``pip install "jax[cuda12]"``, no GPU or driver needed) and runs on
the CPU: ``JAX_PLATFORMS=cpu python experiments/offline_launches.py``. Autotuning needs a
device, so GEMM configurations (and so split-K launches) may differ from a GPU's choice.
Trace-time choices (``impl="auto"`` of attention and decode attention) are made for the
compile-only H100: the script points ``jax.default_backend``/``jax.devices`` at it.
"""

from __future__ import annotations

import argparse
import collections
import re
import time

import jax
from bench_hat_decode import configs
from decode_common import engine_call, random_prompts, without_eos
from hat_common import markdown_table, write_results
from jax.experimental import topologies
from profile_decode import random_params

from arjax.generate import decoder_for
from arjax.generate.engine import _run
from arjax.models import build_model

# XLA's GpuTargetConfig for an H100 SXM (device properties as CUDA reports them)
H100 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 9 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all",
        "opt-barrier", "partition-id", "replica-id"}  # fmt: skip  # no kernel


def compile_only_h100() -> jax.Device:
    topology = topologies.get_topology_desc("h100", "cuda", target_config=H100, topology="1x1x1")
    return topology.devices[0]


def compiled_loop(name: str, batch: int, new_bytes: int, device) -> str:
    """Optimized HLO text of the engine's loop for ``name`` ("hat" or "transformer")."""
    hat_config, transformer_config = configs(False)
    config = hat_config if name == "hat" else transformer_config
    model = build_model(name, config)
    shapes = jax.eval_shape(lambda: random_params(name, model, config))  # no values
    (decoder, *arrays), kw = engine_call(
        without_eos(decoder_for(model)), shapes, random_prompts(batch, 64), new_bytes,
        temperature=0.8,
    )  # fmt: skip
    sharding = jax.sharding.SingleDeviceSharding(device)
    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
    args = (decoder, *jax.tree.map(spec, arrays))  # every array as a spec on the H100
    mesh = jax.sharding.AbstractMesh(  # the Pallas Triton lowering asks it for the GPU
        (1,), ("x",), (jax.sharding.AxisType.Auto,),
        abstract_device=jax.sharding.AbstractDevice(device.device_kind, None, "gpu"),
    )  # fmt: skip
    with jax.sharding.use_abstract_mesh(mesh):
        return _run.lower(*args, **kw).compile().as_text()


def computations(hlo: str) -> tuple[str, dict[str, list[str]]]:
    """(entry name, {computation: its instruction lines})."""
    comps, current, entry = {}, None, None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY )?%(\S+) .*\{$", line)
        if head:
            current = head.group(2)
            comps[current], entry = [], entry or (current if head.group(1) else None)
        elif line.startswith("}"):
            current = None
        elif current and line.strip():
            comps[current].append(line.strip())
    return entry, comps


def launches(comps: dict[str, list[str]], comp: str, path: str, out: list[dict]) -> None:
    """Rows ``{path, launches, kinds}`` for ``comp`` and every loop body / branch below it
    (each counted once per execution; a ``while`` or ``conditional`` launches nothing itself)."""
    kinds = collections.Counter()
    for line in comps[comp]:
        m = re.match(r"(?:ROOT )?%\S+ = .*? ([a-z\-]+)\(", line)
        op = m.group(1) if m else None
        if op == "while":
            body = re.search(r"body=%?([\w.\-]+)", line).group(1)
            launches(comps, body, f"{path} > while", out)
        elif op == "conditional":
            listed = re.search(r"branch_computations=\{([^}]*)\}", line)
            branches = [b.strip().lstrip("%") for b in listed.group(1).split(",")] if listed \
                else [re.search(f"{k}_computation=%?([\\w.\\-]+)", line).group(1)
                      for k in ("false", "true")]  # fmt: skip
            for i, branch in enumerate(branches):
                launches(comps, branch, f"{path} > branch {i}", out)
        elif op is not None and op not in FREE:
            kinds[op] += 1
    out.append(dict(path=path, launches=sum(kinds.values()), kinds=dict(kinds)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-bytes", type=int, default=128)
    ap.add_argument("--name", default="offline_launches")
    a = ap.parse_args()
    device = compile_only_h100()
    host = jax.default_backend, jax.devices
    jax.default_backend = lambda: "gpu"  # trace-time impl choices: as on the H100
    jax.devices = lambda *_, **__: [device]
    rows = []
    for name in ("transformer", "hat"):
        t0 = time.perf_counter()
        entry, comps = computations(compiled_loop(name, a.batch, a.new_bytes, device))
        found: list[dict] = []
        launches(comps, entry, "entry", found)
        for r in found:
            if r["path"] != "entry":  # the prefill and set-up outside the loop: once per call
                rows.append(dict(model=name, batch=a.batch, **r))
                print(rows[-1], flush=True)
        print(f"{name}: compiled in {time.perf_counter() - t0:.0f} s")
    jax.default_backend, jax.devices = host  # the results' metadata: this (CPU) machine
    notes = (
        f"Deviceless XLA compilation for {device.device_kind} (jax {jax.__version__}, CUDA "
        "plugin, no GPU); kernel-launching instructions (fusions, custom calls, copies) per "
        "execution of each loop body or branch of the engine's loop at batch "
        f"{a.batch}. Paths: 'entry > while' is one loop iteration; its branches and inner "
        "loops run only when taken (HAT: the word path, the split)."
    )
    write_results(a.name, "Kernel launches per decoding-loop iteration (compiled without a GPU)",
                  {"args": vars(a), "rows": rows},
                  markdown_table(rows, ["model", "batch", "path", "launches"]),
                  notes)  # fmt: skip


if __name__ == "__main__":
    main()
