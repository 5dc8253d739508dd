"""GPT pre-training samples over indexed datasets, and the train/valid/test builder.

A `GPTDataset` serves samples of `seq_length + 1` tokens cut from the concatenation of a range
of documents (inputs are tokens [0, seq_length), labels [1, seq_length + 1)). Three indices,
built by the C++ helpers and cached as .npy files, define it, as in Megatron:

    document_index  the range's document ids over as many epochs as the samples need, shuffled
    sample_index    [num_samples + 1, 2]: (position in document_index, token offset) where each
                    sample starts; sample i ends on the token where sample i + 1 starts
    shuffle_index   the order samples are served in

All three depend only on the document lengths, the document range, seq_length, the number of
samples and the seed; the cache is keyed by exactly these (the lengths by a hash of the `.idx`),
so re-preprocessing a prefix never reuses the indices of its old contents.
A document is a document of the .idx (Megatron's GPTDataset takes each sequence for one, which
differs only for sentence-split data).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from typing import Sequence

import numpy as np
import torch

from megatron_snm import atomic
from megatron_snm.data.blended_dataset import BlendedDataset
from megatron_snm.data.errors import DataError
from megatron_snm.data.helpers import build_document_sample_index, build_shuffle_index
from megatron_snm.data.indexed_dataset import IndexedDataset, bin_path

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
# A blend asks each dataset for this much more than its share, so it never runs short.
BLEND_SURPLUS = 0.005
# Bump when the index algorithm or the cache key changes, so old caches are not mistaken for new ones.
INDEX_FORMAT = 2
# The document index holds one int32 entry per document per epoch: refuse sizes it cannot hold.
MAX_DOCUMENT_INDEX = 2**31 - 1


def parse_split(split: str) -> list[float]:
    """`--split "969,30,1"` -> normalised train/valid/test weights (missing ones are 0). Quotes around
    it are ignored: Megatron-LM's own script passes "--split '99,1,0'" through an unquoted bash array,
    which keeps them, and Megatron reads only the numbers."""
    try:
        weights = [float(w) for w in re.split(r"[,/]", str(split).strip().strip("'\""))]
    except ValueError:
        raise DataError(f"--split {split!r}: expected up to three numbers such as '969,30,1'") from None
    if len(weights) > len(SPLITS) or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(f"--split {split!r}: expected up to three non-negative numbers with a positive sum")
    weights += [0.0] * (len(SPLITS) - len(weights))
    total = sum(weights)
    return [w / total for w in weights]


def split_document_ranges(split: str, num_documents: int) -> list[tuple[int, int]]:
    """Document range [begin, end) of each split (megatron-core's rule: each bookend of the
    cumulative weights rounded to the nearest document)."""
    bounds = np.concatenate([[0.0], np.cumsum(parse_split(split))])
    return [(int(round(lo * num_documents)), int(round(hi * num_documents))) for lo, hi in zip(bounds[:-1], bounds[1:])]


class GPTDataset(torch.utils.data.Dataset):
    """Samples of `seq_length + 1` token ids (int64) from documents [begin, end) of `indexed`.

    The indices are cached in `cache_dir` (default: `index-cache/` beside the data) under a hash
    of everything they depend on. With torch.distributed initialised, global rank 0 builds them
    and the other ranks wait, then every rank memory-maps the same files; so every rank must
    construct the same datasets in the same order.
    """

    def __init__(
        self,
        indexed: IndexedDataset,
        documents: tuple[int, int],
        num_samples: int,
        seq_length: int,
        seed: int,
        cache_dir: str | None = None,
        name: str = "train",
    ):
        begin, end = documents
        if not 0 <= begin < end <= indexed.num_documents:
            raise DataError(f"{indexed.prefix}: document range [{begin}, {end}) outside its {indexed.num_documents} documents")
        if num_samples < 1 or seq_length < 1:
            raise DataError(f"{indexed.prefix}: need num_samples >= 1 and seq_length >= 1, got {num_samples}, {seq_length}")
        self.indexed = indexed
        self.documents = (int(begin), int(end))
        self.num_samples = int(num_samples)
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.name = name

        sizes = indexed.document_lengths  # int32 (one sequence per document) or int64
        self.tokens_per_epoch = int(np.sum(sizes[begin:end], dtype=np.int64))
        if self.tokens_per_epoch < 2:
            raise DataError(
                f"{bin_path(indexed.prefix)}: the {name} documents [{begin}, {end}) hold {self.tokens_per_epoch} "
                "tokens; a sample needs at least 2 (is the dataset empty, or --split too thin for it?)"
            )
        epochs = -(-(self.num_samples * self.seq_length + 1) // self.tokens_per_epoch)
        if epochs * (end - begin) > MAX_DOCUMENT_INDEX:
            raise DataError(
                f"{bin_path(indexed.prefix)}: {self.num_samples:,} {name} samples of {self.seq_length} tokens would "
                f"repeat its {self.tokens_per_epoch:,} {name} tokens {epochs:,} times; give more data or fewer samples"
            )

        # What the indices depend on. The data is named by a hash of its .idx (the document
        # lengths), not by its path, so every rank computes the same name wherever the data is
        # mounted, and a prefix re-preprocessed with other content gets other indices.
        self.description = {
            "class": "GPTDataset",
            "format": INDEX_FORMAT,
            "dataset": os.path.basename(indexed.prefix),
            "idx_sha256": indexed.content_hash,
            "split": name,
            "documents": list(self.documents),
            "tokens_per_epoch": self.tokens_per_epoch,
            "num_samples": self.num_samples,
            "seq_length": self.seq_length,
            "seed": self.seed,
        }
        digest = hashlib.sha256(json.dumps(self.description, sort_keys=True).encode()).hexdigest()[:20]
        cache_dir = cache_dir or _default_cache_dir(indexed)
        base = os.path.join(cache_dir, f"{os.path.basename(indexed.prefix)}-{name}-{digest}")
        self.paths = {k: f"{base}-{k}.npy" for k in ("document_index", "sample_index", "shuffle_index")}
        self.description_path = f"{base}-description.json"

        _build_on_rank0(self._cached, lambda: self._build_and_save(sizes), indexed.prefix)
        self._load()

    def _cached(self) -> bool:
        return all(os.path.isfile(p) for p in [*self.paths.values(), self.description_path])

    def _load(self):
        for key, path in self.paths.items():
            try:
                setattr(self, key, np.load(path, mmap_mode="r"))
            except FileNotFoundError:
                raise DataError(
                    f"{path}: index missing after global rank 0 built it; the cache directory must be on "
                    "a filesystem every rank sees (set --data-cache-path)"
                ) from None
            except (ValueError, OSError) as e:
                raise DataError(f"{path}: damaged index cache ({e}); delete it and it is rebuilt") from None
        # Cheap shape checks: a damaged or foreign cache file must not serve wrong samples.
        rows = len(self.shuffle_index)
        if (self.sample_index.ndim != 2 or self.sample_index.shape != (rows + 1, 2) or rows < self.num_samples
                or self.document_index.ndim != 1 or len(self.document_index) % (self.documents[1] - self.documents[0])):
            raise DataError(
                f"{self.paths['sample_index']}: index cache does not match its description (sample index "
                f"{self.sample_index.shape}, {rows} shuffled samples, document index {self.document_index.shape}); "
                "delete the cache files and they are rebuilt"
            )

    def _build_and_save(self, sizes: np.ndarray):
        start = time.time()
        logger.info(
            "%s: building %s indices for %d samples of %d tokens from %d documents",
            self.indexed.prefix, self.name, self.num_samples, self.seq_length + 1, self.documents[1] - self.documents[0],
        )
        indices = build_indices(sizes, self.documents, self.num_samples, self.seq_length, self.seed)
        for key, array in zip(self.paths, indices):
            _save(self.paths[key], lambda f, a=array: np.save(f, a))
        # The description goes last: its presence marks a complete cache entry.
        total = len(indices[2])
        _save(self.description_path, json.dumps({**self.description, "samples_built": total}, indent=2))
        logger.info("%s: %s indices built in %.2f s (%d samples)", self.indexed.prefix, self.name, time.time() - start, total)

    def __len__(self) -> int:
        # Every sample the epochs yield (at least num_samples), as in Megatron.
        return len(self.shuffle_index)

    def __getitem__(self, idx: int) -> dict:
        i = int(self.shuffle_index[idx])
        (first, start), (last, stop) = self.sample_index[i], self.sample_index[i + 1]
        first, start, last, stop = int(first), int(start), int(last), int(stop)
        get, docs = self.indexed.get_document, self.document_index
        if first == last:
            parts = [get(int(docs[first]), start, stop - start + 1)]
        else:
            parts = [get(int(docs[first]), start)]
            parts += [get(int(docs[p])) for p in range(first + 1, last)]
            parts.append(get(int(docs[last]), 0, stop + 1))
        return {"text": np.concatenate(parts, dtype=np.int64)}

    def describe(self, idx: int) -> dict:
        """Where sample `idx` comes from: the dataset prefix and the ids of the documents it spans."""
        i = int(self.shuffle_index[idx])
        first, last = int(self.sample_index[i][0]), int(self.sample_index[i + 1][0])
        return {"dataset": self.indexed.prefix, "documents": [int(d) for d in self.document_index[first:last + 1]]}

    def sample_origin(self, idx: int) -> str:
        """Where sample `idx` comes from, for error messages."""
        return f"{self.indexed.prefix} ({self.name} sample {idx})"

    def __repr__(self) -> str:
        return f"GPTDataset({self.indexed.prefix!r}, {self.name}, documents={list(self.documents)})"

    # DataLoader workers under spawn re-map the cached files rather than receive copies.
    def __getstate__(self):
        state = dict(self.__dict__)
        for key in self.paths:
            del state[key]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load()


def build_indices(
    sizes: np.ndarray, documents: tuple[int, int], num_samples: int, seq_length: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(document_index, sample_index, shuffle_index) for documents [begin, end) of `sizes`
    (tokens per document), as in Megatron: enough epochs for num_samples, and when the last
    epoch is used for less than 80% of its samples it is shuffled on its own and its samples
    served last, so a few repeats do not mix into the earlier epochs."""
    begin, end = documents
    if sizes.dtype != np.int32:
        if sizes[begin:end].max() > np.iinfo(np.int32).max:
            raise ValueError("a document holds 2^31 tokens or more")
        sizes = sizes.astype(np.int32)
    tokens_per_epoch = int(np.sum(sizes[begin:end], dtype=np.int64))
    num_epochs = -(-(num_samples * seq_length + 1) // tokens_per_epoch)
    per_epoch = (tokens_per_epoch - 1) // seq_length
    before_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    separate_final_epoch = num_epochs > 1 and num_samples - before_final < int(0.8 * per_epoch)
    seed %= 2**64
    document_index, sample_index = build_document_sample_index(
        sizes, begin, end, num_epochs, separate_final_epoch, seq_length, seed
    )
    total = sample_index.shape[0] - 1
    shuffle_index = build_shuffle_index(before_final if separate_final_epoch else total, total, seed)
    return document_index, sample_index, shuffle_index


def _save(path: str, content) -> None:
    try:
        atomic.write_atomically(path, content)
    except OSError as e:
        raise DataError(
            f"{path}: cannot write the dataset index cache ({e.strerror or e}); free space there or point "
            "--data-cache-path at a writable directory"
        ) from e


def _build_on_rank0(cached, build, what: str):
    """Runs build() on global rank 0 unless cached(); the other ranks wait for it and fail with
    rank 0's error rather than hang."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    error = None
    if rank == 0 and not cached():
        try:
            build()
        except Exception as e:
            error = e
    if distributed:
        status = [None if error is None else (isinstance(error, DataError), f"{type(error).__name__}: {error}")]
        torch.distributed.broadcast_object_list(status, src=0)
        if rank != 0 and status[0] is not None:
            data_error, message = status[0]
            # A data error stays one (a clear message, exit status 2) on every rank.
            raise (DataError if data_error else RuntimeError)(f"{what}: rank 0 failed to build the dataset indices: {message}")
    if error is not None:
        raise error


def check_vocabulary(indexed: IndexedDataset, vocab_size: int, cache_dir: str | None = None) -> None:
    """Raises DataError if the `.bin` holds a token id >= vocab_size (data preprocessed with a
    larger vocabulary). Megatron's format does not store the largest id, so global rank 0 scans
    the `.bin` once (in chunks, with progress lines) and caches the answer under the `.idx` hash
    and the `.bin`'s size and modification time; the other ranks read the cached answer."""
    bpath = bin_path(indexed.prefix)
    stat = os.stat(bpath)
    key = hashlib.sha256(f"{indexed.content_hash}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:20]
    cache_dir = cache_dir or _default_cache_dir(indexed)
    path = os.path.join(cache_dir, f"{os.path.basename(indexed.prefix)}-{key}-max_token_id.json")

    def scan():
        start = time.time()
        highest = indexed.max_token_id()
        logger.info("%s: largest token id %d (scanned in %.1f s)", bpath, highest, time.time() - start)
        _save(path, json.dumps({"max_token_id": highest, "bin_bytes": stat.st_size}))

    _build_on_rank0(lambda: os.path.isfile(path), scan, indexed.prefix)
    try:
        with open(path) as f:
            highest = int(json.load(f)["max_token_id"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: damaged cache of the largest token id ({e}); delete it and it is rebuilt") from None
    if highest >= vocab_size:
        raise DataError(
            f"{bpath}: holds token id {highest}, but the tokenizer has only {vocab_size} ids (preprocessed with "
            "another tokenizer? check --tokenizer-type and its files)"
        )


def _default_cache_dir(indexed: IndexedDataset) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(indexed.prefix)), "index-cache")


def parse_data_path(data_path: Sequence[str] | str) -> tuple[list[str], list[float]]:
    """Megatron's `--data-path`: `PREFIX` or `W1 PREFIX1 W2 PREFIX2 ...` -> (prefixes, weights)."""
    items = data_path.split() if isinstance(data_path, str) else [str(x) for x in data_path]
    if len(items) == 1:
        return items, [1.0]
    if not items or len(items) % 2:
        raise DataError(f"--data-path {' '.join(items)!r}: expected PREFIX or WEIGHT PREFIX pairs")
    prefixes, weights = items[1::2], []
    for w in items[0::2]:
        try:
            weights.append(float(w))
        except ValueError:
            raise DataError(f"--data-path: weight {w!r} is not a number (expected WEIGHT PREFIX pairs)") from None
        if not math.isfinite(weights[-1]) or weights[-1] <= 0:
            raise DataError(f"--data-path: weight {w!r} must be positive")
    return prefixes, weights


def build_train_valid_test_datasets(
    data_path: Sequence[str] | str,
    split: str,
    num_samples: tuple[int, int, int],
    seq_length: int,
    seed: int,
    cache_dir: str | None = None,
    vocab_size: int | None = None,
):
    """(train, valid, test) for Megatron's `--data-path`, `--split`, `--seq-length`, `--seed`
and `--data-cache-path` (cache_dir).

    Each is a GPTDataset (one prefix) or a BlendedDataset (several), or None where the split is
    empty or asks for no samples. With `vocab_size` (the tokenizer's), a dataset holding a larger
    id is refused up front (`check_vocabulary`). Call it on every rank, in the same order.
    """
    prefixes, weights = parse_data_path(data_path)
    parse_split(split)
    indexed = [IndexedDataset(p) for p in prefixes]  # every file checked before any work
    if vocab_size is not None:
        for ds in indexed:
            check_vocabulary(ds, vocab_size, cache_dir)
    return datasets_of(indexed, weights, split, num_samples, seq_length, seed, cache_dir)


def datasets_of(indexed: list, weights: list[float], split: str, num_samples: tuple[int, int, int],
                seq_length: int, seed: int, cache_dir: str | None = None):
    """(train, valid, test) from opened document sources (IndexedDatasets, or the mock's documents)
    blended by `weights`; see build_train_valid_test_datasets."""
    if len(num_samples) != len(SPLITS) or any(int(n) < 0 for n in num_samples):
        raise DataError(f"num_samples must be three non-negative counts, got {num_samples}")
    if seq_length < 1:
        raise DataError(f"--seq-length must be >= 1, got {seq_length}")
    ranges = [split_document_ranges(split, ds.num_documents) for ds in indexed]
    total = sum(weights)
    weights = [w / total for w in weights]

    result = []
    for s, name in enumerate(SPLITS):
        wanted = int(num_samples[s])
        empty = [ds.prefix for ds, r in zip(indexed, ranges) if r[s][0] >= r[s][1]]
        if wanted and name != "test" and len(empty) == len(indexed):
            # Training, or validation, would silently never run: refuse. (The test split may be
            # empty, as in Megatron: it is only evaluated at the end, if at all.)
            remedy = "give the second weight a larger share, or set --eval-iters 0" if name == "valid" else \
                "give the first weight a larger share, or more data"
            raise DataError(
                f"--split {split!r} gives the {name} set no documents of {empty[0]} "
                f"({indexed[0].num_documents} documents), yet the run asks it for {wanted} samples: {remedy}"
            )
        if wanted == 0 or len(empty) == len(indexed):
            result.append(None)
            continue
        if empty:
            raise DataError(f"--split {split!r} leaves no {name} documents in {empty[0]}, which the blend draws from")
        if len(indexed) == 1:
            result.append(GPTDataset(indexed[0], ranges[0][s], wanted, seq_length, seed, cache_dir, name))
            continue
        parts = [
            GPTDataset(ds, r[s], math.ceil(math.ceil(wanted * w) * (1 + BLEND_SURPLUS)), seq_length, seed, cache_dir, name)
            for ds, r, w in zip(indexed, ranges, weights)
        ]
        result.append(BlendedDataset(parts, weights, wanted))
    return tuple(result)
