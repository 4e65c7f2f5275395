"""``python -m attnext demo``: train the lecture's character-level GPT twice from the
same seed, once with eager attention heads and once with attnext's fused modules,
and compare loss curves, speed and samples.

The model is the lecture's (token + position embeddings, Blocks of
MultiHeadAttention + FeedForward with residuals and LayerNorm, dropout), with the
hyper-parameters scaled down so both runs finish in a few minutes on 2 CPU cores.
Both models start from the same weights (the attnext model loads the eager model's
state_dict: the modules keep the lecture's parameter names).
"""
from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class Config:
    batch_size: int = 16
    block_size: int = 128
    n_embd: int = 192
    n_head: int = 6
    n_layer: int = 4
    dropout: float = 0.2
    learning_rate: float = 1e-3
    max_iters: int = 200
    eval_interval: int = 40
    eval_iters: int = 10
    seed: int = 1337


# --------------------------------------------------------------------------- the lecture's model (eager)


class Head(nn.Module):
    """One head of self-attention, as in the lecture."""

    def __init__(self, n_embd, head_size, block_size, dropout):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(block_size, block_size)), persistent=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        B, T, C = x.shape
        k = self.key(x)  # (B, T, hs)
        q = self.query(x)  # (B, T, hs)
        wei = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5  # (B, T, T)
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float("-inf"))
        wei = F.softmax(wei, dim=-1)
        wei = self.dropout(wei)
        v = self.value(x)  # (B, T, hs)
        return wei @ v  # (B, T, hs)


class MultiHeadAttention(nn.Module):
    """Multiple heads in parallel (a Python loop and torch.cat), as in the lecture."""

    def __init__(self, num_heads, head_size, n_embd, block_size, dropout=0.0):
        super().__init__()
        self.heads = nn.ModuleList([Head(n_embd, head_size, block_size, dropout) for _ in range(num_heads)])
        self.proj = nn.Linear(head_size * num_heads, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        out = torch.cat([h(x) for h in self.heads], dim=-1)
        return self.dropout(self.proj(out))


class FeedForward(nn.Module):
    def __init__(self, n_embd, dropout):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.ReLU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout))

    def forward(self, x):
        return self.net(x)


class Block(nn.Module):
    def __init__(self, cfg: Config, attention_cls):
        super().__init__()
        head_size = cfg.n_embd // cfg.n_head
        self.sa = attention_cls(cfg.n_head, head_size, cfg.n_embd, cfg.block_size, cfg.dropout)
        self.ffwd = FeedForward(cfg.n_embd, cfg.dropout)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)

    def forward(self, x):
        x = x + self.sa(self.ln1(x))
        return x + self.ffwd(self.ln2(x))


class GPTLanguageModel(nn.Module):
    def __init__(self, vocab_size: int, cfg: Config, attention_cls=MultiHeadAttention):
        super().__init__()
        self.cfg = cfg
        self.token_embedding_table = nn.Embedding(vocab_size, cfg.n_embd)
        self.position_embedding_table = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.Sequential(*[Block(cfg, attention_cls) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        tok_emb = self.token_embedding_table(idx)  # (B, T, C)
        pos_emb = self.position_embedding_table(torch.arange(T, device=idx.device))  # (T, C)
        x = self.blocks(tok_emb + pos_emb)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(B * T, -1), targets.view(B * T))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, generator: Optional[torch.Generator] = None):
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.cfg.block_size:])
            probs = F.softmax(logits[:, -1, :], dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, num_samples=1, generator=generator)), dim=1)
        return idx


# --------------------------------------------------------------------------- data


def default_corpus(max_chars: int = 1_000_000) -> str:
    """Text that ships with Python itself: the docstrings of standard-library modules,
    their classes and functions, in a fixed order (no download)."""
    names = ["builtins", "os", "re", "json", "collections", "itertools", "functools", "typing", "pathlib",
             "argparse", "subprocess", "threading", "asyncio", "unittest", "logging", "datetime", "decimal",
             "fractions", "statistics", "random", "math", "string", "textwrap", "difflib", "inspect", "ast",
             "dataclasses", "enum", "heapq", "bisect", "csv", "sqlite3", "email", "http.client", "urllib.parse",
             "shutil", "tempfile", "zipfile", "tarfile", "pickle", "copy", "pprint", "contextlib", "abc", "io",
             "socket", "selectors", "queue", "sched", "calendar", "locale", "gettext", "codecs", "struct", "array"]
    parts: List[str] = []
    total = 0
    seen = set()
    for name in names:
        try:
            module = __import__(name, fromlist=["_"])
        except ImportError:
            continue
        objs = [module] + [getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_")]
        for obj in objs:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj)) else None
            if doc and doc not in seen:
                seen.add(doc)
                parts.append(doc)
                total += len(doc) + 2
        if total >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


