"""The on-disk format of a checkpoint directory: its names, `latest`, weights-only loading, publishing.

    SAVE_DIR/latest              tag of the newest complete checkpoint (DeepSpeed's convention)
    SAVE_DIR/iter_0000100/       DeepSpeed's files, rng_state_RANK.pt, megatron_snm.json (metadata.py),
                                 manifest.json (manifest.py)

A checkpoint is written as `iter_N.tmp/` and published by `publish`: renamed to `iter_N/`, and only
then `latest` replaced (write + fsync + os.replace), so a kill at any moment leaves `latest` naming a
complete checkpoint. Every file is read with torch.load(weights_only=True), with only the handful of
DeepSpeed types its files contain allow-listed (`safe_globals`; DeepSpeed's own loader unpickles).
"""
from __future__ import annotations

import os
import re
import shutil

import torch

from megatron_snm.atomic import fsync_dir, write_atomically
from megatron_snm.checkpoint.errors import CheckpointError

LATEST = "latest"
METADATA = "megatron_snm.json"
LAYOUT_RECORD = "megatron_snm_layout"  # our entry in DeepSpeed's model files: see save_load.layout_record
TAG = re.compile(r"iter_\d{7}")


def tag_of(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def rng_file(rank: int) -> str:
    return f"rng_state_{rank:05d}.pt"


def safe_globals() -> list:
    """The non-tensor types inside DeepSpeed's checkpoint files (ZeRO's stage enum, the fp16 loss
    scalers, the optimizer state's fragment addresses)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def load_weights_only(path: str, map_location="cpu", mmap: bool = False):
    """One of a checkpoint's torch files, never unpickling anything but tensors and safe_globals()."""
    with torch.serialization.safe_globals(safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def read_latest(load_dir: str) -> str | None:
    """The tag `latest` names, checked to be a checkpoint directory inside `load_dir` (None: no
    `latest`). Raises CheckpointError for a broken `latest`."""
    path = os.path.join(load_dir, LATEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            tag = f.read().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is unreadable: {err}") from None
    if not TAG.fullmatch(tag) or not os.path.isdir(os.path.join(load_dir, tag)):
        raise CheckpointError(f"{path} names {tag[:80]!r}, which is not a checkpoint directory in {load_dir}; "
                              "write the tag of a complete iter_NNNNNNN directory there, or use --load-iteration")
    return tag


def publish(save_dir: str, iteration: int) -> str:
    """Publishes the complete `iter_N.tmp/` of `iteration`: renamed to `iter_N/` (replacing one that
    `latest` does not name, e.g. of a resumed run), then `latest` pointed at it. Returns the directory.
    Call on one process."""
    final_dir = os.path.join(save_dir, tag_of(iteration))
    if os.path.exists(final_dir):
        shutil.rmtree(final_dir)
    os.replace(final_dir + ".tmp", final_dir)
    fsync_dir(save_dir)
    write_atomically(os.path.join(save_dir, LATEST), tag_of(iteration))
    return final_dir
