"""Pre-train a GPT: flags -> model, data, DeepSpeed engine -> train.

    deepspeed --num_gpus 2 pretrain_gpt.py --num-layers 2 ... --deepspeed_config ds.json
    torchrun --nproc_per_node 2 pretrain_gpt.py ...
    mpirun -np 2 python pretrain_gpt.py ...

`python pretrain_gpt.py --help` lists every flag (docs/megatron_flags.md: how each Megatron flag is
handled). Exit status: 0 done (or stopped by --exit-interval), 2 bad configuration, data or
checkpoint (one line naming the flag or file; the traceback with --debug or MEGATRON_SNM_DEBUG=1;
configuration errors are found before any process group starts), 3 stopped because the run diverged, 4 saved and stopped early by
--exit-duration-in-mins or a signal under --exit-signal-handler: run again with --load to continue
(training/exit_conditions.py), 5 another rank died or stopped answering for
--distributed-timeout-minutes (one line naming it: parallel/lost_rank.py), 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import logging
import os
import sys
import time
import traceback

import torch.distributed as dist

from megatron_snm.config import ConfigError, RunConfig, parse_args, resolve
from megatron_snm.data import build_train_valid_test_datasets
from megatron_snm.data.gpt_dataset import parse_data_path
from megatron_snm.data.mock_dataset import build_mock_datasets
from megatron_snm.data.tokenizer_description import check_dataset, describe
from megatron_snm.data.vocabulary_check import undescribed_warning
from megatron_snm.data.tokenizers import build_tokenizer
from megatron_snm.parallel import distributed
from megatron_snm.parallel import lost_rank
from megatron_snm.parallel.launcher_watchdog import watch_launcher
from megatron_snm.training.exit_conditions import EXIT_CODES, EXIT_CONFIG
from megatron_snm.training.memory_estimate import startup_estimate
from megatron_snm.training.trainer import TrainResult, build_run

START_TIME = time.time()  # what --exit-duration-in-mins counts from


def prepare(argv: list[str] | None, world_size: int):
    """Flags -> (run, tokenizer); raises ConfigError (or ValueError, OSError) before anything starts."""
    run = resolve(parse_args(argv), world_size)
    data = run.data
    if not data.data_path and not data.mock_data:
        raise ConfigError("--data-path is required (or --mock-data: Megatron's synthetic documents)")
    for prefix in parse_data_path(data.data_path)[0] if data.data_path else []:
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                raise ConfigError(f"--data-path: {prefix + suffix} does not exist (give the prefix that "
                                  "tools/preprocess_data.py wrote, e.g. out/c4_text_document)")
    if not data.tokenizer_type:
        raise ConfigError("--tokenizer-type is required (the model's vocabulary size is the tokenizer's)")
    tokenizer = build_tokenizer(data.tokenizer_type, data.vocab_file, data.merge_file, data.tokenizer_model,
                                data.vocab_size)
    return run, tokenizer


def check_datasets_tokenizer(prefixes: list[str], tokenizer, source: str | None) -> None:
    """Refuses a dataset made with another tokenizer (DataError naming its PREFIX.tokenizer.json and
    both tokenizers); one warning line for a dataset without a description whose ids look like
    another tokenizer's (rank 0 only)."""
    mine = describe(tokenizer, source)
    for prefix in prefixes:
        check_dataset(prefix, mine, "this run's tokenizer")
        warning = undescribed_warning(prefix, tokenizer.vocab_size) if distributed.discover().rank == 0 else None
        if warning:
            print(f"pretrain_gpt.py: {warning}", file=sys.stderr, flush=True)


def pretrain(run: RunConfig, vocab_size: int, env: distributed.DistEnv | None = None,
             start_time: float = START_TIME, eod: int | None = None) -> TrainResult:
    """Builds the run and its datasets and trains (every rank). Raises ConfigError for a refused
    checkpoint. `eod` (the tokenizer's) ends the documents of --mock-data (default: the last id, as
    NullTokenizer's)."""
    trainer = build_run(run, vocab_size, env=env, start_time=start_time)
    samples = run.batch.global_batch_size
    num_samples = (run.batch.train_iters * samples, run.eval.eval_iters * samples, run.eval.eval_iters * samples)
    data = run.data
    # Every rank calls this; rank 0 builds and caches the sample indices, the others read them.
    if data.mock_data:
        datasets = build_mock_datasets(data.split, num_samples, run.model.seq_length, run.model.seed,
                                       data.data_cache_path, vocab_size, vocab_size - 1 if eod is None else eod)
    else:
        datasets = build_train_valid_test_datasets(data.data_path, data.split, num_samples, run.model.seq_length,
                                                   run.model.seed, data.data_cache_path, vocab_size=vocab_size)
    return trainer.train(datasets)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except (ValueError, OSError) as err:  # ConfigError, CheckpointError, DataError, I/O
        if debug(argv):
            traceback.print_exc()
        print(f"pretrain_gpt.py: error: {err}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except RuntimeError as err:  # the rendezvous port is taken, or another rank died or stopped answering
        port_taken = distributed.port_in_use_message(err)
        message = port_taken or lost_rank.lost_rank_message(err)
        if message is None or debug(argv):
            raise
        print(f"pretrain_gpt.py: error: {message}", file=sys.stderr, flush=True)
        return EXIT_CONFIG if port_taken else lost_rank.EXIT_LOST_RANK
    except KeyboardInterrupt:
        if debug(argv):
            raise
        print("pretrain_gpt.py: interrupted (Ctrl-C); run again with --load to resume from the last checkpoint",
              file=sys.stderr, flush=True)
        return lost_rank.EXIT_INTERRUPTED


def debug(argv: list[str] | None) -> bool:
    """--debug or MEGATRON_SNM_DEBUG=1: errors keep their traceback."""
    return "--debug" in (sys.argv[1:] if argv is None else argv) or bool(os.environ.get("MEGATRON_SNM_DEBUG"))


def _main(argv: list[str] | None) -> int:
    env = distributed.discover()
    run, tokenizer = prepare(argv, env.world_size)  # before any process group
    memory = startup_estimate(run, tokenizer.vocab_size)  # --device-memory: refused here if it cannot fit
    if not run.data.mock_data:  # reads the datasets' descriptions (and, without one, their largest id)
        check_datasets_tokenizer(parse_data_path(run.data.data_path)[0], tokenizer,
                                 run.data.tokenizer_model or run.data.vocab_file)
    watch_launcher()
    # Our own log lines (which LayerNorm backend, dataset index builds) on rank 0; warnings everywhere.
    logging.basicConfig(level=logging.INFO if env.rank == 0 else logging.WARNING,
                        format="[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s")
    logging.getLogger("megatron_snm").info(memory)
    result = pretrain(run, tokenizer.vocab_size, env, eod=tokenizer.eod)
    dist.barrier()
    dist.destroy_process_group()
    return EXIT_CODES[result.stopped]


if __name__ == "__main__":
    sys.exit(main())
