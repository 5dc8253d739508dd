"""LR: linear warm-up to --lr, cosine or linear decay to --min-lr at --lr-decay-iters, then flat."""
import math

import pytest

from megatron_snm.training.lr_schedule import LRSchedule


def test_warmup_then_cosine():
    s = LRSchedule(max_lr=1e-3, min_lr=1e-4, warmup=10, decay=110, style="cosine")
    assert s(1) == pytest.approx(1e-4) and s(5) == pytest.approx(5e-4) and s(10) == pytest.approx(1e-3)
    assert s(60) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half-way: cos(pi/2) = 0
    assert s(35) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert s(110) == pytest.approx(1e-4) and s(500) == pytest.approx(1e-4)
    lrs = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_linear_and_constant():
    linear = LRSchedule(max_lr=2.0, min_lr=0.0, warmup=0, decay=100, style="linear")
    assert [linear(i) for i in (0, 25, 50, 100, 200)] == pytest.approx([2.0, 1.5, 1.0, 0.0, 0.0])
    constant = LRSchedule(max_lr=3.0, min_lr=0.0, warmup=4, decay=10, style="constant")
    assert [constant(i) for i in (1, 2, 4, 5, 1000)] == pytest.approx([0.75, 1.5, 3.0, 3.0, 3.0])


def test_unknown_style_is_an_error():
    with pytest.raises(ValueError, match="--lr-decay-style"):
        LRSchedule(1.0, 0.0, 0, 10, style="step")(5)
