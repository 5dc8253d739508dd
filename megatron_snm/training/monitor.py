"""Stability monitor: measures the paper's two mechanisms behind loss spikes in a model being trained.

1. Residual-stream growth: std of the hidden states after the embedding and after each block.
2. Norm gradient amplification: for each norm (LayerNorm or RMSNorm: model/norm.py), the norm of the
   gradient arriving at its output and of the gradient it sends to its input; their ratio is
   ~1/std(input) for LayerNorm and ~1/rms(input) for RMSNorm (figures keep the `ln_` names), so norms
   reading a small-std residual stream (shallow layers with a small-std embedding) blow the
   gradient up. Also the parameter-gradient norm of the embedding (its table, tied to the output
   layer, with the position table and Embed LN), of each block and of the final LayerNorm, so a
   spike in the global norm can be attributed.

And the signals of the instabilities the other levers target (Wortsman et al. 2023, "Small-scale proxies
for large-scale Transformer training instabilities"):
- `max_attention_logit/layer_NN`: the largest pre-softmax logit q.k / sqrt(d) of the block's attention
  (after QK-norm and rotary positions; over batch, heads and the causal positions), read from the q and
  k its core (model/attention.CoreAttention) receives; attention-logit growth is what QK-norm bounds.
  Megatron's --log-max-attention-logit reports the same. The heads are split over TP: max over the ranks.
- `log_z/mean`, `log_z/std`: log Z, the log of the output softmax's normaliser, per unmasked token of
  the captured micro-batches, taken from the loss's own cross entropy (model/gpt.GPTLoss), no second
  pass over the logits; its drift is output-logit divergence, what the z-loss pulls back.

    monitor = StabilityMonitor(model)      # any module containing our blocks/LayerNorms
    with monitor.capture():                # hooks exist only inside; nothing is registered otherwise
        loss = model(tokens, labels).mean()
        loss.backward()
    monitor.figures()  # {"residual_std/layer_01": 0.42, "ln_amplification/layer_01.ln_1": 17.3, ...}

Activation and LayerNorm figures are means over everything captured (several micro-batches, or a
checkpointed block's recompute, which measures the same values again). A block's grad_norm is the
root of the sum of squares of every gradient its parameters received while capturing; it covers
the full (all-rank) tensor-parallel parameters, so with TP > 1 every TP rank must call figures().
Activations and LayerNorms are replicated over TP ranks, except under --sequence-parallel, where each
rank sees its shard of the sequence: each captured tensor's count, sum and sum of squares are then
summed over the TP ranks, so the figures are those of the whole tensors, as without it. Parameter
gradients are read by tensor hooks as autograd produces them, not from .grad, which ZeRO may
partition or free.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
import torch.distributed as dist

from megatron_snm.model.attention import CoreAttention, max_attention_logit
from megatron_snm.model.embedding import GPTEmbedding
from megatron_snm.model.gpt import GPTLoss
from megatron_snm.model.norm import is_norm
from megatron_snm.model.transformer import FinalNorm, TransformerBlock
from megatron_snm.parallel import state
from megatron_snm.tensor_parallel.utils import is_tensor_parallel


def _block_name(block: TransformerBlock) -> str:
    return f"layer_{block.layer_number:02d}"


def parameter_owners(model: torch.nn.Module):
    """(name, module) for the modules whose parameters the figures are per-module for: the embedding
    (its tables and Embed LN), each block, the final norm; between them every weight but an untied
    output layer and a pipeline stage's tied copy of the token table."""
    for module in model.modules():
        if isinstance(module, GPTEmbedding):
            yield "embedding", module
        elif isinstance(module, TransformerBlock):
            yield _block_name(module), module
        elif isinstance(module, FinalNorm):
            yield "final_norm", module


def _moments(x: torch.Tensor) -> torch.Tensor:
    """(count, sum, sum of squares) of a tensor, in float64: what a std or a norm of the whole tensor
    needs from each of its shards."""
    x = x.detach().double()
    return torch.stack([x.new_tensor(x.numel()), x.sum(), x.pow(2).sum()])


def _std(count: float, total: float, squares: float) -> float:
    """The sample std (torch.std's) from the moments."""
    return (max(squares - total * total / count, 0.0) / max(count - 1, 1)) ** 0.5


