"""Small CUDA cases of every attnext kernel, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck python scripts/sanitize_cases.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import attnext  # noqa: E402


def main() -> None:
    assert torch.cuda.is_available(), "needs a GPU"
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        # warp path (S <= 1024, several per-lane widths) and block path (S > 1024)
        for shape in ((2, 3, 7, 5), (2, 33, 33), (1, 40, 1500)):
            for align in ("top_left", "bottom_right"):
                x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
                y = attnext.causal_softmax(x, 0.5, align=align)
                y.backward(torch.randn_like(y))
    torch.cuda.synchronize()
    print("sanitizer cases ran")


if __name__ == "__main__":
    main()
