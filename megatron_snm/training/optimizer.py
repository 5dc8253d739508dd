"""AdamW with Megatron's weight-decay groups, whose update can be withheld for one step.

DeepSpeed is given this optimizer (torch's AdamW, so no fused-Adam JIT build on CPU; the fused
CUDA kernel on GPU) and calls its `step()` after reducing, unscaling and clipping the gradients:
directly under ZeRO-0 in fp32, through its ZeRO / fp16 / bf16 wrappers otherwise. Withholding the
update here keeps the parameters and the Adam moments exactly as they were under every wrapper,
because the wrappers copy the (unchanged) fp32 master weights back to the model afterwards. That
is how a non-finite or spiky step is skipped: before each step the engine arms the optimizer
with the step's `UpdateGate` (a plain rule from training/spikes.py) and the step's global loss.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

from megatron_snm.model.embedding import GPTEmbedding, TiedOutputLayer, UntiedOutputLayer
from megatron_snm.parallel import state
from megatron_snm.tensor_parallel.utils import is_tensor_parallel
from megatron_snm.training.spikes import UpdateGate


def param_groups(model: torch.nn.Module, weight_decay: float, decay_embeddings: bool = True,
                 decoupled_lr: bool = False) -> list[dict]:
    """Two groups: with weight decay (matrices) and without (biases, norms, optionally embeddings).
    With `decoupled_lr` (Megatron's --decoupled-lr), the input embedding's and the output layer's token
    tables go to groups of their own, marked `decoupled_lr=True`, whose learning rate the trainer sets
    apart (TrainEngine.set_lr)."""
    embeddings, tables = set(), set()  # tables: what Megatron marks is_embedding_or_output_parameter
    for module in model.modules():
        if isinstance(module, GPTEmbedding):
            embeddings.update(id(p) for p in (module.word_embeddings.weight, module.position_embeddings)
                              if p is not None)
            tables.add(id(module.word_embeddings.weight))
        elif isinstance(module, TiedOutputLayer):
            embeddings.add(id(module.word_embeddings.weight))
            tables.add(id(module.word_embeddings.weight))
        elif isinstance(module, UntiedOutputLayer):
            tables.add(id(module.weight))
    groups: dict[tuple[bool, bool], list] = {}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        # A ZeRO-3 parameter built partitioned holds an empty placeholder; its real shape is ds_shape.
        ndim = len(getattr(param, "ds_shape", param.shape))
        exempt = ndim < 2 or (not decay_embeddings and id(param) in embeddings)
        groups.setdefault((not exempt, decoupled_lr and id(param) in tables), []).append(param)
    # DeepSpeed's ZeRO cannot flatten an empty group, so only the groups that hold parameters.
    return [dict(params=params, weight_decay=weight_decay if decay else 0.0, decoupled_lr=decoupled)
            for (decay, decoupled), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]


def global_grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """L2 norm of all gradients of the model, counting each weight once: TP-split weights on every
    TP rank, replicated ones on TP rank 0 only, and pipeline-tied copies (DeepSpeed's
    `ds_pipe_replicated`) only on their owning stage. Must be called on every model-parallel rank."""
    tp_rank0 = state.get_tensor_model_parallel_rank() == 0
    grads = [p.grad.detach() for p in params if p.grad is not None and not getattr(p, "ds_pipe_replicated", False)
             and (is_tensor_parallel(p) or tp_rank0)]
    squares = torch.zeros((), dtype=torch.float32, device=params[0].device)
    if grads:  # one fused pass over the gradients, no squared copies
        squares += torch.nn.utils.get_total_norm(grads, foreach=True).float().pow(2)
    if state.is_initialized() and dist.get_world_size(state.get_model_parallel_group()) > 1:
        dist.all_reduce(squares, group=state.get_model_parallel_group())
    return squares.sqrt()


class GatedAdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose update happens only when the armed `UpdateGate` allows it.

    The gate is consulted once per training step (DeepSpeed's ZeRO wrappers call step() once per
    parameter group) with the step's global batch loss, identical on every rank. When this
    optimizer is the engine's own (ZeRO-0, fp32) it also measures and clips the gradient norm,
    which DeepSpeed's wrappers do themselves otherwise: `clip_grad` > 0 clips, and the norm is
    exposed as `_global_grad_norm` and a skipped step as `overflow`, the attributes DeepSpeed's
    engine reads.
    """

    def __init__(self, params, *, measure_grad_norm: bool = False, clip_grad: float = 0.0, **adamw_kwargs):
        super().__init__(params, **adamw_kwargs)
        self.measure_grad_norm = measure_grad_norm
        self.clip_grad = clip_grad
        self._global_grad_norm = None
        self.overflow = False
        self._gate, self._batch_loss = UpdateGate(), None
        # None: the armed step has not been decided yet. Before the first training step the gate
        # is open (DeepSpeed's fp16/bf16 wrappers step once at start-up to create the Adam state).
        self._decision: bool | None = True

    def arm(self, gate: UpdateGate, batch_loss: Callable[[], float]) -> None:
        """Before a training step's forward passes: the rule for its update, and how to get its
        global batch loss once the gradients are in (a value, or a collective on the pipeline)."""
        self._gate, self._batch_loss, self._decision = gate, batch_loss, None

    @property
    def decided(self) -> bool:
        """Whether the armed step reached this optimizer (DeepSpeed skips non-finite fp16 steps
        before calling it)."""
        return self._decision is not None

    @property
    def updated(self) -> bool:
        """Whether the armed step's update was applied here."""
        return bool(self._decision)

    @torch.no_grad()
    def step(self, closure=None):
        if self._decision is None:
            norm = None
            if self.measure_grad_norm:
                params = [p for g in self.param_groups for p in g["params"]]
                norm = float(global_grad_norm(params))
                self._global_grad_norm = norm
                if self.clip_grad > 0 and math.isfinite(norm) and norm > self.clip_grad:
                    torch._foreach_mul_([p.grad for p in params if p.grad is not None],
                                        self.clip_grad / (norm + 1e-6))
            self._decision = self._gate.allows(self._batch_loss(), norm)
            self.overflow = not self._decision
        if self._decision:
            return super().step(closure)
        return None