class StabilityMonitor:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._captured: dict[str, list[torch.Tensor]] = defaultdict(list)  # figure -> each capture's moments
        self._grad_sq: dict[tuple[str, bool], float] = defaultdict(float)  # (module, tp-split) -> sum of squares
        self._max: dict[str, torch.Tensor] = {}  # figure -> the largest value captured on this rank
        self._log_z: list[torch.Tensor] = []  # each captured micro-batch's moments of log Z (same on every TP rank)
        self._handles: list = []

    def _record(self, key: str, value: torch.Tensor) -> None:
        self._captured[key].append(_moments(value))

    def _named_modules(self):
        """(figure name, module) for every embedding, block and LayerNorm, named by role and layer
        number so the names do not depend on how the model is wrapped or split into stages."""
        for module in self.model.modules():
            if isinstance(module, GPTEmbedding):
                yield "embedding", module
                if module.embedding_norm == "layernorm":
                    yield "embedding.norm", module.norm
            elif isinstance(module, TransformerBlock):
                name = _block_name(module)
                yield name, module
                yield f"{name}.ln_1", module.ln_1
                yield f"{name}.ln_2", module.ln_2
                yield name, module.attention.core_attention
            elif isinstance(module, FinalNorm):
                yield "final_norm", module  # its parameters' gradient norm
                yield "final_norm", module.norm  # its LayerNorm figures
            elif isinstance(module, GPTLoss):
                yield "log_z", module

    def _hooks(self, name: str, module: torch.nn.Module):
        if isinstance(module, (GPTEmbedding, TransformerBlock)):
            def residual_std(mod, inputs, output):
                self._record(f"residual_std/{name}", output)
            yield module.register_forward_hook(residual_std)
        if isinstance(module, (GPTEmbedding, TransformerBlock, FinalNorm)):
            for param in module.parameters():
                key = (name, is_tensor_parallel(param))
                def grad_sq(grad, key=key):
                    self._grad_sq[key] += float(grad.detach().float().pow(2).sum())
                yield param.register_hook(grad_sq)
        if isinstance(module, CoreAttention):
            key = f"max_attention_logit/{name}"
            def largest_logit(mod, inputs, output):  # inputs: q, k, v[, mask[, causal]]
                mask = inputs[3] if len(inputs) > 3 else None
                causal = inputs[4] if len(inputs) > 4 else True
                value = max_attention_logit(inputs[0], inputs[1], mask, causal)
                self._max[key] = value if key not in self._max else torch.maximum(self._max[key], value)
            yield module.register_forward_hook(largest_logit)
        if isinstance(module, GPTLoss):
            def log_z(mod, inputs, terms):
                values = terms.log_z if terms.loss_mask is None else terms.log_z[terms.loss_mask.bool()]
                self._log_z.append(_moments(values))
            yield module.register_forward_hook(log_z)
        if is_norm(module):  # LayerNorm or RMSNorm: both amplify by ~1 / the input's std (rms)
            def input_std(mod, inputs, output):
                self._record(f"ln_input_std/{name}", inputs[0])
            def grad_norms(mod, grad_input, grad_output):
                self._record(f"ln_grad_out/{name}", grad_output[0])
                self._record(f"ln_grad_in/{name}", grad_input[0])
            yield module.register_forward_hook(input_std)
            yield module.register_full_backward_hook(grad_norms)

    def start(self) -> None:
        """Starts measuring (afresh) the forward and backward passes that follow."""
        self._captured.clear(), self._grad_sq.clear(), self._max.clear(), self._log_z.clear()
        self._handles = [h for name, module in self._named_modules() for h in self._hooks(name, module)]

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def capture(self):
        """Measures the forward and backward passes run inside the block (starting afresh)."""
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def _whole(self) -> dict[str, torch.Tensor]:
        """Each figure's captures' moments [captures, 3], of the whole tensors (summed over the TP
        ranks' shards under sequence parallelism, in one all-reduce)."""
        keys = sorted(self._captured)
        if not keys:
            return {}
        stacked = [torch.stack(self._captured[key]) for key in keys]
        # Under --sequence-parallel each TP rank captured its shard of the sequence.
        if state.get_tensor_model_parallel_world_size() > 1 and any(
                isinstance(module, (GPTEmbedding, TransformerBlock)) and module.sequence_parallel
                for module in self.model.modules()):
            group = state.get_tensor_model_parallel_group()
            flat = torch.cat([s.flatten() for s in stacked]).to(state.collective_device(group))
            dist.all_reduce(flat, group=group)
            stacked = [part.view(-1, 3).cpu() for part in flat.split([s.numel() for s in stacked])]
        return dict(zip(keys, stacked))

    def figures(self) -> dict[str, float]:
        figures = {}
        for key, moments in self._whole().items():
            if key.startswith(("residual_std/", "ln_input_std/")):
                values = [_std(*row) for row in moments.tolist()]
            else:  # a gradient's L2 norm
                values = moments[:, 2].sqrt().tolist()
            figures[key] = sum(values) / len(values)
            if key.startswith("ln_input_std/"):  # RMSNorm's reference: it amplifies by ~1/rms(input)
                rms = [(row[2] / max(row[0], 1.0)) ** 0.5 for row in moments.tolist()]
                figures["ln_input_rms/" + key[len("ln_input_std/"):]] = sum(rms) / len(rms)
        for key in [k for k in figures if k.startswith("ln_grad_in/")]:
            name = key[len("ln_grad_in/"):]
            figures[f"ln_amplification/{name}"] = figures[key] / max(figures[f"ln_grad_out/{name}"], 1e-30)
        if self._log_z:  # log Z is all-reduced in the cross entropy: whole on every TP rank, nothing to sum
            count, total, squares = torch.stack(self._log_z).sum(dim=0).tolist()
            figures["log_z/mean"], figures["log_z/std"] = total / max(count, 1.0), _std(count, total, squares)
        maxima = sorted(self._max)
        if maxima:
            largest = torch.stack([self._max[key].float() for key in maxima])
            if state.get_tensor_model_parallel_world_size() > 1:  # each TP rank saw its own heads
                group = state.get_tensor_model_parallel_group()
                largest = largest.to(state.collective_device(group))
                dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
            figures.update(zip(maxima, largest.tolist()))
        owners = sorted({owner for owner, _ in self._grad_sq})
        if owners:
            split = torch.tensor([self._grad_sq[(o, True)] for o in owners], dtype=torch.float64)
            if state.get_tensor_model_parallel_world_size() > 1:
                group = state.get_tensor_model_parallel_group()
                split = split.to(state.collective_device(group))
                dist.all_reduce(split, group=group)
            for owner, split_sq in zip(owners, split.tolist()):
                figures[f"grad_norm/{owner}"] = (split_sq + self._grad_sq[(owner, False)]) ** 0.5
        return dict(sorted(figures.items()))