@dataclass
class Data:
    train: torch.Tensor
    val: torch.Tensor
    itos: Dict[int, str]
    stoi: Dict[str, int] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def decode(self, ids) -> str:
        return "".join(self.itos[i] for i in ids)


def load_data(text: str) -> Data:
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    return Data(data[:n], data[n:], {i: ch for i, ch in enumerate(chars)}, stoi)


def get_batch(data: torch.Tensor, cfg: Config, g: torch.Generator):
    ix = torch.randint(len(data) - cfg.block_size, (cfg.batch_size,), generator=g)
    x = torch.stack([data[i:i + cfg.block_size] for i in ix])
    y = torch.stack([data[i + 1:i + cfg.block_size + 1] for i in ix])
    return x, y


# --------------------------------------------------------------------------- training


@dataclass
class RunResult:
    name: str
    steps: List[int]
    train_loss: List[float]
    val_loss: List[float]
    first_loss: float
    tokens_per_s: float
    seconds: float
    sample: str = ""


@torch.no_grad()
def estimate_loss(model, data: Data, cfg: Config, g: torch.Generator):
    model.eval()
    out = []
    for split in (data.train, data.val):
        losses = torch.zeros(cfg.eval_iters)
        for k in range(cfg.eval_iters):
            _, loss = model(*get_batch(split, cfg, g))
            losses[k] = loss.item()
        out.append(losses.mean().item())
    model.train()
    return out


