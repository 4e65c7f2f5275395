"""torch.compile(fullgraph=True) runs attnext's ops with no graph break."""
import pytest
import torch

import attnext
from attnext import reference
from conftest import needs_native


@needs_native
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_causal_softmax_fullgraph(dynamic):
    torch._dynamo.reset()

    def step(x, w):
        scores = x @ w  # (B, T, T)
        return attnext.causal_softmax(scores, 0.25).sum(-2)

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    x = torch.randn(3, 12, 12, requires_grad=True)
    w = torch.randn(12, 12)
    out = compiled(x, w)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = reference.causal_softmax(ref_x @ w, 0.25).sum(-2)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)


@needs_native
def test_compile_inductor_fullgraph():
    torch._dynamo.reset()
    f = torch.compile(lambda x: attnext.causal_softmax(x * 2.0, 0.5, align="bottom_right"), fullgraph=True)
    x = torch.randn(2, 5, 9)
    torch.testing.assert_close(f(x), reference.causal_softmax(x * 2.0, 0.5, True))
