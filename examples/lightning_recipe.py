"""FOP in PyTorch Lightning: ``configure_optimizers`` returns ``FOP(self)``; DDP through fop's comm hook.

A tiny token classifier (``nn.Embedding`` → ``nn.Conv1d`` → ``nn.TransformerEncoderLayer`` → ``nn.Linear``)
on a synthetic task, trained for a few steps on the CPU::

    python examples/lightning_recipe.py                          # one process
    python examples/lightning_recipe.py --devices 2 --strategy ddp   # two processes, gloo

Every layer of the model gets Kronecker curvature (the embedding with a diagonal input factor, the
attention's in-projection through fop's converted ``nn.MultiheadAttention``). Under
``strategy="ddp"`` Lightning wraps the module in ``DistributedDataParallel`` *before* calling
``configure_optimizers``; registering :func:`fop.dual_gradient_hook` there keeps the two halves FOP
needs (even and odd ranks) inside DDP's own all-reduce. Prints one JSON line (rank 0).
"""

from __future__ import annotations

import argparse
import json
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from fop import FOP, dual_gradient_hook

VOCAB, SEQ, CLASSES = 32, 8, 4


def token_task(samples: int = 64, seed: int = 0) -> TensorDataset:
    """Random token sequences; the label is the first token modulo the number of classes."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (samples, SEQ), generator=gen)
    y = x[:, 0] % CLASSES
    return TensorDataset(x, y)


class TokenClassifier(pl.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.emb = nn.Embedding(VOCAB, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.encoder = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, CLASSES)
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.emb(x).transpose(1, 2)).relu().transpose(1, 2)
        return self.head(self.encoder(h).mean(1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> FOP:
        optimizer = FOP(self, lr=self.lr, curvature_update_interval=1, inverse_update_interval=1)
        wrapper = self.trainer.strategy.model
        if isinstance(wrapper, DistributedDataParallel):  # strategy="ddp": the two halves survive DDP
            wrapper.register_comm_hook(optimizer, dual_gradient_hook)
        return optimizer


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = TokenClassifier()
    loader = DataLoader(token_task(), batch_size=32, shuffle=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer = pl.Trainer(
            max_steps=args.steps,
            accelerator="cpu",
            devices=args.devices,
            strategy=args.strategy,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, loader)
    optimizer = trainer.optimizers[0]
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    return {
        "rank": trainer.global_rank,
        "losses": model.losses,
        "curvature_layers": sorted(optimizer.diagnostics()),
        "communicator": type(optimizer.communicator).__name__,
        # DDP keeps the processes' parameters identical: every rank's checksum
        "checksums": [float(c) for c in trainer.strategy.all_gather(checksum).reshape(-1)],
    }


if __name__ == "__main__":
    result = main()
    if result["rank"] == 0:
        print(json.dumps(result))
    if torch.distributed.is_initialized():
        # a gloo group still alive at interpreter exit can abort the process after a successful run
        # ("terminate called without an active exception", seen once in CI)
        torch.distributed.destroy_process_group()
