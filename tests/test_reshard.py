"""Resharding on load (checkpoint/reshard.py): a checkpoint saved under TP2, PP2, DP2 x ZeRO-1 or
DP2 x ZeRO-3 resumes in one process and under another layout, and its next 5 losses equal those
of a resume with the layout unchanged (weights and Adam's moments both restored: a lost moment
changes the first step after the resume). No dropout: RNG states are per rank and are not carried
into another layout. In bf16 (whose losses depend on the layout's rounding) a checkpoint loaded
into another layout and saved again holds exactly the state it was loaded from."""
import pytest
import torch

from megatron_snm.checkpoint.training_state import read_training_state
from megatron_snm.checkpoint.format import tag_of
from tests.training_harness import TINY, run_configs

RUN = TINY + ["--hidden-dropout", "0", "--attention-dropout", "0", "--lr-decay-iters", "10", "--eval-interval", "100"]
SAVED_AT = 5
LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "dp2-zero1": ["--zero-stage", "1"],
    "dp2-zero3": ["--zero-stage", "3"],
}
# Each saved layout resumes under another one of two processes.
OTHER = {"tp2": "dp2-zero3", "pp2": "tp2", "dp2-zero1": "pp2", "dp2-zero3": "dp2-zero1"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    dirs = {name: tmp_path_factory.mktemp(name) for name in LAYOUTS}
    two = {}
    for name, flags in LAYOUTS.items():
        two[f"{name}-save"] = RUN + flags + ["--train-iters", str(SAVED_AT), "--save", str(dirs[name])]
    for name, flags in LAYOUTS.items():
        two[f"{name}-resume-same"] = RUN + flags + ["--load", str(dirs[name])]
        two[f"{name}-resume-other"] = RUN + LAYOUTS[OTHER[name]] + ["--load", str(dirs[name])]
    one = {f"{name}-resume-one": RUN + ["--load", str(dirs[name])] for name in LAYOUTS}
    results = dict(zip(two, run_configs(2, list(two.values()))))
    results.update(zip(one, run_configs(1, list(one.values()))))
    return results, dirs


@pytest.mark.parametrize("saved", list(LAYOUTS))
@pytest.mark.parametrize("resumed", ["one", "other"])
def test_resharded_resume_continues_like_an_unchanged_one(runs, saved, resumed):
    results, _ = runs
    same, other = results[f"{saved}-resume-same"], results[f"{saved}-resume-{resumed}"]
    assert not isinstance(other, Exception), other
    assert sorted(same.losses) == sorted(other.losses) == list(range(SAVED_AT + 1, SAVED_AT + 6))
    for it in same.losses:
        assert other.losses[it] == pytest.approx(same.losses[it], rel=1e-5), (it, saved, resumed)
    assert other.test_loss == pytest.approx(same.test_loss, rel=1e-5)


def test_the_layout_free_state_is_the_same_from_every_layout(runs):
    """Weights and both moments, read layout-free, agree across the four saved layouts (which
    trained the same 5 steps)."""
    _, dirs = runs
    states = {name: read_training_state(str(dirs[name] / tag_of(SAVED_AT))) for name in LAYOUTS}
    reference = states.pop("tp2")
    assert reference.step == SAVED_AT
    for name, state in states.items():
        assert state.step == reference.step
        for key in ("exp_avg", "exp_avg_sq"):
            assert state.moments[key].keys() == reference.moments[key].keys()
            for param, tensor in reference.moments[key].items():
                torch.testing.assert_close(state.moments[key][param], tensor, rtol=1e-4, atol=1e-8, msg=(name, key, param))
        for param, tensor in reference.weights.items():
            torch.testing.assert_close(state.weights[param], tensor, rtol=1e-4, atol=1e-6, msg=(name, param))


BF16 = TINY + ["--bf16", "--train-iters", "3"]
# DeepSpeed keeps bf16 state four ways: without ZeRO in its fp16/bf16 wrapper (fp32 copies per
# parameter; TP2 here) or, under PP, in BF16_Optimizer's flat shards; ZeRO 1-2 and ZeRO 3 shards.
BF16_LAYOUTS = {"tp2": ["--tensor-model-parallel-size", "2"], "pp2": ["--pipeline-model-parallel-size", "2"],
                "dp2-zero1": ["--zero-stage", "1"], "dp2-zero3": ["--zero-stage", "3"]}
BF16_MOVES = [("tp2", "dp2-zero3"), ("pp2", "dp2-zero1"), ("dp2-zero1", "tp2"), ("dp2-zero3", "pp2"), ("dp2-zero1", "one")]


@pytest.fixture(scope="module")
def bf16_moves(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    run_configs(2, [BF16 + flags + ["--save", str(root / name)] for name, flags in BF16_LAYOUTS.items()])
    two = [(a, b) for a, b in BF16_MOVES if b != "one"]
    # --train-iters as saved: the run loads, trains nothing and saves in its own layout.
    results = run_configs(2, [BF16 + BF16_LAYOUTS[b] + ["--load", str(root / a), "--save", str(root / f"{a}-{b}")]
                              for a, b in two])
    results += run_configs(1, [BF16 + ["--load", str(root / a), "--save", str(root / f"{a}-{b}")]
                               for a, b in BF16_MOVES if b == "one"])
    return root, results


@pytest.mark.parametrize("move", BF16_MOVES, ids=lambda move: "-to-".join(move))
def test_bf16_state_survives_a_move_exactly(bf16_moves, move):
    root, results = bf16_moves
    assert not any(isinstance(r, Exception) for r in results), results
    before, after = (read_training_state(str(root / name / tag_of(3))) for name in (move[0], "-".join(move)))
    assert after.step == before.step
    for param, tensor in before.weights.items():
        assert torch.equal(after.weights[param], tensor), param
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(after.moments[key][param], before.moments[key][param]), (key, param)
