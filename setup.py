"""Build jacfast's native kernels (metadata, version and dependencies: pyproject.toml).

Environment switches (read at build time):
  JACFAST_BUILD_CUDA   auto (default) | 0 | 1. auto builds ``jacfast._C_cuda`` when nvcc
                       and a CUDA build of torch are present; 1 makes their absence an error.
  TORCH_CUDA_ARCH_LIST architectures for nvcc (default "8.0;9.0").
  MAX_JOBS             parallel compile jobs (torch's ninja builder honours it).
  JACFAST_CPU_FLAGS    extra C++ flags for the CPU kernels (e.g. "-march=native").
"""
import glob
import os
import site
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_headers_from_pip():
    """cuBLAS/cuSPARSE headers that ATen/cuda/CUDAContext.h needs ship in nvidia pip wheels."""
    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += glob.glob(os.path.join(base, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def _want_cuda():
    mode = os.environ.get("JACFAST_BUILD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"JACFAST_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    missing = []
    if torch.version.cuda is None:
        missing.append("torch is not a CUDA build")
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        missing.append("nvcc not found (set CUDA_HOME)")
    if missing:
        if mode == "1":
            sys.exit("JACFAST_BUILD_CUDA=1 but " + "; ".join(missing))
        print("jacfast: skipping the CUDA extension: " + "; ".join(missing))
        return False
    return True


os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
# No -std flag: torch adds the standard its own headers need (C++20 since torch 2.13 or so).
cxx_flags = ["-O3", "-fopenmp"] + os.environ.get("JACFAST_CPU_FLAGS", "").split()

ext_modules = [
    CppExtension(
        "jacfast._C",
        sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))),
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )
]
if _want_cuda():
    ext_modules.append(
        CUDAExtension(
            "jacfast._C_cuda",
            sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp"))),
            include_dirs=_cuda_headers_from_pip(),
            extra_compile_args={
                "cxx": ["-O3"],
                "nvcc": ["-O3", "-lineinfo"],
            },
        )
    )

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
