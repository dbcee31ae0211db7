"""Logical axis names and their mapping onto the ``(data, fsdp, tensor)`` mesh.

Parameters carry logical names through :func:`logical` initializers; activations get
sharding hints through :func:`constrain`, active only inside :func:`activation_mesh`
(the trainer enters it while tracing its steps), so single-device code is unaffected.
"""

from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from arjax.ops.mesh import current_mesh, use_mesh

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("latent", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)


def logical(init: Any, *names: str | None) -> Any:
    """Wrap an initializer so the parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, names)


def fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes from dims they do not divide (e.g. a 259-row byte vocabulary)."""
    dims = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        dims.append(axes if dim % size == 0 else None)
    return PartitionSpec(*dims)


def to_mesh_spec(names: tuple[str | None, ...]) -> PartitionSpec:
    """Logical names -> mesh PartitionSpec under ``LOGICAL_RULES``."""
    return nn.logical_to_mesh_axes(names, LOGICAL_RULES)


def activation_mesh(mesh: Mesh) -> contextlib.AbstractContextManager:
    """Within this context :func:`constrain` pins activation layouts onto ``mesh`` and
    Pallas ops are shard_mapped over it (:mod:`arjax.ops.mesh`)."""
    return use_mesh(mesh)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Sharding hint for an activation (no-op outside :func:`activation_mesh`)."""
    mesh = current_mesh()
    if mesh is None:
        return x
    spec = fit_spec(to_mesh_spec(names), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
