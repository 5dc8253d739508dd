"""Building the GPT dataset indices: ours (csrc/data/helpers.cpp) against numpy/Python.

Workload: 10M samples of 2048 tokens over a synthetic 20B-token corpus (document sizes drawn
log-normal around C4's ~480 GPT-2 tokens per document), which takes two epochs. Both sides build
the same three indices by the same algorithm (Megatron's):

    document index  every document once per epoch, shuffled (the final epoch on its own)
    sample index    (document position, offset) where each sample of 2049 tokens starts
    shuffle index   a permutation of the samples

The reference is the straightforward one: numpy's RandomState shuffles (what Megatron uses) and
the per-sample Python loop of Megatron's original `_build_sample_idx`. That loop would take many
minutes at this size, so it runs on the first --python-samples samples and its time is
extrapolated linearly (each sample costs the same: seq_length tokens, a few documents). A
vectorised numpy sample index (cumsum + searchsorted) is timed in full as a second reference.
Both references' outputs are checked against ours where the algorithms coincide. The shuffles
differ by design (our own seeded generator), so those are checked as permutations.

Every step is single-threaded on both sides, and the ratio uses CPU seconds (user + system of
this process), which a machine shared with other jobs inflates far less than wall time; wall
times are printed beside them.

    python benchmarks/dataset_index.py [--tokens 20e9 --samples 10000000 --seq-length 2048]

Last line: JSON with "ratio" = reference time / our time (higher is better; target >= 20).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from megatron_snm.data.gpt_dataset import build_indices


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Timer:
    """CPU and wall seconds of a block."""

    def __enter__(self):
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu, self.wall = time.process_time() - self.cpu, time.perf_counter() - self.wall


def synthetic_sizes(total_tokens: int, seed: int) -> np.ndarray:
    """Document lengths (int32) summing exactly to total_tokens."""
    rng = np.random.default_rng(seed)
    mean = 480  # C4: ~365M documents, ~175B GPT-2 tokens
    sigma = 1.0
    n = int(total_tokens / mean * 1.05) + 1
    sizes = np.clip(rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, n), 1, 100_000).astype(np.int32)
    ends = np.cumsum(sizes, dtype=np.int64)
    keep = int(np.searchsorted(ends, total_tokens)) + 1
    if keep > n:
        raise SystemExit("synthetic corpus too short; raise the oversampling factor")
    sizes = sizes[:keep]
    sizes[-1] -= ends[keep - 1] - total_tokens
    return sizes


# ---- the reference: Megatron's algorithm in numpy and Python ---------------------------------


def reference_document_index(num_docs, num_epochs, separate_final_epoch, rs):
    def shuffled(epochs):
        index = np.tile(np.arange(num_docs, dtype=np.int32), epochs)
        rs.shuffle(index)
        return index

    if not separate_final_epoch:
        return shuffled(num_epochs)
    return np.concatenate([shuffled(num_epochs - 1), shuffled(1)])


def reference_sample_index_python(sizes, document_index, seq_length, num_samples):
    """Megatron's original per-sample loop (add_extra_token_to_sequence=1)."""
    sample_index = np.zeros((num_samples + 1, 2), dtype=np.int64)
    position, offset = 0, 0
    for i in range(1, num_samples + 1):
        remaining = seq_length + 1
        while remaining != 0:
            length = int(sizes[document_index[position]]) - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - 1
                remaining = 0
            else:
                position += 1
                offset = 0
        sample_index[i] = position, offset
    return sample_index


def reference_sample_index_numpy(sizes, document_index, seq_length, num_samples):
    """Vectorised: sample i starts at token i * seq_length of the concatenated documents."""
    ends = np.cumsum(sizes[document_index], dtype=np.int64)
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    position = np.searchsorted(ends, starts, side="right")
    offset = starts - (ends[position] - sizes[document_index[position]])
    return np.stack([position, offset], axis=1)


