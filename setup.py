"""Builds pypaper._C against the installed torch.

    pip install --no-build-isolation -e .      # development (CPU build of torch here)
    pip wheel --no-build-isolation --no-deps .  # a wheel

--no-build-isolation matters: an isolated build would download a multi-GB CUDA torch.

Knobs (environment):
  PYPAPER_CPU_ARCH   flags for the CPU kernels' vector units (default -march=native; set
                     "-march=x86-64-v3" for a portable AVX2 wheel, or "" for the compiler default)
  PYPAPER_CUDA       0 to skip the CUDA kernels even when torch has CUDA and nvcc is found
  TORCH_CUDA_ARCH_LIST  CUDA architectures (default "8.0;9.0")
  MAX_JOBS           parallel compile jobs (ninja)
"""
from __future__ import annotations

import glob
import os
import shlex
import shutil

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def want_cuda() -> bool:
    if os.environ.get("PYPAPER_CUDA", "1") == "0":
        return False
    nvcc = shutil.which("nvcc") or (os.environ.get("CUDA_HOME") and os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    return torch.version.cuda is not None and bool(nvcc) and os.path.exists(nvcc)


host_sources = [p for p in rel("csrc/**/*.cpp") if not p.endswith("_cuda.cpp")]
cpu_arch = shlex.split(os.environ.get("PYPAPER_CPU_ARCH", "-march=native"))
# C++20, named here: torch 2.13's cpp_extension adds it itself, but an older torch (2.11 on the
# lent GPU hosts) may add C++17, and both the host code and torch's headers need C++20 there.
# -ffp-contract=off: no fused multiply-add may change a rounding tie (kernels/common/quant_math.h).
# -fno-trapping-math: lets the compiler if-convert and vectorize selects; pypaper never reads the
# floating-point exception flags, and values, rounding and NaN handling are unchanged.
CXX_STD = "-std=c++20"
cxx_flags = [CXX_STD, "-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math", *cpu_arch]
define_macros = []
ext_kwargs = {}

if want_cuda():
    arch_list = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources = host_sources + rel("csrc/**/*_cuda.cpp") + rel("kernels/cuda/*.cu")
    # A bare token (no quotes, no ';' that a shell would split on), stringized in csrc/module.cpp.
    arch_token = "_".join(arch_list.replace(";", " ").split())
    define_macros += [("PYPAPER_WITH_CUDA", None), ("PYPAPER_CUDA_ARCHS", arch_token)]
    Extension = CUDAExtension
    ext_kwargs["extra_compile_args"] = {"cxx": cxx_flags, "nvcc": [CXX_STD, "-O3", "--fmad=false"]}
else:
    sources = host_sources
    Extension = CppExtension
    ext_kwargs["extra_compile_args"] = {"cxx": cxx_flags}

setup(
    name="pypaper",
    version="0.1.0",
    description="Drop-in PyTorch layers from recent papers, backed by hand-written kernels",
    packages=find_packages(include=["pypaper", "pypaper.*"]),
    python_requires=">=3.10",
    install_requires=["numpy"],  # torch is not listed: install the build you want first
    ext_modules=[
        Extension(
            "pypaper._C",
            sources=sources,
            include_dirs=[ROOT],
            define_macros=define_macros,
            extra_link_args=["-fopenmp"],
            **ext_kwargs,
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
