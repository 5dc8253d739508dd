"""A training run's checkpoints through DeepSpeed's engine: crash-safe saving (sync or --async-save),
checked and unpickling-free loading (resharded when the layout differs, reshard.py), retention, and
the run metadata with its compatibility check. The trainer calls these; nothing here knows it.

Layout of `--save DIR`:
    DIR/latest                      the tag of the newest complete checkpoint (DeepSpeed's convention)
    DIR/iter_0000100/               DeepSpeed's files: model (per TP rank / pipeline layer),
                                    optimizer (ZeRO shards per DP rank)
        megatron_snm.json           ours: iteration, consumed samples, spike state, the run's
                                    arguments, tokenizer, parallel sizes and model shape
        tokenizer/                  ours: a copy of the run's tokenizer files (checkpoint/tokenizer.py)
        rng_state_00003.pt          ours: every rank's RNG states

        manifest.json               ours: every file's size and checksum (manifest.py)

Crash safety: a checkpoint is written as `iter_N.tmp/`, renamed to `iter_N/` when every rank has
finished, and only then is `latest` replaced (format.publish). A kill at any
moment leaves `latest` naming a complete checkpoint; a stale `.tmp` is removed by the next save.
A failed write (full disk, read-only file system) on any rank removes the partial checkpoint and
raises CheckpointError everywhere. Loading reads the tag on rank 0 and broadcasts it (all ranks
load the same checkpoint) and verifies every file against the manifest first.

Loading never unpickles arbitrary objects: every file goes through torch.load(weights_only=True),
with only the handful of DeepSpeed types its files contain allow-listed (DeepSpeed's own loader
uses weights_only=False).
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from megatron_snm.checkpoint.background_writer import BackgroundWriter, cpu_copy
from megatron_snm.checkpoint.errors import CheckpointError
from megatron_snm.checkpoint.format import (LAYOUT_RECORD, METADATA, TAG, load_weights_only, publish, read_latest,
                                            rng_file, tag_of)
from megatron_snm.checkpoint.manifest import file_entry, verify_manifest, write_manifest
from megatron_snm.checkpoint.metadata import model_description
from megatron_snm.checkpoint.reshard import load_resharded
from megatron_snm.config import ConfigError, RunConfig
from megatron_snm.model.config import GPTConfig
from megatron_snm.model.describe import ModelDescription
from megatron_snm.parallel import rng, state
from megatron_snm.pipeline.module import full_parameter_names


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, ours in three ways:
    - loading is weights_only (no arbitrary unpickling);
    - a failed write (full disk, read-only file system) is recorded, not raised in the middle of
      DeepSpeed's save, where the other ranks would wait in a barrier forever;
    - each file written is hashed for the manifest, and with `asynchronous` the state is copied to
      CPU memory and written by a background thread, so training goes on during the write.
    """

    def __init__(self, config_params=None):
        super().__init__(config_params)
        self.writer: BackgroundWriter | None = None
        self.save_errors: list[str] = []
        self.written: dict[str, dict] = {}  # path -> manifest entry

    def begin(self, asynchronous: bool) -> None:
        self.save_errors, self.written = [], {}
        if asynchronous and self.writer is None:
            self.writer = BackgroundWriter()
        elif not asynchronous:
            self.writer = None

    def save(self, state_dict, path: str):
        self.write(path, lambda: torch.save(state_dict, path, _use_new_zipfile_serialization=self.zipfile_serialization),
                   copy=lambda: state_dict)

    def save_object(self, obj, path: str) -> None:
        self.save(obj, path)

    def save_text(self, text: str, path: str) -> None:
        def write():
            with open(path, "w") as f:
                f.write(text)
        self.write(path, write)

    def write(self, path: str, write, copy=None) -> None:
        if self.writer is None:
            self._write(path, write)
            return
        if copy is not None:  # the training step after this one changes the tensors: write a copy
            snapshot = cpu_copy(copy())
            write = lambda: torch.save(snapshot, path, _use_new_zipfile_serialization=self.zipfile_serialization)  # noqa: E731
        self.writer.submit(lambda: self._write(path, write))

    def _write(self, path: str, write) -> None:
        try:
            write()
            self.written[path] = file_entry(path)
        except (OSError, RuntimeError) as err:  # torch's zip writer reports a full disk as a RuntimeError
            self.save_errors.append(_write_error(path, err))

    def load(self, path: str, map_location=None):
        return load_weights_only(path, map_location)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = dict(python=random.getstate(), torch=torch.get_rng_state(),
                 numpy=[np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
                 tracker=rng.get_rng_tracker().get_states())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    rng.get_rng_tracker().set_states(state["tracker"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _write_error(path: str, err: Exception) -> str:
    free = shutil.disk_usage(os.path.dirname(path)).free
    return f"writing {path} failed ({type(err).__name__}: {str(err).splitlines()[0]}; {free} bytes free on its file system)"


def _all_errors(errors: list[str]) -> list[str]:
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, errors)
    return [e for part in everyone for e in part]


def start_checkpoint(engine, save_dir: str, iteration: int, metadata: dict,
                     before_publish: Callable[[int], None] | None = None, asynchronous: bool = False) -> "PendingSave":
    """Writes (or, `asynchronous`, copies and starts writing) this rank's files of the checkpoint of
    `iteration` under `iter_N.tmp/` (collective). `metadata` (JSON-able) is written by rank 0.
    The checkpoint is published by the returned PendingSave's finish()."""
    rank = dist.get_rank()
    tmp_dir = os.path.join(save_dir, tag_of(iteration) + ".tmp")
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)  # left by a save that was killed
    dist.barrier()
    writer = engine.checkpoint_engine
    writer.begin(asynchronous)
    target = tmp_dir
    try:
        # Our record of this rank's layout goes into DeepSpeed's model file: it lets any other layout
        # read the state back (checkpoint/reshard.py).
        record = layout_record(engine, model_description(metadata))
        engine.save_checkpoint(save_dir, tag=os.path.basename(tmp_dir), save_latest=False,
                               client_state={LAYOUT_RECORD: record})
        target = os.path.join(tmp_dir, rng_file(rank))
        writer.save_object(_rng_state(), target)
        if rank == 0:
            from megatron_snm.checkpoint.tokenizer import save_tokenizer_files  # it imports checkpoint/read.py, which imports us

            target = os.path.join(tmp_dir, "tokenizer")
            save_tokenizer_files(writer, tmp_dir, metadata)
            target = os.path.join(tmp_dir, METADATA)
            writer.save_text(json.dumps(dict(metadata, iteration=iteration), indent=1), target)
    except (OSError, RuntimeError) as err:
        writer.save_errors.append(_write_error(target, err))
    return PendingSave(writer, save_dir, iteration, before_publish)


class PendingSave:
    """A checkpoint whose files are written (or being written) under `iter_N.tmp/`, not yet
    published. finish() waits for this rank's writes, gathers every rank's errors and file
    checksums, writes the manifest, renames `iter_N.tmp/` to `iter_N/` and only then replaces
    `latest`. A failed write on any rank removes the partial checkpoint, leaves `latest` as it was
    and raises CheckpointError on every rank. A kill at any moment before the rename leaves the
    previous checkpoint as `latest`."""

    def __init__(self, writer: SafeCheckpointEngine, save_dir: str, iteration: int,
                 before_publish: Callable[[int], None] | None):
        # before_publish(iteration): run once this rank's files are written, before they are published
        # (the test harness pauses there to kill a run mid-save)
        self.writer, self.save_dir, self.iteration, self.before_publish = writer, save_dir, iteration, before_publish
        self.tmp_dir = os.path.join(save_dir, tag_of(iteration) + ".tmp")

    def written_everywhere(self) -> bool:
        """Whether every rank's background writes are done (collective; cheap)."""
        done = torch.tensor([self.writer.writer is None or self.writer.writer.idle()], dtype=torch.int32,
                            device=state.collective_device())
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
        return bool(done.item())

    def finish(self) -> str:
        rank = dist.get_rank()
        if self.writer.writer is not None:
            self.writer.writer.wait()
        if self.before_publish is not None:
            self.before_publish(self.iteration)
        errors = _all_errors(self.writer.save_errors)
        if not errors:
            mine = {os.path.relpath(path, self.tmp_dir): entry for path, entry in self.writer.written.items()}
            try:
                write_manifest(self.tmp_dir, mine)
            except OSError as err:
                errors = [_write_error(os.path.join(self.tmp_dir, "manifest.json"), err)]
            errors = _all_errors(errors)
        if errors:
            if rank == 0:
                shutil.rmtree(self.tmp_dir, ignore_errors=True)
            dist.barrier()
            previous = read_latest(self.save_dir)
            raise CheckpointError(f"saving the checkpoint of iteration {self.iteration} to --save {self.save_dir} "
                                  f"failed: {errors[0]}; " + (f"`latest` still names {previous}" if previous else
                                                              "no checkpoint was written"))
        if rank == 0:
            publish(self.save_dir, self.iteration)
        dist.barrier()
        return os.path.join(self.save_dir, tag_of(self.iteration))


def prune_checkpoints(save_dir: str, keep: int, protected: int | None) -> list[str]:
    """Deletes all but the `keep` newest checkpoints, never the one `latest` names nor the
    checkpoint of iteration `protected`; returns the deleted tags. Call on one rank."""
    tags = sorted(n for n in os.listdir(save_dir) if TAG.fullmatch(n))
    spare = {read_latest(save_dir), tag_of(protected) if protected is not None else None, *tags[-keep:]}
    doomed = [t for t in tags if t not in spare]
    for tag in doomed:
        # Renamed first, so a kill mid-delete never leaves a half-deleted checkpoint under its tag.
        shutil.rmtree(_rename_for_deletion(os.path.join(save_dir, tag)))
    return doomed


def _rename_for_deletion(path: str) -> str:
    doomed = path + ".deleting"
    os.replace(path, doomed)
    return doomed


def run_metadata(run: RunConfig, model_config: GPTConfig) -> dict:
    """What a checkpoint records about the run, and what resuming must match (check_compatible)."""
    from megatron_snm.checkpoint.tokenizer import run_tokenizer  # it imports checkpoint/read.py, which imports us

    return dict(
        args=run.as_dict(),
        tokenizer=run_tokenizer(run.as_dict()),
        parallel=dict(tensor_model_parallel_size=run.dims.tensor, pipeline_model_parallel_size=run.dims.pipeline,
                      data_parallel_size=run.dims.data, zero_stage=run.parallel.zero_stage,
                      precision=str(run.params_dtype).removeprefix("torch.")),
        model_shape=dict(num_layers=model_config.num_layers, hidden_size=model_config.hidden_size,
                         num_attention_heads=model_config.num_attention_heads,
                         ffn_hidden_size=model_config.ffn_hidden_size, seq_length=model_config.seq_length,
                         padded_vocab_size=model_config.padded_vocab_size,
                         embedding_norm=model_config.embedding_norm,
                         max_position_embeddings=model_config.max_position_embeddings,
                         untie_embeddings_and_output_weights=model_config.untie_embeddings_and_output_weights),
    )


def describe_layout(parallel: dict) -> str:
    return (f"TP {parallel['tensor_model_parallel_size']}, PP {parallel['pipeline_model_parallel_size']}, "
            f"DP {parallel['data_parallel_size']}, ZeRO {parallel['zero_stage']}")


def same_layout(saved: dict, current: dict, optimizer: bool = True) -> bool:
    """Whether DeepSpeed's own loader can read the checkpoint into this run: the same TP and PP
    sizes, and when the optimizer is loaded the same ZeRO sharding (stage and data-parallel size;
    ZeRO 0 keeps no shards, so any data-parallel size reads it)."""
    was, now = saved["parallel"], current["parallel"]
    keys = ("tensor_model_parallel_size", "pipeline_model_parallel_size")
    if any(was[k] != now[k] for k in keys):
        return False
    return not (optimizer and (was["zero_stage"] or now["zero_stage"])
                and (was["zero_stage"], was["data_parallel_size"]) != (now["zero_stage"], now["data_parallel_size"]))


def layout_record(ds_engine, model: ModelDescription) -> dict:
    """What a model file must say for its state to be read back in any other layout
    (checkpoint/training_state.py): this rank's TP rank, each parameter's layout-free name and
    local shape, and, when the optimizer holds the model's own parameters (ZeRO 0), its groups'
    entries by name."""
    names = full_parameter_names(ds_engine.module, model)
    by_id = {id(p): names[n] for n, p in ds_engine.module.named_parameters()}
    # DeepSpeed's bf16/fp16 wrapper without ZeRO steps fp32 copies; its fp16_groups are the model's.
    groups = getattr(ds_engine.optimizer, "fp16_groups", None) or [g["params"] for g in ds_engine.optimizer.param_groups]
    own = all(id(p) in by_id for params in groups for p in params)
    shapes = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in ds_engine.module.named_parameters()}  # ZeRO 3's whole
    return dict(tensor_rank=state.get_tensor_model_parallel_rank(), full_names=names, shapes=shapes,
                optimizer_order=[[by_id[id(p)] for p in params] for params in groups] if own else None)


