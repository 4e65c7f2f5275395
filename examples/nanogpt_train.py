"""Train a nanoGPT-style character model whose attention is attnext's.

The model is nanoGPT's (karpathy/nanoGPT model.py) with one line changed: the block's
attention is ``attnext.nn.CausalSelfAttention``, which takes nanoGPT's config and loads
its state_dict. Everything else (embeddings, LayerNorm, MLP, AdamW, the loss) is plain torch.

    python examples/nanogpt_train.py                 # a small model, a few hundred steps
    python examples/nanogpt_train.py --tiny          # seconds: what CI runs
    python examples/nanogpt_train.py --data input.txt --steps 2000 --device cuda
"""
import argparse
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import attnext.nn

TEXT = (
    "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
    "First Citizen: You are all resolved rather to die than to famish? All: Resolved. resolved. "
) * 20


@dataclass
class GPTConfig:
    block_size: int = 128
    vocab_size: int = 65
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.1
    bias: bool = True


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = attnext.nn.CausalSelfAttention(config)  # the one change from nanoGPT
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))  # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens):
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return idx


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a text file (default: a built-in snippet)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true", help="a model and run small enough for CI (seconds)")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.batch_size, args.block_size, args.n_layer, args.n_embd, args.n_head = 20, 4, 32, 2, 32, 2

    torch.manual_seed(1337)
    text = open(args.data).read() if args.data else TEXT
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    config = GPTConfig(block_size=args.block_size, vocab_size=len(chars), n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd)
    model = GPT(config).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def batch():
        ix = torch.randint(len(data) - config.block_size - 1, (args.batch_size,))
        x = torch.stack([data[i:i + config.block_size] for i in ix])
        y = torch.stack([data[i + 1:i + config.block_size + 1] for i in ix])
        return x.to(args.device), y.to(args.device)

    t0 = time.perf_counter()
    first = None
    for step in range(args.steps):
        x, y = batch()
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}")
    dt = time.perf_counter() - t0
    print(f"{args.steps * args.batch_size * config.block_size / dt:,.0f} tokens/s")
    assert math.isfinite(loss.item()) and loss.item() < first, "the loss did not go down"

    model.eval()
    out = model.generate(torch.zeros(1, 1, dtype=torch.long, device=args.device), 40)
    print("sample:", "".join(chars[i] for i in out[0].tolist()))


if __name__ == "__main__":
    main()
