"""Checkpoint files are loaded with weights_only=True: tensors and DeepSpeed's few plain types load,
an arbitrary pickled object (which could run code on load) is refused. The DeepSpeed files of real
checkpoints are loaded this way in test_checkpoint_resume.py and test_spike_handling.py."""
import pickle

import pytest
import torch

from megatron_snm.checkpoint.save_load import SafeCheckpointEngine


class Payload:
    def __reduce__(self):
        return (print, ("unpickling ran code",))


def test_tensors_and_deepspeed_types_load(tmp_path):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = tmp_path / "ok.pt"
    torch.save({"w": torch.arange(4.0), "stage": ZeroStageEnum.gradients, "shapes": [torch.Size([2, 2])]}, path)
    loaded = SafeCheckpointEngine().load(str(path))
    assert torch.equal(loaded["w"], torch.arange(4.0)) and loaded["stage"] == ZeroStageEnum.gradients
    assert loaded["shapes"] == [torch.Size([2, 2])]


def test_arbitrary_objects_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        SafeCheckpointEngine().load(str(path))
    assert "unpickling ran code" not in capsys.readouterr().out
