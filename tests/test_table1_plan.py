"""The Table-1 plan and its runner (``benchmarks/table1.py``, issue #19 B), on the CPU.

One real dry run goes through ``benchmarks/gpu_session.sh`` (stage 5, one toy cell of the committed
plan, a temporary output folder); the runner's bookkeeping (resume, a killed cell, a skipped optimizer,
the out-of-memory rerun, cells that fit the time, derived cells) is tested with a stand-in for the
interpreter that writes what fop-bench would, so no training is needed there. Nothing is written into
``results/``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _data import cifar10_path, missing_reason

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "table1.py"
PLAN = REPO / "results" / "gpu" / "table1" / "plan.json"


def _module():
    spec = importlib.util.spec_from_file_location("table1", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


table1 = _module()

# What the stand-in interpreter does, by $FAKE_MODE: ok (writes one record), hang (a partial line, then
# sleeps until killed), oom (fails like a CUDA out-of-memory error when the micro-batch is the batch).
FAKE = """#!{python}
import json, os, sys, time
args = sys.argv[3:]
value = lambda name: args[args.index(name) + 1] if name in args else None
out = value("--out")
os.makedirs(out, exist_ok=True)
mode = os.environ.get("FAKE_MODE", "ok")
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(" ".join(args) + "\\n")
if mode == "hang":
    with open(os.path.join(out, "runs.jsonl"), "w") as f:
        f.write('{{"key": "partial", "spec"')
        f.flush()
    print("training", flush=True)
    time.sleep(120)
    sys.exit(0)
if mode == "oom" and value("--micro-batch") == value("--batch-sizes"):
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB", flush=True)
    sys.exit(1)
batch = int(value("--batch-sizes"))
micro = int(value("--micro-batch") or batch)
factor, seed, epochs = float(value("--lr-grid")), int(value("--seeds")), int(value("--max-epochs"))
accuracy = float(os.environ.get("FAKE_ACCURACY", "0.5"))
reached = accuracy >= 0.88
record = {{
    "key": "k", "status": "ok", "train_seconds": 10.0 * epochs, "epochs_run": epochs, "steps_per_epoch": 50000 // batch,
    "epochs_to_target": 3 if reached else None, "seconds_to_target": 30.0 if reached else None,
    "best_accuracy": accuracy, "final_accuracy": accuracy, "environment": {{"hardware": "1 x Fake GPU", "fop": "9.9"}},
    "command": "fop-bench " + " ".join(args),
    "curve": [{{"epoch": 1, "seconds": 10.0, "accuracy": accuracy}}],
    "spec": {{"optimizer": value("--optimizers"), "batch_size": batch, "micro_batch": micro, "lr_factor": factor,
              "seed": seed, "max_epochs": epochs, "library": "9.9", "hyperparameters": {{"lr": factor}}}},
}}
with open(os.path.join(out, "runs.jsonl"), "a") as f:
    f.write(json.dumps(record) + "\\n")
"""


def _cell(batch: int, optimizer: str, factor: float, estimate: float = 10.0, grid=None) -> dict:
    grid = grid or [factor]
    return {
        "id": table1.cell_id(batch, optimizer, factor, 0),
        "tier": 1,
        "batch": batch,
        "micro_batch": batch,
        "optimizer": optimizer,
        "lr_factor": factor,
        "lr_grid": grid,
        "seed": 0,
        "epochs": 5,
        "estimate_s": estimate,
    }


def _plan(tmp_path: Path, cells: list[dict]) -> Path:
    plan = json.loads(PLAN.read_text())
    plan["cells"] = cells
    path = tmp_path / "plan" / "plan.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan))
    return path


def _fake(tmp_path: Path) -> Path:
    path = tmp_path / "fake-python"
    path.write_text(FAKE.format(python=sys.executable))
    path.chmod(0o755)
    return path


def _run(tmp_path: Path, plan: Path, seconds: float = 120, mode: str = "ok", **env: str):
    command = [sys.executable, str(SCRIPT), "run", "--plan", str(plan), "--out", str(tmp_path / "out")]
    command += ["--data", "unused.npz", "--seconds", str(seconds), "--python", str(_fake(tmp_path))]
    environment = {**os.environ, "FAKE_MODE": mode, "FAKE_LOG": str(tmp_path / "fake.log"), **env}
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=120)


def _records(out: Path) -> list[dict]:
    records = []
    for line in (out / "runs.jsonl").read_text().splitlines() if (out / "runs.jsonl").exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut off by a kill
    return records


def test_committed_plan_is_what_the_generator_writes():
    """plan.json is generated from the committed H200 records and the paper's table, not edited by hand."""
    if not table1.PAPER_DOC.is_file():
        pytest.skip(f"{table1.PAPER_DOC} (the paper's Table 1) is not beside the repository")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "plan", "--check"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    plan = json.loads(PLAN.read_text())
    cells = plan["cells"]
    assert len({c["id"] for c in cells}) == len(cells)
    # the order: K-FAC/FOP at 32768, 50000, 16384, then 4096, 8192, then the baselines at 4096 and 16384
    assert [c["batch"] for c in cells[:6]] == [32768, 32768, 50000, 50000, 16384, 16384]
    assert {c["batch"] for c in cells if c["tier"] == 2} == {4096, 8192}
    assert {(c["batch"], c["optimizer"]) for c in cells if c["tier"] == 3} == {
        (b, o) for b in (4096, 16384) for o in ("adamw", "muon", "sgd")
    }
    for cell in cells:
        assert len(cell["lr_grid"]) == 3 and cell["lr_factor"] in cell["lr_grid"]
        assert cell["batch"] % cell["micro_batch"] == 0 and cell["micro_batch"] <= plan["micro_batch_limit"]
        assert cell["estimate_s"] <= table1.SESSION_SECONDS  # every cell fits one session
    assert plan["paper"]["rows"]["32768"]["kfac"] is None and plan["paper"]["rows"]["50000"]["fop"] == [82, 84]