def check_compatible(saved: dict, current: dict, checkpoint_dir: str, optimizer: bool = True) -> None:
    """Refuses a checkpoint of another model shape, or of another precision when its `optimizer`
    state is loaded (ConfigError). The padded vocabulary follows the TP size, so it may differ
    when the layout does (reshard.py re-pads the table)."""
    from megatron_snm.checkpoint.tokenizer import check_same_tokenizer  # it imports checkpoint/read.py, which imports us

    check_same_tokenizer(saved, current, checkpoint_dir)
    was, now = saved["parallel"], current["parallel"]
    if optimizer and "precision" in was and was["precision"] != now["precision"]:
        raise ConfigError(f"checkpoint {checkpoint_dir} holds {was['precision']} weights; this run trains in "
                          f"{now['precision']} (--bf16 / --fp16): resume with the checkpoint's precision")
    # Checkpoints from before a shape field existed hold that field's default.
    saved_shape = {"max_position_embeddings": saved["model_shape"]["seq_length"],
                   "untie_embeddings_and_output_weights": False, **saved["model_shape"]}
    current_shape = dict(current["model_shape"])
    if was["tensor_model_parallel_size"] != now["tensor_model_parallel_size"]:
        saved_shape.pop("padded_vocab_size")
        current_shape.pop("padded_vocab_size")
    if saved_shape != current_shape:
        diff = {k: (saved_shape.get(k), v) for k, v in current_shape.items() if saved_shape.get(k) != v}
        raise ConfigError(f"checkpoint {checkpoint_dir} holds a different model: "
                          + ", ".join(f"{k} saved {a} vs this run's {b}" for k, (a, b) in diff.items()))
    # Whatever the shape fields do not name (an architecture flag), the weights' names and shapes
    # tell (model/describe.py); the vocabulary tables' rows follow the TP size (re-padded on load).
    saved_model, current_model = model_description(saved), model_description(current)

    def weights(model: ModelDescription) -> dict:
        return {n: w.shape[1:] if w.vocabulary else w.shape for n, w in model.weights.items()}
    was_weights, now_weights = weights(saved_model), weights(current_model)
    if was_weights != now_weights:
        differ = sorted(n for n in was_weights.keys() | now_weights.keys() if was_weights.get(n) != now_weights.get(n))
        raise ConfigError(f"checkpoint {checkpoint_dir} holds a different model: its weights differ from this run's "
                          f"in {', '.join(f'{n} (saved {was_weights.get(n)} vs {now_weights.get(n)})' for n in differ[:3])}")


