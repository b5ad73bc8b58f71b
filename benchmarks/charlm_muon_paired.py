"""Muon against AdamW, K-FAC and FOP on ``charlm-linux`` at batch 64, paired by seed, across two folders.

Muon's runs (``results/evidence/charlm-b64-muon``: a learning-rate grid on seed 0, then seeds 1-4 at
the chosen factor) and the others' (``results/evidence/charlm-b64-seeds``) are in two folders, which
``fop-bench``'s report does not pair. This reads both ``runs.jsonl`` files, takes Muon at ``--factor``
and every other optimizer named, and prints per seed the final validation loss and the steps to the
task's 2.60 target, with the median paired difference Muon − other and its 95% percentile-bootstrap
interval (:func:`fop.bench.report.bootstrap_median_interval`, the report's own)::

    python benchmarks/charlm_muon_paired.py results/evidence/charlm-b64-muon \\
        results/evidence/charlm-b64-seeds --factor 16 > results/evidence/charlm-b64-muon/paired.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from fop.bench.report import bootstrap_median_interval

OTHERS = ("adamw", "kfac:fl8e-3", "fop:fl8e-3")


def runs_by_seed(folder: Path, optimizer: str, factor: float | None = None) -> dict[int, dict[str, Any]]:
    found: dict[int, dict[str, Any]] = {}
    for line in (folder / "runs.jsonl").read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        run = json.loads(line)
        spec = run["spec"]
        if spec["optimizer"] == optimizer and spec["batch_size"] == 64:
            if factor is None or spec["lr_factor"] == factor:
                found[spec["seed"]] = run
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("muon", type=Path)
    parser.add_argument("others", type=Path)
    parser.add_argument("--factor", type=float, required=True, help="Muon's chosen learning-rate factor")
    args = parser.parse_args()
    muon = runs_by_seed(args.muon, "muon", args.factor)
    seeds = sorted(muon)
    print(f"# charlm-linux, batch 64: Muon (×{args.factor:g}) against AdamW, K-FAC and FOP, paired by seed\n")
    print("Final validation loss (nats) / steps to 2.60, per seed:\n")
    print("| optimizer | " + " | ".join(f"seed {s}" for s in seeds) + " | median final |")
    print("| --- |" + " --- |" * (len(seeds) + 1))
    table = {"muon": muon} | {name: runs_by_seed(args.others, name) for name in OTHERS}
    for name, runs in table.items():
        cells = [f"{runs[s]['final_val_loss']:.4f} / {runs[s]['steps_to_target']}" if s in runs else "—" for s in seeds]
        finals = [runs[s]["final_val_loss"] for s in seeds if s in runs]
        print(f"| {name} | " + " | ".join(cells) + f" | {statistics.median(finals):.4f} |")
    print("\nMuon − other, median over the paired seeds [95% bootstrap interval], seeds where Muon is lower:\n")
    print("| pair | seeds | final loss, nats | steps to 2.60 |")
    print("| --- | --- | --- | --- |")
    for name in OTHERS:
        other = table[name]
        paired = [s for s in seeds if s in other]
        loss = [muon[s]["final_val_loss"] - other[s]["final_val_loss"] for s in paired]
        steps = [
            muon[s]["steps_to_target"] - other[s]["steps_to_target"]
            for s in paired
            if muon[s]["steps_to_target"] is not None and other[s]["steps_to_target"] is not None
        ]
        lo, hi = bootstrap_median_interval(loss)
        lower = sum(d < 0 for d in loss)
        step_text = "—"
        if steps:
            s_lo, s_hi = bootstrap_median_interval(steps)
            step_text = f"{statistics.median(steps):+g} [{s_lo:+g}, {s_hi:+g}] ({len(steps)} seeds)"
        print(
            f"| muon − {name} | {len(paired)} | {statistics.median(loss):+.3f} [{lo:+.3f}, {hi:+.3f}], "
            f"{lower}/{len(paired)} | {step_text} |"
        )


if __name__ == "__main__":
    main()
