"""Build attnext's C++ (and, when possible, CUDA) extension with torch.utils.cpp_extension.

Decisions, printed at build time:
  * CPU sources (csrc/attnext.cpp, csrc/cpu/*.cpp) are always built.
  * CUDA sources (csrc/cuda/*.cu) are built when torch has CUDA and nvcc is found,
    or when ATTNEXT_FORCE_CUDA=1 (no GPU needed to compile). ATTNEXT_FORCE_CPU=1 skips them.
  * TORCH_CUDA_ARCH_LIST overrides the default arch list (sm_80, sm_90 + PTX).
  * MAX_JOBS limits ninja's parallelism; DEBUG=1 builds with -O0 -g.
"""
import glob
import os
import sys

import setuptools
from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _say(msg):
    print(f"[attnext setup] {msg}", file=sys.stderr)


def _want_cuda():
    if _flag("ATTNEXT_FORCE_CPU"):
        return False, "ATTNEXT_FORCE_CPU=1"
    cu_sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    if not cu_sources:
        return False, "no CUDA sources in csrc/cuda"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA"
    if _flag("ATTNEXT_FORCE_CUDA"):
        return True, "ATTNEXT_FORCE_CUDA=1"
    if cpp_extension.CUDA_HOME is None:
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"torch {torch.__version__} has CUDA {torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"


def _nvidia_wheel_includes():
    """Header folders of the nvidia-* wheels a CUDA torch installs (cuBLAS, cuSPARSE, ...):
    ATen's CUDA headers need them and a bare CUDA toolkit may not have them."""
    dirs = []
    for base in {os.path.dirname(os.path.dirname(torch.__file__))}:
        dirs += sorted(glob.glob(os.path.join(base, "nvidia", "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def _extension():
    debug = _flag("DEBUG")
    use_cuda, why = _want_cuda()
    sources = [os.path.join("csrc", "attnext.cpp")] + sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    )
    opt = ["-O0", "-g"] if debug else ["-O3"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx = opt + [
        "-DATTNEXT_PYTHON_MODULE",
        # at::parallel_for is inline in ATen's headers and is parallel only where the
        # including file is compiled with OpenMP (_OPENMP defined); without it every
        # at::parallel_for in our kernels runs on one thread. The runtime is torch's
        # own libgomp (same soname, already loaded by torch).
        "-fopenmp",
        "-fvisibility=hidden",
    ]
    link = ["-fopenmp"]
    extra = {"cxx": cxx}
    if use_cuda:
        sources += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        extra["nvcc"] = opt + ["--expt-relaxed-constexpr", "-lineinfo", "-DATTNEXT_PYTHON_MODULE"]
        extra["cxx"] = extra["cxx"] + ["-DATTNEXT_WITH_CUDA"]
        extra["nvcc"] += ["-DATTNEXT_WITH_CUDA"]
        _say(f"building CPU + CUDA kernels ({why}); arch list {os.environ['TORCH_CUDA_ARCH_LIST']}")
        ext_cls = cpp_extension.CUDAExtension
        include_dirs += _nvidia_wheel_includes()
    else:
        _say(f"building CPU kernels only ({why})")
        ext_cls = cpp_extension.CppExtension
    _say(f"torch {torch.__version__}, {'debug' if debug else 'release'} build, MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')}")
    return ext_cls(
        name="attnext._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=link,
    )


def _license():
    """BSD-3-Clause as an SPDX expression (PEP 639, setuptools >= 77), else the old free-text field."""
    major = int(setuptools.__version__.split(".")[0])
    return {"license_expression": "BSD-3-Clause"} if major >= 77 else {"license": "BSD-3-Clause"}


setup(
    **_license(),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
