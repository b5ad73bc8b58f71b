"""Reports of a sweep: the paper's Table 1 in Markdown, Figure 2 as a PNG, and their header.

Each (batch size, optimizer) cell aggregates the seeds of every learning rate of the grid and keeps
the best learning rate (the shortest median time to target; if none reaches it, the best median
best metric: highest accuracy, lowest loss; see :mod:`fop.bench.metrics`). Medians are over seeds, a run that misses the target counts as infinitely slow, so a
cell reaches the target when more than half of its seeds do (2 of 3, 2 of 2).
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from fop.bench.metrics import Metric, get_metric

__all__ = ["Cell", "environment", "format_report", "format_table1", "plot_curves", "summarize"]

MISS = "—"


@dataclass(frozen=True)
class Cell:
    """One (batch size, optimizer) result: the best learning rate's runs, aggregated over seeds."""

    batch_size: int
    optimizer: str
    lr: float
    lr_factor: float
    runs: tuple[dict[str, Any], ...]
    damping: float | None = None  # K-FAC/FOP's chosen damping (its second tuning axis)
    weight_decay: float | None = None
    edges: tuple[str, ...] = ()  # tuned axes whose chosen value lies on the edge of what was tried
    trials: int = 1  # configurations tried for this cell (the tuning budget)

    @property
    def seeds(self) -> int:
        return len(self.runs)

    @property
    def reached(self) -> int:
        return sum(run["seconds_to_target"] is not None for run in self.runs)

    def median(self, field: str) -> float:
        """Median over seeds of ``field``; a missing value (target not reached) counts as +inf."""
        return statistics.median(math.inf if run[field] is None else run[field] for run in self.runs)

    def spread(self, field: str) -> tuple[float, float] | None:
        """(min, max) over the seeds that have ``field``; ``None`` if none has."""
        values = [run[field] for run in self.runs if run[field] is not None]
        return (min(values), max(values)) if values else None

    @property
    def epochs(self) -> float:
        return self.median("epochs_to_target")

    @property
    def seconds(self) -> float:
        return self.median("seconds_to_target")

    @property
    def hit(self) -> bool:
        return math.isfinite(self.seconds)

    @property
    def metric(self) -> Metric:
        """The runs' metric (records written before metrics existed hold an accuracy)."""
        return get_metric(self.runs[0].get("metric", "accuracy"))

    def metric_median(self, which: str) -> float:
        """Median over seeds of the ``"best"`` or ``"final"`` metric (NaN if a seed has none)."""
        field = self.metric.best_field if which == "best" else self.metric.final_field
        values = [run[field] for run in self.runs]
        return math.nan if any(math.isnan(v) for v in values) else statistics.median(values)

    def sort_key(self) -> tuple[float, float]:
        return (self.seconds, self.metric.rank(self.metric_median("best")))


