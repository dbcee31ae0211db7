"""Device mesh ``(data, fsdp, tensor)`` and logical-axis rules for every model family.

Parameters carry logical names (see :mod:`arjax.nn.layers`); ``LOGICAL_RULES`` maps them
onto mesh axes: batch over ``data`` x ``fsdp``, weights' ``embed`` dim over ``fsdp``
(ZeRO-3 style), heads / MLP / vocab over ``tensor`` (Megatron style).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from arjax.config import check, check_field_types
from arjax.nn.partitioning import LOGICAL_RULES, activation_mesh, fit_spec

MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape; ``data=-1`` takes all devices left after ``fsdp`` x ``tensor``.

    ``coordinator``/``num_processes``/``process_id`` drive ``jax.distributed.initialize``
    for multi-host runs (also read from ``ARJAX_COORDINATOR``, ``ARJAX_NUM_PROCESSES``,
    ``ARJAX_PROCESS_ID``).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    coordinator: str = ""
    num_processes: int = 1
    process_id: int = 0

    def __post_init__(self) -> None:
        check_field_types(self)
        check(self.data == -1 or self.data > 0, "data", f"must be -1 or > 0, got {self.data}")
        check(self.fsdp > 0, "fsdp", f"must be > 0, got {self.fsdp}")
        check(self.tensor > 0, "tensor", f"must be > 0, got {self.tensor}")
        check(self.num_processes > 0, "num_processes", f"must be > 0, got {self.num_processes}")
        check(
            0 <= self.process_id < self.num_processes,
            "process_id",
            f"must be in [0, num_processes={self.num_processes}), got {self.process_id}",
        )


def maybe_initialize_distributed(cfg: MeshConfig) -> None:
    """Call ``jax.distributed.initialize`` when the config or environment asks for it."""
    coordinator = cfg.coordinator or os.environ.get("ARJAX_COORDINATOR", "")
    num = int(os.environ.get("ARJAX_NUM_PROCESSES", cfg.num_processes))
    pid = int(os.environ.get("ARJAX_PROCESS_ID", cfg.process_id))
    if num > 1 and coordinator and not jax.distributed.is_initialized():
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            # Cross-process collectives on CPU (tests, laptops) go through gloo.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if coordinator == "auto":  # cluster auto-detection (Cloud TPU, SLURM, ...)
            jax.distributed.initialize()
        else:
            jax.distributed.initialize(coordinator, num_processes=num, process_id=pid)


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A ``Mesh`` of shape ``(data, fsdp, tensor)`` over ``devices`` (default: all)."""
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    data = cfg.data if cfg.data != -1 else n // (cfg.fsdp * cfg.tensor)
    check(
        data * cfg.fsdp * cfg.tensor == n,
        "mesh",
        f"data*fsdp*tensor = {data}*{cfg.fsdp}*{cfg.tensor} must equal the {n} devices",
    )
    grid = np.asarray(devices).reshape(data, cfg.fsdp, cfg.tensor)
    return Mesh(grid, MESH_AXES)


def logical_shardings(abstract_boxed: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree of ``nn.LogicallyPartitioned`` (e.g. ``eval_shape(init)``).

    A dim that its mesh axes do not divide is replicated instead of failing.
    """
    specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_boxed), LOGICAL_RULES)
    shapes = nn.meta.unbox(abstract_boxed)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, fit_spec(spec, x.shape, mesh)),
        specs,
        shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def in_mesh_context(fn: Any, mesh: Mesh) -> Any:
    """``fn`` traced with activation sharding hints onto ``mesh`` (see arjax.nn.partitioning)."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with activation_mesh(mesh):
            return fn(*args, **kwargs)

    return wrapped


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim over ``data`` x ``fsdp``; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
