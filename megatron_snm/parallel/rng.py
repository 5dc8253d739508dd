"""Random-number streams for tensor parallelism, and activation checkpointing that replays them.

Two streams, as in Megatron:
- the default generator (torch's global CPU generator, and the CUDA one where used) is seeded the
  same on every TP rank, so dropout on replicated activations (the residual stream) draws the same
  mask on every rank, which keeps the ranks' copies of those activations identical;
- the tracker's "model-parallel-rng" stream is seeded differently on each TP rank and is used (via
  `get_rng_tracker().fork()`) for dropout on activations that are split across TP ranks
  (attention probabilities of each rank's heads; with sequence parallelism each rank's shard of
  the sequence), so the ranks do not draw one mask for different elements. `dropout(module, x,
  split)` picks the stream.

`checkpoint(fn, *args)` recomputes `fn` in the backward pass instead of storing its activations. It
records the default generators' states and the tracker's states before the forward and restores
them for the recompute, so every dropout mask in the recompute equals the one of the forward.
"""
from __future__ import annotations

import contextlib

import torch

from megatron_snm.parallel import state

MODEL_PARALLEL_RNG = "model-parallel-rng"
# Offset between the data seed and the TP-rank seeds, Megatron's constant.
_TP_SEED_OFFSET = 2718


def _get_default_states() -> dict:
    """CPU and (where there is a GPU) current-device CUDA generator states. Always both, so a
    stream seeded before the first CUDA op still governs CUDA kernels later."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_default_states(states: dict) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])


class RNGStatesTracker:
    """Named generator states that can be swapped in for the default generators.

    Swapping states (rather than passing separate torch.Generator objects) is what lets kernels
    that only draw from the default generator, such as scaled_dot_product_attention's dropout,
    use the tracked stream.
    """

    def __init__(self):
        self._states: dict[str, dict] = {}
        self._seeds: set[int] = set()

    def reset(self) -> None:
        self._states.clear()
        self._seeds.clear()

    def get_states(self) -> dict:
        return {name: dict(s) for name, s in self._states.items()}

    def set_states(self, states: dict) -> None:
        self._states = {name: dict(s) for name, s in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self._seeds:
            raise ValueError(f"seed {seed} already used by another RNG stream")
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        saved = _get_default_states()
        torch.manual_seed(seed)  # seeds the CPU and every CUDA generator
        self._states[name] = _get_default_states()
        _set_default_states(saved)
        self._seeds.add(seed)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        """Draws from stream `name` inside the block; the default stream is left untouched."""
        if name not in self._states:
            raise RuntimeError(
                f"RNG stream {name!r} is not seeded: call megatron_snm.parallel.rng.model_parallel_seed(seed)"
            )
        saved = _get_default_states()
        _set_default_states(self._states[name])
        try:
            yield
        finally:
            self._states[name] = _get_default_states()
            _set_default_states(saved)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def model_parallel_seed(seed: int) -> None:
    """Seeds the default generators with `seed` (identical over TP ranks) and the model-parallel
    stream with seed + 2718 + tp_rank (different on each TP rank). Call once after the groups
    exist, on every rank; pipeline stages may add their own offset to `seed`."""
    torch.manual_seed(seed)
    _TRACKER.reset()
    _TRACKER.add(MODEL_PARALLEL_RNG, seed + _TP_SEED_OFFSET + state.get_tensor_model_parallel_rank())


def dropout(module: torch.nn.Dropout, x: torch.Tensor, split: bool) -> torch.Tensor:
    """`module(x)` drawing its mask from the tracker's stream where `x` is `split` over the TP ranks
    (each holds different elements), from the default stream (the same on every rank) otherwise."""
    if split and module.training and module.p > 0:
        with _TRACKER.fork():
            return module(x)
    return module(x)


class _CheckpointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, *args):
        ctx.fn = fn
        ctx.default_states = _get_default_states()
        ctx.tracker_states = _TRACKER.get_states()
        ctx.save_for_backward(*[a if torch.is_tensor(a) else None for a in args])
        ctx.non_tensors = [None if torch.is_tensor(a) else a for a in args]
        with torch.no_grad():
            return fn(*args)

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        inputs = [
            t.detach().requires_grad_(t.requires_grad) if t is not None else a
            for t, a in zip(saved, ctx.non_tensors)
        ]
        outer_default, outer_tracker = _get_default_states(), _TRACKER.get_states()
        _set_default_states(ctx.default_states)
        _TRACKER.set_states(ctx.tracker_states)
        try:
            with torch.enable_grad():
                outputs = ctx.fn(*inputs)
        finally:
            _set_default_states(outer_default)
            _TRACKER.set_states(outer_tracker)
        if torch.is_tensor(outputs):
            outputs = (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None,) + tuple(
            t.grad if torch.is_tensor(t) and t.requires_grad else None for t in inputs
        )


def checkpoint(fn, *args):
    """Returns fn(*args) without keeping fn's activations; they are recomputed in backward with
    the same random streams. At least one tensor argument must require grad (the hidden states
    entering a Transformer block always do)."""
    return _CheckpointFunction.apply(fn, *args)