def summarize(records: Iterable[dict[str, Any]]) -> dict[tuple[int, str], Cell]:
    """Cells by ``(batch_size, optimizer)``, each at its best configuration of the grid.

    A configuration is a learning-rate factor and, where the sweep tunes one, a damping (K-FAC,
    FOP) or weight decay (the others). A cell whose chosen value lies on the edge of the values
    tried lists that axis in :attr:`Cell.edges`: the grid may be too small there.
    """
    groups: dict[tuple[int, str, float, Any, Any], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        spec = record["spec"]
        hp = spec["hyperparameters"]
        groups[
            (spec["batch_size"], spec["optimizer"], spec["lr_factor"], hp.get("damping"), hp.get("weight_decay"))
        ].append(record)
    tried: dict[tuple[int, str], list[tuple[float, Any, Any]]] = defaultdict(list)
    for batch_size, optimizer, factor, damping, decay in groups:
        tried[(batch_size, optimizer)].append((factor, damping, decay))
    best: dict[tuple[int, str], Cell] = {}
    for (batch_size, optimizer, factor, damping, decay), runs in groups.items():
        runs.sort(key=lambda run: run["spec"]["seed"])
        cell = Cell(
            batch_size, optimizer, runs[0]["spec"]["hyperparameters"]["lr"], factor, tuple(runs), damping, decay
        )
        current = best.get((batch_size, optimizer))
        if current is None or cell.sort_key() < current.sort_key():
            best[(batch_size, optimizer)] = cell
    for key, cell in best.items():
        configs = tried[key]
        edges = []
        for axis, name in ((0, "lr"), (1, "damping"), (2, "weight decay")):
            values = sorted({config[axis] for config in configs if config[axis] is not None})
            chosen = (cell.lr_factor, cell.damping, cell.weight_decay)[axis]
            at_zero = name == "weight decay" and chosen == 0  # no weight decay is a boundary, not an edge
            if len(values) > 1 and chosen in (values[0], values[-1]) and not at_zero:
                edges.append(name)
        best[key] = dataclasses.replace(cell, edges=tuple(edges), trials=len(configs))
    return best


def paired_differences(a: Cell, b: Cell, field: str) -> list[float]:
    """Per-seed ``a − b`` of ``field`` over the seeds both cells ran (paired: same seed, same data order)."""
    b_runs = {run["spec"]["seed"]: run for run in b.runs}
    return [
        run[field] - b_runs[run["spec"]["seed"]][field]
        for run in a.runs
        if run["spec"]["seed"] in b_runs and run[field] is not None and b_runs[run["spec"]["seed"]][field] is not None
    ]


def bootstrap_median_interval(
    values: Sequence[float], level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of ``values`` (resampled with replacement)."""
    import numpy as np

    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    medians = np.median(data[rng.integers(0, len(data), size=(resamples, len(data)))], axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(medians, tail)), float(np.quantile(medians, 1 - tail))


def format_paired_table(
    cells: dict[tuple[int, str], Cell],
    batch_sizes: Sequence[int],
    optimizers: Sequence[str],
    reference: str,
    metric: str,
) -> str:
    """Each optimizer against ``reference`` at every batch size, seed by seed, both at their best
    configuration: median difference of the final test metric with a 95% bootstrap interval,
    how many seeds favour it, and the median difference in epochs to target (with its interval and
    the seeds faster) where both reached it. A variant ``x:v`` is also compared with the reference's
    own variant ``reference:v`` (like against like, e.g. ``fop:paper − kfac:paper``) and with its
    base ``x`` (what the variant changes, e.g. ``fop:dirclip − fop``), where those were run."""
    measure = get_metric(metric)
    rows = []
    for batch_size in batch_sizes:
        for optimizer in optimizers:
            cell = cells.get((batch_size, optimizer))
            base, _, variant = optimizer.partition(":")
            others = dict.fromkeys([reference, f"{reference}:{variant}", base] if variant else [reference])
            for other in others:
                ref = cells.get((batch_size, other))
                if optimizer == other or cell is None or ref is None or other not in optimizers:
                    continue
                diffs = _paired_metric_differences(cell, ref, measure)
                if diffs:
                    rows.append([str(batch_size), f"{optimizer} − {other}", *_paired_cells(cell, ref, diffs, measure)])
    header = [
        "batch",
        "pair",
        "seeds",
        f"final {measure.short} {measure.difference_unit}, median [95% CI]",
        "seeds better",
        "epochs to target, median [95% CI] (seeds, faster)",
    ]
    return _markdown_table(header, rows)


def _paired_metric_differences(a: Cell, b: Cell, metric: Metric) -> list[float]:
    """Per-seed final-metric differences ``a − b`` in the reported unit (the seeds both ran)."""
    b_runs = {run["spec"]["seed"]: run for run in b.runs}
    return [
        metric.difference(run[metric.final_field], b_runs[run["spec"]["seed"]][metric.final_field])
        for run in a.runs
        if run["spec"]["seed"] in b_runs
    ]


def _paired_cells(cell: Cell, ref: Cell, diffs: list[float], metric: Metric) -> list[str]:
    """The seeds, final-metric, seeds-better and epochs cells of one row of the paired table."""
    low, high = bootstrap_median_interval(diffs)
    better = sum(metric.favours(d) for d in diffs)
    digits = 4 if metric.name == "loss" else 2
    epochs = paired_differences(cell, ref, "epochs_to_target")
    epochs_text = MISS
    if epochs:
        e_low, e_high = bootstrap_median_interval(epochs)
        faster = sum(d < 0 for d in epochs)
        epochs_text = f"{statistics.median(epochs):+g} [{e_low:+g}, {e_high:+g}] ({len(epochs)} seeds, {faster} faster)"
    return [
        str(len(diffs)),
        f"{statistics.median(diffs):+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]",
        f"{better}/{len(diffs)}",
        epochs_text,
    ]


# ----------------------------------------------------------------------------------------------
# Formatting helpers


def _seconds(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _number(value: float) -> str:
    return f"{value:g}"


def _shown(value: float, metric: str) -> str:
    """A metric value as the tables show it: percent accuracy or error, nats (and bits) of a loss."""
    return get_metric(metric).text(value)


def _range(bounds: tuple[float, float] | None, fmt: Any) -> str:
    return "" if bounds is None or bounds[0] == bounds[1] else f" [{fmt(bounds[0])}–{fmt(bounds[1])}]"


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _metric_name(metric: str) -> str:
    return get_metric(metric).title


# ----------------------------------------------------------------------------------------------
# Tables


def format_table1(
    cells: dict[tuple[int, str], Cell], batch_sizes: Sequence[int], optimizers: Sequence[str], baseline: str | None
) -> str:
    """The paper's Table 1: rows batch sizes, columns optimizers, cells ``epochs / seconds (×speedup)``.

    The speedup is the baseline's median seconds over the cell's, at the same batch size.
    """
    rows = []
    for batch_size in batch_sizes:
        reference = cells.get((batch_size, baseline)) if baseline else None
        row = [str(batch_size)]
        for optimizer in optimizers:
            cell = cells.get((batch_size, optimizer))
            if cell is None or not cell.hit:
                row.append(MISS)
                continue
            text = f"{_number(cell.epochs)} / {_seconds(cell.seconds)} s"
            if reference is not None and reference.hit and optimizer != baseline:
                text += f" (×{reference.seconds / cell.seconds:.2f})"
            row.append(text)
        rows.append(row)
    return _markdown_table(["batch", *optimizers], rows)


def format_final_table(
    cells: dict[tuple[int, str], Cell], batch_sizes: Sequence[int], optimizers: Sequence[str], metric: str
) -> str:
    """Final (and best) test metric of every cell, median over seeds."""
    rows = []
    for batch_size in batch_sizes:
        row = [str(batch_size)]
        for optimizer in optimizers:
            cell = cells.get((batch_size, optimizer))
            if cell is None:
                row.append(MISS)
                continue
            final, best = cell.metric_median("final"), cell.metric_median("best")
            bits = f" = {final / math.log(2):.3f} bits" if metric == "loss" else ""
            row.append(f"{_shown(final, metric)}{bits} ({_shown(best, metric)})")
        rows.append(row)
    return _markdown_table(["batch", *optimizers], rows)


def format_fastest_table(cells: dict[tuple[int, str], Cell], optimizers: Sequence[str], baseline: str | None) -> str:
    """Each optimizer's fastest batch size, and its speedup over the baseline's fastest."""
    fastest: dict[str, Cell] = {}
    for cell in cells.values():
        if cell.hit and (cell.optimizer not in fastest or cell.seconds < fastest[cell.optimizer].seconds):
            fastest[cell.optimizer] = cell
    reference = fastest.get(baseline) if baseline else None
    rows = []
    for optimizer in optimizers:
        best = fastest.get(optimizer)
        if best is None:
            rows.append([optimizer, MISS, MISS, MISS])
            continue
        speedup = f"×{reference.seconds / best.seconds:.2f}" if reference is not None else MISS
        rows.append([optimizer, str(best.batch_size), f"{_number(best.epochs)} / {_seconds(best.seconds)} s", speedup])
    return _markdown_table(["optimizer", "fastest batch", "epochs / seconds", f"speedup vs {baseline}'s fastest"], rows)


def format_details(
    cells: dict[tuple[int, str], Cell], batch_sizes: Sequence[int], optimizers: Sequence[str], metric: str
) -> str:
    """Per-cell detail: chosen learning rate, seeds reaching the target, spreads, cost per step."""
    rows = []
    for batch_size in batch_sizes:
        for optimizer in optimizers:
            cell = cells.get((batch_size, optimizer))
            if cell is None:
                continue
            epochs = MISS if not cell.hit else _number(cell.epochs) + _range(cell.spread("epochs_to_target"), _number)
            seconds = (
                MISS if not cell.hit else _seconds(cell.seconds) + _range(cell.spread("seconds_to_target"), _seconds)
            )
            diverged = sum(run["status"] == "diverged" for run in cell.runs)
            memory_mib = max(run["peak_memory_bytes"] for run in cell.runs) / 2**20
            tuned = f"{cell.lr:.3g} (×{cell.lr_factor:.3g})"
            if cell.damping is not None and any(name in optimizer for name in ("kfac", "fop")):
                tuned += f", λ {cell.damping:g}"
            if cell.weight_decay is not None:
                tuned += f", wd {cell.weight_decay:g}"
            tuned += f"; {cell.trials} tried" + (f"; ⚠ edge: {', '.join(cell.edges)}" if cell.edges else "")
            rows.append(
                [
                    str(batch_size),
                    optimizer,
                    tuned,
                    f"{cell.reached}/{cell.seeds}" + (f", {diverged} diverged" if diverged else ""),
                    epochs,
                    seconds,
                    _shown(cell.metric_median("best"), metric),
                    _shown(cell.metric_median("final"), metric),
                    f"{1000 * cell.median('median_step_seconds'):.1f}",
                    f"{100 * cell.median('optimizer_share'):.0f}%",
                    f"{memory_mib:.0f}",
                ]
            )
    header = [
        "batch",
        "optimizer",
        "chosen configuration (lr grid factor, damping λ, weight decay; trials; grid edge)",
        "reached",
        "epochs [min–max]",
        "seconds [min–max]",
        f"best {_column(metric)}",
        f"final {_column(metric)}",
        "step ms",
        "optimizer share",
        "peak MiB",
    ]
    return _markdown_table(header, rows)


def _column(metric: str) -> str:
    measure = get_metric(metric)
    return f"{measure.short} (nats)" if measure.name == "loss" else f"{measure.short} %"


def _clipped_text(runs: Sequence[dict[str, Any]]) -> str:
    """`` (s% clipped, b% before the target)``: the share of steps on which the trust region bound over
    the whole runs, then over the epochs until each run reached the target (runs that did; every epoch
    of a run has the same number of steps); ``""`` where no share was recorded."""
    whole = [p["clipped_fraction"] for r in runs for p in r["curve"] if p.get("clipped_fraction") is not None]
    if not whole:
        return ""
    before = [
        p["clipped_fraction"]
        for r in runs
        if r.get("epochs_to_target") is not None
        for p in r["curve"]
        if p.get("clipped_fraction") is not None and p["epoch"] <= r["epochs_to_target"]
    ]
    text = f" ({100 * statistics.fmean(whole):.0f}% clipped"
    return text + (f", {100 * statistics.fmean(before):.0f}% before the target)" if before else ")")


def format_sensitivity(
    records: Sequence[dict[str, Any]], batch_sizes: Sequence[int], optimizers: Sequence[str], metric: str
) -> str:
    """Final metric at every learning-rate factor (median over seeds, best second-axis value per
    factor), with the share of K-FAC/FOP steps on which the trust region bound: a flat row with a
    share near 100% is a learning rate that does nothing."""
    groups: dict[tuple[int, str, float], dict[Any, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        spec = record["spec"]
        hp = spec["hyperparameters"]
        second = (hp.get("damping"), hp.get("weight_decay"))
        groups[(spec["batch_size"], spec["optimizer"], spec["lr_factor"])][second].append(record)
    factors = sorted({key[2] for key in groups})
    measure = get_metric(metric)

    def final(runs: list[dict[str, Any]]) -> float:
        values = [run[measure.final_field] for run in runs]
        return math.nan if any(math.isnan(v) for v in values) else statistics.median(values)

    rows = []
    for batch_size in batch_sizes:
        for optimizer in optimizers:
            row = [str(batch_size), optimizer]
            found = False
            for factor in factors:
                by_second = groups.get((batch_size, optimizer, factor))
                if not by_second:
                    row.append(MISS)
                    continue
                found = True
                runs = min(by_second.values(), key=lambda rs: measure.rank(final(rs)))
                text = _shown(final(runs), metric)
                text += _clipped_text(runs)
                row.append(text)
            if found:
                rows.append(row)
    return _markdown_table(["batch", "optimizer", *(f"lr ×{f:.3g}" for f in factors)], rows)


def format_noise_scale(records: Sequence[dict[str, Any]], batch_sizes: Sequence[int]) -> str:
    """FOP's gradient-noise scale B_noise per batch size: first and last evaluation period (an epoch,
    unless the task evaluates several times per epoch), median over the run.

    ``inf`` means the |G|² estimate was not positive (noise dominates the gradient at that point).
    """

    def median(values: Iterable[float]) -> float | None:
        kept = [v for v in values if v is not None and not math.isnan(v)]
        return statistics.median(kept) if kept else None

    def text(value: float | None, digits: str = ".3g") -> str:
        return MISS if value is None else format(value, digits)

    rows = []
    for batch_size in batch_sizes:
        runs = [
            r for r in records if r["spec"]["batch_size"] == batch_size and any("noise_scale" in p for p in r["curve"])
        ]
        if not runs:
            continue
        first = median(r["curve"][0].get("noise_scale") for r in runs)
        last = median(r["curve"][-1].get("noise_scale") for r in runs)
        overall = median(p.get("noise_scale") for r in runs for p in r["curve"])
        ratio = None if overall is None or overall == 0 else batch_size / overall
        rows.append([str(batch_size), text(first), text(last), text(overall), text(ratio, ".2g")])
    return _markdown_table(
        ["batch", "B_noise, first period", "B_noise, last period", "B_noise, median", "batch / B_noise"], rows
    )


# ----------------------------------------------------------------------------------------------
# Environment and the full report


def environment(device: torch.device) -> dict[str, Any]:
    """Hardware and software of this process, for every report and record."""
    if device.type == "cuda":
        hardware = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(device)}"
    else:
        hardware = f"CPU {_cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return {
        "hardware": hardware,
        "device": str(device),
        "torch": torch.__version__,
        "fop": _fop_version(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _fop_version() -> str:
    import fop

    return fop.__version__


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_report(
    *,
    task: str,
    summary_line: str,
    records: Sequence[dict[str, Any]],
    batch_sizes: Sequence[int],
    optimizers: Sequence[str],
    baseline: str | None,
    metric: str,
    target: float,
    protocol: Sequence[str],
    env: dict[str, Any],
    command: str,
    dataset: dict[str, Any],
    plot_file: str | None = None,
    references: Sequence[str] = (),
) -> str:
    """The Markdown report of a sweep: header, Table 1, final metric, fastest batch, details."""
    cells = summarize(records)
    lines = [
        f"# fop-bench: {task}",
        "",
        summary_line,
        "",
        f"- command: `{command}`",
        f"- hardware: {env['hardware']}; torch {env['torch']}"
        + (f" (CUDA {env['cuda']})" if env.get("cuda") else "")
        + f", Python {env['python']}, {env['platform']}",
        f"- data: {dataset['kind']} from {dataset['source']}: "
        + (
            dataset["description"]
            if "description" in dataset
            else f"{dataset['train_size']} train / {dataset['test_size']} test images, "
            f"train class counts {dataset['train_class_counts']}"
        ),
        f"- written: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        *(f"- {item}" for item in protocol),
        "",
        *_main_sections(records, cells, batch_sizes, optimizers, baseline, metric, target),
        *_optional_sections(records, cells, batch_sizes, optimizers, metric, references),
    ]
    if plot_file:
        lines += [f"![{_metric_name(metric)} against training time]({plot_file})", ""]
    return "\n".join(lines)


def _main_sections(
    records: Sequence[dict[str, Any]],
    cells: dict,
    batch_sizes: Sequence[int],
    optimizers: Sequence[str],
    baseline: str | None,
    metric: str,
    target: float,
) -> list[str]:
    """Table 1, the final metric, the fastest batch size, the details and the learning-rate sensitivity."""
    seeds = sorted({record["spec"]["seed"] for record in records})
    grid = sorted({record["spec"]["lr_factor"] for record in records})
    max_epochs = max((record["spec"]["max_epochs"] for record in records), default=0)
    measure = get_metric(metric)
    held_out = "validation loss first falls to" if measure.name == "loss" else "test accuracy first reaches"
    steps = _steps_line(cells, batch_sizes, optimizers) if measure.name == "loss" else []
    return [
        f"## Time to {measure.target_text(target)} (Table 1 layout)",
        "",
        f"Cells: epochs / training seconds until the {held_out} the target (evaluation "
        f"not timed), median over {len(seeds)} seed(s) {seeds}, best of {len(grid)} learning rate(s) per cell "
        f"(grid factors {', '.join(f'{f:.3g}' for f in grid)}); "
        + (f"(×s): speedup in seconds over {baseline} at the same batch size; " if baseline else "")
        + f"{MISS}: not reached within {max_epochs} epochs.",
        "",
        format_table1(cells, batch_sizes, optimizers, baseline),
        "",
        *steps,
        f"## Final {_metric_name(metric)}, best in run in parentheses (median over seeds)",
        "",
        format_final_table(cells, batch_sizes, optimizers, metric),
        "",
        "## Fastest batch size per optimizer",
        "",
        format_fastest_table(cells, optimizers, baseline),
        "",
        "## Details",
        "",
        "Spreads are [min–max] over the seeds that reached the target. Step time is the median over "
        "all steps; the optimizer share is the fraction of step time spent in `optimizer.step()`. "
        "Peak memory is CUDA max allocated on GPUs and the process's resident set size on CPUs.",
        "",
        format_details(cells, batch_sizes, optimizers, metric),
        "",
        "## Learning-rate sensitivity",
        "",
        f"Final {_metric_name(metric)} at each learning-rate factor (median over seeds, at the factor's best "
        "damping or weight decay); for K-FAC/FOP, in brackets, the share of steps on which the `kl_clip` trust "
        "region bound, over the whole runs and over the epochs until the target (runs that reached it; with "
        '`trust_region="step"` such steps do not depend on the learning rate).',
        "",
        format_sensitivity(records, batch_sizes, optimizers, metric),
        "",
    ]


def _steps_line(cells: dict, batch_sizes: Sequence[int], optimizers: Sequence[str]) -> list[str]:
    """Optimizer steps to target (median over seeds), for tasks evaluated within epochs."""
    parts = []
    for batch_size in batch_sizes:
        for optimizer in optimizers:
            cell = cells.get((batch_size, optimizer))
            if cell is not None:
                steps = cell.median("steps_to_target") if all("steps_to_target" in r for r in cell.runs) else math.inf
                parts.append(f"{optimizer} at batch {batch_size}: {MISS if math.isinf(steps) else f'{steps:g}'}")
    return [f"Steps to target (median over seeds): {'; '.join(parts)}.", ""] if parts else []


def _optional_sections(
    records: Sequence[dict[str, Any]],
    cells: dict,
    batch_sizes: Sequence[int],
    optimizers: Sequence[str],
    metric: str,
    references: Sequence[str],
) -> list[str]:
    """The noise scale (FOP runs), the grid-edge note and the paired comparison, where they apply."""
    lines: list[str] = []
    seeds = {record["spec"]["seed"] for record in records}
    if any("noise_scale" in point for record in records for point in record["curve"]):
        lines += [
            "## Gradient-noise scale",
            "",
            "`B_noise = tr Σ / |G|²` estimated from FOP's two half-batch gradients (all FOP runs of the batch "
            "size, summed over layers and the steps of each evaluation period (an epoch, or a share of one for "
            "tasks evaluated within epochs), median over runs): a batch far above it is past "
            "the critical batch size.",
            "",
            format_noise_scale(records, batch_sizes),
            "",
        ]
    edge_cells = [cell for cell in cells.values() if cell.edges]
    if edge_cells:
        lines += [
            "**Grid edge:** "
            + "; ".join(f"{c.optimizer} at batch {c.batch_size} ({', '.join(c.edges)})" for c in edge_cells)
            + " chose a value on the edge of the grid tried: a wider grid may do better.",
            "",
        ]
    for reference in references:
        if len(seeds) < 2 or all(optimizer == reference for optimizer in optimizers):
            continue
        lines += [
            f"## Paired comparison against {reference}",
            "",
            "Per seed (same initialisation, data order and augmentation), each optimizer at its own best "
            "configuration; interval: 95% percentile bootstrap of the median difference. The configuration "
            "is chosen on the same seeds, so with few seeds the differences favour the optimizer whose "
            "grid was luckier; every optimizer gets the same number of trials.",
            "",
            format_paired_table(cells, batch_sizes, optimizers, reference, metric),
            "",
        ]
    return lines


def plot_curves(
    records: Sequence[dict[str, Any]],
    path: Path,
    batch_sizes: Sequence[int],
    optimizers: Sequence[str],
    target: float,
    metric: str,
    title: str,
) -> None:
    """Figure 2: test metric against training seconds, one panel per batch size.

    Each optimizer is drawn at its chosen learning rate, one line per seed.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    cells = summarize(records)
    columns = min(3, len(batch_sizes))
    rows = math.ceil(len(batch_sizes) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.8 * rows), squeeze=False)
    colors = {name: f"C{index}" for index, name in enumerate(optimizers)}
    measure = get_metric(metric)
    to_metric = measure.shown
    for axis, batch_size in zip(axes.flat, batch_sizes, strict=False):
        for optimizer in optimizers:
            cell = cells.get((batch_size, optimizer))
            if cell is None:
                continue
            for index, run in enumerate(cell.runs):
                seconds = [point["seconds"] for point in run["curve"]]
                values = [to_metric(point[measure.field]) for point in run["curve"]]
                label = f"{optimizer} (lr {cell.lr:.3g})" if index == 0 else None
                axis.plot(seconds, values, color=colors[optimizer], alpha=1.0 if index == 0 else 0.4, label=label)
        axis.axhline(to_metric(target), color="grey", linestyle="--", linewidth=1, label="target")
        if metric == "error":  # zoom on the region around the target
            axis.set_ylim(0, min(100, to_metric(target) + 30))
        elif measure.name == "loss":
            axis.set_ylim(0.8 * target, 2 * target)
        else:
            axis.set_ylim(max(0, to_metric(target) - 30), 100)
        axis.set_title(f"batch {batch_size}")
        axis.set_xlabel("training time (s)")
        axis.set_ylabel(_metric_name(metric))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    for axis in list(axes.flat)[len(batch_sizes) :]:
        axis.set_visible(False)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
