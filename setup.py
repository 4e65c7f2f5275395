"""Build attnext's C++ (and, when possible, CUDA) extension with torch.utils.cpp_extension.

Decisions, printed at build time ("[attnext setup] ..." on stderr; `pip install -v` shows them):
  * CPU sources (csrc/attnext.cpp, csrc/cpu/*.cpp) are always built.
  * OpenMP: the C++ compiler torch will use (CXX, else c++; cl on Windows) is tried on a
    tiny OpenMP program with -fopenmp (gcc, clang with libomp), then
    -Xpreprocessor -fopenmp -lomp (Apple clang with Homebrew's libomp), then /openmp (MSVC).
    at::parallel_for is inline in ATen's headers and parallel only where the including
    file is compiled with OpenMP (torch's Linux, Windows and macOS wheels use the OpenMP
    backend), so without compiler OpenMP csrc/cpu/parallel.h parallelises our kernels
    with std::thread instead; torch.ops.attnext._cpu_parallel() says which one a build uses.
  * CUDA sources (csrc/cuda/*.cu) are built when torch has CUDA and nvcc is found,
    or when ATTNEXT_FORCE_CUDA=1 (no GPU needed to compile). ATTNEXT_FORCE_CPU=1 skips them.
  * TORCH_CUDA_ARCH_LIST overrides the default arch list (sm_80, sm_90 + PTX).
  * MAX_JOBS limits ninja's parallelism; DEBUG=1 builds with -O0 -g.
  * When the native build is impossible (torch not importable, no working C++ compiler,
    a compile or link error) the pure-Python package is installed anyway, with a warning:
    every op then runs attnext/reference.py. ATTNEXT_REQUIRE_NATIVE=1 makes that fatal (CI).
"""

import glob
import os
import shutil
import subprocess
import sys
import tempfile

import setuptools
from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except Exception as e:  # noqa: BLE001  (any failure to load torch means: no native build)
    torch = cpp_extension = None
    _TORCH_ERROR = f"{type(e).__name__}: {e}"

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _say(msg):
    print(f"[attnext setup] {msg}", file=sys.stderr)


def _no_native(why):
    """The native build cannot happen: fatal under ATTNEXT_REQUIRE_NATIVE=1, else a loud warning."""
    if _flag("ATTNEXT_REQUIRE_NATIVE"):
        _say(f"ERROR: native build impossible and ATTNEXT_REQUIRE_NATIVE=1: {why}")
        raise SystemExit(f"attnext: native build failed: {why}")
    _say(f"WARNING: installing WITHOUT native kernels: {why}")
    _say("WARNING: every op will run the eager fallback attnext/reference.py (slow); "
         "fix the build and reinstall, or set ATTNEXT_REQUIRE_NATIVE=1 to make this an error")


_OMP_PROBE = r"""
#include <omp.h>
int main() {
  int n = 0;
#pragma omp parallel reduction(+ : n)
  n += 1;
  return (n > 0 && omp_get_max_threads() > 0) ? 0 : 1;
}
"""


def _cxx():
    """The C++ compiler torch.utils.cpp_extension compiles (and setuptools links) with."""
    return os.environ.get("CXX") or ("cl" if sys.platform == "win32" else "c++")


