"""After a CUDA build (ATTNEXT_FORCE_CUDA=1, no GPU needed): the extension imports and
every op that csrc/cuda/*.cu implements (each `m.impl("<op>", ...)` in a
TORCH_LIBRARY_IMPL(attnext, CUDA, m) block) has its CUDA kernel registered. Ops with
no CUDA source are listed (they run the eager reference on CUDA tensors). Exit 1 if a
CUDA kernel is missing or the extension does not load."""
import glob
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the tree just built

import torch  # noqa: E402

import attnext  # noqa: E402
from attnext import ops  # noqa: E402


def main() -> int:
    if not attnext.native_available():
        print(f"attnext._C did not load: {ops._C_ERROR}")
        return 1
    if torch.version.cuda is None:
        print(f"torch {torch.__version__} has no CUDA: this check needs a CUDA build of torch")
        return 1
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    expected = set()
    for path in glob.glob(os.path.join(root, "csrc", "cuda", "*.cu")):
        with open(path) as f:
            expected |= set(re.findall(r'm\.impl\("([A-Za-z0-9_]+)"', f.read()))
    if not expected:
        print("no CUDA kernels found in csrc/cuda")
        return 1
    missing = []
    for op, backward in ops._PUBLIC_OPS.items():
        for name in dict.fromkeys((op, backward)):  # dropout is its own backward
            ok = torch._C._dispatch_has_kernel_for_dispatch_key(f"attnext::{name}", "CUDA")
            if name in expected:
                print(f"  attnext::{name:<32} CUDA kernel {'registered' if ok else 'MISSING'}")
                if not ok:
                    missing.append(name)
            else:
                print(f"  attnext::{name:<32} no CUDA source (CUDA tensors run the reference)")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU present: {torch.cuda.is_available()}")
    if missing:
        print("missing CUDA kernels:", ", ".join(missing))
        return 1
    print("CUDA build check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
