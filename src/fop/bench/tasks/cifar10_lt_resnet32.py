"""``cifar10-lt-resnet32``: long-tailed CIFAR-10 with the CIFAR ResNet-32, reported as Top-1 error.

The training set is subsampled per class with the exponential profile of
:func:`fop.bench.data.long_tail_counts` (imbalance factor ``--imbalance``, 100 or 50 in the paper);
the test set stays balanced. Default accuracy targets are the usual cross-entropy baselines
(about 70% at imbalance 100, 74% at 50 on the original data), three points lower on the JPEG pack.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from fop.bench.data import ImageDataset, long_tail_indices
from fop.bench.errors import BenchError
from fop.bench.models import resnet32
from fop.bench.tasks import DataOptions, cifar10_from_options, cifar10_task

NAME = "cifar10-lt-resnet32"
DEFAULT_IMBALANCE = 100.0
_TARGETS = {
    ("cifar10", 100.0): 0.70,
    ("cifar10", 50.0): 0.74,
    ("cifar10-jpeg", 100.0): 0.67,
    ("cifar10-jpeg", 50.0): 0.71,
}


def _load(options: DataOptions) -> ImageDataset:
    imbalance = options.imbalance or DEFAULT_IMBALANCE
    balanced = cifar10_from_options(options, NAME)
    keep = long_tail_indices(balanced.train_labels, balanced.num_classes, imbalance)
    return dataclasses.replace(balanced.select(train=keep), notes={"imbalance": imbalance})


def _model(dataset: ImageDataset, width: int | None, layers: int | None = None) -> nn.Module:
    return resnet32(dataset.num_classes, width=width or 16, in_channels=dataset.image_shape[2])


def _target(dataset: ImageDataset) -> float:
    imbalance = float(dataset.notes["imbalance"])
    try:
        return _TARGETS[(dataset.kind, imbalance)]
    except KeyError:
        raise BenchError(
            f"no default target for imbalance {imbalance:g} (defaults exist for 100 and 50); give --target"
        ) from None


TASK = cifar10_task(
    NAME,
    "long-tailed CIFAR-10 (--imbalance 100 or 50), ResNet-32, Top-1 error; needs --data",
    _model,
    _target,
    load_data=_load,
    batch_sizes=(128, 1024),
    reference_batch=128,
    weight_decays={"adamw": 5e-2, "default": 2e-4},
    max_epochs=200,
    max_micro_batch=8192,
    metric="error",
    data_options=frozenset({"path", "imbalance"}),
)