def _read_metadata(checkpoint_dir: str) -> dict:
    path = os.path.join(checkpoint_dir, METADATA)
    try:
        with open(path) as f:
            saved = json.load(f)
        # A weights-only checkpoint (checkpoint/write.py) has no training state to restore.
        for key in ("iteration", "consumed_train_samples", "parallel", "model_shape", "args") + \
                (() if saved.get("weights_only") else ("spike_policy",)):
            saved[key]
        return saved
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is not this system's checkpoint metadata ({type(err).__name__}: {err})") from None


def _broadcast(value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def load_checkpoint(engine, load_dir: str, current: dict, iteration: int | None = None, optimizer: bool = True,
                    rng_states: bool = True, weights_only: bool = False) -> dict | None:
    """Restores the model, and unless told otherwise the optimizer and RNG states (`weights_only`:
    the model alone, --finetune), from `load_dir`'s `latest` (or the checkpoint of `iteration`);
    returns the saved metadata (None: nothing to load). Every rank loads the tag rank 0 read, after
    the checkpoint's files are verified; raises CheckpointError / ConfigError."""
    tag, error = None, None
    if dist.get_rank() == 0:
        try:
            tag = read_latest(load_dir) if iteration is None else tag_of(iteration)
            if tag is not None and not os.path.isdir(os.path.join(load_dir, tag)):
                raise CheckpointError(f"--load-iteration {iteration}: no checkpoint {os.path.join(load_dir, tag)}")
        except CheckpointError as err:
            error = str(err)
    tag, error = _broadcast((tag, error))
    if error:
        raise CheckpointError(error)
    if tag is None:
        return None
    checkpoint_dir = os.path.join(load_dir, tag)
    manifest = verify_manifest(checkpoint_dir, required=[METADATA])
    saved = _read_metadata(checkpoint_dir)
    weights_only = weights_only or bool(saved.get("weights_only"))  # a converted model: no optimizer, iteration 0
    optimizer = optimizer and not weights_only
    check_compatible(saved, current, checkpoint_dir, optimizer=optimizer)
    if saved.get("weights_only") and saved["args"].get("openai_gelu", False) != current["args"].get("openai_gelu", False):
        raise ConfigError(f"checkpoint {checkpoint_dir} was made for " + ("" if saved["args"].get("openai_gelu") else "no ")
                          + "--openai-gelu (GELU's tanh approximation, as GPT-2); give the same setting")
    # DeepSpeed's loader reads its own layout; ZeRO 3 also needs its partitioned files, which a
    # weights-only checkpoint has not.
    if not same_layout(saved, current, optimizer) or (weights_only and current["parallel"]["zero_stage"] == 3):
        try:
            load_resharded(engine, checkpoint_dir, model_description(current), optimizer)
        except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as err:
            raise CheckpointError(f"resharding checkpoint {checkpoint_dir} ({describe_layout(saved['parallel'])}) "
                                  f"into {describe_layout(current['parallel'])} failed: {type(err).__name__}: {err}") \
                from None
        return dict(saved, resharded_from=describe_layout(saved["parallel"]))
    if rng_states and not weights_only and rng_file(dist.get_rank()) not in manifest:
        raise CheckpointError(f"refusing to load checkpoint {checkpoint_dir}: "
                              f"{os.path.join(checkpoint_dir, rng_file(dist.get_rank()))} is missing")
    try:
        path, _ = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=optimizer,
                                         load_lr_scheduler_states=False, load_module_only=not optimizer)
    except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"loading checkpoint {checkpoint_dir} failed: {type(err).__name__}: {err}") from None
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {checkpoint_dir}")
    if rng_states and not weights_only:
        _set_rng_state(torch.load(os.path.join(checkpoint_dir, rng_file(dist.get_rank())), weights_only=True))
    return saved
