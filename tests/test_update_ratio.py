"""The stability monitor's update/weight ratio (training/update_ratio.py), from a real run's
TensorBoard scalars: equal to RMS(w_after - w_before) / RMS(w_before) computed from the checkpoints
before and after the step; 0 on a step whose update the spike policy withheld; and the same figures
under TP=2, DP=2 with ZeRO-1, -2 and -3, and PP=2 as in one process; under bf16 the fp32 master
weights' update (DeepSpeed's wrappers keep them apart from the bf16 weights, which round it).

Monitor at steps 3, 6 and 9, and 7 (the step after a spike); step 6's loss is multiplied by 50 (a
spike over the 3-step mean, skipped with --skip-spiky-steps).
"""
import os

import pytest

from megatron_snm.checkpoint.format import tag_of
from megatron_snm.checkpoint.read import read_checkpoint
from tests.training_harness import INJECT_LOSS_ENV, TINY, run_configs

RUN = TINY + ["--log-stability-interval", "3", "--spike-window", "3", "--skip-spiky-steps"]
OWNERS = ["embedding"] + [f"layer_{n:02d}" for n in range(1, 5)] + ["final_norm"]
LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2"],
    "dp2-zero1": ["--zero-stage", "1"],
    "dp2-zero2": ["--zero-stage", "2"],
    "dp2-zero3": ["--zero-stage", "3"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
}


def ratios(tensorboard_dir) -> dict[int, dict[str, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    events.Reload()
    found: dict[int, dict[str, float]] = {}
    for tag in events.Tags()["scalars"]:
        if tag.startswith("stability/update_rms_ratio/"):
            for e in events.Scalars(tag):
                found.setdefault(e.step, {})[tag[len("stability/update_rms_ratio/"):]] = e.value
    return found


def owner(name: str) -> str:
    if name.startswith("layers."):
        return f"layer_{int(name.split('.')[1]) + 1:02d}"
    return name.split(".")[0]  # embedding, final_norm


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("update_ratio")
    os.environ[INJECT_LOSS_ENV] = "6:50"
    try:
        single, *bf16 = run_configs(1, [
            RUN + ["--tensorboard-dir", str(root / "single" / "tb"), "--save", str(root / "single" / "ckpt"),
                   "--save-interval", "1"],
            RUN + ["--bf16", "--tensorboard-dir", str(root / "bf16-zero0" / "tb")],
            RUN + ["--bf16", "--zero-stage", "1", "--tensorboard-dir", str(root / "bf16-zero1" / "tb")]])
        parallel = run_configs(2, [RUN + flags + ["--tensorboard-dir", str(root / name / "tb")]
                                   for name, flags in LAYOUTS.items()])
    finally:
        del os.environ[INJECT_LOSS_ENV]
    assert all(run.skipped == [6] for run in [single, *bf16, *parallel])
    return root


def test_equals_the_change_between_checkpoints(runs):
    figures = ratios(runs / "single" / "tb")
    assert sorted(figures) == [3, 6, 7, 9] and all(f.keys() == set(OWNERS) for f in figures.values())
    for step in (3, 7, 9):
        before = read_checkpoint(str(runs / "single" / "ckpt"), tag_of(step - 1)).weights
        after = read_checkpoint(str(runs / "single" / "ckpt"), tag_of(step)).weights
        squares = {name: [0.0, 0.0] for name in OWNERS}
        for name, weight in before.items():
            squares[owner(name)][0] += float((after[name].double() - weight.double()).pow(2).sum())
            squares[owner(name)][1] += float(weight.double().pow(2).sum())
        direct = {name: (u / w) ** 0.5 for name, (u, w) in squares.items()}
        print(f"\nstep {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in figures[step].items()))
        assert figures[step] == pytest.approx(direct, rel=1e-5)
        assert all(v > 1e-4 for v in direct.values())
    assert figures[6] == {name: 0.0 for name in OWNERS}  # the skipped spike moved nothing


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parallel_layouts_give_the_single_process_figures(runs, layout):
    single, parallel = ratios(runs / "single" / "tb"), ratios(runs / layout / "tb")
    assert sorted(parallel) == sorted(single)
    for step in single:
        assert parallel[step] == pytest.approx(single[step], rel=1e-4, abs=1e-9), step


def test_bf16_measures_the_fp32_master_weights(runs):
    """The bf16 weights move by whole bf16 steps (read from them, final_norm's ratio at step 9 came
    out twice the fp32 run's); the masters move as the fp32 run's weights do. Under ZeRO-1 (masters
    in flat partitions, fp32 gradient accumulation) to 1%; ZeRO-0's wrapper (a master per weight)
    accumulates gradients in bf16, so it is close only once training settles (step 9)."""
    fp32 = ratios(runs / "single" / "tb")
    zero1, zero0 = ratios(runs / "bf16-zero1" / "tb"), ratios(runs / "bf16-zero0" / "tb")
    for step in (3, 7, 9):
        assert zero1[step] == pytest.approx(fp32[step], rel=1e-2), step
    assert zero0[9] == pytest.approx(fp32[9], rel=5e-2)
    assert zero0[6] == zero1[6] == {name: 0.0 for name in OWNERS}
