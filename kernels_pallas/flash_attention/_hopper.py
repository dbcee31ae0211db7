"""What the Hopper (Pallas Mosaic GPU) forward ``mosaic_gpu_fwd.py`` and backward
``mosaic_gpu_bwd.py`` share: the warpgroup geometry (FlashAttention-3 sec. 3.1: two 64-row
wgmma consumer warpgroups), the calls they support, and the pieces that differ between the GPU
and the CPU interpreter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

ROWS = 64  # rows per consumer warpgroup: the M of one wgmma
CONSUMERS = 2
TILE = ROWS * CONSUMERS  # rows per CTA owned by the two consumers
# registers per thread at launch: 64K over the consumers and the producer (128 threads each),
# in steps of 8 (ptxas: "Used 168 registers"). setmaxnreg only moves them between warpgroups:
# budgets summing to more make the consumers' increase wait forever (a hang seen on an H200).
LAUNCH_REGS = 65536 // ((CONSUMERS + 1) * 128) // 8 * 8
HEAD_DIMS = (64, 128)
DTYPES = (jnp.bfloat16, jnp.float16)
SMEM_BYTES = 227 * 1024  # Hopper's shared memory per CTA


def supports(dtype, head_dim: int, has_segments: bool) -> bool:
    """Whether the Hopper kernels handle such a call (else it stays with the Triton lowering)."""
    return jnp.dtype(dtype) in map(jnp.dtype, DTYPES) and head_dim in HEAD_DIMS and not has_segments


def check_call(dtype, head_dim: int, has_segments: bool, who: str) -> None:
    """Raise ``ValueError`` (prefixed ``who``) naming what the Hopper kernels do not support."""
    if jnp.dtype(dtype) not in map(jnp.dtype, DTYPES):
        raise ValueError(f"{who}: dtype must be bfloat16 or float16, got {dtype}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"{who}: head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    if has_segments:
        raise ValueError(f"{who}: segment ids are not supported (use 'triton')")


def interpret_params():
    """Parameters of Pallas' GPU interpreter (no public name in jax 0.10/0.11; checked on both)."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def iota(shape, dim: int, interpret: bool) -> jax.Array:
    """int32 iota along ``dim``, in the wgmma accumulator layout on the GPU."""
    if interpret:
        return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)
