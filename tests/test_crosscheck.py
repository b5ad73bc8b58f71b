"""Cross-check of the Kronecker factors against an independent K-FAC: curvlinops' ``KFACLinearOperator``.

curvlinops (Dangel et al.) computes K-FAC with its own hooks, patch extraction (einconv) and
scaling rules. We ask it for the *empirical* Fisher (gradients of the actual loss with the true
labels), the "expand" approximation for weight sharing (every spatial position / sequence position
is a row) and, against fop's ``weight_sharing="reduce"``, its "reduce" approximation (one row per
sample: the mean input row and the summed output gradient over the positions),
``CrossEntropyLoss(reduction="mean")``, and weight and bias treated jointly
(``separate_weight_and_bias=False``: the bias is a trailing ones column of the input, as in fop).

What is compared, all in float64:

* The Kronecker *product*, which does not depend on how the scale is split between the factors.
  fop's Fisher block acts on the folded gradient matrix ``X = [W | b]`` (out, in_f) as
  ``F·X = G X A``; on the row-major vectorisation ``vec(X)`` this is the matrix
  ``torch.kron(G, A)`` (A is symmetric). curvlinops' dense matrix is indexed by its parameter list
  (``vec(W)`` row-major, then ``b``), so fop's block is permuted into that order before comparing.
  The dense operator of the whole model (block-diagonal over layers) is compared at once.
* The individual factors, up to one scalar per layer: ``A_fop = c·A_ref`` and ``G_fop = G_ref/c``.
  With fop's documented conventions (``A = Σ_rows a aᵀ / rows``, ``G = (1/N) Σ_rows δ δᵀ`` with δ
  the per-sample output gradients, ``δ = N·∂L/∂out`` for a mean loss) and curvlinops' (its input
  covariance divides by ``N·positions``, its gradient covariance multiplies the mean-loss output
  gradients by ``N``), the scalar is exactly 1; :func:`test_factor_scale_convention` pins that, for
  reduce too (curvlinops' reduce averages the inputs over the positions and divides by ``N``, sums
  the output gradients and scales them as expand's).

``pytest.importorskip`` is only a guard for users without the optional reference; ``make test``
installs curvlinops, so these tests run in CI.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

curvlinops = pytest.importorskip("curvlinops")

import fop

DTYPE = torch.float64
N_CLASSES = 5


# ------------------------------------------------------------------------------------- models
def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, N_CLASSES))


def _cnn() -> nn.Module:
    # biased and unbiased convolutions, padding, stride and dilation, then a Linear head
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, stride=2, bias=False),
        nn.Tanh(),
        nn.Conv2d(5, 3, 2, dilation=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, N_CLASSES),
    )


class _SequenceMLP(nn.Module):
    """A Linear applied to every position of a (batch, positions, features) input (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 4)
        self.head = nn.Linear(3 * 4, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(x)).flatten(1))


_INPUT_SHAPES = {"mlp": (12,), "cnn": (3, 8, 8), "sequence": (3, 6)}
_MODELS = {"mlp": _mlp, "cnn": _cnn, "sequence": _SequenceMLP}


