"""What the Hopper (Pallas Mosaic GPU) kernels share: flash attention's forward and backward
(``flash_attention/mosaic_gpu_*.py``) and the linear-attention scan's fused forward
(``linear_attention_scan/mosaic_gpu_fwd.py``): the warpgroup geometry (FlashAttention-3 sec.
3.1: 64-row wgmma consumer warpgroups), the calls they support, the ``wgmma`` issue helper and
producer loop, and the pieces that differ between the GPU and the CPU interpreter."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
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
# wgmma operands in shared memory: 128-byte swizzled (8 x 64-element) tiles (2-byte types)
WGMMA_TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
SMEM_ALIGN = 1024  # Pallas Mosaic GPU rounds each scratch buffer up to this (SMEM_ALIGNMENT)
BARRIER_BYTES = 8  # one mbarrier, allocated after the buffers


def supports(dtype, head_dim: int) -> bool:
    """Whether the default lowering rule may pick the Hopper kernels for such a call (else it
    stays with Triton), segment ids included."""
    return jnp.dtype(dtype) in map(jnp.dtype, DTYPES) and head_dim in HEAD_DIMS


def smem_footprint(scratch_types) -> int:
    """Shared memory a Pallas Mosaic GPU kernel allocates for ``scratch_types`` (a pytree of
    ``plgpu.SMEM`` buffers and ``plgpu.Barrier`` arrays): each buffer rounded up to
    ``SMEM_ALIGN`` bytes, then ``BARRIER_BYTES`` per mbarrier (checked on an H200, jax 0.11.2:
    for the fused D=128 backward with 3 ring slots and segment ids Mosaic GPU reported
    233,688 B, the count here)."""
    total = 0
    for leaf in jax.tree.leaves(scratch_types):
        if isinstance(leaf, plgpu.Barrier):
            n = leaf.num_barriers
            total += BARRIER_BYTES * (math.prod(n) if isinstance(n, tuple) else n)
        else:
            size = math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
            total += -(-size // SMEM_ALIGN) * SMEM_ALIGN
    return total


def check_call(dtype, head_dim: int, who: str) -> None:
    """Raise ``ValueError`` (prefixed ``who``) naming what the Hopper kernels do not support."""
    if jnp.dtype(dtype) not in map(jnp.dtype, DTYPES):
        raise ValueError(f"{who}: dtype must be bfloat16 or float16, got {dtype}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"{who}: head_dim must be one of {HEAD_DIMS}, got {head_dim}")


def vector(ref, dim: int, interpret: bool):
    """Load 32-bit values ``[n]`` (float32, or int32 segment ids) from shared memory, laid out
    to broadcast along ``dim`` (0: one per row, 1: one per column) of a wgmma accumulator.
    These are generic-proxy loads: a ring slot read so must be fenced (``commit_smem``) before
    its release lets TMA (the async proxy) overwrite it (PTX ISA, memory model: proxies)."""
    if interpret:
        return ref[...]
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1 - dim))


def wgmma_operands(refs: tuple, interpret: bool) -> tuple:
    """Ring slots ``refs`` that a consumer reads only as ``wgmma`` operands, as its products
    take them: on the GPU the refs (wgmma reads shared memory in the async proxy, as TMA
    writes it, so releasing the slot needs no proxy fence); in interpret mode their values,
    loaded here and fenced with ``commit_smem`` at once. The ``jnp`` products standing in for
    wgmma there read in the generic proxy, which the race detector of jax >= 0.11 orders before
    TMA's writes only through that fence; loaded right after the slot's ready wait, they leave
    the slot's other (generic, ``vector``) loads to the fences the GPU code has."""
    if not interpret:
        return refs
    values = tuple(ref[...] for ref in refs)
    plgpu.commit_smem()
    return values


def same_segment(q_seg, k_seg, shape: tuple[int, int], query_dim: int):
    """``[m, n]`` equality of per-query ids ``q_seg`` (along ``query_dim``) and per-key ids
    ``k_seg`` (along the other dim), both loaded by :func:`vector`."""
    bcast = lambda x, dim: lax.broadcast_in_dim(x, shape, (dim,))  # noqa: E731
    return bcast(q_seg, query_dim) == bcast(k_seg, 1 - query_dim)


INTERPRET_MIN_THREADS = 4  # XLA:CPU threads below which the GPU interpreter can deadlock


