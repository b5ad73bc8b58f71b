"""The sweep: planning runs, the timed training loop, and the resumable JSON-lines result file.

Timing protocol (see ``docs/benchmark.md``): only training is timed. Evaluation after each epoch
runs outside the clock. On CUDA the host synchronises only at epoch boundaries; per-step times come
from CUDA events read after that synchronisation, so measuring does not slow the step down.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fop.bench.errors import BenchError
from fop.bench.metrics import Metric, get_metric
from fop.bench.models import split_batch_norm
from fop.bench.optimizers import (
    COSINE,
    Hyperparameters,
    OptimizerSpec,
    curvature_interval,
    scaled_lr,
    warmup_decay,
)
from fop.bench.tasks import Task

__all__ = [
    "ResultStore",
    "RunSpec",
    "SweepConfig",
    "forward_backward",
    "plan_runs",
    "resolve_micro_batch",
    "run_sweep",
    "train_run",
]


@dataclass(frozen=True)
class SweepConfig:
    """The sweep the command line asked for (defaults already filled in from the task)."""

    optimizers: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    lr_grid: tuple[float, ...]
    seeds: tuple[int, ...]
    max_epochs: int
    target: float
    device: str
    micro_batch: int | None = None
    width: int | None = None
    layers: int | None = None
    tied_head: bool = False
    lr_scaling: str | None = None
    base_lrs: tuple[tuple[str, float], ...] = ()
    lr_factors: tuple[tuple[str, float], ...] = ()  # --lr-factor: one factor for a named optimizer
    curvature_interval: int | None = None
    damping: float | None = None
    bf16: bool = True
    stop_at_target: bool = False
    damping_grid: tuple[float, ...] | None = None  # K-FAC/FOP's second tuning axis
    weight_decay_grid: tuple[float, ...] | None = None  # the other optimizers' second axis


def second_axis(config: SweepConfig, spec: OptimizerSpec) -> tuple[float | None, ...]:
    """Values of an optimizer's second tuning axis (damping for K-FAC/FOP, weight decay otherwise).

    ``(None,)`` when the sweep tunes the learning rate only.
    """
    grid = config.damping_grid if spec.uses_curvature else config.weight_decay_grid
    return tuple(grid) if grid else (None,)


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines one training run; its :meth:`key` identifies it on resume."""

    task: str
    data: str
    optimizer: str
    batch_size: int
    micro_batch: int
    lr_factor: float
    lr_scaling: str
    hyperparameters: Hyperparameters
    seed: int
    max_epochs: int
    warmup_epochs: float
    target: float
    width: int | None
    device: str
    bf16: bool
    stop_at_target: bool
    # the library's version: its defaults (e.g. the trust region) shape a run, so a run of
    # another version is not resumed as if it were this one
    library: str = ""
    layers: int | None = None  # model depth (tasks with "layers" in model_options); None: the task's
    tied_head: bool = False  # head weight shared with the token embedding ("tied_head" in model_options)

    def stored(self) -> dict[str, Any]:
        """The fields as a record stores them; ``layers`` and ``tied_head`` only when set, so that
        records written before they existed keep their keys."""
        fields = dataclasses.asdict(self)
        if fields["layers"] is None:
            del fields["layers"]
        if not fields["tied_head"]:
            del fields["tied_head"]
        return fields

    @property
    def key(self) -> str:
        """Stable hash of all fields: a finished run with the same key is skipped on resume."""
        return _spec_key(self.stored())

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. ``fop b=1437 lr=0.225 s=0``."""
        return f"{self.optimizer} b={self.batch_size} lr={self.hyperparameters.lr:.3g} s={self.seed}"


def resolve_micro_batch(batch_size: int, requested: int | None, task_limit: int | None) -> int:
    """Micro-batch size of gradient accumulation for ``batch_size``.

    An explicit ``requested`` size must divide the batch (a larger one means no accumulation).
    Otherwise the task's ``task_limit`` applies: the largest divisor of the batch not above it.
    """
    if requested is not None:
        if requested < 1:
            raise BenchError(f"--micro-batch must be positive, got {requested}")
        if requested >= batch_size:
            return batch_size
        if batch_size % requested:
            raise BenchError(f"--micro-batch {requested} does not divide batch size {batch_size}")
        return requested
    if task_limit is None or batch_size <= task_limit:
        return batch_size
    divisor = max(d for d in range(1, task_limit + 1) if batch_size % d == 0)
    if divisor < 2:
        raise BenchError(f"batch size {batch_size} has no micro-batch size <= {task_limit}; give --micro-batch")
    return divisor


def plan_runs(config: SweepConfig, task: Task, dataset: Any, optimizers: Sequence[OptimizerSpec]) -> list[RunSpec]:
    """All runs of the sweep: batch sizes x optimizers x learning-rate factors x seeds."""
    base_lr_overrides = dict(config.base_lrs)
    data = json.dumps({k: v for k, v in dataset.summary().items() if k != "source"}, sort_keys=True)
    runs = []
    for batch_size in config.batch_sizes:
        if batch_size > dataset.train_size:
            raise BenchError(
                f"batch size {batch_size} is larger than the training set ({dataset.train_size} {dataset.sample_unit})"
            )
        micro_batch = resolve_micro_batch(batch_size, config.micro_batch, task.max_micro_batch)
        interval = config.curvature_interval or curvature_interval(
            batch_size, task.reference_batch, task.curvature.reference_interval, task.curvature.min_interval
        )
        for spec in optimizers:
            if spec.uses_curvature and micro_batch < 2:
                raise BenchError(f"{spec.name} splits each micro-batch in two halves: micro-batch must be >= 2")
            base_lr = _base_lr(spec, task, base_lr_overrides)
            scaling = config.lr_scaling or spec.scaling
            fallback_lr = _fallback_lr(task, config, base_lr_overrides, batch_size)
            options = dict(spec.options)
            factor_decay = options.pop("factor_decay", task.curvature.factor_decay)
            fallback = options.pop("fallback", task.curvature.fallback)
            fixed_fallback_lr = options.pop("fallback_lr", None)
            # a variant's fallback rule (fbsgd, fbadamw) takes the library's default learning rate
            # for that rule, a variant's flX a fixed one; otherwise the task's rule (_fallback_lr)
            own_fallback = fixed_fallback_lr is not None or "fallback" in spec.options
            pinned = dict(config.lr_factors).get(spec.name)
            grid = config.lr_grid if pinned is None else (pinned,)
            for factor, second in itertools.product(grid, second_axis(config, spec)):
                lr = factor * scaled_lr(base_lr, batch_size, task.reference_batch, scaling)
                default_damping = config.damping or task.curvature.damping
                # the task's fallback rate moves with the grid factor; a variant's own one does not
                run_fallback_lr = fixed_fallback_lr
                if not own_fallback and fallback_lr is not None:
                    run_fallback_lr = factor * fallback_lr
                hyperparameters = Hyperparameters(
                    lr=lr,
                    weight_decay=task.weight_decay(spec.lr_name) if spec.uses_curvature or second is None else second,
                    damping=second if spec.uses_curvature and second is not None else default_damping,
                    factor_decay=factor_decay,
                    curvature_interval=interval,
                    fallback=fallback,
                    fallback_lr=run_fallback_lr,
                    options=tuple(sorted(options.items())),
                )
                for seed in config.seeds:
                    runs.append(
                        RunSpec(
                            task=task.name,
                            data=data,
                            optimizer=spec.name,
                            batch_size=batch_size,
                            micro_batch=micro_batch,
                            lr_factor=factor,
                            lr_scaling=scaling,
                            hyperparameters=hyperparameters,
                            seed=seed,
                            max_epochs=config.max_epochs,
                            warmup_epochs=task.warmup_epochs,
                            target=config.target,
                            width=config.width,
                            layers=config.layers,
                            tied_head=config.tied_head,
                            device=torch.device(config.device).type,
                            bf16=config.bf16,
                            stop_at_target=config.stop_at_target,
                            library=_library_version(),
                        )
                    )
    return runs


def _library_version() -> str:
    import fop

    return fop.__version__


def _base_lr(spec: OptimizerSpec, task: Task, overrides: dict[str, float]) -> float:
    names = tuple(dict.fromkeys((spec.name, spec.lr_name)))
    for name in names:
        if name in overrides:
            return overrides[name]
    for name in names:
        if name in task.base_lrs:
            return task.base_lrs[name]
    if spec.default_lr is not None:
        return spec.default_lr
    raise BenchError(
        f"no base learning rate for optimizer {spec.name!r} on {task.name}; give --base-lr {spec.name}=VALUE"
    )


def _fallback_lr(task: Task, config: SweepConfig, overrides: dict[str, float], batch_size: int) -> float | None:
    """K-FAC/FOP's AdamW fallback group follows the AdamW schedule of the task (sgd: the main lr)."""
    if task.curvature.fallback != "adamw":
        return None
    base = overrides.get("adamw", task.base_lrs["adamw"])
    return scaled_lr(base, batch_size, task.reference_batch, config.lr_scaling or "sqrt")


