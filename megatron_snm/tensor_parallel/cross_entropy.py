"""Cross entropy over vocabulary-parallel logits, without ever gathering the full logits.

Each TP rank holds logits for its vocabulary range [start, end). Per token, in fp32:
    m      = all-reduce-max over ranks of the local max           (numerical stability)
    Z      = all-reduce-sum of sum_v exp(logit_v - m)
    l_tgt  = all-reduce-sum of the target's logit - m (only the rank owning the target adds it)
    loss   = log Z - l_tgt
Backward is softmax - onehot(target), computed locally from the saved local softmax.

`vocab_parallel_cross_entropy_and_log_z` also returns log Z + m, the log of the softmax's normaliser
of the unshifted logits (the same on every TP rank), as a differentiable output: an auxiliary loss on
it (PaLM's z-loss) costs no second pass over the logits, its gradient being softmax x d/d(log Z).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_snm.parallel import state
from megatron_snm.tensor_parallel.utils import vocab_range


def _all_reduce(x: torch.Tensor, op) -> torch.Tensor:
    if state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(x, op=op, group=state.get_tensor_model_parallel_group())
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target):
        ctx.input_dtype = logits.dtype
        logits = logits.float()
        world, rank = state.get_tensor_model_parallel_world_size(), state.get_tensor_model_parallel_rank()
        start, end = vocab_range(logits.shape[-1] * world, rank, world)

        logits_max = _all_reduce(logits.max(dim=-1).values, dist.ReduceOp.MAX)
        shifted = logits - logits_max.unsqueeze(-1)

        outside = (target < start) | (target >= end)
        local_target = (target - start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        target_logit = _all_reduce(target_logit, dist.ReduceOp.SUM)

        exp = shifted.exp_()
        sum_exp = _all_reduce(exp.sum(dim=-1), dist.ReduceOp.SUM)
        log_sum_exp = sum_exp.log()
        loss = log_sum_exp - target_logit

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, outside, local_target)
        return loss, log_sum_exp + logits_max

    @staticmethod
    def backward(ctx, grad_loss, grad_log_z):
        softmax, outside, local_target = ctx.saved_tensors
        # d loss / d logits = softmax - onehot(target); d log Z / d logits = softmax.
        grad = softmax * (grad_loss + grad_log_z).unsqueeze(-1)
        onehot = (~outside).to(grad.dtype) * grad_loss
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -onehot.unsqueeze(-1))
        return grad.to(ctx.input_dtype), None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token loss (fp32, shape of `target`) from this rank's vocabulary slice of the logits."""
    return _VocabParallelCrossEntropy.apply(logits, target)[0]


def vocab_parallel_cross_entropy_and_log_z(logits: torch.Tensor, target: torch.Tensor
                                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, per-token log Z), both fp32 of `target`'s shape and differentiable; log Z is the
    logsumexp of the token's logits over the whole (padded) vocabulary."""
    return _VocabParallelCrossEntropy.apply(logits, target)
