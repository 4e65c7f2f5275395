"""The ops called from several Python threads at once, with one intra-op thread,
and under inference_mode / no_grad, give the same results as a plain call."""
import threading

import torch

import attnext


def _cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 65, 65, generator=g)
    return [
        ("causal_softmax", lambda: attnext.causal_softmax(x, 0.3)),
        ("causal_softmax bottom_right", lambda: attnext.causal_softmax(x[..., :40], 0.3, align="bottom_right")),
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
    x = torch.randn(2, 17, 17, requires_grad=True)
    ref = attnext.causal_softmax(x, 0.5)
    with torch.inference_mode():
        y = attnext.causal_softmax(x.detach(), 0.5)
        assert y.is_inference()
    torch.testing.assert_close(y, ref.detach())
    with torch.no_grad():
        z = attnext.causal_softmax(x, 0.5)
        assert not z.requires_grad
    torch.testing.assert_close(z, ref.detach())
