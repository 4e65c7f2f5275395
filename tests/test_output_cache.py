"""Large CPU outputs: the output cache (reuse of freed buffers) and the streaming-store rows.

Both only act on outputs of 4 MiB and more (the cache) or above
ATTNEXT_STREAM_BYTES (streaming stores, 64 MiB by default, read once per
process), so the streaming tests run in a subprocess with the threshold at 0.
"""

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import attnext
from attnext import reference
from conftest import assert_python_ok, needs_native, run_python

BIG = (40, 256, 256)  # 10 MiB of float32: served by the cache


@needs_native
def test_freed_output_is_reused_and_fully_rewritten():
    attnext.empty_cpu_cache()
    torch.manual_seed(0)
    x = torch.randn(BIG)
    x[3, 100, 5] = float("nan")  # a NaN row: the whole row of y is NaN
    y = attnext.causal_softmax(x, 0.3)
    assert torch.isnan(y[3, 100]).all()
    ptr = y.data_ptr()
    del y
    info = attnext.cpu_cache_info()
    assert info["cached_bytes"] >= x.nbytes
    hits = info["hits"]
    # Same size again: the freed buffer comes back, and none of its old contents survive.
    x2 = torch.randn(BIG)
    y2 = attnext.causal_softmax(x2, 0.3, align="bottom_right")
    assert attnext.cpu_cache_info()["hits"] == hits + 1
    assert y2.data_ptr() == ptr
    torch.testing.assert_close(y2, reference.causal_softmax(x2, 0.3, True))
    # A second live output never shares the first one's buffer.
    y3 = attnext.causal_softmax(x2, 0.3, align="bottom_right")
    assert y3.data_ptr() != y2.data_ptr()
    torch.testing.assert_close(y3, y2)


@needs_native
def test_cached_output_behaves_like_a_tensor():
    attnext.empty_cpu_cache()
    x = torch.randn(BIG)
    y = attnext.causal_softmax(x)
    expected = y.clone()
    y.resize_(44, 256, 256)  # grows through the same allocator; the old values are kept
    torch.testing.assert_close(y[:40], expected)
    z = y.detach().requires_grad_()
    (z * 2).sum().backward()
    assert torch.equal(z.grad, torch.full_like(z, 2.0))
    assert y.is_contiguous() and y.device.type == "cpu"


def cached_output():
    """A fresh 10 MiB output from the cache, and a copy of its values."""
    y = attnext.causal_softmax(torch.randn(BIG))
    return y, y.clone()


def address(t):
    """Where t's data lives, without materialising a copy-on-write tensor (data_ptr() would)."""
    return torch._C._data_address(t)


@needs_native
def test_cached_output_lazy_clone_and_copy_on_write():
    # torch only makes copy-on-write clones of storages whose DataPtr context is the data
    # pointer; any other context made _lazy_clone() raise "Expected storage != nullptr".
    attnext.empty_cpu_cache()
    y, expected = cached_output()
    z = y._lazy_clone()
    assert torch._C._is_cow_tensor(y) and torch._C._is_cow_tensor(z)
    assert address(z) == address(y)  # shared until written
    cached = attnext.cpu_cache_info()["cached_bytes"]
    z.mul_(2)  # a write to one of two references: z gets its own copy, from the cache's allocator
    assert not torch._C._is_cow_tensor(z) and address(z) != address(y)
    assert torch.equal(z, expected * 2) and torch.equal(y, expected)
    ptr = address(y)
    y.add_(0)  # the last reference: takes the buffer back without a copy
    assert not torch._C._is_cow_tensor(y) and address(y) == ptr and torch.equal(y, expected)
    del y, z  # both buffers come back to the cache
    assert attnext.cpu_cache_info()["cached_bytes"] == cached + 2 * expected.nbytes


@needs_native
def test_cached_output_lazy_clone_outlives_the_original():
    # the original freed first: the clone keeps the shared buffer, and its first write
    # takes it over without a copy
    y, expected = cached_output()
    z = y._lazy_clone()
    ptr = address(y)
    del y
    z.neg_()
    assert address(z) == ptr and torch.equal(z, -expected)


