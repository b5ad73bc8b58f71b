"""Steps, epochs and seconds each run of a loss-metric sweep needs to reach a reference run's final loss.

Reads ``DIR/runs.jsonl`` of a ``fop-bench`` sweep on a task scored by validation loss (for example
``charlm-linux``). The level is the lowest final validation loss of ``--reference`` (default
``adamw``) over its learning rates (median over seeds, per batch size): the best the reference did
in the budget. (The report's own choice, the shortest time to the task's target in seconds, can
pick another learning rate on a shared machine, where seconds are noisy.) For every run of the
folder: the first evaluation at or below the level (evaluations are untimed; seconds are training
seconds), its final loss and its median step time; ✓ marks the configuration of each optimizer
with the lowest final loss.
Prints a Markdown table and writes it to ``DIR/steps_to_<reference>.md``::

    python benchmarks/steps_to_reference_loss.py results/charlm-linux-cpu
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any


def load(folder: Path) -> list[dict[str, Any]]:
    records = []
    for line in (folder / "runs.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


def first_at_or_below(curve: list[dict[str, Any]], level: float) -> dict[str, Any] | None:
    return next((point for point in curve if point["val_loss"] <= level), None)


def best_final(records: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Per optimizer: (learning-rate factor, median final loss over seeds) of its lowest final loss."""
    by_config: dict[tuple[str, float], list[float]] = {}
    for run in records:
        key = (run["spec"]["optimizer"], run["spec"]["lr_factor"])
        by_config.setdefault(key, []).append(run["final_val_loss"])
    best: dict[str, tuple[float, float]] = {}
    for (optimizer, factor), losses in by_config.items():
        loss = statistics.median(losses)
        if math.isfinite(loss) and (optimizer not in best or loss < best[optimizer][1]):
            best[optimizer] = (factor, loss)
    return best


def table(records: list[dict[str, Any]], reference: str) -> str:
    lines = []
    for batch_size in sorted({r["spec"]["batch_size"] for r in records}):
        runs = [r for r in records if r["spec"]["batch_size"] == batch_size]
        best = best_final(runs)
        if reference not in best:
            raise SystemExit(f"no finite {reference} runs at batch {batch_size} in this folder")
        factor, level = best[reference]
        lines += [
            f"Batch {batch_size}: level = {reference}'s lowest final validation loss, at lr factor ×{factor:g} "
            f"(median over seeds): {level:.4f} nats ({level / math.log(2):.3f} bits) per character.",
            "",
            "| optimizer | lr (×factor) | seed | lowest final | steps to level | epochs | training s to level | "
            "final val loss | training s total | median step ms |",
            "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        runs.sort(key=lambda r: (r["spec"]["optimizer"], r["spec"]["lr_factor"], r["spec"]["seed"]))
        for run in runs:
            spec = run["spec"]
            chosen = "✓" if spec["lr_factor"] == best[spec["optimizer"]][0] else ""
            hit = first_at_or_below(run["curve"], level)
            lines.append(
                f"| {spec['optimizer']} | {spec['hyperparameters']['lr']:.3g} (×{spec['lr_factor']:g}) | "
                f"{spec['seed']} | {chosen} | "
                + (f"{hit['step']} | {hit['epoch']:g} | {hit['seconds']:.1f}" if hit else "— | — | —")
                + f" | {run['final_val_loss']:.4f} | {run['train_seconds']:.1f} | "
                f"{1000 * run['median_step_seconds']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="output folder of a fop-bench sweep (holds runs.jsonl)")
    parser.add_argument("--reference", default="adamw", help="optimizer whose final loss is the level")
    args = parser.parse_args(argv)
    records = load(args.folder)
    if not records or "final_val_loss" not in records[0]:
        raise SystemExit(f"{args.folder}/runs.jsonl holds no validation-loss runs")
    text = table(records, args.reference)
    (args.folder / f"steps_to_{args.reference}.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
