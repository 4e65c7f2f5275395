"""Property-based tests (hypothesis) of every op against reference.py in float64.

Random shapes (size-1 and size-0 dims, T != S, 0-3 batch dims), random strides
(transposed and sliced views), random scales, each dtype with its tolerance,
forward and gradients. The normal suite runs a fast profile; ATTNEXT_HYPOTHESIS=nightly
runs a few thousand examples per property:

    ATTNEXT_HYPOTHESIS=nightly python -m pytest tests/test_properties.py
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnext
from attnext import reference
from conftest import TOL

settings.register_profile("fast", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("nightly", max_examples=3000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("ATTNEXT_HYPOTHESIS", "fast"))

DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@st.composite
def strided_tensor(draw, shape, dtype=torch.float64):
    """A float64 tensor of `shape` that is, at random, contiguous, a transposed view or a
    sliced (stepped) view of a bigger tensor."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    if kind == "transposed" and len(shape) >= 2:
        base = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g, dtype=dtype)
        return base.transpose(-1, -2)
    if kind == "sliced":
        base = torch.randn(*[2 * s + 1 for s in shape], generator=g, dtype=dtype)
        return base[tuple(slice(1, 1 + 2 * s, 2) for s in shape)]
    return torch.randn(*shape, generator=g, dtype=dtype)


batch_dims = st.lists(st.integers(0, 3), min_size=0, max_size=3)


@given(
    batch=batch_dims,
    T=st.integers(0, 40),
    S=st.integers(0, 40),
    scale=st.floats(-4, 4, allow_nan=False),
    align=st.sampled_from(["top_left", "bottom_right"]),
    dtype=st.sampled_from(DTYPES),
    data=st.data(),
)
def test_causal_softmax_matches_reference(batch, T, S, scale, align, dtype, data):
    x64 = data.draw(strided_tensor(tuple(batch) + (T, S)))
    x = x64.to(dtype).requires_grad_(True)
    xr = x64.detach().clone().requires_grad_(True)
    y = attnext.causal_softmax(x, scale, align=align)
    y_ref = reference.causal_softmax(xr, scale, align == "bottom_right")
    assert y.shape == y_ref.shape and y.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol)
    g = torch.randn(y.shape, dtype=torch.float64)
    (gx,) = torch.autograd.grad(y, x, g.to(dtype))
    (gx_ref,) = torch.autograd.grad(y_ref, xr, g)
    torch.testing.assert_close(gx.double(), gx_ref, atol=4 * atol * (1 + abs(scale)), rtol=4 * rtol)
