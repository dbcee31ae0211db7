"""Registers, spills and shared memory of arjax's Pallas Triton kernels on sm_90, compiled
offline: no GPU needed.

Each ``pallas_call`` of a jitted forward + backward (``--op``: the gated delta rule, the
linear-attention scan with no / scalar / GLA decay, causal flash attention) is lowered for
CUDA (for an abstract H200, as the export tests do) and its Triton IR captured;
``triton.compile`` from the ``triton`` wheel (3.6.0 is the device image's) turns it into PTX for
``sm_90a``, and that wheel's ``ptxas -v`` reports registers and spill stores per thread. XLA
compiles the same IR with the Triton it bundles, so the figures are those of a close relative
of what runs on the device, not a timing: use them to compare variants of a kernel (a spill
that appears or goes) before a device run decides. Needs Python 3.12, jax 0.11.2 and ``pip
install triton==3.6.0``; reads jax's private Pallas Triton lowering (``jax._src.pallas.triton``).

    python experiments/triton_sm90_resources.py                          # every op, bf16
    python experiments/triton_sm90_resources.py --op gated_delta --warps gated_delta_bwd=4

Writes ``experiments/results/<name>.{json,md}`` (default ``triton_sm90``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from hat_common import markdown_table, write_results
from jax._src.pallas.triton import pallas_call_registration as registration

from kernels_pallas.flash_attention import flash_attention
from kernels_pallas.gated_delta import TritonTuning, gated_delta_rule
from kernels_pallas.linear_attention_scan import chunked_linear_attention

SM = 90


def triton_modules(fn: Callable, *args: Any) -> list[tuple[str, int, int, str]]:
    """``(name, num_warps, num_stages, Triton IR text)`` of each Pallas Triton kernel that
    ``jax.jit(fn)(*args)`` lowers to for CUDA (``args``: ShapeDtypeStructs)."""
    modules, configs = [], []
    lower = registration.lowering.lower_jaxpr_to_triton_module
    custom_call = registration.mlir.custom_call

    def lower_spy(*a, **kw):
        result = lower(*a, **kw)
        modules.append(result.module.operation.get_asm())
        return result

    def call_spy(*a, backend_config=None, **kw):
        if kw.get("call_target_name") == "__gpu$xla.gpu.triton":
            configs.append(backend_config)
        return custom_call(*a, backend_config=backend_config, **kw)

    h200 = jax.sharding.AbstractMesh(
        (1,), ("x",), (jax.sharding.AxisType.Auto,),
        abstract_device=jax.sharding.AbstractDevice("NVIDIA H200", None, "gpu"),
    )  # fmt: skip
    registration.lowering.lower_jaxpr_to_triton_module = lower_spy
    registration.mlir.custom_call = call_spy
    try:
        with jax.sharding.use_abstract_mesh(h200):
            check = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
            jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[check])(*args)
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
        registration.mlir.custom_call = custom_call
    return [(c["name"].value, c["num_warps"].value, c["num_stages"].value, text)
            for c, text in zip(configs, modules, strict=True)]  # fmt: skip


def sm90_resources(name: str, warps: int, stages: int, ir: str) -> dict:
    """Compile one kernel's Triton IR for sm_90a: shared memory (Triton's), registers and spill
    stores per thread (ptxas)."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.ttir")
        with open(path, "w") as f:
            f.write(ir)
        kernel = triton.compile(path, target=GPUTarget("cuda", SM, 128),
                                options=dict(num_warps=warps, num_stages=stages))  # fmt: skip
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
        report = subprocess.run(
            [ptxas, "-v", "--gpu-name", f"sm_{SM}a", ptx, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    return dict(kernel=name, warps=warps, shared_kib=kernel.metadata.shared / 1024,
                registers=registers, spill_store_bytes=spills)  # fmt: skip


OPS = ("gated_delta", "scan_none", "scan_scalar", "scan_gla", "attention")


def _grads(call: Callable, specs: tuple) -> tuple[Callable, tuple]:
    """``call``'s value and gradients in all its float arguments (its outputs summed)."""

    def fn(*args):
        def loss(*a):
            return sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(call(*a)))

        return jax.value_and_grad(loss, argnums=tuple(range(len(args))))(*args)

    return fn, specs


def op_grads(
    op: str, shape: tuple[int, int, int, int], tuning: TritonTuning | None = None
) -> tuple[Callable, tuple]:
    """Forward + backward of ``op``'s GPU kernels on bf16 ``q, k, v [batch, len, heads, d]``
    (``tuning``: the gated delta rule's launch parameters; float32 gates, beta and initial
    state)."""
    b, length, h, d = shape
    qkv = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    gate = jax.ShapeDtypeStruct((b, length, h), jnp.float32)
    s0 = jax.ShapeDtypeStruct((b, h, d, d), jnp.float32)
    gpu = dict(backend="gpu", interpret=False)
    if op == "gated_delta":

        def call(q, k, v, beta, g, s0):
            return gated_delta_rule(q, k, v, beta, log_decay=g, initial_state=s0, tuning=tuning,
                                    **gpu)  # fmt: skip

        return _grads(call, (qkv, qkv, qkv, gate, gate, s0))
    if op.startswith("scan_"):
        decay = {"scan_none": None, "scan_scalar": gate,
                 "scan_gla": jax.ShapeDtypeStruct(shape, jnp.float32)}[op]  # fmt: skip

        def call(q, k, v, s0, *g):
            return chunked_linear_attention(q, k, v, log_decay=g[0] if g else None,
                                            initial_state=s0, **gpu)  # fmt: skip

        return _grads(call, (qkv, qkv, qkv, s0, *(() if decay is None else (decay,))))
    if op == "attention":

        def call(q, k, v):
            return flash_attention(q, k, v, causal=True, lowering="triton", **gpu)

        return _grads(call, (qkv, qkv, qkv))
    raise ValueError(f"unknown op {op!r}; one of {OPS}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--op", nargs="+", choices=OPS, default=list(OPS))
    ap.add_argument("--shape", type=int, nargs=4, default=(1, 256, 2, 128),
                    metavar=("B", "L", "H", "D"))  # fmt: skip
    ap.add_argument("--warps", nargs="*", default=[], metavar="KERNEL=N",
                    help="the gated delta kernels' warps (TritonTuning.kernel_warps)")  # fmt: skip
    ap.add_argument("--grad-tile", type=int, default=TritonTuning().grad_tile,
                    help="the gated delta gradient kernel's TritonTuning.grad_tile")  # fmt: skip
    ap.add_argument("--name", default="triton_sm90")
    args = ap.parse_args()
    warps = tuple((kernel, int(n)) for kernel, n in (item.split("=") for item in args.warps))
    tuning = TritonTuning(kernel_warps=warps, grad_tile=args.grad_tile)
    rows = []
    for op in args.op:
        fn, specs = op_grads(op, tuple(args.shape), tuning)
        rows += [dict(op=op, **sm90_resources(*m)) for m in triton_modules(fn, *specs)]
    columns = ["op", "kernel", "warps", "shared_kib", "registers", "spill_store_bytes"]
    import triton

    title = f"sm_{SM}a resources of the Pallas Triton kernels (offline compile, forward + backward)"
    info = dict(shape=list(args.shape), warps=args.warps, triton=triton.__version__)
    write_results(args.name, title, {"rows": rows, **info}, markdown_table(rows, columns))


if __name__ == "__main__":
    main()
