"""The recipes under ``examples/`` run as a user runs them, a few steps each, and train with curvature.

Lightning in one process and with ``strategy="ddp"`` (two gloo processes started by Lightning
itself), the Hugging Face ``Trainer`` on a tiny GPT-2 in one process and under ``torchrun``
(two gloo processes), and torchvision's own ``resnet18`` and ``VisionTransformer`` in a plain loop:
each must give Kronecker curvature to its attention, convolution and embedding layers (their
diagnostics exist) and lower the loss; the two-process Trainer must also train exactly as one
process does.
The packages come from the ``recipes`` extra and the Makefile (``make install-test`` installs them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import mean

import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, processes: int = 0, timeout: float = 420, path: Path | None = None) -> dict:
    """Run ``examples/<name>`` in a fresh interpreter; its last stdout line is a JSON report.

    ``processes``: start that many under torchrun (``python -m torch.distributed.run``, gloo on the CPU).
    ``path``: a folder put first on the interpreter's ``PYTHONPATH``.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path), env.get("PYTHONPATH")]))
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] if processes else []
    proc = subprocess.run(
        [sys.executable, *launcher, str(EXAMPLES / name), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
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


def assert_gpt2_curvature(report: dict) -> None:
    layers = set(report["curvature_layers"])
    for block in (0, 1):
        assert {f"transformer.h.{block}.attn.c_attn", f"transformer.h.{block}.mlp.c_fc"} <= layers
    assert "transformer.wpe" in layers  # the position embedding: diagonal input factor


def test_hugging_face_trainer_on_a_tiny_gpt2() -> None:
    report = run_example("hf_trainer_recipe.py", "--steps", "12")
    assert report["communicator"] == "LocalCommunicator"
    assert_gpt2_curvature(report)
    assert len(report["losses"]) == 12
    assert_loss_falls(report["losses"], 0.9)


def test_hugging_face_trainer_under_torchrun_trains_as_one_process() -> None:
    """Two gloo processes: the Trainer's own DDP wrapper gets dual_gradient_hook, the halves are the ranks.

    The global batch (16 sequences, in order) is rank 0's 8 then rank 1's 8, so the even / odd
    halves are one process's in-batch halves: in float64 both runs must end with the same
    parameters, through the Trainer's clipping and the AdamW fallback of the tied embedding. A
    gradient reduced twice, or halves taken locally, would not (nor would DDP without the hook:
    each process's optimizer would step on its own halves).
    """
    one = run_example("hf_trainer_recipe.py", "--dtype", "float64")
    two = run_example("hf_trainer_recipe.py", "--dtype", "float64", processes=2)
    assert one["world_size"] == 1 and two["world_size"] == 2
    # the process group existed when FOP(model) was built: fop's own communicator, replaced by the hook's
    assert two["communicator_at_construction"] == "DistributedCommunicator"
    assert two["communicator"] == "DDPCommunicator"
    # the last step's traffic: DDP's buckets once, in two slots, plus the factors (nothing else reduced)
    predicted = two["predicted_bytes"]
    assert two["hook_bytes"] == {
        "hook_all_reduce": 2 * predicted["ddp_all_reduce"],
        "all_reduce": predicted["all_reduce"],
    }
    assert two["checksums"][0] == two["checksums"][1]  # DDP keeps the processes identical
    torch.testing.assert_close(two["checksums"][0], one["checksums"][0], rtol=1e-10, atol=1e-12)
    # the Trainer accumulates the logged loss in float32
    torch.testing.assert_close(two["losses"], one["losses"], rtol=1e-6, atol=0)
    assert_gpt2_curvature(two)
    assert len(two["losses"]) == 12
    assert_loss_falls(two["losses"], 0.9)


def torchvision_folder() -> Path | None:
    """Where torchvision is: None if this interpreter imports it, else the folder ``make install-test`` fills.

    Its only build for torch 2.13 is a CUDA one that breaks other packages' imports of it on a CPU
    torch, so the Makefile installs it into ``<venv>/torchvision``, on the path of this recipe only.
    """
    if importlib.util.find_spec("torchvision") is not None:
        return None
    folder = Path(sys.prefix) / "torchvision"
    assert (folder / "torchvision").is_dir(), f"no torchvision: run `make install-test` (it installs into {folder})"
    return folder


def test_torchvision_resnet18_and_vision_transformer() -> None:
    report = run_example("torchvision_recipe.py", "--steps", "6", path=torchvision_folder())
    resnet, vit = report["resnet18"], report["vit"]
    convs = {f"layer{i}.{b}.conv{c}" for i in range(1, 5) for b in (0, 1) for c in (1, 2)}
    shortcuts = {f"layer{i}.0.downsample.0" for i in (2, 3, 4)}
    assert set(resnet["curvature_layers"]) == {"conv1", "fc"} | convs | shortcuts  # BatchNorm: first-order
    blocks = {
        f"encoder.layers.encoder_layer_{i}.{name}"
        for i in (0, 1)
        for name in ("self_attention.in_proj", "self_attention.out_proj", "mlp.0", "mlp.3")
    }
    assert set(vit["curvature_layers"]) == {"conv_proj", "heads.head"} | blocks
    assert resnet["warnings"] == [] and vit["warnings"] == []
    assert_loss_falls(resnet["losses"], 0.6)
    assert_loss_falls(vit["losses"], 0.9)


def test_gpt_recipe_on_the_linux_kernel_characters() -> None:
    """A GPT with ``nn.MultiheadAttention`` blocks in a plain loop: curvature where it should be, loss falls."""
    from _data import require_char_corpus

    argv = ["--data", str(require_char_corpus()), "--steps", "12", "--batch", "16", "--width", "32"]
    report = run_example("gpt_recipe.py", *argv, "--valid-windows", "64")
    layers = set(report["curvature_layers"])
    for block in (0, 1):
        assert {f"blocks.{block}.attn.in_proj", f"blocks.{block}.attn.out_proj"} <= layers  # attention
        assert {f"blocks.{block}.mlp.0", f"blocks.{block}.mlp.2"} <= layers  # MLP
    assert {"head", "token_embed"} <= layers
    assert all(0 <= report["diagnostics"][name]["eta"] for name in layers)
    assert len(report["losses"]) == 12
    assert_loss_falls(report["losses"], 0.85)
    validation = report["validation_loss"]  # ln 98 = 4.58 nats at the start
    assert validation["after"] < validation["before"] - 0.8, validation
