"""``cifar10-resnet18``: ResNet-18 (CIFAR 3x3 stem) on CIFAR-10, the paper's Table 1 study.

Targets: 91% test accuracy on the original CIFAR-10, 88% on the JPEG pack (whose re-encoding
costs a few points; see docs/benchmark.md, Data).
"""

from __future__ import annotations

from torch import nn

from fop.bench.data import ImageDataset
from fop.bench.models import resnet18
from fop.bench.tasks import cifar10_task, targets_by_kind


def _model(dataset: ImageDataset, width: int | None, layers: int | None = None) -> nn.Module:
    return resnet18(dataset.num_classes, width=width or 64, in_channels=dataset.image_shape[2])


TASK = cifar10_task(
    "cifar10-resnet18",
    "CIFAR-10 (JPEG pack or original), ResNet-18 with the 3x3 stem; needs --data",
    _model,
    targets_by_kind({"cifar10": 0.91, "cifar10-jpeg": 0.88}),
    batch_sizes=(2048, 4096, 8192, 16384, 32768, 50000),
    reference_batch=256,
    max_micro_batch=4096,
)
