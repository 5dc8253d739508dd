"""Analysis the trainer does not import: a run's logs and TensorBoard read back (run_history.py, for
tools/plot_stability.py and tools/stability_sweep.py) and the memory a run measurably uses
(memory_measure.py, for tests/test_memory.py and benchmarks/memory.py)."""
