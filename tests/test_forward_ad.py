"""Forward-mode AD of every attnext op: ``torch.func.jvp``, ``torch.autograd.forward_ad``
dual numbers, ``gradcheck(check_forward_ad=True)``, ``jacfwd`` and forward-over-reverse
(``jacfwd(jacrev(f))``), each against the same transform of the eager composite in
:mod:`attnext.reference` (float64), plus float32 against the float64 oracle."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import jacfwd, jacrev, jvp

import attnext
from attnext import reference as R
from conftest import TOL, dropout_seed, generator, needs_native

# torch's forward AD loads its jvp decompositions through torch.jit.script on first use
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

F64 = torch.float64
TOL64 = dict(atol=1e-11, rtol=1e-9)
# float32 primals, tangents and Jacobians against the float64 oracle on the same inputs:
# conftest's float32 tolerance (atol 2e-6, rtol 2e-5). The attention's jvp streams key
# blocks in float32 (reference.causal_attention_jvp), the other rules run the float32
# kernels; the largest error measured is 36% of it (the tangent of attn-long-T=S).
TOL32 = dict(zip(("atol", "rtol"), TOL[torch.float32]))


_gen = generator
_seed = dropout_seed


class Case:
    """One op call: ``fn`` (the public attnext function on plain tensors, views taken
    inside) and ``ref`` (the eager composite doing the same), inputs of ``shapes``."""

    def __init__(self, id, op, fn, ref, shapes, small=True, random=False):
        self.id, self.op, self.fn, self.ref, self.shapes = id, op, fn, ref, shapes
        self.small = small  # cheap enough for gradcheck / jacfwd / forward-over-reverse
        self.random = random  # draws a dropout seed: transforms that vmap need randomness="same"

    def inputs(self, dtype=F64, seed=0):
        g = _gen(seed)
        return tuple(torch.randn(s, generator=g, dtype=F64).to(dtype) for s in self.shapes)

    def tangents(self, dtype=F64, seed=100):
        return self.inputs(dtype, seed)

    def __repr__(self):
        return self.id


def _nanogpt_split(x, nh, hs):
    """nanoGPT's q, k, v: ``c_attn(x).split(C, dim=2)`` then ``.view(B, T, nh, hs).transpose(1, 2)``
    (non-contiguous (B, nh, T, hs) views of one (B, T, 3C) tensor)."""
    B, T, _ = x.shape
    return tuple(z.view(B, T, nh, hs).transpose(1, 2) for z in x.split(nh * hs, dim=2))


CASES = [
    # --- causal_softmax
    # T == S, batch dims, scale 1: the square causal mask
    Case("softmax-square", "causal_softmax", lambda x: attnext.causal_softmax(x),
         lambda x: R.causal_softmax(x), [(2, 5, 5)]),
    # T < S top-left, scale != 1: trailing keys never seen (their tangents are dropped)
    Case("softmax-T<S-top_left", "causal_softmax", lambda x: attnext.causal_softmax(x, 0.7),
         lambda x: R.causal_softmax(x, 0.7), [(2, 4, 6)]),
    # T < S bottom-right, negative scale: KV-cache alignment
    Case("softmax-T<S-bottom_right", "causal_softmax", lambda x: attnext.causal_softmax(x, -1.3, align="bottom_right"),
         lambda x: R.causal_softmax(x, -1.3, True), [(3, 4, 7)]),
    # T > S bottom-right: the first T - S rows see no key (zero rows, zero tangents)
    Case("softmax-T>S-bottom_right", "causal_softmax", lambda x: attnext.causal_softmax(x, 0.5, align="bottom_right"),
         lambda x: R.causal_softmax(x, 0.5, True), [(2, 6, 3)]),
    # 2-D input, no batch dims, transposed (non-contiguous) view
    Case("softmax-2d-transposed", "causal_softmax", lambda x: attnext.causal_softmax(x.t(), 1.5),
         lambda x: R.causal_softmax(x.t(), 1.5), [(6, 5)]),
    # --- matmul
    # batch dims broadcast both ways: (3, 1, 2, 4) @ (5, 4, 3) -> (3, 5, 2, 3)
    Case("matmul-broadcast", "matmul", attnext.matmul, torch.matmul, [(3, 1, 2, 4), (5, 4, 3)]),
    # vector @ batch of matrices: the vector's prepended dim removed
    Case("matmul-1d@3d", "matmul", attnext.matmul, torch.matmul, [(4,), (2, 4, 3)]),
    # batch of matrices @ vector: the vector's appended dim removed
    Case("matmul-3d@1d", "matmul", attnext.matmul, torch.matmul, [(2, 3, 4), (4,)]),
    # vector @ vector: a 0-d dot product
    Case("matmul-dot", "matmul", attnext.matmul, torch.matmul, [(5,), (5,)]),
    # transposed operand (q @ k^T as the lecture writes it)
    Case("matmul-transposed", "matmul", lambda a, b: attnext.matmul(a, b.transpose(-2, -1)),
         lambda a, b: torch.matmul(a, b.transpose(-2, -1)), [(2, 3, 4), (2, 5, 4)]),
    # --- causal_mean
    # (B, T, C), the lecture's bag of words
    Case("mean-3d", "causal_mean", attnext.causal_mean, R.causal_mean, [(2, 5, 3)]),
    # 2-D, no batch dims
    Case("mean-2d", "causal_mean", attnext.causal_mean, R.causal_mean, [(7, 4)]),
    # 4-D non-contiguous view
    Case("mean-4d-transposed", "causal_mean", lambda x: attnext.causal_mean(x.transpose(1, 2)),
         lambda x: R.causal_mean(x.transpose(1, 2)), [(2, 6, 3, 4)]),
    # --- dropout (the generator fixes (seed, offset): the same mask on every call)
    # p = 0.3, 3-D
    Case("dropout-p0.3", "dropout", lambda x: attnext.dropout(x, 0.3, generator=_gen(11)),
         lambda x: R.dropout(x, 0.3, *_seed(11)), [(3, 5, 7)], random=True),
    # p = 0.8 on a transposed view: the mask follows the output's row-major index
    Case("dropout-p0.8-transposed", "dropout", lambda x: attnext.dropout(x.transpose(0, 1), 0.8, generator=_gen(12)),
         lambda x: R.dropout(x.transpose(0, 1), 0.8, *_seed(12)), [(6, 4)], random=True),
    # --- causal_attention
    # the lecture's (B, T, hs), T == S, default scale
    Case("attn-lecture-3d", "causal_attention", lambda q, k, v: attnext.causal_attention(q, k, v),
         lambda q, k, v: R.causal_attention(q, k, v, 4**-0.5)[0], [(2, 7, 4), (2, 7, 4), (2, 7, 4)]),
    # nanoGPT's (B, nh, T, hs) as non-contiguous .transpose(1, 2) views of one c_attn output
    Case("attn-nanogpt-4d-views", "causal_attention",
         lambda x: attnext.causal_attention(*_nanogpt_split(x, 2, 3)),
         lambda x: R.causal_attention(*_nanogpt_split(x, 2, 3), 3**-0.5)[0], [(2, 6, 18)]),
    # T < S bottom-right, hs_v != hs, scale != hs**-0.5
    Case("attn-T<S-bottom_right-hsv", "causal_attention",
         lambda q, k, v: attnext.causal_attention(q, k, v, scale=0.4, align="bottom_right"),
         lambda q, k, v: R.causal_attention(q, k, v, 0.4, 0.0, True)[0], [(2, 4, 5), (2, 9, 5), (2, 9, 3)]),
    # T < S top-left: keys T.. are never seen
    Case("attn-T<S-top_left", "causal_attention", lambda q, k, v: attnext.causal_attention(q, k, v),
         lambda q, k, v: R.causal_attention(q, k, v, 3**-0.5)[0], [(2, 4, 3), (2, 7, 3), (2, 7, 3)]),
    # T > S bottom-right: the first T - S queries see no key (zero rows and tangents)
    Case("attn-T>S-bottom_right", "causal_attention",
         lambda q, k, v: attnext.causal_attention(q, k, v, align="bottom_right"),
         lambda q, k, v: R.causal_attention(q, k, v, 4**-0.5, 0.0, True)[0], [(2, 7, 4), (2, 3, 4), (2, 3, 6)]),
    # dropout_p > 0 with a fixed seed, 4-D batch (the mask hashes the linear batch index)
    Case("attn-dropout", "causal_attention",
         lambda q, k, v: attnext.causal_attention(q, k, v, dropout_p=0.3, generator=_gen(5)),
         lambda q, k, v: R.causal_attention(q, k, v, 4**-0.5, 0.3, False, *_seed(5))[0],
         [(2, 2, 6, 4), (2, 2, 6, 4), (2, 2, 6, 4)], random=True),
    # long S bottom-right: the jvp streams 3 key blocks of 256 (every query sees most keys)
    Case("attn-long-S-bottom_right", "causal_attention",
         lambda q, k, v: attnext.causal_attention(q, k, v, align="bottom_right"),
         lambda q, k, v: R.causal_attention(q, k, v, 4**-0.5, 0.0, True)[0],
         [(1, 8, 4), (1, 600, 4), (1, 600, 3)], small=False),
    # long T == S top-left: blocks past a row's diagonal are fully masked for early rows
    Case("attn-long-T=S", "causal_attention", lambda q, k, v: attnext.causal_attention(q, k, v, scale=0.8),
         lambda q, k, v: R.causal_attention(q, k, v, 0.8)[0], [(2, 530, 4), (2, 530, 4), (2, 530, 5)], small=False),
    # long S with dropout: the keep mask is sliced per key block
    Case("attn-long-S-dropout", "causal_attention",
         lambda q, k, v: attnext.causal_attention(q, k, v, dropout_p=0.2, align="bottom_right", generator=_gen(6)),
         lambda q, k, v: R.causal_attention(q, k, v, 4**-0.5, 0.2, True, *_seed(6))[0],
         [(2, 5, 4), (2, 520, 4), (2, 520, 4)], small=False, random=True),
    # --- causal_attention_qkvpacked
    # (B, T, 3, nh, hs), default scale
    Case("packed", "causal_attention_qkvpacked", lambda x: attnext.causal_attention_qkvpacked(x),
         lambda x: R.causal_attention_qkvpacked(x, 3**-0.5)[0], [(2, 5, 3, 2, 3)]),
    # two batch dims, non-contiguous (T and B swapped), scale != hs**-0.5
    Case("packed-5d-transposed", "causal_attention_qkvpacked",
         lambda x: attnext.causal_attention_qkvpacked(x.transpose(0, 2), scale=0.6),
         lambda x: R.causal_attention_qkvpacked(x.transpose(0, 2), 0.6)[0], [(6, 2, 2, 3, 1, 4)]),
    # dropout with a fixed seed
    Case("packed-dropout", "causal_attention_qkvpacked",
         lambda x: attnext.causal_attention_qkvpacked(x, dropout_p=0.25, generator=_gen(8)),
         lambda x: R.causal_attention_qkvpacked(x, 3**-0.5, 0.25, False, *_seed(8))[0], [(2, 6, 3, 2, 3)],
         random=True),
]
SMALL = [c for c in CASES if c.small]


def _assert_native(case, args):
    """With the extension built, the case must run the native kernel (not the fallback)."""
    if attnext.native_available() and attnext.kernels_enabled():
        assert not attnext.explain(case.op, *args), attnext.explain(case.op, *args)


def _assert_close(got, expected, tol, what=""):
    if isinstance(expected, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(expected)
        for i, (g, e) in enumerate(zip(got, expected)):
            _assert_close(g, e, tol, f"{what}[{i}]")
        return
    assert got.shape == expected.shape, f"{what}: {got.shape} vs {expected.shape}"
    torch.testing.assert_close(got.double(), expected.double(), **tol, msg=lambda m: f"{what}: {m}")


def _nonzero(t):
    """Guards against a vacuous comparison: the oracle's derivative is not all zeros."""
    assert t.abs().max() > 0


