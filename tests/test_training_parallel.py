"""Same losses, within fp32 tolerance, for a tiny GPT trained 10 steps on the same data: one
process vs TP=2, PP=2, DP=2 under ZeRO 0-3 (one 2-process job), and TP=2 x PP=2 on 4 processes.

The model is seeded per weight (independent of the layout), the data order depends only on the
global batch, and gradient clipping (--clip-grad 0.5) is active, so the global gradient norm must
be right under every layout too.
"""
import pytest

from tests.training_harness import TINY, run_configs

TWO_PROCESS_LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    **{f"dp2-zero{z}": ["--zero-stage", str(z)] for z in range(4)},
}
RTOL = 1e-5


@pytest.fixture(scope="module")
def single():
    return run_configs(1, [TINY])[0]


@pytest.fixture(scope="module")
def two_process():
    results = run_configs(2, [TINY + flags for flags in TWO_PROCESS_LAYOUTS.values()])
    return dict(zip(TWO_PROCESS_LAYOUTS, results))


def assert_same_run(run, reference):
    assert sorted(run.losses) == list(range(1, 11))
    assert run.losses == pytest.approx(reference.losses, rel=RTOL)
    assert run.valid_losses == pytest.approx(reference.valid_losses, rel=RTOL)
    assert run.test_loss == pytest.approx(reference.test_loss, rel=RTOL)
    assert run.skipped == []


def test_single_process_learns(single):
    assert single.losses[10] < single.losses[1] - 0.1
    assert single.valid_losses[10] < single.valid_losses[5]


@pytest.mark.parametrize("layout", TWO_PROCESS_LAYOUTS)
def test_two_process_layout_matches_single_process(layout, single, two_process):
    assert_same_run(two_process[layout], single)


def test_tp2_pp2_on_four_processes_matches_single_process(single):
    run = run_configs(4, [TINY + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]])[0]
    assert_same_run(run, single)
