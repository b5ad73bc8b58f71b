"""``benchmarks/cifar10_baselines_paired.py``: the committed ``paired.md`` files are what the real script
makes from the committed ``runs.jsonl`` files, for an accuracy task and for a Top-1-error task."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "cifar10_baselines_paired.py"
EVIDENCE = "results/evidence"

CASES = {
    "cifar10-baselines": [
        f"{EVIDENCE}/cifar10-baselines",
        f"{EVIDENCE}/cifar10-halfbn",
        "--replace",
        f"{EVIDENCE}/cifar10-reduce/expand-same-machine/kfac-runs.jsonl",
        f"{EVIDENCE}/cifar10-reduce/expand-same-machine/fop-runs.jsonl",
    ],
}


@pytest.mark.parametrize("folder", sorted(CASES))
def test_committed_paired_tables_are_regenerated_exactly(tmp_path, folder):
    output = tmp_path / "paired.md"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *CASES[folder], "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert output.read_text(encoding="utf-8") == (ROOT / EVIDENCE / folder / "paired.md").read_text(encoding="utf-8")
