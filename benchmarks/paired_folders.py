"""Runs of a loss-metric task from several ``fop-bench`` folders, paired by seed.

``fop-bench``'s report pairs the runs of one folder. When the arms of a comparison live in several
folders (made by different library versions, or with ``--tied-head``, which applies to a whole
command), this reads each arm's ``runs.jsonl``, takes the runs of one optimizer at one learning-rate
factor, and prints per seed the final validation loss and the steps to the task's target, then for
each pair of arms the median paired difference with its 95% percentile-bootstrap interval
(:func:`fop.bench.report.bootstrap_median_interval`, the report's own) and the seeds where the first
arm is lower. An arm is ``LABEL=FOLDER:OPTIMIZER@FACTOR``; a pair is ``LABEL-LABEL``::

    python benchmarks/paired_folders.py \\
        --arm "tied K-FAC, curvature=b64tied/kfac-curv:kfac@0.5" \\
        --arm "tied K-FAC, fallback=b64tied/kfac-fallback:kfac@0.5" \\
        --pair "tied K-FAC, curvature-tied K-FAC, fallback"
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from fop.bench.report import bootstrap_median_interval


def arm_runs(spec: str) -> tuple[str, dict[int, dict[str, Any]]]:
    """``LABEL=FOLDER:OPTIMIZER@FACTOR`` -> (label, {seed: record})."""
    label, _, rest = spec.partition("=")
    where, _, factor = rest.rpartition("@")
    colon = where.find(":", where.rfind("/") + 1)  # the folder's last part has no colon; the optimizer may
    folder, optimizer = (where[:colon], where[colon + 1 :]) if colon > 0 else ("", "")
    if not (label and folder and optimizer and factor):
        raise SystemExit(f"arm {spec!r}: write LABEL=FOLDER:OPTIMIZER@FACTOR")
    runs: dict[int, dict[str, Any]] = {}
    for line in (Path(folder) / "runs.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            run = json.loads(line)
            spec_ = run["spec"]
            if spec_["optimizer"] == optimizer and spec_["lr_factor"] == float(factor):
                runs[spec_["seed"]] = run
    if not runs:
        raise SystemExit(f"arm {label!r}: no runs of {optimizer} at factor {factor} in {folder}")
    return label, runs


def interval_text(values: list[float], digits: int) -> str:
    lo, hi = bootstrap_median_interval(values)
    return f"{statistics.median(values):+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arm", action="append", required=True, help="LABEL=FOLDER:OPTIMIZER@FACTOR")
    parser.add_argument("--pair", action="append", default=[], help="LABEL-LABEL: first minus second")
    parser.add_argument("--title", default="Paired runs")
    args = parser.parse_args()
    arms = dict(arm_runs(spec) for spec in args.arm)
    seeds = sorted({seed for runs in arms.values() for seed in runs})
    print(f"# {args.title}\n\nFinal validation loss (nats) / steps to the target, per seed:\n")
    print("| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | median final |")
    print("| --- |" + " --- |" * (len(seeds) + 1))
    for label, runs in arms.items():
        cells = [f"{runs[s]['final_val_loss']:.4f} / {runs[s]['steps_to_target']}" if s in runs else "—" for s in seeds]
        median = statistics.median(run["final_val_loss"] for run in runs.values())
        print(f"| {label} | " + " | ".join(cells) + f" | {median:.4f} |")
    print("\nFirst − second, median over the paired seeds [95% bootstrap interval], seeds where the first is lower:\n")
    print("| pair | seeds | final loss, nats | steps to target (seeds reaching it in both) |")
    print("| --- | --- | --- | --- |")
    for pair in args.pair:
        first, second = next((pair[:i], pair[i + 1 :]) for i in range(len(pair)) if pair[i] == "-" and pair[:i] in arms)
        a, b = arms[first], arms[second]
        paired = [s for s in seeds if s in a and s in b]
        loss = [a[s]["final_val_loss"] - b[s]["final_val_loss"] for s in paired]
        steps = [
            a[s]["steps_to_target"] - b[s]["steps_to_target"]
            for s in paired
            if a[s]["steps_to_target"] is not None and b[s]["steps_to_target"] is not None
        ]
        step_text = f"{interval_text(steps, 0)} ({len(steps)})" if steps else "—"
        lower = sum(d < 0 for d in loss)
        print(f"| {first} − {second} | {len(paired)} | {interval_text(loss, 3)}, {lower}/{len(paired)} | {step_text} |")


if __name__ == "__main__":
    main()