@needs_native
def test_cached_output_pickles_saves_and_deepcopies():
    y, expected = cached_output()
    assert torch.equal(pickle.loads(pickle.dumps(y)), expected)
    d = copy.deepcopy(y)
    assert d.data_ptr() != y.data_ptr() and torch.equal(d, expected)
    buf = io.BytesIO()
    torch.save({"y": y, "view": y[3:5]}, buf)
    buf.seek(0)
    loaded = torch.load(buf)
    assert torch.equal(loaded["y"], expected) and torch.equal(loaded["view"], expected[3:5])
    # the view still shares the loaded storage, as it did the original's
    assert loaded["view"].untyped_storage().data_ptr() == loaded["y"].untyped_storage().data_ptr()


@needs_native
def test_cached_output_share_memory_copies_into_shared_memory():
    attnext.empty_cpu_cache()
    y, expected = cached_output()
    ptr = y.data_ptr()
    y.share_memory_()
    assert y.is_shared() and y.data_ptr() != ptr and torch.equal(y, expected)
    # the cache got its buffer back, as the CPU allocator gets a tensor's memory back
    assert attnext.cpu_cache_info()["cached_bytes"] >= expected.nbytes


@needs_native
def test_cached_output_numpy_and_from_numpy_share_memory():
    y, expected = cached_output()
    a = y.numpy()
    assert a.ctypes.data == y.data_ptr() and np.array_equal(a, expected.numpy())
    back = torch.from_numpy(a)
    assert back.data_ptr() == y.data_ptr()
    back[0, 0, 0] = 7.0
    assert y[0, 0, 0].item() == 7.0 and a[0, 0, 0] == 7.0
    del y, back  # the array keeps the buffer alive
    assert a[0, 0, 0] == 7.0 and np.array_equal(a[1:], expected[1:].numpy())


@needs_native
def test_cached_output_clone_is_an_ordinary_copy():
    y, expected = cached_output()
    c = y.clone()
    assert c.data_ptr() != y.data_ptr() and torch.equal(c, expected)
    y.zero_()
    assert torch.equal(c, expected)


@needs_native
def test_cached_output_dlpack_shares_memory():
    y, expected = cached_output()
    t = torch.utils.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(y))
    assert t.data_ptr() == y.data_ptr()
    assert torch.from_dlpack(y).data_ptr() == y.data_ptr()
    a = np.from_dlpack(y)
    assert a.ctypes.data == y.data_ptr()
    del y  # the capsule's owners keep the buffer alive
    assert torch.equal(t, expected) and np.array_equal(a, expected.numpy())


@needs_native
def test_profiler_sees_cached_output_memory():
    # Without reporting, the cache's memory is invisible to profile_memory: the op's
    # self memory would be 0 (its output is the only large allocation).
    x = torch.randn(BIG)
    attnext.empty_cpu_cache()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y1 = attnext.causal_softmax(x)  # a fresh buffer
        del y1
        y2 = attnext.causal_softmax(x)  # the same buffer, from the cache
        del y2
    events = {e.key: e for e in prof.key_averages()}
    op = events["attnext::causal_softmax"]
    assert op.count == 2 and op.self_cpu_memory_usage >= 2 * x.nbytes, op.self_cpu_memory_usage
    # the frees, outside any op: back to zero
    assert events["[memory]"].cpu_memory_usage <= -2 * x.nbytes


_FORK_CHECK = r"""
import os, signal, threading, time, torch, attnext
x = torch.randn(40, 256, 256)
expected = attnext.causal_softmax(x)
stop = threading.Event()

def hammer():  # allocates and frees cached outputs (the op runs without the GIL) until told to stop
    while not stop.is_set():
        attnext.causal_softmax(x)

thread = threading.Thread(target=hammer)
thread.start()
hung = []
codes = []
for i in range(FORKS):
    pid = os.fork()
    if pid == 0:
        signal.alarm(60)  # a hung child dies on its own, even if this script is killed
        torch.set_num_threads(1)  # as DataLoader workers: OpenMP does not survive fork
        ok = torch.equal(attnext.causal_softmax(x), expected)
        os._exit(0 if ok else 3)
    deadline = time.monotonic() + 20
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            codes.append(os.waitstatus_to_exitcode(status))
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            hung.append(i)
            break
        time.sleep(0.002)
stop.set()
thread.join()
assert not hung, f"children {hung} hung"
assert codes == [0] * FORKS, codes
print("ok")
"""


