#!/usr/bin/env python
"""Generates text from a checkpoint, streaming the tokens to the terminal as they are produced.

    python tools/generate.py --load CKPT_DIR --prompt "The capital of France" --max-new-tokens 40 --greedy
    python tools/generate.py --load CKPT_DIR --prompt-file prompts.txt --temperature 0.8 --top-p 0.9 --seed 7
    torchrun --nproc_per_node 2 tools/generate.py --load CKPT_DIR --prompt "..." --tensor-model-parallel-size 2

Greedy, or sampling with --temperature / --top-k / --top-p from --seed; stops at the tokenizer's
end-of-document token (unless --ignore-eod) or after --max-new-tokens, within the model's
--seq-length. A KV cache keeps each new token's cost constant. Runs on CPU or GPU, alone or
under the training launchers with any TP x PP layout. For each prompt the text streams to
stdout, then one JSON line follows with `token_ids` (the new tokens) and `text` (their text);
with --prompt-file, each non-empty line is a prompt.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from megatron_snm.inference.cli import (DTYPES, UsageError, add_checkpoint_flags, load_checkpoint_and_tokenizer,
                                        read_text_lines, run_tool)
from megatron_snm.inference.generate import generate
from megatron_snm.inference.model import InferenceGPT, start_runtime, stop_runtime
from megatron_snm.inference.sampling import SamplingParams


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_checkpoint_flags(p)
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="the text to continue")
    prompts.add_argument("--prompt-file", help="a file of prompts, one per line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="always the most likely token")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set reaching probability p")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--ignore-eod", action="store_true", help="do not stop at the end-of-document token")
    p.add_argument("--quiet", action="store_true", help="print only the JSON lines")
    return p.parse_args(argv)


def read_prompts(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    prompts = [line for _, line in read_text_lines(args.prompt_file, "--prompt-file") if line.strip()]
    if not prompts:
        raise UsageError(f"--prompt-file {args.prompt_file}: no prompts in it")
    return prompts


def continuation(tokenizer, prompt_ids: list[int], new: list[int]) -> str:
    """The text the new tokens add after the prompt's (decoded together: SentencePiece drops the
    space before a text's first word, which is not the start of this one); EOD is not text."""
    kept = [t for t in new if t != tokenizer.eod]
    return tokenizer.detokenize(prompt_ids + kept)[len(tokenizer.detokenize(prompt_ids)):]


def main(argv=None) -> int:
    return run_tool("generate.py", lambda: _main(parse_args(argv)))


def _main(args) -> int:
    params = SamplingParams(args.greedy, args.temperature, args.top_k, args.top_p)
    params.validate()
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    prompts = read_prompts(args)
    ckpt, (_, tokenizer) = load_checkpoint_and_tokenizer(args, need_tokenizer=True)
    runtime = start_runtime(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    model = InferenceGPT(ckpt, tokenizer.vocab_size, runtime, DTYPES[args.dtype] if args.dtype else None)
    show = runtime.rank == 0 and not args.quiet
    for prompt in prompts:
        prompt_ids = tokenizer.tokenize(prompt)
        start, new, shown = time.perf_counter(), [], ""
        if show:
            print(prompt, end="", flush=True)
        for token in generate(model, prompt_ids, args.max_new_tokens, params,
                              None if args.ignore_eod else tokenizer.eod, args.seed):
            new.append(token)
            if show:  # decode all so far: a character may span several tokens
                text = continuation(tokenizer, prompt_ids, new)
                print(text[len(shown):], end="", flush=True)
                shown = text
        seconds = time.perf_counter() - start
        at_eod = bool(new) and new[-1] == tokenizer.eod and not args.ignore_eod
        # The model has no positions past --seq-length: the prompt and the new tokens share them.
        context = model.config.seq_length
        at_context = not at_eod and len(prompt_ids) + len(new) >= context and len(new) < args.max_new_tokens
        if runtime.rank == 0:
            if show:
                print(flush=True)  # ends the streamed line, so the JSON stands on its own
                print(f"[{len(new)} tokens in {seconds:.2f} s, {len(new) / seconds:.1f} tokens/s]", file=sys.stderr)
            if at_context:
                print(f"generate.py: stopped after {len(new)} of --max-new-tokens {args.max_new_tokens}: the prompt's "
                      f"{len(prompt_ids)} tokens and the new ones fill the model's context length ({context}, its "
                      "--seq-length)", file=sys.stderr)
            print(json.dumps(dict(prompt=prompt, token_ids=new, text=continuation(tokenizer, prompt_ids, new),
                                  stopped_at_eod=at_eod, stopped_at_context_length=at_context)))
    stop_runtime(runtime)
    return 0


if __name__ == "__main__":
    sys.exit(main())