# ----------------------------------------------------------------------------- torch.func.jvp


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_jvp_matches_reference(case):
    args, tangents = case.inputs(), case.tangents()
    _assert_native(case, args)
    out, t_out = jvp(case.fn, args, tangents)
    ref, t_ref = jvp(case.ref, args, tangents)
    _nonzero(t_ref)
    _assert_close(out, ref, TOL64, "primal")
    _assert_close(t_out, t_ref, TOL64, "tangent")


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_jvp_float32_against_float64_oracle(case):
    args32, tangents32 = case.inputs(torch.float32), case.tangents(torch.float32)
    out, t_out = jvp(case.fn, args32, tangents32)
    assert out.dtype == t_out.dtype == torch.float32
    # the oracle on the same (float32-representable) values, in float64
    ref, t_ref = jvp(case.ref, tuple(a.double() for a in args32), tuple(t.double() for t in tangents32))
    _assert_close(out, ref, TOL32, "primal")
    _assert_close(t_out, t_ref, TOL32, "tangent")


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_jvp_on_fallback(case, kernels_disabled):
    # the public functions' eager fallback under torch.func.jvp (no custom rule involved)
    args, tangents = case.inputs(), case.tangents()
    assert attnext.explain(case.op, *args)
    out, t_out = jvp(case.fn, args, tangents)
    ref, t_ref = jvp(case.ref, args, tangents)
    _assert_close(out, ref, TOL64, "primal")
    _assert_close(t_out, t_ref, TOL64, "tangent")


