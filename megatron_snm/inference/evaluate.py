"""Perplexity over token streams (sliding windows) and LAMBADA-style last-word prediction.

Windows follow lm-eval-harness's rolling log-likelihood, so figures agree with it on the same
text: a sequence S (a document after an end-of-document prefix token, or a dataset's token stream)
is scored position by position, each window's input at most --seq-length tokens long. With
stride L = --seq-length the windows do not overlap (each token predicted once, the last window
taking a full-length context); a smaller stride gives every window L - stride tokens of extra
context ("sliding window" perplexity, as WikiText figures are usually reported).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_snm.inference.model import InferenceGPT


def rolling_windows(sequence: list[int], seq_length: int, stride: int) -> list[tuple[list[int], int]]:
    """(input ids, how many of the last predictions are scored) covering predictions of
    sequence[1:]; sequence[0] is context only."""
    if not 1 <= stride <= seq_length:
        raise ValueError(f"--stride must be in 1..--seq-length ({seq_length}), got {stride}")
    windows, predicted = [], 1
    while predicted < len(sequence):
        end = min(predicted + stride, len(sequence))
        start = max(0, end - 1 - seq_length)
        windows.append((sequence[start:end], end - predicted))  # inputs sequence[start:end-1], targets +1
        predicted = end
    return windows


@dataclass
class Totals:
    """Sums this rank adds up; `reduce` adds every rank's."""
    nll: float = 0.0
    tokens: int = 0
    words: int = 0
    bytes: int = 0
    examples: int = 0
    correct: int = 0

    def reduce(self, model: InferenceGPT) -> "Totals":
        runtime = model.runtime
        if runtime.world_size == 1:
            return self
        from megatron_snm.parallel import state

        # Only the last stage measured; its TP ranks measured the same figures, so count TP rank 0's.
        mine = runtime.is_last_stage and state.get_tensor_model_parallel_rank() == 0
        t = torch.tensor([self.nll, self.tokens, self.words, self.bytes, self.examples, self.correct] if mine
                         else [0.0] * 6, dtype=torch.float64, device=runtime.device)
        dist.all_reduce(t)
        nll, tokens, words, nbytes, examples, correct = t.tolist()
        return Totals(nll, int(tokens), int(words), int(nbytes), int(examples), int(correct))


def score(model: InferenceGPT, windows: list[list[int]], scored: list[int]) -> list[tuple[float, bool]] | None:
    """For windows of equal length, run as one batch: the summed NLL of each one's last `scored`
    targets (window[1:] given window[:-1]) and whether greedy decoding predicts all of them. None
    on ranks without logits."""
    batch = torch.tensor(windows)
    logits = model.forward(batch[:, :-1])
    if logits is None:
        return None
    targets = batch[:, 1:].to(logits.device)
    logprobs = logits.log_softmax(dim=-1)
    token_logprobs = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    positions = torch.arange(targets.shape[1], device=logits.device)
    counted = positions >= targets.shape[1] - torch.tensor(scored, device=logits.device).unsqueeze(1)
    nll = -(token_logprobs * counted).sum(dim=1)
    right = ((logprobs.argmax(dim=-1) == targets) | ~counted).all(dim=1)
    return list(zip(nll.tolist(), right.tolist()))


def _batches(items: list[tuple[list[int], int]], batch_size: int):
    """Runs of up to batch_size windows of one length (most windows have the full length)."""
    by_length: dict[int, list] = {}
    for window, scored in items:
        by_length.setdefault(len(window), []).append((window, scored))
    for group in by_length.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            yield [w for w, _ in chunk], [n for _, n in chunk]


def perplexity(model: InferenceGPT, sequences: list[list[int]], seq_length: int, stride: int,
               shard: tuple[int, int] = (0, 1), batch_size: int = 8) -> Totals:
    """NLL over the sequences' windows; this rank takes every shard[1]-th window from shard[0]."""
    totals = Totals()
    windows = [w for seq in sequences for w in rolling_windows(seq, seq_length, stride)][shard[0]::shard[1]]
    for batch, scored in _progress(list(_batches(windows, batch_size)), model):
        results = score(model, batch, scored)
        if results is not None:
            totals.nll += sum(nll for nll, _ in results)
        totals.tokens += sum(scored)
    return totals


def last_word(model: InferenceGPT, examples: list[tuple[list[int], list[int]]], seq_length: int,
              shard: tuple[int, int] = (0, 1), batch_size: int = 8) -> Totals:
    """LAMBADA: (context ids, target ids) pairs; accuracy = the greedy continuation is the target."""
    totals = Totals()
    windows = [((context + target)[-(seq_length + 1):], len(target)) for context, target in examples][shard[0]::shard[1]]
    for batch, scored in _progress(list(_batches(windows, batch_size)), model):
        results = score(model, batch, scored)
        if results is not None:
            totals.nll += sum(nll for nll, _ in results)
            totals.correct += sum(right for _, right in results)
        totals.tokens += sum(scored)
        totals.examples += len(batch)
    return totals


def _progress(batches: list, model: InferenceGPT):
    """tqdm over the batches on global rank 0 (rate and ETA on stderr)."""
    from tqdm import tqdm

    return tqdm(batches, desc="evaluating", unit="batch", disable=model.runtime.rank != 0, mininterval=2.0)


def figures(totals: Totals) -> dict:
    """Perplexity per token (and per word / byte where counted); for last-word examples, as
    lm-eval's LAMBADA, the perplexity of the target word (exp of the mean NLL per example) and the
    accuracy."""
    out = dict(tokens=totals.tokens, nll=totals.nll)
    if totals.examples:
        out["perplexity"] = math.exp(totals.nll / totals.examples)
        out["accuracy"] = totals.correct / totals.examples
        out["examples"] = totals.examples
        return out
    out["perplexity"] = math.exp(totals.nll / totals.tokens) if totals.tokens else float("nan")
    if totals.words:
        out["word_perplexity"] = math.exp(totals.nll / totals.words)
    if totals.bytes:
        out["byte_perplexity"] = math.exp(totals.nll / totals.bytes)
        out["bits_per_byte"] = totals.nll / totals.bytes / math.log(2)
    return out
