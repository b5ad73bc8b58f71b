"""FOP on a GPT-style character model, trained on the Linux kernel source in a plain loop.

The model is written the way GPT code usually is: token and position embeddings, pre-norm blocks
of causal self-attention (torch's ``nn.MultiheadAttention``) and a GELU MLP (``nn.Linear``), a
final layer norm and an untied linear head. The one line that differs from an AdamW loop is
``FOP(model, ...)`` in place of ``torch.optim.AdamW(model.parameters(), ...)``::

    python examples/gpt_recipe.py --data data/linux-kernel-char
    FOP_LINUX_KERNEL_CHAR=data/linux-kernel-char python examples/gpt_recipe.py --steps 200

FOP gives Kronecker curvature to the token embedding (a diagonal input factor), every attention
block's packed ``in_proj`` and its ``out_proj``, the MLPs and the head; the layer norms and the
position table (a bare parameter) take the AdamW fallback (``fallback="adamw"``). The data is the
``linux-kernel-char`` folder (``train.txt``, ``valid.txt``): characters of the training split are
the vocabulary, with id 0 for any character it lacks. Prints one JSON line: the training losses,
the validation loss before and after, the layers with curvature and FOP's last β*/η* per layer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fop import FOP


def read_corpus(folder: Path) -> tuple[Tensor, Tensor, int]:
    """``train.txt`` and ``valid.txt`` as token ids, and the vocabulary size (id 0: unknown)."""
    texts = [(folder / name).read_text(encoding="utf-8", errors="replace") for name in ("train.txt", "valid.txt")]
    ids = {char: index for index, char in enumerate(sorted(set(texts[0])), start=1)}
    train, valid = (torch.tensor([ids.get(char, 0) for char in text]) for text in texts)
    return train, valid, len(ids) + 1


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, is_causal=True, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, context: int, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.token_embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(context, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        x = self.token_embed(tokens) + self.position[:length]
        for block in self.blocks:
            x = block(x, self.mask[:length, :length])
        return self.head(self.norm(x))


def windows(tokens: Tensor, starts: Tensor, context: int) -> tuple[Tensor, Tensor]:
    chunk = tokens[starts[:, None] + torch.arange(context + 1)]
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def validation_loss(model: nn.Module, valid: Tensor, context: int, max_windows: int) -> float:
    """Mean cross-entropy (nats per character) on the first ``max_windows`` windows of ``valid``."""
    model.eval()
    count = min(max_windows, (valid.numel() - 1) // context)
    inputs, targets = windows(valid, torch.arange(count) * context, context)
    loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).item()
    model.train()
    return loss


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=os.environ.get("FOP_LINUX_KERNEL_CHAR"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32, help="windows per step")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--fallback-lr", type=float, default=3e-3)
    parser.add_argument("--valid-windows", type=int, default=256)
    args = parser.parse_args(argv)
    if args.data is None or not (args.data / "train.txt").is_file():
        parser.error("give --data (the linux-kernel-char folder with train.txt and valid.txt) or FOP_LINUX_KERNEL_CHAR")

    torch.manual_seed(0)
    train, valid, vocab = read_corpus(args.data)
    model = GPT(vocab, args.context, args.width, args.layers, args.heads)
    optimizer = FOP(model, lr=args.lr, fallback="adamw", fallback_lr=args.fallback_lr)
    before = validation_loss(model, valid, args.context, args.valid_windows)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(args.steps):
        starts = torch.randint(0, train.numel() - args.context - 1, (args.batch,), generator=generator)
        inputs, targets = windows(train, starts, args.context)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    after = validation_loss(model, valid, args.context, args.valid_windows)
    diagnostics = optimizer.diagnostics()
    return {
        "losses": losses,
        "validation_loss": {"before": before, "after": after, "after_bits": after / math.log(2)},
        "curvature_layers": sorted(diagnostics),
        "diagnostics": {name: {k: float(v) for k, v in layer.items()} for name, layer in diagnostics.items()},
    }


if __name__ == "__main__":
    print(json.dumps(main()))