def reference_shuffle_index(first, total, rs):
    head = np.arange(first, dtype=np.int64)
    rs.shuffle(head)
    tail = np.arange(first, total, dtype=np.int64)
    rs.shuffle(tail)
    return np.concatenate([head, tail])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=float, default=20e9)
    parser.add_argument("--samples", type=int, default=10_000_000)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--python-samples", type=int, default=200_000, help="samples the Python loop runs on")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    seq, num_samples = args.seq_length, args.samples

    log(f"synthetic corpus: {args.tokens:.3g} tokens")
    sizes = synthetic_sizes(int(args.tokens), args.seed)
    num_docs = len(sizes)
    log(f"{num_docs:,} documents, mean {sizes.mean():.0f} tokens")

    # ---- ours (what GPTDataset runs, less the .npy writes)
    with Timer() as ours:
        document_index, sample_index, shuffle_index = build_indices(sizes, (0, num_docs), num_samples, seq, args.seed)
    total = len(shuffle_index)
    num_epochs = len(document_index) // num_docs
    log(f"ours: {ours.cpu:.2f} s CPU, {ours.wall:.2f} s wall ({total:,} samples, {num_epochs} epochs)")
    assert total >= num_samples
    assert np.array_equal(np.bincount(document_index, minlength=num_docs), np.full(num_docs, num_epochs))
    assert np.array_equal(np.bincount(shuffle_index, minlength=total), np.ones(total, np.int64))

    # ---- reference (same epochs and final-epoch rule; numpy's RandomState as Megatron)
    tokens_per_epoch = int(sizes.sum(dtype=np.int64))
    before_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq
    separate = num_epochs > 1 and num_samples - before_final < int(0.8 * ((tokens_per_epoch - 1) // seq))
    rs = np.random.RandomState(args.seed)
    with Timer() as doc_time:
        ref_document_index = reference_document_index(num_docs, num_epochs, separate, rs)
    log(f"reference document index: {doc_time.cpu:.2f} s CPU")
    with Timer() as vectorised:
        ref_sample_index = reference_sample_index_numpy(sizes, ref_document_index, seq, total)
    log(f"reference sample index, vectorised numpy: {vectorised.cpu:.2f} s CPU")
    k = min(args.python_samples, total)
    with Timer() as loop:
        python_rows = reference_sample_index_python(sizes, ref_document_index, seq, k)
    loop.cpu, loop.wall = loop.cpu * total / k, loop.wall * total / k
    log(f"reference sample index, Python loop on {k:,} samples, extrapolated to {total:,}: {loop.cpu:.1f} s CPU")
    assert np.array_equal(python_rows, ref_sample_index[: k + 1]), "the two references disagree"
    assert np.array_equal(reference_sample_index_python(sizes, document_index, seq, k), sample_index[: k + 1])
    del ref_document_index, ref_sample_index
    with Timer() as shuffle_time:
        reference_shuffle_index(before_final if separate else total, total, rs)
    log(f"reference shuffle index: {shuffle_time.cpu:.2f} s CPU")

    rows = [
        ("document index (numpy shuffle)", doc_time),
        ("sample index (Python loop)*", loop),
        ("shuffle index (numpy shuffle)", shuffle_time),
    ]
    reference = sum(t.cpu for _, t in rows)
    reference_wall = sum(t.wall for _, t in rows)
    reference_numpy = reference - loop.cpu + vectorised.cpu
    print()
    print(f"{'':<44}{'CPU s':>9}{'wall s':>9}")
    for step, t in rows + [("sample index (vectorised numpy)", vectorised)]:
        print(f"{'reference ' + step:<44}{t.cpu:>9.2f}{t.wall:>9.2f}")
    print(f"{'reference total (Python loop)':<44}{reference:>9.2f}{reference_wall:>9.2f}")
    print(f"{'reference total (vectorised numpy)':<44}{reference_numpy:>9.2f}")
    print(f"{'ours, all three indices':<44}{ours.cpu:>9.2f}{ours.wall:>9.2f}")
    print(f"* measured on {k:,} of the {total:,} samples and extrapolated linearly")
    print(f"ratio (CPU time) {reference / ours.cpu:.1f}x against the Python-loop reference, "
          f"{reference_numpy / ours.cpu:.1f}x against the vectorised numpy one")
    print(json.dumps({
        "benchmark": "dataset_index",
        "ratio": round(reference / ours.cpu, 2),
        "ratio_vs_vectorised_numpy": round(reference_numpy / ours.cpu, 2),
        "ratio_wall": round(reference_wall / ours.wall, 2),
        "ours_cpu_s": round(ours.cpu, 3),
        "ours_wall_s": round(ours.wall, 3),
        "reference_cpu_s": round(reference, 3),
        "reference_vectorised_cpu_s": round(reference_numpy, 3),
        "python_loop_extrapolated_from_samples": k,
        "samples": total,
        "seq_length": seq,
        "documents": num_docs,
        "tokens": int(args.tokens),
        "epochs": num_epochs,
    }))


if __name__ == "__main__":
    main()
