"""Benchmark tasks: a model, a dataset and the default protocol settings, by name.

A task is one :class:`Task` object registered with :func:`register` from a small module of this
package (see :mod:`fop.bench.tasks.digits_mlp` for the shortest one); adding a task means adding a
module and importing it at the bottom of this file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fop.bench.data import BatchPipeline, ImageDataset
from fop.bench.errors import BenchError

__all__ = [
    "CIFAR10_DEFAULTS",
    "CIFAR10_ENV",
    "CurvatureDefaults",
    "DataOptions",
    "Task",
    "cifar10_task",
    "get_task",
    "register",
    "task_names",
]


CIFAR10_ENV = "FOP_CIFAR10"  # default of --data for the CIFAR tasks, shared with the test suite


@dataclass(frozen=True)
class DataOptions:
    """What the command line says about the data; each task uses the fields it needs."""

    path: Path | None = None
    subset: int | None = None
    imbalance: float | None = None
    cache_dir: Path | None = None
    download: bool = False


@dataclass(frozen=True)
class CurvatureDefaults:
    """K-FAC / FOP settings of a task.

    ``reference_interval`` is the curvature (and inverse) update interval in steps at the task's
    reference batch size; see :func:`fop.bench.optimizers.curvature_interval` for how it shrinks
    with larger batches, down to ``min_interval``. ``fallback`` is the first-order rule of the
    parameters outside Kronecker-factored layers (``"sgd"``, ``"adamw"`` or ``"auto"``; with
    ``"adamw"`` their learning rate follows the AdamW schedule of the task, with ``"auto"`` it is the
    library's default ``fallback_lr``).
    """

    damping: float = 1e-3
    factor_decay: float = 0.95
    reference_interval: int = 50
    min_interval: int = 5
    fallback: str = "sgd"


@dataclass(frozen=True)
class Task:
    """One benchmark task and its default protocol.

    Attributes:
        name: the ``--task`` value.
        summary: one line for ``--list``.
        load_data: reads the dataset (raises :class:`BenchError` on bad input).
        build_model: ``(dataset, width, layers=None) -> nn.Module``; ``None`` means the standard size
            (``layers`` stays ``None`` unless the task lists ``"layers"`` in ``model_options``; a
            task listing ``"tied_head"`` also takes ``tied_head=True``).
        default_target: target of the metric for a loaded dataset (it may depend on its ``kind``).
        batch_sizes: default ``--batch-sizes``.
        reference_batch: the batch size at which ``base_lrs`` hold (learning-rate scaling rule).
        base_lrs: base learning rate per optimizer name at ``reference_batch``.
        weight_decays: weight decay per optimizer name; the key ``"default"`` covers the others.
        max_epochs: default ``--max-epochs`` (also the length of the cosine schedule).
        warmup_epochs: linear warmup length, in epochs (fractions allowed).
        crop_padding: random-crop padding of the augmentation (``None``: no augmentation).
        curvature: K-FAC / FOP settings.
        lr_grid: default ``--lr-grid`` (factors on the scaled learning rate).
        max_micro_batch: largest micro-batch (gradient accumulation above it); ``None``: no limit.
        metric: ``"accuracy"``, ``"error"`` to report Top-1 error (100 − accuracy), or ``"loss"``
            (held-out cross-entropy, lower is better); see :mod:`fop.bench.metrics`.
        data_options: which :class:`DataOptions` fields the task reads (``"path"``, ``"imbalance"``).
        data_env: environment variable giving the default of ``--data`` (tasks reading ``"path"``).
        model_options: which model options beyond ``--width`` the model takes (``"layers"``,
            ``"tied_head"``).
        evaluations_per_epoch: held-out evaluations per epoch (at equal step intervals); a task
            whose runs last a few epochs measures its time to target more finely with several.
        make_pipeline: ``(dataset, device) -> pipeline`` serving its batches on ``device``
            (``None``: :class:`fop.bench.data.BatchPipeline` with the task's augmentation).
        cpu_threads: torch CPU threads when training on the CPU without ``--threads`` (``None``:
            torch's default). Tiny models run fastest on one thread, and it keeps them quick on a
            busy machine.
    """

    name: str
    summary: str
    load_data: Callable[[DataOptions], Any]
    build_model: Callable[..., nn.Module]  # (dataset, width, layers=None[, tied_head=False])
    default_target: Callable[[Any], float]
    batch_sizes: tuple[int, ...]
    reference_batch: int
    base_lrs: Mapping[str, float]
    weight_decays: Mapping[str, float]
    max_epochs: int
    warmup_epochs: float
    crop_padding: int | None = None
    curvature: CurvatureDefaults = field(default_factory=CurvatureDefaults)
    lr_grid: tuple[float, ...] = (1.0,)
    seeds: tuple[int, ...] = (0,)
    optimizers: tuple[str, ...] = ("sgd", "adamw", "kfac", "fop")
    max_micro_batch: int | None = None
    metric: str = "accuracy"
    data_options: frozenset[str] = frozenset()
    cpu_threads: int | None = None
    data_env: str = CIFAR10_ENV
    model_options: frozenset[str] = frozenset()
    evaluations_per_epoch: int = 1
    make_pipeline: Callable[[Any, torch.device], Any] | None = None

    def weight_decay(self, optimizer: str) -> float:
        """Weight decay of ``optimizer`` on this task."""
        return self.weight_decays.get(optimizer, self.weight_decays["default"])

    def pipeline(self, dataset: Any, device: torch.device) -> Any:
        """The batch pipeline of ``dataset`` on ``device`` (its data resident there)."""
        if self.make_pipeline is not None:
            return self.make_pipeline(dataset, device)
        return BatchPipeline(dataset, device, crop_padding=self.crop_padding, channels_last=device.type == "cuda")


_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add ``task`` to the registry (names are unique) and return it."""
    if task.name in _REGISTRY:
        raise ValueError(f"task {task.name!r} is registered twice")
    _REGISTRY[task.name] = task
    return task


def task_names() -> list[str]:
    """Registered task names, in registration order (the default task first)."""
    return list(_REGISTRY)


def get_task(name: str) -> Task:
    """The task called ``name``; :class:`BenchError` naming the choices if there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BenchError(f"unknown task {name!r} (choose from {', '.join(_REGISTRY)})") from None


def targets_by_kind(targets: Mapping[str, float]) -> Callable[[ImageDataset], float]:
    """A ``default_target`` looking the dataset's ``kind`` up in ``targets``."""

    def default_target(dataset: ImageDataset) -> float:
        try:
            return targets[dataset.kind]
        except KeyError:
            raise BenchError(f"no default target for {dataset.kind} data; give --target") from None

    return default_target


def cifar10_from_options(options: DataOptions, task: str) -> ImageDataset:
    """CIFAR-10 from ``options.path`` (the JPEG pack or an original folder), as the CIFAR tasks read it."""
    from fop.bench.data import load_cifar10

    if options.path is None:
        raise BenchError(
            f"task {task} needs --data PATH (the CIFAR-10 JPEG pack .npz or a CIFAR-10 folder; or set FOP_CIFAR10)"
        )
    return load_cifar10(options.path, subset=options.subset, cache_dir=options.cache_dir, download=options.download)


# What the CIFAR-10 tasks share unless they say otherwise: the paper's ResNet-18 recipe.
CIFAR10_DEFAULTS: Mapping[str, object] = {
    "base_lrs": {"sgd": 0.1, "adamw": 1e-3, "kfac": 0.05, "fop": 0.05},
    "weight_decays": {"adamw": 5e-2, "default": 5e-4},
    "max_epochs": 100,
    "warmup_epochs": 5,
    "crop_padding": 4,
    "curvature": CurvatureDefaults(damping=1e-3, reference_interval=50),
    "lr_grid": (0.5, 1.0, 2.0),
    "data_options": frozenset({"path"}),
}


def cifar10_task(
    name: str,
    summary: str,
    build_model: Callable[..., nn.Module],
    default_target: Callable[[ImageDataset], float],
    load_data: Callable[[DataOptions], ImageDataset] | None = None,
    **fields: object,
) -> Task:
    """Register a CIFAR-10 task: :data:`CIFAR10_DEFAULTS` with ``fields`` on top; the data from ``--data``."""

    def load(options: DataOptions) -> ImageDataset:
        return cifar10_from_options(options, name)

    settings = {**CIFAR10_DEFAULTS, **fields}
    return register(
        Task(
            name=name,
            summary=summary,
            load_data=load_data or load,
            build_model=build_model,
            default_target=default_target,
            **settings,  # type: ignore[arg-type]
        )
    )


# Registration order is the order of `--list`; the first task is the default.
from fop.bench.tasks import digits_mlp, cifar10_resnet18, cifar10_lt_resnet32, cifar10_vit, charlm_linux  # noqa: E402, F401, I001
