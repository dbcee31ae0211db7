"""``arjax`` command line: ``train``, ``eval``, ``sample``.

    arjax train --model hat --preset tiny --out runs/hat --set train.steps=200
    arjax eval --out runs/hat
    arjax sample --out runs/hat --prompt "ROMEO." --max-bytes 200

``eval`` and ``sample`` rebuild the run's config from its checkpoint metadata and load
the newest valid checkpoint under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from arjax.config import ConfigError, apply_overrides, from_dict


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="arjax", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train (or resume) a model")
    train.add_argument("--model", default="hat", help="model family (default: hat)")
    train.add_argument("--preset", default="tiny", help="named preset (default: tiny)")
    train.add_argument("--out", required=True, help="run directory (checkpoints, metrics)")
    train.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.steps=100 (repeatable)",
    )  # fmt: skip
    for name in ("eval", "sample"):
        q = sub.add_parser(name, help=f"{name} from the newest checkpoint under --out")
        q.add_argument("--out", required=True, help="run directory written by `arjax train`")
        q.add_argument("--model", default=None, help="must match the run's model, if given")
        q.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    sample = sub.choices["sample"]
    sample.add_argument("--prompt", action="append", default=None, help="prompt (repeatable)")
    sample.add_argument("--max-bytes", type=int, default=200)
    sample.add_argument("--temperature", type=float, default=0.8)
    sample.add_argument("--top-k", type=int, default=None)
    sample.add_argument("--top-p", type=float, default=0.95)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--png", default=None, help="image models: where to write the grid")
    return p


def load_run_config(out: Path, model: str | None, overrides: list[str]):
    """The RunConfig saved by ``arjax train`` in ``out/config.json``, with overrides."""
    from arjax.data.pipeline import DataConfig
    from arjax.models import get_model_spec
    from arjax.train.config import RunConfig, TrainConfig
    from arjax.train.sharding import MeshConfig

    path = out / "config.json"
    if not path.is_file():
        raise ConfigError(f"--out: {out} has no config.json; run `arjax train --out {out}` first")
    raw = json.loads(path.read_text())
    if model is not None and model != raw["model_name"]:
        raise ConfigError(f"--model: run in {out} is {raw['model_name']!r}, not {model!r}")
    spec = get_model_spec(raw["model_name"])
    cfg = RunConfig(
        raw["model_name"],
        from_dict(spec.config_cls, raw["model"]),
        from_dict(DataConfig, raw["data"]),
        from_dict(TrainConfig, raw["train"]),
        from_dict(MeshConfig, raw["mesh"]),
    )
    return apply_overrides(cfg, overrides)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except ConfigError as e:
        print(f"arjax: config error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from arjax.train.config import make_run_config

    out = Path(args.out)
    if args.command == "train":
        from arjax.train.loop import train

        cfg = make_run_config(args.model, args.preset, args.overrides)
        result = train(cfg, out)
        summary = {k: v for k, v in result.items() if isinstance(v, int | float | str)}
        print(json.dumps(summary))
        if "val_bits_per_byte" in result:
            unit = "dim" if "val_bits_per_dim" in result else "byte"
            print(f"validation bits/{unit}: {result['val_bits_per_byte']:.4f}")
        if cfg.train.sample_bytes and "preempted" not in result:
            from arjax.generate import sample

            trainer = result["trainer"]
            text = sample(cfg.model_name, trainer.model, result["state"].params, cfg)
            print(f"sample:\n{text}")
        return 0

    cfg = load_run_config(out, args.model, args.overrides)
    from arjax.train.loop import Trainer

    trainer = Trainer(cfg, out)
    state = trainer.initial_state()
    if int(state.step) == 0:
        raise ConfigError(f"--out: no valid checkpoint under {out}/checkpoints")
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


if __name__ == "__main__":
    raise SystemExit(main())