@needs_native
def test_fork_while_another_thread_allocates():
    # A fork while another thread holds the cache's lock must not leave the child with
    # the lock held forever. (The GIL makes that window rare from Python; the C++ test
    # tests/cpp/test_output_cache.cpp hammers the allocator directly.)
    out = run_python(_FORK_CHECK.replace("FORKS", "60"), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok" in out.stdout, out.stdout[-3000:]


@needs_native
def test_empty_cpu_cache_frees_and_limit_bounds_it():
    x = torch.randn(BIG)
    for _ in range(3):
        ys = [attnext.causal_softmax(x) for _ in range(3)]
        del ys
    info = attnext.cpu_cache_info()
    assert 0 < info["cached_bytes"] <= info["limit_bytes"]
    attnext.empty_cpu_cache()
    assert attnext.cpu_cache_info()["cached_bytes"] == 0


@needs_native
@pytest.mark.parametrize("limit_mb", [24, 0])
def test_cache_limit_from_environment(limit_mb):
    # Four 10 MiB outputs freed: at most the limit stays cached (0: nothing, the cache
    # is off), and the outputs are right either way.
    code = (
        "import torch, attnext\n"
        "x = torch.randn(40, 256, 256)\n"
        "ys = [attnext.causal_softmax(x) for _ in range(4)]\n"
        "torch.testing.assert_close(ys[-1], attnext.reference.causal_softmax(x))\n"
        "del ys\n"
        "info = attnext.cpu_cache_info()\n"
        f"assert info['limit_bytes'] == {limit_mb} << 20, info\n"
        f"assert {'0 <' if limit_mb else '0 =='} info['cached_bytes'] <= {limit_mb} << 20, info\n"
        "print('ok')\n"
    )
    assert_python_ok(code, ATTNEXT_CPU_CACHE_MB=str(limit_mb))


def test_cache_info_without_native_is_all_zero_or_consistent():
    info = attnext.cpu_cache_info()
    assert set(info) == {"cached_bytes", "limit_bytes", "hits", "misses"}
    if not attnext.native_available():
        assert all(v == 0 for v in info.values())


_STREAM_CHECK = r"""
import torch, attnext
from attnext import reference
torch.manual_seed(0)
cases = [
    ((2, 37, 37), 0.5, False, False),    # rows not 64-byte aligned: a scalar head before the streamed vectors
    ((3, 40, 17), 1.0, False, True),      # S < one vector, bottom-right, T > S: rows that see no key
    ((2, 33, 50), -0.7, False, True),     # negative scale (min instead of max), T < S
    ((4, 64, 64), 0.125, True, False),    # a transposed view: rows read through strides
    ((1, 130, 131), 2.0, False, False),   # long odd rows
]
for shape, scale, transposed, br in cases:
    x = torch.randn(shape, dtype=torch.float64).float()
    if transposed:
        x = x.transpose(-1, -2)
    x[0, -1, 0] = float('nan')
    xr = x.detach().clone().requires_grad_()
    xa = x.detach().clone().requires_grad_()
    y = attnext.causal_softmax(xa, scale, align='bottom_right' if br else 'top_left')
    ye = reference.causal_softmax(xr, scale, br)
    torch.testing.assert_close(y, ye, equal_nan=True)
    g = torch.randn_like(y)
    (ga,) = torch.autograd.grad(y, xa, g)
    (ge,) = torch.autograd.grad(ye, xr, g)
    rows = ~torch.isnan(ye).any(-1, keepdim=True)
    torch.testing.assert_close(torch.where(rows, ga, 0.0), torch.where(rows, ge, 0.0), atol=1e-5, rtol=1e-4)
print('ok')
"""


@needs_native
@pytest.mark.parametrize("isa", ["avx512", "avx2", "default"])
def test_streaming_store_rows_match_reference(isa):
    # ATTNEXT_STREAM_BYTES=0: every output is written with non-temporal stores,
    # whatever its size; ATEN_CPU_CAPABILITY picks each instruction set's rows.
    assert_python_ok(_STREAM_CHECK, ATTNEXT_STREAM_BYTES="0", ATEN_CPU_CAPABILITY=isa)
