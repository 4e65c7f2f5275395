"""torch.func end to end on every attnext op: vmap (in_dims, unbatched operands, dropout
with randomness="same"), grad, jacrev, jacfwd, hessian, grad of grad, each against the
same transform of the eager composite in :mod:`attnext.reference`; functional_call over
the attnext.nn modules (parameter grads, model ensembling); the errors for ops called
the wrong way under a transform."""
import copy

import pytest
import torch
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, stack_module_state, vmap

import attnext
from attnext import reference as R
from conftest import TOL, dropout_seed, generator, needs_native

# torch's forward AD (jacfwd, hessian) loads its jvp decompositions through torch.jit.script on first use
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

F64 = torch.float64
TOL64 = dict(atol=1e-11, rtol=1e-9)
# float32 gradients against the float64 oracle on the same inputs: conftest's float32
# tolerance (atol 2e-6, rtol 2e-5); the largest error measured here is under 5% of it.
TOL32 = dict(zip(("atol", "rtol"), TOL[torch.float32]))


_gen = generator
_seed = dropout_seed


def _randn(*shape, seed=0, dtype=F64):
    return torch.randn(shape, generator=_gen(seed), dtype=F64).to(dtype)


class Case:
    """``fn``: the public attnext function on plain tensors; ``ref``: the eager composite."""

    def __init__(self, id, op, fn, ref, shapes, random=False):
        self.id, self.op, self.fn, self.ref, self.shapes, self.random = id, op, fn, ref, shapes, random

    def inputs(self, dtype=F64):
        g = _gen(0)
        return tuple(torch.randn(s, generator=g, dtype=F64).to(dtype) for s in self.shapes)

    def __repr__(self):
        return self.id


def _nanogpt_split(x, nh, hs):
    """nanoGPT's q, k, v: non-contiguous ``.view(B, T, nh, hs).transpose(1, 2)`` views of one c_attn output."""
    B, T, _ = x.shape
    return tuple(z.view(B, T, nh, hs).transpose(1, 2) for z in x.split(nh * hs, dim=2))


