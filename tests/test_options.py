"""The paper-reading options of FOP/K-FAC, each against a dense float64 reference.

``fisher="mc"``, ``damping_mode="factored"``, ``eta="sum"``, ``factor_decay=0`` (replace), the
``trust_region`` scope of ``kl_clip``, ``PAPER_PRESET``, and the gradient-noise scale.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fop import FOP, KFAC, PAPER_PRESET
from fop import functional as Fn

DTYPE = torch.float64
FAST = dict(curvature_update_interval=1, inverse_update_interval=1)


def spd(n: int, gen: torch.Generator) -> torch.Tensor:
    m = torch.randn(n, n, generator=gen, dtype=DTYPE)
    return m @ m.T / n + 1e-3 * torch.eye(n, dtype=DTYPE)


def vec(x: torch.Tensor) -> torch.Tensor:
    return x.T.reshape(-1)  # column-major: vec(G X A) = (Aᵀ ⊗ G) vec(X)


def unvec(v: torch.Tensor, out: int, inp: int) -> torch.Tensor:
    return v.reshape(inp, out).T


def factored(a: torch.Tensor, g: torch.Tensor, damping: float) -> torch.Tensor:
    """The dense factored-damping matrix (A + π√λ I) ⊗ (G + √λ/π I), π from the traces."""
    pi = math.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0]))
    eye_a, eye_g = torch.eye(a.shape[0], dtype=DTYPE), torch.eye(g.shape[0], dtype=DTYPE)
    return torch.kron(a + pi * math.sqrt(damping) * eye_a, g + math.sqrt(damping) / pi * eye_g)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(DTYPE)


def data(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen, dtype=DTYPE), torch.randint(0, 4, (n,), generator=gen)


def folded(layer: nn.Linear) -> torch.Tensor:
    return torch.cat([layer.weight, layer.bias[:, None]], 1).detach().clone()


# ------------------------------------------------------------------------------------ functional
def test_factored_damping_inverse_matches_dense_kronecker() -> None:
    gen = torch.Generator().manual_seed(0)
    a, g, x = spd(7, gen), spd(5, gen), torch.randn(5, 7, generator=gen, dtype=DTYPE)
    damping = 0.03
    expected = unvec(torch.linalg.solve(factored(a, g, damping), vec(x)), 5, 7)
    torch.testing.assert_close(Fn.damped_inverse(x, a, g, damping, "factored"), expected, rtol=1e-10, atol=1e-12)
    # factored damping adds more than λ: it shrinks the step compared with exact damping
    exact = Fn.damped_inverse(x, a, g, damping, "exact")
    assert float(Fn.inner(x, Fn.damped_inverse(x, a, g, damping, "factored"))) < float(Fn.inner(x, exact))


def test_fop_direction_with_factored_damping_matches_dense() -> None:
    """M is the factored matrix; the projection s still uses the undamped F = A ⊗ G."""
    gen = torch.Generator().manual_seed(1)
    a, g = spd(6, gen), spd(4, gen)
    g1, g2 = torch.randn(4, 6, generator=gen, dtype=DTYPE), torch.randn(4, 6, generator=gen, dtype=DTYPE)
    damping = 0.05
    fisher, damped = torch.kron(a, g), factored(a, g, damping)

    def solve(x: torch.Tensor) -> torch.Tensor:
        return unvec(torch.linalg.solve(damped, vec(x)), 4, 6)

    g_avg, g_diff = (g1 + g2) / 2, g1 - g2
    s = (vec(g_diff) @ fisher @ vec(g_avg)) / (vec(g_avg) @ fisher @ vec(g_avg))
    g_perp = g_diff - s * g_avg
    n_avg, n_perp = solve(g_avg), solve(g_perp)
    beta = (g_avg * n_perp).sum() / (g_perp * n_perp).sum()
    n_comb = n_avg + beta * n_perp
    eta = (g_avg * n_comb).sum() / ((g_avg + beta * g_perp) * n_comb).sum()
    result = Fn.fop_direction(g1, g2, a, g, damping, eps=0.0, damping_mode="factored")
    torch.testing.assert_close(result.beta, beta, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(result.projection, s, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(result.direction, eta * n_comb, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("projection", [True, False])
@pytest.mark.parametrize("eta", ["mean", "sum"])
def test_factored_cholesky_route_equals_the_eigenbasis_route(projection: bool, eta: str) -> None:
    """Cholesky inverses give FOP's factored-damping direction of the eigenbasis route, batched over
    layers of one shape, with a singular (rank-deficient) factor among them."""
    gen = torch.Generator().manual_seed(3)
    low_rank = torch.randn(7, 2, generator=gen, dtype=DTYPE)
    a = torch.stack([spd(7, gen), low_rank @ low_rank.T])
    g = torch.stack([spd(5, gen), spd(5, gen)])
    g1, g2 = torch.randn(2, 5, 7, generator=gen, dtype=DTYPE), torch.randn(2, 5, 7, generator=gen, dtype=DTYPE)
    damping = 0.02
    via_eigen = Fn.fop_direction_eigen(
        g1, g2, Fn.eigen_factor(a), Fn.eigen_factor(g), damping, 1e-12, projection, "factored", eta
    )
    via_cholesky = Fn.fop_direction_factored(g1, g2, Fn.factored_inverses(a, g, damping), 1e-12, projection, eta)
    for name in ("direction", "beta", "eta", "projection"):
        torch.testing.assert_close(getattr(via_cholesky, name), getattr(via_eigen, name), rtol=1e-9, atol=1e-12)
    x = g1 - g2
    torch.testing.assert_close(
        Fn.damped_inverse_factored(x, Fn.factored_inverses(a, g, damping)),
        Fn.damped_inverse_eigen(x, Fn.eigen_factor(a), Fn.eigen_factor(g), damping, "factored"),
        rtol=1e-9,
        atol=1e-12,
    )


@pytest.mark.parametrize("fails", [("float32",), ("float32", "float64")])
def test_damped_factor_inverse_retries_in_float64_then_through_eigh(
    monkeypatch: pytest.MonkeyPatch, fails: tuple[str, ...]
) -> None:
    """A failed float32 Cholesky is retried in float64; where that fails too, the eigendecomposition
    (round-off eigenvalues clamped) gives the inverse. Either way the result is (A + shift·I)⁻¹."""
    gen = torch.Generator().manual_seed(4)
    a = spd(6, gen).to(torch.float32)
    shift = torch.tensor(0.1)
    real = torch.linalg.cholesky_ex
    calls: list[torch.dtype] = []

    def flaky(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(x.dtype)
        chol, info = real(x)
        return chol, torch.ones_like(info) if str(x.dtype).endswith(fails) else info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", flaky)
    inverse = Fn.damped_factor_inverse(a, shift)
    assert calls == [torch.float32, torch.float64] and inverse.dtype == torch.float32
    expected = torch.linalg.inv(a.double() + 0.1 * torch.eye(6, dtype=DTYPE)).float()
    torch.testing.assert_close(inverse, expected, rtol=1e-4, atol=1e-5)


def test_damped_factor_inverse_keeps_the_previous_inverse_for_a_non_finite_factor() -> None:
    gen = torch.Generator().manual_seed(5)
    good, previous = spd(4, gen), spd(4, gen)
    bad = good.clone()
    bad[0, 1] = bad[1, 0] = float("nan")
    shifts = torch.tensor([0.1, 0.1], dtype=DTYPE)
    inverse = Fn.damped_factor_inverse(torch.stack([good, bad]), shifts, torch.stack([previous, previous]))
    torch.testing.assert_close(inverse[0], torch.linalg.inv(good + 0.1 * torch.eye(4, dtype=DTYPE)))
    torch.testing.assert_close(inverse[1], previous)
    # no previous inverse: that of a zero factor, I / shift (a plain damped gradient step)
    torch.testing.assert_close(
        Fn.damped_factor_inverse(bad, torch.tensor(0.1, dtype=DTYPE)), torch.eye(4, dtype=DTYPE) / 0.1
    )


def test_damped_factor_inverse_makes_the_previous_inverse_only_when_it_needs_it() -> None:
    gen = torch.Generator().manual_seed(6)
    good, previous = spd(4, gen), spd(4, gen)
    bad = good.clone()
    bad[2, 2] = float("inf")
    calls: list[int] = []

    def make() -> torch.Tensor:
        calls.append(1)
        return torch.stack([previous, previous])

    shifts = torch.tensor([0.1, 0.1], dtype=DTYPE)
    healthy = Fn.damped_factor_inverse(torch.stack([good, good]), shifts, make)
    assert calls == []
    torch.testing.assert_close(healthy[1], torch.linalg.inv(good + 0.1 * torch.eye(4, dtype=DTYPE)))
    repaired = Fn.damped_factor_inverse(torch.stack([good, bad]), shifts, make)
    assert calls == [1]
    torch.testing.assert_close(repaired[0], healthy[0])
    torch.testing.assert_close(repaired[1], previous)


def test_eta_sum_convention_doubles_eta_and_the_direction() -> None:
    """The paper's g_tot = g1 + g2: η* = 2(1+r)/(1+3r) ∈ [1, 2], twice the mean convention."""
    gen = torch.Generator().manual_seed(2)
    a, g = spd(6, gen), spd(4, gen)
    g1, g2 = torch.randn(4, 6, generator=gen, dtype=DTYPE), torch.randn(4, 6, generator=gen, dtype=DTYPE)
    mean = Fn.fop_direction(g1, g2, a, g, 0.05)
    total = Fn.fop_direction(g1, g2, a, g, 0.05, eta_convention="sum")
    torch.testing.assert_close(total.eta, 2 * mean.eta)
    torch.testing.assert_close(total.direction, 2 * mean.direction)
    assert 1.0 <= float(total.eta) <= 2.0
    # K-FAC (projection off) keeps η* = 1 under either convention
    off = Fn.fop_direction(g1, g2, a, g, 0.05, projection=False, eta_convention="sum")
    torch.testing.assert_close(off.direction, Fn.damped_inverse((g1 + g2) / 2, a, g, 0.05))
    with pytest.raises(ValueError, match="eta convention"):
        Fn.fop_direction(g1, g2, a, g, 0.05, eta_convention="total")


