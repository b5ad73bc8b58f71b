"""End-to-end tests of ``fop-bench`` through its real entry point, at tiny sizes on the CPU.

``charlm-linux`` reads ``../shared/data/linux-kernel-char/`` or ``$FOP_LINUX_KERNEL_CHAR``. The
CIFAR tasks read a subset of the JPEG pack at ``../shared/data/cifar10_jpeg.npz`` relative to
the repository root, or the file named by ``$FOP_CIFAR10`` (see ``tests/_data.py``). Without their
data these tests fail in CI (``CI`` set to true) and are skipped elsewhere.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from _data import CHAR_CORPUS_ENV_VAR, ENV_VAR, require_char_corpus, require_pack
from fop.bench.cli import main
from fop.bench.data import load_cifar10, long_tail_counts

REPO = Path(__file__).resolve().parents[1]
OPTIMIZERS = ["sgd", "adamw", "kfac", "fop"]
CELL = re.compile(r"^(—|[\d.]+ / [\d.]+ s( \(×[\d.]+\))?)$")


def _jpeg_pack() -> Path:
    return require_pack()  # fails in CI without the pack, skips elsewhere


def _tiny(out: Path, *extra: str) -> list[str]:
    """Arguments of a tiny sweep: 1 seed, 1 learning rate, all four optimizers, no progress bars."""
    return ["--out", str(out), "--seeds", "0", "--lr-grid", "1", "--threads", "1", "--no-progress", *extra]


def _records(out: Path) -> list[dict]:
    records = []
    for line in (out / "runs.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a partial line of a killed sweep
    return records


def _table1(markdown: str) -> dict[str, dict[str, str]]:
    """The Table-1 section of a report, parsed back: {batch: {optimizer: cell}}."""
    section = markdown.split("(Table 1 layout)", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    table = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        table[cells[0]] = dict(zip(header[1:], cells[1:], strict=True))
    return table


def _check_outputs(out: Path, batch_sizes: list[int], optimizers: list[str], seeds: int = 1) -> list[dict]:
    records = _records(out)
    assert len(records) == len(batch_sizes) * len(optimizers) * seeds
    for record in records:
        assert record["curve"] and record["median_step_seconds"] > 0 and 0 <= record["optimizer_share"] <= 1
        assert record["peak_memory_bytes"] > 0 and record["environment"]["torch"]
        assert record["command"].startswith("fop-bench ")
    report = (out / "results.md").read_text()
    assert "- command: `fop-bench " in report and "- hardware: " in report and "torch " in report
    table = _table1(report)
    assert list(table) == [str(b) for b in batch_sizes]
    for row in table.values():
        assert list(row) == optimizers
        assert all(CELL.match(cell) for cell in row.values()), row
    with Image.open(out / "accuracy_vs_time.png") as image:
        assert image.format == "PNG" and image.size[0] > 100
    return records


def test_digits_sweep_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "digits"
    argv = _tiny(out, "--batch-sizes", "256,1437", "--max-epochs", "4", "--width", "32", "--target", "20")
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "| batch | sgd | adamw | kfac | fop |" in printed.out
    records = _check_outputs(out, [256, 1437], OPTIMIZERS)
    assert {r["spec"]["micro_batch"] for r in records} == {256, 1437}
    assert any(r["epochs_to_target"] is not None for r in records)  # 20% is reached within 4 epochs
    fop_record = next(r for r in records if r["spec"]["optimizer"] == "fop")
    assert "beta_median" in fop_record["curve"][-1] and fop_record["skipped_steps"] == 0

    # The same command again: everything is finished, nothing is retrained.
    assert main(argv) == 0
    assert "resuming: 8 of 8 runs already finished" in capsys.readouterr().err
    assert len(_records(out)) == 8

    # A sweep killed in its third run, in the middle of writing a line, resumes from there.
    lines = (out / "runs.jsonl").read_text().splitlines()
    (out / "runs.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])
    assert main(argv) == 0
    assert "resuming: 2 of 8 runs already finished" in capsys.readouterr().err
    _check_outputs(out, [256, 1437], OPTIMIZERS)


def test_micro_batches_accumulate(tmp_path):
    out = tmp_path / "micro"
    assert (
        main(
            _tiny(
                out,
                "--batch-sizes",
                "512",
                "--micro-batch",
                "128",
                "--max-epochs",
                "1",
                "--width",
                "16",
                "--optimizers",
                "sgd,fop",
            )
        )
        == 0
    )
    records = _check_outputs(out, [512], ["sgd", "fop"])
    assert {r["spec"]["micro_batch"] for r in records} == {128}


def test_cifar_jpeg_pack_subset_is_decoded():
    dataset = load_cifar10(_jpeg_pack(), subset=50)
    assert dataset.kind == "cifar10-jpeg" and dataset.train_images.shape == (50, 32, 32, 3)
    assert dataset.class_counts("train") == [5] * 10 and dataset.class_counts("test") == [5] * 10
    assert 60 < float(dataset.train_images.float().mean()) < 180


@pytest.mark.parametrize(
    ("task", "extra"),
    [
        ("cifar10-resnet18", ["--width", "4"]),
        ("cifar10-vit", ["--width", "16"]),
        ("cifar10-lt-resnet32", ["--width", "4", "--imbalance", "10"]),
    ],
)
def test_cifar_tasks_end_to_end(tmp_path, task, extra):
    out = tmp_path / task
    argv = [
        "--task",
        task,
        "--data",
        str(_jpeg_pack()),
        "--subset",
        "100",
        "--batch-sizes",
        "32",
        "--max-epochs",
        "1",
        "--target",
        "0.15",
        *extra,
    ]
    assert main(_tiny(out, *argv)) == 0
    records = _check_outputs(out, [32], OPTIMIZERS)
    dataset = records[0]["dataset"]
    if task == "cifar10-lt-resnet32":
        assert dataset["train_class_counts"] == long_tail_counts(10, 10, 10)  # 10 per class before the tail
        assert dataset["test_class_counts"] == [10] * 10 and dataset["imbalance"] == 10
        assert "Top-1 error" in (out / "results.md").read_text()
    else:
        assert dataset["train_class_counts"] == [10] * 10


def test_python_dash_m_entry_point(tmp_path):
    out = tmp_path / "module"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    command = [
        sys.executable,
        "-m",
        "fop.bench",
        *_tiny(
            out,
            "--subset",
            "200",
            "--batch-sizes",
            "100",
            "--max-epochs",
            "2",
            "--width",
            "16",
            "--optimizers",
            "sgd,fop",
        ),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| batch | sgd | fop |" in result.stdout
    _check_outputs(out, [100], ["sgd", "fop"])

    bad = subprocess.run(
        [sys.executable, "-m", "fop.bench", "--task", "nope"], capture_output=True, text=True, env=env, timeout=120
    )
    assert bad.returncode == 2 and bad.stderr.strip().startswith("fop-bench: error: unknown task 'nope'")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "nope"], "unknown task 'nope'"),
        (["--optimizers", "sgd,nope"], "unknown optimizer 'nope'"),
        (["--batch-sizes", "5000"], "batch size 5000 is larger than the training set (1437 images)"),
        (["--batch-sizes", "256", "--micro-batch", "100"], "--micro-batch 100 does not divide batch size 256"),
        (["--batch-sizes", "2k"], "'2k' is not a comma-separated list of positive integers"),
        (["--imbalance", "10"], "--imbalance does not apply to task digits-mlp"),
        (["--baseline", "lamb"], "--baseline lamb is not among the optimizers run"),
        (["--target", "250"], "is not an accuracy"),
        (["--task", "cifar10-resnet18", "--data", "/nonexistent/cifar.npz"], "CIFAR-10 data not found"),
        (["--task", "cifar10-resnet18"], "needs --data PATH"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fop-bench: error: ") and message in err, err


def test_corrupt_data_file_exits_2(tmp_path, capsys):
    corrupt = tmp_path / "cifar10_jpeg.npz"
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    assert main(["--task", "cifar10-resnet18", "--data", str(corrupt), "--out", str(tmp_path)]) == 2
    assert "corrupt data file" in capsys.readouterr().err


def test_profile_reports_step_time_memory_and_phases(tmp_path, capsys):
    out = tmp_path / "profile"
    argv = _tiny(out, "--batch-sizes", "256", "--width", "16", "--optimizers", "sgd,kfac,fop,fop:exact", "--profile")
    assert main([*argv, "--profile-steps", "4", "--curvature-interval", "2"]) == 0
    table = (out / "profile.md").read_text()
    assert table.strip() in capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| 256 |")]
    assert [cells[1].strip() for cells in rows] == ["sgd", "kfac", "fop", "fop:exact"]
    for cells in rows:
        values = [float(cell) for cell in cells[2:]]
        assert values[0] == 2 and values[1] > 0 and values[3] > 0  # interval, ms/step, peak MB
    sgd, kfac, fop_row, exact = ([float(c) for c in cells[7:]] for cells in rows)
    assert sum(sgd[1:]) == 0  # no curvature phases for SGD
    # columns after fwd+bwd: capture, factors, eigh, cholesky, direction, update
    assert fop_row[1] > 0 and fop_row[4] > 0 and fop_row[5] > 0  # capture, Cholesky (factored: the default)
    assert fop_row[3] == 0  # no eigendecompositions under factored damping
    assert exact[3] > 0 and exact[4] == 0  # exact damping: eigendecompositions, no Cholesky
    assert kfac[1] > 0 and kfac[4] > 0


def test_tuning_protocol_second_axis_edge_extension_and_paired_report(tmp_path, capsys):
    """lr x damping (K-FAC/FOP) against lr x weight decay (SGD): equal trials; a best learning rate on
    the edge of a two-point grid is always extended once; the report pairs the seeds against K-FAC."""
    out = tmp_path / "tuned"
    argv = [
        "--out",
        str(out),
        "--seeds",
        "0,1",
        "--lr-grid",
        "1,2",
        "--threads",
        "1",
        "--no-progress",
        "--batch-sizes",
        "1437",
        "--max-epochs",
        "2",
        "--width",
        "16",
        "--target",
        "20",
        "--optimizers",
        "sgd,kfac,fop:mc",
        "--damping-grid",
        "0.1,1",
        "--wd-grid",
        "0,1e-3",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr()
    records = _records(out)
    base = 3 * 2 * 2 * 2  # optimizers x lr x second axis x seeds
    hp = [r["spec"]["hyperparameters"] for r in records]
    extended = [r for r in records if r["spec"]["lr_factor"] not in (1.0, 2.0)]
    damping_ext = [r for r, h in zip(records, hp) if r["spec"]["optimizer"] != "sgd" and h["damping"] not in (0.1, 1.0)]
    decay_ext = [
        r for r, h in zip(records, hp) if r["spec"]["optimizer"] == "sgd" and h["weight_decay"] not in (0, 1e-3)
    ]
    # one more lr factor per cell, with every value of the second axis and every seed
    assert len(extended) == 3 * 2 * 2 and {r["spec"]["lr_factor"] for r in extended} <= {0.5, 4.0}
    # a two-point damping grid always has its best on an edge: one more damping at the chosen lr, every seed
    assert len(damping_ext) == 2 * 2
    assert {r["spec"]["hyperparameters"]["damping"] for r in damping_ext} <= {0.01, 10.0}
    assert len(decay_ext) in (0, 2) and all(r["spec"]["hyperparameters"]["weight_decay"] == 1e-2 for r in decay_ext)
    assert len(records) == base + len(extended) + len(damping_ext) + len(decay_ext)
    assert "more runs beyond the edges of the grid" in printed.err
    dampings = {(r["spec"]["optimizer"], r["spec"]["hyperparameters"]["damping"]) for r in records}
    assert {("kfac", 0.1), ("kfac", 1.0), ("fop:mc", 0.1), ("fop:mc", 1.0)} <= dampings
    assert {r["spec"]["hyperparameters"]["weight_decay"] for r in records if r["spec"]["optimizer"] == "sgd"} == {
        0,
        1e-3,
    }
    mc = next(r for r in records if r["spec"]["optimizer"] == "fop:mc")
    assert dict(map(tuple, mc["spec"]["hyperparameters"]["options"])) == {"fisher": "mc"}
    assert {"clipped_fraction", "nu_median", "noise_scale"} <= set(mc["curve"][-1])
    report = (out / "results.md").read_text()
    assert "## Paired comparison against kfac" in report and "| 1437 | fop:mc − kfac | 2 |" in report
    assert "paired per-seed comparison against kfac" in printed.out


def test_unequal_tuning_budgets_are_refused(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--optimizers", "sgd,fop", "--damping-grid", "0.1,1", "--no-progress"]
    assert main(argv) == 2
    assert "unequal tuning budgets" in capsys.readouterr().err


def test_nproc_scaling_run_on_two_gloo_processes(tmp_path, capsys):
    """``--nproc 2``: the task's model, the sweep's training step, one and two real (gloo) processes."""
    out = tmp_path / "scaling"
    argv = _tiny(
        out,
        "--nproc",
        "2",
        "--optimizers",
        "fop,kfac:replicated",
        "--batch-sizes",
        "64",
        "--width",
        "16",
        "--subset",
        "200",
        "--curvature-interval",
        "2",
        "--profile-steps",
        "2",
        "--device",
        "cpu",
    )
    assert main(argv) == 0
    table = (out / "scaling.md").read_text()
    assert table.strip() in capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in table.splitlines() if " b=64 |" in line]
    assert [(cells[0].strip(), cells[1].strip(), cells[2].strip()) for cells in rows] == [
        ("fop b=64", "1", "64"),
        ("kfac:replicated b=64", "1", "64"),
        ("fop b=64", "2", "32"),
        ("kfac:replicated b=64", "2", "32"),
    ]
    results = json.loads((out / "scaling.json").read_text())
    one, two = results["1"]["runs"], results["2"]["runs"]
    assert results["2"]["threads"] == results["1"]["threads"] == 1
    specialists, replicated = two["fop b=64"], two["kfac:replicated b=64"]
    assert specialists["step_seconds"] > 0 and specialists["optimizer_seconds"] > 0
    assert set(specialists["assignment"].values()) == {0, 1}  # the MLP's three layers on both ranks
    assert specialists["bytes_plain"]["reduce"] > 0 and specialists["bytes_plain"]["calls"] == 5
    assert replicated["bytes_plain"]["calls"] == 1 and set(replicated["assignment"].values()) == {0}
    # layer specialists shard the curvature; a replicated optimizer holds all of it on every process
    assert max(specialists["state_bytes_all"]) < one["fop b=64"]["state_bytes_all"][0]
    assert replicated["state_bytes_all"] == [one["kfac:replicated b=64"]["state_bytes_all"][0]] * 2


# ----------------------------------------------------------------------------------------------
# charlm-linux: the character-level GPT, scored by validation loss (lower is better)


def _char_corpus() -> Path:
    return require_char_corpus()  # fails in CI without the corpus, skips elsewhere


def test_charlm_sweep_reports_validation_loss_and_time_to_target(tmp_path, capsys):
    """A tiny GPT on the first 20,000 characters of each split: the loss metric from the run to the report.

    Target 4.0 nats is below what AdamW reaches in these 9 steps (about 4.4) and above what FOP
    reaches (about 3.6): one run hits it, one misses, and the hit is the first evaluation at or
    below the target.
    """
    out = tmp_path / "charlm"
    argv = _tiny(
        out,
        "--task",
        "charlm-linux",
        "--data",
        str(_char_corpus()),
        "--subset",
        "20000",
        "--width",
        "32",
        "--layers",
        "1",
        "--batch-sizes",
        "16",
        "--max-epochs",
        "1",
        "--target",
        "4.0",
        "--optimizers",
        "adamw,fop",
    )
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "epochs / seconds to validation loss 4 nats" in printed.out
    records = _records(out)
    assert {r["spec"]["optimizer"] for r in records} == {"adamw", "fop"} and len(records) == 2
    for record in records:
        assert record["metric"] == "loss" and record["spec"]["layers"] == 1 and record["spec"]["width"] == 32
        dataset = record["dataset"]
        assert dataset["vocab_size"] == 98 and dataset["context"] == 128  # 97 characters + the unknown id
        assert dataset["train_size"] == (20000 - 1) // 128 and dataset["test_size"] == (20000 - 1) // 128
        curve = record["curve"]
        # 156 windows / 16 = 9 steps, evaluated 8 times, after round(9 k / 8) steps
        assert [p["epoch"] for p in curve] == [k / 8 for k in range(1, 8)] + [1]
        assert [p["step"] for p in curve] == [1, 2, 3, 4, 6, 7, 8, 9]
        for point in curve:
            assert 0 < point["val_loss"] < math.log(98) + 0.5
            assert point["val_bits"] == pytest.approx(point["val_loss"] / math.log(2))
        assert record["final_val_loss"] == curve[-1]["val_loss"]
        assert record["best_val_loss"] == min(p["val_loss"] for p in curve)
        hit = next((p for p in curve if p["val_loss"] <= 4.0), None)
        if hit is None:
            assert record["epochs_to_target"] is None and record["steps_to_target"] is None
        else:
            assert (record["epochs_to_target"], record["steps_to_target"]) == (hit["epoch"], hit["step"])
            assert record["seconds_to_target"] == hit["seconds"]
    by_name = {r["spec"]["optimizer"]: r for r in records}
    assert by_name["adamw"]["epochs_to_target"] is None and by_name["fop"]["epochs_to_target"] is not None
    assert "noise_scale" in by_name["fop"]["curve"][-1]

    report = (out / "results.md").read_text()
    assert "## Time to validation loss 4 nats" in report and "Steps to target" in report
    assert "98 token ids" in report and "windows of 128" in report
    table = _table1(report)
    assert table["16"]["adamw"] == "—" and CELL.match(table["16"]["fop"])
    assert "## Final validation loss (nats per token)" in report and " bits (" in report
    with Image.open(out / "val_loss_vs_time.png") as image:
        assert image.format == "PNG"

    # Resuming reads the loss records back as valid (their metric's fields, not an accuracy's).
    assert main(argv) == 0
    assert "resuming: 2 of 2 runs already finished" in capsys.readouterr().err


def test_charlm_data_from_the_environment_variable(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.txt").write_text("int main(void) { return 0; }\n" * 40)
    (folder / "valid.txt").write_text("int f(void) { return 1; }\n" * 40 + "é")  # 'é', '1', 'f' unseen in train
    monkeypatch.setenv(CHAR_CORPUS_ENV_VAR, str(folder))
    out = tmp_path / "run"
    argv = _tiny(out, "--task", "charlm-linux", "--width", "16", "--layers", "1", "--batch-sizes", "4")
    assert main([*argv, "--max-epochs", "1", "--optimizers", "adamw", "--target", "1"]) == 0
    dataset = _records(out)[0]["dataset"]
    assert dataset["source"] == str(folder) and dataset["vocab_size"] == len(set("int main(void) { return 0; }\n")) + 1
    assert dataset["unknown_valid_tokens"] == 40 * 2 + 1  # 'f' and '1' on each line, and the 'é'


@pytest.mark.parametrize(
    ("files", "argv", "message"),
    [
        (None, [], "task charlm-linux needs --data PATH (the linux-kernel-char folder"),
        (None, ["--data", "/nonexistent/linux-kernel-char"], "character corpus not found: /nonexistent"),
        ({"train.txt": "abc" * 100}, ["--data", "{folder}"], "is not a character corpus folder: missing valid.txt"),
        ({"train.txt": "ab\x00c" * 100, "valid.txt": "abc" * 100}, ["--data", "{folder}"], "is not a text file"),
        ({"train.txt": "abc" * 20, "valid.txt": "abc" * 100}, ["--data", "{folder}"], "fewer than one window of 128"),
        ({"train.txt": "a" * 500, "valid.txt": "abc" * 100}, ["--data", "{folder}"], "1 distinct characters"),
        (None, ["--data", "{folder}/train.txt"], "is a file: give the folder"),
        (None, ["--task", "digits-mlp", "--layers", "2"], "--layers does not apply to task digits-mlp"),
        (None, ["--task", "digits-mlp", "--tied-head"], "--tied-head does not apply to task digits-mlp"),
    ],
)
def test_charlm_bad_data_exits_2_with_one_clear_line(files, argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(CHAR_CORPUS_ENV_VAR, raising=False)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, text in (files or {"train.txt": "abc" * 100}).items():
        (folder / name).write_text(text)
    argv = [arg.replace("{folder}", str(folder)) for arg in argv]
    task = [] if "--task" in argv else ["--task", "charlm-linux"]
    assert main([*task, *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fop-bench: error: ") and message in err, err


def _toy_charlm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, list[str]]:
    """A two-line C corpus named by the environment variable, its output folder, and a tiny GPT's argv."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.txt").write_text("int main(void) { return 0; }\n" * 40)
    (folder / "valid.txt").write_text("int f(void) { return 0; }\n" * 40)
    monkeypatch.setenv(CHAR_CORPUS_ENV_VAR, str(folder))
    out = tmp_path / "run"
    return folder, out, _tiny(out, "--task", "charlm-linux", "--width", "16", "--layers", "1", "--batch-sizes", "4")


