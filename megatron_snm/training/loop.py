"""The training loop: steps, learning rate, evaluation, logging, checkpoints, divergence stop.

    result = pretrain(cfg, gpt_config, ds_config, (train, valid, test))

Datasets are indexable collections of {"text": int64 array [seq_length + 1]}; the loop knows
nothing of tokenizers or files. Needs torch.distributed and parallel/state.py's groups.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch.distributed as dist

from megatron_snm.config import Config
from megatron_snm.model.config import GPTConfig
from megatron_snm.parallel import state
from megatron_snm.parallel.distributed import device
from megatron_snm.training.checkpointing import load_checkpoint, save_checkpoint
from megatron_snm.training.data import micro_batches
from megatron_snm.training.engine import TrainEngine, build_train_engine
from megatron_snm.training.lr_schedule import LRSchedule
from megatron_snm.training.metrics import TrainingMetrics, model_flops_per_token
from megatron_snm.training.spikes import SpikePolicy


@dataclass
class TrainResult:
    iteration: int = 0
    losses: dict[int, float] = field(default_factory=dict)  # iteration -> global batch loss
    skipped: list[int] = field(default_factory=list)
    spikes: list[int] = field(default_factory=list)
    valid_losses: dict[int, float] = field(default_factory=dict)
    test_loss: float | None = None
    diverged: bool = False


def run_metadata(cfg: Config, gpt_config: GPTConfig, world_size: int) -> dict:
    """What a checkpoint records about the run, and what resuming must match."""
    return dict(
        args=cfg.to_dict(),
        parallel=dict(tensor_model_parallel_size=cfg.tensor_model_parallel_size,
                      pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
                      data_parallel_size=cfg.data_parallel_size(world_size), zero_stage=cfg.zero_stage),
        model_shape=dict(num_layers=gpt_config.num_layers, hidden_size=gpt_config.hidden_size,
                         num_attention_heads=gpt_config.num_attention_heads,
                         ffn_hidden_size=gpt_config.ffn_hidden_size, seq_length=gpt_config.seq_length,
                         padded_vocab_size=gpt_config.padded_vocab_size, embedding_norm=gpt_config.embedding_norm),
    )


def _stability_figures(engine: TrainEngine) -> dict[str, float]:
    """The monitor's figures of the whole model: each pipeline stage measures its own layers."""
    figures = engine.monitor.figures()  # collective over TP
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (state.get_data_parallel_rank(), state.get_tensor_model_parallel_rank(), figures))
    merged = {}
    for dp_rank, tp_rank, figs in everyone:
        if dp_rank == 0 and tp_rank == 0:
            merged.update(figs)
    return dict(sorted(merged.items()))


def _listing(figures: dict[str, float]) -> str:
    return ", ".join(f"{name}={value:.4g}" for name, value in figures.items())


