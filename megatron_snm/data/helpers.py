"""The C++ index builders (csrc/data/helpers.cpp), or a clear message when they are not built."""
try:
    from megatron_snm.data._helpers import build_blending_indices, build_document_sample_index, build_shuffle_index
except ImportError as e:  # pragma: no cover - depends on the checkout, not the code
    raise ImportError(
        "megatron_snm.data._helpers (csrc/data/helpers.cpp) is not built: run `make build` or "
        "`python setup.py build_ext --inplace` in the repository root"
    ) from e

__all__ = ["build_blending_indices", "build_document_sample_index", "build_shuffle_index"]
