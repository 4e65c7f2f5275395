"""attnext models in the ecosystem: DistributedDataParallel (gloo, 2 local processes),
torch.compile, torch.export, torch.save/load of state_dicts and copy.deepcopy."""
import copy
import io
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attnext import nn as ann
from conftest import needs_native


class TinyGPTBlock(torch.nn.Module):
    """Embedding -> LayerNorm -> nanoGPT attention (attnext) -> MLP -> logits."""

    def __init__(self, vocab=17, n_embd=32, n_head=4, block_size=16):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, n_embd)
        self.ln = torch.nn.LayerNorm(n_embd)
        self.attn = ann.CausalSelfAttention(n_embd=n_embd, n_head=n_head, block_size=block_size, dropout=0.0)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(n_embd, 2 * n_embd), torch.nn.GELU(), torch.nn.Linear(2 * n_embd, n_embd))
        self.head = torch.nn.Linear(n_embd, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        x = x + self.attn(self.ln(x))
        x = x + self.mlp(x)
        return self.head(x)


def _data(seed=0, B=4, T=12, vocab=17):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g)


def _loss(model, idx, tgt):
    logits = model(idx)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten())


def _train(model, steps, idx, tgt):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, idx, tgt).backward()
        opt.step()
    return model


def _file_barrier(directory, name, rank, world, timeout=120.0):
    """Waits until every rank has reached `name`, outside torch.distributed (a file per rank)."""
    import time

    open(os.path.join(directory, f"{name}.{rank}"), "w").close()
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(os.path.join(directory, f"{name}.{r}")) for r in range(world)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: the other ranks did not reach {name}")
        time.sleep(0.01)


def _ddp_worker(rank, world, init_file, out_file, state):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = TinyGPTBlock()
        model.load_state_dict(state)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        idx, tgt = _data()
        shard = slice(rank * 2, rank * 2 + 2)  # each rank sees half of the batch
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        grads = None
        for step in range(2):
            opt.zero_grad()
            _loss(ddp, idx[shard], tgt[shard]).backward()
            if step == 0:
                grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            opt.step()
        if rank == 0:
            torch.save({"params": model.state_dict(), "grads": grads}, out_file)
        # Neither rank tears the group down while the other still uses it (a rank whose
        # peer has gone can abort in gloo's threads at exit).
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # nor exits while the other is still inside destroy_process_group: on a loaded
    # machine that too aborted a rank ("terminate called without an active exception")
    _file_barrier(os.path.dirname(init_file), "destroyed", rank, world)
    # and then leaves without the interpreter's teardown, where gloo's threads still
    # aborted a rank once after both had destroyed the group (CI on a loaded VM); every
    # result is written by now, and exit code 0 is what mp.spawn checks
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@needs_native
def test_ddp_gloo_two_processes_matches_single_process():
    torch.manual_seed(0)
    model = TinyGPTBlock()
    state = copy.deepcopy(model.state_dict())
    idx, tgt = _data()
    # Single process, whole batch: the reference.
    ref = TinyGPTBlock()
    ref.load_state_dict(state)
    ref.zero_grad()
    _loss(ref, idx, tgt).backward()
    ref_grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters()}
    ref.load_state_dict(state)
    _train(ref, 2, idx, tgt)
    with tempfile.TemporaryDirectory() as d:
        init_file, out_file = os.path.join(d, "init"), os.path.join(d, "out.pt")
        mp.spawn(_ddp_worker, args=(2, init_file, out_file, state), nprocs=2, join=True)
        got = torch.load(out_file)
    for n, g in ref_grads.items():
        torch.testing.assert_close(got["grads"][n], g, atol=1e-6, rtol=1e-5, msg=f"grad {n}")
    for n, p in ref.state_dict().items():
        torch.testing.assert_close(got["params"][n], p, atol=1e-6, rtol=1e-5, msg=f"param {n}")


@needs_native
def test_model_under_torch_compile_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyGPTBlock()
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend="aot_eager")
    idx, tgt = _data()
    loss, loss_c = _loss(model, idx, tgt), _loss(compiled, idx, tgt)
    torch.testing.assert_close(loss_c, loss)
    loss.backward()
    loss_c.backward()
    for (n, p), (_, pc) in zip(model.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(pc.grad, p.grad, atol=1e-6, rtol=1e-5, msg=n)


@needs_native
def test_model_exports_and_runs():
    torch.manual_seed(0)
    model = TinyGPTBlock().eval()
    idx, _ = _data()
    ep = torch.export.export(model, (idx,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("attnext.causal_attention" in t for t in targets), targets
    idx2, _ = _data(seed=1)
    torch.testing.assert_close(ep.module()(idx2), model(idx2))


@pytest.mark.parametrize(
    "make",
    [
        lambda: ann.Head(32, 8, 16, dropout=0.1),
        lambda: ann.MultiHeadAttention(4, 8, 32, 16, dropout=0.1),
        lambda: ann.CausalSelfAttention(n_embd=32, n_head=4, block_size=16, dropout=0.1),
    ],
    ids=["Head", "MultiHeadAttention", "CausalSelfAttention"],
)
def test_modules_save_load_and_deepcopy(make):
    torch.manual_seed(0)
    m = make().eval()
    x = torch.randn(2, 11, 32)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = make().eval()
    m2.load_state_dict(torch.load(buf))
    torch.testing.assert_close(m2(x), m(x))
    m3 = copy.deepcopy(m)
    torch.testing.assert_close(m3(x), m(x))
    # The copy is independent: changing it leaves the original alone.
    with torch.no_grad():
        next(m3.parameters()).add_(1.0)
    assert not torch.allclose(m3(x), m(x))
    # Whole-module pickling works too.
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m4 = torch.load(buf, weights_only=False)
    torch.testing.assert_close(m4(x), m(x))
