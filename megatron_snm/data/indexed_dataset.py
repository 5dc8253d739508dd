"""Token shards on disk: Megatron's MMIDIDX `.bin`/`.idx` pair, read through numpy memmaps.

Byte-compatible with Megatron-LM / megatron-core (`IndexedDataset`, `IndexedDatasetBuilder`),
so either side reads what the other wrote. The `.idx` layout, all little-endian:

    magic            9 bytes   b"MMIDIDX\\x00\\x00"
    version          uint64    1
    dtype code       uint8     see DTYPE_CODES
    sequence count   uint64    S
    document count   uint64    D + 1 (document_indices has a leading 0)
    sequence_lengths int32[S]  tokens per sequence
    sequence_pointers int64[S] byte offset of each sequence in the .bin
    document_indices int64[D+1] sequence index where each document starts, then S

The `.bin` is the token ids of every sequence back to back. A document is one or more
sequences (preprocessing writes one sequence per document unless it splits sentences).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
import time
from typing import Iterable

import numpy as np

from megatron_snm import atomic
from megatron_snm.data import tokenizer_description
from megatron_snm.data.errors import DataError
from megatron_snm.data.tokenizer_description import description_path

logger = logging.getLogger(__name__)

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")


# The data layer's one error type; this name stays for the callers that know it.
IndexedDatasetError = DataError

# Index entries checked per step at open: bounded memory on indices of billions of entries.
_VALIDATE_CHUNK = 1 << 24


def best_token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (Megatron's rule: vocab under 65,500), else int32."""
    return np.dtype(np.uint16) if vocab_size is not None and vocab_size < 65500 else np.dtype(np.int32)


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def exists(prefix: str) -> bool:
    return os.path.isfile(bin_path(prefix)) and os.path.isfile(idx_path(prefix))


class _Progress:
    """A log line with rate and ETA every 10 s, for checks that take that long (huge indices)."""

    def __init__(self, verb: str, path: str, total: int):
        self.verb, self.path, self.total = verb, path, total
        self.start = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last >= 10 and done < self.total:
            self.last = now
            rate = done / (now - self.start)
            logger.info("%s: %s %.0f%% (%.3g entries/s, ETA %.0f s)", self.path, self.verb,
                        100 * done / self.total, rate, (self.total - done) / rate)


def sequence_pointers(lengths: np.ndarray, dtype) -> np.ndarray:
    """Byte offset of each sequence in the .bin: int64 throughout, so corpora past 2^31 tokens
    or bytes do not wrap."""
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= np.dtype(dtype).itemsize
    return pointers


