"""Pre-train a GPT: flags -> model, data, DeepSpeed engine -> train.

    deepspeed --num_gpus 2 pretrain_gpt.py --num-layers 2 ... --deepspeed_config ds.json
    torchrun --nproc_per_node 2 pretrain_gpt.py ...
    mpirun -np 2 python pretrain_gpt.py ...

`python pretrain_gpt.py --help` lists every flag. Exit status: 0 done, 2 bad configuration,
data or checkpoint (one line naming the flag or file; the traceback with --debug or
MEGATRON_SNM_DEBUG=1; configuration errors are found before any process group starts), 3 stopped
because the run diverged.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback

import torch.distributed as dist

from megatron_snm.config import ConfigError, parse_args, resolve
from megatron_snm.data import build_train_valid_test_datasets
from megatron_snm.data.gpt_dataset import parse_data_path
from megatron_snm.data.tokenizers import build_tokenizer
from megatron_snm.parallel import distributed
from megatron_snm.parallel.launcher_watchdog import watch_launcher
from megatron_snm.training.trainer import build_run


def main(argv: list[str] | None = None) -> int:
    flags = parse_args(argv)
    try:
        return _main(flags)
    except (ValueError, OSError) as err:  # ConfigError, CheckpointError, data errors, I/O
        if flags.logging.debug or os.environ.get("MEGATRON_SNM_DEBUG"):
            traceback.print_exc()
        print(f"pretrain_gpt.py: error: {err}", file=sys.stderr, flush=True)
        return 2


def _main(flags) -> int:
    env = distributed.discover()
    # Everything that can be checked before any process group exists.
    run = resolve(flags, env.world_size)
    data = run.data
    if not data.data_path:
        raise ConfigError("--data-path is required")
    for prefix in parse_data_path(data.data_path)[0]:
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                raise ConfigError(f"--data-path: {prefix + suffix} does not exist (give the prefix that "
                                  "tools/preprocess_data.py wrote, e.g. out/c4_text_document)")
    if not data.tokenizer_type:
        raise ConfigError("--tokenizer-type is required (the model's vocabulary size is the tokenizer's)")
    tokenizer = build_tokenizer(data.tokenizer_type, data.vocab_file, data.merge_file, data.tokenizer_model)

    watch_launcher()
    # Our own log lines (which LayerNorm backend, dataset index builds) on rank 0; warnings everywhere.
    logging.basicConfig(level=logging.INFO if env.rank == 0 else logging.WARNING,
                        format="[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s")
    trainer = build_run(run, tokenizer.vocab_size, env=env)
    samples = run.batch.global_batch_size
    num_samples = (run.batch.train_iters * samples, run.eval.eval_iters * samples, run.eval.eval_iters * samples)
    # Every rank calls this; rank 0 builds and caches the sample indices, the others read them.
    datasets = build_train_valid_test_datasets(data.data_path, data.split, num_samples, run.model.seq_length,
                                               run.model.seed, data.data_cache_path, vocab_size=tokenizer.vocab_size)
    result = trainer.train(datasets)
    dist.barrier()
    dist.destroy_process_group()
    return 3 if result.diverged else 0


if __name__ == "__main__":
    sys.exit(main())
