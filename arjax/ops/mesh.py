"""The device mesh that sharded training traces under, for ops that must be shard_mapped.

A Pallas kernel has no SPMD partitioning rule, so under a sharded ``jit`` an op wraps it in
``jax.shard_map`` over the mesh set by :func:`use_mesh` (the trainer sets it through
``arjax.nn.partitioning.activation_mesh``). Outside that context ops run unwrapped.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator

import jax
from jax.sharding import Mesh, PartitionSpec

_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("arjax_mesh", default=None)
BATCH_AXES = ("data", "fsdp")


def current_mesh() -> Mesh | None:
    return _MESH.get()


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[None]:
    token = _MESH.set(mesh)
    try:
        yield
    finally:
        _MESH.reset(token)


def shard_batch_heads(
    fn: Callable[..., jax.Array],
    heads: tuple[int, ...],
    batch: int,
    *args: jax.Array | None,
) -> jax.Array:
    """Run ``fn(*args)`` per shard: batch over (data, fsdp), heads over tensor.

    ``args`` are ``[batch, len, heads_i, ...]`` arrays (``heads`` gives each one's head
    count; 0 means "no head dim", e.g. segment ids) or None. A dim whose mesh axes do not
    divide it stays whole. The output is laid out like the first argument.
    """
    mesh = current_mesh()
    if mesh is None or mesh.size == 1:
        return fn(*args)
    batch_size = math.prod(mesh.shape[a] for a in BATCH_AXES)
    b = BATCH_AXES if batch % batch_size == 0 else None
    t = mesh.shape["tensor"]
    h = "tensor" if t > 1 and all(n % t == 0 for n in heads if n) else None
    present = [i for i, a in enumerate(args) if a is not None]
    specs = [
        PartitionSpec(b, None, h, None) if heads[i] else PartitionSpec(b, None) for i in present
    ]

    def local(*xs):
        full = list(args)
        for i, x in zip(present, xs):
            full[i] = x
        return fn(*full)

    return jax.shard_map(
        local, mesh=mesh, in_specs=tuple(specs), out_specs=specs[0], check_vma=False
    )(*(args[i] for i in present))