def _try_compile(code, cflags, ldflags=()):
    """Whether the C++ compiler builds and links ``code`` with these flags (nothing is run,
    so a cross compiler works too)."""
    tmp = tempfile.mkdtemp(prefix="attnext-probe-")
    try:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write(code)
        if sys.platform == "win32":
            cmd = [_cxx(), "/nologo", "/EHsc", *cflags, src, f"/Fe{os.path.join(tmp, 'probe.exe')}", "/link", *ldflags]
        else:
            cmd = [_cxx(), "-std=c++17", *cflags, src, "-o", os.path.join(tmp, "probe"), *ldflags]
        try:
            r = subprocess.run(cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
        return r.returncode == 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _openmp_flags():
    """(compile flags, link flags, decision) for the first OpenMP spelling the compiler accepts."""
    candidates = [(["-fopenmp"], ["-fopenmp"], "-fopenmp")]
    # Apple clang has no -fopenmp driver flag; Homebrew's libomp lives outside the default paths.
    for prefix in ("/opt/homebrew/opt/libomp", "/usr/local/opt/libomp"):
        if os.path.isdir(prefix):
            candidates.append((["-Xpreprocessor", "-fopenmp", f"-I{prefix}/include"], [f"-L{prefix}/lib", "-lomp"],
                               f"-Xpreprocessor -fopenmp -lomp ({prefix})"))
    candidates.append((["-Xpreprocessor", "-fopenmp"], ["-lomp"], "-Xpreprocessor -fopenmp -lomp"))
    if sys.platform == "win32":
        candidates = [(["/openmp"], [], "/openmp")]
    for cflags, ldflags, name in candidates:
        if _try_compile(_OMP_PROBE, cflags, ldflags):
            return cflags, ldflags, f"OpenMP with {name}"
    # No OpenMP runtime: keep the `#pragma omp simd` hints where the compiler takes them alone.
    simd = ["-fopenmp-simd"] if sys.platform != "win32" and _try_compile("int main() { return 0; }", ["-fopenmp-simd"]) else []
    return simd, [], "no OpenMP"


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
    if not _try_compile("#include <vector>\nint main() { std::vector<int> v(1); return v[0]; }\n", []):
        _no_native(f"the C++ compiler {_cxx()!r} cannot build a C++17 program (set CXX to a working one)")
        return None
    omp_cflags, omp_ldflags, omp_decision = _openmp_flags()
    if omp_decision != "no OpenMP":
        _say(f"CPU kernels parallel through at::parallel_for ({omp_decision}, compiler {_cxx()})")
    else:
        _say(f"WARNING: compiler {_cxx()} has no usable OpenMP (tried -fopenmp, -Xpreprocessor -fopenmp -lomp"
             f"{', /openmp' if sys.platform == 'win32' else ''}): CPU kernels parallelise with std::thread "
             "(csrc/cpu/parallel.h) instead of torch's OpenMP pool")
    use_cuda, why = _want_cuda()
    sources = [os.path.join("csrc", "attnext.cpp")] + sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    )
    opt = ["-O0", "-g"] if debug else ["-O3"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx = opt + [
        "-DATTNEXT_PYTHON_MODULE",
        # at::parallel_for is inline in ATen's headers and is parallel only where the
        # including file is compiled with OpenMP (_OPENMP defined); with gcc the runtime is
        # torch's own libgomp (same soname, already loaded by torch). Without OpenMP,
        # attnext::parallel_for (csrc/cpu/parallel.h) uses std::thread.
        *omp_cflags,
        "-fvisibility=hidden",
    ]
    link = list(omp_ldflags)
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


def _setup_kwargs():
    if cpp_extension is None:
        _no_native(f"torch cannot be imported ({_TORCH_ERROR}); "
                   "install torch first and use `pip install --no-build-isolation .`")
        return {}
    try:
        ext = _extension()
    except Exception as e:  # noqa: BLE001  (torch headers missing, a broken CUDA setup, ...)
        _no_native(f"{type(e).__name__}: {e}")
        ext = None
    if ext is None:
        return {}

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension; a failed compile or link leaves the pure-Python package."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001  (CompileError, ninja's RuntimeError, LinkError, ...)
                _no_native(f"compiling attnext._C failed ({type(e).__name__}: {e}); "
                           "the compiler's messages are above (`pip install -v` shows them)")

    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


def _license():
    """BSD-3-Clause as an SPDX expression (PEP 639, setuptools >= 77), else the old free-text field."""
    major = int(setuptools.__version__.split(".")[0])
    return {"license_expression": "BSD-3-Clause"} if major >= 77 else {"license": "BSD-3-Clause"}


setup(**_license(), **_setup_kwargs())
