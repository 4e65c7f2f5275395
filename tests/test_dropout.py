"""attnext.dropout and attnext.nn.Dropout: the mask against the reference, statistics,
reproducibility, gradients, opcheck, compile, modules, errors."""
import pytest
import torch

import attnext
from attnext import reference
from conftest import devices, needs_native


def _seed(generator_seed):
    return attnext.ops._draw_dropout_seed(torch.Generator().manual_seed(generator_seed))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.1, 0.37])
def test_matches_reference_mask(device, dtype, p):
    x = torch.randn(5, 33, 17, device=device).to(dtype)
    y = attnext.dropout(x, p, generator=torch.Generator().manual_seed(3))
    r = reference.dropout(x, p, *_seed(3))
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y == 0, r == 0)  # the same elements dropped
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(y, r)
    else:  # the kernel scales in float and rounds once; eager rounds 1/(1-p) first
        torch.testing.assert_close(y, r, atol=0, rtol=2e-2 if dtype == torch.bfloat16 else 2e-3)


@needs_native
def test_native_kernel_runs_and_matches_fallback():
    x = torch.randn(64, 256, 48)
    assert not attnext.explain("dropout", x)
    y = attnext.dropout(x, 0.2, generator=torch.Generator().manual_seed(9))
    attnext.set_kernels_enabled(False)
    try:
        assert attnext.explain("dropout", x)
        yf = attnext.dropout(x, 0.2, generator=torch.Generator().manual_seed(9))
    finally:
        attnext.set_kernels_enabled(True)
    assert torch.equal(y, yf)


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5, 0.9])
def test_keep_rate_and_mean_preserved(p):
    x = torch.ones(1 << 20)
    y = attnext.dropout(x, p, generator=torch.Generator().manual_seed(1))
    kept = (y != 0).double().mean().item()
    n = x.numel()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(kept - (1 - p)) < 6 * sd, kept
    assert abs(y.double().mean().item() - 1.0) < 6 * sd / (1 - p)
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))


def test_masks_are_independent_across_elements_and_calls():
    x = torch.ones(256, 256)
    a = attnext.dropout(x, 0.5, generator=torch.Generator().manual_seed(1)) != 0
    b = attnext.dropout(x, 0.5, generator=torch.Generator().manual_seed(2)) != 0
    agree = (a == b).double().mean().item()
    assert abs(agree - 0.5) < 0.01  # two seeds: independent masks
    rows = a.double().mean(1)
    cols = a.double().mean(0)
    assert rows.std().item() < 0.05 and cols.std().item() < 0.05  # no striping


def test_reproducible_with_manual_seed_and_eval_and_p0_are_identity():
    x = torch.randn(8, 100)
    torch.manual_seed(0)
    a = attnext.dropout(x, 0.3)
    torch.manual_seed(0)
    b = attnext.dropout(x, 0.3)
    assert torch.equal(a, b)
    assert attnext.dropout(x, 0.3, training=False) is x
    assert attnext.dropout(x, 0.0) is x
    z = attnext.dropout(x.requires_grad_(), 1.0)
    assert torch.equal(z, torch.zeros_like(x))


def test_non_contiguous_and_empty_and_scalar_inputs():
    x = torch.randn(6, 7, 8).transpose(0, 2)
    y = attnext.dropout(x, 0.4, generator=torch.Generator().manual_seed(4))
    assert torch.equal(y, reference.dropout(x, 0.4, *_seed(4)))
    assert attnext.dropout(torch.empty(0, 3), 0.5).shape == (0, 3)
    s = attnext.dropout(torch.tensor(2.0), 0.5, generator=torch.Generator().manual_seed(0))
    assert s.shape == () and s.item() in (0.0, 4.0)


def test_nan_is_kept_where_dropped_as_torch():
    x = torch.full((1000,), float("nan"))
    y = attnext.dropout(x, 0.5)
    assert torch.isnan(y).all()  # x * 0 for a dropped NaN is NaN, as in torch's dropout


