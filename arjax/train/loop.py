"""The training loop behind ``arjax train``: sharded jit step, eval, checkpoints, logs.

Resumes from the newest valid checkpoint in ``out_dir``; SIGTERM/SIGINT finish the
current step, save and return. One process trains in a run folder at a time
(:class:`arjax.train.runlock.RunLock`). Metrics go to ``out_dir/metrics.jsonl`` (one JSON
object per line with ``step``), to TensorBoard event files under ``out_dir/tb`` and to the
console: a tqdm bar on a terminal, plain lines every ``train.log_every`` steps otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arjax.config import to_dict
from arjax.models import build_model, get_model_spec
from arjax.train.checkpoint import Checkpointer
from arjax.train.config import RunConfig
from arjax.train.data import make_data
from arjax.train.flops import mfu, peak_flops, train_step_flops
from arjax.train.optim import learning_rate_schedule, make_optimizer
from arjax.train.runlock import RunLock
from arjax.train.sharding import (
    batch_sharding,
    in_mesh_context,
    logical_shardings,
    make_mesh,
    maybe_initialize_distributed,
)
from arjax.train.step import LN2, init_train_state, make_eval_step, make_train_step


class MetricsWriter:
    """Appends JSON lines and TensorBoard scalars; on resume drops rows past the restored step."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        if path.exists() and jax.process_index() == 0:
            rows = []
            for line in path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):  # a row torn by a hard kill
                    rows.append(json.loads(line))
            kept = [r for r in rows if r.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.tb = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter  # numpy + protobuf only, no TensorFlow

            self.tb = SummaryWriter(str(path.parent / "tb"), purge_step=resume_step + 1)

    def write(self, row: dict) -> None:
        if jax.process_index() != 0:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _plain_console() -> bool:
    """Whether progress is printed as plain lines: stdout is not a terminal, or one that
    reports 0 columns (where a progress bar shows nothing)."""
    try:
        return not sys.stdout.isatty() or os.get_terminal_size(sys.stdout.fileno()).columns == 0
    except (OSError, ValueError):  # no file descriptor (a notebook, a closed stream)
        return True


def _plain_line(row: dict, steps: int) -> str:
    unit = "dim" if "val_bits_per_dim" in row else "byte"
    if "val_bits_per_byte" in row:
        return f"step {row['step']}/{steps}: val bits/{unit} {row['val_bits_per_byte']:.4f}"
    return (
        f"step {row['step']}/{steps}: loss {row['loss']:.4f}, bits/byte "
        f"{row['bits_per_byte']:.4f}, {row['tokens_per_s']:,.0f} tokens/s"
    )


def to_global(batch: dict, sharding: Any) -> dict:
    """Assemble this process's rows into global arrays laid out by ``sharding``."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def _process_rows(batch: dict) -> dict:
    """This process's contiguous share of a global (eval) batch's rows."""
    n, i = jax.process_count(), jax.process_index()
    rows = next(iter(batch.values())).shape[0]
    if rows % n:
        raise ValueError(f"eval batch of {rows} rows does not split over {n} processes")
    return {k: v[i * rows // n : (i + 1) * rows // n] for k, v in batch.items()}


class Trainer:
    """Builds model, data, mesh, state and jitted steps for one :class:`RunConfig`."""

    def __init__(self, cfg: RunConfig, out_dir: str | os.PathLike, devices: list | None = None):
        maybe_initialize_distributed(cfg.mesh)
        self.cfg = cfg
        self.out = Path(out_dir).absolute()
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} exists and is not a directory")
        self.mesh = make_mesh(cfg.mesh, devices)
        self.model = build_model(cfg.model_name, cfg.model)
        self.train_iter, self.eval_batches = make_data(
            cfg, jax.process_index(), jax.process_count()
        )
        self.out.mkdir(parents=True, exist_ok=True)  # only once the data is known to load
        self.tx = make_optimizer(cfg.train)
        example = jax.tree.map(lambda x: jnp.asarray(x[:1]), self.eval_batches[0])
        init = functools.partial(init_train_state, self.model, self.tx, example_batch=example)
        boxed = jax.eval_shape(init, jax.random.key(0))
        self.state_shardings = logical_shardings(boxed, self.mesh)
        self.abstract_state = nn.meta.unbox(boxed)
        self._init = jax.jit(
            lambda rng: nn.meta.unbox(init(rng)), out_shardings=self.state_shardings
        )
        self.batch_sharding = batch_sharding(self.mesh)
        self.train_step = jax.jit(
            in_mesh_context(make_train_step(self.model, self.tx, cfg.train.grad_accum), self.mesh),
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, None),
            donate_argnums=0,
        )
        self.eval_step = jax.jit(
            in_mesh_context(make_eval_step(self.model), self.mesh),
            in_shardings=(self.state_shardings.params, self.batch_sharding),
        )
        self.ckpt = Checkpointer(
            self.out / "checkpoints",
            keep=cfg.train.keep_checkpoints,
            async_save=cfg.train.async_checkpoint,
        )

    def initial_state(self, *, quarantine: bool = False) -> Any:
        """Restore the newest valid checkpoint, else a fresh state from ``train.seed``.

        ``quarantine`` (training only) renames unreadable newer checkpoints out of the way.
        """
        restored, data_state, _ = self.ckpt.restore_latest_valid(
            self.abstract_state, shardings=self.state_shardings, quarantine=quarantine
        )
        if restored is None:
            return self._init(jax.random.key(self.cfg.train.seed))
        if data_state is not None:
            self.train_iter.set_state(data_state)
        return restored

    def evaluate(self, params: Any) -> dict:
        total, count, nbytes = 0.0, 0.0, 0.0
        for batch in self.eval_batches:
            t, c = self.eval_step(params, to_global(_process_rows(batch), self.batch_sharding))
            total, count = total + float(t), count + float(c)
            if "target_bytes" in batch:  # tokens: bits per UTF-8 byte (arjax.data.bpe)
                nbytes += float(np.sum(batch["target_bytes"] * batch["loss_mask"]))
        loss = total / max(count, 1.0)
        bits = total / max(nbytes or count, 1.0) / LN2
        metrics = {"val_loss": loss, "val_bits_per_byte": bits}
        if get_model_spec(self.cfg.model_name).data == "images":
            metrics["val_bits_per_dim"] = loss / LN2  # one 8-bit subpixel per target
        return metrics

    def save(self, state: Any, *, force: bool = False) -> None:
        self.ckpt.save(
            int(state.step),
            state,
            data_state=self.train_iter.get_state(),
            metadata={"run_config": to_dict(self.cfg)},
            force=force,
        )


def train(
    cfg: RunConfig,
    out_dir: str | os.PathLike,
    devices: list | None = None,
    *,
    stop_at: int | None = None,
    on_eval: Callable[[int, Trainer, Any], None] | None = None,
) -> dict:
    """Train (or resume) to ``cfg.train.steps``; returns the last metrics row.

    ``stop_at`` ends this invocation early after that step (saving a checkpoint), as a
    preemption would; a later call resumes the same run. ``on_eval(step, trainer, params)``
    runs after each evaluation (``arjax train`` draws image samples there). Raises
    :class:`arjax.train.runlock.RunLockedError` if another process trains in ``out_dir``.
    """
    trainer = Trainer(cfg, out_dir, devices)
    lock = RunLock(trainer.out)
    if jax.process_index() == 0:
        lock.acquire()
    try:
        return _train_locked(trainer, stop_at, on_eval)
    finally:
        lock.release()


def _train_locked(
    trainer: Trainer,
    stop_at: int | None,
    on_eval: Callable[[int, Trainer, Any], None] | None,
) -> dict:
    cfg = trainer.cfg
    tc = cfg.train
    state = trainer.initial_state(quarantine=True)
    start = int(state.step)
    writer = MetricsWriter(trainer.out / "metrics.jsonl", start)
    if jax.process_index() == 0:
        (trainer.out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    schedule = learning_rate_schedule(tc)
    peak = peak_flops(jax.devices()[0])  # datasheet bf16 peak; None: no MFU reported
    flops_since_log = 0.0  # model FLOPs of the steps since the last log row (all processes)

    stop = {"signal": None}
    handlers = {}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):  # not the main thread: no handler
            handlers[sig] = signal.signal(sig, on_signal)

    bar, plain = None, False
    if tc.progress and jax.process_index() == 0:
        plain = _plain_console()
        if not plain:
            from tqdm.auto import tqdm

            bar = tqdm(total=tc.steps, initial=start, desc="train", dynamic_ncols=True)
    last = {"step": start}
    t_last, step_last = time.perf_counter(), start
    try:
        for step in range(start + 1, tc.steps + 1):
            host_batch = next(trainer.train_iter)
            step_flops = train_step_flops(cfg.model, host_batch)  # from this batch's content
            if step_flops is not None:
                flops_since_log += step_flops * jax.process_count()
            batch = to_global(host_batch, trainer.batch_sharding)
            state, metrics = trainer.train_step(state, batch)
            if stop_at is not None and step >= stop_at:
                stop["signal"] = "stop_at"
            if step % tc.log_every == 0 or step == tc.steps or stop["signal"]:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                elapsed, t_last = now - t_last, now
                dt = elapsed / max(step - step_last, 1)
                step_last = step
                row = {"step": step, **metrics, "lr": float(schedule(step - 1)), "step_time": dt}
                row["tokens_per_s"] = metrics["tokens"] / dt  # predicted tokens (subpixels)
                # no FLOP formula (nothing summed): no MFU
                step_mfu = mfu(flops_since_log or None, elapsed, peak, jax.device_count())
                flops_since_log = 0.0
                if step_mfu is not None:
                    row["mfu"] = step_mfu
                if metrics["bad_streak"] >= tc.max_bad_steps:
                    raise FloatingPointError(
                        f"{int(metrics['bad_streak'])} consecutive steps had non-finite "
                        f"loss or gradients (train.max_bad_steps={tc.max_bad_steps}); "
                        "stopping. The last good checkpoint is intact."
                    )
                if bar is not None:
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}")
                if plain and (step % tc.log_every == 0 or step == tc.steps):
                    print(_plain_line(row, tc.steps), flush=True)
                writer.write(row)
                last = row
            if step % tc.eval_every == 0 or step == tc.steps:
                row = {"step": step, **trainer.evaluate(state.params)}
                writer.write(row)
                last = {**last, **row}
                if bar is not None:
                    bar.write(_plain_line(row, tc.steps))
                if plain:
                    print(_plain_line(row, tc.steps), flush=True)
                if on_eval is not None:
                    on_eval(step, trainer, state.params)
            if step % tc.save_every == 0 or step == tc.steps or stop["signal"]:
                trainer.save(state, force=True)
            if bar is not None:
                bar.update(1)
            if stop["signal"]:
                sig = stop["signal"]
                last["preempted"] = sig if isinstance(sig, str) else signal.Signals(sig).name
                break
    finally:
        trainer.ckpt.wait()
        writer.close()
        if bar is not None:
            bar.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    last["state"] = state
    last["trainer"] = trainer
    return last
