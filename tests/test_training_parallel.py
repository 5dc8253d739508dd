"""Same losses, within fp32 tolerance, for a tiny GPT trained 10 steps on the same data: one
process vs TP=2, PP=2 (ZeRO 0 and 1), DP=2 under ZeRO 0-3 (one 2-process job), and on 4 processes
TP=2 x PP=2 and TP=2 x DP=2 under ZeRO-2; with --sequence-parallel (no dropout: its masks differ on
another sharding) under TP=2, with full and selective recompute, TP=2 x PP=2 and TP=2 x DP=2 under ZeRO-3.

The model is seeded per weight (independent of the layout), the data order depends only on the
global batch, and gradient clipping (--clip-grad 0.5) is active, so the global gradient norm must
be right under every layout too.
"""
import pytest

from tests.training_harness import TINY, run_configs

TWO_PROCESS_LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "pp2-zero1": ["--pipeline-model-parallel-size", "2", "--zero-stage", "1"],
    **{f"dp2-zero{z}": ["--zero-stage", str(z)] for z in range(4)},
    "tp2-sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "tp2-sp-full-recompute": ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                              "--recompute-granularity", "full"],
    "tp2-sp-selective-recompute": ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                   "--recompute-granularity", "selective"],
}
RTOL = 1e-5


@pytest.fixture(scope="module")
def single_process_runs():
    return run_configs(1, [TINY, TINY + ["--bf16", "--zero-stage", "1"]])


@pytest.fixture(scope="module")
def single(single_process_runs):
    return single_process_runs[0]


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


def test_bf16_tracks_fp32(single_process_runs):
    fp32, bf16 = single_process_runs
    assert bf16.skipped == [] and bf16.losses[10] < bf16.losses[1] - 0.1
    assert bf16.losses == pytest.approx(fp32.losses, rel=2e-2)
    assert bf16.losses != pytest.approx(fp32.losses, rel=1e-6)  # it really ran in bf16


@pytest.mark.parametrize("layout", TWO_PROCESS_LAYOUTS)
def test_two_process_layout_matches_single_process(layout, single, two_process):
    assert_same_run(two_process[layout], single)


FOUR_PROCESS_LAYOUTS = {
    "tp2-pp2": ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
    "tp2-dp2-zero2": ["--tensor-model-parallel-size", "2", "--zero-stage", "2"],
    "tp2-pp2-sp": ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel"],
    "tp2-dp2-zero3-sp": ["--tensor-model-parallel-size", "2", "--zero-stage", "3", "--sequence-parallel"],
}


@pytest.fixture(scope="module")
def four_process():
    results = run_configs(4, [TINY + flags for flags in FOUR_PROCESS_LAYOUTS.values()])
    return dict(zip(FOUR_PROCESS_LAYOUTS, results))


@pytest.mark.parametrize("layout", FOUR_PROCESS_LAYOUTS)
def test_four_process_layout_matches_single_process(layout, single, four_process):
    assert_same_run(four_process[layout], single)


@pytest.mark.parametrize("with_sp, without", [("tp2-sp", "tp2"), ("tp2-pp2-sp", "tp2-pp2")])
def test_sequence_parallel_matches_the_same_layout_without_it(with_sp, without, two_process, four_process):
    runs = {**two_process, **four_process}
    assert_same_run(runs[with_sp], runs[without])
