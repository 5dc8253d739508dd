"""Every file of a checkpoint with its size and checksum, recorded at save and verified at load.

    entry = file_entry(path)                      # each rank, for each file it wrote
    manifest = write_manifest(checkpoint_dir, mine)   # collective: every rank's entries, written by rank 0
    verify_manifest(checkpoint_dir)               # collective; raises CheckpointError naming the file

`DIR/iter_N/manifest.json` = {"files": {relative path: {"bytes": n, "blake2b": hex}}}. Each rank
hashes the files it wrote, and at load the files are split over the ranks (every world_size-th
file each), so a large checkpoint is hashed in parallel both ways.
Loading verifies every file before any state is touched: a file changed in place, truncated or
missing (an optimizer shard, a rank's RNG state) is refused, instead of loading and training on
garbage.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch.distributed as dist

from megatron_snm.checkpoint.errors import CheckpointError

MANIFEST = "manifest.json"


def _checksum(path: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: str) -> dict:
    return {"bytes": os.path.getsize(path), "blake2b": _checksum(path)}


def _my_share(items: list) -> list:
    return items[dist.get_rank()::dist.get_world_size()]


def _broadcast(value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def write_manifest(directory: str, mine: dict[str, dict]) -> dict:
    """Gathers every rank's {path relative to `directory`: file_entry} and writes the manifest on
    rank 0. Returns it."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    manifest = {"files": {k: v for part in everyone for k, v in part.items()}}
    if dist.get_rank() == 0:
        with open(os.path.join(directory, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
    return manifest


def _problem(directory: str, name: str, expected: dict) -> str | None:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return f"{path} is missing"
    size = os.path.getsize(path)
    if size != expected["bytes"]:
        return f"{path} has {size} bytes, the checkpoint wrote {expected['bytes']} (truncated or replaced)"
    if _checksum(path) != expected["blake2b"]:
        return f"{path} does not match its checksum (changed after it was written)"
    return None


def write_local_manifest(directory: str) -> None:
    """The manifest of a checkpoint one process wrote alone (tools/convert_checkpoint.py)."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            if name != MANIFEST:
                path = os.path.join(root, name)
                files[os.path.relpath(path, directory)] = file_entry(path)
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump({"files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def verify_manifest(directory: str, required: list[str] = ()) -> dict:
    """Returns the manifest's files; raises CheckpointError on every rank if any file of the
    manifest (or any of `required`) is missing, of another size or changed. A checkpoint without a manifest (written before manifests
    existed) is refused too, since nothing could say it is whole."""
    path = os.path.join(directory, MANIFEST)
    manifest, error = None, None
    if dist.get_rank() == 0:
        try:
            with open(path) as f:
                manifest = json.load(f)["files"]
        except FileNotFoundError:
            error = f"{path} is missing: the checkpoint is incomplete or was not written by this version"
        except (OSError, ValueError, KeyError, TypeError) as err:
            error = f"{path} is unreadable ({err})"
    manifest, error = _broadcast((manifest, error))
    if error is None:
        missing = [name for name in required if name not in manifest]
        problems = [_problem(directory, name, manifest[name]) for name in _my_share(sorted(manifest))]
        problems = [p for p in problems if p] + [f"{os.path.join(directory, m)} is not in the checkpoint" for m in missing]
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, problems)
        problems = sorted(p for part in everyone for p in part)
        if problems:
            error = problems[0] + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else "")
    if error:
        raise CheckpointError(f"refusing to load checkpoint {directory}: {error}")
    return manifest
