"""``fop-bench --profile``: amortized step time, peak memory and where a step's time goes.

For every optimizer and batch size of the command, side by side in one process on one device:

1. a few warm-up steps, then ``steps`` timed steps (a whole number of curvature intervals, so the
   periodic factor and eigendecomposition work is amortized as in training), synchronising the
   device only at the ends of the window: the mean is the *amortized* time per training step;
2. the peak device memory of that window (CUDA max allocated; process RSS on the CPU);
3. the same steps again under ``torch.profiler``, summing the time inside the ``fop::`` phases
   (:mod:`fop.profiling`): forward+backward (without the hooks' capture), statistics capture,
   factor update, eigendecompositions (exact damping) or Cholesky inverses (factored), direction (projection and preconditioning), parameter
   update. On CUDA the phase times are device (kernel) times, on the CPU host times.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fop.bench.optimizers import OptimizerSpec
from fop.bench.runner import MemoryMeter, RunSpec, build_model_and_optimizer, forward_backward
from fop.bench.tasks import Task

__all__ = ["ProfileRow", "format_profile", "profile_runs", "window_steps"]

# phases reported, in order: (label, profiler range names summed, ranges subtracted)
_COLUMNS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("fwd+bwd", ("fop::forward_backward",), ("fop::capture",)),
    ("capture", ("fop::capture",), ()),
    ("factors", ("fop::factors",), ()),
    ("eigh", ("fop::eigh",), ()),
    ("cholesky", ("fop::cholesky",), ()),
    ("direction", ("fop::direction",), ()),
    ("update", ("fop::update",), ()),
)


@dataclass
class ProfileRow:
    """One optimizer at one batch size."""

    optimizer: str
    batch_size: int
    curvature_interval: int
    steps: int
    ms_per_step: float
    peak_memory_bytes: int
    memory_kind: str
    phase_ms: dict[str, float] = field(default_factory=dict)  # per step, by column label


def profile_runs(
    specs: Sequence[RunSpec],
    task: Task,
    dataset: Any,
    pipeline: Any,
    optimizers: dict[str, OptimizerSpec],
    steps: int | None = None,
) -> list[ProfileRow]:
    """Measure every run spec (one learning rate, one seed each) as described in the module doc."""
    return [_profile_one(spec, task, dataset, pipeline, optimizers[spec.optimizer], steps) for spec in specs]


def _profile_one(
    spec: RunSpec,
    task: Task,
    dataset: Any,
    pipeline: Any,
    optimizer_spec: OptimizerSpec,
    steps: int | None,
) -> ProfileRow:
    device = pipeline.device
    model, optimizer = build_model_and_optimizer(spec, task, dataset, device, optimizer_spec)
    interval = spec.hyperparameters.curvature_interval
    warmup, window = window_steps(interval, steps)
    generator = torch.Generator(device=device).manual_seed(spec.seed)
    order = torch.randint(0, pipeline.train_size, (spec.batch_size,), generator=generator, device=device)

    def train_step() -> None:
        with torch.profiler.record_function("fop::forward_backward"):
            forward_backward(model, optimizer, pipeline, order, spec, generator)
        with torch.profiler.record_function("fop::step"):
            optimizer.step()

    for _ in range(warmup):
        train_step()
    memory = MemoryMeter(device)
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(window):
        train_step()
        memory.sample()
    _synchronize(device)
    seconds = time.perf_counter() - start

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(window):
            train_step()
        _synchronize(device)
    totals = _phase_totals(prof.events(), device.type == "cuda")
    phase_ms = {
        label: max(0.0, sum(totals.get(n, 0.0) for n in add) - sum(totals.get(n, 0.0) for n in sub)) / window
        for label, add, sub in _COLUMNS
    }
    return ProfileRow(
        optimizer=spec.optimizer,
        batch_size=spec.batch_size,
        curvature_interval=interval,
        steps=window,
        ms_per_step=1000.0 * seconds / window,
        peak_memory_bytes=memory.peak_bytes(),
        memory_kind=memory.kind,
        phase_ms=phase_ms,
    )


def window_steps(interval: int, steps: int | None = None) -> tuple[int, int]:
    """``(warm-up, measured)`` steps: the warm-up covers kernels, the allocator and the first curvature
    cycle; the window (``steps``, default ``max(interval, 10)``) is rounded up to whole curvature cycles."""
    window = steps or max(interval, 10)
    return interval + 2, -(-window // interval) * interval


def _phase_totals(events: Any, on_device: bool) -> dict[str, float]:
    """Milliseconds inside each ``fop::`` range (device time on CUDA, host time otherwise).

    On CUDA a range's device time is the kernel time of the host-side range (its kernels and its
    children's). The profiler also records each range as a GPU-side annotation of the same name,
    whose span it would add to that total (pytorch/pytorch#130730), so those are skipped.
    """
    totals: dict[str, float] = {}
    for event in events:
        if not event.name.startswith("fop::"):
            continue
        if on_device:
            if event.device_type != torch.autograd.DeviceType.CPU:
                continue
            micros = event.device_time_total
        else:
            micros = event.cpu_time_total
        totals[event.name] = totals.get(event.name, 0.0) + micros / 1000.0
    return totals


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_profile(rows: Sequence[ProfileRow], baseline: str, header: str) -> str:
    """Markdown: per batch size, each optimizer's amortized step, ratio to the baseline, memory, phases."""
    labels = [label for label, *_ in _COLUMNS]
    lines = [
        header,
        "",
        f"| batch | optimizer | interval | ms/step | × {baseline} | peak MB | × {baseline} | "
        + " | ".join(f"{label} ms" for label in labels)
        + " |",
        "| " + " | ".join(["---"] * (7 + len(labels))) + " |",
    ]
    for batch in dict.fromkeys(row.batch_size for row in rows):
        group = [row for row in rows if row.batch_size == batch]
        base = next((row for row in group if row.optimizer == baseline), group[0])
        for row in group:
            lines.append(
                f"| {batch} | {row.optimizer} | {row.curvature_interval} | {row.ms_per_step:.1f} | "
                f"{row.ms_per_step / base.ms_per_step:.2f} | {row.peak_memory_bytes / 2**20:.0f} | "
                f"{row.peak_memory_bytes / max(base.peak_memory_bytes, 1):.2f} | "
                + " | ".join(f"{row.phase_ms[label]:.2f}" for label in labels)
                + " |"
            )
    lines += [
        "",
        "ms/step: amortized over whole curvature intervals (wall clock, device synchronised at the window's ends). "
        "Phase columns: time inside the profiler ranges per step (device time on CUDA, host time on CPU); "
        "fwd+bwd excludes the hooks' capture; the optimizer's remaining time is bookkeeping.",
    ]
    return "\n".join(lines)
