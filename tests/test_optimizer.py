"""FOP and KFAC as torch.optim optimizers: steps against dense references, state, AMP, guards."""

from __future__ import annotations

import copy
import io
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fop import FOP, KFAC

DTYPE = torch.float64
# the dense oracles of this file are those of exact damping (M = A ⊗ G + λI); factored damping, the
# default, has its own in tests/test_options.py
FAST = dict(curvature_update_interval=1, inverse_update_interval=1, damping_mode="exact")


def mlp(seed: int = 0, dtype: torch.dtype = DTYPE, bias: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8, bias=bias), nn.Tanh(), nn.Linear(8, 4, bias=bias)).to(dtype)


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    ).to(DTYPE)


def batches(n_batches: int, n: int = 8, shape: tuple = (6,), classes: int = 4, seed: int = 1) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, *shape, generator=gen, dtype=DTYPE), torch.randint(0, classes, (n,), generator=gen))
        for _ in range(n_batches)
    ]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data: list) -> None:
    for x, y in data:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor], **tol) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **tol)


# ------------------------------------------------------------------------------------ the step
def check_kfac_step_equals_dense(device: torch.device) -> None:
    """One-layer model: Δθ = −lr·(A ⊗ G + λI)⁻¹ g with A, G formed by hand (tests/test_cuda.py reuses it)."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3).to(DTYPE).to(device)
    x, y = torch.randn(10, 5, dtype=DTYPE, device=device), torch.randint(0, 3, (10,), device=device)
    before = torch.cat([model.weight, model.bias[:, None]], 1).detach().clone()
    lr, damping = 0.3, 0.02
    optimizer = KFAC(model, lr=lr, momentum=0.0, damping=damping, kl_clip=None, **FAST)
    F.cross_entropy(model(x), y).backward()
    grad = torch.cat([model.weight.grad, model.bias.grad[:, None]], 1).clone()
    optimizer.step()
    rows = torch.cat([x, torch.ones(10, 1, dtype=DTYPE, device=device)], 1)
    a = rows.T @ rows / 10
    delta = torch.softmax(rows @ before.T, 1) - F.one_hot(y, 3).to(DTYPE)
    g = delta.T @ delta / 10  # per-sample gradients of the loss w.r.t. the logits
    m = torch.kron(a, g) + damping * torch.eye(18, dtype=DTYPE, device=device)
    step = torch.linalg.solve(m, grad.T.reshape(-1)).reshape(6, 3).T
    after = torch.cat([model.weight, model.bias[:, None]], 1).detach()
    torch.testing.assert_close(after, before - lr * step, rtol=1e-9, atol=1e-12)


def test_kfac_step_equals_dense_damped_natural_gradient() -> None:
    check_kfac_step_equals_dense(torch.device("cpu"))


class FOPWithoutProjection(FOP):
    projection = False  # the ablation the FOP docstring describes


def test_fop_without_projection_equals_kfac() -> None:
    data = batches(5)
    m1, m2 = mlp(), mlp()
    kw = dict(lr=0.2, momentum=0.9, weight_decay=1e-3, damping=1e-2, curvature_update_interval=2)
    train(m1, KFAC(m1, **kw), data)
    train(m2, FOPWithoutProjection(m2, **kw), data)
    assert_same(params(m1), params(m2), rtol=1e-9, atol=1e-12)


def test_fop_differs_from_kfac_and_reports_diagnostics() -> None:
    data = batches(3)
    m1, m2 = mlp(), mlp()
    fop_opt = FOP(m1, lr=0.1, **FAST)
    train(m1, fop_opt, data)
    train(m2, KFAC(m2, lr=0.1, **FAST), data)
    assert max(float((a - b).abs().max()) for a, b in zip(params(m1), params(m2))) > 1e-6
    diag = fop_opt.diagnostics()
    assert set(diag) == {"0", "2"}
    for values in diag.values():  # their values: test_fop_step_is_the_functional_direction
        assert 0.5 <= float(values["eta"]) <= 1.0
        assert float(values["beta"]) != 0.0 and float(values["projection"]) != 0.0


def check_fop_step_is_the_functional_direction(device: torch.device) -> None:
    """The optimizer's update is −lr·fop_direction(g1, g2, A, G, λ) of separately back-propagated halves."""
    from fop.functional import fop_direction

    torch.manual_seed(0)
    model = nn.Linear(5, 3).to(DTYPE).to(device)
    x, y = torch.randn(8, 5, dtype=DTYPE, device=device), torch.randint(0, 3, (8,), device=device)
    before = torch.cat([model.weight, model.bias[:, None]], 1).detach().clone()
    halves = []
    for part in (slice(0, 4), slice(4, 8)):
        ref = copy.deepcopy(model)
        F.cross_entropy(ref(x[part]), y[part]).backward()
        halves.append(torch.cat([ref.weight.grad, ref.bias.grad[:, None]], 1))
    optimizer = FOP(model, lr=0.5, momentum=0.0, damping=0.05, kl_clip=None, **FAST)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    state = optimizer.state[model.weight]
    expected = fop_direction(halves[0], halves[1], state["A"], state["G"], 0.05)
    after = torch.cat([model.weight, model.bias[:, None]], 1).detach()
    torch.testing.assert_close(after, before - 0.5 * expected.direction, rtol=1e-9, atol=1e-12)
    (diagnostics,) = optimizer.diagnostics().values()  # β*, η*, s as reported: those of the functional step
    for key in ("beta", "eta", "projection"):
        torch.testing.assert_close(diagnostics[key], getattr(expected, key), rtol=1e-9, atol=1e-12)


