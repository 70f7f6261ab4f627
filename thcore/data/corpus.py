"""Reading corpora of any size, and writing prepared directories that a run never sees half-written.

Inputs are named as a file, a directory (every file under it, in sorted order) or a glob; files ending in .gz
are decompressed on the fly, and .jsonl / .ndjson files (the shape Hugging Face datasets export) are JSON Lines
whose records carry their text in one field. Everything is read in blocks: memory does not grow with the input.
"""
import codecs
import glob
import gzip
import hashlib
import json
import os
import shutil
import sys

from ..config import ConfigError

BLOCK = 1 << 22   # bytes read at a time (4 MiB)
JSONL = (".jsonl", ".ndjson")


def expand(spec: str, field: str = "input") -> list[str]:
    """The files `spec` names: itself, the files under a directory, or the files a glob matches (sorted)."""
    if os.path.isfile(spec):
        return [spec]
    if os.path.isdir(spec):
        files = []
        for root, dirs, names in os.walk(spec):
            dirs[:] = [d for d in dirs if not d.startswith(".")]   # .git, a prepare's .partial-*
            files += [os.path.join(root, f) for f in names if not f.startswith(".")]
        if not files:
            raise ConfigError(f"{field}: {spec}: directory holds no files")
        return sorted(files)
    if glob.has_magic(spec):
        files = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not files:
            raise ConfigError(f"{field}: {spec}: no file matches")
        return files
    raise ConfigError(f"{field}: file not found: {spec}")


def is_jsonl(path: str) -> bool:
    name = path[:-3] if path.endswith(".gz") else path
    return name.endswith(JSONL)


class Reader:
    """Binary blocks of one file (decompressed when it ends in .gz), counting the bytes read from disk (for the
    progress bar) and hashing them (the source's sha256 in meta.json)."""

    def __init__(self, path: str, hasher=None, on_bytes=None):
        self.path, self.hasher, self.on_bytes = path, hasher, on_bytes
        self.raw = open(path, "rb")
        self.f = gzip.GzipFile(fileobj=_Tap(self.raw, self._tap), mode="rb") if path.endswith(".gz") else None

    def _tap(self, data: bytes):
        if self.hasher is not None:
            self.hasher.update(data)
        if self.on_bytes is not None:
            self.on_bytes(len(data))

    def blocks(self, size: int = 0):
        size = size or BLOCK
        try:
            while True:
                if self.f is not None:
                    try:
                        b = self.f.read(size)
                    except (OSError, EOFError) as e:
                        raise ConfigError(f"input: {self.path}: not a readable gzip file ({e})") from None
                else:
                    b = self.raw.read(size)
                    self._tap(b)
                if not b:
                    return
                yield b
        finally:
            self.raw.close()

    def lines(self):
        """Binary lines without their b"\\n" (a final newline ends the last line), as bytes.split(b"\\n")."""
        tail = b""
        for b in self.blocks():
            parts = (tail + b).split(b"\n")
            tail = parts.pop()
            yield from parts
        if tail:
            yield tail


class _Tap:
    """A file object that reports every block read through it (the compressed bytes under a GzipFile)."""

    def __init__(self, f, report):
        self.f, self.report = f, report

    def read(self, n=-1):
        b = self.f.read(n)
        self.report(b)
        return b

    def __getattr__(self, name):
        return getattr(self.f, name)


def text_blocks(reader: Reader, field: str = "input"):
    """The UTF-8 text of a file in blocks (a character is never cut); a bad byte is named by its offset."""
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    seen = 0
    for b in reader.blocks():
        try:
            text = dec.decode(b)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{field}: {reader.path}: not valid UTF-8 at byte {seen + e.start}") from None
        seen += len(b)
        if text:
            yield text
    try:
        dec.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ConfigError(f"{field}: {reader.path}: not valid UTF-8 at its end (a cut character)") from None


def jsonl_texts(reader: Reader, text_field: str, field: str = "input"):
    """The `text_field` string of every non-blank line of a JSON Lines file; a bad line is named path:line."""
    for i, b in enumerate(reader.lines(), 1):
        if not b.strip():
            continue
        try:
            rec = json.loads(b)
        except (UnicodeDecodeError, ValueError) as e:
            raise ConfigError(f"{field}: {reader.path}:{i}: not a JSON object ({str(e).splitlines()[0]})") from None
        text = rec.get(text_field) if isinstance(rec, dict) else None
        if not isinstance(text, str):
            raise ConfigError(f"{field}: {reader.path}:{i}: no string field {text_field!r} "
                              "(name the text with --text_field)")
        yield text


def sha256():
    return hashlib.sha256()


class Staging:
    """Files are written into a hidden directory inside `out`, then moved into `out` one by one with meta.json
    last, after the old meta.json is removed: a run reads meta.json first, so an interrupted prepare leaves a
    directory that no run reads (and no half-written file under a final name)."""

    META = "meta.json"

    def __init__(self, out: str):
        self.out, self.made = out, []   # the directories made here: removed again (when empty) after a failure
        d = os.path.abspath(out)
        while not os.path.exists(d):
            self.made.append(d)
            d = os.path.dirname(d)
        os.makedirs(out, exist_ok=True)
        self.dir = os.path.join(out, f".partial-{os.getpid()}")
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def commit(self, meta: dict):
        with open(self.path(self.META), "w") as f:
            json.dump(meta, f, indent=1)
        final = os.path.join(self.out, self.META)
        if os.path.exists(final):
            os.remove(final)
        names = sorted(os.listdir(self.dir), key=lambda n: n == self.META)   # meta.json last
        for name in names:
            os.replace(self.path(name), os.path.join(self.out, name))
        os.rmdir(self.dir)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        shutil.rmtree(self.dir, ignore_errors=True)   # after a failure; after commit it is gone already
        if exc[0] is not None:
            for d in self.made:   # deepest first
                if os.path.isdir(d) and not os.listdir(d):
                    os.rmdir(d)


def progress(total: int, desc: str, enabled: bool = True, unit: str = "B"):
    """A progress bar on stderr (bytes: MB/s), or a silent stand-in."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000,
                file=sys.stderr,
                disable=not enabled, mininterval=1.0, dynamic_ncols=True)
