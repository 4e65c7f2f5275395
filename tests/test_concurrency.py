"""The ops called from several Python threads at once, with one intra-op thread,
and under inference_mode / no_grad, give the same results as a plain call."""
import threading

import torch

import attnext


def _cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 65, 65, generator=g)
    a, b = torch.randn(6, 1, 33, 17, generator=g), torch.randn(5, 17, 29, generator=g)
    h = torch.randn(3, 70, 24, generator=g)
    q, k, v = (torch.randn(2, 3, 70, 16, generator=g) for _ in range(3))
    return [
        ("causal_softmax", lambda: attnext.causal_softmax(x, 0.3)),
        ("causal_softmax bottom_right", lambda: attnext.causal_softmax(x[..., :40], 0.3, align="bottom_right")),
        ("matmul broadcast", lambda: attnext.matmul(a, b)),
        ("causal_mean", lambda: attnext.causal_mean(h)),
        ("causal_attention", lambda: attnext.causal_attention(q, k, v)),
    ]


def test_many_python_threads_at_once():
    cases = _cases()
    expected = {name: fn() for name, fn in cases}
    errors = []
    barrier = threading.Barrier(6)

    def worker():
        try:
            barrier.wait()
            for _ in range(20):
                for name, fn in cases:
                    if not torch.equal(fn(), expected[name]):
                        errors.append(name)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]


def test_single_intra_op_thread_gives_same_results():
    cases = _cases()
    expected = {name: fn() for name, fn in cases}
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, fn in cases:
            torch.testing.assert_close(fn(), expected[name], atol=0, rtol=0, msg=name)
    finally:
        torch.set_num_threads(prev)


def test_inference_mode_and_no_grad():
    cases = _cases()
    expected = {name: fn() for name, fn in cases}
    with torch.inference_mode():
        for name, fn in cases:
            y = fn()
            assert y.is_inference(), name
            torch.testing.assert_close(y, expected[name], atol=0, rtol=0, msg=name)
    x = torch.randn(2, 17, 17, requires_grad=True)
    with torch.no_grad():
        for name, fn in cases:
            torch.testing.assert_close(fn(), expected[name], atol=0, rtol=0, msg=name)
        assert not attnext.causal_softmax(x, 0.5).requires_grad