def test_fop_step_is_the_functional_direction() -> None:
    check_fop_step_is_the_functional_direction(torch.device("cpu"))


@pytest.mark.parametrize("cls", [FOP, KFAC])
def test_kl_clip_scales_the_step_into_the_trust_region(cls: type) -> None:
    """With κ tiny the update is ν·(unclipped update), ν = √(κ / (lr² Σ⟨d, g⟩)), so lr²⟨Δ/lr, g⟩ = κ."""
    data = batches(1)
    m1, m2 = mlp(), mlp()
    lr, kappa = 0.5, 1e-6
    train(m1, cls(m1, lr=lr, momentum=0.0, kl_clip=None, **FAST), data)
    x, y = data[0]
    optimizer = cls(m2, lr=lr, momentum=0.0, kl_clip=kappa, trust_region="step", **FAST)
    F.cross_entropy(m2(x), y).backward()
    grads = [p.grad.clone() for p in m2.parameters()]
    before = params(m2)
    optimizer.step()
    unclipped = [b - a for a, b in zip(params(m1), before)]
    clipped = [b - a for a, b in zip(params(m2), before)]
    estimate = sum(float((u / lr * g).sum()) for u, g in zip(unclipped, grads)) * lr**2
    nu = (kappa / estimate) ** 0.5
    assert nu < 1
    for c, u in zip(clipped, unclipped):
        torch.testing.assert_close(c, nu * u, rtol=1e-9, atol=1e-14)


