"""The recipes under ``examples/`` run as a user runs them, a few steps each, and train with curvature.

Lightning in one process and with ``strategy="ddp"`` (two gloo processes started by Lightning
itself), and the Hugging Face ``Trainer`` on a tiny GPT-2: each must give Kronecker curvature to
its attention, convolution and embedding layers (their diagnostics exist) and lower the loss.
The packages come from the ``recipes`` extra (``make install-test`` installs it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import mean

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, timeout: float = 420) -> dict:
    """Run ``examples/<name>`` in a fresh interpreter; its last stdout line is a JSON report."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{name} {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_loss_falls(losses: list[float], factor: float) -> None:
    first, last = mean(losses[:3]), mean(losses[-3:])
    assert last < factor * first, f"loss did not fall: {losses}"


LIGHTNING_LAYERS = {"emb", "conv", "encoder.self_attn.in_proj", "encoder.self_attn.out_proj", "encoder.linear1", "head"}


def test_lightning_single_process() -> None:
    report = run_example("lightning_recipe.py", "--steps", "12")
    assert report["communicator"] == "LocalCommunicator"
    assert LIGHTNING_LAYERS <= set(report["curvature_layers"])
    assert len(report["losses"]) == 12
    assert_loss_falls(report["losses"], 0.6)


def test_lightning_ddp_strategy_with_the_dual_gradient_hook() -> None:
    """Two processes: the hook took over DDP's all-reduce, parameters agree, curvature everywhere."""
    report = run_example("lightning_recipe.py", "--steps", "12", "--devices", "2", "--strategy", "ddp")
    assert report["communicator"] == "DDPCommunicator"
    assert len(report["checksums"]) == 2 and report["checksums"][0] == report["checksums"][1]
    assert LIGHTNING_LAYERS <= set(report["curvature_layers"])
    assert_loss_falls(report["losses"], 0.6)


def test_hugging_face_trainer_on_a_tiny_gpt2() -> None:
    report = run_example("hf_trainer_recipe.py", "--steps", "12")
    layers = set(report["curvature_layers"])
    for block in (0, 1):
        assert {f"transformer.h.{block}.attn.c_attn", f"transformer.h.{block}.mlp.c_fc"} <= layers
    assert "transformer.wpe" in layers  # the position embedding: diagonal input factor
    assert len(report["losses"]) == 12
    assert_loss_falls(report["losses"], 0.9)
