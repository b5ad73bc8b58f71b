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
        "--profile",
        f"{EVIDENCE}/cifar10-baselines/profile.md",
    ],
    "cifar10-lt-baselines": [
        f"{EVIDENCE}/cifar10-lt-baselines",
        f"{EVIDENCE}/cifar10-lt-medium",
        "--profile",
        f"{EVIDENCE}/cifar10-lt-baselines/profile.md",
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


PROFILE_HEAD = (
    "cifar10-resnet18 step profile: CPU Test, 2 cores, 1 torch threads; torch 2.13.0+cpu; command: fop-bench\n\n"
    "| batch | optimizer | interval | ms/step | × sgd | peak MB | × sgd | fwd+bwd ms |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
)


def _paired_with_profile(tmp_path: Path, rows: dict[str, float]) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / "profile.md"
    body = "".join(f"| 1000 | {name} | 13 | {ms} | {ms / 1000:.2f} | 900 | 9.99 | 800 |\n" for name, ms in rows.items())
    profile.write_text(PROFILE_HEAD + "| 4000 | kfac | 13 | 1.0 | 0.01 | 1 | 0.01 | 1 |\n" + body, encoding="utf-8")
    return subprocess.run(
        [sys.executable, str(SCRIPT), *CASES["cifar10-baselines"][:2], "--profile", str(profile)]
        + ["--output", str(tmp_path / "paired.md")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


def test_seconds_to_target_are_median_epochs_times_steps_times_profiled_step(tmp_path):
    names = ["sgd", "adamw", "muon", "soap", "lamb", "kfac", "fop"]
    done = _paired_with_profile(tmp_path, {name: 1000.0 + 100 * i for i, name in enumerate(names)})
    assert done.returncode == 0, done.stderr
    section = done.stdout.split("## Training seconds to 45%")[1].split("\n## ")[0]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in section.splitlines() if line.startswith("| ")}
    # K-FAC: median 11 epochs of 5 steps at 1500 ms (the batch-4000 row and the memory ratio are not read)
    assert rows["kfac"] == "| kfac | 1500.0 | 1.50 | 800 | 5 | 11 | 82.5 |"
    assert rows["fop"] == "| fop | 1600.0 | 1.60 | 800 | 5 | 12 | 96.0 |"
    ordered = [line.split(" | ")[-1].rstrip(" |") for line in section.splitlines() if line.startswith("| ")][2:]
    assert ordered == sorted(ordered, key=float)  # fastest first


def test_an_optimizer_missing_from_the_profile_is_named(tmp_path):
    done = _paired_with_profile(tmp_path, {"sgd": 1000.0, "kfac": 1500.0})
    assert done.returncode != 0 and "no profile row for" in done.stderr