def factor_updates(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> list[int]:
    """The steps (after the first) at which the first layer's factor ``A`` changed."""
    snapshots = []
    for x, y in batches(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        snapshots.append(optimizer.state[model[0].weight]["A"].clone())
    return [k for k in range(1, steps) if not torch.equal(snapshots[k], snapshots[k - 1])]


def test_factors_update_on_their_interval_only() -> None:
    model = mlp()
    assert factor_updates(model, KFAC(model, curvature_update_interval=3, inverse_update_interval=3), 7) == [3, 6]


def test_callable_intervals() -> None:
    """A callable interval is read at every step k (due when k % interval(k) == 0): 2 before step 4
    and 3 from then on captures at steps 0, 2, 6 and 9; a callable returning 3 is the int 3 run."""
    model = mlp()
    assert factor_updates(model, FOP(model, curvature_update_interval=lambda step: 2 if step < 4 else 3), 10) == [
        2,
        6,
        9,
    ]
    data = batches(7)
    m1, m2 = mlp(), mlp()
    train(m1, FOP(m1, curvature_update_interval=3, inverse_update_interval=2), data)
    train(m2, FOP(m2, curvature_update_interval=lambda step: 3, inverse_update_interval=lambda step: 2), data)
    assert_same(params(m2), params(m1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="int >= 1"):
        FOP(mlp(), curvature_update_interval=lambda step: 0)


def test_gradient_accumulation_step_matches_whole_batch() -> None:
    """Micro-batches of halves: FOP's halves per micro-batch; whole batch of the same halves."""
    data = batches(1, n=8)[0]
    x, y = data
    m1, m2 = mlp(), mlp()
    o1, o2 = KFAC(m1, **FAST), KFAC(m2, **FAST)
    F.cross_entropy(m1(x), y).backward()
    o1.step()
    for part in (slice(0, 4), slice(4, 8)):
        (F.cross_entropy(m2(x[part]), y[part]) / 2).backward()
    o2.step()
    assert_same(params(m1), params(m2), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------ state
@pytest.mark.parametrize("cls", [FOP, KFAC])
def test_checkpoint_resume_continues_exactly(cls: type) -> None:
    data = batches(8)
    kw = dict(lr=0.1, weight_decay=1e-3, curvature_update_interval=3, inverse_update_interval=2)
    model = cnn()
    conv_data = [
        (torch.randn(8, 3, 6, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(i)), y)
        for i, (_, y) in enumerate(data)
    ]
    conv_data = [(x, y % 5) for x, y in conv_data]
    optimizer = cls(model, fallback="adamw", **kw)
    train(model, optimizer, conv_data[:4])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, buffer)
    train(model, optimizer, conv_data[4:])
    uninterrupted = params(model)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = cnn(seed=5)
    resumed.load_state_dict(checkpoint["model"])
    optimizer2 = cls(resumed, fallback="adamw", **kw)
    optimizer2.load_state_dict(checkpoint["optim"])
    train(resumed, optimizer2, conv_data[4:])
    assert_same(params(resumed), uninterrupted, rtol=0, atol=0)


def conv_batches(steps: int, n: int = 8) -> list:
    return [
        (torch.randn(n, 3, 6, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(i)), y % 5)
        for i, (_, y) in enumerate(batches(steps, n=n))
    ]


# param-group options of the factors: (name, a value that changes the run, another one for the constructor)
FACTOR_OPTIONS = [("factor_samples", 3, 7), ("weight_sharing", "reduce", "reduce")]


@pytest.mark.parametrize(("option", "value", "constructed"), FACTOR_OPTIONS)
@pytest.mark.parametrize("cls", [FOP, KFAC])
def test_factor_options_round_trip_through_the_checkpoint(
    cls: type, option: str, value: object, constructed: object
) -> None:
    """factor_samples and weight_sharing are param-group options: a checkpoint brings them into an
    optimizer built without them, and a checkpoint from before the option keeps the constructor's value."""
    data = conv_batches(6)
    kw = dict(lr=0.1, curvature_update_interval=1, inverse_update_interval=2)
    model = cnn()
    optimizer = cls(model, **{option: value}, **kw)
    train(model, optimizer, data[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, buffer)
    train(model, optimizer, data[3:])
    without = cnn()
    train(without, cls(without, **kw), data)
    assert not torch.allclose(params(model)[0], params(without)[0])  # the option changes the run

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = cnn(seed=5)
    resumed.load_state_dict(checkpoint["model"])
    optimizer2 = cls(resumed, **kw)
    optimizer2.load_state_dict(checkpoint["optim"])
    assert optimizer2.param_groups[0][option] == value
    train(resumed, optimizer2, data[3:])
    assert_same(params(resumed), params(model), rtol=0, atol=0)

    for group in checkpoint["optim"]["param_groups"]:
        del group[option]
    optimizer3 = cls(cnn(), **{option: constructed}, **kw)
    optimizer3.load_state_dict(checkpoint["optim"])
    assert [group[option] for group in optimizer3.param_groups] == [constructed, constructed]


def test_load_rejects_foreign_checkpoint() -> None:
    model = mlp()
    sgd_state = torch.optim.SGD(model.parameters(), lr=0.1).state_dict()
    with pytest.raises(ValueError, match="not a FOP checkpoint"):
        FOP(model).load_state_dict(sgd_state)


def test_lr_scheduler_scales_every_group() -> None:
    model = cnn()
    optimizer = FOP(model, lr=0.1, fallback="adamw", fallback_lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.05, 5e-4])
    assert [g["rule"] for g in optimizer.param_groups] == ["kronecker", "adamw"]


def test_add_param_group_uses_fallback_rule() -> None:
    model = mlp()
    extra = nn.Parameter(torch.ones(3, dtype=DTYPE))
    optimizer = FOP(model, lr=0.1, momentum=0.0)
    optimizer.add_param_group({"params": [extra], "lr": 0.5})
    (extra.sum() * 2).backward()
    optimizer.step()
    torch.testing.assert_close(extra.detach(), torch.full((3,), 0.0, dtype=DTYPE))
    with pytest.raises(ValueError, match="kronecker"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.ones(1))], "rule": "kronecker"})