class IndexedDataset:
    """Read-only, zero-copy view of `prefix.bin`/`prefix.idx`.

    `ds[i]` is sequence i as a numpy array backed by the memmap; `ds.get(i, offset, length)`
    is a window of it, `ds.get_document(d, offset, length)` a window of document d.
    `sequence_lengths`, `sequence_pointers` and `document_indices` are the index arrays.
    Opening validates the whole index against itself and the `.bin` (vectorised, in chunks) and
    raises DataError naming the file and the first inconsistent entry.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for path in (ipath, bpath):
            if not os.path.isfile(path):
                raise DataError(f"{path}: no such file (dataset prefix {prefix!r})")

        idx_size = os.path.getsize(ipath)
        if idx_size < _HEADER.size:
            raise DataError(f"{ipath}: truncated index ({idx_size} bytes, header needs {_HEADER.size})")
        with open(ipath, "rb") as f:
            magic, version, code, n_seq, n_doc = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            raise DataError(f"{ipath}: not an MMIDIDX index (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise DataError(f"{ipath}: unsupported index version {version} (expected {VERSION})")
        if code not in DTYPE_CODES:
            raise DataError(f"{ipath}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])

        need = _HEADER.size + n_seq * 4 + n_seq * 8 + n_doc * 8
        if idx_size < need:
            raise DataError(
                f"{ipath}: truncated index ({idx_size} bytes, {n_seq} sequences and {n_doc} document "
                f"entries need {need})"
            )
        if idx_size > need:
            raise DataError(
                f"{ipath}: {idx_size - need} bytes after the end of the index ({n_seq} sequences and {n_doc} "
                f"document entries fill {need}): corrupt, or not written by a Megatron-format writer"
            )
        self._idx = np.memmap(ipath, mode="r", dtype=np.uint8)
        off = _HEADER.size
        self.sequence_lengths = np.frombuffer(self._idx, dtype=np.int32, count=n_seq, offset=off)
        off += n_seq * 4
        self.sequence_pointers = np.frombuffer(self._idx, dtype=np.int64, count=n_seq, offset=off)
        off += n_seq * 8
        self.document_indices = np.frombuffer(self._idx, dtype=np.int64, count=n_doc, offset=off)

        bin_size = os.path.getsize(bpath)
        if bin_size % self.dtype.itemsize:
            raise DataError(
                f"{bpath}: {bin_size} bytes is not a whole number of {self.dtype} tokens "
                f"({self.dtype.itemsize} bytes each): truncated, or not the data of {ipath}"
            )
        end = self._validate_sequences()
        if end > bin_size:
            raise DataError(
                f"{bpath}: truncated or mismatched data file ({bin_size} bytes, index {ipath} points to byte {end})"
            )
        if end < bin_size:
            raise DataError(
                f"{bpath}: mismatched data file ({bin_size} bytes, index {ipath} describes {end}): "
                "the .bin and .idx come from different runs"
            )
        self._validate_documents()
        # np.memmap cannot map an empty file; an empty dataset has nothing to read anyway.
        self._bin = np.memmap(bpath, mode="r", dtype=np.uint8) if bin_size else np.empty(0, np.uint8)
        self._content_hash = None

    def _validate_sequences(self) -> int:
        """Checks every length is >= 0 and every pointer is the sum of the lengths before it (the
        writer lays the sequences out back to back); returns the byte where the data ends."""
        ipath, item = idx_path(self.prefix), self.dtype.itemsize
        lengths, pointers = self.sequence_lengths, self.sequence_pointers
        progress, end = _Progress("validating", ipath, len(lengths)), 0
        for start in range(0, len(lengths), _VALIDATE_CHUNK):
            chunk = lengths[start : start + _VALIDATE_CHUNK].astype(np.int64)
            negative = np.flatnonzero(chunk < 0)
            if negative.size:
                i = int(negative[0])
                raise DataError(f"{ipath}: corrupt index: sequence {start + i} has length {chunk[i]}")
            expected = np.empty_like(chunk)
            expected[0] = end
            np.cumsum(chunk[:-1] * item, out=expected[1:])
            expected[1:] += end
            wrong = np.flatnonzero(pointers[start : start + _VALIDATE_CHUNK] != expected)
            if wrong.size:
                i = int(wrong[0])
                raise DataError(
                    f"{ipath}: corrupt index: sequence {start + i} starts at byte {pointers[start + i]}, but the "
                    f"lengths before it place it at byte {expected[i]}"
                )
            end = int(expected[-1] + chunk[-1] * item)
            progress.update(start + len(chunk))
        return end

    def _validate_documents(self) -> None:
        """Document indices: start at 0, never decrease, end at the sequence count."""
        ipath, docs, n_seq = idx_path(self.prefix), self.document_indices, len(self.sequence_lengths)
        if len(docs) < 1 or docs[0] != 0:
            raise DataError(f"{ipath}: corrupt index: document indices must start with 0 (found {docs[:1].tolist()})")
        for start in range(0, len(docs), _VALIDATE_CHUNK):
            chunk = docs[start : start + _VALIDATE_CHUNK + 1]  # one entry of overlap with the next chunk
            outside = np.flatnonzero(chunk > n_seq)
            if outside.size:
                i = start + int(outside[0])
                raise DataError(f"{ipath}: corrupt index: document {i} starts at sequence {docs[i]} of {n_seq}")
            falling = np.flatnonzero(np.diff(chunk) < 0)
            if falling.size:
                i = start + int(falling[0]) + 1
                raise DataError(
                    f"{ipath}: corrupt index: document {i} starts at sequence {docs[i]}, before document "
                    f"{i - 1} (sequence {docs[i - 1]})"
                )
        if docs[-1] != n_seq:
            raise DataError(f"{ipath}: document indices do not cover the {n_seq} sequences (they end at {docs[-1]})")

    @property
    def content_hash(self) -> str:
        """SHA-256 of the `.idx` file: names the exact document layout (caches key on it)."""
        if self._content_hash is None:
            digest, step = hashlib.sha256(), _VALIDATE_CHUNK * 8
            progress = _Progress("hashing", idx_path(self.prefix), len(self._idx))
            for start in range(0, len(self._idx), step):
                digest.update(self._idx[start : start + step])
                progress.update(start + step)
            self._content_hash = digest.hexdigest()
        return self._content_hash

    def max_token_id(self, chunk_tokens: int = 1 << 26) -> int:
        """The largest token id in the `.bin` (-1 if empty): a full scan, in chunks, with a
        progress log line every few seconds on large files."""
        tokens = np.frombuffer(self._bin, dtype=self.dtype)
        best, progress = -1, _Progress("scanning token ids", bin_path(self.prefix), len(tokens))
        for start in range(0, len(tokens), chunk_tokens):
            best = max(best, int(tokens[start : start + chunk_tokens].max()))
            progress.update(start + chunk_tokens)
        return best

    # Pickling (DataLoader workers under spawn) reopens the files instead of copying the memmaps.
    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.__init__(state["prefix"])

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return max(len(self.document_indices) - 1, 0)

    @property
    def document_lengths(self) -> np.ndarray:
        """Tokens per document (a document may span several sequences)."""
        if len(self.document_indices) == len(self.sequence_lengths) + 1:
            return self.sequence_lengths  # one sequence per document, the usual layout
        starts = np.zeros(len(self.sequence_lengths) + 1, dtype=np.int64)
        np.cumsum(self.sequence_lengths, out=starts[1:])
        return np.diff(starts[self.document_indices])

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        size = int(self.sequence_lengths[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"{self.prefix}: window [{offset}, {offset + length}) outside sequence {idx} of {size} tokens")
        start = int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, dtype=self.dtype, count=length, offset=start)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return [self.get(i) for i in range(*idx.indices(len(self)))]
        return self.get(int(idx))

    def get_document(self, doc: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of document `doc`, across its sequences (which the
        writer lays out back to back)."""
        first, last = int(self.document_indices[doc]), int(self.document_indices[doc + 1])
        if last - first == 1:
            return self.get(first, offset, length)
        size = int(np.sum(self.sequence_lengths[first:last], dtype=np.int64))
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"{self.prefix}: window [{offset}, {offset + length}) outside document {doc} of {size} tokens")
        if last == first:
            return np.empty(0, self.dtype)
        start = int(self.sequence_pointers[first]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, dtype=self.dtype, count=length, offset=start)