def test_gradient_noise_terms_are_unbiased_against_per_sample_gradients() -> None:
    """Brute force: per-sample gradients of a whole small data set give the exact tr Σ and |G|²;
    the two-halves estimate averaged over many batches (drawn with replacement) recovers both."""
    gen = torch.Generator().manual_seed(3)
    n_data, dim, half = 400, 12, 16
    centre = torch.randn(dim, generator=gen, dtype=DTYPE) * 0.3
    per_sample = centre + torch.randn(n_data, dim, generator=gen, dtype=DTYPE)  # stand-ins for ∇ℓ_i
    true_grad = per_sample.mean(0)
    trace = ((per_sample - true_grad) ** 2).sum(1).mean()  # population covariance: sampling with replacement
    draws = 20000
    index = torch.randint(0, n_data, (draws, 2, half), generator=gen)
    g1 = per_sample[index[:, 0]].mean(1)[:, None, :]
    g2 = per_sample[index[:, 1]].mean(1)[:, None, :]
    est_trace, est_grad_sq = Fn.gradient_noise_terms(g1, g2, half)
    # standard errors over 20,000 draws are about 1% of each target
    torch.testing.assert_close(est_trace.mean(), trace, rtol=0.03, atol=0)
    torch.testing.assert_close(est_grad_sq.mean(), true_grad.square().sum(), rtol=0.05, atol=0)
    # the naive estimate |g_avg|² is biased upwards by tr Σ / (2b): the correction matters here
    naive = (0.5 * (g1 + g2)).square().sum((-2, -1)).mean()
    assert float(naive - true_grad.square().sum()) > 0.5 * float(trace) / (2 * half)