CASES = [
    # causal_softmax, T == S, scale != 1
    Case("softmax", "causal_softmax", lambda x: attnext.causal_softmax(x, 0.8),
         lambda x: R.causal_softmax(x, 0.8), [(2, 5, 5)]),
    # causal_softmax bottom-right T > S: rows that see no key are zero (no NaN in any derivative)
    Case("softmax-T>S-bottom_right", "causal_softmax", lambda x: attnext.causal_softmax(x, 1.2, align="bottom_right"),
         lambda x: R.causal_softmax(x, 1.2, True), [(2, 5, 3)]),
    # matmul with batch dims broadcast both ways: gradients reduced over the broadcast
    Case("matmul-broadcast", "matmul", attnext.matmul, torch.matmul, [(3, 1, 2, 4), (5, 4, 3)]),
    # matmul with a vector operand on the left
    Case("matmul-1d@3d", "matmul", attnext.matmul, torch.matmul, [(4,), (2, 4, 3)]),
    # matmul with a vector operand on the right
    Case("matmul-3d@1d", "matmul", attnext.matmul, torch.matmul, [(2, 3, 4), (4,)]),
    # causal_mean (linear: the Hessian of the loss comes from the loss alone)
    Case("mean", "causal_mean", attnext.causal_mean, R.causal_mean, [(2, 5, 3)]),
    # dropout with a fixed generator seed: the same mask on every call
    Case("dropout", "dropout", lambda x: attnext.dropout(x, 0.3, generator=_gen(11)),
         lambda x: R.dropout(x, 0.3, *_seed(11)), [(3, 4, 5)], random=True),
    # the lecture's attention head (B, T, hs)
    Case("attn-lecture", "causal_attention", lambda q, k, v: attnext.causal_attention(q, k, v),
         lambda q, k, v: R.causal_attention(q, k, v, 4**-0.5)[0], [(2, 5, 4), (2, 5, 4), (2, 5, 4)]),
    # nanoGPT's (B, nh, T, hs) .transpose(1, 2) views
    Case("attn-nanogpt-views", "causal_attention", lambda x: attnext.causal_attention(*_nanogpt_split(x, 2, 3)),
         lambda x: R.causal_attention(*_nanogpt_split(x, 2, 3), 3**-0.5)[0], [(2, 4, 18)]),
    # T < S bottom-right, hs_v != hs, explicit scale
    Case("attn-T<S-bottom_right", "causal_attention",
         lambda q, k, v: attnext.causal_attention(q, k, v, scale=0.6, align="bottom_right"),
         lambda q, k, v: R.causal_attention(q, k, v, 0.6, 0.0, True)[0], [(2, 3, 4), (2, 6, 4), (2, 6, 2)]),
    # attention dropout with a fixed seed
    Case("attn-dropout", "causal_attention",
         lambda q, k, v: attnext.causal_attention(q, k, v, dropout_p=0.3, generator=_gen(5)),
         lambda q, k, v: R.causal_attention(q, k, v, 4**-0.5, 0.3, False, *_seed(5))[0],
         [(2, 5, 4), (2, 5, 4), (2, 5, 4)], random=True),
    # packed qkv (B, T, 3, nh, hs)
    Case("packed", "causal_attention_qkvpacked", lambda x: attnext.causal_attention_qkvpacked(x),
         lambda x: R.causal_attention_qkvpacked(x, 3**-0.5)[0], [(2, 4, 3, 2, 3)]),
    # packed qkv with dropout
    Case("packed-dropout", "causal_attention_qkvpacked",
         lambda x: attnext.causal_attention_qkvpacked(x, dropout_p=0.25, generator=_gen(8)),
         lambda x: R.causal_attention_qkvpacked(x, 3**-0.5, 0.25, False, *_seed(8))[0], [(2, 4, 3, 2, 3)],
         random=True),
]
# one float32 case per op
F32_CASES = [c for c in CASES if c.id in ("softmax", "matmul-broadcast", "mean", "dropout", "attn-nanogpt-views",
                                           "packed")]


def _assert_native(case, args):
    """With the extension built, the case must run the native kernel (not the fallback)."""
    if attnext.native_available() and attnext.kernels_enabled():
        assert not attnext.explain(case.op, *args), attnext.explain(case.op, *args)


