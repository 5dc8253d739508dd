"""Reading C4-style JSON-lines shards (`.json`, `.jsonl`, `.json.gz`) without trusting them.

Input is streamed in chunks of lines, so memory stays flat however large the shards are. Bad
input never raises: each bad line or file becomes a skip with a reason and a `file:line`,
counted by `SkipLog`. The reasons:

    malformed_json   the line is not a JSON object
    missing_key      a requested key is absent or not a string
    non_utf8         the bytes are not UTF-8 (or the JSON escapes a lone surrogate)
    empty_text       a requested key holds only whitespace, or gives no tokens
    truncated_gzip   the gzip stream ends early (the lines before the cut are kept)
    corrupt_gzip     the gzip data is damaged or not gzip at all
    unreadable_file  the file cannot be opened or read

Blank lines are not documents and are passed over silently.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import itertools
import json
import os
import zlib

SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
REASONS = (
    "malformed_json", "missing_key", "non_utf8", "empty_text",
    "truncated_gzip", "corrupt_gzip", "unreadable_file",
)


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files named by `--input`: files, globs (sorted) and directories (their JSON files, sorted).

    A pattern that matches nothing is a configuration error, raised before any work starts.
    Directory entries are taken by name, so one that vanishes or cannot be opened later is
    counted as `unreadable_file` rather than silently dropped.
    """
    files: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(
                e.path for e in os.scandir(pattern) if e.name.endswith(SUFFIXES) and not e.is_dir()
            )
            if not found:
                raise ValueError(f"--input {pattern}: directory holds no {', '.join(SUFFIXES)} files")
        elif glob.has_magic(pattern):
            found = sorted(glob.glob(pattern))
            if not found:
                raise ValueError(f"--input {pattern}: no file matches")
        elif os.path.lexists(pattern):
            found = [pattern]
        else:
            raise ValueError(f"--input {pattern}: no such file or directory")
        files.extend(found)
    return files


@dataclasses.dataclass
class Chunk:
    """Consecutive whole lines of one file, the unit of work handed to a tokenizing worker.

    The lines travel as one block of bytes: cheap to pass between processes, and the worker,
    not the reading process, pays for splitting them.
    """

    path: str
    file_index: int
    data: bytes  # whole lines, each ending in a newline except perhaps the file's last
    first_line: int  # line number of the first line in `data`
    skips: list[tuple[str, str]]  # (reason, "file:line") found while reading, after these lines
    position: int  # input bytes consumed so far over all files (compressed for .gz), for the ETA
    opened: bool = True  # False when the file could not be opened at all
    end_of_file: bool = False

    def lines(self):
        """(line number, line without its newline) for each line."""
        lines = self.data.split(b"\n")
        if not lines[-1]:
            lines.pop()
        return zip(itertools.count(self.first_line), lines)


def read_chunks(files: list[str], chunk_bytes: int = 1 << 20):
    """Yields `Chunk`s of about `chunk_bytes` of whole lines, in input order; every file ends with
    a chunk that has `end_of_file` set (an empty or unreadable file yields just that one)."""
    done_bytes = 0
    for index, path in enumerate(files):
        buf = bytearray()
        first_line = 1
        skip = None
        raw = None
        try:
            raw = open(path, "rb")
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw
            # read1 hands over what has been decompressed so far, so a stream that breaks off
            # costs only the line it breaks off in.
            while piece := stream.read1(chunk_bytes):
                buf += piece
                cut = buf.rfind(b"\n") + 1 if len(buf) >= chunk_bytes else 0
                if cut:
                    data = bytes(buf[:cut])
                    del buf[:cut]
                    yield Chunk(path, index, data, first_line, [], done_bytes + raw.tell())
                    first_line += data.count(b"\n")
        except EOFError:
            skip = ("truncated_gzip", None)
        except (gzip.BadGzipFile, zlib.error):
            skip = ("corrupt_gzip", None)
        except OSError as e:
            skip = ("unreadable_file", e.strerror or str(e))
        finally:
            if raw is not None:
                raw.close()
        skips = []
        if skip:  # keep the whole lines read before the failure, drop the broken one
            del buf[buf.rfind(b"\n") + 1 :]
            reason, detail = skip
            lineno = first_line + buf.count(b"\n")
            where = f"{path}:{lineno}"
            skips.append((reason, f"{where} ({detail})" if detail else where))
        done_bytes += _size_or_zero(path)
        yield Chunk(path, index, bytes(buf), first_line, skips, done_bytes, opened=raw is not None, end_of_file=True)


def total_input_bytes(files: list[str]) -> int:
    return sum(_size_or_zero(p) for p in files)


def _size_or_zero(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def parse_line(raw: bytes, keys: tuple[str, ...]) -> tuple[str, ...] | str | None:
    """The texts under `keys` of one JSON line; a reason string if the line is bad; None if blank."""
    if not raw.strip():
        return None
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "non_utf8"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return "malformed_json"
    if not isinstance(obj, dict):
        return "malformed_json"
    texts = []
    for key in keys:
        text = obj.get(key)
        if not isinstance(text, str):
            return "missing_key"
        try:
            text.encode("utf-8")  # fails only on a lone surrogate, which JSON can escape into a str
        except UnicodeEncodeError:
            return "non_utf8"
        if not text.strip():
            return "empty_text"
        texts.append(text)
    return tuple(texts)


class SkipLog:
    """Skipped lines counted by reason, with the first few `file:line` of each."""

    def __init__(self, examples: int = 3):
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)
        self._keep = examples

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < self._keep:
            self.examples[reason].append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def lines(self) -> list[str]:
        """One summary line per reason, e.g. `malformed_json: 2 (a.jsonl:3, a.jsonl:9)`."""
        return [
            f"{reason}: {self.counts[reason]} ({', '.join(self.examples[reason])}"
            f"{', ...' if self.counts[reason] > len(self.examples[reason]) else ''})"
            for reason in REASONS
            if self.counts[reason]
        ]
