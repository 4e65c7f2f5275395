"""attnext.nn modules against eager copies of the lecture's and nanoGPT's classes."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from torch.nn import functional as F

import attnext
from attnext import reference
from attnext.nn import CausalSelfAttention, Head, MultiHeadAttention

# ---- eager originals, as in karpathy/ng-video-lecture gpt.py (globals made arguments)


class LectureHead(nn.Module):
    def __init__(self, n_embd, head_size, block_size, dropout):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(block_size, block_size)))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        B, T, C = x.shape
        k = self.key(x)
        q = self.query(x)
        wei = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float("-inf"))
        wei = F.softmax(wei, dim=-1)
        wei = self.dropout(wei)
        v = self.value(x)
        return wei @ v


class LectureMultiHeadAttention(nn.Module):
    def __init__(self, num_heads, head_size, n_embd, block_size, dropout):
        super().__init__()
        self.heads = nn.ModuleList([LectureHead(n_embd, head_size, block_size, dropout) for _ in range(num_heads)])
        self.proj = nn.Linear(head_size * num_heads, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        out = torch.cat([h(x) for h in self.heads], dim=-1)
        return self.dropout(self.proj(out))


# ---- nanoGPT's original (its eager, non-flash path): attnext.reference.NanoGPTCausalSelfAttention
NanoCausalSelfAttention = reference.NanoGPTCausalSelfAttention


def _compare(ours, theirs, x):
    """Forward and parameter/input gradients, float64, one shared grad_out."""
    xo = x.clone().requires_grad_()
    xt = x.clone().requires_grad_()
    yo, yt = ours(xo), theirs(xt)
    torch.testing.assert_close(yo, yt, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(yt)
    yo.backward(g)
    yt.backward(g)
    torch.testing.assert_close(xo.grad, xt.grad, atol=1e-10, rtol=1e-10)
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs_params[name].grad, atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("T", [1, 37, 96])  # one token, odd T, T > kernel tile
def test_head_matches_lecture(T):
    torch.manual_seed(0)
    theirs = LectureHead(32, 16, 96, 0.0).double()
    ours = Head(32, 16, 96).double()
    ours.load_state_dict(theirs.state_dict())  # the lecture's `tril` buffer is accepted
    _compare(ours, theirs, torch.randn(3, T, 32, dtype=torch.float64))


@pytest.mark.parametrize("T", [1, 70])
def test_multihead_matches_lecture(T):
    torch.manual_seed(1)
    theirs = LectureMultiHeadAttention(4, 8, 32, 80, 0.0).double()
    ours = MultiHeadAttention(4, 8, 32, 80).double()
    ours.load_state_dict(theirs.state_dict())
    assert set(ours.state_dict()) == {k for k in theirs.state_dict() if not k.endswith("tril")}
    _compare(ours, theirs, torch.randn(2, T, 32, dtype=torch.float64))


@pytest.mark.parametrize("bias", [True, False])
def test_causal_self_attention_matches_nanogpt(bias):
    torch.manual_seed(2)
    cfg = SimpleNamespace(n_embd=48, n_head=3, block_size=100, dropout=0.0, bias=bias)
    theirs = NanoCausalSelfAttention(cfg).double()
    ours = CausalSelfAttention(cfg).double()
    ours.load_state_dict(theirs.state_dict())  # nanoGPT's `bias` mask buffer is accepted
    _compare(ours, theirs, torch.randn(2, 77, 48, dtype=torch.float64))
    kw = CausalSelfAttention(n_embd=48, n_head=3, block_size=100, bias=bias)
    assert set(kw.state_dict()) == set(ours.state_dict())


def test_modules_dropout_train_vs_eval():
    torch.manual_seed(3)
    m = MultiHeadAttention(2, 8, 16, 64, dropout=0.5).double()
    x = torch.randn(2, 40, 16, dtype=torch.float64)
    m.eval()
    a, b = m(x), m(x)
    assert torch.equal(a, b)  # eval: no dropout
    m.train()
    torch.manual_seed(4)
    c = m(x)
    torch.manual_seed(4)
    d = m(x)
    assert torch.equal(c, d)  # a training step is reproducible under torch.manual_seed
    assert not torch.allclose(a, c)


def test_modules_reject_long_sequences():
    with pytest.raises(ValueError, match="block_size"):
        Head(8, 4, 16)(torch.randn(1, 17, 8))
    with pytest.raises(ValueError, match="multiple of n_head"):
        CausalSelfAttention(n_embd=10, n_head=3, block_size=8)


def test_modules_exported():
    assert attnext.nn.Head is Head
    assert attnext.nn.MultiHeadAttention is MultiHeadAttention
    assert attnext.nn.CausalSelfAttention is CausalSelfAttention


@pytest.mark.parametrize("rows,cache", [(16, False), (4096, True)])
def test_projection_routes_by_output_size(rows, cache):
    # The modules' projections: outputs the CPU output cache keeps (>= 4 MiB) through
    # attnext.matmul, smaller ones through F.linear (C++ autograd, bias inside the GEMM);
    # either way F.linear's values and gradients.
    from attnext.nn import _linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, rows, 96, generator=g, requires_grad=True)
    w = torch.randn(384, 96, generator=g, requires_grad=True)
    b = torch.randn(384, generator=g, requires_grad=True)
    y = _linear(x, w, b)
    assert (2 * rows * 384 * 4 >= 4 << 20) == cache
    names = []
    node = y.grad_fn
    while node is not None:  # the graph's nodes down to the product
        names.append(type(node).__name__)
        node = node.next_functions[0][0] if node.next_functions else None
    native = attnext.native_available() and attnext.kernels_enabled()
    assert any("attnext_matmul" in n for n in names) == (cache and native), names
    ref = F.linear(x, w, b)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-5)
    go = torch.randn(y.shape, generator=g)
    got = torch.autograd.grad(y, (x, w, b), go)
    want = torch.autograd.grad(ref, (x, w, b), go)
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, atol=1e-3, rtol=1e-4)