def _assert_close(got, expected, tol, what=""):
    if isinstance(expected, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(expected), what
        for i, (g, e) in enumerate(zip(got, expected)):
            _assert_close(g, e, tol, f"{what}[{i}]")
        return
    assert got.shape == expected.shape, f"{what}: {got.shape} vs {expected.shape}"
    torch.testing.assert_close(got.double(), expected.double(), **tol, msg=lambda m: f"{what}: {m}")


def _nonzero(t):
    """Guards against a vacuous comparison: the oracle's derivative is not all zeros."""
    if isinstance(t, (tuple, list)):
        for x in t:
            _nonzero(x)
        return
    assert t.abs().max() > 0


def _loss(case, f, dtype=F64):
    """A scalar loss whose derivatives of every order are nonzero: <f, w> + |f|^2 / 2."""
    out_shape = case.ref(*case.inputs()).shape
    w = torch.randn(out_shape, generator=_gen(7), dtype=F64).to(dtype)
    return lambda *a: (f(*a) * w).sum() + 0.5 * (f(*a) ** 2).sum()


def _argnums(args):
    return tuple(range(len(args)))


# ----------------------------------------------------------------------------- grad, jacrev, jacfwd


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_grad(case):
    args = case.inputs()
    _assert_native(case, args)
    g = grad(_loss(case, case.fn), _argnums(args))(*args)
    g_ref = grad(_loss(case, case.ref), _argnums(args))(*args)
    _nonzero(g_ref)
    _assert_close(g, g_ref, TOL64, "grad")


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_grad_on_fallback(case, kernels_disabled):
    # the public functions' eager fallback under torch.func.grad
    args = case.inputs()
    assert attnext.explain(case.op, *args)
    g = grad(_loss(case, case.fn), _argnums(args))(*args)
    _assert_close(g, grad(_loss(case, case.ref), _argnums(args))(*args), TOL64, "grad")


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_jacrev(case):
    args = case.inputs()
    j = jacrev(case.fn, _argnums(args))(*args)
    j_ref = jacrev(case.ref, _argnums(args))(*args)
    _nonzero(j_ref)
    _assert_close(j, j_ref, TOL64, "jacrev")


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_jacfwd(case):
    args = case.inputs()
    j = jacfwd(case.fn, _argnums(args), randomness="same")(*args)
    j_ref = jacfwd(case.ref, _argnums(args), randomness="same")(*args)
    _nonzero(j_ref)
    _assert_close(j, j_ref, TOL64, "jacfwd")


@pytest.mark.parametrize("case", F32_CASES, ids=repr)
def test_grad_float32_against_float64_oracle(case):
    args32 = case.inputs(torch.float32)
    g = grad(_loss(case, case.fn, torch.float32), _argnums(args32))(*args32)
    assert all(t.dtype == torch.float32 for t in g)
    g_ref = grad(_loss(case, case.ref), _argnums(args32))(*(a.double() for a in args32))
    _assert_close(g, g_ref, TOL32, "grad float32")


# ----------------------------------------------------------------------------- second order


def _hessian(f, argnums, random):
    # torch.func.hessian is jacfwd(jacrev(f)) with vmap's randomness="error": a function
    # that draws a dropout seed needs randomness="same"
    if random:
        return jacfwd(jacrev(f, argnums), argnums, randomness="same")
    return hessian(f, argnums)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_hessian(case):
    args = case.inputs()
    h = _hessian(_loss(case, case.fn), _argnums(args), case.random)(*args)
    h_ref = _hessian(_loss(case, case.ref), _argnums(args), case.random)(*args)
    _nonzero(h_ref[0][0])
    _assert_close(h, h_ref, TOL64, "hessian")


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_grad_of_grad(case):
    # reverse over reverse: the backward ops' own backward (softmax, matmul, mean, dropout)
    # and the attention's differentiable recompute
    args = case.inputs()

    def outer(f):
        inner = grad(_loss(case, f), _argnums(args))
        return lambda *a: sum((g**2).sum() for g in inner(*a))

    gg = grad(outer(case.fn), _argnums(args))(*args)
    gg_ref = grad(outer(case.ref), _argnums(args))(*args)
    _nonzero(gg_ref)
    _assert_close(gg, gg_ref, TOL64, "grad of grad")


@needs_native
def test_transform_safe_entry_with_fixed_seed():
    # attnext.ops._call, the op entry that works under transforms, with an explicit
    # (seed, offset): torch.func.hessian (randomness="error") works since nothing is drawn
    q, k, v = (_randn(2, 5, 4, seed=i) for i in range(3))
    seed, offset = 77, 3
    w = _randn(2, 5, 4, seed=9)

    def loss(call):
        return lambda q, k, v: ((call(q, k, v) * w).sum() + (call(q, k, v) ** 2).sum())

    def attn(q, k, v):
        return attnext.ops._call("causal_attention", q, k, v, 0.5, 0.2, True, seed, offset, None)[0]

    def attn_ref(q, k, v):
        return R.causal_attention(q, k, v, 0.5, 0.2, True, seed, offset)[0]

    def drop(q, k, v):
        return attnext.ops._call("dropout", q, 0.4, seed, offset, None) * k

    def drop_ref(q, k, v):
        return R.dropout(q, 0.4, seed, offset) * k

    for f, fr in ((attn, attn_ref), (drop, drop_ref)):
        _assert_close(hessian(loss(f), (0, 1, 2))(q, k, v), hessian(loss(fr), (0, 1, 2))(q, k, v), TOL64, "hessian")
        _assert_close(grad(loss(f), (0, 1, 2))(q, k, v), grad(loss(fr), (0, 1, 2))(q, k, v), TOL64, "grad")


# ----------------------------------------------------------------------------- vmap


def _loop(f, in_dims, args):
    """The definition of vmap: f on each slice, stacked at 0."""
    n = next(a.shape[d] for a, d in zip(args, in_dims) if d is not None)
    outs = [f(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims))) for i in range(n)]
    return torch.stack(outs)