# ----------------------------------------------------------------------------- dual numbers


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_dual_numbers_match_reference(case):
    args, tangents = case.inputs(), case.tangents()
    _, t_ref = jvp(case.ref, args, tangents)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(a, t) for a, t in zip(args, tangents)]
        primal, tangent = fwAD.unpack_dual(case.fn(*duals))
        assert tangent is not None
        primal, tangent = primal.clone(), tangent.clone()
    _assert_close(primal, case.ref(*args), TOL64, "primal")
    _assert_close(tangent, t_ref, TOL64, "tangent")


# ----------------------------------------------------------------------------- tangent on one operand


@pytest.mark.parametrize("which", [0, 1])  # the tangent on a only, on b only
@pytest.mark.parametrize("shapes", [
    [(3, 1, 2, 4), (5, 4, 3)],  # broadcast batch: the other operand's tangent is None, not zeros
    [(4,), (2, 4, 3)],  # vector operand
])
def test_matmul_tangent_on_one_operand(which, shapes):
    g = _gen(0)
    a, b = (torch.randn(s, generator=g, dtype=F64) for s in shapes)
    t = torch.randn((a, b)[which].shape, generator=g, dtype=F64)
    expected = torch.matmul(t, b) if which == 0 else torch.matmul(a, t)  # bilinear: the tangent term alone
    _nonzero(expected)
    # torch.func.jvp through a closure over the other operand
    f = (lambda x: attnext.matmul(x, b)) if which == 0 else (lambda x: attnext.matmul(a, x))
    _, t_out = jvp(f, ((a, b)[which],), (t,))
    _assert_close(t_out, expected, TOL64, "func.jvp")
    # a dual number on one operand only
    with fwAD.dual_level():
        x = fwAD.make_dual((a, b)[which], t)
        out = attnext.matmul(x, b) if which == 0 else attnext.matmul(a, x)
        tangent = fwAD.unpack_dual(out).tangent.clone()
    _assert_close(tangent, expected, TOL64, "forward_ad")


