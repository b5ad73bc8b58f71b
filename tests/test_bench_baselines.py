"""The baselines of issue 20 (Muon, SOAP, LAMB, LARS, Schedule-Free AdamW) in ``fop-bench``.

Each trains a few steps of every task through the real command line (the CIFAR tasks need the JPEG
pack, see ``tests/_data.py``); a baseline whose package is not installed is skipped with its name
(``make install-test`` installs the ``baselines`` extra, so CI runs them all). Muon's parameter
split is checked on every model of the benchmark.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from torch import nn

from _data import missing_reason
from fop.bench import BenchError
from fop.bench.baselines import OptimizerPair, build_muon, muon_split
from fop.bench.cli import main
from fop.bench.data import load_digits
from fop.bench.models import MLP, VisionTransformer, resnet18, resnet32
from fop.bench.optimizers import Hyperparameters, resolve_optimizer, warmup_decay
from fop.bench.tasks import get_task

BASELINES = {
    "muon": "torch",
    "soap": "pytorch_optimizer",
    "lamb": "pytorch_optimizer",
    "lars": "pytorch_optimizer",
    "sfadamw": "schedulefree",
}
TASKS = {
    "digits-mlp": [],
    "cifar10-resnet18": ["--width", "4"],
    "cifar10-vit": ["--width", "16"],
    "cifar10-lt-resnet32": ["--width", "4", "--imbalance", "10"],
}


def _require(name: str) -> None:
    package = BASELINES[name]
    if package == "torch":
        if not hasattr(torch.optim, "Muon"):
            pytest.skip(f"torch.optim.Muon needs torch >= 2.9 (torch {torch.__version__})")
    elif importlib.util.find_spec(package) is None:
        pytest.skip(f"{name} needs the package {package} (pip install 'fop[baselines]')")


# ------------------------------------------------------------------------------------- command line


@pytest.mark.parametrize("name", list(BASELINES))
@pytest.mark.parametrize("task", list(TASKS))
def test_each_baseline_trains_every_task_through_the_cli(task, name, tmp_path):
    _require(name)
    argv = ["--task", task, "--optimizers", name, "--max-epochs", "2", "--seeds", "0", "--lr-grid", "1"]
    if task != "digits-mlp":
        reason = missing_reason()
        if reason:
            pytest.skip(reason)
        argv += ["--data", str(__import__("_data").cifar10_path()), "--subset", "100", "--batch-sizes", "32"]
        argv += ["--target", "0.15"]
    else:
        argv += ["--batch-sizes", "256"]
    out = tmp_path / f"{task}-{name}"
    argv += [*TASKS[task], "--out", str(out), "--threads", "1", "--no-progress"]
    assert main(argv) == 0
    (record,) = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert record["status"] == "ok" and record["spec"]["optimizer"] == name
    assert len(record["curve"]) == 2 and all(torch.isfinite(torch.tensor(p["loss"])) for p in record["curve"])
    assert f"| {name} |" in (out / "results.md").read_text() and (out / "accuracy_vs_time.png").is_file()


def test_profile_and_tuning_budget_include_the_baselines(tmp_path, capsys):
    names = [name for name in BASELINES if _available(name)]
    if not names:
        pytest.skip("no baseline package installed (pip install 'fop[baselines]')")
    out = tmp_path / "profile"
    argv = ["--batch-sizes", "256", "--width", "16", "--optimizers", ",".join(["sgd", *names]), "--profile"]
    assert main([*argv, "--profile-steps", "2", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    rows = [line.split("|")[2].strip() for line in (out / "profile.md").read_text().splitlines() if "| 256 |" in line]
    assert rows == ["sgd", *names]
    capsys.readouterr()
    # the same lr x weight-decay grid as AdamW: 2 x 2 configurations each, the K-FAC/FOP damping grid as long
    out = tmp_path / "tuned"
    argv = ["--optimizers", ",".join(["adamw", *names, "kfac"]), "--batch-sizes", "256", "--max-epochs", "1"]
    argv += ["--lr-grid", "0.5,1", "--wd-grid", "0,1e-3", "--damping-grid", "0.1,1", "--extend-edges", "0"]
    argv += ["--compare-to", f"kfac,{names[0]}"]
    assert main([*argv, "--seeds", "0,1", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    trials = {name: sum(r["spec"]["optimizer"] == name for r in records) for name in ["adamw", *names, "kfac"]}
    assert set(trials.values()) == {8}, trials  # 2 x 2 configurations x 2 seeds
    report = (out / "results.md").read_text()  # one paired table per reference of --compare-to
    assert "## Paired comparison against kfac" in report and f"## Paired comparison against {names[0]}" in report
    assert f"| 256 | {names[0]} − kfac | 2 |" in report and f"| 256 | fop − {names[0]} |" not in report
    rules = {"lamb": "lamb: linear", "lars": "lars: poly2", "sfadamw": "sfadamw: constant"}
    assert "cosine decay to 0" in report and all(rules[n] in report for n in names if n in rules)
    decays = {r["spec"]["hyperparameters"]["weight_decay"] for r in records if r["spec"]["optimizer"] == names[0]}
    assert decays == {0.0, 1e-3}


def _available(name: str) -> bool:
    package = BASELINES[name]
    return hasattr(torch.optim, "Muon") if package == "torch" else importlib.util.find_spec(package) is not None


@pytest.mark.parametrize("name", ["soap", "lamb", "lars", "sfadamw"])
def test_a_missing_package_is_one_line_naming_the_extra(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, BASELINES[name], None)  # import raises ImportError
    assert main(["--optimizers", f"sgd,{name}", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fop-bench: error: "), err
    assert f"optimizer {name!r} needs the package {BASELINES[name]!r}: pip install 'fop[baselines]'" in err


# -------------------------------------------------------------------------------------------- rules


def test_learning_rate_rules_and_schedules_of_the_baselines():
    expected = {  # name: (scaling, decay after warmup)
        "muon": ("sqrt", "cosine"),
        "soap": ("sqrt", "cosine"),
        "lamb": ("sqrt", "linear"),
        "lars": ("linear", "poly2"),
        "sfadamw": ("sqrt", "constant"),
    }
    for name, (scaling, decay) in expected.items():
        if _available(name):
            spec = resolve_optimizer(name)
            assert (spec.scaling, spec.decay, spec.schedule_free) == (scaling, decay, name == "sfadamw")
    assert resolve_optimizer("adamw").decay == "cosine" and resolve_optimizer("fop").decay == "cosine"
    linear, poly2, constant = (warmup_decay(110, 10, decay) for decay in ("linear", "poly2", "constant"))
    assert [linear(s) for s in (0, 9, 10, 60, 109)] == pytest.approx([0.1, 1.0, 1.0, 0.5, 0.01])
    assert [poly2(s) for s in (9, 60, 109)] == pytest.approx([1.0, 0.25, 1e-4])
    assert [constant(s) for s in (0, 9, 10, 109)] == pytest.approx([0.1, 1.0, 1.0, 1.0])
    with pytest.raises(BenchError, match="unknown schedule"):
        warmup_decay(10, 1, "step")


def test_list_names_the_baselines_and_their_base_learning_rates(capsys):
    assert main(["--list"]) == 0
    assert "baselines (pip install 'fop[baselines]'): muon, soap, lamb, sfadamw" in capsys.readouterr().out


def test_baseline_base_learning_rates_come_from_the_task_unless_given():
    from fop.bench.runner import _base_lr

    task = get_task("digits-mlp")
    for name in [n for n in ("muon", "soap", "lamb", "sfadamw") if _available(n)]:
        assert _base_lr(resolve_optimizer(name), task, {}) == task.base_lrs["adamw"]
        assert _base_lr(resolve_optimizer(name), task, {name: 0.5}) == 0.5
    if _available("lars"):
        assert _base_lr(resolve_optimizer("lars"), task, {}) == 1.0


def test_schedule_free_evaluates_its_averaged_weights(tmp_path, monkeypatch):
    _require("sfadamw")
    from fop.bench import runner

    modes = []
    evaluate = runner.evaluate

    def spy(*args):  # (model, pipeline, batch_size, bf16, metric)
        modes.append(optimizers[0].param_groups[0]["train_mode"])
        return evaluate(*args)

    optimizers = []
    build = runner.build_model_and_optimizer

    def keep(*args, **kwargs):
        model, optimizer = build(*args, **kwargs)
        optimizers.append(optimizer)
        return model, optimizer

    monkeypatch.setattr(runner, "evaluate", spy)
    monkeypatch.setattr(runner, "build_model_and_optimizer", keep)
    argv = ["--optimizers", "sfadamw", "--batch-sizes", "256", "--max-epochs", "3", "--seeds", "0", "--lr-grid", "1"]
    assert main([*argv, "--threads", "1", "--no-progress", "--out", str(tmp_path)]) == 0
    assert modes == [False, False, False]  # evaluated in eval mode (the averaged x) ...
    assert optimizers[0].param_groups[0]["train_mode"]  # ... and back to training after each


# ------------------------------------------------------------------------------------ Muon's split


def _resnet_split(model: nn.Module) -> tuple[set[str], set[str]]:
    convs = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    muon = convs - {"stem.0.weight"}
    return muon, {n for n, _ in model.named_parameters()} - muon


def _split(model: nn.Module) -> tuple[set[str], set[str]]:
    muon, adamw = muon_split(model)
    assert not set(muon) & set(adamw) and len(muon) + len(adamw) == len(list(model.parameters()))
    return set(muon), set(adamw)


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest_on_every_bench_model():
    mlp = MLP(64, 10, width=32)
    assert _split(mlp) == (
        {"layers.3.weight"},
        {"layers.1.weight", "layers.1.bias", "layers.3.bias", "layers.5.weight", "layers.5.bias"},
    )
    for resnet in (resnet18(num_classes=10, width=4), resnet32(num_classes=10, width=4)):
        muon, adamw = _split(resnet)
        assert (muon, adamw) == _resnet_split(resnet)
        assert {"stem.0.weight", "fc.weight", "fc.bias"} <= adamw  # first layer and classifier
        assert all(
            ".bn" in n or "stem.1" in n or "shortcut.1" in n for n in adamw - {"stem.0.weight", "fc.weight", "fc.bias"}
        )
    vit = VisionTransformer(dim=16, depth=2, heads=2)
    muon, adamw = _split(vit)
    assert muon == {f"blocks.{b}.{m}.weight" for b in range(2) for m in ("attn.qkv", "attn.proj", "fc1", "fc2")}
    assert {"patch_embed.weight", "patch_embed.bias", "cls_token", "pos_embed", "head.weight", "head.bias"} <= adamw
    assert all(p.ndim == 1 for n, p in vit.named_parameters() if n in adamw and n.startswith("blocks."))


def test_muon_split_on_a_language_model_sends_embeddings_and_the_tied_head_to_adamw():
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.block = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.embed.weight  # tied

    muon, adamw = muon_split(LM())
    assert set(muon) == {"block.linear1.weight", "block.linear2.weight", "block.self_attn.out_proj.weight"}
    assert "embed.weight" in adamw and "block.self_attn.in_proj_weight" in adamw  # not a Linear module's


def test_muon_gets_convolutions_as_matrices_and_the_pair_steps_both(tmp_path):
    _require("muon")
    torch.manual_seed(0)
    model = resnet18(num_classes=10, width=4)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    before = model(x)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    muon_names, adamw_names = muon_split(model)
    optimizer = build_muon(model, lr=0.01, weight_decay=0.0)
    assert isinstance(optimizer, OptimizerPair)
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert all(p.ndim == 2 for group in muon.param_groups for p in group["params"])
    assert sum(len(g["params"]) for g in muon.param_groups) == len(muon_names)
    assert sum(len(g["params"]) for g in adamw.param_groups) == len(adamw_names)
    # the forward is unchanged: each convolution's weight is its matrix viewed back as the kernel
    torch.testing.assert_close(model(x), before)
    conv = model.stages[0][0].conv1
    torch.testing.assert_close(conv.weight, weights["stages.0.0.conv1.weight"])
    # one step moves both groups; the scheduler's factor reaches both through param_groups
    model.train()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert [g["lr"] for g in muon.param_groups + adamw.param_groups] == [0.005, 0.005]
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    scheduler.step()
    assert not torch.equal(conv.weight, weights["stages.0.0.conv1.weight"])
    assert not torch.equal(model.fc.weight, weights["fc.weight"])
    assert set(optimizer.state_dict()) == {"optimizers"}


def test_muon_keeps_a_channels_last_kernel_channels_last():
    _require("muon")
    torch.manual_seed(0)
    model = resnet18(num_classes=10, width=4).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    model.eval()
    before = model(x)
    build_muon(model, lr=0.01, weight_decay=0.0)
    conv = model.stages[1][0].conv2
    assert conv.parametrizations.weight.original.ndim == 2
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x), before)


def test_muon_refuses_a_model_without_hidden_matrices():
    _require("muon")
    with pytest.raises(BenchError, match="no hidden Linear or convolution weight"):
        build_muon(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), lr=1e-3, weight_decay=0.0)


def test_muon_builds_through_the_factory_on_the_digits_task():
    _require("muon")
    dataset = load_digits()
    model = get_task("digits-mlp").build_model(dataset, None)
    optimizer = resolve_optimizer("muon").build(model, Hyperparameters(lr=1e-3, weight_decay=1e-2))
    muon, adamw = optimizer.optimizers
    assert muon.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    assert muon.param_groups[0]["weight_decay"] == adamw.param_groups[0]["weight_decay"] == 1e-2
