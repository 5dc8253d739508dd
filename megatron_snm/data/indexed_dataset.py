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

import os
import struct
from typing import Iterable

import numpy as np

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


class IndexedDatasetError(ValueError):
    """A `.bin`/`.idx` pair that is missing, truncated or inconsistent."""


def best_token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (Megatron's rule: vocab under 65,500), else int32."""
    return np.dtype(np.uint16) if vocab_size is not None and vocab_size < 65500 else np.dtype(np.int32)


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def exists(prefix: str) -> bool:
    return os.path.isfile(bin_path(prefix)) and os.path.isfile(idx_path(prefix))


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
    Opening checks what is cheap to check (header, sizes, that the index spans exactly the .bin);
    it does not scan the arrays.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for path in (ipath, bpath):
            if not os.path.isfile(path):
                raise IndexedDatasetError(f"{path}: no such file (dataset prefix {prefix!r})")

        idx_size = os.path.getsize(ipath)
        if idx_size < _HEADER.size:
            raise IndexedDatasetError(f"{ipath}: truncated index ({idx_size} bytes, header needs {_HEADER.size})")
        with open(ipath, "rb") as f:
            magic, version, code, n_seq, n_doc = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            raise IndexedDatasetError(f"{ipath}: not an MMIDIDX index (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise IndexedDatasetError(f"{ipath}: unsupported index version {version} (expected {VERSION})")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{ipath}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])

        need = _HEADER.size + n_seq * 4 + n_seq * 8 + n_doc * 8
        if idx_size < need:
            raise IndexedDatasetError(
                f"{ipath}: truncated index ({idx_size} bytes, {n_seq} sequences and {n_doc} document "
                f"entries need {need})"
            )
        self._idx = np.memmap(ipath, mode="r", dtype=np.uint8)
        off = _HEADER.size
        self.sequence_lengths = np.frombuffer(self._idx, dtype=np.int32, count=n_seq, offset=off)
        off += n_seq * 4
        self.sequence_pointers = np.frombuffer(self._idx, dtype=np.int64, count=n_seq, offset=off)
        off += n_seq * 8
        self.document_indices = np.frombuffer(self._idx, dtype=np.int64, count=n_doc, offset=off)

        bin_size = os.path.getsize(bpath)
        # The writer lays the sequences out back to back, so the index fixes the .bin's size.
        end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize if n_seq else 0
        if n_seq and (self.sequence_pointers[0] != 0 or self.sequence_lengths[-1] < 0):
            raise IndexedDatasetError(f"{ipath}: corrupt index (first pointer or last length out of range)")
        if end > bin_size:
            raise IndexedDatasetError(
                f"{bpath}: truncated or mismatched data file ({bin_size} bytes, index {ipath} points to byte {end})"
            )
        if end < bin_size:
            raise IndexedDatasetError(
                f"{bpath}: mismatched data file ({bin_size} bytes, index {ipath} describes {end}): "
                "the .bin and .idx come from different runs"
            )
        if n_doc < 1 or self.document_indices[0] != 0 or self.document_indices[-1] != n_seq:
            raise IndexedDatasetError(f"{ipath}: document indices do not cover the {n_seq} sequences")
        # np.memmap cannot map an empty file; an empty dataset has nothing to read anyway.
        self._bin = np.memmap(bpath, mode="r", dtype=np.uint8) if bin_size else np.empty(0, np.uint8)

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
    """Appends sequences to `prefix.bin`; `finalize()` writes `prefix.idx`.

    Both files are written under temporary names and renamed only by `finalize()`, the `.idx`
    last, so an interrupted run never leaves a pair that looks complete. Use as a context
    manager: leaving the block without `finalize()` (an exception, say) removes the temporaries.
    """

    def __init__(self, prefix: str, dtype=np.uint16):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        self._tmp_suffix = f".tmp-{os.getpid()}"
        self._bin_tmp = bin_path(prefix) + self._tmp_suffix
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._bin = open(self._bin_tmp, "wb")
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]
        self._finalized = False

    def add_item(self, tokens) -> None:
        """One sequence; call `end_document()` after the last sequence of a document."""
        arr = np.asarray(tokens)
        if arr.size and self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            if arr.min() < info.min or arr.max() > info.max:
                raise ValueError(f"token ids [{arr.min()}, {arr.max()}] do not fit {self.dtype}")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
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

    def add_index(self, prefix: str, chunk_tokens: int = 1 << 24) -> None:
        """Appends a whole existing dataset (for merging shards), copying its `.bin` in chunks."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"{prefix}: dtype {other.dtype} differs from the output's {self.dtype}")
        base = len(self.sequence_lengths)
        self.sequence_lengths.extend(other.sequence_lengths.tolist())
        self.document_indices.extend((other.document_indices[1:] + base).tolist())
        nbytes = int(np.sum(other.sequence_lengths, dtype=np.int64)) * self.dtype.itemsize
        step = chunk_tokens * self.dtype.itemsize
        for start in range(0, nbytes, step):
            self._bin.write(other._bin[start : min(start + step, nbytes)].tobytes())

    def finalize(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.asarray(self.sequence_lengths, dtype=np.int32)
        pointers = sequence_pointers(lengths, self.dtype)
        docs = np.asarray(self.document_indices, dtype=np.int64)
        idx_tmp = idx_path(self.prefix) + self._tmp_suffix
        with open(idx_tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, _CODE_OF[self.dtype], len(lengths), len(docs)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(docs.tobytes(order="C"))
            f.flush()
            os.fsync(f.fileno())
        # An old .idx must not pair with the new .bin if we die between the two renames.
        if os.path.exists(idx_path(self.prefix)):
            os.remove(idx_path(self.prefix))
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(idx_tmp, idx_path(self.prefix))
        self._finalized = True

    def abort(self) -> None:
        """Removes the temporaries; nothing is left under the final names."""
        if not self._bin.closed:
            self._bin.close()
        for path in (self._bin_tmp, idx_path(self.prefix) + self._tmp_suffix):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self._finalized:
            self.abort()
        return False