def _setup(kind: str, n: int = 24, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = _MODELS[kind]().to(DTYPE)
    x = torch.randn(n, *_INPUT_SHAPES[kind], dtype=DTYPE)
    y = torch.randint(0, N_CLASSES, (n,))
    return model, x, y


# ------------------------------------------------------------------------------------- reference
def _reference(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], kfac_approx: str = "expand"):
    """curvlinops' empirical-Fisher K-FAC (``kfac_approx`` expand or reduce, joint weight and bias) on ``batches``.

    The factors are computed right away, at the model's current weights (curvlinops would
    otherwise compute them lazily at the first product, possibly after fop's step).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    op = curvlinops.KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(reduction="mean"),
        params,
        batches,
        fisher_type="empirical",  # FisherType.EMPIRICAL is a str enum with this value
        kfac_approx=kfac_approx,
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    op.compute_kronecker_factors()
    return op, params


def _dense(op, dim: int) -> torch.Tensor:
    eye = torch.eye(dim, dtype=DTYPE)
    if hasattr(op, "to_scipy"):  # curvlinops >= 2: a PyTorch linear operator
        return op @ eye
    import numpy as np  # curvlinops 1.x: a scipy LinearOperator

    return torch.from_numpy(op @ np.eye(dim)).to(DTYPE)


def _reference_factors(op) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    if hasattr(op, "state_dict"):
        state = op.state_dict()
        return state["input_covariances"], state["gradient_covariances"]
    return op._input_covariances, op._gradient_covariances


def _ours_dense(optimizer: fop.KroneckerOptimizer, params: list[nn.Parameter]) -> torch.Tensor:
    """fop's block-diagonal ``A ⊗ G`` in curvlinops' parameter order."""
    offsets, total = {}, 0
    for p in params:
        offsets[id(p)] = total
        total += p.numel()
    dense = torch.zeros(total, total, dtype=DTYPE)
    for layer in optimizer.layers:
        state = optimizer.state[layer.weight]
        a, g = state["A"], state["G"]
        out, in_f = layer.out_features, layer.in_features
        assert a.shape == (in_f, in_f) and g.shape == (out, out)
        block = torch.kron(g, a)  # acts on the row-major vec of the folded (out, in_f) matrix
        # folded index o*in_f + i  ->  position in curvlinops' flat parameter vector
        w_cols = layer.weight[0].numel()
        index = torch.empty(out * in_f, dtype=torch.long)
        rows = torch.arange(out)
        for i in range(w_cols):
            index[rows * in_f + i] = offsets[id(layer.weight)] + rows * w_cols + i
        if layer.bias is not None:
            index[rows * in_f + w_cols] = offsets[id(layer.bias)] + rows
        dense[index[:, None], index[None, :]] = block
    return dense


def _one_step(optimizer, model, batches, loss_scale: float = 1.0) -> None:
    optimizer.zero_grad()
    for x, y in batches:
        (nn.functional.cross_entropy(model(x), y) * loss_scale).backward()
    optimizer.step()


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = expected.abs().max().clamp_min(1e-300)
    err = (actual - expected).abs().max() / scale
    assert err < 1e-10, f"{what}: max relative deviation {err:.3e}"


# ------------------------------------------------------------------------------------- tests
WEIGHT_SHARING = ["expand", "reduce"]  # fop's weight_sharing, curvlinops' kfac_approx


@pytest.mark.parametrize("weight_sharing", WEIGHT_SHARING)
@pytest.mark.parametrize("optimizer_cls", [fop.FOP, fop.KFAC], ids=["FOP", "KFAC"])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "sequence"])
def test_kronecker_product_matches_curvlinops(kind: str, optimizer_cls, weight_sharing: str) -> None:
    model, x, y = _setup(kind)
    op, params = _reference(model, [(x, y)], weight_sharing)  # before the step: the reference sees the same weights
    expected = _dense(op, sum(p.numel() for p in params))

    optimizer = optimizer_cls(
        model, lr=0.1, curvature_update_interval=1, inverse_update_interval=1, weight_sharing=weight_sharing
    )
    assert {id(p) for layer in optimizer.layers for p in layer.params()} == {id(p) for p in params}
    _one_step(optimizer, model, [(x, y)])

    ours = _ours_dense(optimizer, params)
    _close(ours, expected, f"{kind}: A⊗G vs curvlinops' dense K-FAC")
    assert expected.abs().max() > 0


@pytest.mark.parametrize("kind", ["mlp", "cnn", "sequence"])
def test_factors_match_curvlinops_up_to_one_scalar(kind: str) -> None:
    model, x, y = _setup(kind, seed=1)
    op, _ = _reference(model, [(x, y)])
    ref_a, ref_g = _reference_factors(op)
    optimizer = fop.FOP(model, lr=0.1, curvature_update_interval=1, inverse_update_interval=1)
    _one_step(optimizer, model, [(x, y)])
    for layer in optimizer.layers:
        a, g = optimizer.state[layer.weight]["A"], optimizer.state[layer.weight]["G"]
        a_ref, g_ref = ref_a[layer.name], ref_g[layer.name]
        c = (a * a_ref).sum() / (a_ref * a_ref).sum()  # least-squares scalar, A_fop ≈ c·A_ref
        _close(a, c * a_ref, f"{kind}/{layer.name}: A")
        _close(g, g_ref / c, f"{kind}/{layer.name}: G")


@pytest.mark.parametrize("weight_sharing", WEIGHT_SHARING)
@pytest.mark.parametrize("kind", ["mlp", "cnn", "sequence"])
def test_factor_scale_convention(kind: str, weight_sharing: str) -> None:
    """The documented normalisation (A per row, G per sample) is curvlinops' too: the scalar is 1."""
    model, x, y = _setup(kind, seed=2)
    op, _ = _reference(model, [(x, y)], weight_sharing)
    ref_a, ref_g = _reference_factors(op)
    optimizer = fop.KFAC(model, lr=0.1, weight_sharing=weight_sharing)
    _one_step(optimizer, model, [(x, y)])
    for layer in optimizer.layers:
        _close(optimizer.state[layer.weight]["A"], ref_a[layer.name], f"{kind}/{layer.name}: A")
        _close(optimizer.state[layer.weight]["G"], ref_g[layer.name], f"{kind}/{layer.name}: G")


