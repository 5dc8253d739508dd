"""Resuming continues exactly: N steps + save + resume + M steps == N + M steps straight (CPU,
fp32, with dropout, so the RNG states must come back too), under DP=2 with ZeRO-1 optimizer
shards and under PP=2; and a checkpoint of another model shape is refused clearly (one of another
layout is resharded: tests/test_reshard.py)."""
import pytest

from megatron_snm.config import ConfigError
from megatron_snm.checkpoint.format import read_latest, tag_of
from tests.training_harness import TINY, run_configs

RUN = TINY + ["--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--lr-decay-iters", "10"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    zero1, pipe = tmp_path_factory.mktemp("zero1"), tmp_path_factory.mktemp("pipe")
    zero, pp = ["--zero-stage", "1"], ["--pipeline-model-parallel-size", "2"]
    configs = {
        "zero1-straight": RUN + zero,
        "zero1-first": RUN + zero + ["--train-iters", "6", "--save", str(zero1)],
        "zero1-resumed": RUN + zero + ["--load", str(zero1), "--save", str(zero1)],
        "refuse-shape": RUN + zero + ["--ffn-hidden-size", "64", "--load", str(zero1)],
        "pp-straight": RUN + pp,
        "pp-first": RUN + pp + ["--train-iters", "6", "--save", str(pipe)],
        "pp-resumed": RUN + pp + ["--load", str(pipe), "--save", str(pipe)],
    }
    results = dict(zip(configs, run_configs(2, list(configs.values()))))
    return results, zero1, pipe


@pytest.mark.parametrize("layout", ["zero1", "pp"])
def test_resume_continues_exactly(runs, layout):
    results, zero1, pipe = runs
    straight, first, resumed = (results[f"{layout}-{part}"] for part in ("straight", "first", "resumed"))
    assert sorted(first.losses) == [1, 2, 3, 4, 5, 6]
    assert sorted(resumed.losses) == [7, 8, 9, 10]
    for it in range(1, 7):
        assert first.losses[it] == pytest.approx(straight.losses[it], rel=1e-6)
    for it in range(7, 11):
        assert resumed.losses[it] == pytest.approx(straight.losses[it], rel=1e-6)
    assert resumed.valid_losses[10] == pytest.approx(straight.valid_losses[10], rel=1e-6)
    assert resumed.test_loss == pytest.approx(straight.test_loss, rel=1e-6)
    assert read_latest(zero1 if layout == "zero1" else pipe) == tag_of(10)


def test_refuses_other_model_shape(runs):
    err = runs[0]["refuse-shape"]
    assert isinstance(err, ConfigError)
    assert "ffn_hidden_size saved 128 vs this run's 64" in str(err)
