"""``arjax`` command line: ``train``, ``eval``, ``sample``, ``plot``, ``config``.

    arjax train --model hat --preset tiny --out runs/hat --set train.steps=200
    arjax eval --out runs/hat
    arjax sample --out runs/hat --prompt "ROMEO." --max-bytes 200
    arjax plot --out runs/hat
    arjax config --model hat --preset tiny --set train.steps=200

``eval`` and ``sample`` rebuild the run's config from ``--out/config.json`` and load the newest
valid checkpoint under ``--out``. A mistake in the command (a flag, a config value, a path, a
corpus folder, a run folder of another model or in use) is one line on stderr and exit status
2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

from arjax.config import ConfigError, apply_overrides, from_dict, to_dict

_DESCRIPTION = "Train, evaluate, sample and plot autoregressive sequence models in JAX."


class UsageError(Exception):
    """A mistake in the command line or its files: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the problem and where the help is."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _models_epilog() -> str:
    from arjax.models import MODELS

    lines = ["models and their presets (--model M --preset P):"]
    lines += [f"  {name:<12} {', '.join(spec.presets)}" for name, spec in sorted(MODELS.items())]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    from arjax.models import MODELS

    models = sorted(MODELS)
    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog="arjax", description=_DESCRIPTION, epilog=_models_epilog(),
                formatter_class=fmt)  # fmt: skip
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one line")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, epilog: str | None = None) -> argparse.ArgumentParser:
        q = sub.add_parser(name, help=text, description=text, epilog=epilog,
                           formatter_class=fmt)  # fmt: skip
        # SUPPRESS: `arjax --debug train` and `arjax train --debug` both work
        q.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks instead of one line")  # fmt: skip
        return q

    def overrides(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a config field, e.g. --set train.steps=100 (repeatable)",
        )  # fmt: skip

    for name, text in (("train", "train (or resume) a model"),
                       ("config", "print the resolved run config as JSON")):  # fmt: skip
        q = command(name, text, _models_epilog())
        q.add_argument("--model", default="hat", choices=models, metavar="MODEL",
                       help="model family (default: hat; listed below)")  # fmt: skip
        q.add_argument("--preset", default="tiny", help="named size (default: tiny)")
        if name == "train":
            q.add_argument("--out", required=True, help="run folder (checkpoints, metrics)")
        overrides(q)
    for name in ("eval", "sample"):
        q = command(name, f"{name} from the newest checkpoint under --out")
        q.add_argument("--out", required=True, help="run folder written by `arjax train`")
        q.add_argument("--model", default=None, help="must match the run's model, if given")
        overrides(q)
    sample = sub.choices["sample"]
    sample.add_argument("--prompt", action="append", default=None, help="prompt (repeatable)")
    sample.add_argument("--max-bytes", type=int, default=200, help="bytes to generate")
    sample.add_argument("--temperature", type=float, default=0.8, help=">= 0; 0 is greedy")
    sample.add_argument("--top-k", type=int, default=None, help="keep the k likeliest (k >= 1)")
    sample.add_argument("--top-p", type=float, default=0.95, help="nucleus mass in (0, 1]")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--png", default=None, help="image models: where to write the grid")
    plot = command("plot", "write a PNG of the loss and val bits/byte curves of a run")
    plot.add_argument("--out", required=True, help="run folder written by `arjax train`")
    plot.add_argument("--png", default=None, help="where to write it (default: OUT/curves.png)")
    return p


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(
            f"{path} is not valid JSON ({e}); restore it, or delete the run folder to start over"
        ) from e


