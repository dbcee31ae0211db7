"""Build the offline English + German corpus of issue 23 from Debian packages.

Every source is a Debian (bookworm, ``main``) package fetched with ``apt-get download``:
documentation, manuals, dictionaries and collections of quotations that the package ships as
text, HTML, reStructuredText, POD, Mallard XML or man pages. Nothing is installed: each
``.deb`` is read in Python (``ar`` archive -> ``data.tar.*``), the matching files are turned
into plain text (:func:`html_to_text`, :func:`roff_to_text`, ...) and each becomes one
document (dictionaries and quotation files are cut into chunks of entries, each a document).

Cleaning, in this order, over all sources of a language in a fixed order:

1. text normalisation: NFC, ``\\n`` line ends, no trailing spaces, at most one blank line;
2. language filter (:func:`language_ok`): a document is kept when the stop words of its
   language are at least :data:`MIN_STOPWORD_SHARE` of its words and three times those of the
   other language (drops code listings, tables and untranslated pages);
3. exact deduplication of documents (by the hash of their near-duplicate key);
4. near-duplicate paragraphs: a paragraph (blank-line separated) of at least
   :data:`MIN_DEDUP_CHARS` characters whose key (:func:`near_duplicate_key`: lower case,
   letters and digits only, digit runs as ``0``) was seen before, in any document of the
   language, is dropped;
5. documents shorter than :data:`MIN_DOC_BYTES` after that are dropped.

The train/val split is by document (:func:`split_of`): a hash of ``source:document name``
puts ``--val-percent`` of the documents in ``val``, so no document is in both. Output::

    OUT/en/train/*.txt, OUT/en/val/*.txt    # data.corpus=OUT/en
    OUT/de/train/*.txt, OUT/de/val/*.txt    # data.corpus=OUT/de
    OUT/MANIFEST.json                        # sources, versions, deb SHA-256, licences, sizes, hash
    OUT/licenses/<package>.copyright         # each package's Debian copyright file

Languages are independent (deduplication is per language, file names per source), so
``--langs de`` builds the German half exactly as a full build would. The script prints the
byte count of each split and one SHA-256 over every written file
(path and contents), so two builds can be compared. The data stays out of git (``data/`` is
ignored). To carry it to a machine that reaches no registry (one call moves at most 64 MiB),
``--pack FILE.tar.xz --max-mb N`` writes an xz archive holding both val splits whole and the
train splits up to ``N`` MB of text in total (files taken in a fixed hash order, so a smaller
``N`` gives a subset of a larger one)::

    python experiments/data/build_corpus.py --out data/corpus --pack data/corpus.tar.xz --max-mb 160
    tar xJf data/corpus.tar.xz -C data/     # on the device: data/corpus/{en,de}/...

The printed hash of the packed subset is stored in the archive as ``corpus/PACKED.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import html
import io
import json
import lzma
import re
import subprocess
import tarfile
import unicodedata
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path

LANGS = ("en", "de")
SPLITS = ("train", "val")
MIN_STOPWORD_SHARE = 0.08
MIN_DEDUP_CHARS = 24
MIN_DOC_BYTES = 256
CHUNK_BYTES = 64 * 1024  # dictionaries and quotation files: documents of about this size


def _wordset(words: str) -> frozenset[str]:
    return frozenset(words.split())


# Disjoint lists of frequent function words.
STOPWORDS = {
    "en": _wordset(
        "the of and to a in is it that for on with as are be this by or not from at an can "
        "which you if will was have has its but all their there when other more these they "
        "we one would been into such than also"
    ),
    "de": _wordset(
        "der die und den von zu das mit sich des auf für ist im dem nicht ein eine als auch "
        "es werden aus er hat dass sie nach wird bei einer um am sind noch wie einem über "
        "einen zum kann oder ich wenn nur"
    ),
}


@dataclasses.dataclass(frozen=True)
class Source:
    """Files of one Debian package: ``pattern`` (a regex over paths inside the package,
    ``re.search``) selects them, ``fmt`` names the converter (see :data:`CONVERTERS`)."""

    name: str
    package: str
    lang: str
    pattern: str
    fmt: str
    exclude: str | None = None


SOURCES: tuple[Source, ...] = (
    # English
    Source("linux-doc", "linux-doc-6.1", "en", r"/Documentation/.*\.(rst|txt)(\.gz)?$", "text",
           exclude=r"/translations/|/devicetree/bindings/|/ABI/"),
    Source("python-doc", "python3.11-doc", "en", r"/html/_sources/.*\.txt$", "text"),
    Source("perl-doc", "perl-doc", "en", r"\.pod(\.gz)?$", "text"),
    Source("gcide", "dict-gcide", "en", r"\.dict\.dz$", "dict"),
    Source("foldoc", "dict-foldoc", "en", r"\.dict\.dz$", "dict"),
    Source("jargon", "dict-jargon", "en", r"\.dict\.dz$", "dict"),
    Source("devil", "dict-devil", "en", r"\.dict\.dz$", "dict"),
    Source("fortunes", "fortunes", "en", r"/games/fortunes/[a-z-]+$", "fortune"),
    Source("django-doc", "python-django-doc", "en", r"/html/.*\.html$", "html",
           exclude=r"/_modules/|genindex|py-modindex|search\.html"),
    Source("postgresql-doc", "postgresql-doc-15", "en", r"/html/.*\.html$", "html",
           exclude=r"bookindex"),
    Source("gimp-help-en", "gimp-help-en", "en", r"/help/en/.*\.html$", "html"),
    Source("libreoffice-help-en", "libreoffice-help-en-us", "en", r"/help/en-US/.*\.html$",
           "html"),
    Source("git-doc", "git-doc", "en", r"\.txt$", "text"),
    Source("rust-books", "rust-doc", "en",
           r"/html/(book|reference|nomicon|rust-by-example|edition-guide|embedded-book|rustc|"
           r"cargo|rustdoc)/.*\.html$", "html", exclude=r"print\.html$|/searchindex|toc\.html$"),
    Source("manpages-en", "manpages", "en", r"/man/man\d/.*\.gz$", "roff"),
    Source("manpages-dev-en", "manpages-dev", "en", r"/man/man\d/.*\.gz$", "roff"),
    Source("handbook-en", "debian-handbook", "en", r"/html/en-US/.*\.html$", "html"),
    Source("gnome-help-en", "gnome-user-docs", "en", r"/help/C/.*\.page$", "html"),
    Source("debian-reference-en", "debian-reference-en", "en", r"\.en\.html$", "html"),
    Source("apache-doc-en", "apache2-doc", "en", r"/manual/en/.*\.html$", "html"),
    # German
    Source("manpages-de", "manpages-de", "de", r"/man/de/man\d/.*\.gz$", "roff"),
    Source("manpages-de-dev", "manpages-de-dev", "de", r"/man/de/man\d/.*\.gz$", "roff"),
    Source("libreoffice-help-de", "libreoffice-help-de", "de", r"/help/de/.*\.html$", "html"),
    Source("gimp-help-de", "gimp-help-de", "de", r"/help/de/.*\.html$", "html"),
    Source("handbook-de", "debian-handbook", "de", r"/html/de-DE/.*\.html$", "html"),
    Source("gnome-help-de", "gnome-user-docs", "de", r"/help/de/.*\.page$", "html"),
    Source("debian-reference-de", "debian-reference-de", "de", r"\.de\.html$", "html"),
    Source("developers-reference-de", "developers-reference-de", "de", r"\.html$", "html"),
    Source("debian-edu-doc-de", "debian-edu-doc-de", "de", r"\.html$", "html"),
    Source("kicad-doc-de", "kicad-doc-de", "de", r"\.html$", "html"),
    Source("apache-doc-de", "apache2-doc", "de", r"/manual/de/.*\.html$", "html"),
    Source("lilypond-doc-de", "lilypond-doc-html-de", "de", r"/Documentation/.*\.de\.html$",
           "html"),
    Source("installation-guide-de", "installation-guide-amd64", "de",
           r"/installation-guide-amd64/de/.*\.html$", "html"),
    Source("debian-faq-de", "debian-faq-de", "de", r"/FAQ/de/.*\.html$", "html"),
    Source("maint-guide-de", "maint-guide-de", "de", r"\.de\.html$", "html"),
    Source("udo-doc-de", "udo-doc-de", "de", r"/html/.*\.html?$", "html"),
    Source("gosa-help-de", "gosa-help-de", "de", r"/de/html/.*\.html$", "html"),
    Source("ubuntu-packaging-guide-de", "ubuntu-packaging-guide-html-de", "de",
           r"/ubuntu-packaging-guide-html-de/_sources/.*\.txt$", "text"),
    Source("fortunes-de", "fortunes-de", "de", r"/games/fortunes/de/[^/.]+(\.fortunes)?$",
           "fortune"),
)  # fmt: skip


# ---------------------------------------------------------------- converters (bytes -> docs)


def decode_text(data: bytes) -> str:
    """UTF-8, else Latin-1 (old man pages and quotation files)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