VMAP_CASES = [
    # (id, fn, ref, batched shapes, in_dims): the path each covers
    # softmax, vmapped dim folded into the leading batch dims
    ("softmax", lambda x: attnext.causal_softmax(x, 0.9, align="bottom_right"),
     lambda x: R.causal_softmax(x, 0.9, True), [(3, 2, 4, 6)], (0,)),
    # softmax vmapped over a middle dim (moved to the front first)
    ("softmax-in_dim-1", lambda x: attnext.causal_softmax(x), lambda x: R.causal_softmax(x), [(4, 3, 4)], (1,)),
    # matmul, both operands batched
    ("matmul-both", attnext.matmul, torch.matmul, [(3, 2, 4), (3, 4, 5)], (0, 0)),
    # matmul with b unbatched: vmap(attnext.matmul, in_dims=(0, None))
    ("matmul-b-unbatched", attnext.matmul, torch.matmul, [(3, 2, 4), (4, 5)], (0, None)),
    # matmul with a unbatched and b batched at dim 1, logical batch dims broadcast (1,) vs (2,)
    ("matmul-a-unbatched-broadcast", attnext.matmul, torch.matmul, [(1, 2, 4), (2, 3, 4, 5)], (None, 1)),
    # matmul with operands of different logical batch rank: the lower one padded with size-1 dims
    ("matmul-rank-mismatch", attnext.matmul, torch.matmul, [(3, 2, 4), (3, 5, 4, 2)], (0, 0)),
    # matmul with a vector operand: one call per slice
    ("matmul-vector", attnext.matmul, torch.matmul, [(3, 4), (3, 2, 4, 5)], (0, 0)),
    # causal_mean vmapped over dim 2 of (T, C, B)
    ("mean", attnext.causal_mean, R.causal_mean, [(5, 3, 4)], (2,)),
    # attention, all batched
    ("attn", lambda q, k, v: attnext.causal_attention(q, k, v), lambda q, k, v: R.causal_attention(q, k, v, 0.5)[0],
     [(3, 2, 5, 4), (3, 2, 5, 4), (3, 2, 5, 4)], (0, 0, 0)),
    # attention with k and v unbatched (expanded views)
    ("attn-kv-unbatched", lambda q, k, v: attnext.causal_attention(q, k, v, align="bottom_right"),
     lambda q, k, v: R.causal_attention(q, k, v, 0.5, 0.0, True)[0],
     [(3, 2, 4, 4), (2, 6, 4), (2, 6, 3)], (0, None, None)),
    # packed qkv vmapped over dim 1
    ("packed", lambda x: attnext.causal_attention_qkvpacked(x), lambda x: R.causal_attention_qkvpacked(x, 3**-0.5)[0],
     [(2, 3, 4, 3, 2, 3)], (1,)),
]


@pytest.mark.parametrize("case", VMAP_CASES, ids=[c[0] for c in VMAP_CASES])
def test_vmap(case):
    _, fn, ref, shapes, in_dims = case
    args = tuple(_randn(*s, seed=i) for i, s in enumerate(shapes))
    out = vmap(fn, in_dims=in_dims)(*args)
    _assert_close(out, _loop(ref, in_dims, args), TOL64, "vs loop of the reference")
    _assert_close(out, vmap(ref, in_dims=in_dims)(*args), TOL64, "vs vmap of the reference")


