"""After a CUDA build (ATTNEXT_FORCE_CUDA=1, no GPU needed): the extension imports and
every attnext op, forward and backward, has a CUDA kernel registered. Exit 1 otherwise."""
import os
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
    missing = []
    for op, backward in ops._PUBLIC_OPS.items():
        for name in (op, backward):
            ok = torch._C._dispatch_has_kernel_for_dispatch_key(f"attnext::{name}", "CUDA")
            print(f"  attnext::{name:<32} CUDA kernel {'registered' if ok else 'MISSING'}")
            if not ok:
                missing.append(name)
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU present: {torch.cuda.is_available()}")
    if missing:
        print("missing CUDA kernels:", ", ".join(missing))
        return 1
    print("CUDA build check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
