"""``digits-mlp``: scikit-learn's handwritten digits with an MLP (the embedded default task).

The dataset ships inside scikit-learn, so this task runs on a fresh machine without a download:
1,437 training and 360 test images of 8x8 pixels. Its default batch is the whole training split.
"""

from __future__ import annotations

from torch import nn

from fop.bench.data import ImageDataset, load_digits
from fop.bench.models import MLP
from fop.bench.tasks import CurvatureDefaults, DataOptions, Task, register, targets_by_kind


def _load(options: DataOptions) -> ImageDataset:
    return load_digits(subset=options.subset)


def _model(dataset: ImageDataset, width: int | None, layers: int | None = None) -> nn.Module:
    height, width_px, channels = dataset.image_shape
    return MLP(height * width_px * channels, dataset.num_classes, width=width or 256)


TASK = register(
    Task(
        name="digits-mlp",
        summary="scikit-learn digits (8x8, 1437 train / 360 test), 2-hidden-layer MLP; no download",
        load_data=_load,
        build_model=_model,
        default_target=targets_by_kind({"digits": 0.96}),
        batch_sizes=(1437,),
        reference_batch=128,
        base_lrs={"sgd": 0.015, "adamw": 6e-3, "kfac": 0.004, "fop": 0.004},
        weight_decays={"adamw": 1e-2, "default": 5e-4},
        max_epochs=100,
        warmup_epochs=3,
        curvature=CurvatureDefaults(damping=0.1, reference_interval=20),
        lr_grid=(1 / 3, 1.0, 3.0),
        seeds=(0, 1, 2),
        cpu_threads=1,
    )
)
