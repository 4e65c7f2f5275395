"""attnext ops inside torch.export.export: custom ops with fake kernels export, and the
exported program runs and matches eager."""
import torch

import attnext
from conftest import needs_native


class SoftmaxHead(torch.nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.q = torch.nn.Linear(d, d, bias=False)
        self.k = torch.nn.Linear(d, d, bias=False)

    def forward(self, x):  # x: (B, T, d) -> (B, T, T)
        wei = self.q(x) @ self.k(x).transpose(-2, -1)
        return attnext.causal_softmax(wei, x.shape[-1] ** -0.5)


@needs_native
def test_export_causal_softmax_module():
    torch.manual_seed(0)
    m = SoftmaxHead().eval()
    x = torch.randn(2, 9, 16)
    ep = torch.export.export(m, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("attnext.causal_softmax" in t for t in targets), targets
    x2 = torch.randn(2, 9, 16)
    torch.testing.assert_close(ep.module()(x2), m(x2))
