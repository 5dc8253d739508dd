"""Builds megatron-snm and its native extensions.

Extensions:
  megatron_snm._layer_norm        fused LayerNorm and RMSNorm, CPU kernels + torch glue (always)
  megatron_snm._layer_norm_cuda   fused LayerNorm and RMSNorm, CUDA kernels + torch glue (only
                                  where the installed torch has CUDA and nvcc is found)
  megatron_snm.data._helpers      sample-index and blending-index builders (pybind11 + numpy)

Install with `pip install --no-build-isolation -e .`: an isolated build cannot see the torch
that is already installed (and would fetch a multi-GB CUDA build to build against).
"""
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as e:  # pragma: no cover - a clear message beats a pybind11 traceback
    raise SystemExit(
        "megatron-snm builds against the installed torch: install torch first "
        "(`pip install torch==2.13.0`), then `pip install --no-build-isolation -e .`"
    ) from e
from pybind11.setup_helpers import Pybind11Extension

# The fused LayerNorm and RMSNorm: no global -march, so the extension loads on any x86-64 CPU; the
# AVX2 build of the kernels is chosen at run time (csrc/layer_norm/layer_norm_cpu_avx2.cpp).
# -fopenmp makes at::parallel_for use torch's OpenMP threads. -Wno-psabi: 32-byte vectors pass by
# value only between the kernels' own inline helpers.
LAYER_NORM_CXX_FLAGS = ["-O3", "-fopenmp", "-Wno-psabi"]
# nvcc: sm_80 (A100) and sm_90 (H100/H200) code, plus PTX for newer GPUs to JIT from.
LAYER_NORM_NVCC_FLAGS = [
    "-O3",
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]


def layer_norm_extensions():
    exts = [
        cpp_extension.CppExtension(
            "megatron_snm._layer_norm",
            [
                "csrc/layer_norm/layer_norm_cpu.cpp",
                "csrc/layer_norm/layer_norm_cpu_avx2.cpp",
                "csrc/layer_norm/bindings.cpp",
            ],
            extra_compile_args=LAYER_NORM_CXX_FLAGS,
            extra_link_args=["-fopenmp"],
        )
    ]
    want_cuda = os.environ.get("MEGATRON_SNM_CUDA", "auto")
    has_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if want_cuda == "1" or (want_cuda == "auto" and has_cuda):
        exts.append(
            cpp_extension.CUDAExtension(
                "megatron_snm._layer_norm_cuda",
                ["csrc/layer_norm/layer_norm_cuda.cu", "csrc/layer_norm/cuda_glue.cpp"],
                extra_compile_args={"cxx": ["-O3"], "nvcc": LAYER_NORM_NVCC_FLAGS},
            )
        )
    return exts


def data_extensions():
    import numpy

    return [
        Pybind11Extension(
            "megatron_snm.data._helpers",
            ["csrc/data/helpers.cpp"],
            include_dirs=[numpy.get_include()],
            extra_compile_args=["-O3"],
            cxx_std=17,
        )
    ]


setup(
    name="megatron-snm",
    version="0.1.0",
    description="Distributed GPT pre-training with the 'Spike No More' stabilisation built in",
    packages=find_packages(include=["megatron_snm", "megatron_snm.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6,<3",  # torch.nn.utils.get_total_norm
        "deepspeed>=0.15",
        "numpy",
        "sentencepiece",
        "tokenizers",
        "tiktoken",
        "pybind11",
        "ninja",
        "tqdm",
        "tensorboard",
    ],
    extras_require={
        "mpi": ["mpi4py"],
        "test": ["pytest", "pytest-timeout", "megatron-core", "psutil"],
    },
    ext_modules=layer_norm_extensions() + data_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