def load_run_config(out: Path, model: str | None, overrides: list[str]) -> Any:
    """The RunConfig saved by ``arjax train`` in ``out/config.json``, with overrides."""
    from arjax.data.pipeline import DataConfig
    from arjax.models import get_model_spec
    from arjax.train.config import RunConfig, TrainConfig
    from arjax.train.sharding import MeshConfig

    path = out / "config.json"
    if not path.is_file():
        raise UsageError(f"--out: {out} has no config.json; run `arjax train --out {out}` first")
    raw = _read_json(path)
    _check_same_model(out, raw, model)
    try:
        spec = get_model_spec(raw["model_name"])
        cfg = RunConfig(
            raw["model_name"],
            from_dict(spec.config_cls, raw["model"]),
            from_dict(DataConfig, raw["data"]),
            from_dict(TrainConfig, raw["train"]),
            from_dict(MeshConfig, raw["mesh"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{path}: not a run config of this arjax ({e})") from e
    changed = apply_overrides(cfg, overrides)
    model = to_dict(changed)["model"]
    fields = [k for k in model if model[k] != raw["model"].get(k)]
    if fields:
        raise UsageError(
            f"--set model.{fields[0]}: the checkpoint in {out} was trained with "
            f"model.{fields[0]}={raw['model'].get(fields[0])!r}; eval and sample keep the run's "
            "model (data.*, train.* and mesh.* may change)"
        )
    return changed


def _check_same_model(out: Path, raw: dict, model: str | None) -> None:
    if model is not None and raw.get("model_name") != model:
        raise UsageError(
            f"--model: the run in {out} is {raw.get('model_name')!r}, not {model!r}; pass "
            f"--model {raw.get('model_name')} to use it, or another --out for a new run"
        )


def _check_resumable(out: Path, cfg: Any) -> None:
    """``train`` into an existing run folder: same family and model shape, or one line."""
    path = out / "config.json"
    if not path.is_file():
        return
    raw = _read_json(path)
    _check_same_model(out, raw, cfg.model_name)
    saved, asked = raw.get("model", {}), to_dict(cfg)["model"]
    changed = [k for k in asked if saved.get(k) != asked[k]]
    if changed:
        k = changed[0]
        raise UsageError(
            f"--out: the run in {out} has model.{k}={saved.get(k)!r}, this command asks for "
            f"{asked[k]!r} ({len(changed)} model field(s) differ); resume with the run's "
            "settings or pick another --out"
        )


def _check_sampling(args: argparse.Namespace, cfg: Any) -> None:
    """Sampling flags and prompts, checked before the model is built."""
    if args.temperature < 0:
        raise UsageError(f"--temperature: must be >= 0 (0 is greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k: must be >= 1, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p: must be in (0, 1] (1 keeps every token), got {args.top_p}")
    from arjax.models import get_model_spec
    from arjax.models.linear_lm import LINEAR_MIXERS

    spec = get_model_spec(cfg.model_name)
    if args.png is not None:
        if spec.data != "images":
            raise UsageError(
                f"--png: only image models draw a PNG; this run is {cfg.model_name!r} (text)"
            )
        if not Path(args.png).absolute().parent.is_dir():
            raise UsageError(f"--png: folder {Path(args.png).parent} does not exist; create it")
    if args.max_bytes < 1:
        raise UsageError(f"--max-bytes: must be >= 1, got {args.max_bytes}")
    prompts = args.prompt or [cfg.train.sample_prompt]
    for prompt in prompts:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = prompt[e.start].encode("utf-8", "surrogateescape")
            raise UsageError(
                f"--prompt: not valid UTF-8 (byte {bad!r} at character {e.start}); "
                "pass UTF-8 text (check the terminal's locale)"
            ) from None
    limit = getattr(cfg.model, "max_seq_len", None)
    if spec.data == "images" or limit is None or cfg.data.tokenizer is not None:
        return  # a BPE run's context counts tokens, which byte lengths do not bound
    longest = max(len(p.encode("utf-8")) for p in prompts) + 1  # + BOS
    if longest > limit:
        raise UsageError(
            f"--prompt: {longest - 1} bytes; the model reads at most {limit - 1} "
            f"(model.max_seq_len={limit}); shorten it"
        )
    if cfg.model_name not in LINEAR_MIXERS and longest + args.max_bytes > limit:
        raise UsageError(
            f"--max-bytes: {args.max_bytes} + the {longest - 1}-byte prompt exceed the model's "
            f"context (model.max_seq_len={limit}); pass --max-bytes {limit - longest} or less"
        )


def _one_line_warnings() -> None:
    """Warnings as ``arjax: warning: <first line>`` (library warnings keep their detail)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
        print(f"arjax: warning: {text}", file=file or sys.stderr)

    warnings.showwarning = show


def enable_compilation_cache() -> None:
    """Persistent XLA compilation cache, so a second ``eval``/``sample`` does not recompile:
    ``$JAX_COMPILATION_CACHE_DIR`` if set, else ``~/.cache/arjax/xla``."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "arjax" / "xla"
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    if not debug:
        _one_line_warnings()
    created = False
    if args.command == "train":
        created = not Path(args.out).exists()
    try:
        return _run(args)
    except KeyboardInterrupt:  # before training's own handler is installed, or eval/sample
        if created:
            _remove_if_unused(Path(args.out))
        if debug:
            raise
        print(f"arjax {args.command}: interrupted; nothing was saved", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as e:
        from arjax.train.checkpoint import NoValidCheckpointError
        from arjax.train.runlock import RunLockedError

        user = (UsageError, ConfigError, NoValidCheckpointError, RunLockedError, PermissionError)
        if created and isinstance(e, user):
            _remove_if_unused(Path(args.out))
        if debug or not isinstance(e, user):
            raise
        print(f"arjax {args.command}: error: {e}", file=sys.stderr)
        return 2


def _remove_if_unused(out: Path) -> None:
    """Delete a run folder this command created, unless a checkpoint made it in."""
    ckpt = out / "checkpoints"
    if out.is_dir() and not (ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())):
        shutil.rmtree(out, ignore_errors=True)


def entry() -> int:
    """The ``arjax`` console script: :func:`main` with the persistent compilation cache."""
    enable_compilation_cache()
    return main()


def _run(args: argparse.Namespace) -> int:
    from arjax.train.config import make_run_config

    if args.command == "config":
        cfg = make_run_config(args.model, args.preset, args.overrides)
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} is a file, not a run folder; pass a folder path")
    if args.command == "train":
        return _train(args, out, make_run_config(args.model, args.preset, args.overrides))
    if args.command == "plot":
        from arjax.train.curves import plot_run

        try:
            print(plot_run(out, None if args.png is None else Path(args.png)))
        except (FileNotFoundError, ValueError, ImportError) as e:
            raise UsageError(str(e)) from e
        return 0

    cfg = load_run_config(out, args.model, args.overrides)
    if args.command == "sample":
        _check_sampling(args, cfg)
    from arjax.train.loop import Trainer

    trainer = Trainer(cfg, out)
    state = trainer.initial_state()
    if int(state.step) == 0:
        raise UsageError(
            f"--out: no checkpoint under {out}/checkpoints; run `arjax train --out {out}` first"
        )
    if args.command == "eval":
        print(json.dumps({"step": int(state.step), **trainer.evaluate(state.params)}))
        return 0
    from arjax.generate import sample

    print(
        sample(
            cfg.model_name,
            trainer.model,
            state.params,
            cfg,
            prompts=args.prompt,
            max_bytes=args.max_bytes,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            png=args.png,
        )
    )
    return 0


def _train(args: argparse.Namespace, out: Path, cfg: Any) -> int:
    from arjax.models import get_model_spec
    from arjax.train.loop import train

    _check_resumable(out, cfg)
    on_eval = None
    m = cfg.model
    if (
        get_model_spec(cfg.model_name).data == "images"
        and len(m.shape) == 2
        and m.channels in (1, 3)
    ):

        def on_eval(step: int, trainer: Any, params: Any) -> None:
            from arjax.generate import sample

            (trainer.out / "samples").mkdir(exist_ok=True)
            png = trainer.out / "samples" / f"step_{step:07d}.png"
            sample(cfg.model_name, trainer.model, params, cfg, png=str(png))

    result = train(cfg, out, on_eval=on_eval)
    summary = {k: v for k, v in result.items() if isinstance(v, int | float | str)}
    print(json.dumps(summary))
    if "val_bits_per_byte" in result:
        unit = "dim" if "val_bits_per_dim" in result else "byte"
        print(f"validation bits/{unit}: {result['val_bits_per_byte']:.4f}")
    stopped = result.get("preempted")
    if stopped in ("SIGINT", "SIGTERM"):
        print(
            f"stopped at step {result['step']}, checkpoint saved; run the same command to resume",
            file=sys.stderr,
        )
        return 128 + signal.Signals[stopped].value  # 130 / 143, as the signal would
    if cfg.train.sample_bytes and stopped is None:
        from arjax.generate import sample

        trainer = result["trainer"]
        text = sample(cfg.model_name, trainer.model, result["state"].params, cfg)
        print(f"sample:\n{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(entry())