def test_attention_tangent_on_v_only_is_linear():
    # tq = tk = None: the tangent is the attention weights applied to tv (out is linear in v)
    q, k, v, tv = (torch.randn(2, 6, 4, generator=_gen(i), dtype=F64) for i in range(4))
    _, t_out = jvp(lambda v: attnext.causal_attention(q, k, v), (v,), (tv,))
    _assert_close(t_out, R.causal_attention(q, k, tv, 0.5)[0], TOL64, "tangent")


# ----------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("shape", [(4, 9, 5), (1000,)])  # batch of matrices; a long 1-D vector
def test_dropout_tangent_is_the_same_mask(p, shape):
    x = torch.randn(shape, generator=_gen(0), dtype=F64)
    t = torch.randn(shape, generator=_gen(1), dtype=F64)
    out, t_out = jvp(lambda x: attnext.dropout(x, p, generator=_gen(3)), (x,), (t,))
    seed, offset = _seed(3)
    keep = R.dropout_keep_flat(shape, p, seed, offset)
    assert 0 < keep.sum() < keep.numel()  # some kept, some dropped
    _assert_close(out, x * keep / (1 - p), TOL64, "primal")
    _assert_close(t_out, t * keep / (1 - p), TOL64, "tangent: the same mask, the same scale")
    _assert_close(t_out, jvp(lambda x: R.dropout(x, p, seed, offset), (x,), (t,))[1], TOL64, "vs reference jvp")
    # a different seed draws a different mask for the tangent too
    _, t_other = jvp(lambda x: attnext.dropout(x, p, generator=_gen(4)), (x,), (t,))
    assert not torch.equal(t_other == 0, t_out == 0)


