"""Shims for the oldest torch attnext supports (2.5): each agrees with what newer torch has."""
import pytest
import torch

from attnext import _autograd


@pytest.mark.parametrize(
    "args,expected",
    [
        ((), False),
        ((torch.ones(2), 1.5, None, "top_left"), False),
        ((torch.ones(2), torch.ones(2, requires_grad=True)), True),
        ((torch.ones(2), [torch.ones(1), torch.ones(1, requires_grad=True)]), True),  # a tensor list
        ((torch.ones(2), (3, 4), [torch.ones(1)]), False),
    ],
)
def test_any_requires_grad_fallback(args, expected):
    assert _autograd._any_requires_grad_py(*args) is expected
    if hasattr(torch._C, "_any_requires_grad"):  # newer torch: the shim answers as torch does
        assert torch._C._any_requires_grad(*args) is expected