@pytest.mark.parametrize("weight_sharing", WEIGHT_SHARING)
@pytest.mark.parametrize("kind", ["mlp", "cnn", "sequence"])
def test_gradient_accumulation_matches_curvlinops_on_the_union(kind: str, weight_sharing: str) -> None:
    """Two micro-batches (loss divided by 2, one step) give the factors of the whole batch.

    curvlinops gets the same two batches as a data loader (``num_data`` = their total), which is
    K-FAC over the union of the samples.
    """
    model, x, y = _setup(kind, n=20, seed=3)
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    op, params = _reference(model, batches, weight_sharing)
    expected = _dense(op, sum(p.numel() for p in params))
    ref_a, ref_g = _reference_factors(op)
    optimizer = fop.FOP(model, lr=0.1, weight_sharing=weight_sharing)
    _one_step(optimizer, model, batches, loss_scale=0.5)
    _close(_ours_dense(optimizer, params), expected, f"{kind}: accumulated A⊗G")
    for layer in optimizer.layers:
        _close(optimizer.state[layer.weight]["A"], ref_a[layer.name], f"{kind}/{layer.name}: A")
        _close(optimizer.state[layer.weight]["G"], ref_g[layer.name], f"{kind}/{layer.name}: G")


@pytest.mark.parametrize("optimizer_cls", [fop.FOP, fop.KFAC], ids=["FOP", "KFAC"])
def test_running_average_of_factors_matches_curvlinops(optimizer_cls) -> None:
    """Second capture: ``A ← ρA₀ + (1−ρ)A₁`` (and G alike), each from curvlinops at that step's weights."""
    decay = 0.8
    model, x, y = _setup("cnn", n=16, seed=4)
    torch.manual_seed(5)
    x2 = torch.randn_like(x)
    y2 = torch.randint(0, N_CLASSES, (16,))
    ref0_a, ref0_g = _reference_factors(_reference(model, [(x, y)])[0])
    optimizer = optimizer_cls(
        model, lr=0.05, factor_decay=decay, curvature_update_interval=1, inverse_update_interval=1
    )
    _one_step(optimizer, model, [(x, y)])
    ref1_a, ref1_g = _reference_factors(_reference(model, [(x2, y2)])[0])  # at the updated weights
    _one_step(optimizer, model, [(x2, y2)])
    for layer in optimizer.layers:
        state = optimizer.state[layer.weight]
        name = layer.name
        _close(state["A"], decay * ref0_a[name] + (1 - decay) * ref1_a[name], f"{name}: averaged A")
        _close(state["G"], decay * ref0_g[name] + (1 - decay) * ref1_g[name], f"{name}: averaged G")