def _xla_cpu_threads() -> int:
    """Threads of XLA:CPU's pool as XLA sizes it (``DefaultThreadPoolSize``): ``$NPROC`` if it
    is an int, else the CPUs this process may run on."""
    try:
        return int(os.environ["NPROC"])
    except (KeyError, ValueError):
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def interpret_params():
    """Parameters of Pallas' GPU interpreter (no public name in jax 0.10/0.11; checked on both).
    Warns when XLA:CPU has fewer than ``INTERPRET_MIN_THREADS`` threads: the interpreter runs
    each warpgroup as a thread that blocks in barrier callbacks occupying that pool, so a
    kernel can hang there (set ``NPROC``, e.g. to 8, before jax creates its CPU client, as
    tests/conftest.py does)."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    if (threads := _xla_cpu_threads()) < INTERPRET_MIN_THREADS:
        warnings.warn(
            f"the Mosaic GPU interpreter may deadlock with {threads} XLA:CPU threads (< "
            f"{INTERPRET_MIN_THREADS}): set NPROC=8 before jax starts",
            RuntimeWarning,
            stacklevel=2,
        )
    return InterpretGPUParams()


def iota(shape, dim: int, interpret: bool) -> jax.Array:
    """int32 iota along ``dim``, in the wgmma accumulator layout on the GPU."""
    if interpret:
        return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def tile_ranges(ranges_ref, batch, tile) -> tuple:
    """Row ``tile`` of ``segment_tile_ranges`` (``_common``), int32 ``[batch, n_tiles * 4]`` in
    GMEM, read with scalar loads: ``(lo, full_lo, full_hi, hi)``."""
    return tuple(ranges_ref[batch, tile * 4 + j] for j in range(4))


def nested(lo, hi, *bounds) -> tuple:
    """Ascending tile ``bounds`` clipped into ``[lo, hi]`` in order, so that a consumer's loops
    over them run exactly the producer's steps ``[lo, hi)``. Segment ids can put a warpgroup's
    own range outside its CTA's (keys whose documents have no later query), and a consumer
    waiting on a step never produced would hang."""
    out, prev = [], lo
    for x in bounds:
        prev = jnp.minimum(jnp.maximum(x, prev), hi)
        out.append(prev)
    return tuple(out)


def columns(x, i: int, interpret: bool):
    """Columns ``[64 i, 64 (i + 1))`` of a ring slot (a ref on the GPU, a value interpreted)."""
    if interpret:
        return x[:, i * ROWS : (i + 1) * ROWS]
    return x.at[:, pl.ds(i * ROWS, ROWS)]


def load_acc(ref, interpret: bool):
    """A ``[64, n]`` block of shared memory in registers in the wgmma accumulator layout, as
    float32 (cast from the block's dtype)."""
    x = ref[...] if interpret else plgpu.load(ref, (), layout=plgpu.Layout.WGMMA)
    return x.astype(jnp.float32)


def zero_acc(shape, interpret: bool):
    """A float32 wgmma accumulator of zeros."""
    acc = jnp.zeros(shape, jnp.float32)
    return acc if interpret else plgpu.layout_cast(acc, plgpu.Layout.WGMMA)


@dataclasses.dataclass(frozen=True)
class Transposed:
    """A shared-memory ``wgmma`` operand read transposed."""

    ref: Any


def operand(x, interpret: bool):
    """A ``wgmma`` operand as the GPU takes it (a ref, transposed if so marked), or its value
    when interpreted."""
    if isinstance(x, Transposed):
        return x.ref[...].T if interpret else plgpu.transpose_ref(x.ref, (1, 0))
    return x[...] if interpret else x


def mma(terms, interpret: bool):
    """For each ``(acc, [(a, b), ...])`` of ``terms``: ``acc + sum(a @ b)``, all issued
    together and waited for once; ``a`` is a shared-memory ref or a register array of the
    input dtype, ``b`` a shared-memory ref, either may be :class:`Transposed`; ``acc`` float32
    ``[m, n]``. Interpreted, the products are ``jnp`` dots of the same operands (the
    interpreter's ``wgmma`` reads neither a transposed operand nor a register left one)."""
    if interpret:
        dot = lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)  # noqa: E731
        return tuple(
            acc + sum(dot(operand(a, True), operand(b, True)) for a, b in products)
            for acc, products in terms
        )

    def issue(acc_refs):
        for acc_ref, (_, products) in zip(acc_refs, terms):
            for a, b in products:
                plgpu.wgmma(acc_ref, operand(a, False), operand(b, False))

    return pl.run_state(issue)(tuple(plgpu.ACC.init(acc) for acc, _ in terms))


def produce(load, steps, stages: int, free, regs: int | None = None) -> None:
    """Producer warpgroup: ``load(t, slot)`` issues the TMA copies of step ``t`` of
    ``[0, steps)`` into ring slot ``t % stages`` once the consumers freed that slot's
    previous step (the first ``stages`` steps wait for nothing); every release is observed
    (the interpreter checks that no phase is left unseen). ``regs``: lower the producer's
    registers to this many (``setmaxnreg``). One rolled loop, so ``t`` and ``slot`` are always
    traced (a ``load`` that issues ``wgmma`` needs that: jax 0.11 does not lower a constant
    slot inside its ``run_state``)."""
    if regs is not None:
        plgpu.set_max_registers(regs, action="decrease")
    slot_of = lambda t: lax.rem(t, jnp.int32(stages))  # noqa: E731

    @pl.loop(jnp.int32(0), steps)
    def _(t):
        pl.when(t >= stages)(functools.partial(plgpu.barrier_wait, free.at[slot_of(t)]))
        load(t, slot_of(t))

    @pl.loop(jnp.maximum(steps - stages, 0), steps)
    def _(t):
        plgpu.barrier_wait(free.at[slot_of(t)])
