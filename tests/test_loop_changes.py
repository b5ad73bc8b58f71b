"""The loop changes under the optimizer: autocast, param_groups edits, dtype moves, reloads, frozen biases.

Each case either trains exactly as a reference run that is known to be right (built on the changed
model, or without the change), or is refused by one ``ValueError`` that names the change, at the step
where it is seen, leaving parameters and state as they were.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fop import FOP, KFAC
from fop.bench.cli import main

DTYPE = torch.float64
EVERY_STEP = dict(curvature_update_interval=1, inverse_update_interval=1)


def mlp(seed: int = 0, dtype: torch.dtype = DTYPE, norm: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(6, 8), nn.Tanh()]
    if norm:
        layers.append(nn.LayerNorm(8))
    layers.append(nn.Linear(8, 4))
    return nn.Sequential(*layers).to(dtype)


def data(steps: int, n: int = 16, dtype: torch.dtype = DTYPE, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 6, generator=gen, dtype=dtype), torch.randint(0, 4, (n,), generator=gen)) for _ in range(steps)
    ]


def backward(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()


def train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list) -> None:
    for x, y in batches:
        backward(model, optimizer, x, y)
        optimizer.step()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ---------------------------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("cls", [FOP, KFAC])
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_cpu_autocast_first_layer_with_float32_input_trains_with_curvature(cls: type, half: torch.dtype) -> None:
    """A model's first Linear gets float32 data and computes in 16 bits: exactly as if fed 16-bit data."""

    def run(cast_input: bool) -> tuple[nn.Module, torch.optim.Optimizer, list[float]]:
        model = mlp(dtype=torch.float32)
        optimizer = cls(model, lr=0.1, **EVERY_STEP)
        losses = []
        for x, y in data(1, dtype=torch.float32) * 6:
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=half):
                loss = F.cross_entropy(model(x.to(half) if cast_input else x), y)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        return model, optimizer, losses

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, optimizer, losses = run(cast_input=False)
    reference, _, _ = run(cast_input=True)  # autocast casts the input to `half` before the product anyway
    assert torch.equal(flat(model), flat(reference))
    assert set(optimizer.diagnostics()) == {"0", "2"}  # both layers kept their curvature
    assert losses[-1] < 0.8 * losses[0]
    first = optimizer.state[model[0].weight]
    assert first["A"].dtype == torch.float32 and torch.isfinite(first["A"]).all()