# ----------------------------------------------------------------------------------------------
# Measuring


class StepClock:
    """Timestamps inside the training loop that never synchronise the host with the device.

    On CUDA a mark is a recorded CUDA event; elsewhere it is ``time.perf_counter()``. Intervals are
    read with :meth:`seconds` after :meth:`synchronize`.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1000.0 if self.cuda else end - start


class MemoryMeter:
    """Peak memory of a run: CUDA max allocated, or the process's resident set size on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.kind = "cuda_max_allocated" if self.cuda else "process_rss"
        self._peak = 0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def sample(self) -> None:
        if not self.cuda:
            self._peak = max(self._peak, _resident_bytes())

    def peak_bytes(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device)) if self.cuda else self._peak


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, pipeline: Any, batch_size: int, bf16: bool, metric: Metric) -> float:
    """The held-out metric (model in eval mode, no gradients): accuracy in [0, 1] for the
    ``accuracy`` and ``error`` metrics, the mean cross-entropy per target in nats for ``loss``."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=pipeline.device)
    count = 0
    for inputs, targets in pipeline.held_out_batches(batch_size):
        with _autocast(pipeline.device, bf16):
            output = model(inputs)
        if metric.name == "loss":
            total += F.cross_entropy(output.float().flatten(0, -2), targets.flatten(), reduction="sum")
        else:
            total += (output.argmax(dim=1) == targets).sum()
        count += targets.numel()
    model.train()
    return total.item() / max(1, count)


# Schedule-Free with BatchNorm: batches that recompute the statistics at the averaged weights
BN_RECALIBRATION_BATCHES = 50


def _evaluate_schedule_free(
    model: nn.Module, optimizer: torch.optim.Optimizer, pipeline: Any, spec: RunSpec, eval_batch: int, metric: Metric
) -> float:
    """The held-out metric of a Schedule-Free optimizer's averaged weights: ``optimizer.eval()`` swaps them
    in, ``optimizer.train()`` back. With BatchNorm, its running statistics are first recomputed at
    those weights from up to 50 training batches (forward only, in training mode), as the package's
    authors prescribe; the batches come from a generator of their own, so the training data order
    is untouched."""
    optimizer.eval()  # type: ignore[attr-defined]
    try:
        if any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules()):
            generator = torch.Generator(device=pipeline.device).manual_seed(spec.seed)
            order = torch.randperm(pipeline.train_size, generator=generator, device=pipeline.device)
            with torch.no_grad():
                for batch in itertools.islice(_batches(order, spec.micro_batch), BN_RECALIBRATION_BATCHES):
                    inputs, _ = pipeline.train_batch(batch, generator)
                    with _autocast(pipeline.device, spec.bf16):
                        model(inputs)
        return evaluate(model, pipeline, eval_batch, spec.bf16, metric)
    finally:
        optimizer.train()  # type: ignore[attr-defined]


def _diagnostics_summary(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Median over layers of FOP's last β* and η* (empty for optimizers without diagnostics)."""
    diagnostics = getattr(optimizer, "diagnostics", None)
    if diagnostics is None:
        return {}
    summary = {}
    layers = diagnostics().values()
    for name in ("beta", "eta"):
        values = [float(v) for layer in layers if name in layer for v in torch.as_tensor(layer[name]).flatten()]
        finite = [v for v in values if math.isfinite(v)]
        if finite:
            summary[f"{name}_median"] = statistics.median(finite)
    # over the epoch's steps, then reset: how often the trust region bound, and the noise scale
    trust = optimizer.trust_region_stats(reset=True)  # type: ignore[attr-defined]
    if trust is not None:
        summary["clipped_fraction"] = trust["clipped_fraction"]
        summary["nu_median"] = trust["nu_median"]
    noise = optimizer.gradient_noise_scale(reset=True)  # type: ignore[attr-defined]
    if noise is not None:
        summary["noise_scale"] = noise
    return summary