# ------------------------------------------------------------------------------------ fallback
def test_default_fallback_is_auto_sgd_for_batch_norm_adamw_for_the_rest() -> None:
    """The default since 0.4 (docs/evidence.md §12): a user who passes only ``lr`` gets BatchNorm
    parameters by SGD at ``lr`` (as before: the CNN evidence) and every other parameter outside
    supported layers (layer norms, position tables, bare parameters) by AdamW at 8e-3."""
    from fop.arguments import AUTO_FALLBACK_LR

    assert AUTO_FALLBACK_LR == 8e-3
    position = nn.Parameter(torch.zeros(4, 8, dtype=DTYPE))
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.LayerNorm(8), nn.Linear(8, 3)).to(DTYPE)
    model.register_parameter("position", position)
    for cls in (FOP, KFAC):
        optimizer = cls(model, lr=0.3)
        rules = [(g["rule"], g["lr"], {id(p) for p in g["params"]}) for g in optimizer.param_groups]
        assert rules == [
            ("kronecker", 0.3, {id(p) for i in (0, 3) for p in model[i].parameters()}),
            ("sgd", 0.3, {id(p) for p in model[1].parameters()}),
            ("adamw", 8e-3, {id(p) for p in [*model[2].parameters(), position]}),
        ]
        assert optimizer.defaults["rule"] == "sgd"  # add_param_group's default rule, as before
        assert cls(model, lr=0.3, fallback_lr=3e-3).param_groups[2]["lr"] == 3e-3
        one = cls(model, lr=0.3, fallback="sgd").param_groups  # the default before 0.4: one group
        assert [(g["rule"], g["lr"], len(g["params"])) for g in one] == [("kronecker", 0.3, 4), ("sgd", 0.3, 5)]
    cnn_groups = FOP(cnn(), lr=0.3).param_groups  # BatchNorm only: the same groups as fallback="sgd"
    assert [(g["rule"], g["lr"]) for g in cnn_groups] == [
        (g["rule"], g["lr"]) for g in FOP(cnn(), lr=0.3, fallback="sgd").param_groups
    ]


class Bare(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 6, dtype=DTYPE))
        self.norm = nn.LayerNorm(6).to(DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x * self.scale)[:, :4]


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_model_without_supported_layer_is_the_first_order_rule(rule: str) -> None:
    data = batches(4)
    m1, m2 = Bare(), Bare()
    with pytest.warns(UserWarning, match="no supported layer"):
        ours = FOP(m1, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2, fallback=rule, fallback_lr=0.05)
    if rule == "sgd":
        theirs = torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)
    else:
        theirs = torch.optim.AdamW(m2.parameters(), lr=0.05, weight_decay=1e-2)
    train(m1, ours, data)
    train(m2, theirs, data)
    assert_same(params(m1), params(m2), rtol=1e-10, atol=1e-12)


def test_exclude_keeps_modules_out_of_curvature() -> None:
    model = mlp()
    assert [layer.name for layer in FOP(model, exclude=[model[2]]).layers] == ["0"]
    assert [layer.name for layer in FOP(model, exclude=["0"]).layers] == ["2"]
    with pytest.warns(UserWarning, match="no supported layer"):
        assert FOP(model, exclude=[nn.Linear]).layers == []
    with pytest.raises(ValueError, match="not found"):
        FOP(model, exclude=["nope"])


