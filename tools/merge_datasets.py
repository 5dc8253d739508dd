#!/usr/bin/env python
"""Merges `.bin`/`.idx` datasets into one, in the order given (e.g. the per-shard outputs of
`preprocess_data.py --output-per-input`).

    python tools/merge_datasets.py --input out/c4_shard0_text_document out/c4_shard1_text_document \\
        --output-prefix out/c4_text_document
    python tools/merge_datasets.py --input out/shards/ --output-prefix out/c4_text_document

A directory stands for every dataset in it (each `.idx` with its `.bin`), in sorted order. All
inputs are opened and checked (whole index, same token dtype, the same tokenizer where their
`PREFIX.tokenizer.json` says which) before anything is written; the
output is written under a temporary name and renamed when complete. An existing output is
replaced only with `--overwrite`. Exit status 2 on bad input or an output that cannot be
written, with one line naming the file.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from megatron_snm.data.errors import DataError
from megatron_snm.data.tokenizer_description import SUFFIX, description_path, label, read_description, same_tokenizer
from megatron_snm.data.indexed_dataset import (
    IndexedDataset, IndexedDatasetBuilder, bin_path, clear_stale_temporaries, idx_path,
)


def input_prefixes(inputs: list[str]) -> list[str]:
    prefixes = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, n[: -len(".idx")]) for n in os.listdir(item) if n.endswith(".idx"))
            if not found:
                raise ValueError(f"--input {item}: directory holds no .idx files")
            prefixes.extend(found)
        else:
            prefixes.append(item[: -len(".idx")] if item.endswith((".idx", ".bin")) else item)
    return prefixes


def common_tokenizer(prefixes: list[str]) -> dict | None:
    """The tokenizer every input was made with, from their descriptions; refuses inputs of two
    tokenizers (ValueError naming both files). None, with a warning, when some input has no
    description (a Megatron-LM dataset): the merged dataset then gets none either."""
    described = [(p, d) for p in prefixes if (d := read_description(p)) is not None]
    for prefix, description in described[1:]:
        first, theirs = described[0]
        if not same_tokenizer(description, theirs):
            raise ValueError(f"{description_path(prefix)} says {label(description)} but "
                             f"{description_path(first)} says {label(theirs)}: datasets of two tokenizers cannot "
                             "be merged")
    if not described:
        return None
    if len(described) < len(prefixes):
        bare = next(p for p in prefixes if p not in dict(described))
        print(f"[merge] warning: {bare} has no {SUFFIX}, so the merged dataset gets none (the others say "
              f"{label(described[0][1])})", file=sys.stderr)
        return None
    return described[0][1]


def merge(prefixes: list[str], output_prefix: str, overwrite: bool = False) -> IndexedDataset:
    datasets = [IndexedDataset(p) for p in prefixes]  # raises DataError naming the file
    dtypes = {ds.dtype for ds in datasets}
    if len(dtypes) > 1:
        listing = ", ".join(f"{p} ({ds.dtype})" for p, ds in zip(prefixes, datasets))
        raise ValueError(f"inputs have different token dtypes, cannot merge: {listing}")
    tokenizer = common_tokenizer(prefixes)
    if os.path.abspath(output_prefix) in {os.path.abspath(p) for p in prefixes}:
        raise ValueError(f"--output-prefix {output_prefix} is also an input")
    clear_stale_temporaries(output_prefix, lambda message: print(f"[merge] {message}", file=sys.stderr))
    existing = [p for p in (bin_path(output_prefix), idx_path(output_prefix), description_path(output_prefix))
                if os.path.lexists(p)]
    if existing and not overwrite:
        raise ValueError(f"{existing[0]} already exists; pass --overwrite to replace it, or choose another --output-prefix")
    with IndexedDatasetBuilder(output_prefix, datasets[0].dtype, tokenizer) as builder:
        for prefix in prefixes:
            builder.add_index(prefix)
        builder.finalize(replace=overwrite)
    return IndexedDataset(output_prefix)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes, or directories of datasets")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output once the new one is complete")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        prefixes = input_prefixes(args.input)
        merged = merge(prefixes, args.output_prefix, args.overwrite)
    except (ValueError, DataError) as e:
        print(f"merge_datasets.py: error: {e}", file=sys.stderr)
        return 2
    tokens = int(merged.sequence_lengths.sum(dtype="int64"))
    print(f"[merge] {len(prefixes)} dataset(s) -> {args.output_prefix}: {merged.num_documents:,} documents, "
          f"{tokens:,} tokens in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
