"""``benchmarks/paired_folders.py``: arms from several folders, paired by seed, through the real script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paired_folders.py"


def _write(folder: Path, optimizer: str, factor: float, finals: dict[int, float], steps: int | None = 10) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "runs.jsonl").open("a", encoding="utf-8") as out:
        for seed, final in finals.items():
            spec = {"optimizer": optimizer, "lr_factor": factor, "seed": seed}
            out.write(json.dumps({"spec": spec, "final_val_loss": final, "steps_to_target": steps}) + "\n")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False)


def test_pairs_arms_of_two_folders_by_seed(tmp_path):
    _write(tmp_path / "a", "kfac:fl8e-3", 0.5, {0: 2.0, 1: 2.1, 2: 2.2})
    _write(tmp_path / "a", "kfac:fl8e-3", 1.0, {0: 9.0, 1: 9.0, 2: 9.0})  # another factor: not this arm
    _write(tmp_path / "b", "adamw", 2.0, {0: 2.5, 1: 2.4, 2: 2.3, 3: 2.0}, steps=None)  # seed 3 has no partner
    done = _run(
        "--arm", f"K-FAC={tmp_path}/a:kfac:fl8e-3@0.5",
        "--arm", f"AdamW={tmp_path}/b:adamw@2",
        "--pair", "K-FAC-AdamW",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = {line.split(" | ")[0]: line for line in done.stdout.splitlines() if line.startswith("| ")}
    assert "| 2.0000 / 10 | 2.1000 / 10 | 2.2000 / 10 | — | 2.1000 |" in rows["| K-FAC"]
    # differences -0.5, -0.3, -0.1: median -0.3, every paired seed lower; no seed reaches the target in both
    assert (
        rows["| K-FAC − AdamW"].startswith("| K-FAC − AdamW | 3 | -0.300 [") and "3/3 | — |" in rows["| K-FAC − AdamW"]
    )


@pytest.mark.parametrize(
    ("arm", "message"),
    [
        ("K-FAC=nowhere-without-colon@0.5", "write LABEL=FOLDER:OPTIMIZER@FACTOR"),
        ("K-FAC={a}:fop@0.5", "no runs of fop"),
    ],
)
def test_bad_arms_say_what_to_write(tmp_path, arm, message):
    _write(tmp_path / "a", "kfac", 0.5, {0: 2.0})
    done = _run("--arm", arm.replace("{a}", str(tmp_path / "a")))
    assert done.returncode != 0 and message in done.stderr
