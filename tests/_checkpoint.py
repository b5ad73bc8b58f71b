"""Resuming from a checkpoint, as the tests of several layer types check it."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fop import FOP


def train_and_resume(
    model: nn.Module, fresh: nn.Module, optimizer_class: type[FOP], loss: Callable[[nn.Module], torch.Tensor], **kw: Any
) -> FOP:
    """Train ``model`` 2 steps, save model and optimizer, train 2 more; load the checkpoint into ``fresh``
    (another initialisation) and a new optimizer, and train it the same 2 steps. Returns that optimizer:
    ``fresh`` should now equal ``model`` bit for bit."""

    def train(model: nn.Module, optimizer: FOP) -> None:
        for _ in range(2):
            optimizer.zero_grad()
            loss(model).backward()
            optimizer.step()

    optimizer = optimizer_class(model, **kw)
    train(model, optimizer)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, buffer)
    train(model, optimizer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    fresh.load_state_dict(checkpoint["model"])
    resumed = optimizer_class(fresh, **kw)
    resumed.load_state_dict(checkpoint["optim"])
    train(fresh, resumed)
    return resumed
