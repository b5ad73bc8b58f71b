"""fop.functional against explicit dense float64 computations with torch.kron."""

from __future__ import annotations

import pytest
import torch

from fop import functional as Fn

DAMPING = 0.05


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def spd(n: int, gen: torch.Generator, rank: int | None = None) -> torch.Tensor:
    """A random symmetric positive (semi-)definite matrix with a spread of eigenvalues."""
    m = torch.randn(n, rank or n, generator=gen)
    return m @ m.T / n + (0 if rank else 1e-3) * torch.eye(n)


def vec(x: torch.Tensor) -> torch.Tensor:
    """Column-major vectorisation, for which vec(G X A) = (Aᵀ ⊗ G) vec(X)."""
    return x.T.reshape(-1)


def unvec(v: torch.Tensor, out: int, inp: int) -> torch.Tensor:
    return v.reshape(inp, out).T


class Dense:
    """The dense float64 reference: F = A ⊗ G as an explicit matrix."""

    def __init__(self, a: torch.Tensor, g: torch.Tensor, damping: float) -> None:
        self.out, self.inp = g.shape[0], a.shape[0]
        self.fisher = torch.kron(a, g)
        self.damped = self.fisher + damping * torch.eye(self.fisher.shape[0])

    def inner_f(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return vec(x) @ self.fisher @ vec(y)

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        return unvec(torch.linalg.solve(self.damped, vec(x)), self.out, self.inp)

    def fop(self, g1: torch.Tensor, g2: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
        g_avg, g_diff = (g1 + g2) / 2, g1 - g2
        s = self.inner_f(g_diff, g_avg) / (self.inner_f(g_avg, g_avg) + eps)
        g_perp = g_diff - s * g_avg
        n_avg, n_perp = self.solve(g_avg), self.solve(g_perp)
        beta = (g_avg * n_perp).sum() / (g_perp * n_perp).sum()
        g_comb, n_comb = g_avg + beta * g_perp, n_avg + beta * n_perp
        eta = (g_avg * n_comb).sum() / (g_comb * n_comb).sum()
        return eta * n_comb, beta, eta, s, g_perp


@pytest.fixture
def problem() -> tuple:
    gen = torch.Generator().manual_seed(0)
    out, inp = 5, 7
    a, g = spd(inp, gen), spd(out, gen)
    g1, g2 = torch.randn(out, inp, generator=gen), torch.randn(out, inp, generator=gen)
    return a, g, g1, g2


def test_fisher_mv_is_kronecker_product(problem: tuple) -> None:
    a, g, x, _ = problem
    dense = Dense(a, g, DAMPING)
    expected = unvec(dense.fisher @ vec(x), *x.shape)
    torch.testing.assert_close(Fn.fisher_mv(x, a, g), expected)
    y = torch.randn_like(x)
    torch.testing.assert_close(Fn.fisher_inner(y, x, a, g), dense.inner_f(y, x))


def test_damped_inverse_is_exact(problem: tuple) -> None:
    a, g, x, _ = problem
    torch.testing.assert_close(Fn.damped_inverse(x, a, g, DAMPING), Dense(a, g, DAMPING).solve(x))


def test_damped_inverse_of_singular_factors(problem: tuple) -> None:
    """Rank-deficient factors (fewer samples than features) are fine: the damping makes M invertible."""
    gen = torch.Generator().manual_seed(1)
    a, g = spd(7, gen, rank=2), spd(5, gen, rank=1)
    x = problem[2]
    torch.testing.assert_close(Fn.damped_inverse(x, a, g, DAMPING), Dense(a, g, DAMPING).solve(x))


def test_fop_direction_matches_dense(problem: tuple) -> None:
    a, g, g1, g2 = problem
    eps = 1e-12
    expected_dir, beta, eta, s, _ = Dense(a, g, DAMPING).fop(g1, g2, eps)
    result = Fn.fop_direction(g1, g2, a, g, DAMPING, eps)
    torch.testing.assert_close(result.direction, expected_dir)
    torch.testing.assert_close(result.beta, beta)
    torch.testing.assert_close(result.eta, eta)
    torch.testing.assert_close(result.projection, s)


@pytest.mark.parametrize("damping_mode", ["exact", "factored"])
def test_perpendicular_component_is_fisher_orthogonal(problem: tuple, damping_mode: str) -> None:
    """The library's projection scalar s makes g_perp = g_diff − s·g_avg orthogonal to g_avg in the
    undamped dense F = A ⊗ G (both damping modes), and its direction is η*·M⁻¹(g_avg + β* g_perp)."""
    a, g, g1, g2 = problem
    dense = Dense(a, g, DAMPING)
    result = Fn.fop_direction(g1, g2, a, g, DAMPING, 0.0, damping_mode=damping_mode)
    g_avg, g_diff = (g1 + g2) / 2, g1 - g2
    g_perp = g_diff - result.projection * g_avg
    scale = dense.inner_f(g_avg, g_avg).sqrt() * dense.inner_f(g_perp, g_perp).sqrt()
    assert abs(float(dense.inner_f(g_avg, g_perp) / scale)) < 1e-12
    assert abs(float(dense.inner_f(g_diff, g_avg) / scale)) > 1e-3  # the projection removed something
    damped = dense.damped
    if damping_mode == "factored":  # (A + π√λ I) ⊗ (G + √λ/π I), π = √((tr A / dim A) / (tr G / dim G))
        pi = float((a.trace() / a.shape[0]) / (g.trace() / g.shape[0])) ** 0.5
        root = DAMPING**0.5
        damped = torch.kron(a + pi * root * torch.eye(a.shape[0]), g + root / pi * torch.eye(g.shape[0]))
    n_comb = unvec(torch.linalg.solve(damped, vec(g_avg + result.beta * g_perp)), *g_avg.shape)
    torch.testing.assert_close(result.direction, result.eta * n_comb, rtol=1e-10, atol=1e-12)


def test_beta_minimises_the_quadratic_model(problem: tuple) -> None:
    """β* minimises m(β) = −⟨g1 + g2, n_comb(β)⟩ + ½⟨n_comb(β), M n_comb(β)⟩ (fine scan)."""
    a, g, g1, g2 = problem
    dense = Dense(a, g, DAMPING)
    result = Fn.fop_direction(g1, g2, a, g, DAMPING)
    *_, g_perp = dense.fop(g1, g2, 1e-12)
    g_avg = (g1 + g2) / 2
    n_avg, n_perp = dense.solve(g_avg), dense.solve(g_perp)

    def model(beta: torch.Tensor) -> torch.Tensor:
        n = n_avg + beta * n_perp
        return -(vec(g1 + g2) @ vec(n)) + 0.5 * vec(n) @ dense.damped @ vec(n)

    beta = float(result.beta)
    grid = torch.linspace(beta - 2.0, beta + 2.0, 4001)
    values = torch.stack([model(b) for b in grid])
    assert abs(float(grid[values.argmin()]) - beta) <= 1e-3 + 1e-9
    assert float(model(torch.tensor(beta))) <= float(values.min()) + 1e-12


def test_eta_minimises_mean_loss_model_and_lies_in_half_to_one(problem: tuple) -> None:
    """η* = argmin_η −η⟨g_avg, n_comb⟩ + ½η²⟨n_comb, M n_comb⟩ = (1 + r)/(1 + 3r) ∈ [½, 1]."""
    a, g, g1, g2 = problem
    dense = Dense(a, g, DAMPING)
    result = Fn.fop_direction(g1, g2, a, g, DAMPING)
    n_comb = result.direction / result.eta
    g_avg = (g1 + g2) / 2

    def model(eta: torch.Tensor) -> torch.Tensor:
        return -eta * (vec(g_avg) @ vec(n_comb)) + 0.5 * eta**2 * vec(n_comb) @ dense.damped @ vec(n_comb)

    eta = float(result.eta)
    grid = torch.linspace(0.0, 2.0, 20001)
    values = torch.stack([model(e) for e in grid])
    assert abs(float(grid[values.argmin()]) - eta) <= 1e-4
    assert 0.5 <= eta <= 1.0
    *_, g_perp = dense.fop(g1, g2, 1e-12)
    n_avg, n_perp = dense.solve(g_avg), dense.solve(g_perp)
    r = (g_avg * n_perp).sum() ** 2 / ((g_perp * n_perp).sum() * (g_avg * n_avg).sum())
    torch.testing.assert_close(result.eta, (1 + r) / (1 + 3 * r))


def test_projection_off_is_kfac(problem: tuple) -> None:
    a, g, g1, g2 = problem
    off = Fn.fop_direction(g1, g2, a, g, DAMPING, projection=False)
    kfac = Fn.damped_inverse((g1 + g2) / 2, a, g, DAMPING)
    torch.testing.assert_close(off.direction, kfac)
    assert float(off.beta) == 0.0 and float(off.eta) == 1.0


def test_identical_halves_give_kfac_step(problem: tuple) -> None:
    """g1 = g2: no orthogonal signal, ⟨g_perp, n_perp⟩ = 0 is guarded to β* = 0 and η* = 1."""
    a, g, g1, _ = problem
    result = Fn.fop_direction(g1, g1.clone(), a, g, DAMPING)
    assert float(result.beta) == 0.0 and float(result.eta) == 1.0
    torch.testing.assert_close(result.direction, Fn.damped_inverse(g1, a, g, DAMPING))


def test_zero_gradient_gives_zero_direction(problem: tuple) -> None:
    a, g, g1, _ = problem
    zero = torch.zeros_like(g1)
    result = Fn.fop_direction(zero, zero, a, g, DAMPING)
    assert torch.isfinite(result.direction).all() and float(result.direction.abs().max()) == 0.0


def test_batched_layers_match_one_by_one(problem: tuple) -> None:
    """Leading batch dimensions process same-shape layers together."""
    gen = torch.Generator().manual_seed(3)
    a = torch.stack([spd(7, gen) for _ in range(3)])
    g = torch.stack([spd(5, gen) for _ in range(3)])
    g1, g2 = torch.randn(3, 5, 7, generator=gen), torch.randn(3, 5, 7, generator=gen)
    batched = Fn.fop_direction(g1, g2, a, g, DAMPING)
    for i in range(3):
        single = Fn.fop_direction(g1[i], g2[i], a[i], g[i], DAMPING)
        torch.testing.assert_close(batched.direction[i], single.direction)
        torch.testing.assert_close(batched.beta[i], single.beta)


def test_eigen_factor_guards_non_finite_input() -> None:
    bad = torch.full((4, 4), float("nan"))
    eig = Fn.eigen_factor(bad)
    assert torch.isfinite(eig.values).all() and torch.isfinite(eig.vectors).all()
    previous = Fn.eigen_factor(torch.eye(4) * 2)
    kept = Fn.eigen_factor(bad, previous)
    torch.testing.assert_close(kept.values, previous.values)


def test_eigen_factor_runs_in_float32_under_autocast() -> None:
    a = spd(6, torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eig = Fn.eigen_factor(a)
    assert eig.values.dtype == torch.float32 and eig.vectors.dtype == torch.float32
    assert (eig.values >= 0).all()


def test_eigen_factor_retries_in_float64_when_eigh_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-converging float32 eigh is retried in float64 (with a tiny jitter), not propagated."""
    a = spd(5, torch.Generator().manual_seed(2)).to(torch.float32)
    real_eigh = torch.linalg.eigh
    calls: list[torch.dtype] = []

    def flaky_eigh(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(x.dtype)
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("the algorithm failed to converge")
        return real_eigh(x)

    monkeypatch.setattr(torch.linalg, "eigh", flaky_eigh)
    eig = Fn.eigen_factor(a)
    assert calls == [torch.float32, torch.float64]
    assert eig.values.dtype == torch.float32
    rebuilt = eig.vectors @ torch.diag(eig.values) @ eig.vectors.T
    torch.testing.assert_close(rebuilt, a, rtol=1e-5, atol=1e-6)


def test_kfac_direction_is_the_damped_inverse_under_a_deprecated_name() -> None:
    with pytest.warns(DeprecationWarning, match="use damped_inverse"):
        assert Fn.kfac_direction is Fn.damped_inverse
    assert "kfac_direction" not in Fn.__all__ and not hasattr(Fn, "kfac_direction_eigen")