_BLOCK_TAGS = _wordset(
    "p div br li ul ol dl dt dd h1 h2 h3 h4 h5 h6 tr table pre blockquote body section article "
    "title item list terms note code-block screen figure caption tip example info desc "
    "synopsis"
)
_SKIP_TAGS = _wordset("script style head nav noscript svg math")


class _TextExtractor(HTMLParser):
    """Visible text of an HTML or Mallard page as blocks: block elements end a block;
    ``<pre>`` blocks keep their whitespace, others have it collapsed."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self.current: list[str] = []
        self.skip = 0
        self.pre = 0

    def flush(self) -> None:
        text = "".join(self.current)
        text = text.strip("\n") if self.pre else re.sub(r"\s+", " ", text).strip()
        if text:
            self.blocks.append(text)
        self.current = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in _BLOCK_TAGS:
            self.flush()
        if tag in _SKIP_TAGS:
            self.skip += 1
        elif tag == "pre":
            self.pre += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in _BLOCK_TAGS:
            self.flush()
        if tag in _SKIP_TAGS:
            self.skip = max(0, self.skip - 1)
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.current.append(data)


def html_to_text(page: str) -> str:
    """Visible text of ``page`` (scripts, styles, ``<head>`` and navigation dropped), one
    blank line between blocks."""
    parser = _TextExtractor()
    parser.feed(page)
    parser.close()
    parser.flush()
    return "\n\n".join(parser.blocks)


_ROFF_ESCAPES = {
    r"\(em": "\u2014", r"\(en": "\u2013", r"\(aq": "'", r"\(dq": '"', r"\(lq": "\u201c",
    r"\(rq": "\u201d", r"\(bu": "\u2022", r"\(co": "\u00a9", r"\[em]": "\u2014",
    r"\[en]": "\u2013", r"\[aq]": "'", r"\[dq]": '"', r"\[lq]": "\u201e", r"\[rq]": "\u201c",
    r"\[Fo]": "\u00ab", r"\[Fc]": "\u00bb", r"\[bu]": "\u2022", r"\-": "-", r"\e": "\\",
    r"\~": " ", r"\ ": " ", r"\&": "", r"\:": "", r"\%": "", r"\|": "", r"\^": "",
}  # fmt: skip
_ROFF_ESCAPE = re.compile("|".join(re.escape(k) for k in sorted(_ROFF_ESCAPES, key=len)[::-1]))
_ROFF_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)|\\\*(\[[^\]]*\]|\(..|.)|\\[sk][-+]?\d+")
_ROFF_OTHER = re.compile(r"\\(\[[^\]]*\]|\(..)")
_ROFF_BREAK = _wordset("PP LP P TP IP HP sp br SH SS RS RE EX EE nf fi")
_ROFF_INLINE = _wordset("B I BI BR IR RB RI IB SM SB UR UE MT ME OP")


def _roff_inline(line: str) -> str:
    line = _ROFF_ESCAPE.sub(lambda m: _ROFF_ESCAPES[m.group()], line)
    return _ROFF_OTHER.sub("", _ROFF_FONT.sub("", line))


def roff_to_text(page: str) -> str:
    """Readable text of a man page: request lines dropped except section headings and
    inline-font requests (their arguments kept), escapes resolved or removed."""
    out: list[str] = []
    for raw in page.split("\n"):
        if raw.startswith(('.\\"', "'\\\"", '.\\"')) or raw.strip() in (".", "'"):
            continue
        if raw.startswith((".", "'")):
            macro, _, args = raw[1:].strip().partition(" ")
            args = _roff_inline(args.replace('"', "")).strip()
            if macro in _ROFF_BREAK:
                out.append("")
                if args and macro in ("SH", "SS", "IP", "TP"):
                    out.append(args)
            elif macro in _ROFF_INLINE and args:
                out.append(args)
            continue
        out.append(_roff_inline(raw))
    return "\n".join(out)


def dict_entries(text: str) -> list[str]:
    """Entries of a dictd ``.dict`` file (blank-line separated), without its ``00-database``
    header entries."""
    entries = [e for e in re.split(r"\n\s*\n", text) if e.strip()]
    return [e for e in entries if not e.lstrip().startswith("00-database")]


def chunk_entries(entries: list[str], size: int = CHUNK_BYTES) -> list[str]:
    """Consecutive entries joined (blank lines between) into chunks of about ``size`` bytes."""
    chunks, current, n = [], [], 0
    for e in entries:
        current.append(e)
        n += len(e.encode("utf-8")) + 2
        if n >= size:
            chunks.append("\n\n".join(current))
            current, n = [], 0
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def _decompress(path: str, data: bytes) -> bytes:
    return gzip.decompress(data) if path.endswith((".gz", ".dz")) else data


CONVERTERS: dict[str, Callable[[str], list[str]]] = {
    "text": lambda t: [t],
    "html": lambda t: [html_to_text(t)],
    "roff": lambda t: [roff_to_text(t)],
    "dict": lambda t: chunk_entries(dict_entries(t)),
    "fortune": lambda t: chunk_entries([e for e in re.split(r"\n%\n", t) if e.strip()]),
}


# ---------------------------------------------------------------- cleaning and dedup


def normalize(text: str) -> str:
    """NFC, ``\\n`` line ends, no trailing spaces, at most one blank line, no outer blanks."""
    text = unicodedata.normalize("NFC", html.unescape(text) if "&#" in text else text)
    text = re.sub(r"[ \t\r\f\v\u00a0]+\n", "\n", text.replace("\r\n", "\n").replace("\r", "\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n ") + "\n"


def stopword_counts(text: str) -> dict[str, int]:
    """Words of ``text`` in each language's stop-word list, and the total (``"words"``)."""
    words = re.findall(r"\w+", text.lower())
    counts = {lang: sum(w in sw for w in words) for lang, sw in STOPWORDS.items()}
    return {**counts, "words": len(words)}


