"""Checkpoints: crash-safe saving, checked and unpickling-free loading.

Layout of `--save DIR`:
    DIR/latest                      the tag of the newest complete checkpoint (DeepSpeed's convention)
    DIR/iter_0000100/               DeepSpeed's files: model (per TP rank / pipeline layer),
                                    optimizer (ZeRO shards per DP rank)
        megatron_snm.json           ours: iteration, consumed samples, spike state, the run's
                                    arguments, parallel sizes and model shape
        rng_state_00003.pt          ours: every rank's RNG states

Crash safety: a checkpoint is written as `iter_N.tmp/`, renamed to `iter_N/` when every rank has
finished, and only then is `latest` replaced (write + fsync + os.replace, atomic). A kill at any
moment leaves `latest` naming a complete checkpoint; a stale `.tmp` is removed by the next save.

Loading never unpickles arbitrary objects: every file goes through torch.load(weights_only=True),
with only the handful of DeepSpeed types its files contain allow-listed (DeepSpeed's own loader
uses weights_only=False).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from megatron_snm.config import ConfigError
from megatron_snm.parallel import random as tp_random

LATEST = "latest"
METADATA = "megatron_snm.json"
# Test hook "ITERATION:SECONDS": sleep inside the save of that iteration, after the data is written
# and before it is published, so a test can kill the run mid-save.
SLEEP_IN_SAVE_ENV = "MEGATRON_SNM_TEST_SLEEP_IN_SAVE"


def tag_of(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _safe_globals() -> list:
    """The non-tensor types inside DeepSpeed's checkpoint files (ZeRO's stage enum, the fp16 loss
    scalers, the optimizer state's fragment addresses)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine with weights_only loading."""

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = dict(python=random.getstate(), torch=torch.get_rng_state(),
                 numpy=[np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
                 tracker=tp_random.get_rng_tracker().get_states())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    tp_random.get_rng_tracker().set_states(state["tracker"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _write_atomically(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(engine, save_dir: str, iteration: int, metadata: dict) -> str:
    """Saves on every rank (collective). `metadata` (JSON-able) is written by rank 0."""
    rank = dist.get_rank()
    tag, tmp_tag = tag_of(iteration), tag_of(iteration) + ".tmp"
    final_dir, tmp_dir = os.path.join(save_dir, tag), os.path.join(save_dir, tmp_tag)
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)  # left by a save that was killed
    dist.barrier()
    engine.save_checkpoint(save_dir, tag=tmp_tag, save_latest=False)
    torch.save(_rng_state(), os.path.join(tmp_dir, f"rng_state_{rank:05d}.pt"))
    if rank == 0:
        with open(os.path.join(tmp_dir, METADATA), "w") as f:
            json.dump(dict(metadata, iteration=iteration), f, indent=1)
    if os.environ.get(SLEEP_IN_SAVE_ENV, "").startswith(f"{iteration}:"):
        time.sleep(float(os.environ[SLEEP_IN_SAVE_ENV].split(":")[1]))
    dist.barrier()
    if rank == 0:
        if os.path.exists(final_dir):  # re-saving an iteration `latest` does not name (a resumed run)
            shutil.rmtree(final_dir)
        os.replace(tmp_dir, final_dir)
        _fsync_dir(save_dir)
        _write_atomically(os.path.join(save_dir, LATEST), tag)
    dist.barrier()
    return final_dir


def read_latest(load_dir: str) -> str | None:
    path = os.path.join(load_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip()


def check_compatible(saved: dict, current: dict, checkpoint_dir: str) -> None:
    """Refuses a checkpoint of another parallel layout, ZeRO sharding or model shape (ConfigError)."""
    for key, flag in (("tensor_model_parallel_size", "--tensor-model-parallel-size"),
                      ("pipeline_model_parallel_size", "--pipeline-model-parallel-size")):
        if saved["parallel"][key] != current["parallel"][key]:
            raise ConfigError(f"checkpoint {checkpoint_dir} was saved with {flag} {saved['parallel'][key]}, "
                              f"this run uses {current['parallel'][key]}; resume with the same value")
    was, now = saved["parallel"], current["parallel"]
    if (was["zero_stage"] or now["zero_stage"]) and \
            (was["zero_stage"], was["data_parallel_size"]) != (now["zero_stage"], now["data_parallel_size"]):
        raise ConfigError(f"checkpoint {checkpoint_dir} holds ZeRO stage {was['zero_stage']} optimizer shards for "
                          f"{was['data_parallel_size']} data-parallel ranks; this run has ZeRO stage "
                          f"{now['zero_stage']} over {now['data_parallel_size']}: resume with the same layout")
    if saved["model_shape"] != current["model_shape"]:
        diff = {k: (saved["model_shape"].get(k), v) for k, v in current["model_shape"].items()
                if saved["model_shape"].get(k) != v}
        raise ConfigError(f"checkpoint {checkpoint_dir} holds a different model: "
                          + ", ".join(f"{k} saved {a} vs this run's {b}" for k, (a, b) in diff.items()))


def load_checkpoint(engine, load_dir: str, current: dict) -> dict | None:
    """Restores model, optimizer, RNG states; returns the saved metadata (None: nothing to load)."""
    tag = read_latest(load_dir)
    if tag is None:
        return None
    checkpoint_dir = os.path.join(load_dir, tag)
    with open(os.path.join(checkpoint_dir, METADATA)) as f:
        saved = json.load(f)
    if saved.get("weights_only"):
        return _load_weights_only(engine, load_dir, tag, saved, current)
    check_compatible(saved, current, checkpoint_dir)
    path, _ = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {checkpoint_dir}")
    rng_file = os.path.join(checkpoint_dir, f"rng_state_{dist.get_rank():05d}.pt")
    if os.path.isfile(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return saved


def _load_weights_only(engine, load_dir: str, tag: str, saved: dict, current: dict) -> dict:
    """A checkpoint of model weights alone (tools/convert_checkpoint.py writes them, e.g. from a
    Hugging Face model): the run starts from these weights with a fresh optimizer, at iteration 0,
    under any data-parallel size and ZeRO stage 0-2."""
    checkpoint_dir = os.path.join(load_dir, tag)
    if current["parallel"]["zero_stage"] == 3:
        raise ConfigError(f"checkpoint {checkpoint_dir} holds model weights only, which ZeRO stage 3 cannot start "
                          "from; use ZeRO stage 0-2 (--zero-stage), or train a few steps and save under ZeRO 0-2 first")
    layout = dict(saved["parallel"], data_parallel_size=current["parallel"]["data_parallel_size"],
                  zero_stage=current["parallel"]["zero_stage"])
    check_compatible(dict(saved, parallel=layout), current, checkpoint_dir)
    if saved["args"].get("openai_gelu", False) != current["args"].get("openai_gelu", False):
        raise ConfigError(f"checkpoint {checkpoint_dir} was made for " + ("" if saved["args"].get("openai_gelu") else "no ")
                          + "--openai-gelu (GELU's tanh approximation, as GPT-2); give the same setting")
    path, _ = engine.load_checkpoint(load_dir, tag=tag, load_module_only=True, load_optimizer_states=False,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {checkpoint_dir}")
    return saved