@needs_native
def test_raw_ops_under_dual_numbers():
    # torch.ops.attnext.* called directly with dual inputs (outside torch.func): the Autograd
    # kernel applies the op's Function, whose jvp rule gives the tangent; lse has none
    g = _gen(0)
    q, k, v, tq, tk, tv = (torch.randn(2, 6, 4, generator=g, dtype=F64) for _ in range(6))
    seed, offset = 123, 456
    with fwAD.dual_level():
        out, lse = torch.ops.attnext.causal_attention(
            fwAD.make_dual(q, tq), fwAD.make_dual(k, tk), fwAD.make_dual(v, tv), 0.5, 0.25, False, seed, offset
        )
        t_out = fwAD.unpack_dual(out).tangent.clone()
        assert fwAD.unpack_dual(lse).tangent is None  # lse is marked non-differentiable
        y = torch.ops.attnext.dropout(fwAD.make_dual(q, tq), 0.4, seed, offset)
        t_y = fwAD.unpack_dual(y).tangent.clone()
    ref = lambda q, k, v: R.causal_attention(q, k, v, 0.5, 0.25, False, seed, offset)[0]  # noqa: E731
    _assert_close(t_out, jvp(ref, (q, k, v), (tq, tk, tv))[1], TOL64, "attention tangent")
    _assert_close(t_y, R.dropout(tq, 0.4, seed, offset), TOL64, "dropout tangent")


# ----------------------------------------------------------------------------- zero rows


@pytest.mark.parametrize("fn", [
    lambda x, y, z: attnext.causal_softmax(x, 0.5, align="bottom_right"),  # scores (2, 6, 3)
    lambda x, y, z: attnext.causal_attention(x, y, z, align="bottom_right"),  # q (2, 6, 3), k v (2, 3, 3)
], ids=["softmax", "attention"])
def test_rows_that_see_no_key_have_zero_tangents(fn):
    # bottom-right T > S: rows 0..T-S-1 are zero, so their tangents are exactly zero, not NaN
    g = _gen(0)
    x, tx = torch.randn(2, 6, 3, generator=g, dtype=F64), torch.randn(2, 6, 3, generator=g, dtype=F64)
    y, ty, z, tz = (torch.randn(2, 3, 3, generator=g, dtype=F64) for _ in range(4))
    out, t_out = jvp(fn, (x, y, z), (tx, ty, tz))
    assert torch.isfinite(t_out).all()
    assert t_out[:, :3].abs().max() == 0
    assert t_out[:, 3:].abs().max() > 0