def language_ok(text: str, lang: str) -> bool:
    """Prose of ``lang``: its stop words are >= MIN_STOPWORD_SHARE of the words and >= 3x
    those of every other language."""
    c = stopword_counts(text)
    others = max(c[o] for o in STOPWORDS if o != lang)
    return c[lang] >= MIN_STOPWORD_SHARE * max(c["words"], 1) and c[lang] >= 3 * others


def near_duplicate_key(text: str) -> str:
    """Lower case, letters and digits only, every digit run as ``0``: texts that differ only
    in case, punctuation, whitespace or numbers (versions, dates) share a key."""
    return re.sub(r"\d+", "0", re.sub(r"[\W_]+", "", text.lower()))


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=12).digest()


class Deduplicator:
    """Drops whole documents seen before and paragraphs (>= MIN_DEDUP_CHARS) seen before."""

    def __init__(self) -> None:
        self.docs: set[bytes] = set()
        self.paragraphs: set[bytes] = set()
        self.dropped_docs = 0
        self.dropped_paragraphs = 0

    def __call__(self, text: str) -> str:
        """``text`` without its repeated paragraphs ("" when the whole document repeats)."""
        key = _digest(near_duplicate_key(text))
        if key in self.docs:
            self.dropped_docs += 1
            return ""
        self.docs.add(key)
        kept = []
        for para in text.split("\n\n"):
            if len(para) >= MIN_DEDUP_CHARS:
                pkey = _digest(near_duplicate_key(para))
                if pkey in self.paragraphs:
                    self.dropped_paragraphs += 1
                    continue
                self.paragraphs.add(pkey)
            kept.append(para)
        return "\n\n".join(kept).strip("\n") + "\n" if kept else ""


