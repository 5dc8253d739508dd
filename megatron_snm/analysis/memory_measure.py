"""What a training run's process really allocates: the figure the estimate (memory_estimate.py) is
held against.

    with PeakMemory() as peak:
        ...build the engine, train a few steps...
    peak.tracked_bytes   # high-water mark of torch's live allocations since entering
    peak.rss_bytes       # high-water mark of the resident set above what it was on entering

    with SavedActivations(model) as saved:
        ...a forward pass...
    saved.bytes          # what autograd keeps for the backward pass: the activations, no transients

`tracked_bytes` replays every allocation and free that torch's CPU allocator reports to the
profiler (`profile_memory=True`: each tensor, DeepSpeed's buffers and our C++ extensions' outputs
included, sized as allocated, so an untouched `torch.empty` bucket counts as it would on a GPU) and
takes the maximum of the running sum: the same quantity as `torch.cuda.max_memory_allocated` on a
GPU. The profiler sees the allocations and frees of the thread that entered only: a tensor
allocated here and freed on another thread (e.g. DeepSpeed's flattened gradient bucket, whose last
reference a gloo worker drops) reports no free. The replay notices such a free when the allocator
hands the same address out again, which it cannot do while the block is live; one never reused
stays counted, so `tracked_bytes` can only err high. `rss_bytes` is the operating system's view (Linux
VmHWM, reset on entering through /proc/self/clear_refs): it adds the allocator's and the
libraries' own memory and leaves out pages never touched.
"""
from __future__ import annotations

import gc
import re
from pathlib import Path

import torch
from torch._C._profiler import _ExtraFields_Allocation
from torch.profiler import ProfilerActivity, profile


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


class PeakMemory:
    """Peak of this process's torch allocations (and resident set) inside the `with` block."""

    def __init__(self):
        self.tracked_bytes = 0
        self.rss_bytes = 0

    def __enter__(self) -> "PeakMemory":
        gc.collect()  # what earlier work left to the garbage collector must not be freed inside the window
        self._rss_at_start = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False)
        self._profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._profiler.__exit__(*exc)
        self.rss_bytes = (_status_kib("VmHWM") - self._rss_at_start) * 1024
        self.tracked_bytes = _replay_peak(self._profiler.profiler.kineto_results.experimental_event_tree())


class SavedActivations:
    """Bytes of the distinct storages autograd saves for the backward pass inside the `with` block,
    `model`'s parameters left out: a forward pass's activation memory, exactly, without the
    transients (collective buffers, temporaries) that a peak also sees. Saved tensors stay alive
    until the backward pass, so no storage address is reused inside the block."""

    def __init__(self, model: torch.nn.Module):
        self._parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._storages: dict[int, int] = {}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._parameters:
            self._storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self) -> "SavedActivations":
        self._storages.clear()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())


def _cpu_allocations(roots) -> list[tuple[int, int, int]]:
    """(time, address, bytes) of every CPU allocation (bytes > 0) and free (bytes < 0), in time order."""
    found, stack = [], list(roots)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        fields = node.extra_fields
        if isinstance(fields, _ExtraFields_Allocation) and fields.device.type == "cpu":
            found.append((node.start_time_ns, fields.ptr, fields.alloc_size))
    return sorted(found)


def _replay_peak(roots) -> int:
    """Maximum of the running sum of allocations minus frees, relative to the start of the window."""
    live_blocks: dict[int, int] = {}
    live = peak = 0
    for _, address, nbytes in _cpu_allocations(roots):
        if nbytes > 0:
            live -= live_blocks.pop(address, 0)  # handed out again: it was freed unseen, on another thread
            live_blocks[address] = nbytes
        else:
            live_blocks.pop(address, None)  # a block allocated before the window lowers the sum as well
        live += nbytes
        peak = max(peak, live)
    return peak


def random_micro_batches(vocab_size: int, seq_length: int, micro_batch_size: int, seed: int):
    """Endless (tokens, labels) micro-batches of uniform random tokens, the same on every rank for a seed."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        text = torch.randint(0, vocab_size, (micro_batch_size, seq_length + 1), generator=generator)
        yield text[:, :-1].contiguous(), text[:, 1:].contiguous()


def measure_training(run, model_config, steps: int, seed: int = 0) -> dict:
    """Builds the training engine (training/engine.py) and runs `steps` global batches on random
    tokens inside PeakMemory. Needs torch.distributed and parallel/state.py's groups. Returns the
    peaks and each step's loss."""
    from megatron_snm.parallel import state
    from megatron_snm.training.engine import TrainEngine
    from megatron_snm.training.spikes import UpdateGate

    # Every data-parallel rank draws its own micro-batches; TP and PP peers draw the same ones.
    batches = random_micro_batches(model_config.vocab_size, run.model.seq_length, run.batch.micro_batch_size,
                                   seed + state.get_data_parallel_rank())
    with PeakMemory() as peak:
        engine = TrainEngine(run, model_config)
        engine.set_lr(run.optim.lr)
        losses = [engine.train_step(batches, UpdateGate()).loss for _ in range(steps)]
    del engine
    return dict(tracked_bytes=peak.tracked_bytes, rss_bytes=peak.rss_bytes, losses=losses)


def measure_run(argv: list[str], vocab_size: int, steps: int, seed: int = 0) -> dict:
    """One rank's measured peaks next to the estimate for its pipeline stage, for pretrain_gpt.py's
    flags `argv`. Needs torch.distributed initialised; sets up and tears down parallel/state.py's groups."""
    import torch.distributed as dist

    from megatron_snm.config import parse_args, resolve
    from megatron_snm.parallel import state
    from megatron_snm.training import memory_estimate
    from megatron_snm.training.deepspeed_adapter import init_distributed
    from megatron_snm.parallel.distributed import discover
    from megatron_snm.training.zero3 import apply_zero_defaults

    world = dist.get_world_size()
    run = resolve(parse_args(argv), world)
    model_config = run.model_config(vocab_size)
    estimate = memory_estimate.estimate_memory(memory_estimate.plan_from_config(
        run, vocab_size, apply_zero_defaults(run.deepspeed, model_config, run.dims.tensor)))
    init_distributed(discover())
    state.initialize_model_parallel(run.dims.tensor, run.dims.pipeline)
    try:
        stage = state.get_pipeline_model_parallel_rank()
        measured = measure_training(run, model_config, steps, seed)
    finally:
        state.destroy_model_parallel()
    # On a CPU the device is the host: what an offload moves to host memory is in the same process.
    estimated = estimate.stages[stage].peak_bytes + estimate.stages[stage].host_bytes
    return dict(measured, rank=dist.get_rank(), stage=stage, estimated_bytes=estimated)