def train(name: str, model: GPTLanguageModel, data: Data, cfg: Config, progress: bool = True,
          sample_tokens: int = 200) -> RunResult:
    """The lecture's training loop (AdamW), with the batch order and dropout seeded."""
    torch.manual_seed(cfg.seed)
    g_batch = torch.Generator().manual_seed(cfg.seed)
    g_eval = torch.Generator().manual_seed(cfg.seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    steps, tr, va = [], [], []
    first_loss = math.nan
    bar = _progress(cfg.max_iters, name, progress)
    train_time = 0.0
    for it in range(cfg.max_iters + 1):
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:
            t_loss, v_loss = estimate_loss(model, data, cfg, g_eval)
            steps.append(it)
            tr.append(t_loss)
            va.append(v_loss)
            if bar is not None:
                bar.set_postfix(train=f"{t_loss:.3f}", val=f"{v_loss:.3f}")
        if it == cfg.max_iters:
            break
        xb, yb = get_batch(data.train, cfg, g_batch)
        t0 = time.perf_counter()
        _, loss = model(xb, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        train_time += time.perf_counter() - t0
        if it == 0:
            first_loss = loss.item()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    tokens = cfg.max_iters * cfg.batch_size * cfg.block_size
    sample = ""
    if sample_tokens > 0:
        model.eval()
        ctx = torch.zeros((1, 1), dtype=torch.long)
        sample = data.decode(model.generate(ctx, sample_tokens, torch.Generator().manual_seed(cfg.seed))[0].tolist())
        model.train()
    return RunResult(name, steps, tr, va, first_loss, tokens / max(train_time, 1e-9), train_time, sample)


def _progress(total: int, name: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=f"{name:>8}", unit="step", leave=True, file=sys.stderr)


def build_models(vocab_size: int, cfg: Config):
    """The eager lecture model and the same model on attnext's modules, with equal weights."""
    import attnext.nn as ann

    torch.manual_seed(cfg.seed)
    eager = GPTLanguageModel(vocab_size, cfg, MultiHeadAttention)
    fused = GPTLanguageModel(vocab_size, cfg, ann.MultiHeadAttention)
    missing, unexpected = fused.load_state_dict(eager.state_dict(), strict=False)
    if unexpected or [m for m in missing if not m.endswith("tril")]:
        raise RuntimeError(f"attnext modules do not take the lecture's state_dict: {missing} {unexpected}")
    return eager, fused


def plot(results: List[RunResult], path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for r, style in zip(results, ("-", "--")):
        ax.plot(r.steps, r.train_loss, style, label=f"{r.name} train")
        ax.plot(r.steps, r.val_loss, style, alpha=0.6, label=f"{r.name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("lecture GPT: eager heads vs attnext")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(cfg: Config, text: str, progress: bool = True, plot_path: Optional[str] = "attnext_demo.png",
        sample_tokens: int = 200) -> List[RunResult]:
    data = load_data(text)
    eager, fused = build_models(data.vocab_size, cfg)
    results = [train("eager", eager, data, cfg, progress, sample_tokens),
               train("attnext", fused, data, cfg, progress, sample_tokens)]
    e, a = results
    print(f"\n{'run':<8} {'first loss':>10} {'final train':>11} {'final val':>9} {'tokens/s':>10} {'train s':>8}")
    for r in results:
        print(f"{r.name:<8} {r.first_loss:>10.4f} {r.train_loss[-1]:>11.4f} {r.val_loss[-1]:>9.4f} "
              f"{r.tokens_per_s:>10.0f} {r.seconds:>8.1f}")
    print(f"speedup of attnext over eager: {a.tokens_per_s / e.tokens_per_s:.2f}x tokens/s")
    print("\nloss curves (step: eager train/val | attnext train/val)")
    for i, step in enumerate(e.steps):
        print(f"  {step:>5}: {e.train_loss[i]:.4f}/{e.val_loss[i]:.4f} | {a.train_loss[i]:.4f}/{a.val_loss[i]:.4f}")
    if plot_path:
        saved = plot(results, plot_path)
        print(f"\nplot: {saved}" if saved else "\n(matplotlib not installed: no plot)")
    if sample_tokens > 0:
        print("\nsample from the attnext model:\n" + a.sample)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnext demo", description=__doc__.splitlines()[0])
    d = Config()
    p.add_argument("--data", help="a UTF-8 text file to train on (default: Python's own docstrings)")
    p.add_argument("--iters", type=int, default=d.max_iters, help=f"training steps per run (default {d.max_iters})")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--n-embd", type=int, default=d.n_embd)
    p.add_argument("--n-head", type=int, default=d.n_head)
    p.add_argument("--n-layer", type=int, default=d.n_layer)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--lr", type=float, default=d.learning_rate)
    p.add_argument("--eval-interval", type=int, default=d.eval_interval)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--plot", default="attnext_demo.png", help="where to write the loss plot ('' for none)")
    p.add_argument("--sample-tokens", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="a tiny model and a few steps (a smoke run)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.n_embd % args.n_head:
        p.error(f"--n-embd ({args.n_embd}) must be divisible by --n-head ({args.n_head})")
    for name in ("iters", "batch_size", "block_size", "n_embd", "n_head", "n_layer", "eval_interval"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if not 0.0 <= args.dropout < 1.0:
        p.error("--dropout must be in [0, 1)")
    cfg = Config(args.batch_size, args.block_size, args.n_embd, args.n_head, args.n_layer, args.dropout, args.lr,
                 args.iters, args.eval_interval, 5, args.seed)
    if args.quick:
        cfg = Config(batch_size=4, block_size=16, n_embd=32, n_head=4, n_layer=1, dropout=args.dropout,
                     learning_rate=args.lr, max_iters=min(args.iters, 5), eval_interval=5, eval_iters=2, seed=args.seed)
    if args.data:
        if not os.path.isfile(args.data):
            p.error(f"--data: no such file: {args.data}")
        with open(args.data, encoding="utf-8") as f:
            text = f.read()
    else:
        text = default_corpus(50_000 if args.quick else 1_000_000)
    if len(text) < 10 * (cfg.block_size + 1):
        p.error(f"the corpus has {len(text)} characters: too short for --block-size {cfg.block_size}")
    print(f"corpus: {len(text):,} characters; model: {cfg}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    run(cfg, text, progress=not args.no_progress, plot_path=args.plot or None,
        sample_tokens=20 if args.quick else args.sample_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