@pytest.mark.parametrize("backward_inside", [False, True])
def test_cpu_autocast_input_factor_is_that_of_the_rounded_input(backward_inside: bool) -> None:
    """After one step the first layer's factor is ``mean [x̃, 1][x̃, 1]ᵀ`` of the bf16-rounded input ``x̃``,
    formed in float32 also when ``backward()`` is called inside the autocast region."""
    model = mlp(dtype=torch.float32)
    optimizer = KFAC(model, lr=0.1, **EVERY_STEP)
    x, y = data(1, dtype=torch.float32)[0]
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    optimizer.step()
    rows = torch.cat([x.to(torch.bfloat16).to(DTYPE), torch.ones(len(x), 1, dtype=DTYPE)], 1)
    expected = rows.T @ rows / len(x)
    torch.testing.assert_close(optimizer.state[model[0].weight]["A"].to(DTYPE), expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- param_groups
INVALID_EDITS = [
    ("kl_clip", -5.0, "kl_clip must be > 0"),
    ("damping", -1.0, "damping must be a finite float > 0"),
    ("damping", 0.0, "damping must be a finite float > 0"),
    ("damping", float("nan"), "damping must be a finite float > 0"),
    ("lr", -0.1, "lr must be a finite float >= 0"),
    ("lr", float("inf"), "lr must be a finite float >= 0"),
    ("momentum", 1.0, "momentum must be in"),
    ("weight_decay", -1e-4, "weight_decay must be a finite float >= 0"),
    ("factor_decay", 1.0, "factor_decay must be in"),
    ("projection_eps", -1.0, "projection_eps must be >= 0"),
    ("trust_region", "trust", "trust_region must be one of"),
    ("damping_mode", "cholesky", "damping_mode must be one of"),
    ("eta", "median", "eta must be one of"),
    ("factor_samples", 0, "factor_samples must be an int >= 1"),
    ("weight_sharing", "mean", "weight_sharing must be one of"),
    ("nesterov", "yes", "nesterov must be True or False"),
]


@pytest.mark.parametrize("key, value, message", INVALID_EDITS, ids=[f"{k}={v}" for k, v, _ in INVALID_EDITS])
@pytest.mark.parametrize("group_index", [0, 1])
def test_invalid_param_group_edit_is_refused_at_the_step_and_changes_nothing(
    key: str, value: object, message: str, group_index: int
) -> None:
    model = mlp(norm=True)  # group 0: the Kronecker layers; group 1: the LayerNorm (the AdamW fallback)
    optimizer = FOP(model, lr=0.1, **EVERY_STEP)
    batches = data(3)
    train(model, optimizer, batches[:1])
    before, state_before = flat(model), copy.deepcopy(optimizer.state_dict())
    backward(model, optimizer, *batches[1])
    good = optimizer.param_groups[group_index][key]
    optimizer.param_groups[group_index][key] = value
    with pytest.raises(ValueError, match=rf"param_groups\[{group_index}\].*{message}"):
        optimizer.step()
    assert torch.equal(flat(model), before)
    after = optimizer.state_dict()
    for index, entry in state_before["state"].items():
        for name, tensor in entry.items():
            same = torch.equal(after["state"][index][name], tensor) if torch.is_tensor(tensor) else None
            assert same if same is not None else after["state"][index][name] == tensor, name
    # fixed, the same step goes on as if nothing had happened
    optimizer.param_groups[group_index][key] = good
    optimizer.step()
    reference = mlp(norm=True)
    reference_optimizer = FOP(reference, lr=0.1, **EVERY_STEP)
    train(reference, reference_optimizer, batches[:2])
    assert torch.equal(flat(model), flat(reference))


@pytest.mark.parametrize(
    "key, value, message", [("betas", (1.0, 0.999), "fallback_betas"), ("eps", 0.0, "fallback_eps")]
)
def test_invalid_adamw_group_edit_is_refused(key: str, value: object, message: str) -> None:
    model = mlp(norm=True)
    optimizer = KFAC(model, lr=0.1, fallback="adamw")
    backward(model, optimizer, *data(1)[0])
    optimizer.param_groups[1][key] = value
    with pytest.raises(ValueError, match=rf"param_groups\[1\] \('adamw' group\).*{message}"):
        optimizer.step()


@pytest.mark.parametrize("key, value", [("damping", 0.05), ("kl_clip", None), ("lr", 0.02), ("factor_samples", 8)])
def test_valid_param_group_edit_equals_building_with_the_value(key: str, value: object) -> None:
    batches = data(3)
    edited_model = mlp()
    edited = FOP(edited_model, lr=0.1, **EVERY_STEP)
    for group in edited.param_groups:
        group[key] = value
    train(edited_model, edited, batches)
    built_model = mlp()
    train(built_model, FOP(built_model, **{"lr": 0.1, key: value, **EVERY_STEP}), batches)
    assert torch.equal(flat(edited_model), flat(built_model))


# ---------------------------------------------------------------------------------------------- dtype moves
@pytest.mark.parametrize("cls", [FOP, KFAC])
@pytest.mark.parametrize("damping_mode", ["factored", "exact"])
def test_model_cast_after_construction_equals_a_run_built_on_the_cast_model(cls: type, damping_mode: str) -> None:
    """``model.double()`` mid-run: the state follows, exactly as a new optimizer loading the checkpoint."""
    batches = data(5, dtype=torch.float32)
    options = dict(lr=0.1, fallback="adamw", damping_mode=damping_mode, **EVERY_STEP)
    model = mlp(dtype=torch.float32, norm=True)
    optimizer = cls(model, **options)
    train(model, optimizer, batches[:2])
    checkpoint = copy.deepcopy(optimizer.state_dict())
    reference = copy.deepcopy(model).double()
    model.double()
    doubled = [(x.double(), y) for x, y in batches[2:]]
    train(model, optimizer, doubled)

    reference_optimizer = cls(reference, **options)
    reference_optimizer.load_state_dict(checkpoint)
    train(reference, reference_optimizer, doubled)
    assert torch.equal(flat(model), flat(reference))
    for layer in (model[0], model[3]):
        state = optimizer.state[layer.weight]
        assert state["A"].dtype == torch.float64 and state["momentum_buffer"].dtype == torch.float64
    assert optimizer.state[model[2].weight]["exp_avg"].dtype == torch.float64  # the LayerNorm's AdamW state


# ---------------------------------------------------------------------------------------------- reloads
@pytest.mark.parametrize("cls", [FOP, KFAC])
@pytest.mark.parametrize("at_step", [0, 2])
def test_load_state_dict_between_backward_and_step_is_a_normal_step(cls: type, at_step: int) -> None:
    def run(reload: bool) -> torch.Tensor:
        model = mlp()
        optimizer = cls(model, lr=0.1, curvature_update_interval=2, inverse_update_interval=2)
        for i, (x, y) in enumerate(data(4)):
            backward(model, optimizer, x, y)
            if reload and i == at_step:
                optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
            optimizer.step()
        return flat(model)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning blames tied weights or a repeated step
        reloaded = run(reload=True)
    assert torch.equal(reloaded, run(reload=False))


# ---------------------------------------------------------------------------------------------- frozen bias
@pytest.mark.parametrize("cls", [FOP, KFAC])
def test_frozen_bias_keeps_the_layers_curvature(cls: type) -> None:
    """W moves exactly as beside a trained bias that is put back after every step; the bias stays put."""
    batches = data(4)
    options = dict(lr=0.1, weight_decay=1e-3, **EVERY_STEP)
    model = mlp()
    model[0].bias.requires_grad_(False)
    frozen_value = model[0].bias.detach().clone()
    optimizer = cls(model, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, optimizer, batches)
    assert set(optimizer.diagnostics()) == {"0", "2"}
    assert torch.equal(model[0].bias, frozen_value)

    reference = mlp()
    reference_optimizer = cls(reference, **options)
    for x, y in batches:
        backward(reference, reference_optimizer, x, y)
        reference_optimizer.step()
        with torch.no_grad():
            reference[0].bias.copy_(frozen_value)
    torch.testing.assert_close(flat(model), flat(reference), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- fop-bench labels
def _jpeg_pack(path: Path, train_labels: np.ndarray, test_labels: np.ndarray) -> None:
    from PIL import Image

    def split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        blobs = []
        for i in range(len(labels)):
            buffer = io.BytesIO()
            Image.fromarray(np.full((32, 32, 3), i * 7 % 256, dtype=np.uint8)).save(buffer, format="JPEG")
            blobs.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
        offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
        return np.concatenate(blobs), offsets

    train_jpeg, train_offsets = split(train_labels)
    test_jpeg, test_offsets = split(test_labels)
    np.savez(
        path,
        train_jpeg=train_jpeg,
        train_offsets=train_offsets,
        train_labels=train_labels,
        test_jpeg=test_jpeg,
        test_offsets=test_offsets,
        test_labels=test_labels,
    )


@pytest.mark.parametrize("bad", [10, -1])
def test_fop_bench_refuses_a_pack_with_labels_outside_the_classes(tmp_path: Path, capsys, bad: int) -> None:
    labels = np.repeat(np.arange(10), 2).astype(np.int64)
    broken = labels.copy()
    broken[3] = bad
    pack = tmp_path / "pack.npz"
    _jpeg_pack(pack, broken, labels)
    status = main(["--task", "cifar10-resnet18", "--data", str(pack), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and str(pack) in err[0]
    assert (
        "train_labels must hold class indices 0..9" in err[0] and f"found values {min(bad, 0)}..{max(bad, 9)}" in err[0]
    )


def test_fop_bench_refuses_cifar_pickles_with_labels_outside_the_classes(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data_ = np.zeros((3, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": data_, b"labels": [0, 1, 10 if name == "test_batch" else 2]}, handle)
    status = main(["--task", "cifar10-resnet18", "--data", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and "test_batch" in err and "class indices 0..9" in err and "found values 0..10" in err