@needs_native
def test_backward_applies_the_same_mask_and_gradchecks():
    x = torch.randn(4, 50, dtype=torch.float64, requires_grad=True)
    y = torch.ops.attnext.dropout(x, 0.3, 11, 12)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    keep = reference.dropout_keep_flat(x.shape, 0.3, 11, 12)
    torch.testing.assert_close(gx, g * keep / 0.7)
    assert torch.autograd.gradcheck(lambda t: torch.ops.attnext.dropout(t, 0.3, 11, 12), (x,))
    assert torch.autograd.gradgradcheck(lambda t: torch.ops.attnext.dropout(t, 0.3, 11, 12), (x,))


@needs_native
def test_opcheck():
    x = torch.randn(3, 40, requires_grad=True)
    torch.library.opcheck(torch.ops.attnext.dropout.default, (x, 0.25, 5, 6))


@needs_native
def test_rng_tensor_replaces_the_ints():
    # rng = [seed, offset] as an int64 tensor (what CUDA inputs get, drawn on the GPU):
    # the same mask as the ints, forward and backward, and the op stays opcheck-clean
    x = torch.randn(4, 50, dtype=torch.float64, requires_grad=True)
    rng = torch.tensor([11, 12])
    y = torch.ops.attnext.dropout(x, 0.3, 0, 0, rng)
    torch.testing.assert_close(y, torch.ops.attnext.dropout(x, 0.3, 11, 12))
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, g * reference.dropout_keep_flat(x.shape, 0.3, 11, 12) / 0.7)
    assert torch.autograd.gradcheck(lambda t: torch.ops.attnext.dropout(t, 0.3, 0, 0, rng), (x,))
    torch.library.opcheck(torch.ops.attnext.dropout.default, (x.float().detach().requires_grad_(), 0.25, 0, 0, rng))
    with pytest.raises(RuntimeError, match="rng must be an int64 tensor of shape"):
        torch.ops.attnext.dropout(x, 0.3, 0, 0, torch.tensor([1.0, 2.0]))
    with pytest.raises(RuntimeError, match="rng must be an int64 tensor of shape"):
        torch.ops.attnext.dropout(x, 0.3, 0, 0, torch.tensor([1, 2, 3]))


@needs_native
def test_compile_fullgraph():
    torch._dynamo.config.capture_scalar_outputs = True
    try:
        f = torch.compile(lambda x: attnext.dropout(x, 0.3) * 2, fullgraph=True)
        x = torch.ones(1000)
        y = f(x)
    finally:
        torch._dynamo.config.capture_scalar_outputs = False
    kept = (y != 0).double().mean().item()
    assert 0.6 < kept < 0.8
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 2 / 0.7))


def test_nn_dropout_module():
    m = attnext.nn.Dropout(0.25)
    assert isinstance(m, torch.nn.Dropout) and m.p == 0.25
    x = torch.ones(10000)
    y = m(x)
    assert 0.7 < (y != 0).double().mean().item() < 0.8
    m.eval()
    assert m(x) is x


def test_errors():
    with pytest.raises(ValueError, match="dropout p must be in"):
        attnext.dropout(torch.ones(3), 1.5)
    with pytest.raises(ValueError, match="dropout p must be in"):
        attnext.dropout(torch.ones(3), -0.1)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        attnext.dropout([1.0, 2.0], 0.5)
    with pytest.raises(RuntimeError, match="floating-point"):
        attnext.dropout(torch.ones(3, dtype=torch.int64), 0.5)
    with pytest.raises(TypeError, match="Python number"):
        attnext.dropout(torch.ones(3), "0.5")


@needs_native
def test_kernel_rejects_bad_p_directly():
    with pytest.raises(ValueError, match="dropout p must be in"):
        torch.ops.attnext.dropout(torch.ones(3), 1.0, 0, 0)
