"""The command line's answers to user mistakes: one line naming the problem and the fix, exit
status 2, no traceback (``--debug`` shows it), nothing left behind. None of these trains: a
run folder is faked with the ``config.json`` that ``arjax config`` prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from arjax.cli import main
from arjax.config import ConfigError, to_dict
from arjax.models import MODELS
from arjax.train.config import make_run_config
from arjax.train.loop import train
from arjax.train.runlock import RunLock, RunLockedError

SMALL = ["model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
         "model.head_dim=16", "model.mlp_dim=64", "model.max_seq_len=64", "data.seq_len=32",
         "data.batch_size=4", "data.val_batches=1", "train.progress=false"]  # fmt: skip


def _sets(overrides: list[str]) -> list[str]:
    return [x for kv in overrides for x in ("--set", kv)]


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"arjax {command}: error: "), err
    return err


def _fake_run(capsys, out: Path, model: str = "transformer", extra=()) -> None:
    """A run folder holding only the config.json `arjax train` would write."""
    assert main(["config", "--model", model, *_sets([*SMALL, *extra])]) == 0
    out.mkdir()
    (out / "config.json").write_text(capsys.readouterr().out)


def _corpus(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize(
    "files, message",
    [
        (None, "is neither 'shakespeare' nor a folder"),
        ({"train/a.txt": b"text"}, "val: not a directory"),
        ({"train/a.txt": b"text", "val/notes.md": b"x"}, "val: no .txt files found"),
        ({"train/a.txt": b"", "val/a.txt": b"x"}, "every .txt file in"),
        ({"train/a.txt": b"ok \xff", "val/a.txt": b"x"}, "a.txt: invalid UTF-8 at byte offset 3"),
    ],
)
def test_corpus_mistakes_are_one_line_and_leave_no_run_folder(tmp_path, capsys, files, message):
    corpus = tmp_path / "corpus"
    if files is not None:
        _corpus(corpus, files)
    out = tmp_path / "run"
    args = ["train", "--model", "transformer", "--out", str(out)]
    assert main([*args, *_sets([*SMALL, f"data.corpus={corpus}"])]) == 2
    err = _one_line_error(capsys, "train")
    assert "data.corpus: " in err and message in err
    assert not out.exists()


def test_flag_and_path_mistakes(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "nosuch", "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'nosuch'" in err and "--help" in err

    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["train", "--model", "transformer", "--out", str(a_file)]) == 2
    assert "is a file, not a run folder" in _one_line_error(capsys, "train")
    assert main(["eval", "--out", str(tmp_path / "missing")]) == 2
    assert "has no config.json" in _one_line_error(capsys, "eval")
    assert main(["config", "--model", "transformer", "--preset", "huge"]) == 2
    assert "known: tiny, small" in _one_line_error(capsys, "config")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ConfigError, match="preset: 'huge'"):
        main(["--debug", "config", "--model", "transformer", "--preset", "huge"])
    with pytest.raises(ConfigError, match="preset: 'huge'"):
        main(["config", "--model", "transformer", "--preset", "huge", "--debug"])


def test_help_lists_models_and_presets(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for name, spec in MODELS.items():
        assert f"{name} " in text and ", ".join(spec.presets) in text


def test_config_prints_the_resolved_config(capsys):
    assert main(["config", "--model", "block", "--preset", "tiny", "--set", "train.steps=7"]) == 0
    printed = json.loads(capsys.readouterr().out)
    cfg = make_run_config("block", "tiny", ["train.steps=7"])
    assert printed == to_dict(cfg) and printed["train"]["steps"] == 7


def test_train_on_a_run_of_another_model_or_shape(tmp_path, capsys):
    out = tmp_path / "run"
    _fake_run(capsys, out)
    assert main(["train", "--model", "hat", "--out", str(out)]) == 2
    err = _one_line_error(capsys, "train")
    assert "is 'transformer', not 'hat'" in err and "--model transformer" in err
    assert main(["train", "--model", "transformer", "--out", str(out), *_sets(SMALL[1:])]) == 2
    assert "model.d_model=32, this command asks for 128" in _one_line_error(capsys, "train")
    assert main(["eval", "--model", "hat", "--out", str(out)]) == 2
    assert "is 'transformer', not 'hat'" in _one_line_error(capsys, "eval")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # untouched


def test_truncated_config_json_is_named(tmp_path, capsys):
    out = tmp_path / "run"
    _fake_run(capsys, out)
    (out / "config.json").write_text((out / "config.json").read_text()[:50])
    for command in ("eval", "train"):
        assert main([command, "--model", "transformer", "--out", str(out)]) == 2
        err = _one_line_error(capsys, command)
        assert f"{out / 'config.json'} is not valid JSON" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "-1"], "--temperature: must be >= 0"),
        (["--top-p", "2"], "--top-p: must be in (0, 1]"),
        (["--top-k", "0"], "--top-k: must be >= 1"),
        (["--max-bytes", "-5"], "--max-bytes: must be >= 1, got -5"),
        (["--max-bytes", "1000000000"], "pass --max-bytes 56 or less"),  # 64 - 7-byte prompt - BOS
        (["--prompt", "x" * 70], "--prompt: 70 bytes; the model reads at most 63"),
        (["--prompt", "ok\udcff"], "--prompt: not valid UTF-8 (byte b'\\xff' at character 2)"),
        (["--png", "grid.png"], "--png: only image models draw a PNG; this run is 'transformer'"),
        (["--set", "model.d_model=64"], "--set model.d_model: the checkpoint in"),
    ],
)
def test_sample_flags_are_checked_before_loading(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    _fake_run(capsys, out)
    assert main(["sample", "--out", str(out), "--prompt", "ROMEO.\n", *flags]) == 2
    assert message in _one_line_error(capsys, "sample")


def test_run_folder_lock_names_the_holder_and_a_stale_one_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    cfg = make_run_config("transformer", "tiny", [*SMALL, "train.steps=1"])
    with RunLock(out), pytest.raises(RunLockedError, match=rf"\(pid {os.getpid()}\)"):
        train(cfg, out)  # a second open file description of the lock: refused
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())

    # the lock of a process that died is free: a new one takes it and writes its own pid
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    (out / ".lock").write_text(dead)
    with RunLock(out) as lock:
        assert lock.path.read_text() == f"{os.getpid()}\n"
    with RunLock(out):
        assert main(["train", "--model", "transformer", "--out", str(out), *_sets(SMALL)]) == 2
    err = _one_line_error(capsys, "train")
    assert f"is in use by another `arjax train` (pid {os.getpid()})" in err


def test_axial_training_writes_a_sample_grid_at_each_eval(tmp_path, capsys):
    from arjax.data.images import image_grid, write_png

    out = tmp_path / "run"
    small = ["model.d_model=32", "model.num_heads=2", "model.num_kv_heads=2", "model.head_dim=16",
             "model.mlp_dim=64", "model.inner_layers=1", "data.batch_size=4",
             "data.val_batches=1", "train.steps=4", "train.eval_every=2",
             "train.save_every=4", "train.sample_bytes=0", "train.progress=false",
             "train.async_checkpoint=false"]  # fmt: skip
    assert main(["train", "--model", "axial", "--out", str(out), *_sets(small)]) == 0
    pngs = sorted(p.name for p in (out / "samples").iterdir())
    assert pngs == ["step_0000002.png", "step_0000004.png"]
    # 16 samples of 8x8 on a 4-column grid, pixels scaled 4x: the same IHDR as a blank grid
    blank = write_png(tmp_path / "blank.png", image_grid(np.zeros((16, 8, 8, 1), np.uint8), 4), 4)
    got = (out / "samples" / pngs[-1]).read_bytes()
    assert got[:8] == b"\x89PNG\r\n\x1a\n" and got[12:24] == blank.read_bytes()[12:24]
    assert got != blank.read_bytes()  # not blank: sampled digits


def test_sample_png_folder_must_exist(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["config", "--model", "axial"]) == 0
    out.mkdir()
    (out / "config.json").write_text(capsys.readouterr().out)
    assert main(["sample", "--out", str(out), "--png", str(tmp_path / "no" / "grid.png")]) == 2
    assert f"--png: folder {tmp_path / 'no'} does not exist" in _one_line_error(capsys, "sample")


def test_ctrl_c_before_training_starts_leaves_nothing(tmp_path, capsys, monkeypatch):
    import arjax.train.loop as loop

    def interrupted(cfg, out, **kwargs):  # Ctrl-C while compiling: the folder exists, no step
        (Path(out) / "checkpoints").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train", interrupted)
    out = tmp_path / "run"
    assert main(["train", "--model", "transformer", "--out", str(out), *_sets(SMALL)]) == 130
    assert capsys.readouterr().err == "arjax train: interrupted; nothing was saved\n"
    assert not out.exists()


def test_no_readable_checkpoint_is_one_line_with_the_way_out(tmp_path, capsys):
    out = tmp_path / "run"
    _fake_run(capsys, out)
    (out / "checkpoints" / "5").mkdir(parents=True)
    (out / "checkpoints" / "5" / "_CHECKPOINT_METADATA").write_text("garbage")
    assert main(["eval", "--out", str(out)]) == 2
    err = _one_line_error(capsys, "eval")
    assert f"no checkpoint in {out / 'checkpoints'} could be restored (step 5: " in err
    assert err.endswith(f"; move {out / 'checkpoints'} aside to start the run over\n")


@pytest.mark.parametrize("tty, columns, plain", [(False, 80, True), (True, 0, True),
                                                 (True, 80, False)])  # fmt: skip
def test_plain_progress_lines_unless_a_terminal_with_columns(monkeypatch, tty, columns, plain):
    import arjax.train.loop as loop

    class Stdout:
        def isatty(self) -> bool:
            return tty

        def fileno(self) -> int:
            return 1

    monkeypatch.setattr(loop.sys, "stdout", Stdout())
    monkeypatch.setattr(loop.os, "get_terminal_size", lambda fd: os.terminal_size((columns, 24)))
    assert loop._plain_console() is plain