def test_frozen_layers_stay_put() -> None:
    model = mlp()
    for p in model[0].parameters():
        p.requires_grad_(False)
    optimizer = FOP(model, **FAST)
    frozen = params(model)[:2]
    train(model, optimizer, batches(2))
    assert_same(params(model)[:2], frozen, rtol=0, atol=0)
    # frozen after construction: the layer is skipped, the rest trains
    model[2].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    for p in model[0].parameters():
        p.requires_grad_(True)
    before = params(model)
    train(model, optimizer, batches(2, seed=3))
    assert_same(params(model)[2:], before[2:], rtol=0, atol=0)


def test_batch_of_one_is_a_documented_kfac_step() -> None:
    data = batches(3, n=1)
    m1, m2 = mlp(), mlp()
    with pytest.warns(UserWarning, match="cannot be split"):
        train(m1, FOP(m1, **FAST), data)
    train(m2, KFAC(m2, **FAST), data)
    assert_same(params(m1), params(m2), rtol=1e-10, atol=1e-12)


def test_layer_called_outside_its_forward_gets_first_order_rule() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 4).to(DTYPE)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.fc.weight, self.fc.bias)

    model = Functional()
    optimizer = FOP(model, lr=0.1, momentum=0.0)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    expected = model.fc.weight.detach() - 0.1 * model.fc.weight.grad
    with pytest.warns(UserWarning, match="weight is used outside the module"):
        optimizer.step()
    torch.testing.assert_close(model.fc.weight.detach(), expected)


# ------------------------------------------------------------------------------------ guards
def test_non_finite_gradient_changes_nothing_and_is_counted() -> None:
    model = cnn()
    optimizer = FOP(model, fallback="adamw", **FAST)
    data = batches(2, shape=(3, 6, 6), classes=5)
    train(model, optimizer, data[:1])
    before_params = params(model)
    before_state = copy.deepcopy(optimizer.state_dict())
    x, y = data[1]
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0, 0, 0] = float("nan")
    optimizer.step()
    assert_same(params(model), before_params, rtol=0, atol=0)
    after_state = optimizer.state_dict()
    for key, state in before_state["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(after_state["state"][key][name], value, rtol=0, atol=0)
    assert int(optimizer.skipped_steps) == 1
    train(model, optimizer, data[:1])
    assert all(torch.isfinite(p).all() for p in model.parameters())


SCALER_CASES = {
    "bias": (lambda: mlp(bias=True), lambda: batches(4), {}),
    "no-bias": (lambda: mlp(bias=False), lambda: batches(4), {}),
    "sampled-factors": (cnn, lambda: conv_batches(4), {"factor_samples": 3}),
    "reduced-factors": (cnn, lambda: conv_batches(4), {"weight_sharing": "reduce"}),
}


@pytest.mark.parametrize("case", sorted(SCALER_CASES))
def test_grad_scaler_with_constant_scale_matches_unscaled(case: str) -> None:
    """The loss scale is read off the bias gradients, or a reference layer's when there are none; it
    rescales sampled factors (factor_samples=3 of 8) and K-FAC-reduce's as it rescales full ones."""
    build, make_data, options = SCALER_CASES[case]
    data = make_data()
    m1, m2 = build(), build()
    train(m1, FOP(m1, **options, **FAST), data)
    optimizer = FOP(m2, **options, **FAST)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=10**6)
    for x, y in data:
        optimizer.zero_grad()
        scaler.scale(F.cross_entropy(m2(x), y)).backward()
        scaler.step(optimizer)
        scaler.update()
    assert_same(params(m1), params(m2), rtol=1e-9, atol=1e-12)


def test_grad_scaler_overflow_step_leaves_no_trace() -> None:
    data = batches(3)
    m1, m2 = mlp(), mlp()
    o1 = KFAC(m1, **FAST)
    train(m1, o1, data[1:])
    o2 = KFAC(m2, **FAST)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for i, (x, y) in enumerate(data):
        o2.zero_grad()
        loss = F.cross_entropy(m2(x), y)
        if i == 0:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(o2)
        scaler.update()
    assert scaler.get_scale() == 2.0**7  # the overflow was seen and the step skipped
    assert_same(params(m1), params(m2), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(o1.state[m1[0].weight]["G"], o2.state[m2[0].weight]["G"])


def test_bf16_autocast_trains_with_float32_curvature() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    optimizer = FOP(model, lr=0.05, **FAST)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 6, 6, generator=gen), torch.randint(0, 5, (32,), generator=gen)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    state = optimizer.state[model[0].weight]
    assert state["A"].dtype == torch.float32 and state["G_vectors"].dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_closure_is_supported() -> None:
    """step(closure) returns the closure's loss (at the parameters before the step) and moves the
    parameters exactly as zero_grad, backward, step() without a closure do."""
    model, reference = mlp(), mlp()
    optimizer, plain = KFAC(model, **FAST), KFAC(reference, **FAST)
    for x, y in batches(3):

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        plain.zero_grad()
        expected = F.cross_entropy(reference(x), y)
        expected.backward()
        plain.step()
        torch.testing.assert_close(optimizer.step(closure), expected, rtol=0, atol=0)
        assert_same(params(model), params(reference), rtol=0, atol=0)