# ------------------------------------------------------------------------------------- whole steps
def _flat_grad(model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = nn.functional.cross_entropy(model(x), y)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def _layer_slices(params: list[nn.Parameter], layers) -> dict[str, torch.Tensor]:
    """Boolean mask of each curvature layer's entries in the flat parameter vector."""
    offsets, total = {}, 0
    for p in params:
        offsets[id(p)] = (total, total + p.numel())
        total += p.numel()
    masks = {}
    for layer in layers:
        mask = torch.zeros(total, dtype=torch.bool)
        for p in layer.params():
            lo, hi = offsets[id(p)]
            mask[lo:hi] = True
        masks[layer.name] = mask
    return masks


def _flat_params(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _trust_region_scale(lr: float, kl_clip: float | None, dg: torch.Tensor) -> torch.Tensor:
    """K-FAC's KL clipping as documented: ``ν = min(1, √(κ / (lr² Σ⟨d, g⟩)))`` (1 when disabled)."""
    if kl_clip is None:
        return torch.ones((), dtype=DTYPE)
    return torch.clamp(torch.sqrt(kl_clip / (lr * lr * dg.abs())), max=1.0)


@pytest.mark.parametrize("weight_sharing", WEIGHT_SHARING)
@pytest.mark.parametrize("kl_clip", [None, 1e-3], ids=["noclip", "clip"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_kfac_first_step_matches_curvlinops_inverse(kind: str, kl_clip: float | None, weight_sharing: str) -> None:
    """K-FAC's first update is ``−lr ν (A⊗G + λI)⁻¹ g`` with curvlinops' exactly damped inverse."""
    damping, lr = 1e-2, 0.5
    model, x, y = _setup(kind, seed=6)
    op, params = _reference(model, [(x, y)], weight_sharing)
    inverse = curvlinops.KFACInverseLinearOperator(op, damping=damping, use_exact_damping=True)
    grad = _flat_grad(model, params, x, y)
    direction = inverse @ grad
    nu = _trust_region_scale(lr, kl_clip, direction @ grad)
    if kl_clip is not None:
        assert nu < 0.5  # the clip is active for these settings
    before = _flat_params(params)
    optimizer = fop.KFAC(
        model,
        lr=lr,
        momentum=0.0,
        damping=damping,
        kl_clip=kl_clip,
        trust_region="step",
        damping_mode="exact",
        weight_sharing=weight_sharing,
    )
    _one_step(optimizer, model, [(x, y)])
    _close(_flat_params(params) - before, -lr * nu * direction, f"{kind}: K-FAC update")


@pytest.mark.parametrize("kl_clip", [None, 1e-3], ids=["noclip", "clip"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_fop_first_step_matches_reference_built_on_curvlinops(kind: str, kl_clip: float | None) -> None:
    """FOP's first update, rebuilt layer by layer from curvlinops' ``F`` and ``M⁻¹`` and autograd halves.

    Halves as documented: the first ``ceil(n/2)`` samples and the rest; ``g1``, ``g2`` are the
    mean-loss gradients of each. Per layer (restricting vectors to the layer's entries; both
    curvlinops operators are block-diagonal over layers)::

        s = ⟨g_diff, F g_avg⟩ / (⟨g_avg, F g_avg⟩ + ε),   g_perp = g_diff − s g_avg
        β = ⟨g_avg, M⁻¹g_perp⟩ / ⟨g_perp, M⁻¹g_perp⟩,  n_comb = M⁻¹(g_avg + β g_perp)
        η = ⟨g_avg, n_comb⟩ / ⟨g_avg + β g_perp, n_comb⟩,  d = η n_comb

    and the whole update is ``Δθ = −lr ν d`` with the trust-region scale ``ν`` over all layers.
    """
    damping, lr, eps = 1e-2, 0.5, 1e-12
    model, x, y = _setup(kind, n=24, seed=7)
    op, params = _reference(model, [(x, y)])
    inverse = curvlinops.KFACInverseLinearOperator(op, damping=damping, use_exact_damping=True)
    g1 = _flat_grad(model, params, x[:12], y[:12])
    g2 = _flat_grad(model, params, x[12:], y[12:])
    before = _flat_params(params)
    optimizer = fop.FOP(
        model,
        lr=lr,
        momentum=0.0,
        damping=damping,
        kl_clip=kl_clip,
        projection_eps=eps,
        trust_region="step",
        damping_mode="exact",
    )
    _one_step(optimizer, model, [(x, y)])
    delta = _flat_params(params) - before

    betas, directions = [], {}
    for name, mask in _layer_slices(params, optimizer.layers).items():
        avg = torch.where(mask, (g1 + g2) / 2, 0.0)
        diff = torch.where(mask, g1 - g2, 0.0)
        f_avg = op @ avg
        s = diff @ f_avg / (avg @ f_avg + eps)
        perp = diff - s * avg
        assert abs(perp @ f_avg) <= 1e-4 * (perp.norm() * f_avg.norm())  # Fisher-orthogonal (up to ε)
        n_avg, n_perp = inverse @ avg, inverse @ perp
        beta = (avg @ n_perp) / (perp @ n_perp)
        n_comb = n_avg + beta * n_perp
        eta = (avg @ n_comb) / ((avg + beta * perp) @ n_comb)
        directions[name] = eta * n_comb
        diag = optimizer.diagnostics()[name]
        _close(diag["beta"], beta, f"{kind}/{name}: beta")
        _close(diag["eta"], eta, f"{kind}/{name}: eta")
        _close(diag["projection"], s, f"{kind}/{name}: projection s")
        betas.append(float(beta))
    grad = (g1 + g2) / 2  # p.grad: the whole (even-sized) batch's mean-loss gradient
    nu = _trust_region_scale(lr, kl_clip, sum(d @ grad for d in directions.values()))
    if kl_clip is not None:
        assert nu < 0.5  # the clip is active for these settings
    for name, mask in _layer_slices(params, optimizer.layers).items():
        _close(delta[mask], -lr * nu * directions[name][mask], f"{kind}/{name}: FOP update")
    assert any(abs(b) > 1e-3 for b in betas)  # the projection is really in play
