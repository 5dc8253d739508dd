"""Training: the trainer (trainer.py: the loop, the decisions) on an engine (engine.py: our model in
DeepSpeed, one step -> StepResult) with our AdamW (optimizer.py) gated by the spike policy
(spikes.py); callbacks (callbacks.py, metrics.py, monitor.py), checkpoints (checkpointing.py), the
LR schedule, resumable data order (data.py), and DeepSpeed's config and internals in one file each
(deepspeed_config.py, deepspeed_adapter.py). docs/design.md walks through one step."""