DROPOUT_VMAP_CASES = [
    # (id, fn with dropout, the same without dropout, batched shapes, in_dims)
    # dropout on (B, 4, 5): each slice gets the mask of the unvmapped call with the same generator seed
    ("dropout", lambda x: attnext.dropout(x, 0.4, generator=_gen(3)), lambda x: x, [(4, 4, 5)], (0,)),
    # dropout vmapped over dim 1
    ("dropout-in_dim-1", lambda x: attnext.dropout(x, 0.6, generator=_gen(4)), lambda x: x, [(5, 3, 6)], (1,)),
    # attention dropout with k, v unbatched (the mask hashes the batch index: once per slice)
    ("attn-dropout-kv-unbatched", lambda q, k, v: attnext.causal_attention(q, k, v, dropout_p=0.3, generator=_gen(9)),
     lambda q, k, v: attnext.causal_attention(q, k, v), [(3, 2, 5, 4), (2, 5, 4), (2, 5, 3)], (0, None, None)),
    # packed qkv with dropout
    ("packed-dropout", lambda x: attnext.causal_attention_qkvpacked(x, dropout_p=0.3, generator=_gen(10)),
     lambda x: attnext.causal_attention_qkvpacked(x), [(3, 2, 4, 3, 2, 3)], (0,)),
]


@pytest.mark.parametrize("case", DROPOUT_VMAP_CASES, ids=[c[0] for c in DROPOUT_VMAP_CASES])
def test_vmap_dropout_same_randomness_matches_loop(case):
    _, fn, no_dropout, shapes, in_dims = case
    args = tuple(_randn(*s, seed=i) for i, s in enumerate(shapes))
    out = vmap(fn, in_dims=in_dims, randomness="same")(*args)
    loop = _loop(fn, in_dims, args)
    assert not torch.allclose(loop, _loop(no_dropout, in_dims, args))  # dropout did something
    _assert_close(out, loop, TOL64, "vs loop")
    assert torch.equal(out == 0, loop == 0)  # the same elements dropped


def test_vmap_dropout_masks_match_reference():
    # the per-slice loop above is itself the reference's mask, slice by slice
    x = _randn(4, 6, 5)
    out = vmap(lambda x: attnext.dropout(x, 0.5, generator=_gen(2)), randomness="same")(x)
    seed, offset = _seed(2)
    _assert_close(out, torch.stack([R.dropout(xi, 0.5, seed, offset) for xi in x]), TOL64, "dropout")


def test_vmap_nested_and_over_grad():
    # vmap of vmap (two folded dims) and per-example gradients (vmap of grad)
    q, k, v = (_randn(3, 2, 2, 5, 4, seed=i) for i in range(3))
    f = lambda q, k, v: attnext.causal_attention(q, k, v)  # noqa: E731
    fr = lambda q, k, v: R.causal_attention(q, k, v, 0.5)[0]  # noqa: E731
    _assert_close(vmap(vmap(f))(q, k, v), vmap(vmap(fr))(q, k, v), TOL64, "vmap of vmap")
    loss = lambda f: (lambda q, k, v: (f(q, k, v) ** 2).sum())  # noqa: E731
    per_example = vmap(grad(loss(f), (0, 1, 2)), in_dims=(0, 0, None))(q, k, v[0])
    per_example_ref = vmap(grad(loss(fr), (0, 1, 2)), in_dims=(0, 0, None))(q, k, v[0])
    _nonzero(per_example_ref)
    _assert_close(per_example, per_example_ref, TOL64, "vmap of grad")


# ----------------------------------------------------------------------------- functional_call over attnext.nn


MODULES = [
    # the lecture's Head: causal_attention on (B, T, hs)
    ("Head", lambda: attnext.nn.Head(8, 4, 16)),
    # the lecture's MultiHeadAttention: matmul projections + causal_attention_qkvpacked
    ("MultiHeadAttention", lambda: attnext.nn.MultiHeadAttention(2, 4, 8, 16)),
    # nanoGPT's CausalSelfAttention (biases added in place after attnext.matmul)
    ("CausalSelfAttention", lambda: attnext.nn.CausalSelfAttention(n_embd=8, n_head=2, block_size=16)),
]


