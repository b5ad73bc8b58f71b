"""Paired comparison of an image task's baselines with K-FAC and FOP, across two result folders.

``fop-bench``'s report pairs only the runs of one folder and one command. On the CIFAR point
(docs/evidence.md §11) and the long-tailed point (§15) the baselines (AdamW, Muon, SOAP, LAMB, ...) are in one folder, tuned on
seed 0 over a learning-rate grid and then run on seeds 1-4 at the chosen factor, and K-FAC and FOP
(0.3 defaults, lr ×0.3, seeds 0-4) in another. This script reads both ``runs.jsonl`` files, picks
each baseline's learning-rate factor on seed 0 (fewest epochs to the target, then the higher final
accuracy; a miss counts as never), shows the records' own metric (test accuracy, or Top-1 error for
``cifar10-lt-resnet32``), takes every seed run at that factor, and prints the report's
own paired tables (:func:`fop.bench.report.format_paired_table`: median per-seed difference with a
95% percentile-bootstrap interval) against each reference, plus the per-seed runs with the machine
each ran on. ``--replace FILE ...``: reference runs in these ``runs.jsonl`` files (e.g. a seed rerun on
the machine the baselines' seed ran on) replace the reference runs of the same optimizer and seed in a
second set of paired tables. ``--profile FILE``: a ``fop-bench --profile`` table (``profile.md``) of
the same task and batch size, from which a section gives each optimizer's training seconds to the
target at its profiled step time (median epochs × steps per epoch × ms per step; the step times of one
process, side by side, where the runs' own seconds come from shared machines). Writes the Markdown to
``BASELINES/paired.md`` (or ``--output``)::

    python benchmarks/cifar10_baselines_paired.py results/evidence/cifar10-baselines \\
        results/evidence/cifar10-halfbn --replace results/evidence/cifar10-reduce/expand-same-machine/*-runs.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from fop.bench.metrics import Metric, get_metric
from fop.bench.report import format_paired_table, summarize


def load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _rank(run: dict[str, Any]) -> tuple[float, float]:
    epochs = run["epochs_to_target"]
    return (math.inf if epochs is None else epochs, -run["final_accuracy"])


def chosen_factors(records: list[dict[str, Any]], selection_seed: int) -> dict[str, float]:
    """Per optimizer: the learning-rate factor of its best run on ``selection_seed``."""
    best: dict[str, dict[str, Any]] = {}
    for run in records:
        spec = run["spec"]
        if spec["seed"] != selection_seed:
            continue
        current = best.get(spec["optimizer"])
        if current is None or _rank(run) < _rank(current):
            best[spec["optimizer"]] = run
    return {name: run["spec"]["lr_factor"] for name, run in best.items()}


def _machine(run: dict[str, Any]) -> str:
    hardware = run["environment"]["hardware"]
    return "AMD EPYC" if "AMD" in hardware else "Intel Xeon" if "Intel" in hardware else hardware


def _epochs(value: float | None) -> str:
    return "—" if value is None else f"{value:g}"


def profiled_step_ms(path: Path, batch_size: int) -> tuple[str, dict[str, tuple[float, float, float]]]:
    """The heading of the step-time ratio (``× sgd``) and, per optimizer, (ms per step, that ratio,
    ms in forward and backward) at ``batch_size``, from a ``fop-bench --profile`` Markdown table."""
    steps: dict[str, tuple[float, float, float]] = {}
    columns: list[str] = []
    ratio_column = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[:2] == ["batch", "optimizer"]:
            columns = cells
            # the first "× <baseline>" column is the step-time ratio (the second is memory's)
            ratio_column = next(i for i, c in enumerate(columns) if c.startswith("× "))
        elif columns and len(cells) == len(columns) and cells[0] == str(batch_size):
            ms, forward_backward = (float(cells[columns.index(name)]) for name in ("ms/step", "fwd+bwd ms"))
            steps[cells[columns.index("optimizer")]] = (ms, float(cells[ratio_column]), forward_backward)
    if not steps:
        raise SystemExit(f"{path}: no profile rows at batch {batch_size}")
    return columns[ratio_column], steps


def _seconds_section(
    by_name: dict[str, list[dict[str, Any]]], batch_size: int, target: float, profile: Path
) -> list[str]:
    ratio_heading, step_ms = profiled_step_ms(profile, batch_size)
    # the profile's first line: "<task> step profile: <hardware>; torch ...; command: ..."
    hardware = profile.read_text(encoding="utf-8").split("\n", 1)[0].partition(": ")[2].partition("; command")[0]
    rows = []
    for name, runs in by_name.items():
        if name not in step_ms:
            raise SystemExit(f"{profile}: no profile row for {name} at batch {batch_size}")
        ms, ratio, forward_backward = step_ms[name]
        (steps_per_epoch,) = {r["steps_per_epoch"] for r in runs}
        epochs = statistics.median(_rank(r)[0] for r in runs)
        seconds = epochs * steps_per_epoch * ms / 1000
        rows.append((seconds, name, ms, ratio, forward_backward, steps_per_epoch, epochs))
    lines = [
        "",
        f"## Training seconds to {target:.0%} at the profiled step time, fastest first",
        "",
        f"Median epochs to the target × steps per epoch × ms per step of `{profile}` ({hardware}; every "
        "optimizer in one process, side by side). A median that is a miss has no time. The forward and backward "
        "pass is the same work for every optimizer: its spread is the measurement's noise.",
        "",
        f"| optimizer | ms/step | {ratio_heading} | fwd+bwd ms | steps per epoch | epochs, median | seconds to target |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for seconds, name, ms, ratio, forward_backward, steps_per_epoch, epochs in sorted(rows):
        time_text = "—" if math.isinf(seconds) else f"{seconds:.1f}"
        epochs_text = "—" if math.isinf(epochs) else f"{epochs:g}"
        lines.append(
            f"| {name} | {ms:.1f} | {ratio:.2f} | {forward_backward:.0f} | {steps_per_epoch} | {epochs_text} "
            f"| {time_text} |"
        )
    return lines


def _paired_sections(
    records: list[dict[str, Any]],
    batch_size: int,
    names: list[str],
    reference_names: list[str],
    title: str,
    metric: Metric,
) -> list[str]:
    cells = summarize(records)
    lines: list[str] = []
    for reference in reference_names:
        lines += [
            "",
            f"## {title} {reference}",
            "",
            "Per seed, both at their chosen configuration: median difference (row optimizer − reference) with "
            "its 95% percentile-bootstrap interval (10,000 resamples), seeds in the row's favour; epochs over "
            "the seeds on which both reached the target (a miss is left out, not counted as slower).",
            "",
            format_paired_table(cells, [batch_size], names, reference, metric.name),
        ]
    return lines


def report(
    baselines: Path,
    references: Path,
    reference_names: list[str],
    selection_seed: int,
    replacements: list[Path],
    profile: Path | None = None,
) -> str:
    base_records = load(baselines / "runs.jsonl")
    ref_records = [r for r in load(references / "runs.jsonl") if r["spec"]["optimizer"] in reference_names]
    factors = chosen_factors(base_records, selection_seed)
    chosen = [r for r in base_records if r["spec"]["lr_factor"] == factors[r["spec"]["optimizer"]]]
    records = chosen + ref_records
    (batch_size,) = {r["spec"]["batch_size"] for r in records}
    target = records[0]["spec"]["target"]
    metric = get_metric(records[0].get("metric", "accuracy"))
    shown = metric.title.removesuffix(" (%)")  # "test accuracy", "Top-1 error"
    by_name: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in records:
        by_name[run["spec"]["optimizer"]].append(run)

    def order(name: str) -> tuple[float, float]:
        runs = by_name[name]
        epochs = statistics.median(_rank(r)[0] for r in runs)
        return (epochs, -statistics.median(r["final_accuracy"] for r in runs))

    names = sorted(by_name, key=order)
    lines = [
        f"# Baselines against {', '.join(reference_names)} (paired by seed)",
        "",
        f"Made by `python benchmarks/cifar10_baselines_paired.py {baselines} {references}"
        f"{' --replace ' + ' '.join(str(p) for p in replacements) if replacements else ''}"
        f"{f' --profile {profile}' if profile else ''}` from the "
        f"`runs.jsonl` files. Each baseline's learning-rate factor is chosen on seed {selection_seed} (fewest "
        f"epochs to {target:.0%} test accuracy, then higher final accuracy); every seed run at that factor is used. "
        f"{', '.join(reference_names)}: every run of `{references.name}` under that name.",
        "",
        f"## Per optimizer (batch {batch_size}), fastest median first",
        "",
        f"| optimizer | lr factor | lr | seeds | reached {target:.0%} | epochs, median [min–max] "
        f"| final {shown} %, median [min–max] | machines |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in names:
        runs = sorted(by_name[name], key=lambda r: r["spec"]["seed"])
        hits = [r["epochs_to_target"] for r in runs if r["epochs_to_target"] is not None]
        finals = sorted(metric.shown(r["final_accuracy"]) for r in runs)
        median_epochs = statistics.median(_rank(r)[0] for r in runs)
        spread = f" [{min(hits)}–{max(hits)}]" if hits else ""
        machines = ", ".join(sorted({_machine(r) for r in runs}))
        lines.append(
            f"| {name} | ×{runs[0]['spec']['lr_factor']:g} | {runs[0]['spec']['hyperparameters']['lr']:.3g} "
            f"| {', '.join(str(r['spec']['seed']) for r in runs)} | {len(hits)}/{len(runs)} "
            f"| {'—' if math.isinf(median_epochs) else f'{median_epochs:g}'}{spread} "
            f"| {statistics.median(finals):.2f} [{finals[0]:.2f}–{finals[-1]:.2f}] | {machines} |"
        )
    if profile is not None:
        lines += _seconds_section(by_name, batch_size, target, profile)
    seeds = sorted({r["spec"]["seed"] for r in records})
    lines += [
        "",
        f"## Per seed: epochs to {target:.0%} test accuracy / final {shown} % (machine)",
        "",
        "| optimizer | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "| --- |" + " --- |" * len(seeds),
    ]
    for name in names:
        runs = {r["spec"]["seed"]: r for r in by_name[name]}
        row = []
        for seed in seeds:
            run = runs.get(seed)
            row.append(
                "not run"
                if run is None
                else f"{_epochs(run['epochs_to_target'])} / {metric.text(run['final_accuracy'])} ({_machine(run)})"
            )
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines += _paired_sections(records, batch_size, names, reference_names, "Paired comparison against", metric)
    if replacements:
        swaps = [r for path in replacements for r in load(path) if r["spec"]["optimizer"] in reference_names]
        swapped = {(r["spec"]["optimizer"], r["spec"]["seed"]) for r in swaps}
        kept = [r for r in records if (r["spec"]["optimizer"], r["spec"]["seed"]) not in swapped]
        described = "; ".join(
            f"{r['spec']['optimizer']} seed {r['spec']['seed']}: {_epochs(r['epochs_to_target'])} / "
            f"{metric.text(r['final_accuracy'])} ({_machine(r)})"
            for r in swaps
        )
        lines += [
            "",
            f"Below, these reference runs replace those of the same optimizer and seed: {described} "
            f"(from {', '.join(str(p) for p in replacements)}).",
        ]
        lines += _paired_sections(
            kept + swaps, batch_size, names, reference_names, "With the replaced runs, against", metric
        )
    lines += [
        "",
        f"## Seed {selection_seed} at every learning rate tried",
        "",
        f"| optimizer | lr factor | epochs to {target:.0%} | final {shown} % | machine |",
        "| --- | --- | --- | --- | --- |",
    ]
    for run in sorted(
        (r for r in base_records if r["spec"]["seed"] == selection_seed),
        key=lambda r: (r["spec"]["optimizer"], r["spec"]["lr_factor"]),
    ):
        mark = " ✓" if run["spec"]["lr_factor"] == factors[run["spec"]["optimizer"]] else ""
        lines.append(
            f"| {run['spec']['optimizer']} | ×{run['spec']['lr_factor']:.3g}{mark} | {_epochs(run['epochs_to_target'])} "
            f"| {metric.text(run['final_accuracy'])} | {_machine(run)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baselines", type=Path, help="folder whose runs.jsonl holds the baselines")
    parser.add_argument("references", type=Path, help="folder whose runs.jsonl holds the references")
    parser.add_argument("--references", dest="names", default="kfac,fop", help="reference optimizers (kfac,fop)")
    parser.add_argument("--selection-seed", type=int, default=0, help="seed the learning rate is chosen on (0)")
    parser.add_argument(
        "--replace", type=Path, nargs="*", default=[], help="runs.jsonl files of reference runs to swap in"
    )
    parser.add_argument("--profile", type=Path, help="fop-bench --profile table of the same task and batch size")
    parser.add_argument("--output", type=Path, help="where to write the Markdown (BASELINES/paired.md)")
    args = parser.parse_args(argv)
    names = args.names.split(",")
    text = report(args.baselines, args.references, names, args.selection_seed, args.replace, args.profile)
    (args.output or args.baselines / "paired.md").write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
