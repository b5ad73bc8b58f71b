"""The mathematics of K-FAC and FOP for one layer, as plain functions.

Notation (see ``docs/fop-algorithm.md`` of the project): a layer's gradient is a matrix ``X`` of
shape ``(out, in)`` (bias folded in as the last input column). The Kronecker factors are
``A`` (in, in), the second moment of the layer inputs, and ``G`` (out, out), the second moment of the
per-sample output gradients. The Fisher block is ``F = A ⊗ G`` and acts on a gradient matrix as::

    F·X = G X A

The damped Fisher is ``M = F + λI``. With the eigendecompositions ``A = Q_A diag(a) Q_Aᵀ`` and
``G = Q_G diag(g) Q_Gᵀ`` the damping is exact (not the usual factored approximation)::

    M⁻¹X = Q_G [ (Q_Gᵀ X Q_A) / (g aᵀ + λ) ] Q_Aᵀ

A diagonal input factor (``nn.Embedding``: ``A = diag(c)``, token frequencies) is passed as the
1-D tensor ``c`` of its diagonal; its eigenbasis is the standard one, so :func:`eigen_diagonal`
returns ``Eigen(c, None)`` and the rotations skip ``Q_A`` (no ``vocab × vocab`` matrix is formed).

All functions accept leading batch dimensions (``(..., out, in)`` gradients with ``(..., in, in)``
and ``(..., out, out)`` factors), so that layers of one shape can be processed together. None of
them synchronises with the host: guards are expressed with ``torch.where``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Eigen",
    "FOPDirection",
    "DAMPING_MODES",
    "ETA_CONVENTIONS",
    "compute_dtype",
    "damped_fisher_eigenvalues",
    "damped_inverse",
    "damped_inverse_eigen",
    "eigen_diagonal",
    "eigen_factor",
    "fisher_inner",
    "fisher_mv",
    "fop_direction",
    "fop_direction_eigen",
    "inner",
    "safe_divide",
    "gradient_noise_terms",
    "noise_terms",
    "to_eigenbasis",
    "from_eigenbasis",
]


DAMPING_MODES = ("exact", "factored")
ETA_CONVENTIONS = ("mean", "sum")


class Eigen(NamedTuple):
    """Eigendecomposition ``F = Q diag(values) Qᵀ`` of a symmetric positive semi-definite factor.

    ``vectors`` is None for a diagonal factor (``Q = I``, ``values`` its diagonal; :func:`eigen_diagonal`).
    """

    values: Tensor
    vectors: Tensor | None


class FOPDirection(NamedTuple):
    """Result of :func:`fop_direction`.

    ``direction`` is ``η*·n_comb`` (the update before the learning rate), ``beta`` is ``β*``,
    ``eta`` is ``η*`` and ``projection`` is the Fisher projection scalar ``s``. ``avg_sq`` and
    ``diff_sq`` are ``|g_avg|²`` and ``|g1 − g2|²`` (the rotation into the eigenbasis is orthogonal,
    so they come free from the rotated gradients; for :func:`noise_terms`), ``None`` with the
    projection off, where ``g1 − g2`` is not formed.
    """

    direction: Tensor
    beta: Tensor
    eta: Tensor
    projection: Tensor
    avg_sq: Tensor | None = None
    diff_sq: Tensor | None = None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype curvature is computed in: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def inner(x: Tensor, y: Tensor) -> Tensor:
    """Frobenius inner product ``⟨X, Y⟩ = Σ_ij X_ij Y_ij`` over the last two dimensions."""
    return (x * y).sum(dim=(-2, -1))


def safe_divide(num: Tensor, den: Tensor, valid: Tensor, default: float) -> Tensor:
    """``num / den`` where ``valid``, else ``default``, with no division by an invalid ``den``
    (so neither NaN nor a host synchronisation enters a step)."""
    quotient = num / torch.where(valid, den, torch.ones_like(den))
    return torch.where(valid, quotient, default)


def fisher_mv(x: Tensor, a_factor: Tensor, g_factor: Tensor) -> Tensor:
    """Kronecker-factored Fisher-vector product ``(A ⊗ G)·X = G X A`` (1-D ``a_factor``: ``A = diag(a_factor)``)."""
    if a_factor.dim() == 1:
        return (g_factor @ x) * a_factor
    return g_factor @ x @ a_factor


def fisher_inner(x: Tensor, y: Tensor, a_factor: Tensor, g_factor: Tensor) -> Tensor:
    """Fisher inner product ``⟨X, F·Y⟩ = ⟨X, G Y A⟩``."""
    return inner(x, fisher_mv(y, a_factor, g_factor))


def eigen_factor(factor: Tensor, previous: Eigen | None = None) -> Eigen:
    """Eigendecomposition of a symmetric PSD factor, with numerical guards.

    The decomposition runs in float32 (float64 for float64 factors) whatever the autocast state.
    If ``torch.linalg.eigh`` fails to converge it is retried in float64 with a small diagonal
    jitter. Negative round-off eigenvalues are clamped to zero. Non-finite results never escape:
    where they occur, ``previous`` is kept (or the identity basis with zero eigenvalues, i.e.
    a plain damped gradient step, when there is no previous decomposition).
    """
    dtype = compute_dtype(factor.dtype)
    sym = factor.to(dtype)
    sym = 0.5 * (sym + sym.transpose(-2, -1))
    with torch.autocast(device_type=sym.device.type, enabled=False):
        try:
            values, vectors = torch.linalg.eigh(sym)
        except RuntimeError:  # ill-conditioned input: retry in float64 with a jitter
            wide = sym.to(torch.float64)
            n = wide.shape[-1]
            jitter = 1e-10 * wide.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1e-30)
            wide = wide + jitter[..., None, None] * torch.eye(n, dtype=wide.dtype, device=wide.device)
            try:
                values, vectors = torch.linalg.eigh(wide)
            except RuntimeError:
                values = torch.full(sym.shape[:-1], float("nan"), dtype=torch.float64, device=sym.device)
                vectors = torch.full_like(wide, float("nan"))
            values, vectors = values.to(dtype), vectors.to(dtype)
    values = values.clamp_min(0.0)
    finite = torch.isfinite(values).all(-1) & torch.isfinite(vectors).all(dim=(-2, -1))
    if previous is None:
        n = sym.shape[-1]
        fallback = Eigen(
            torch.zeros_like(values),
            torch.eye(n, dtype=dtype, device=sym.device).expand_as(sym),
        )
    else:
        fallback = Eigen(previous.values.to(dtype), previous.vectors.to(dtype))
    values = torch.where(finite[..., None], values, fallback.values)
    vectors = torch.where(finite[..., None, None], vectors, fallback.vectors)
    return Eigen(values, vectors)


def eigen_diagonal(diagonal: Tensor, previous: Eigen | None = None) -> Eigen:
    """The eigendecomposition of the diagonal factor ``diag(diagonal)``: its entries, standard basis.

    Entries are clamped at zero; where any is non-finite, ``previous`` is kept (or zero
    eigenvalues, a plain damped gradient step, when there is none), as in :func:`eigen_factor`.
    """
    values = diagonal.to(compute_dtype(diagonal.dtype)).clamp_min(0.0)
    fallback = torch.zeros_like(values) if previous is None else previous.values.to(values.dtype)
    return Eigen(torch.where(torch.isfinite(values).all(-1, keepdim=True), values, fallback), None)


def _eigen(factor: Tensor) -> Eigen:
    """:func:`eigen_diagonal` of a 1-D (diagonal) factor, else :func:`eigen_factor`."""
    return eigen_diagonal(factor) if factor.dim() == 1 else eigen_factor(factor)


def to_eigenbasis(x: Tensor, eig_a: Eigen, eig_g: Eigen) -> Tensor:
    """Rotate a gradient matrix into the Kronecker eigenbasis: ``X̃ = Q_Gᵀ X Q_A``."""
    assert eig_g.vectors is not None
    x = eig_g.vectors.transpose(-2, -1) @ x
    return x if eig_a.vectors is None else x @ eig_a.vectors


def from_eigenbasis(x: Tensor, eig_a: Eigen, eig_g: Eigen) -> Tensor:
    """Inverse of :func:`to_eigenbasis`: ``X = Q_G X̃ Q_Aᵀ``."""
    assert eig_g.vectors is not None
    x = eig_g.vectors @ x
    return x if eig_a.vectors is None else x @ eig_a.vectors.transpose(-2, -1)


def _fisher_eigenvalues(eig_a: Eigen, eig_g: Eigen) -> Tensor:
    """Eigenvalues of ``A ⊗ G`` laid out as an (out, in) matrix: ``g aᵀ``."""
    return eig_g.values[..., :, None] * eig_a.values[..., None, :]


def damped_fisher_eigenvalues(
    eig_a: Eigen, eig_g: Eigen, damping: float | Tensor, mode: str = "exact"
) -> Tensor:
    """Eigenvalues of the damped Fisher ``M`` in the Kronecker eigenbasis, as an (out, in) matrix.

    ``"exact"``: ``M = A ⊗ G + λI``, eigenvalues ``g aᵀ + λ``.

    ``"factored"`` (Martens & Grosse 2015, §6.3; ASDL's default): ``M = (A + π√λ I) ⊗ (G + √λ/π I)``
    with ``π = √((tr A / dim A) / (tr G / dim G))`` (1 where a trace vanishes), eigenvalues
    ``(g + √λ/π)(a + π√λ)ᵀ``. Cheaper to invert factor by factor (no eigendecomposition needed),
    and it damps more: it adds ``λ`` plus the cross terms ``π√λ·G`` and ``√λ/π·A``.
    """
    if mode == "exact":
        return _fisher_eigenvalues(eig_a, eig_g) + damping
    if mode != "factored":
        raise ValueError(f"damping mode must be one of {DAMPING_MODES}, got {mode!r}")
    mean_a = eig_a.values.mean(-1)
    mean_g = eig_g.values.mean(-1)
    valid = (mean_a > 0) & (mean_g > 0)
    pi = safe_divide(mean_a, mean_g, valid, 1.0).sqrt()
    root = damping**0.5 if not isinstance(damping, Tensor) else damping.sqrt()
    damped_a = eig_a.values + (pi * root)[..., None]
    damped_g = eig_g.values + (root / pi)[..., None]
    return damped_g[..., :, None] * damped_a[..., None, :]


def damped_inverse_eigen(
    x: Tensor, eig_a: Eigen, eig_g: Eigen, damping: float | Tensor, damping_mode: str = "exact"
) -> Tensor:
    """``M⁻¹X`` from the factors' eigendecompositions (``M``: :func:`damped_fisher_eigenvalues`).

    This is K-FAC's natural-gradient direction for a gradient ``X``.
    """
    rotated = to_eigenbasis(x, eig_a, eig_g)
    return from_eigenbasis(rotated / damped_fisher_eigenvalues(eig_a, eig_g, damping, damping_mode), eig_a, eig_g)


def damped_inverse(
    x: Tensor, a_factor: Tensor, g_factor: Tensor, damping: float | Tensor, damping_mode: str = "exact"
) -> Tensor:
    """``M⁻¹X``, e.g. ``(A ⊗ G + λI)⁻¹ X``, from the factors themselves (decomposes them first).

    A 1-D ``a_factor`` is the diagonal of a diagonal ``A`` (no batch dimensions then). K-FAC's direction
    for a gradient ``X`` (``kfac_direction``, its old name, still works with a DeprecationWarning).
    """
    dtype = compute_dtype(x.dtype)
    return damped_inverse_eigen(x.to(dtype), _eigen(a_factor), eigen_factor(g_factor), damping, damping_mode)


_DEPRECATED = {"kfac_direction": "damped_inverse"}


def __getattr__(name: str) -> object:
    """``kfac_direction``: the damped inverse under its old name (deprecated)."""
    if name in _DEPRECATED:
        import warnings

        new = _DEPRECATED[name]
        warnings.warn(f"fop.functional.{name} is deprecated: use {new} (the same function)", DeprecationWarning, 2)
        return globals()[new]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def gradient_noise_terms(g1: Tensor, g2: Tensor, half_batch: float | Tensor) -> tuple[Tensor, Tensor]:
    """Unbiased estimates of ``tr(Σ)`` and ``|G|²`` from the gradients of two independent halves.

    McCandlish et al. (2018), App. A, with ``B_small = b`` (one half) and ``B_big = 2b`` (the batch):
    ``|G|² ≈ (B_big|g_avg|² − B_small·½(|g1|² + |g2|²)) / (B_big − B_small) = |g_avg|² − ¼|g1 − g2|²``
    and ``tr Σ ≈ (½(|g1|² + |g2|²) − |g_avg|²) / (1/B_small − 1/B_big) = ½·b·|g1 − g2|²``, where
    ``Σ`` is the per-sample gradient covariance and ``G`` the true gradient. The simple noise scale
    is ``B_noise = tr Σ / |G|²``: the batch size beyond which larger batches stop paying off.
    Both terms are noisy; sum them over layers and average over steps before taking the ratio.
    Sums run over the last two dimensions.
    """
    avg = 0.5 * (g1 + g2)
    return noise_terms(inner(avg, avg), inner(g1 - g2, g1 - g2), half_batch)


def noise_terms(avg_sq: Tensor, diff_sq: Tensor, half_batch: float | Tensor) -> tuple[Tensor, Tensor]:
    """:func:`gradient_noise_terms` from ``|g_avg|²`` and ``|g1 − g2|²``: ``(½·b·|g1 − g2|², |g_avg|² − ¼|g1 − g2|²)``."""
    return 0.5 * half_batch * diff_sq, avg_sq - 0.25 * diff_sq


def fop_direction_eigen(
    g1: Tensor,
    g2: Tensor,
    eig_a: Eigen,
    eig_g: Eigen,
    damping: float | Tensor,
    eps: float = 1e-12,
    projection: bool = True,
    damping_mode: str = "exact",
    eta_convention: str = "mean",
) -> FOPDirection:
    """FOP's layer direction from the factors' eigendecompositions; see :func:`fop_direction`.

    Everything happens in the eigenbasis, where ``F`` and ``M⁻¹`` are diagonal and the inner
    products are unchanged (the basis is orthogonal): four small matmuls rotate ``g_avg`` and
    ``g_diff`` in, two rotate ``n_comb`` out.
    """
    avg = to_eigenbasis(0.5 * (g1 + g2), eig_a, eig_g)
    if eta_convention not in ETA_CONVENTIONS:
        raise ValueError(f"eta convention must be one of {ETA_CONVENTIONS}, got {eta_convention!r}")
    fisher = _fisher_eigenvalues(eig_a, eig_g)
    inv_m = 1.0 / damped_fisher_eigenvalues(eig_a, eig_g, damping, damping_mode)
    n_avg = avg * inv_m
    a_avg = inner(avg, n_avg)  # ⟨g_avg, M⁻¹ g_avg⟩
    if not projection:
        zero = torch.zeros_like(a_avg)
        return FOPDirection(from_eigenbasis(n_avg, eig_a, eig_g), zero, torch.ones_like(a_avg), zero)

    diff = to_eigenbasis(g1 - g2, eig_a, eig_g)
    f_avg = fisher * avg  # F·g_avg
    s = inner(diff, f_avg) / (inner(avg, f_avg) + eps)
    perp = diff - s[..., None, None] * avg  # Fisher-orthogonal to g_avg
    n_perp = perp * inv_m
    b = inner(avg, n_perp)  # ⟨g_avg, M⁻¹ g_perp⟩
    c = inner(perp, n_perp)  # ⟨g_perp, M⁻¹ g_perp⟩ ≥ 0
    tiny = torch.finfo(c.dtype).eps * a_avg.abs()
    beta = safe_divide(b, c, c > tiny, 0.0)
    n_comb = n_avg + beta[..., None, None] * n_perp
    # ⟨g_avg, n_comb⟩ and ⟨g_comb, n_comb⟩ in closed form (M⁻¹ is symmetric)
    numer = a_avg + beta * b
    denom = a_avg + 2.0 * beta * b + beta * beta * c
    eta = safe_divide(numer, denom, denom > 0, 1.0)
    if eta_convention == "sum":  # the paper's g_tot = g1 + g2: ⟨g_tot, n_comb⟩ = 2⟨g_avg, n_comb⟩
        eta = 2.0 * eta
    direction = from_eigenbasis(eta[..., None, None] * n_comb, eig_a, eig_g)
    return FOPDirection(direction, beta, eta, s, inner(avg, avg), inner(diff, diff))


def fop_direction(
    g1: Tensor,
    g2: Tensor,
    a_factor: Tensor,
    g_factor: Tensor,
    damping: float | Tensor,
    eps: float = 1e-12,
    projection: bool = True,
    damping_mode: str = "exact",
    eta_convention: str = "mean",
) -> FOPDirection:
    """FOP's update direction for one layer, before the learning rate.

    Given the mean-loss gradients ``g1``, ``g2`` of the two sub-batches (``(out, in)`` matrices),
    the Kronecker factors ``A`` (in, in), ``G`` (out, out) and the damping ``λ``::

        g_avg  = (g1 + g2) / 2,          g_diff = g1 − g2
        s      = ⟨g_diff, F g_avg⟩ / (⟨g_avg, F g_avg⟩ + ε)           (Fisher projection)
        g_perp = g_diff − s g_avg                                   (⟨g_avg, F g_perp⟩ = 0)
        n_avg  = M⁻¹ g_avg,              n_perp = M⁻¹ g_perp,       M = A ⊗ G + λI
        β*     = ⟨g_avg, n_perp⟩ / ⟨g_perp, n_perp⟩                 (0 if ⟨g_perp, n_perp⟩ ≈ 0)
        g_comb = g_avg + β* g_perp,      n_comb = n_avg + β* n_perp
        η*     = ⟨g_avg, n_comb⟩ / ⟨g_comb, n_comb⟩
        return   η* · n_comb

    ``β*`` minimises the paper's quadratic model of ``L1 + L2`` along ``n_comb(β)``:
    ``m(β) = −⟨g1 + g2, n_comb(β)⟩ + ½⟨n_comb(β), M n_comb(β)⟩``.

    ``η*`` uses the convention ``g_tot = g_avg`` (the paper's Eq. 17 writes ``g1 + g2``, which only
    doubles it): it minimises the model of the *mean* loss ``(L1 + L2)/2`` along ``n_comb``,
    ``m(η) = −η⟨g_avg, n_comb⟩ + ½η²⟨n_comb, M n_comb⟩``. With
    ``r = ⟨g_avg, n_perp⟩² / (⟨g_perp, n_perp⟩⟨g_avg, n_avg⟩) ∈ [0, 1]`` this is
    ``η* = (1 + r) / (1 + 3r) ∈ [½, 1]``, and ``η* = 1`` when ``β* = 0``: with ``projection=False``
    (``β* = 0``) the result is exactly K-FAC's step ``M⁻¹ g_avg``.

    ``eta_convention="sum"`` takes the paper's Eq. 17 literally, ``g_tot = g1 + g2``: η* doubles,
    ``η* = 2(1 + r)/(1 + 3r) ∈ [1, 2]`` (``projection=False`` keeps η* = 1, K-FAC). ``damping_mode``
    chooses ``M`` (:func:`damped_fisher_eigenvalues`); the projection always uses the undamped
    ``F = A ⊗ G``.

    A 1-D ``a_factor`` is the diagonal of a diagonal ``A`` (``nn.Embedding``; no batch dimensions then).

    Returns a :class:`FOPDirection` ``(direction, beta, eta, projection)``.
    """
    dtype = compute_dtype(g1.dtype)
    return fop_direction_eigen(
        g1.to(dtype), g2.to(dtype), _eigen(a_factor), eigen_factor(g_factor), damping, eps, projection,
        damping_mode, eta_convention,
    )  # fmt: skip
