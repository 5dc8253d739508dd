"""The parallel layout of a run: how many ranks split the model and the data, fixed at start-up.

    dims = ParallelDims.of_world(world_size, tensor=2, pipeline=2)   # raises ValueError naming the flags
    dims.tensor, dims.pipeline, dims.data

world = TP x PP x DP. The model and its layers are given these sizes at construction instead of
reading them from process-group globals, so a layer's shape is decided once and the same numbers
are validated once. Sequence and context parallelism would be further fields here.
Nothing here knows about GPT or creates process groups (parallel/state.py does).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelDims:
    tensor: int = 1
    pipeline: int = 1
    data: int = 1

    @classmethod
    def of_world(cls, world_size: int, tensor: int = 1, pipeline: int = 1) -> "ParallelDims":
        """The layout of `world_size` ranks with the given TP and PP sizes; DP takes the rest."""
        if tensor < 1 or pipeline < 1:
            raise ValueError(f"--tensor-model-parallel-size ({tensor}) and --pipeline-model-parallel-size "
                             f"({pipeline}) must be >= 1")
        if world_size % (tensor * pipeline):
            raise ValueError(f"world size {world_size} is not divisible by --tensor-model-parallel-size "
                             f"({tensor}) x --pipeline-model-parallel-size ({pipeline})")
        return cls(tensor, pipeline, world_size // (tensor * pipeline))

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.data