def split_of(source: str, doc_name: str, val_percent: float) -> str:
    """``"val"`` for about ``val_percent`` % of documents (by a hash of source and name)."""
    h = int.from_bytes(hashlib.sha256(f"{source}:{doc_name}".encode()).digest()[:8], "big")
    return "val" if h % 10000 < round(val_percent * 100) else "train"


# ---------------------------------------------------------------- Debian packages


def deb_members(deb: bytes) -> dict[str, bytes]:
    """Members of a ``.deb`` (an ``ar`` archive): name -> contents."""
    if not deb.startswith(b"!<arch>\n"):
        raise ValueError("not a Debian package (no ar magic)")
    members, pos = {}, 8
    while pos + 60 <= len(deb):
        header = deb[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        members[name] = deb[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
    return members


def deb_files(deb: bytes) -> Iterator[tuple[str, bytes]]:
    """(path without the leading ``./``, contents) of every regular file in the package."""
    data = next(v for k, v in deb_members(deb).items() if k.startswith("data.tar"))
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for m in tar:
            if m.isfile():
                yield "/" + m.name.removeprefix("./"), tar.extractfile(m).read()


def deb_field(deb: bytes, field: str) -> str:
    """A field of the package's ``control`` file (e.g. ``Version``)."""
    control = next(v for k, v in deb_members(deb).items() if k.startswith("control.tar"))
    with tarfile.open(fileobj=io.BytesIO(control), mode="r:*") as tar:
        text = tar.extractfile("./control").read().decode()
    match = re.search(rf"^{field}: (.*)$", text, flags=re.MULTILINE)
    return match.group(1).strip() if match else ""


def licences(copyright_text: str) -> list[str]:
    """Licence names of a Debian copyright file: the ``License:`` fields of a machine-readable
    (DEP-5) file; otherwise the licences it names from a known list."""
    names = sorted({m.strip() for m in re.findall(r"^License: *(\S.*)$", copyright_text, re.M)})
    if names:
        return names
    known = ("GPL", "LGPL", "GFDL", "BSD", "MIT", "Artistic", "Apache", "public domain",
             "Creative Commons", "CC-BY", "MPL", "PSF", "PostgreSQL")  # fmt: skip
    return [k for k in known if k.lower() in copyright_text.lower()] or ["see copyright file"]


def download(packages: list[str], cache: Path) -> dict[str, Path]:
    """``apt-get download`` each package not in ``cache`` yet; package -> ``.deb`` path."""
    cache.mkdir(parents=True, exist_ok=True)

    def found() -> dict[str, Path]:
        return {p: next(iter(sorted(cache.glob(f"{p}_*.deb"))), None) for p in packages}

    missing = [p for p, f in found().items() if f is None]
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=cache, check=True)
    result = found()
    if any(f is None for f in result.values()):
        raise SystemExit(f"could not download {[p for p, f in result.items() if f is None]}")
    return result


# ---------------------------------------------------------------- the build


def source_documents(src: Source, deb: bytes) -> tuple[list[tuple[str, str]], str]:
    """(document name, raw text) of every file ``src`` selects in the package, in path
    order, and the package's copyright file (one pass over the package)."""
    pattern = re.compile(src.pattern)
    exclude = re.compile(src.exclude) if src.exclude else None
    selected, copyright_data = [], b""
    for path, data in deb_files(deb):
        if path == f"/usr/share/doc/{src.package}/copyright":
            copyright_data = data
        if pattern.search(path) and not (exclude and exclude.search(path)):
            selected.append((path, data))
    docs = [
        (f"{path}#{i}", doc)
        for path, data in sorted(selected)
        for i, doc in enumerate(CONVERTERS[src.fmt](decode_text(_decompress(path, data))))
    ]
    return docs, decode_text(copyright_data)


def build(
    debs: dict[str, bytes],
    out: Path,
    *,
    sources: tuple[Source, ...] = SOURCES,
    val_percent: float = 2.0,
) -> dict:
    """Convert, filter, deduplicate and split every source; write ``out/<lang>/<split>/``,
    ``out/licenses/`` and ``out/MANIFEST.json``. Returns the manifest."""
    manifest: dict = {"sources": [], "sizes": {}, "settings": {
        "val_percent": val_percent, "min_stopword_share": MIN_STOPWORD_SHARE,
        "min_dedup_chars": MIN_DEDUP_CHARS, "min_doc_bytes": MIN_DOC_BYTES,
    }}  # fmt: skip
    (out / "licenses").mkdir(parents=True, exist_ok=True)
    for lang in LANGS:
        for split in SPLITS:
            (out / lang / split).mkdir(parents=True, exist_ok=True)
    dedup = {lang: Deduplicator() for lang in LANGS}
    for src in sources:
        deb = debs[src.package]
        docs, copyright_text = source_documents(src, deb)
        (out / "licenses" / f"{src.package}.copyright").write_text(copyright_text)
        stats = {"files_docs": 0, "language_dropped": 0, "kept": 0, "bytes": 0}
        for doc_name, raw in docs:
            stats["files_docs"] += 1
            text = normalize(raw)
            if not language_ok(text, src.lang):
                stats["language_dropped"] += 1
                continue
            text = dedup[src.lang](text)
            if len(text.encode("utf-8")) < MIN_DOC_BYTES:
                continue
            split = split_of(src.name, doc_name, val_percent)
            name = f"{src.name}-{stats['kept']:06d}.txt"
            (out / src.lang / split / name).write_text(text, encoding="utf-8")
            stats["kept"] += 1
            stats["bytes"] += len(text.encode("utf-8"))
        manifest["sources"].append({
            **dataclasses.asdict(src), "version": deb_field(deb, "Version"),
            "deb_sha256": hashlib.sha256(deb).hexdigest(), "licences": licences(copyright_text),
            "copyright_file": f"licenses/{src.package}.copyright", **stats,
        })  # fmt: skip
        print(f"{src.name:24s} {src.lang} {stats['kept']:6d} docs {stats['bytes'] / 1e6:8.2f} MB "
              f"({stats['files_docs']} read, {stats['language_dropped']} not {src.lang})",
              flush=True)  # fmt: skip
    for lang, d in dedup.items():
        manifest[f"dedup_{lang}"] = {"docs": d.dropped_docs, "paragraphs": d.dropped_paragraphs}
    files = sorted(p for lang in LANGS for p in (out / lang).rglob("*.txt"))
    manifest["sizes"] = {
        f"{lang}/{split}": sum(p.stat().st_size for p in (out / lang / split).glob("*.txt"))
        for lang in LANGS
        for split in SPLITS
    }
    manifest["sha256"] = tree_hash(out, files)
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def tree_hash(root: Path, files: list[Path]) -> str:
    """SHA-256 over (relative path, NUL, contents, NUL) of ``files`` in sorted order."""
    h = hashlib.sha256()
    for p in sorted(files):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def pack(out: Path, archive: Path, max_mb: float) -> dict:
    """xz-compressed tar of ``out`` (as ``corpus/...``): val splits whole, train files in a
    fixed hash order while the train text stays under ``max_mb`` MB; returns what it packed."""
    val = sorted(p for lang in LANGS for p in (out / lang / "val").glob("*.txt"))
    train = sorted(
        (p for lang in LANGS for p in (out / lang / "train").glob("*.txt")),
        key=lambda p: hashlib.sha256(str(p.relative_to(out)).encode()).digest(),
    )
    chosen, total = [], 0
    for p in train:
        size = p.stat().st_size
        if total + size > max_mb * 1e6:
            continue
        chosen.append(p)
        total += size
    files = sorted(val + chosen)
    packed = {
        "train_bytes": total,
        "files": len(files),
        "max_mb": max_mb,
        "sizes": {
            f"{lang}/{split}": sum(
                f.stat().st_size for f in files if f.parent == out / lang / split
            )
            for lang in LANGS
            for split in SPLITS
        },
        "sha256": tree_hash(out, files),
    }
    archive.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(archive, "wb", preset=6) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
        for p in [*files, out / "MANIFEST.json", *sorted((out / "licenses").iterdir())]:
            tar.add(p, arcname=f"corpus/{p.relative_to(out)}")
        info = json.dumps(packed, indent=1).encode()
        member = tarfile.TarInfo("corpus/PACKED.json")
        member.size = len(info)
        tar.addfile(member, io.BytesIO(info))
    return packed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data/corpus", help="output directory")
    p.add_argument("--cache", default="data/debs", help="where the downloaded .deb files stay")
    p.add_argument("--val-percent", type=float, default=2.0)
    p.add_argument("--pack", default=None, metavar="FILE.tar.xz", help="also write an archive")
    p.add_argument("--max-mb", type=float, default=160.0, help="train text in the archive (MB)")
    p.add_argument("--langs", default=",".join(LANGS), help="build only these languages")
    args = p.parse_args()

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; remove it first (the build writes it whole)")
    sources = tuple(s for s in SOURCES if s.lang in args.langs.split(","))
    paths = download(sorted({s.package for s in sources}), Path(args.cache))
    debs = {name: path.read_bytes() for name, path in paths.items()}
    manifest = build(debs, out, sources=sources, val_percent=args.val_percent)
    for key, size in manifest["sizes"].items():
        print(f"{key:10s} {size / 1e6:9.2f} MB")
    print(f"sha256 {manifest['sha256']}")
    if args.pack:
        packed = pack(out, Path(args.pack), args.max_mb)
        mb = Path(args.pack).stat().st_size / 2**20
        print(f"packed {packed['files']} files ({packed['sizes']}) into {args.pack}: {mb:.1f} MiB,"
              f" sha256 of the packed files {packed['sha256']}")  # fmt: skip


if __name__ == "__main__":
    main()