def pretrain(cfg: Config, gpt_config: GPTConfig, ds_config: dict, datasets: tuple) -> TrainResult:
    train_ds, valid_ds, test_ds = datasets
    world = dist.get_world_size()
    policy = SpikePolicy(cfg.spike_factor, cfg.spike_window, cfg.skip_spiky_steps, cfg.max_skipped_steps)
    engine = build_train_engine(cfg, gpt_config, ds_config, policy)
    metadata = run_metadata(cfg, gpt_config, world)
    metrics = TrainingMetrics(rank=dist.get_rank(), world_size=world, train_iters=cfg.train_iters,
                              global_batch_size=cfg.global_batch_size, seq_length=cfg.seq_length,
                              flops_per_token=model_flops_per_token(gpt_config), log_interval=cfg.log_interval,
                              tensorboard_dir=cfg.tensorboard_dir)
    result = TrainResult()
    consumed = 0
    if cfg.load:
        saved = load_checkpoint(engine.engine, cfg.load, metadata)
        if saved is None:
            metrics.print(f" no checkpoint in {cfg.load} (no 'latest' file): starting from scratch")
        else:
            result.iteration, consumed = saved["iteration"], saved["consumed_train_samples"]
            policy.load_state_dict(saved["spike_policy"])
            metrics.print(f" loaded checkpoint {cfg.load} at iteration {result.iteration}")
    engine.iteration = result.iteration
    schedule = LRSchedule(cfg.lr, cfg.min_lr, cfg.lr_warmup_iters, cfg.lr_decay_iters, cfg.lr_decay_style)

    dp_rank, dp_size = state.get_data_parallel_rank(), state.get_data_parallel_world_size()

    def batches(dataset, start: int, samples: int):
        return micro_batches(dataset, start, samples, cfg.micro_batch_size, dp_rank, dp_size, device(),
                             vocab_size=gpt_config.vocab_size)

    def evaluate(dataset, where: str, tag: str) -> float:
        loss = engine.evaluate(batches(dataset, 0, cfg.eval_iters * cfg.global_batch_size), cfg.eval_iters)
        metrics.evaluation(where, loss, result.iteration, tag)
        return loss

    # Nothing to save again right after loading, unless the run saves somewhere else.
    resumed_in_save_dir = cfg.load and cfg.save and os.path.realpath(cfg.load) == os.path.realpath(cfg.save)
    last_saved = result.iteration if resumed_in_save_dir and result.iteration else None

    def save() -> None:
        nonlocal last_saved
        if cfg.save and last_saved != result.iteration:
            meta = dict(metadata, consumed_train_samples=consumed, spike_policy=policy.state_dict())
            path = save_checkpoint(engine.engine, cfg.save, result.iteration, meta)
            metrics.print(f" saved checkpoint at iteration {result.iteration} to {path}")
            last_saved = result.iteration

    train_batches = batches(train_ds, consumed, cfg.train_iters * cfg.global_batch_size)
    # The stability monitor costs a few hooks per layer while it captures, so it runs only every
    # --log-stability-interval steps and on the step right after a loss spike (a spike is known
    # only once its step is done; --log-stability-interval 1 captures the spiky step itself).
    after_spike = None
    while result.iteration < cfg.train_iters:
        it = result.iteration + 1
        lr = schedule(it)
        engine.set_lr(lr)
        capture = after_spike is not None or (cfg.log_stability_interval > 0 and it % cfg.log_stability_interval == 0)
        with engine.monitor.capture() if capture else contextlib.nullcontext():
            verdict, applied = engine.train_step(train_batches)
        result.iteration, consumed = it, consumed + cfg.global_batch_size
        policy.record(verdict, applied)
        result.losses[it] = verdict.loss
        if not applied:
            result.skipped.append(it)
            why = "non-finite loss or gradient norm" if verdict.nonfinite else "loss spike" if verdict.spike else \
                "DeepSpeed skipped the update (loss-scale overflow)"
            metrics.print(f" skipped iteration {it}: {why} (lm loss {verdict.loss:.6E}, grad norm {verdict.grad_norm})")
        figures = _stability_figures(engine) if capture else {}
        metrics.stability(figures, it)
        if verdict.spike:
            result.spikes.append(it)
            metrics.print(f" loss spike at iteration {it}: lm loss {verdict.loss:.6E} > {cfg.spike_factor} x running "
                          f"mean {policy.running_mean():.6E}" + (f"; stability monitor: {_listing(figures)}" if capture else
                                                                  "; stability monitor figures follow at the next step"))
        elif after_spike is not None:
            metrics.print(f" stability monitor at iteration {it}, the step after the loss spike at iteration "
                          f"{after_spike}: {_listing(figures)}")
        after_spike = it if verdict.spike else None
        metrics.training_step(iteration=it, consumed_samples=consumed, lr=lr, loss=verdict.loss, applied=applied,
                              loss_scale=engine.loss_scale(), grad_norm=verdict.grad_norm,
                              skipped_total=policy.skipped_total, nan_total=policy.nonfinite_total,
                              spike_total=policy.spikes_total)
        if policy.should_stop():
            save()
            metrics.print(f" stopping at iteration {it}: {policy.skipped_in_a_row} steps in a row were skipped "
                          f"(--max-skipped-steps {cfg.max_skipped_steps}); the run is diverging. "
                          + (f"Checkpoint saved in {cfg.save}; " if cfg.save else "")
                          + "lower --lr or check the data before resuming")
            result.diverged = True
            break
        if valid_ds is not None and cfg.eval_iters > 0 and it % cfg.eval_interval == 0:
            result.valid_losses[it] = evaluate(valid_ds, f"iteration {it}", "validation")
        if cfg.save_interval and it % cfg.save_interval == 0:
            save()

    if not result.diverged:
        save()
        if test_ds is not None and cfg.eval_iters > 0:
            result.test_loss = evaluate(test_ds, "the end of training for test data", "test")
    metrics.close()
    return result