def test_optimizer_noise_scale_matches_brute_force_on_a_small_model() -> None:
    """FOP at lr = 0 (the model stays put) over many random batches, against tr Σ / |G|² from the
    per-sample gradients of the whole data set (one backward pass per sample)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    gen = torch.Generator().manual_seed(4)
    x_all = torch.randn(200, 4, generator=gen, dtype=DTYPE)
    y_all = (x_all[:, 0] > 0).long() + (x_all[:, 1] > 0.5).long()
    grads = []
    for i in range(len(x_all)):
        model.zero_grad()
        F.cross_entropy(model(x_all[i : i + 1]), y_all[i : i + 1]).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    per_sample = torch.stack(grads)
    mean = per_sample.mean(0)
    expected = float(((per_sample - mean) ** 2).sum(1).mean() / mean.square().sum())

    optimizer = FOP(model, lr=0.0, momentum=0.0, **FAST)
    for _ in range(400):
        index = torch.randint(0, len(x_all), (32,), generator=gen)
        optimizer.zero_grad()
        F.cross_entropy(model(x_all[index]), y_all[index]).backward()
        optimizer.step()
    estimate = optimizer.gradient_noise_scale(reset=True)
    assert estimate is not None
    assert abs(estimate / expected - 1) < 0.15, (estimate, expected)
    assert optimizer.gradient_noise_scale() is None  # reset
    layer = optimizer.diagnostics()["0"]
    assert {"noise_trace", "noise_grad_sq"} <= set(layer)
    assert KFAC(mlp()).gradient_noise_scale() is None


# ------------------------------------------------------------------------------------ Monte-Carlo Fisher
def test_mc_fisher_factor_matches_per_sample_passes_with_sampled_labels() -> None:
    """G = (1/n) Σ_i δ_i δ_iᵀ, δ_i the output gradient of CE(output_i, ŷ_i) for ŷ ~ softmax(output),
    by one backward pass per sample; A and the gradients are those of the training loss."""
    model = mlp()
    x, y = data()
    reference = copy.deepcopy(model)
    optimizer = FOP(model, lr=0.1, fisher="mc", kl_clip=None, **FAST)
    output = model(x)
    optimizer.sample_fisher(output, generator=torch.Generator().manual_seed(7))
    F.cross_entropy(output, y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()

    with torch.no_grad():
        logits = reference(x)
        labels = torch.multinomial(torch.softmax(logits, -1), 1, generator=torch.Generator().manual_seed(7))
    outputs: dict[int, list[torch.Tensor]] = {0: [], 2: []}
    for i in range(len(x)):
        acts = {}
        hooks = [reference[k].register_forward_hook(lambda m, a, o, k=k: acts.__setitem__(k, o)) for k in (0, 2)]
        loss = F.cross_entropy(reference(x[i : i + 1]), labels[i])
        for h in hooks:
            h.remove()
        deltas = torch.autograd.grad(loss, [acts[0], acts[2]])
        outputs[0].append(deltas[0][0])
        outputs[2].append(deltas[1][0])
    for k in (0, 2):
        d = torch.stack(outputs[k])
        torch.testing.assert_close(optimizer.state[model[k].weight]["G"], d.T @ d / len(x), rtol=1e-10, atol=1e-14)
    # the Monte-Carlo pass writes nothing into .grad
    ref_grads = torch.autograd.grad(F.cross_entropy(reference(x), y), list(reference.parameters()))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_mc_fisher_needs_the_sample_on_curvature_steps_only() -> None:
    model = mlp()
    x, y = data()
    optimizer = KFAC(model, fisher="mc", curvature_update_interval=2, inverse_update_interval=2)
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"sample_fisher\(output\)"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing changed
    optimizer.zero_grad()
    for step in range(3):
        assert optimizer.curvature_step == (step % 2 == 0)
        output = model(x)
        optimizer.sample_fisher(output)  # a no-op on the step in between
        F.cross_entropy(output, y).backward()
        optimizer.step()
        optimizer.zero_grad()
    with pytest.raises(RuntimeError, match="fisher='mc'"):
        FOP(mlp()).sample_fisher(mlp()(x))


# ------------------------------------------------------------------------------------ optimizer options
def test_kfac_step_with_factored_damping_equals_dense() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 3).to(DTYPE)
    x, y = torch.randn(10, 5, dtype=DTYPE), torch.randint(0, 3, (10,))
    before = folded(model)
    lr, damping = 0.3, 0.02
    optimizer = KFAC(model, lr=lr, momentum=0.0, damping=damping, damping_mode="factored", kl_clip=None, **FAST)
    F.cross_entropy(model(x), y).backward()
    grad = torch.cat([model.weight.grad, model.bias.grad[:, None]], 1).clone()
    optimizer.step()
    a_rows = torch.cat([x, torch.ones(10, 1, dtype=DTYPE)], 1)
    a = a_rows.T @ a_rows / 10
    delta = torch.softmax(x @ before[:, :-1].T + before[:, -1], 1) - F.one_hot(y, 3).to(DTYPE)
    g = delta.T @ delta / 10
    step = unvec(torch.linalg.solve(factored(a, g, damping), vec(grad)), 3, 6)
    torch.testing.assert_close(folded(model), before - lr * step, rtol=1e-9, atol=1e-12)


def test_factored_fop_between_inverse_updates_uses_the_inverted_factors() -> None:
    """Factors every step, inverses every third: each step uses the factors of the last inverse update
    (as the eigenbasis route does), and a new damping applies at once, to those same factors."""
    model = mlp()
    lr, damping = 0.2, 0.05
    optimizer = FOP(
        model,
        lr=lr,
        momentum=0.0,
        damping=damping,
        damping_mode="factored",
        kl_clip=None,
        factor_decay=0.5,
        curvature_update_interval=1,
        inverse_update_interval=3,
    )
    inverted: dict[str, torch.Tensor] = {}
    for k in range(7):
        if k == 4:
            damping = 0.2
            optimizer.param_groups[0]["damping"] = damping
        x, y = data(seed=10 + k)
        halves = []
        for part in (slice(0, 4), slice(4, 8)):
            ref = copy.deepcopy(model)
            F.cross_entropy(ref(x[part]), y[part]).backward()
            halves.append([torch.cat([m.weight.grad, m.bias.grad[:, None]], 1) for m in (ref[0], ref[2])])
        before = [folded(m) for m in (model[0], model[2])]
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        for i, m in enumerate((model[0], model[2])):
            state = optimizer.state[m.weight]
            if k % 3 == 0:
                inverted[f"A{i}"], inverted[f"G{i}"] = state["A"].clone(), state["G"].clone()
            eig_a, eig_g = Fn.eigen_factor(inverted[f"A{i}"]), Fn.eigen_factor(inverted[f"G{i}"])
            expected = Fn.fop_direction_eigen(
                halves[0][i], halves[1][i], eig_a, eig_g, damping, 1e-12, True, "factored"
            )
            torch.testing.assert_close(folded(m), before[i] - lr * expected.direction, rtol=1e-9, atol=1e-12)
            assert ("A_at_inverse" in state) == (k % 3 != 0)


def test_switching_the_damping_mode_replaces_the_curvature_state() -> None:
    model = mlp()
    optimizer = KFAC(model, lr=0.1, curvature_update_interval=1, inverse_update_interval=5)
    x, y = data()
    for mode, present, absent in (
        ("exact", "A_values", "A_inv"),
        ("factored", "A_inv", "A_values"),
        ("exact", "A_values", "A_inv"),
    ):
        optimizer.param_groups[0]["damping_mode"] = mode
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        state = optimizer.state[model[0].weight]
        assert present in state and absent not in state


def test_fop_eta_sum_step_is_the_functional_direction() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 3).to(DTYPE)
    x, y = torch.randn(8, 5, dtype=DTYPE), torch.randint(0, 3, (8,))
    before = folded(model)
    halves = []
    for part in (slice(0, 4), slice(4, 8)):
        ref = copy.deepcopy(model)
        F.cross_entropy(ref(x[part]), y[part]).backward()
        halves.append(torch.cat([ref.weight.grad, ref.bias.grad[:, None]], 1))
    optimizer = FOP(model, lr=0.5, momentum=0.0, damping=0.05, kl_clip=None, eta="sum", damping_mode="factored", **FAST)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    state = optimizer.state[model.weight]
    expected = Fn.fop_direction(halves[0], halves[1], state["A"], state["G"], 0.05, 1e-12, True, "factored", "sum")
    torch.testing.assert_close(folded(model), before - 0.5 * expected.direction)
    assert 1.0 <= float(optimizer.diagnostics()["Linear"]["eta"]) <= 2.0


def test_factor_decay_zero_replaces_the_factors() -> None:
    model = mlp()
    optimizer = KFAC(model, factor_decay=0.0, **FAST)
    for seed in (1, 2):
        x, y = data(seed=seed)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    rows = torch.cat([x, torch.ones(len(x), 1, dtype=DTYPE)], 1)
    torch.testing.assert_close(optimizer.state[model[0].weight]["A"], rows.T @ rows / len(x))


@pytest.mark.parametrize("scope", ["step", "direction"])
def test_trust_region_scope_decides_whether_the_learning_rate_acts(scope: str) -> None:
    """With a binding clip, "step" makes the update independent of lr; "direction" keeps it ∝ lr."""
    changes = []
    for lr in (0.1, 0.2):
        model = mlp()
        before = folded(model[0])
        optimizer = KFAC(model, lr=lr, momentum=0.0, kl_clip=1e-8, trust_region=scope, **FAST)
        x, y = data()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        changes.append(folded(model[0]) - before)
        stats = optimizer.trust_region_stats()
        assert stats is not None and stats["clipped_fraction"] == 1.0 and stats["nu_median"] < 1
    if scope == "step":
        torch.testing.assert_close(changes[1], changes[0])
    else:
        torch.testing.assert_close(changes[1], 2 * changes[0])
    assert KFAC(mlp(), kl_clip=None).trust_region_stats() is None


def test_paper_preset_trains() -> None:
    """PAPER_PRESET against the same run with ``eta="mean"``: the first step is exactly twice as long
    (η* doubled, same MC samples and factors), the factors are replaced by each batch's (``A`` of
    the first layer is the last batch's ``[x, 1]ᵀ[x, 1]/n``), and the loss falls."""
    runs = {}
    for eta in ("sum", "mean"):
        model = mlp()
        optimizer = FOP(model, lr=0.05, **{**PAPER_PRESET, "eta": eta}, **FAST)
        before = folded(model[0])
        losses, first, etas = [], None, None
        for step in range(5):
            x, y = data(n=32, seed=step)
            optimizer.zero_grad()
            output = model(x)
            torch.manual_seed(100 + step)  # the same Monte-Carlo labels in both runs
            optimizer.sample_fisher(output)
            loss = F.cross_entropy(output, y)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if step == 0:
                first = folded(model[0]) - before
                etas = {name: float(v["eta"]) for name, v in optimizer.diagnostics().items()}
        runs[eta] = (model, optimizer, losses, first, etas)
    model, optimizer, losses, first, etas = runs["sum"]
    torch.testing.assert_close(first, 2 * runs["mean"][3], rtol=1e-10, atol=1e-14)
    assert etas == pytest.approx({name: 2 * value for name, value in runs["mean"][4].items()}, rel=1e-12)
    assert all(1.0 <= value <= 2.0 for value in etas.values())
    x = torch.cat([data(n=32, seed=4)[0], torch.ones(32, 1, dtype=DTYPE)], 1)
    torch.testing.assert_close(optimizer.state[model[0].weight]["A"], x.T @ x / 32, rtol=1e-12, atol=1e-14)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "name, value", [("fisher", "true"), ("damping_mode", "tikhonov"), ("eta", "total"), ("trust_region", "lr")]
)
def test_invalid_choices_raise(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be one of"):
        FOP(mlp(), **{name: value})


def test_mc_fisher_on_a_non_finite_output_skips_the_step_without_failing() -> None:
    model = mlp()
    x, y = data()
    optimizer = FOP(model, fisher="mc", **FAST)
    before = [p.detach().clone() for p in model.parameters()]
    output = model(x) * float("nan")
    optimizer.sample_fisher(output)
    F.cross_entropy(output, y).backward()
    optimizer.step()
    assert int(optimizer.skipped_steps) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_noise_terms_from_the_fop_direction_equal_those_of_the_raw_halves() -> None:
    """The rotation into the eigenbasis is orthogonal: |g_avg|² and |g1 − g2|² come free from it."""
    gen = torch.Generator().manual_seed(5)
    a, g = spd(6, gen), spd(4, gen)
    g1, g2 = torch.randn(4, 6, generator=gen, dtype=DTYPE), torch.randn(4, 6, generator=gen, dtype=DTYPE)
    result = Fn.fop_direction(g1, g2, a, g, 0.05)
    from_direction = Fn.noise_terms(result.avg_sq, result.diff_sq, 8)
    for got, want in zip(from_direction, Fn.gradient_noise_terms(g1, g2, 8)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert Fn.fop_direction(g1, g2, a, g, 0.05, projection=False).diff_sq is None
