"""Data: Megatron's indexed .bin/.idx format, GPT samples, blending.

    from megatron_snm.data import build_train_valid_test_datasets
    train, valid, test = build_train_valid_test_datasets(["0.3", "A", "0.7", "B"], "969,30,1",
                                                         (n_train, n_valid, n_test), 2048, seed=1234)

The dataset classes load lazily, so tools that only read or write .bin/.idx files need neither
torch nor the compiled helpers.
"""
import importlib

_EXPORTS = {
    "DataError": "errors",
    "IndexedDataset": "indexed_dataset",
    "IndexedDatasetBuilder": "indexed_dataset",
    "IndexedDatasetError": "indexed_dataset",
    "best_token_dtype": "indexed_dataset",
    "GPTDataset": "gpt_dataset",
    "build_train_valid_test_datasets": "gpt_dataset",
    "BlendedDataset": "blended_dataset",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
