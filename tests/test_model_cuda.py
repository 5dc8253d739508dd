"""The model on a CUDA GPU (run with `pytest --cuda` on a GPU machine): the same weights as on the
CPU, the same outputs, bf16, and activation checkpointing replaying CUDA dropout masks."""
import pytest
import torch

from megatron_snm.model.config import GPTConfig
from megatron_snm.model.gpt import GPTModel
from megatron_snm.parallel import rng as tp_random
from tests.model_shapes import tiny

pytestmark = pytest.mark.cuda
TINY = tiny(hidden_size=128, seq_length=64)


def _batch(device):
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 500, (4, 64), generator=g).to(device),
            torch.randint(0, 500, (4, 64), generator=g).to(device))


def test_cuda_model_equals_cpu_model():
    torch.backends.cuda.matmul.allow_tf32 = False
    config = GPTConfig(**TINY)
    cpu = GPTModel(config)
    with torch.device("cuda"):
        gpu = GPTModel(config)
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        assert torch.equal(p, q.cpu()), name
    tokens, labels = _batch("cpu")
    torch.testing.assert_close(gpu(tokens.cuda(), labels.cuda()).cpu(), cpu(tokens, labels), rtol=1e-4, atol=1e-4)


def test_cuda_bf16_and_checkpoint_replays_dropout():
    tokens, labels = _batch("cuda")
    grads = []
    for ckpt in (False, True):
        config = GPTConfig(**TINY, params_dtype=torch.bfloat16, hidden_dropout=0.1, attention_dropout=0.1,
                           recompute_granularity="full" if ckpt else None)
        with torch.device("cuda"):
            model = GPTModel(config)
        tp_random.model_parallel_seed(5)
        loss = model(tokens, labels).mean()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for plain, ckpt in zip(*grads):
        assert torch.equal(plain, ckpt)