def test_gpu_session_stage5_dry_run_and_resume(tmp_path):
    """The real script on the CPU: one toy cell of the committed plan trained, recorded, reported; then resumed."""
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "session"
    env = {**os.environ, "STAGES": "5", "TABLE1_TOY": "1", "PYTHON": sys.executable}
    env["FOP_CACHE_DIR"] = str(tmp_path / "cache")
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_session.sh"), str(out), "150", str(cifar10_path())],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    log = (out / "session.log").read_text()
    assert "stage5-table1: rc=0" in log, result.stdout + result.stderr
    first = json.loads(PLAN.read_text())["cells"][0]
    [record] = _records(out / "table1")
    assert record["cell"] == "toy-" + first["id"] and record["spec"]["optimizer"] == first["optimizer"]
    assert record["spec"]["batch_size"] == record["spec"]["micro_batch"] == 64 and record["spec"]["max_epochs"] == 1
    assert record["library_version"] and record["git_commit"] and record["hardware"].startswith("CPU")
    assert record["exact_command"].startswith("PYTHONPATH=src python3 -m fop.bench ")
    assert record["curve"] and record["key"] and record["command"].startswith("fop-bench ")
    readme = (out / "table1" / "README.md").read_text()
    assert "## Results (the table as it stands)" in readme and "| 64 | 1 |" in readme
    assert "(paper)" in readme and record["exact_command"] in readme

    # resumed: the finished cell is not run again
    again = subprocess.run(
        [sys.executable, str(SCRIPT), "run", "--data", str(cifar10_path()), "--seconds", "60", "--device", "cpu"]
        + ["--toy", "1", "--out", str(out / "table1")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    assert "start" not in again.stdout and "1 cells finished" in again.stdout
    assert len(_records(out / "table1")) == 1


def test_killed_cell_is_not_recorded_and_runs_again(tmp_path):
    plan = _plan(tmp_path, [_cell(4096, "sgd", 0.1)])
    command = [sys.executable, str(SCRIPT), "run", "--plan", str(plan), "--out", str(tmp_path / "out")]
    command += ["--data", "unused.npz", "--seconds", "100", "--python", str(_fake(tmp_path))]
    env = {**os.environ, "FAKE_MODE": "hang", "FAKE_LOG": str(tmp_path / "fake.log")}
    runner = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 60
    while not (tmp_path / "fake.log").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    runner.send_signal(signal.SIGINT)  # what gpu_session.sh's time limit sends
    output, _ = runner.communicate(timeout=30)
    assert runner.returncode == 130, output
    assert "interrupted" in output
    assert _records(tmp_path / "out") == []  # the partial cell left nothing
    assert "| 4096 | 5 | not run |" in (tmp_path / "out" / "README.md").read_text()

    with open(tmp_path / "out" / "runs.jsonl", "a") as runs:
        runs.write('{"cell": "b4096-sgd-lr0.1-s0", "spec"')  # a record cut off by a kill while appending
    result = _run(tmp_path, plan)
    assert result.returncode == 0, result.stdout + result.stderr
    [record] = _records(tmp_path / "out")  # on its own line after the cut-off one
    assert record["cell"] == "b4096-sgd-lr0.1-s0" and record["hardware"] == "1 x Fake GPU"
    result = _run(tmp_path, plan)
    assert "start" not in result.stdout and len(_records(tmp_path / "out")) == 1


def test_unknown_optimizer_skipped_cells_that_fit_and_oom_rerun(tmp_path):
    cells = [
        _cell(4096, "nosuchopt", 1.0),
        _cell(8192, "kfac", 0.1, estimate=10_000),  # never fits 60 s
        _cell(16384, "sgd", 0.1),
    ]
    cells[2]["micro_batch"] = 16384
    result = _run(tmp_path, _plan(tmp_path, cells), seconds=60, mode="oom")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "b4096-nosuchopt-lr1-s0: skipped: fop-bench cannot run optimizer 'nosuchopt'" in result.stdout
    assert "the next that fits is b16384-sgd-lr0.1-s0" in result.stdout
    assert "CUDA out of memory" in result.stdout and "rerun (micro-batch 8192)" in result.stdout
    [record] = _records(tmp_path / "out")
    assert record["cell"] == "b16384-sgd-lr0.1-s0" and record["spec"]["micro_batch"] == 8192
    assert "--micro-batch 16384" in (tmp_path / "fake.log").read_text()  # the plan's, given explicitly
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "b8192-kfac-lr0.1-s0" in readme.split("## Pending cells")[1]


def _record(batch: int, optimizer: str, factor: float, seed: int, seconds: float | None, accuracy: float) -> dict:
    return {
        "cell": table1.cell_id(batch, optimizer, factor, seed),
        "spec": {"batch_size": batch, "optimizer": optimizer, "lr_factor": factor, "seed": seed},
        "seconds_to_target": seconds,
        "epochs_to_target": None if seconds is None else 10,
        "best_accuracy": accuracy,
    }


def test_derived_cells_extend_grid_edges_and_add_paired_seeds():
    grid = [0.01, 0.03, 0.1]
    cells = [_cell(32768, name, f, grid=grid) for name in ("kfac", "fop") for f in grid]
    plan = {"cells": cells, "extend_rounds": 2, "paired_seeds": [1, 2], "paired_within": 0.1}
    done = {}
    for name, times in (("kfac", (None, 100.0, 120.0)), ("fop", (None, 105.0, 150.0))):
        for factor, seconds in zip(grid, times, strict=True):
            record = _record(32768, name, factor, 0, seconds, 0.9 if seconds else 0.8)
            done[record["cell"]] = record
    # interior bests 100 s and 105 s (within 10%): seeds 1 and 2 for both at factor 0.03
    extra = table1.derived_cells(plan, done)
    assert sorted(c["id"] for c in extra) == sorted(
        table1.cell_id(32768, name, 0.03, seed) for name in ("kfac", "fop") for seed in (1, 2)
    )
    # FOP's best at the upper edge: one factor beyond it, no paired seeds until that is settled
    done[table1.cell_id(32768, "fop", 0.1, 0)]["seconds_to_target"] = 50.0
    extra = table1.derived_cells(plan, done)
    assert [c["id"] for c in extra] == [table1.cell_id(32768, "fop", 0.333, 0)]
    assert extra[0]["derived"].startswith("grid edge")
    record = _record(32768, "fop", 0.333, 0, 40.0, 0.9)
    done[record["cell"]] = record
    extra = [c["id"] for c in table1.derived_cells(plan, done) if c["id"] not in done]
    assert extra == [table1.cell_id(32768, "fop", 1.11, 0)]  # the second and last round
    record = _record(32768, "fop", 1.11, 0, 30.0, 0.9)
    done[record["cell"]] = record
    # still at the edge after 2 rounds (settled, reported as such) and 30 s is not within 10% of K-FAC's 100 s
    assert [c["id"] for c in table1.derived_cells(plan, done) if c["id"] not in done] == []


def test_compressed_pack_holds_the_same_arrays(tmp_path):
    import numpy as np

    header = bytes(range(200)) * 3  # what every JPEG of the pack repeats
    jpegs = np.frombuffer(b"".join(header + bytes([i]) * 50 for i in range(100)), dtype=np.uint8)
    arrays = {"train_jpeg": jpegs, "train_offsets": np.arange(0, 65100, 651), "classes": np.array(["a", "b"])}
    np.savez(tmp_path / "pack.npz", **arrays)
    table1.compress_pack(tmp_path / "pack.npz", tmp_path / "out" / "pack.npz")
    with np.load(tmp_path / "out" / "pack.npz") as packed:
        assert all(np.array_equal(packed[key], value) for key, value in arrays.items())
    assert (tmp_path / "out" / "pack.npz").stat().st_size < (tmp_path / "pack.npz").stat().st_size / 3