def _module(make, seed=0):
    torch.manual_seed(seed)
    return make().double().eval()


@pytest.mark.parametrize("name,make", MODULES, ids=[m[0] for m in MODULES])
def test_functional_call_grad_matches_backward(name, make):
    m = _module(make)
    x = _randn(3, 7, 8, seed=1)
    w = _randn(3, 7, m(x).shape[-1], seed=2)

    def loss(params, x):
        return (functional_call(m, params, (x,)) * w).sum() + (functional_call(m, params, (x,)) ** 2).sum()

    params = {k: p.detach() for k, p in m.named_parameters()}
    g = grad(loss)(params, x)
    m.zero_grad()
    loss(dict(m.named_parameters()), x).backward()
    assert set(g) == {k for k, _ in m.named_parameters()}
    for k, p in m.named_parameters():
        _nonzero(p.grad)
        _assert_close(g[k], p.grad, TOL64, k)


@pytest.mark.parametrize("name,make", MODULES, ids=[m[0] for m in MODULES])
def test_functional_call_vmap_ensemble_matches_loop(name, make):
    # model ensembling: one vmapped call over a stack of parameter sets
    models = [_module(make, seed=s) for s in range(3)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = _randn(2, 6, 8, seed=1)

    def run(p, b, x):
        return functional_call(base, (p, b), (x,))

    out = vmap(run, in_dims=(0, 0, None))(params, buffers, x)
    loop = torch.stack([m(x) for m in models])
    assert not torch.allclose(loop[0], loop[1])  # the ensemble members differ
    _assert_close(out, loop, TOL64, "ensemble output")
    # and the ensemble's parameter gradients against each member's backward
    grads = vmap(grad(lambda p, b, x: (run(p, b, x) ** 2).sum()), in_dims=(0, 0, None))(params, buffers, x)
    for i, m in enumerate(models):
        m.zero_grad()
        (m(x) ** 2).sum().backward()
        for k, p in m.named_parameters():
            torch.testing.assert_close(grads[k][i], p.grad, atol=1e-10, rtol=1e-8)


# ----------------------------------------------------------------------------- errors


@needs_native
def test_raw_op_under_transform_names_the_public_function():
    x = _randn(4, 4)
    with pytest.raises(RuntimeError, match="public function"):
        grad(lambda x: torch.ops.attnext.causal_softmax(x, 1.0, False).sum())(x)
    with pytest.raises(RuntimeError, match="public function"):
        jacrev(lambda x: torch.ops.attnext.causal_mean(x))(_randn(4, 3))


@needs_native
@pytest.mark.parametrize("packed", [False, True])
def test_attention_backward_op_is_not_differentiable_on_its_own(packed):
    # the fused backward has no derivative: differentiating its outputs raises, naming the public op
    if packed:
        qkv = _randn(2, 5, 3, 2, 4)
        out, lse = torch.ops.attnext.causal_attention_qkvpacked(qkv, 0.5, 0.0, False, 0, 0)
        x = qkv.clone().requires_grad_()
        (g,) = (torch.ops.attnext._causal_attention_qkvpacked_backward(torch.ones_like(out), x, out, lse, 0.5, 0.0,
                                                                        False, 0, 0),)
    else:
        q, k, v = (_randn(2, 5, 4, seed=i) for i in range(3))
        out, lse = torch.ops.attnext.causal_attention(q, k, v, 0.5, 0.0, False, 0, 0)
        x = q.clone().requires_grad_()
        g, _, _ = torch.ops.attnext._causal_attention_backward(torch.ones_like(out), x, k, v, out, lse, 0.5, 0.0,
                                                               False, 0, 0)
    assert g.requires_grad
    with pytest.raises(RuntimeError, match="not differentiable on its own"):
        torch.autograd.grad(g.sum(), x, create_graph=True)
