"""Training: the trainer (trainer.py: the loop, the decisions) on an engine (engine.py: our model in
DeepSpeed, one step -> StepResult) with our AdamW (optimizer.py) gated by the spike policy
(spikes.py); callbacks (callbacks.py, metrics.py, monitor.py), the LR schedule, resumable data order
(data.py), and DeepSpeed's internals in one file (deepspeed_adapter.py). Checkpoints are
megatron_snm/checkpoint/'s, which training calls. docs/design.md walks through one step."""
