"""``cifar10-vit``: a small Vision Transformer on CIFAR-10.

FOP and K-FAC precondition its ``nn.Linear`` layers (patch embedding, attention ``qkv``/``proj``,
MLPs, head); layer norms, the class token and position embeddings are updated by AdamW, as in the
paper's transformer runs. Width is the embedding dimension (192: 6 blocks, 3 heads, patch 4).
"""

from __future__ import annotations

from torch import nn

from fop.bench.data import ImageDataset
from fop.bench.models import VisionTransformer
from fop.bench.tasks import CurvatureDefaults, cifar10_task, targets_by_kind


def _model(dataset: ImageDataset, width: int | None, layers: int | None = None) -> nn.Module:
    height, _, channels = dataset.image_shape
    return VisionTransformer(dataset.num_classes, image_size=height, in_channels=channels, dim=width or 192)


TASK = cifar10_task(
    "cifar10-vit",
    "CIFAR-10, small ViT (Linear attention; AdamW on norms/embeddings for K-FAC/FOP); needs --data",
    _model,
    targets_by_kind({"cifar10": 0.78, "cifar10-jpeg": 0.75}),
    batch_sizes=(512, 2048, 8192),
    reference_batch=512,
    base_lrs={"sgd": 0.05, "adamw": 1e-3, "kfac": 0.02, "fop": 0.02},
    warmup_epochs=10,
    curvature=CurvatureDefaults(damping=1e-3, reference_interval=50, fallback="adamw"),
    max_micro_batch=2048,
)
