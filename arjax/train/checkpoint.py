"""Checkpoints of a `TrainState`, data-iterator state and run metadata via Orbax.

Each step directory holds three Orbax items: ``state`` (arrays, `StandardSave`),
``data_state`` and ``metadata`` (both JSON). Only steps Orbax finalised (atomically renamed
out of their ``*.orbax-checkpoint-tmp`` directory) are listed or restored. No pickle is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from arjax.train.state import TrainState

_STATE, _DATA, _META = "state", "data_state", "metadata"
_REASON_CHARS = 160  # a skipped checkpoint's reason is cut to one short line
_TENSORSTORE_TAIL = re.compile(
    r"\s*\[(?:source locations|tensorstore_spec)=|\. See full TensorStore"
)


class NoValidCheckpointError(RuntimeError):
    """Checkpoints exist but none of them could be restored."""


class Checkpointer:
    """Keeps the last ``keep`` checkpoints of a training run under ``directory``.

    Saves are asynchronous by default: `save` returns once arrays are copied to host, and
    the write finishes in the background (`wait` blocks until it is on disk). Following
    Orbax, a step is saved when it is a multiple of ``save_interval_steps`` or when the
    directory holds no checkpoint yet; ``force=True`` saves regardless.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int = 3,
        async_save: bool = True,
        save_interval_steps: int = 1,
    ) -> None:
        path = Path(os.path.abspath(Path(directory).expanduser()))
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise ValueError(
                f"checkpoint directory {path}: {existing} exists and is not a directory"
            )
        if keep < 1:
            raise ValueError(f"keep: must be >= 1, got {keep}")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps: must be >= 1, got {save_interval_steps}")
        self.directory = path
        self._names = ocp.path.step.standard_name_format()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            step_name_format=self._names,
        )
        with _quiet_absl():  # it reads every step's metadata; restore reports a bad one
            self._manager = ocp.CheckpointManager(path, options=options)

    def save(
        self,
        step: int,
        state: TrainState,
        *,
        data_state: dict | None = None,
        metadata: dict | None = None,
        force: bool = False,
    ) -> bool:
        """Saves ``state`` plus JSON ``data_state``/``metadata``; returns whether it saved.

        JSON turns tuples into lists and non-string keys into strings. Saving a step that
        already exists raises Orbax's `StepAlreadyExistsError` (a ValueError).
        """
        for name, value in ((_DATA, data_state), (_META, metadata)):
            try:
                json.dumps(value)
            except (TypeError, ValueError) as e:
                raise TypeError(f"{name} must be JSON-serialisable: {e}") from e
        tree = _fields(state)
        if _is_typed_key(tree["rng"]):
            tree["rng"] = jax.random.key_data(tree["rng"])
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(tree),
                _DATA: ocp.args.JsonSave(data_state),
                _META: ocp.args.JsonSave(metadata),
            }
        )
        return self._manager.save(int(step), args=args, force=force)

    def wait(self) -> None:
        """Blocks until any in-flight asynchronous save is finalised on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases Orbax resources."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def all_steps(self) -> list[int]:
        """Finalised steps on disk, ascending (in-flight saves are not included)."""
        return sorted(m.step for m in self._names.find_all(self.directory))

    def latest_step(self) -> int | None:
        """Newest finalised step, or None if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(
        self,
        abstract_state: TrainState,
        *,
        step: int | None = None,
        shardings: TrainState | None = None,
    ) -> tuple[TrainState, dict | None, dict | None]:
        """Restores ``(state, data_state, metadata)`` from ``step`` (default: latest).

        ``abstract_state`` is a `TrainState` of `jax.ShapeDtypeStruct` (or arrays) giving
        shapes and dtypes; its ``rng`` decides whether a typed key or raw key data comes
        back. Arrays land on ``shardings`` (a matching pytree of `jax.sharding.Sharding`,
        which may use a different mesh than the one saved from), else on each leaf's own
        ``.sharding`` if set, else on the first local device. Raises FileNotFoundError if
        the step is not a finalised checkpoint, and whatever Orbax raises if it is corrupt.
        """
        step = self._existing_step(step)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    _STATE: ocp.args.StandardRestore(_targets(abstract_state, shardings)),
                    _DATA: ocp.args.JsonRestore(),
                    _META: ocp.args.JsonRestore(),
                }
            ),
        )
        tree = dict(restored[_STATE])
        if _is_typed_key(abstract_state.rng):
            tree["rng"] = jax.random.wrap_key_data(tree["rng"], impl=abstract_state.rng.dtype)
        return TrainState(**tree), restored[_DATA], restored[_META]

    def restore_latest_valid(
        self,
        abstract_state: TrainState,
        *,
        shardings: TrainState | None = None,
        quarantine: bool = False,
    ) -> tuple[TrainState, dict | None, dict | None] | tuple[None, None, None]:
        """Restores the newest step that restores cleanly, warning about each one skipped.

        Returns ``(None, None, None)`` when the directory holds no finalised checkpoint,
        and raises `NoValidCheckpointError` when there are some but none restores. With
        ``quarantine=True`` each skipped step directory is renamed to
        ``<step>.invalid-<ns>`` (ignored by Orbax) so a resumed run can save those steps
        again; only the process that writes checkpoints should pass it.
        """
        steps = self.all_steps()
        errors: list[tuple[int, str]] = []
        for step in reversed(steps):
            try:
                with _quiet_absl():  # Orbax logs its own error lines: we report one instead
                    result = self.restore(abstract_state, step=step, shardings=shardings)
            except Exception as e:  # any failure means this step is unusable
                errors.append((step, _reason(e)))
                continue
            for bad, why in errors:
                warnings.warn(
                    f"checkpoint step {bad} in {self.directory} could not be restored ({why}); "
                    f"using step {step} instead",
                    RuntimeWarning,
                    stacklevel=2,
                )
            if quarantine and errors:
                self._quarantine([s for s in steps if s > step])
            return result
        if not steps:
            return None, None, None
        raise NoValidCheckpointError(
            f"no checkpoint in {self.directory} could be restored ("
            + "; ".join(f"step {s}: {why}" for s, why in errors)
            + f"); move {self.directory} aside to start the run over"
        )

    def read_metadata(self, step: int | None = None) -> dict | None:
        """The JSON metadata saved with ``step`` (default: latest), without reading arrays."""
        step = self._existing_step(step)
        args = ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
        return self._manager.restore(step, args=args)[_META]

    def _existing_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None and steps:
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(
                f"no finalised checkpoint for step {step} in {self.directory} (available: {steps})"
            )
        return step

    def _quarantine(self, steps: list[int]) -> None:
        self._manager.wait_until_finished()
        for step in steps:
            path = self.directory / self._names.build_name(step)
            path.rename(path.with_name(f"{path.name}.invalid-{time.time_ns()}"))
        self._manager.reload()


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Silence the ``absl`` logger (Orbax's) below CRITICAL for the duration."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _reason(e: Exception) -> str:
    """One short line for why a checkpoint did not restore: the exception's first line,
    without what TensorStore appends (``[source locations=...]``, ``[tensorstore_spec=...]``,
    ``See full TensorStore details: ...``)."""
    lines = str(e).strip().splitlines()
    first = lines[0] if lines else ""
    text = re.split(_TENSORSTORE_TAIL, first)[0]
    if len(text) > _REASON_CHARS:
        text = text[: _REASON_CHARS - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _fields(state: Any) -> dict[str, Any]:
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def _is_typed_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _targets(abstract_state: TrainState, shardings: TrainState | None) -> dict[str, Any]:
    """ShapeDtypeStructs with target shardings for `StandardRestore` (rng as key data)."""
    if shardings is None:
        default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda a: getattr(a, "sharding", None) or default, abstract_state)
    abstract, target_shardings = _fields(abstract_state), _fields(shardings)
    if _is_typed_key(abstract["rng"]):
        abstract["rng"] = jax.eval_shape(jax.random.key_data, abstract["rng"])
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract,
        target_shardings,
    )
