"""Pre-train a GPT: flags -> model, data, DeepSpeed engine -> train.

    deepspeed --num_gpus 2 pretrain_gpt.py --num-layers 2 ... --deepspeed_config ds.json
    torchrun --nproc_per_node 2 pretrain_gpt.py ...
    mpirun -np 2 python pretrain_gpt.py ...

`python pretrain_gpt.py --help` lists every flag. Exit status: 0 done, 2 bad configuration
(checked before any process group starts), 3 stopped because the run diverged.
"""
from __future__ import annotations

import logging
import os
import sys

import torch.distributed as dist

from megatron_snm.config import ConfigError, parse_args
from megatron_snm.data import build_train_valid_test_datasets
from megatron_snm.data.gpt_dataset import parse_data_path
from megatron_snm.data.tokenizers import build_tokenizer
from megatron_snm.parallel import distributed, state
from megatron_snm.training.loop import pretrain
from megatron_snm.training.memory_estimate import startup_estimate


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    env = distributed.discover()
    try:
        cfg.validate(env.world_size)
        if not cfg.data_path:
            raise ConfigError("--data-path is required")
        for prefix in parse_data_path(cfg.data_path)[0]:
            for suffix in (".bin", ".idx"):
                if not os.path.isfile(prefix + suffix):
                    raise ConfigError(f"--data-path: {prefix + suffix} does not exist (give the prefix that "
                                      "tools/preprocess_data.py wrote, e.g. out/c4_text_document)")
        if not cfg.tokenizer_type:
            raise ConfigError("--tokenizer-type is required (the model's vocabulary size is the tokenizer's)")
        tokenizer = build_tokenizer(cfg.tokenizer_type, cfg.vocab_file, cfg.merge_file, cfg.tokenizer_model)
        gpt_config = cfg.gpt_config(tokenizer.vocab_size)
        ds_config = cfg.build_deepspeed_config(env.world_size)
        memory_estimate = startup_estimate(cfg, env.world_size, tokenizer.vocab_size, ds_config)  # --device-memory
    except (ConfigError, ValueError, OSError) as err:
        print(f"pretrain_gpt.py: error: {err}", file=sys.stderr)
        return 2

    # Our own log lines (which LayerNorm backend, dataset index builds) on rank 0; warnings everywhere.
    logging.basicConfig(level=logging.INFO if env.rank == 0 else logging.WARNING,
                        format="[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s")
    logging.getLogger("megatron_snm").info(memory_estimate)
    distributed.initialize(env, cpu_shm_comm=cfg.cpu_shm_comm)
    state.initialize_model_parallel(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size)
    samples = cfg.global_batch_size
    num_samples = (cfg.train_iters * samples, cfg.eval_iters * samples, cfg.eval_iters * samples)

    # Every rank calls this; rank 0 builds and caches the sample indices, the others read them.
    datasets = build_train_valid_test_datasets(cfg.data_path, cfg.split, num_samples, cfg.seq_length, cfg.seed,
                                               cfg.data_cache_path)
    try:
        result = pretrain(cfg, gpt_config, ds_config, datasets)
    except ConfigError as err:  # e.g. --load names a checkpoint of another layout or model shape
        print(f"pretrain_gpt.py: error: {err}", file=sys.stderr)
        dist.destroy_process_group()
        return 2
    dist.barrier()
    dist.destroy_process_group()
    return 3 if result.diverged else 0


if __name__ == "__main__":
    sys.exit(main())