class IndexedDatasetBuilder:
    """Appends sequences to a temporary `.bin`; `finalize()` writes the `.idx` and publishes both.

    Both files are written under temporary names (`atomic.temporary_path`, unique per builder)
    and renamed only by `finalize()` once both are complete, the `.idx` last: an interrupted run
    never leaves a pair that looks complete, and an existing pair stays until the new one is
    whole. Use as a context manager: leaving the block without `finalize()` (an exception, say)
    removes the temporaries. A failed write (full disk) raises DataError naming the output.
    """

    def __init__(self, prefix: str, dtype=np.uint16, tokenizer: dict | None = None):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self.tokenizer = tokenizer  # its description, published with the pair (data/tokenizer_description.py)
        if self.dtype not in _CODE_OF:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        self._bin_tmp = atomic.temporary_path(bin_path(prefix))
        self._idx_tmp = atomic.temporary_path(idx_path(prefix))
        self._description_tmp = atomic.temporary_path(description_path(prefix))
        with self._writing(bin_path(prefix)):
            os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
            self._bin = open(self._bin_tmp, "xb")
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]
        self._finalized = False

    @contextlib.contextmanager
    def _writing(self, path: str):
        try:
            yield
        except OSError as e:
            raise DataError(f"{path}: cannot write ({e.strerror or e}); nothing was written under that name") from e

    def _write(self, data) -> None:
        with self._writing(bin_path(self.prefix)):
            self._bin.write(data)

    def add_item(self, tokens) -> None:
        """One sequence; call `end_document()` after the last sequence of a document."""
        arr = np.asarray(tokens)
        if arr.size and self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            if arr.min() < info.min or arr.max() > info.max:
                raise ValueError(f"token ids [{arr.min()}, {arr.max()}] do not fit {self.dtype}")
        self._write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self.sequence_lengths.append(int(arr.size))

    def end_document(self) -> None:
        self.document_indices.append(len(self.sequence_lengths))

    def add_document(self, tokens, lengths: Iterable[int] | None = None) -> None:
        """A whole document: `tokens` split into sequences of `lengths` (default: one)."""
        arr = np.asarray(tokens)
        if lengths is None:
            self.add_item(arr)
        else:
            start = 0
            for n in lengths:
                self.add_item(arr[start : start + n])
                start += n
        self.end_document()

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def add_index(self, prefix: str, chunk_tokens: int = 1 << 24) -> None:
        """Appends a whole existing dataset (for merging shards), copying its `.bin` in chunks."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"{prefix}: dtype {other.dtype} differs from the output's {self.dtype}")
        nbytes = int(np.sum(other.sequence_lengths, dtype=np.int64)) * self.dtype.itemsize
        step = chunk_tokens * self.dtype.itemsize
        for start in range(0, nbytes, step):
            self._write(other._bin[start : min(start + step, nbytes)].tobytes())
        self._append_layout(other.sequence_lengths.tolist(), other.document_indices[1:].tolist())

    def add_builder(self, other: "IndexedDatasetBuilder", chunk_bytes: int = 1 << 26) -> None:
        """Appends everything another (unfinished) builder holds, e.g. one partition's documents."""
        if other.dtype != self.dtype:
            raise ValueError(f"{other.prefix}: dtype {other.dtype} differs from the output's {self.dtype}")
        with other._writing(bin_path(other.prefix)):
            other._bin.flush()
        with open(other._bin_tmp, "rb") as f:
            while piece := f.read(chunk_bytes):
                self._write(piece)
        self._append_layout(other.sequence_lengths, other.document_indices[1:])

    def _append_layout(self, lengths: list[int], document_ends: list[int]) -> None:
        base = len(self.sequence_lengths)
        self.sequence_lengths.extend(lengths)
        self.document_indices.extend(int(d) + base for d in document_ends)

    def finalize(self, replace: bool = True) -> None:
        """Writes the `.idx` and publishes the pair. With replace=False an existing pair, even
        one that appeared while this builder was writing, is never replaced: DataError."""
        lengths = np.asarray(self.sequence_lengths, dtype=np.int32)
        pointers = sequence_pointers(lengths, self.dtype)
        docs = np.asarray(self.document_indices, dtype=np.int64)
        with self._writing(bin_path(self.prefix)):
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
        with self._writing(idx_path(self.prefix)):
            with open(self._idx_tmp, "xb") as f:
                f.write(_HEADER.pack(MAGIC, VERSION, _CODE_OF[self.dtype], len(lengths), len(docs)))
                f.write(lengths.tobytes(order="C"))
                f.write(pointers.tobytes(order="C"))
                f.write(docs.tobytes(order="C"))
                f.flush()
                os.fsync(f.fileno())
        renames = [(self._bin_tmp, bin_path(self.prefix)), (self._idx_tmp, idx_path(self.prefix))]
        if self.tokenizer is not None:
            with self._writing(description_path(self.prefix)), open(self._description_tmp, "x") as f:
                f.write(tokenizer_description.to_json(self.tokenizer))
            renames.insert(0, (self._description_tmp, description_path(self.prefix)))
        elif replace and os.path.lexists(description_path(self.prefix)):
            # The old dataset's description must not stay beside a new dataset it does not describe.
            with self._writing(description_path(self.prefix)):
                os.remove(description_path(self.prefix))
        with self._writing(f"{self.prefix}.bin/.idx"):
            try:
                atomic.publish_together(renames, replace=replace)
            except FileExistsError as e:
                raise DataError(
                    f"{e.filename}: appeared while this run was writing (another run into the same prefix?); "
                    "left as it is, and this run's output discarded"
                ) from None
        self._finalized = True

    def abort(self) -> None:
        """Removes the temporaries; nothing is left under the final names."""
        if not self._bin.closed:
            try:
                self._bin.close()
            except OSError:  # the buffer could not be flushed (full disk): the file goes anyway
                pass
        for path in (self._bin_tmp, self._idx_tmp, self._description_tmp):
            if os.path.lexists(path):
                os.remove(path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self._finalized:
            self.abort()
        return False


def clear_stale_temporaries(prefix: str, log) -> None:
    """Before writing `prefix`: removes the temporaries a killed run left there (logging each),
    or raises DataError if another running process is writing it."""
    for path in (bin_path(prefix), idx_path(prefix), description_path(prefix)):
        try:
            atomic.clear_stale_temporaries(path, log)
        except atomic.TemporaryInUse as e:
            raise DataError(str(e)) from None
