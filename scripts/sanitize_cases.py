"""Small CUDA cases of every attnext kernel, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck python scripts/sanitize_cases.py
"""
import torch

import attnext


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
