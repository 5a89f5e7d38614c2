"""Builds ttdist and its op library ttdist._C.

The CPU kernels (csrc/cpu, C++ with ATen's OpenMP thread pool) are always built. When the
installed torch has CUDA and a CUDA toolkit is found, the CUDA kernels (csrc/cuda) and their
torch binding are added to the same extension; TORCH_CUDA_ARCH_LIST selects the architectures
(default: sm_80 and sm_90).
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

# -fopenmp: at::parallel_for is a header template that runs its body serially unless the caller
# is compiled with OpenMP. The extension then links libgomp.so.1, the soname of the libgomp that
# torch loads first, so the process keeps one OpenMP runtime (torch.set_num_threads applies).
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]


# Headers and included kernel bodies: a change to one of them rebuilds the extension.
DEPENDS = sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.inc", recursive=True)
                 + glob.glob("csrc/**/*.cuh", recursive=True))


def _extension():
    sources = ["csrc/module.cpp", "csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("TTDIST_NO_CUDA") != "1"
    if not with_cuda:
        return CppExtension("ttdist._C", sources, depends=DEPENDS, extra_compile_args={"cxx": CXX_FLAGS},
                            extra_link_args=LINK_FLAGS)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    return CUDAExtension(
        "ttdist._C",
        sources,
        depends=DEPENDS,
        define_macros=[("TTDIST_WITH_CUDA", "1")],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]},
        extra_link_args=LINK_FLAGS,
    )


setup(
    name="ttdist",
    version="0.1.0",
    description="Distributed DLRM training with Tensor-Train compressed embedding tables on TorchRec",
    packages=find_packages(include=["ttdist", "ttdist.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},  # ninja (parallel, MAX_JOBS) when installed
    python_requires=">=3.10",
)
