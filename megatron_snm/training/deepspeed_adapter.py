"""Every place we reach into DeepSpeed beyond its public calls, in one file.

- `init_distributed`: starts torch.distributed through deepspeed.comm, every group with the run's
  timeout (torch's module default, which later groups take, is set: a reach into torch); on CPU it marks DeepSpeed's
  shared-memory all-reduce unavailable unless asked for (its JIT build takes a minute or more).
- `ParallelStateMPU`: our process groups (parallel/state.py) under the names DeepSpeed's `mpu`
  argument expects, so ZeRO shards over DP only and gradient norms count TP-split weights once.
- `initialize`: deepspeed.initialize with our optimizer (registered as one ZeRO supports: it is
  torch's AdamW, which ZeRO lists, with a gate in its step), our safe checkpoint engine installed,
  and the no-op gradient all-reduce of a single data-parallel rank switched off.
- `global_grad_norm`: the norm DeepSpeed measured in the step (or our optimizer, under ZeRO-0 fp32).
- `local_master`, `partitioned_over_data_parallel`: this rank's share of a parameter's fp32 master
  weights (ZeRO-1/2 and bf16: its fragment of the flat partition; ZeRO-3: its partition; the 16-bit
  wrapper of ZeRO-0: its copy, which `initialize` links to the parameter as ZeRO links fragments).
"""
from __future__ import annotations

import datetime
import os

import deepspeed
import torch
import torch.distributed as dist

from megatron_snm.parallel import state
from megatron_snm.parallel.distributed import DistEnv


def init_distributed(env: DistEnv, cpu_shm_comm: bool = False, timeout_minutes: float = 10.0) -> None:
    """Starts torch.distributed for `env` (NCCL on GPU, gloo on CPU) with `timeout_minutes` for every
    collective (--distributed-timeout-minutes). Idempotent."""
    import deepspeed.ops
    import torch.distributed.distributed_c10d as c10d

    # DeepSpeed and torch.distributed read the rendezvous from the environment.
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    if env.backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    elif not cpu_shm_comm:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    timeout = datetime.timedelta(minutes=timeout_minutes)
    # Every group made later (ours in parallel/state.py, DeepSpeed's pipeline and ZeRO groups) takes
    # torch's default timeout, 30 minutes for gloo, unless told: make the default the run's.
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend=env.backend, auto_mpi_discovery=False, timeout=timeout)


class ParallelStateMPU:
    get_data_parallel_group = staticmethod(state.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(state.get_data_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_src_rank = staticmethod(state.get_tensor_model_parallel_src_rank)
    get_model_parallel_group = staticmethod(state.get_model_parallel_group)

    @staticmethod
    def get_model_parallel_rank() -> int:
        return dist.get_rank(state.get_model_parallel_group())

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return dist.get_world_size(state.get_model_parallel_group())


def initialize(module: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict, *, pipelined: bool,
               optimizer_measures_norm: bool):
    """The DeepSpeed engine (a PipelineEngine when `module` is a PipelineModule)."""
    from megatron_snm.checkpoint.save_load import SafeCheckpointEngine

    allow_under_zero(type(optimizer))
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config,
                                      mpu=None if pipelined else ParallelStateMPU)
    if optimizer_measures_norm and engine.optimizer is not optimizer:
        raise RuntimeError("DeepSpeed wrapped the optimizer under ZeRO-0 fp32; gradient clipping would be lost")
    if optimizer_measures_norm and state.get_data_parallel_world_size() == 1:
        # One data-parallel rank: nothing to all-reduce, so spare DeepSpeed's flatten, no-op
        # all-reduce and copy-back of every gradient each step.
        engine.enable_backward_allreduce = False
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
    _link_16bit_masters(engine.optimizer)
    return engine


def _link_16bit_masters(optimizer) -> None:
    """DeepSpeed's 16-bit wrapper at ZeRO-0 (FP16_UnfusedOptimizer: ours is not its FusedAdam) keeps
    an fp32 copy of each parameter in a list of its own, unlinked to the parameter (ZeRO-1/2 and the
    bf16 optimizer link fragments as `_hp_mapping`): link each parameter to its copy, which the
    wrapper steps and loads in place."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(optimizer, FP16_UnfusedOptimizer):
        for params, masters in zip(optimizer.fp16_groups, optimizer.fp32_groups):
            for param, master in zip(params, masters):
                param._megatron_snm_master = master.data


def allow_under_zero(optimizer_class: type) -> None:
    """ZeRO accepts the optimizers it lists by exact type and warns "untested optimizer" on every
    run for anything else, subclasses included. Ours subclasses torch.optim.AdamW (listed) and only
    gates its step; our ZeRO 1-3 tests run it, so it joins the list."""
    from deepspeed.runtime.zero import utils as zero_utils

    if not issubclass(optimizer_class, torch.optim.AdamW):
        raise TypeError(f"{optimizer_class.__name__} is not torch.optim.AdamW; ZeRO has not been tested with it here")
    if optimizer_class not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(optimizer_class)


def global_grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)



def partitioned_over_data_parallel(param: torch.nn.Parameter) -> bool:
    """Whether the optimizer's fp32 master of this parameter is split over the data-parallel ranks
    (ZeRO-1/2 and the bf16 optimizer link each parameter to its fragment; ZeRO-3 partitions it)."""
    return hasattr(param, "_hp_mapping") or hasattr(param, "_z3_optimizer")


def local_master(param: torch.nn.Parameter) -> torch.Tensor:
    """This rank's share of the fp32 weights the optimizer updates: under ZeRO-1/2 and bf16 its
    fragment of the rank's flat partition (empty where the rank holds none of it), under ZeRO-3 its
    partition, under a 16-bit ZeRO-0 wrapper its fp32 copy, otherwise the parameter itself
    (DeepSpeed then steps our optimizer on it directly).
    A view: it changes with the optimizer's step."""
    if hasattr(param, "_megatron_snm_master"):
        return param._megatron_snm_master
    if hasattr(param, "_hp_mapping"):
        mapping = param._hp_mapping
        return mapping.get_hp_fragment() if mapping is not None else param.new_empty(0, dtype=torch.float32)
    if hasattr(param, "_z3_optimizer"):
        return param._z3_optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=True)[0]
    return param.data
