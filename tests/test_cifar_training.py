"""End-to-end training on real data: a small CNN on a CIFAR-10 subset with FOP, K-FAC, SGD and AdamW.

Data: 4000 training and 1000 test images (class-balanced, fixed seed) of the CIFAR-10 JPEG pack,
decoded once per test session (``tests/_data.py``). The pack is looked up at
``<repo>/../shared/data/cifar10_jpeg.npz`` or at ``$FOP_CIFAR10``; when it is missing the tests
fail in CI (``CI`` set to true) and are skipped elsewhere.

Model: three 3x3 convolutions and a Linear head; BatchNorm after the second convolution only, so
the model mixes curvature layers with and without a following normalisation, and the BatchNorm
parameters go through the optimizers' first-order fallback group. Training: float32 on one CPU
thread, batch 256, 4 epochs (60 steps), no augmentation, each optimizer through its one-line
constructor.

Measured test accuracy after 4 epochs (seeds 0, 1, 2): FOP 0.527 / 0.532 / 0.495, K-FAC
0.534 / 0.550 / 0.505, SGD 0.440 / 0.473 / 0.458, AdamW 0.438 / 0.478 / 0.460 (chance: 0.10). The
thresholds below leave about ten points of margin. K-FAC and FOP use lr 0.1, damping 0.1 and
curvature/inverse updates every 5 steps, with the default ``kl_clip`` trust region (with the
default damping 1e-3 they reach about 0.46-0.47; without the trust region, damping 1e-2 or less
diverges on this model at lr 0.03-0.1).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import pytest
import torch
from torch import nn

import fop

try:  # private helper next to this file (pytest's default import mode puts tests/ on sys.path)
    import _data
except ImportError:  # e.g. --import-mode=importlib
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _data

TRAIN_IMAGES, TEST_IMAGES = 4000, 1000
BATCH, EPOCHS = 256, 4

OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "FOP": lambda m: fop.FOP(m, lr=0.1, damping=0.1, curvature_update_interval=5, inverse_update_interval=5),
    "KFAC": lambda m: fop.KFAC(m, lr=0.1, damping=0.1, curvature_update_interval=5, inverse_update_interval=5),
    "SGD": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
    "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=2e-3),
}
# minimum test accuracy after EPOCHS epochs (measured values in the module docstring)
THRESHOLDS = {"FOP": 0.40, "KFAC": 0.40, "SGD": 0.33, "AdamW": 0.33}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Train on one intra-op thread (restored afterwards).

    Accuracies then do not depend on the machine's thread count (reductions in another order
    shift them by a few tenths of a point), and the runtime is immune to oversubscription: on a
    2-core machine shared with other jobs, two spinning OpenMP threads made these runs 5-15x
    slower, while one thread costs about 50 s for the whole file.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cifar() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _data.require_pack()
    x_train, y_train = _data.load_subset("train", TRAIN_IMAGES)
    x_test, y_test = _data.load_subset("test", TEST_IMAGES)
    return tuple(torch.from_numpy(a) for a in (x_train, y_train, x_test, y_test))  # type: ignore[return-value]


def _cnn(width: int = 16) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 16, 10),
    )


def _train(name: str, data, seed: int = 0) -> tuple[float, float, nn.Module, torch.optim.Optimizer]:
    """Train with optimizer ``name``; returns (test accuracy, seconds, model, optimizer)."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = _cnn()
    optimizer = OPTIMIZERS[name](model)  # the one line that differs between the runs
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(x_train), generator=order)
        for i in range(0, len(x_train) - BATCH + 1, BATCH):
            idx = perm[i : i + BATCH]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return accuracy, seconds, model, optimizer


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_cifar10_subset_training(name: str, cifar, record_property) -> None:
    accuracy, seconds, model, optimizer = _train(name, cifar)
    record_property("test_accuracy", round(accuracy, 4))
    record_property("train_seconds", round(seconds, 2))
    print(f"\n{name}: test accuracy {accuracy:.3f} after {EPOCHS} epochs, {seconds:.1f} s")
    assert accuracy >= THRESHOLDS[name], f"{name} reached {accuracy:.3f} < {THRESHOLDS[name]} test accuracy"

    if isinstance(optimizer, fop.KroneckerOptimizer):
        assert int(optimizer.skipped_steps) == 0
        # curvature on every Conv2d/Linear; the BatchNorm parameters went through the fallback rule
        assert [type(layer.module) for layer in optimizer.layers] == [nn.Conv2d] * 3 + [nn.Linear]
        bn = model[4]
        assert isinstance(bn, nn.BatchNorm2d)
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight)), "fallback group was not updated"
        for layer_name, diag in optimizer.diagnostics().items():
            assert all(torch.isfinite(v).all() for v in diag.values()), layer_name
        if name == "KFAC":
            assert all(float(d["beta"]) == 0.0 for d in optimizer.diagnostics().values())
