"""Training: the loop (loop.py) on a DeepSpeed engine (engine.py) with our AdamW (optimizer.py),
the LR schedule (lr_schedule.py), resumable data order (data.py), checkpoints (checkpointing.py),
spike handling (spikes.py) and Megatron-format logging + TensorBoard (metrics.py)."""
