"""How far one optimizer step moved each module's weights, relative to their size.

    update_rms_ratio/<module> = RMS(w_after - w_before) / RMS(w_before)

over every parameter of the module, for the stability monitor's owners (`embedding`, `layer_NN`,
`final_norm`: training/monitor.py). Wortsman et al. 2023 ("Small-scale proxies for large-scale
Transformer training instabilities") follow this ratio: Adam's normalised update stays roughly
lr-sized while a weight's RMS can shrink, and a ratio that grows marks a module whose weights
the optimizer is about to rewrite. The difference includes weight decay: it is the step as applied.
Both RMS run over the same elements, so the ratio is ||w_after - w_before|| / ||w_before||.

    updates = UpdateRatio(model)
    updates.snapshot()       # before the step: a copy of this rank's parameters
    ... the training step ...
    updates.figures()        # after it (collective): {"update_rms_ratio/layer_01": 1.3e-3, ...}

Measured on the fp32 weights the optimizer updates, observed from outside it (the update of a
bf16 run is the master weights', which the bf16 copies would round away): each rank reads its share
(training/deepspeed_adapter.local_master: the parameter under ZeRO-0 fp32, its fragment of the flat
partition under ZeRO-1/2 and bf16, its partition under ZeRO-3). Sums of squares are added over
the data-parallel ranks where the masters are split, then over the tensor-parallel ranks for
TP-split weights (replicated ones count once); each pipeline stage measures its own modules. A
step whose update the spike policy withheld moved nothing and reads 0.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_snm.parallel import state
from megatron_snm.tensor_parallel.utils import is_tensor_parallel
from megatron_snm.training import deepspeed_adapter
from megatron_snm.training.monitor import parameter_owners


class UpdateRatio:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        # Between snapshot() and figures(): a copy of this rank's share of the fp32 master weights
        # (4 bytes a parameter of the rank's model; 4/DP under ZeRO), held only over the monitor's
        # capture steps.
        self._before: list[tuple[str, bool, torch.nn.Parameter, torch.Tensor]] = []

    def _local(self):
        """(owner, TP-split, parameter, this rank's values of it) for every owned parameter."""
        for owner, module in parameter_owners(self.model):
            for param in module.parameters():
                yield owner, is_tensor_parallel(param), param, deepspeed_adapter.local_master(param)

    @torch.no_grad()
    def snapshot(self) -> None:
        self._before = [(owner, split, param, values.detach().clone())
                        for owner, split, param, values in self._local()]

    @torch.no_grad()
    def figures(self) -> dict[str, float]:
        """The ratios since snapshot() (collective over TP, and over DP under ZeRO-3); {} without one."""
        if not self._before:
            return {}
        owners = sorted({owner for owner, *_ in self._before})
        # [owner, TP-split?, (update squares, weight squares)]
        squares = torch.zeros(len(owners), 2, 2, dtype=torch.float64)
        partitioned = False
        for owner, split, param, before in self._before:
            after = deepspeed_adapter.local_master(param).detach()
            row = squares[owners.index(owner), int(split)]
            row[0] += (after.double() - before.double()).pow(2).sum()
            row[1] += before.double().pow(2).sum()
            partitioned |= deepspeed_adapter.partitioned_over_data_parallel(param)
        self._before = []
        if partitioned and state.get_data_parallel_world_size() > 1:
            squares = self._all_reduce(squares, state.get_data_parallel_group())
        if state.get_tensor_model_parallel_world_size() > 1:
            split = self._all_reduce(squares[:, 1].contiguous(), state.get_tensor_model_parallel_group())
            squares = torch.stack([squares[:, 0], split], dim=1)
        update, weight = squares.sum(dim=1).unbind(-1)
        return {f"update_rms_ratio/{owner}": (u / w) ** 0.5
                for owner, u, w in zip(owners, update.tolist(), weight.tolist()) if w > 0}

    @staticmethod
    def _all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
        tensor = tensor.to(state.collective_device(group))
        dist.all_reduce(tensor, group=group)
        return tensor.cpu()
