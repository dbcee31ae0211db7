"""experiments/data/build_corpus.py on tiny synthetic Debian packages (nothing downloaded)."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import lzma
import sys
import tarfile
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "experiments" / "data" / "build_corpus.py"
_spec = importlib.util.spec_from_file_location("build_corpus", _PATH)
bc = importlib.util.module_from_spec(_spec)
sys.modules["build_corpus"] = bc  # dataclasses look their module up
_spec.loader.exec_module(bc)

EN = (
    "The kernel keeps a list of the devices that are present in the system, and it can "
    "tell which of them are in use. This is how the scheduler decides when to run.\n"
)
DE = (
    "Der Kern führt eine Liste der Geräte, die im System vorhanden sind, und er kann sagen, "
    "welche davon benutzt werden. So entscheidet der Planer, wann er läuft.\n"
)
COPYRIGHT = (
    "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
    "Files: *\nCopyright: 2020 Someone\nLicense: GPL-2+\n\n"
    "Files: doc/*\nCopyright: 2021 Other\nLicense: CC-BY-SA-3.0\n"
)


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_deb(package: str, files: dict[str, bytes], version: str = "1.0-1") -> bytes:
    """A minimal ``.deb``: ar archive of debian-binary, control.tar.xz, data.tar.xz."""
    control = f"Package: {package}\nVersion: {version}\n".encode()
    members = {
        "debian-binary": b"2.0\n",
        "control.tar.xz": _tar({"control": control}),
        "data.tar.xz": _tar(files),
    }
    out = b"!<arch>\n"
    for name, data in members.items():
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n"
        out += header.encode() + data + (b"\n" if len(data) % 2 else b"")
    return out


def test_html_to_text():
    page = (
        "<html><head><title>T</title><style>p{}</style></head><body>"
        "<nav>Home | Next</nav><h1>Title &amp; more</h1><p>First   line\n wraps.</p>"
        "<script>var x = 1;</script><pre>  code\n    indented</pre><p>Last.</p></body></html>"
    )
    text = bc.normalize(bc.html_to_text(page))
    assert text == "Title & more\n\nFirst line wraps.\n\n  code\n    indented\n\nLast.\n"


def test_roff_to_text():
    page = (
        '.\\" a comment\n.TH LS 1\n.SH NAME\nls \\- list directory contents\n'
        ".SH DESCRIPTION\n.B ls\nlists \\fBfiles\\fR \\(em all of them.\n.PP\nDone.\n"
    )
    text = bc.normalize(bc.roff_to_text(page))
    assert text == (
        "NAME\nls - list directory contents\n\nDESCRIPTION\nls\nlists files \u2014 all of them."
        "\n\nDone.\n"
    )


def test_language_filter():
    assert bc.language_ok(EN, "en") and not bc.language_ok(EN, "de")
    assert bc.language_ok(DE, "de") and not bc.language_ok(DE, "en")
    assert not bc.language_ok("x = foo(bar)\nreturn baz[0]\n" * 5, "en")  # code, no prose


def test_dedup_documents_and_near_duplicate_paragraphs():
    dedup = bc.Deduplicator()
    para = "A paragraph that is long enough to be considered for deduplication, version 1.2."
    near = "a PARAGRAPH that is long enough -- to be considered for deduplication version 3.4!"
    assert bc.near_duplicate_key(para) == bc.near_duplicate_key(near)
    first = dedup(f"Intro.\n\n{para}\n\nShort.\n")
    assert first == f"Intro.\n\n{para}\n\nShort.\n"
    # the near duplicate goes; short paragraphs (< MIN_DEDUP_CHARS) stay even if repeated
    assert dedup(f"Intro.\n\n{near}\n\nOther text.\n") == "Intro.\n\nOther text.\n"
    assert dedup(f"intro\n\n{para.upper()}\n\nshort\n") == ""  # the whole document repeats
    assert (dedup.dropped_docs, dedup.dropped_paragraphs) == (1, 1)


def test_split_is_by_document_and_stable():
    names = [f"/doc/{i}.html#0" for i in range(2000)]
    splits = [bc.split_of("src", n, 10.0) for n in names]
    assert splits == [bc.split_of("src", n, 10.0) for n in names]
    assert 150 < splits.count("val") < 250
    assert bc.split_of("src", names[0], 0.0) == "train"
    assert bc.split_of("src", names[0], 100.0) == "val"


def test_licences():
    assert bc.licences(COPYRIGHT) == ["CC-BY-SA-3.0", "GPL-2+"]
    assert bc.licences("This is in the public domain.") == ["public domain"]


def test_build_and_pack_end_to_end(tmp_path, monkeypatch):
    paras = [f"{EN.strip()} Section {chr(65 + i)} differs in {'this word ' * i}here.\n"
             for i in range(12)]  # fmt: skip
    files = {f"usr/share/doc/pkg/html/p{i:02d}.html": f"<p>{p}</p>".encode()
             for i, p in enumerate(paras)}  # fmt: skip
    files["usr/share/doc/pkg/html/zz-copy.html"] = files["usr/share/doc/pkg/html/p03.html"]
    files["usr/share/doc/pkg/html/german.html"] = f"<p>{DE}</p>".encode()
    files["usr/share/doc/pkg/html/skip.css"] = b"p { color: red }"
    files["usr/share/doc/pkg/copyright"] = COPYRIGHT.encode()
    de_files = {f"usr/share/man/de/man1/t{i}.1.gz": gzip.compress(
        f".SH NAME\n{DE.strip()} Nummer {i}: {'noch ' * i}mehr.\n".encode("latin-1"))
        for i in range(6)}  # fmt: skip
    debs = {"pkg": make_deb("pkg", files), "pkg-de": make_deb("pkg-de", de_files, "2.0")}
    sources = (
        bc.Source("en-src", "pkg", "en", r"/html/.*\.html$", "html"),
        bc.Source("de-src", "pkg-de", "de", r"/man/de/.*\.gz$", "roff"),
    )
    monkeypatch.setattr(bc, "MIN_DOC_BYTES", 64)
    manifest = bc.build(debs, tmp_path / "out", sources=sources, val_percent=30.0)
    out = tmp_path / "out"
    en, de = manifest["sources"]
    # 14 html files read; the German page fails the language filter, the copy is a duplicate
    assert (en["files_docs"], en["language_dropped"], en["kept"]) == (14, 1, 12)
    assert manifest["dedup_en"] == {"docs": 1, "paragraphs": 0}
    assert (de["kept"], de["version"], en["version"]) == (6, "2.0", "1.0-1")
    assert en["licences"] == ["CC-BY-SA-3.0", "GPL-2+"]
    assert (out / en["copyright_file"]).read_text() == COPYRIGHT
    texts = {s: {p.read_text() for p in (out / "en" / s).glob("*.txt")} for s in bc.SPLITS}
    assert texts["train"] and texts["val"] and not texts["train"] & texts["val"]
    assert texts["train"] | texts["val"] == {bc.normalize(p) for p in paras}
    # each document is where split_of puts its name (names in path order: p00..p11)
    expected_val = {bc.normalize(paras[i]) for i in range(12)
                    if bc.split_of("en-src", f"/usr/share/doc/pkg/html/p{i:02d}.html#0", 30.0)
                    == "val"}  # fmt: skip
    assert texts["val"] == expected_val
    assert all("Nummer" in p.read_text() for p in (out / "de").rglob("*.txt"))
    written = sorted(p for p in out.rglob("*.txt"))
    assert manifest["sha256"] == bc.tree_hash(out, written)
    assert json.loads((out / "MANIFEST.json").read_text())["sha256"] == manifest["sha256"]

    one_train = max(p.stat().st_size for p in (out / "en" / "train").glob("*.txt"))
    packed = bc.pack(out, tmp_path / "c.tar.xz", max_mb=2.5 * one_train / 1e6)
    with lzma.open(tmp_path / "c.tar.xz") as xz, tarfile.open(fileobj=xz) as tar:
        names = tar.getnames()
        info = json.loads(tar.extractfile("corpus/PACKED.json").read())
    assert info == packed and "corpus/MANIFEST.json" in names
    assert packed["sizes"]["en/val"] == manifest["sizes"]["en/val"]  # val whole
    assert 0 < packed["train_bytes"] <= 2.5 * one_train
    assert packed["sizes"]["en/train"] < manifest["sizes"]["en/train"]


def test_deb_errors():
    with pytest.raises(ValueError, match="not a Debian package"):
        bc.deb_members(b"PK\x03\x04")