INVALID = [
    ("lr", -0.1, "lr"),
    ("momentum", 1.0, "momentum"),
    ("weight_decay", -1.0, "weight_decay"),
    ("damping", 0.0, "damping"),
    ("damping", -1e-3, "damping"),
    ("factor_decay", 1.0, "factor_decay"),
    ("curvature_update_interval", 0, "curvature_update_interval"),
    ("inverse_update_interval", 2.5, "inverse_update_interval"),
    ("projection_eps", -1.0, "projection_eps"),
    ("kl_clip", 0.0, "kl_clip"),
    ("fallback", "lamb", "fallback"),
    ("fallback_lr", -1.0, "fallback_lr"),
    ("fallback_betas", (0.9, 1.0), "fallback_betas"),
    ("fallback_eps", 0.0, "fallback_eps"),
    ("factor_samples", 0, "factor_samples"),
    ("factor_samples", -4, "factor_samples"),
    ("factor_samples", 2.5, "factor_samples"),
    ("factor_samples", True, "factor_samples"),
    ("factor_samples", "64", "factor_samples"),
    ("weight_sharing", "mean", "weight_sharing"),
    ("weight_sharing", None, "weight_sharing"),
]


@pytest.mark.parametrize("cls", [FOP, KFAC])
@pytest.mark.parametrize("name,value,message", INVALID)
def test_invalid_hyperparameters_raise(cls: type, name: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(mlp(), **{name: value})


def test_nesterov_needs_momentum_and_model_is_required() -> None:
    with pytest.raises(ValueError, match="nesterov"):
        FOP(mlp(), momentum=0.0, nesterov=True)
    with pytest.raises(TypeError, match="takes the model"):
        FOP(list(mlp().parameters()))  # type: ignore[arg-type]


def test_no_warnings_in_a_normal_run() -> None:
    model = cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, FOP(model), batches(3, shape=(3, 6, 6), classes=5))


def test_grouped_convolutions_and_norms_use_the_fallback_group() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
        nn.GroupNorm(2, 4),
        nn.Conv2d(4, 6, 1),
        nn.Flatten(),
        nn.Linear(6 * 5 * 5, 3),
    ).to(DTYPE)
    with pytest.warns(UserWarning, match=r"0 \(Conv2d\): grouped convolution \(groups=4\)"):
        optimizer = FOP(model, fallback="adamw", **FAST)
    assert [layer.name for layer in optimizer.layers] == ["2", "4"]
    fallback = {id(p) for p in optimizer.param_groups[1]["params"]}
    assert fallback == {id(p) for p in [*model[0].parameters(), *model[1].parameters()]}
    before = params(model)
    train(model, optimizer, batches(2, shape=(4, 5, 5), classes=3))
    assert all(not torch.equal(a, b) for a, b in zip(before, params(model)))


@pytest.mark.parametrize("cls", [FOP, KFAC])
def test_signature_lists_and_documents_every_argument(cls: type) -> None:
    """Config systems (LightningCLI, jsonargparse) build optimizers from the signature: nothing hidden in **kwargs."""
    import inspect

    parameters = inspect.signature(cls).parameters
    assert all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in parameters.values())
    assert {"lr", "damping", "fallback", "fallback_lr", "kl_clip", "factor_samples"} <= set(parameters)
    doc = inspect.getdoc(cls.__init__) or ""
    undocumented = [name for name in parameters if not re.search(rf"^\s+{name}\b.*:", doc, re.MULTILINE)]
    assert undocumented == [], undocumented
