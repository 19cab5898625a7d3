"""The one guarded reader for every small file minidit opens: configs, tokenizer files, prompt files, PNG records,
safetensors headers, the tiny model's cache manifest (the tensors themselves stream through loading.py).

    text = read_text(path, "--prompt-file", LIMITS["prompts"])
    cfg = read_json(path, "scheduler config")                  # a JSON object, or one named error
    for line in read_lines(path, "--prompt-file"): ...         # constant memory, whatever the file's length
    digest = sha256(path, "--image")

The rules are the loader's: only a regular file is opened (symlinks followed); a FIFO, device, socket or directory
is refused from its `stat`, never opened (opening a FIFO blocks until a writer comes; /dev/zero never ends), and
the opened file is `fstat`-ed again, so a file swapped for a FIFO in between is refused too. Each kind of file has
a size limit (`LIMITS`), checked before reading and enforced while reading, so a JSON config of gigabytes costs
nothing. Every failure is one `FileError` (a ValueError) naming the file: "what path: problem".
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

# bytes per kind of file: far above any real one, far below what could exhaust memory
LIMITS = {
    "json": 64 << 20,        # configs, shard indexes, tokenizer.json (FLUX.1's is 2.4 MB), the cache manifest
    "text": 64 << 20,        # merges.txt, a ref file
    "tokenizer": 64 << 20,   # spiece.model (FLUX.1's is 0.8 MB)
    "prompts": 1 << 30,      # a prompt file is streamed line by line; this only bounds the time to count it
    "png": 1 << 30,          # a --from-png image (only its text chunks are read)
    "image": 1 << 30,        # an input image or mask hashed for the record
    "header": 100 << 20,     # a safetensors header (the format's own limit)
}
MAX_LINE = 1 << 20           # one prompt line: 1 MiB of text
CHUNK = 1 << 20


def size_text(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n} bytes"


class FileError(ValueError):
    """A file minidit was asked to read is missing, not a regular file, too large or unreadable."""


def regular(path: str | Path, what: str, limit: int | None = None, error: type[Exception] = FileError) -> int:
    """The size of `path` after checking, from `stat` alone, that it is a regular file of at most `limit` bytes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except OSError as e:
        raise error(f"{what} {path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path}: not a regular file (a directory, FIFO or device is refused)")
    if limit is not None and st.st_size > limit:
        raise error(f"{what} {path}: {st.st_size} bytes, more than the {size_text(limit)} such a file may have; refused")
    return st.st_size


def open_regular(path: str | Path, what: str, limit: int | None = None, error: type[Exception] = FileError):
    """An open binary file, checked regular (and within `limit`) from stat before opening and from fstat after:
    the open itself never blocks (O_NONBLOCK), so a FIFO put in place between the two is refused, not waited on."""
    regular(path, what, limit, error)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(f"{what} {path}: cannot read ({e.strerror or e})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (limit is not None and st.st_size > limit):
        os.close(fd)
        raise error(f"{what} {path}: not a regular file of at most {limit} bytes (it changed while opening)")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_bytes(path: str | Path, what: str, limit: int = LIMITS["json"], error: type[Exception] = FileError) -> bytes:
    """The whole file, at most `limit` bytes (a file that grows past it while being read is refused too)."""
    with open_regular(path, what, limit, error) as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise error(f"{what} {path}: cannot read ({e.strerror or e})") from None
    if len(data) > limit:
        raise error(f"{what} {path}: more than the {size_text(limit)} such a file may have; refused")
    return data


def read_text(path: str | Path, what: str, limit: int = LIMITS["text"], error: type[Exception] = FileError) -> str:
    """The file as UTF-8 text."""
    try:
        return read_bytes(path, what, limit, error).decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json(path: str | Path, what: str = "config", limit: int = LIMITS["json"],
              error: type[Exception] = FileError) -> dict:
    """A JSON object (a dict) from the file; invalid, too deeply nested or not an object is one named error."""
    text = read_text(path, what, limit, error)
    try:
        d = json.loads(text)
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, and integers of more than 4300 digits
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise error(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def read_lines(path: str | Path, what: str, limit: int = LIMITS["prompts"], max_line: int = MAX_LINE,
               error: type[Exception] = FileError) -> Iterator[str]:
    """Each line of a UTF-8 text file (without its line break), read in constant memory: at most `max_line`
    bytes per line."""
    with open_regular(path, what, limit, error) as f:
        number = 0
        while True:
            try:
                raw = f.readline(max_line + 1)
            except OSError as e:
                raise error(f"{what} {path}: cannot read ({e.strerror or e})") from None
            if not raw:
                return
            number += 1
            if len(raw) > max_line:
                raise error(f"{what} {path}: line {number} is longer than {size_text(max_line)}")
            try:
                yield raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise error(f"{what} {path}: line {number} is not UTF-8 text ({e.reason})") from None


def sha256(path: str | Path, what: str, limit: int = LIMITS["image"], error: type[Exception] = FileError) -> str:
    """SHA-256 (hex) of the whole file, read in chunks."""
    h = hashlib.sha256()
    with open_regular(path, what, limit, error) as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def safetensors_header(path: str | Path, what: str = "checkpoint", error: type[Exception] = FileError) -> bytes:
    """The JSON header of a .safetensors file (its first 8 bytes give the length), at most LIMITS["header"]."""
    with open_regular(path, what, None, error) as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 <= n <= LIMITS["header"]:
            raise error(f"{what} {path}: not a safetensors file (header length {n})")
        data = f.read(n)
    if len(data) != n:
        raise error(f"{what} {path}: truncated safetensors header")
    return data
