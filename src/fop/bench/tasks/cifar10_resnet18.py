"""``cifar10-resnet18``: ResNet-18 (CIFAR 3x3 stem) on CIFAR-10, the paper's Table 1 study.

Targets: 91% test accuracy on the original CIFAR-10, 88% on the JPEG pack (whose re-encoding
costs a few points; see ``shared/data/README.md``).
"""

from __future__ import annotations

from torch import nn

from fop.bench.data import ImageDataset
from fop.bench.models import resnet18
from fop.bench.tasks import (
    CurvatureDefaults,
    DataOptions,
    Task,
    cifar10_from_options,
    register,
    targets_by_kind,
)

NAME = "cifar10-resnet18"


def _load(options: DataOptions) -> ImageDataset:
    return cifar10_from_options(options, NAME)


def _model(dataset: ImageDataset, width: int | None) -> nn.Module:
    return resnet18(dataset.num_classes, width=width or 64, in_channels=dataset.image_shape[2])


TASK = register(
    Task(
        name=NAME,
        summary="CIFAR-10 (JPEG pack or original), ResNet-18 with the 3x3 stem; needs --data",
        load_data=_load,
        build_model=_model,
        default_target=targets_by_kind({"cifar10": 0.91, "cifar10-jpeg": 0.88}),
        batch_sizes=(2048, 4096, 8192, 16384, 32768, 50000),
        reference_batch=256,
        base_lrs={"sgd": 0.1, "adamw": 1e-3, "kfac": 0.05, "fop": 0.05},
        weight_decays={"adamw": 5e-2, "default": 5e-4},
        max_epochs=100,
        warmup_epochs=5,
        crop_padding=4,
        curvature=CurvatureDefaults(damping=1e-3, reference_interval=50),
        lr_grid=(0.5, 1.0, 2.0),
        max_micro_batch=4096,
        data_options=frozenset({"path"}),
    )
)
