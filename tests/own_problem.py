"""Factories of a researcher's own problem, as a user would write them: models, data and losses the project
did not write, imported by reference ("tests.own_problem:mlp") by the trainer, compute and Dask workers."""

import math

import torch
import torch.nn.functional as F
from torch import nn


# ---- an MLP with LayerNorm, regressing a smooth function (MSE) ---------------------------------------------

class MLP(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.inp = nn.Linear(4, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))))


def mlp(hidden: int = 16):
    return MLP(hidden)


def regression(n: int = 96, scale: float = 1.0):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n + 32, 4, generator=g) * scale
    y = torch.stack([torch.sin(x[:, 0] + x[:, 1]), x[:, 2] * x[:, 3] / 2], dim=1)
    return {"train": (x[:n], y[:n]), "heldout": (x[n:], y[n:])}


# ---- a CNN with BatchNorm and dropout, on digits ----------------------------------------------------------

class CNN(nn.Module):
    def __init__(self, dropout: float):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(self.drop(x.flatten(1)))


def cnn(dropout: float = 0.3):
    return CNN(dropout)


def digits_subset(n: int = 160, scaled: bool = True):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float32)[:, None] / (16.0 if scaled else 1.0)
    return {"train": (x, torch.tensor(d.target[:n]))}


# ---- a tiny causal transformer with tied embeddings, on byte tokens with ignored labels -------------------

class Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d), nn.Dropout(dropout))

    def forward(self, x):
        t = x.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, seq: int, dropout: float):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(seq, d)
        self.drop = nn.Dropout(dropout)
        self.block = Block(d, heads, dropout)
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as GPT-2's

    def forward(self, input_ids):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))
        return {"logits": self.lm_head(self.ln_f(self.block(x)))}


def tiny_gpt(vocab: int = 32, d: int = 16, heads: int = 2, seq: int = 12, dropout: float = 0.1):
    return TinyGPT(vocab, d, heads, seq, dropout)


TEXT = ("Loss change allocation splits every change of the loss among the parameters that caused it. "
        "Negative values helped; positive values hurt. ") * 4


def tokens(n: int = 24, seq: int = 12, vocab: int = 32):
    """Character tokens; each sequence's tail is padding whose labels are -100 (ignored), as HF pads."""
    ids = torch.tensor([ord(c) % vocab for c in TEXT[: n * seq]]).reshape(n, seq)
    labels = ids.clone()
    for i in range(n):
        pad = i % 5  # 0..4 padded positions: batches differ in how many tokens count
        if pad:
            ids[i, seq - pad:] = 0
            labels[i, seq - pad:] = -100
    return {"train": {"input_ids": ids, "labels": labels}}


# ---- bad factories ----------------------------------------------------------------------------------------

def not_a_module():
    return "a string, not a model"


def only_heldout():
    return {"heldout": regression()["heldout"]}


def per_sample_loss():
    def loss(output, targets):
        return ((output - targets) ** 2).sum(dim=1), targets.shape[0]
    return loss


def nan_loss():
    def loss(output, targets):
        return ((output - targets) ** 2).sum() * math.nan, targets.numel()
    return loss


def sum_mse():
    """A user's own loss under the contract: (summed loss, count)."""
    def loss(output, targets):
        return ((output - targets) ** 2).sum(), targets.numel()
    return loss