# ----------------------------------------------------------------------------- gradcheck


ATTENTION_OPS = ("causal_attention", "causal_attention_qkvpacked")


@pytest.mark.parametrize("case", SMALL, ids=repr)
def test_gradcheck_forward_ad(case):
    args = tuple(a.requires_grad_() for a in case.inputs())
    # check_batched_forward_grad runs the jvp under torch's legacy vmap: not with a dropout
    # seed drawn inside the function. Attention in fast mode (random projections u^T J v
    # of the Jacobians: a few calls instead of one per input element; a wrong derivative
    # still fails).
    attention = case.op in ATTENTION_OPS
    assert torch.autograd.gradcheck(
        case.fn, args, check_forward_ad=True, check_backward_ad=True,
        check_batched_forward_grad=not case.random, fast_mode=attention,
    )


# ----------------------------------------------------------------------------- jacfwd


@pytest.mark.parametrize("case", SMALL, ids=repr)
def test_jacfwd_matches_reference(case):
    args = case.inputs()
    argnums = tuple(range(len(args)))
    jac = jacfwd(case.fn, argnums, randomness="same")(*args)
    jac_ref = jacfwd(case.ref, argnums, randomness="same")(*args)
    for j in jac_ref:
        _nonzero(j)
    _assert_close(jac, jac_ref, TOL64, "jacfwd")
    # and the reverse-mode Jacobian of the op itself: forward and reverse rules agree
    _assert_close(jac, jacrev(case.fn, argnums)(*args), TOL64, "jacfwd vs jacrev")


F32_JACFWD = ("softmax-T>S-bottom_right", "matmul-broadcast", "attn-nanogpt-4d-views")


@pytest.mark.parametrize("case", [c for c in SMALL if c.id in F32_JACFWD], ids=repr)
def test_jacfwd_float32_against_float64_oracle(case):
    args32 = case.inputs(torch.float32)
    argnums = tuple(range(len(args32)))
    jac = jacfwd(case.fn, argnums, randomness="same")(*args32)
    jac_ref = jacfwd(case.ref, argnums, randomness="same")(*(a.double() for a in args32))
    _assert_close(jac, jac_ref, TOL32, "jacfwd float32")


# ----------------------------------------------------------------------------- forward over reverse


HESSIAN_CASES = [c for c in SMALL if c.op in ("causal_softmax", "matmul", "causal_attention")]


@pytest.mark.parametrize("case", HESSIAN_CASES, ids=repr)
def test_jacfwd_of_jacrev_matches_reference(case):
    # jvp on the backward's path: the backward ops' jvp rules (softmax, matmul) and the
    # attention's differentiable recompute of its gradients
    args = case.inputs()
    w = torch.randn(case.fn(*args).shape, generator=_gen(7), dtype=F64)
    argnums = tuple(range(len(args)))

    def loss(f):
        return lambda *a: (f(*a) * w).sum() + 0.5 * (f(*a) ** 2).sum()

    h = jacfwd(jacrev(loss(case.fn), argnums), argnums, randomness="same")(*args)
    h_ref = jacfwd(jacrev(loss(case.ref), argnums), argnums, randomness="same")(*args)
    _nonzero(h_ref[0][0])
    _assert_close(h, h_ref, TOL64, "hessian")
    # the Hessian is symmetric: H[i][j] == H[j][i]^T
    for i in argnums:
        for j in argnums:
            hij, hji, dj = h[i][j], h[j][i], args[j].dim()
            assert hij.shape == (*args[i].shape, *args[j].shape)
            torch.testing.assert_close(hij, hji.permute(*range(dj, hji.dim()), *range(dj)), **TOL64)