def _progress_bar(total: int, label: str, enabled: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        return contextlib.nullcontext(_SilentBar())
    # shutil falls back to 80x24 where the terminal reports a size of 0 (tqdm would draw nothing)
    size = shutil.get_terminal_size()
    return tqdm(
        total=total,
        desc=label,
        file=sys.stderr,
        ncols=min(140, size.columns),
        nrows=size.lines,
        bar_format="{desc}: epoch {n_fmt}/{total_fmt} {bar:10} {elapsed}{postfix}",
    )


class _SilentBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass


# ----------------------------------------------------------------------------------------------
# Training


def train_run(
    spec: RunSpec,
    task: Task,
    dataset: Any,
    pipeline: Any,
    optimizer_spec: OptimizerSpec,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one run and return its result record (see ``docs/benchmark.md`` for the fields).

    The held-out metric is measured ``task.evaluations_per_epoch`` times per epoch, after equal
    shares of the epoch's steps, outside the clock; a curve point's ``epoch`` is then fractional
    (1.25: a quarter into the second epoch) and ``step`` counts the steps taken.
    """
    device = pipeline.device
    metric = get_metric(task.metric)
    model, optimizer = build_model_and_optimizer(spec, task, dataset, device, optimizer_spec)
    steps_per_epoch = pipeline.train_size // spec.batch_size
    evaluations = max(1, min(task.evaluations_per_epoch, steps_per_epoch))
    scheduler = _schedule(optimizer, spec, steps_per_epoch, optimizer_spec.decay)
    generator = torch.Generator(device=device).manual_seed(spec.seed)
    clock, memory = StepClock(device), MemoryMeter(device)
    eval_batch = task.max_micro_batch or 4096

    curve: list[dict[str, Any]] = []
    timing = _Timing()
    reached: dict[str, Any] | None = None
    status = "ok"
    steps = 0
    with _progress_bar(spec.max_epochs, spec.label, progress) as bar:
        for epoch in range(1, spec.max_epochs + 1):
            order = torch.randperm(pipeline.train_size, generator=generator, device=pipeline.device)
            batches = list(_batches(order, spec.batch_size))
            bounds = [round(part * len(batches) / evaluations) for part in range(evaluations + 1)]
            for part in range(evaluations):
                period = batches[bounds[part] : bounds[part + 1]]
                clock.synchronize()
                period_start = time.perf_counter()
                marks, loss_sum = _train_steps(
                    model, optimizer, scheduler, pipeline, spec, period, generator, clock, memory
                )
                clock.synchronize()
                timing.add(clock, marks, time.perf_counter() - period_start)
                steps += len(period)
                loss = loss_sum.item() / max(1, len(period))
                if optimizer_spec.schedule_free:
                    value = _evaluate_schedule_free(model, optimizer, pipeline, spec, eval_batch, metric)
                else:
                    value = evaluate(model, pipeline, eval_batch, spec.bf16, metric)
                point = {
                    "epoch": epoch if evaluations == 1 else round(epoch - 1 + (part + 1) / evaluations, 6),
                    "step": steps,
                    "seconds": timing.train_seconds,
                    metric.field: value,
                    "loss": loss,
                }
                if metric.name == "loss":
                    point["val_bits"] = value / math.log(2)
                point.update(_diagnostics_summary(optimizer))
                curve.append(point)
                if reached is None and metric.reached(value, spec.target):
                    reached = point
                bar.set_postfix_str(
                    f"{metric.short}={metric.text(value)} train={timing.train_seconds:.1f}s"
                    + (f" target@{reached['epoch']}" if reached else "")
                )
                if not math.isfinite(loss):
                    status = "diverged"
                    break
                if reached is not None and spec.stop_at_target:
                    break
            bar.update(1)
            if status == "diverged" or (reached is not None and spec.stop_at_target):
                break

    skipped = getattr(optimizer, "skipped_steps", None)  # K-FAC/FOP skip steps with non-finite gradients
    return {
        "key": spec.key,
        "spec": spec.stored(),
        "status": status,
        "metric": metric.name,
        **_outcome_fields(curve, reached, metric),
        **timing.fields(),
        "steps_per_epoch": steps_per_epoch,
        "peak_memory_bytes": memory.peak_bytes(),
        "memory_kind": memory.kind,
        "skipped_steps": None if skipped is None else int(skipped),
        "dataset": dataset.summary(),
        "curve": curve,
    }


def _outcome_fields(curve: list[dict[str, Any]], reached: dict[str, Any] | None, metric: Metric) -> dict[str, Any]:
    """When the run reached its target (epochs, steps, seconds), and its best and final metric."""
    values = [point[metric.field] for point in curve]
    return {
        "epochs_run": curve[-1]["epoch"],
        "epochs_to_target": None if reached is None else reached["epoch"],
        "steps_to_target": None if reached is None else reached["step"],
        "seconds_to_target": None if reached is None else reached["seconds"],
        metric.best_field: metric.best(values),
        metric.final_field: values[-1],
    }


def _schedule(optimizer: torch.optim.Optimizer, spec: RunSpec, steps_per_epoch: int, decay: str = COSINE) -> Any:
    """The run's learning-rate schedule: linear warmup, then ``decay`` (cosine for all but the baselines
    whose authors prescribe another) to 0 at the last epoch."""
    total_steps = steps_per_epoch * spec.max_epochs
    warmup_steps = round(spec.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_decay(total_steps, warmup_steps, decay))


@dataclass
class _Timing:
    """Training time of a run: per step, in ``optimizer.step()``, and in all (evaluation excluded)."""

    step_seconds: list[float] = dataclasses.field(default_factory=list)
    optimizer_seconds: float = 0.0
    train_seconds: float = 0.0

    def fields(self) -> dict[str, float]:
        """The record's timing fields."""
        return {
            "train_seconds": self.train_seconds,
            "median_step_seconds": statistics.median(self.step_seconds),
            "optimizer_share": self.optimizer_seconds / max(sum(self.step_seconds), 1e-12),
        }

    def add(self, clock: StepClock, marks: list[tuple[Any, Any, Any]], seconds: float) -> None:
        self.train_seconds += seconds
        for start, before_step, end in marks:
            self.step_seconds.append(clock.seconds(start, end))
            self.optimizer_seconds += clock.seconds(before_step, end)


def build_model_and_optimizer(
    spec: RunSpec, task: Task, dataset: Any, device: torch.device, optimizer_spec: OptimizerSpec
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The run's model (seeded, on ``device``, channels_last on CUDA, in training mode) and optimizer."""
    torch.manual_seed(spec.seed)
    model_options = {"tied_head": True} if spec.tied_head else {}
    model = task.build_model(dataset, spec.width, spec.layers, **model_options).to(device)
    if optimizer_spec.batch_norm_parts > 1:
        split_batch_norm(model, optimizer_spec.batch_norm_parts)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    model.train()
    return model, optimizer_spec.build(model, spec.hyperparameters)


def _train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    pipeline: Any,
    spec: RunSpec,
    batches: Sequence[Tensor],
    generator: torch.Generator,
    clock: StepClock,
    memory: MemoryMeter,
) -> tuple[list[tuple[Any, Any, Any]], Tensor]:
    """One optimizer step per batch of training-set indices (an epoch's, or a share of them).

    Returns the clock marks ``(start, before optimizer.step, end)`` of every step and the summed
    mean training loss of the steps, as a device tensor (read after synchronisation).
    """
    loss_sum = torch.zeros((), device=pipeline.device)
    marks = []
    for batch in batches:
        start = clock.mark()
        loss_sum += forward_backward(model, optimizer, pipeline, batch, spec, generator)
        memory.sample()
        before_step = clock.mark()
        optimizer.step()
        scheduler.step()
        marks.append((start, before_step, clock.mark()))
    return marks, loss_sum


def forward_backward(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    pipeline: Any,
    batch: Tensor,
    spec: RunSpec,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The gradients of one training step: ``zero_grad``, then forward and backward per micro-batch.

    ``batch`` holds the step's training-set indices, taken in micro-batches of ``spec.micro_batch``
    (gradient accumulation, each loss weighted by its share of the batch), under bf16 autocast on
    CUDA when ``spec.bf16``; a Monte-Carlo Fisher optimizer samples its labels on each output. The
    loss is the cross-entropy of the output's last dimension against the targets, averaged over
    every other dimension (samples, and positions for a sequence model). The
    caller then runs ``optimizer.step()``. Returns the batch's mean loss (a device tensor). The
    sweep, ``--profile`` and ``--nproc`` all train with this step.
    """
    optimizer.zero_grad(set_to_none=True)
    mc_fisher = getattr(optimizer, "fisher", None) == "mc"
    loss_sum = torch.zeros((), device=pipeline.device)
    for micro in batch.split(spec.micro_batch):
        inputs, targets = pipeline.train_batch(micro, generator)
        weight = micro.numel() / batch.numel()
        with _autocast(pipeline.device, spec.bf16):
            output = model(inputs)
            if mc_fisher:
                optimizer.sample_fisher(output, generator)  # type: ignore[attr-defined]
            loss = F.cross_entropy(output.flatten(0, -2), targets.flatten())
        (loss * weight).backward()
        loss_sum += loss.detach().float() * weight
    return loss_sum


def _batches(order: Tensor, batch_size: int) -> Iterator[Tensor]:
    for start in range(0, order.numel() - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


# ----------------------------------------------------------------------------------------------
# Results file and the sweep


class ResultStore:
    """Append-only JSON-lines file of finished runs, one record per line.

    A sweep killed while writing leaves at most one partial last line; it is ignored on reading,
    and the next append starts on a fresh line.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(
        self, log: TextIO | None = None, check: Callable[[Any], str | None] | None = None
    ) -> dict[str, dict[str, Any]]:
        """Finished runs by key (later lines win).

        A damaged line (bad bytes, not JSON, or a record that ``check`` finds a problem with; by
        default, not an object with a ``key``) is skipped with a one-line warning on ``log``
        (default stderr): that run is simply trained again. An unterminated last line, what a
        killed sweep leaves, is skipped silently.
        """
        records: dict[str, dict[str, Any]] = {}
        if not self.path.is_file():
            return records
        lines = self.path.read_bytes().split(b"\n")
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                if number < len(lines):  # the last piece has no newline: a run killed while writing
                    reason = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else "not a JSON record"
                    print(f"warning: {self.path}:{number}: {reason}; line skipped", file=log or sys.stderr)
                continue
            problem = (check or _keyed)(record)
            if problem is not None:
                print(f"warning: {self.path}:{number}: {problem}; record skipped", file=log or sys.stderr)
                continue
            records[record["key"]] = record
        return records

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+", encoding="utf-8") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:
                handle.seek(handle.tell() - 1)
                if handle.read(1) != "\n":
                    handle.write("\n")
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


# What the reports read from a record, with the types train_run writes (and the metric's
# best_<field> and final_<field>, numbers; see fop.bench.metrics).
_NUMBER = (int, float)
_RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "status": (str,),
    "epochs_to_target": (*_NUMBER, type(None)),
    "seconds_to_target": (*_NUMBER, type(None)),
    "median_step_seconds": _NUMBER,
    "optimizer_share": _NUMBER,
    "peak_memory_bytes": (*_NUMBER, type(None)),
    "curve": (list,),
}


def _keyed(record: Any) -> str | None:
    return None if isinstance(record, dict) and "key" in record else "not a JSON object with a 'key'"


def _record_problem(record: Any) -> str | None:
    """Why ``record`` cannot be used (None if it can)."""
    if not isinstance(record, dict):
        return "not a JSON object"
    spec = record.get("spec")
    if not isinstance(spec, dict) or record.get("key") != _spec_key(spec):
        return "its 'key' is not the hash of its 'spec' (edited or truncated)"
    try:
        metric = get_metric(record.get("metric", "accuracy"))  # records before metrics existed: accuracy
    except BenchError:
        return f"unknown metric {record.get('metric')!r}"
    fields = {metric.best_field: _NUMBER, metric.final_field: _NUMBER, **_RECORD_FIELDS}
    for name, types in fields.items():
        if name not in record:
            return f"field {name!r} is missing"
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, types):
            return f"field {name!r} is a {type(value).__name__}"
    for point in record["curve"]:
        if not (isinstance(point, dict) and all(isinstance(point.get(k), _NUMBER) for k in ("seconds", metric.field))):
            return f"a point of 'curve' lacks numeric 'seconds' and {metric.field!r}"
    return None