def test_tied_head_shares_the_weight_and_is_its_own_run(tmp_path, capsys, monkeypatch):
    """``--tied-head``: the head's weight is the token embedding's, the record says so, and the
    untied run of the same configuration stays a separate run with the key it had before."""
    from fop.bench.data import load_char_corpus
    from fop.bench.optimizers import Hyperparameters, resolve_optimizer
    from fop.bench.runner import RunSpec, build_model_and_optimizer
    from fop.bench.tasks import get_task

    folder, out, argv = _toy_charlm(tmp_path, monkeypatch)
    argv = [*argv, "--max-epochs", "1", "--target", "1", "--optimizers", "adamw,kfac", "--lr-grid", "1"]
    assert main(argv) == 0
    untied = {r["key"]: r for r in _records(out)}
    assert all("tied_head" not in r["spec"] for r in untied.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # K-FAC: the tied pair is one layer (the head's factors)
        assert main([*argv, "--tied-head"]) == 0
    records = _records(out)
    tied = [r for r in records if r["key"] not in untied]
    assert len(records) == 4 and len(tied) == 2 and all(r["spec"]["tied_head"] is True for r in tied)
    capsys.readouterr()
    assert main([*argv, "--tied-head"]) == 0  # resumes both kinds
    assert "resuming: 2 of 2 runs already finished" in capsys.readouterr().err

    kfac = next(r for r in tied if r["spec"]["optimizer"] == "kfac")
    fields = dict(kfac["spec"])
    hp = fields.pop("hyperparameters")
    hp["options"] = tuple(tuple(option) for option in hp["options"])
    run = RunSpec(**fields, hyperparameters=Hyperparameters(**hp))
    task, dataset = get_task("charlm-linux"), load_char_corpus(folder, 128)
    model, optimizer = build_model_and_optimizer(run, task, dataset, torch.device("cpu"), resolve_optimizer("kfac"))
    assert model.head.weight is model.token_embed.weight
    rules = {g["rule"]: g["params"] for g in optimizer.param_groups}
    # the shared weight: one Kronecker layer, the head's (fop.layers.TiedHeadLayer), not the AdamW fallback
    assert sum(p is model.head.weight for p in rules["kronecker"]) == 1
    assert not any(p is model.head.weight for p in rules["adamw"])
    assert [layer.name for layer in optimizer.layers if layer.weight is model.head.weight] == ["head"]


def test_lr_factor_pins_one_factor_per_optimizer_and_fallback_variants(tmp_path, capsys, monkeypatch):
    """``--lr-factor``: each named optimizer at its one factor (the seeds at chosen configurations);
    ``kfac:fbsgd`` / ``kfac:fl4e-3``: the fallback rule and a fixed fallback learning rate."""
    folder, out, argv = _toy_charlm(tmp_path, monkeypatch)
    argv = [*argv, "--max-epochs", "1", "--target", "1", "--extend-edges", "1", "--lr-grid", "1,2"]
    optimizers = ["--optimizers", "adamw,kfac:fbsgd,kfac:fl4e-3", "--lr-factor", "adamw=2,kfac:fbsgd=0.5"]
    assert main([*argv, *optimizers]) == 0
    got = sorted(
        (r["spec"]["optimizer"], r["spec"]["lr_factor"], r["spec"]["hyperparameters"]["fallback"])
        + (r["spec"]["hyperparameters"]["fallback_lr"],)
        for r in _records(out)
    )
    # adamw: the task's fallback fields (the library's default; unused by AdamW, part of the run's key)
    assert got[:2] == [("adamw", 2.0, "auto", None), ("kfac:fbsgd", 0.5, "sgd", None)]
    assert [g[:3] for g in got[2:]] == [("kfac:fl4e-3", f, "auto") for f in sorted(g[1] for g in got[2:])]
    assert {g[3] for g in got[2:]} == {4e-3} and {1.0, 2.0} <= {g[1] for g in got[2:]}  # grid, maybe extended
    capsys.readouterr()
    assert main([*argv, "--optimizers", "adamw", "--lr-factor", "fop=1"]) == 2
    assert "--lr-factor names optimizers not in --optimizers: fop" in capsys.readouterr().err