def _spec_key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def run_sweep(
    plan: Sequence[RunSpec],
    task: Task,
    dataset: Any,
    pipeline: Any,
    optimizers: dict[str, OptimizerSpec],
    store: ResultStore,
    context: dict[str, Any],
    progress: bool = True,
    log: TextIO | None = None,
) -> list[dict[str, Any]]:
    """Train every planned run not already in ``store`` and return the records of the whole plan.

    ``context`` (environment, command) is stored with each new record. Messages go to ``log``
    (default: ``sys.stderr`` at call time).
    """
    log = log or sys.stderr
    finished = store.load(log, _record_problem)
    todo = [spec for spec in plan if spec.key not in finished]
    if len(todo) < len(plan):
        print(
            f"resuming: {len(plan) - len(todo)} of {len(plan)} runs already finished in {store.path}, skipped", file=log
        )
    for number, spec in enumerate(todo, 1):
        record = train_run(spec, task, dataset, pipeline, optimizers[spec.optimizer], progress)
        record.update(context)
        store.append(record)
        finished[spec.key] = record
        if not progress:
            print(f"[{number}/{len(todo)}] {spec.label}: {_outcome(record)}", file=log, flush=True)
    return [finished[spec.key] for spec in plan]


def _outcome(record: dict[str, Any]) -> str:
    """One-line result of a run, for logs without progress bars."""
    metric = get_metric(record.get("metric", "accuracy"))
    reached = (
        f"target at epoch {record['epochs_to_target']} ({record['seconds_to_target']:.2f} s)"
        if record["epochs_to_target"] is not None
        else "target not reached"
    )
    unit = "" if metric.name == "loss" else "%"
    best, final = metric.text(record[metric.best_field]), metric.text(record[metric.final_field])
    return f"{reached}; {metric.short} best {best}{unit}, final {final}{unit}" + (
        "; diverged" if record["status"] == "diverged" else ""
    )
