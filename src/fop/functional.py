"""The mathematics of K-FAC and FOP for one layer, as plain functions.

Notation (Lu & Armour, AAAI 2026; the project's ``docs/algorithm.md``): a layer's gradient is a matrix ``X`` of
shape ``(out, in)`` (bias folded in as the last input column). The Kronecker factors are
``A`` (in, in), the second moment of the layer inputs, and ``G`` (out, out), the second moment of the
per-sample output gradients. The Fisher block is ``F = A ⊗ G`` and acts on a gradient matrix as::

    F·X = G X A

Two dampings are implemented (``damping_mode``). Exact: the damped Fisher is ``M = F + λI``; with the
eigendecompositions ``A = Q_A diag(a) Q_Aᵀ`` and ``G = Q_G diag(g) Q_Gᵀ``::

    M⁻¹X = Q_G [ (Q_Gᵀ X Q_A) / (g aᵀ + λ) ] Q_Aᵀ

A diagonal input factor (``nn.Embedding``: ``A = diag(c)``, token frequencies) is passed as the
1-D tensor ``c`` of its diagonal; its eigenbasis is the standard one, so :func:`eigen_diagonal`
returns ``Eigen(c, None)`` and the rotations skip ``Q_A`` (no ``vocab × vocab`` matrix is formed).

Factored (the default since 0.3): ``M = (A + π√λ I) ⊗ (G + √λ/π I)`` is itself a Kronecker product, so no
eigendecomposition is needed: ``M⁻¹X = (G + √λ/π I)⁻¹ X (A + π√λ I)⁻¹`` with the two inverses
from Cholesky factorisations (:func:`factored_inverses`, :func:`fop_direction_factored`).

All functions accept leading batch dimensions (``(..., out, in)`` gradients with ``(..., in, in)``
and ``(..., out, out)`` factors), so that layers of one shape can be processed together. None of
them synchronises with the host: guards are expressed with ``torch.where``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Eigen",
    "Factored",
    "FOPDirection",
    "DAMPING_MODES",
    "ETA_CONVENTIONS",
    "compute_dtype",
    "damped_fisher_eigenvalues",
    "damped_inverse",
    "damped_inverse_eigen",
    "eigen_diagonal",
    "eigen_factor",
    "factored_damping_shifts",
    "factored_inverses",
    "damped_factor_inverse",
    "damped_inverse_factored",
    "fop_direction_factored",
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


class Factored(NamedTuple):
    """What factored damping needs of a layer: the factors and their damped inverses.

    ``a_inv = (A + π√λ I)⁻¹`` and ``g_inv = (G + √λ/π I)⁻¹`` (:func:`factored_inverses`); ``a_factor``
    and ``g_factor`` are the factors they were formed from, for FOP's projection, which uses the
    undamped ``F·X = G X A``. A diagonal ``A`` (``nn.Embedding``) keeps ``a_factor`` and ``a_inv`` 1-D.
    """

    a_factor: Tensor
    g_factor: Tensor
    a_inv: Tensor
    g_inv: Tensor


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
    sym = _symmetrized(factor.to(dtype))
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
        assert previous.vectors is not None  # a dense factor's previous basis
        fallback = Eigen(previous.values.to(dtype), previous.vectors.to(dtype))
    assert fallback.vectors is not None
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


def _symmetrized(x: Tensor) -> Tensor:
    """``(X + Xᵀ)/2`` as one new tensor (the factors can be large: no second temporary)."""
    return torch.add(x, x.transpose(-2, -1)).mul_(0.5)


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


def _times_input_side(x: Tensor, right: Tensor | None) -> Tensor:
    """``X R`` for an input-side matrix ``R``: None is the identity, a 1-D ``R`` a diagonal (Embedding)."""
    if right is None:
        return x
    return x * right if right.dim() == 1 else x @ right


def _avg_diff(g1: Tensor, g2: Tensor) -> Tensor:
    """``g_avg`` and ``g1 − g2`` interleaved row by row, shape ``(..., out, 2, in)``, in one buffer.

    The layout makes both sides of :func:`_sandwich_pair` a single product without a copy: viewed
    as ``(2·out, in)`` the pair is the rows of one product with ``R``; viewed as ``(out, 2·in)``
    its columns are those of one product with ``L``.
    """
    pair = g1.new_empty((*g1.shape[:-1], 2, g1.shape[-1]))
    torch.add(g1, g2, out=pair[..., 0, :]).mul_(0.5)
    torch.sub(g1, g2, out=pair[..., 1, :])
    return pair


def _sandwich_pair(left: Tensor, pair: Tensor, right: Tensor | None) -> Tensor:
    """``L P R`` for both matrices of an interleaved ``pair`` (:func:`_avg_diff`), in the same layout.

    Two products in all, each outer matrix read once: a classifier head's 2049x2049 ``R`` against
    10-row gradients is read once, not twice, and neither side needs the pair concatenated (each
    concatenation cost about as much as a product of a 256x257 layer).
    """
    rows, cols = pair.shape[-3], pair.shape[-1]
    batch = pair.shape[:-3]
    right_done = _times_input_side(pair.reshape(*batch, 2 * rows, cols), right)
    both = left @ right_done.reshape(*batch, rows, 2 * cols)
    return both.reshape(pair.shape)


def _fisher_eigenvalues(eig_a: Eigen, eig_g: Eigen) -> Tensor:
    """Eigenvalues of ``A ⊗ G`` laid out as an (out, in) matrix: ``g aᵀ``."""
    return eig_g.values[..., :, None] * eig_a.values[..., None, :]


def damped_fisher_eigenvalues(eig_a: Eigen, eig_g: Eigen, damping: float | Tensor, mode: str = "exact") -> Tensor:
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
    shift_a, shift_g = _factored_shifts(eig_a.values.mean(-1), eig_g.values.mean(-1), damping)
    damped_a = eig_a.values + shift_a[..., None]
    damped_g = eig_g.values + shift_g[..., None]
    return damped_g[..., :, None] * damped_a[..., None, :]


def _factored_shifts(mean_a: Tensor, mean_g: Tensor, damping: float | Tensor) -> tuple[Tensor, Tensor]:
    """``(π√λ, √λ/π)`` with ``π = √(mean_a / mean_g)`` (1 where either mean is not positive)."""
    valid = (mean_a > 0) & (mean_g > 0)
    pi = safe_divide(mean_a, mean_g, valid, 1.0).sqrt()
    root = damping**0.5 if not isinstance(damping, Tensor) else damping.sqrt()
    return pi * root, root / pi


def factored_damping_shifts(a_factor: Tensor, g_factor: Tensor, damping: float | Tensor) -> tuple[Tensor, Tensor]:
    """The diagonal shifts of factored damping, ``(π√λ, √λ/π)``, from the factors themselves.

    ``π = √((tr A / dim A) / (tr G / dim G))``, 1 where a trace is not positive: the same ``π``
    as :func:`damped_fisher_eigenvalues` (the trace is the sum of the eigenvalues).
    """
    dtype = compute_dtype(a_factor.dtype)
    diagonal_a = a_factor if a_factor.dim() == 1 else a_factor.diagonal(dim1=-2, dim2=-1)  # 1-D: a diagonal A
    mean_a = diagonal_a.to(dtype).mean(-1)
    mean_g = g_factor.to(dtype).diagonal(dim1=-2, dim2=-1).mean(-1)
    return _factored_shifts(mean_a, mean_g, damping)


def damped_factor_inverse(
    factor: Tensor, shift: Tensor, previous: Tensor | Callable[[], Tensor] | None = None
) -> Tensor:
    """``(F + shift·I)⁻¹`` of a symmetric PSD factor (batched), through a Cholesky factorisation.

    A 1-D ``factor`` is the diagonal of a diagonal factor (``nn.Embedding``), its inverse 1-D too.

    About fifteen times cheaper than :func:`eigen_factor` on a 2049x2049 factor. Runs in float32
    (float64 for float64 factors) whatever the autocast state. Where the Cholesky factorisation
    fails (float32 round-off can leave a factor indefinite by more than a small shift) it is
    retried in float64, and where that fails too, the inverse comes from the eigendecomposition
    with round-off eigenvalues clamped to zero (what the eigenbasis route of
    :func:`damped_fisher_eigenvalues` inverts). Non-finite results never escape: ``previous`` is
    kept there (or ``I / shift``, the inverse for a zero factor, when there is none). ``previous``
    may be a function that makes it, called only then (stacking a batch's previous inverses is a
    copy of them all, needed only when something failed).
    """
    dtype = compute_dtype(factor.dtype)
    if factor.dim() == 1:  # a diagonal factor (no batch dimensions), entries clamped as eigen_diagonal does
        inverse = 1.0 / (factor.to(dtype).clamp_min(0.0) + shift)
        fallback = torch.ones_like(inverse) / shift if previous is None else _made(previous).to(dtype)
        return torch.where(torch.isfinite(inverse).all(), inverse, fallback)
    damped = _symmetrized(factor.to(dtype))
    shift = torch.as_tensor(shift, dtype=dtype, device=damped.device).expand(damped.shape[:-2])
    damped.diagonal(dim1=-2, dim2=-1).add_(shift[..., None])  # in place: a large factor is not copied again
    with torch.autocast(device_type=damped.device.type, enabled=False):
        chol, info = torch.linalg.cholesky_ex(damped)
        inverse = torch.cholesky_inverse(chol)
        del chol
        healthy = (info == 0) & torch.isfinite(damped).all(dim=(-2, -1)) & torch.isfinite(inverse).all(dim=(-2, -1))
        if bool(healthy.all()):  # one host synchronisation per inverse update, as eigh's own check
            # the usual case returns here, without the repair's temporaries (each the factor's size)
            return inverse
        return _repaired_inverse(damped, shift, inverse, info, previous)


def _made(tensor: Tensor | Callable[[], Tensor]) -> Tensor:
    return tensor if isinstance(tensor, Tensor) else tensor()


def _repaired_inverse(
    damped: Tensor, shift: Tensor, inverse: Tensor, info: Tensor, previous: Tensor | Callable[[], Tensor] | None
) -> Tensor:
    """:func:`damped_factor_inverse` where a float32 factorisation failed or something is not finite."""
    dtype = damped.dtype
    if bool((info != 0).any()):
        chol, info = torch.linalg.cholesky_ex(damped.to(torch.float64))
        inverse = torch.where((info == 0)[..., None, None], torch.cholesky_inverse(chol).to(dtype), inverse)
        failed = info != 0
        if bool(failed.any()):
            # eigenvalues a + shift of the damped factor; max(a, 0) + shift = max(a + shift, shift)
            eig = eigen_factor(damped)
            assert eig.vectors is not None  # a dense factor
            values = torch.maximum(eig.values, shift[..., None])
            clamped = eig.vectors @ (eig.vectors.transpose(-2, -1) / values[..., :, None])
            inverse = torch.where(failed[..., None, None], clamped, inverse)
    finite = torch.isfinite(damped).all(dim=(-2, -1)) & torch.isfinite(inverse).all(dim=(-2, -1))
    if previous is None:
        eye = torch.eye(damped.shape[-1], dtype=dtype, device=damped.device)
        fallback = eye / shift[..., None, None]
    else:
        fallback = _made(previous).to(dtype)
    return torch.where(finite[..., None, None], inverse, fallback)


def factored_inverses(
    a_factor: Tensor, g_factor: Tensor, damping: float | Tensor, previous: Factored | None = None
) -> Factored:
    """A layer's :class:`Factored`: ``(A + π√λ I)⁻¹`` and ``(G + √λ/π I)⁻¹`` by :func:`damped_factor_inverse`."""
    dtype = compute_dtype(a_factor.dtype)
    shift_a, shift_g = factored_damping_shifts(a_factor, g_factor, damping)
    a_inv = damped_factor_inverse(a_factor, shift_a, None if previous is None else previous.a_inv)
    g_inv = damped_factor_inverse(g_factor, shift_g, None if previous is None else previous.g_inv)
    return Factored(a_factor.to(dtype), g_factor.to(dtype), a_inv, g_inv)


def damped_inverse_factored(x: Tensor, factored: Factored) -> Tensor:
    """``M⁻¹X = (G + √λ/π I)⁻¹ X (A + π√λ I)⁻¹``: K-FAC's direction under factored damping."""
    return _times_input_side(factored.g_inv @ x, factored.a_inv)


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
    if damping_mode == "factored":
        return damped_inverse_factored(x.to(dtype), factored_inverses(a_factor, g_factor, damping))
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
    products are unchanged (the basis is orthogonal): two matmuls rotate ``g_avg`` and ``g_diff``
    in together (each eigenbasis read once), two rotate ``n_comb`` out.
    """
    _check_eta_convention(eta_convention)
    if not projection:
        avg = to_eigenbasis(0.5 * (g1 + g2), eig_a, eig_g)
        n_avg = avg / damped_fisher_eigenvalues(eig_a, eig_g, damping, damping_mode)
        return _kfac_result(from_eigenbasis(n_avg, eig_a, eig_g), inner(avg, n_avg))
    assert eig_g.vectors is not None  # G is never diagonal
    avg, diff = _sandwich_pair(eig_g.vectors.transpose(-2, -1), _avg_diff(g1, g2), eig_a.vectors).unbind(-2)
    inv_m = 1.0 / damped_fisher_eigenvalues(eig_a, eig_g, damping, damping_mode)
    f_avg = _fisher_eigenvalues(eig_a, eig_g) * avg  # F·g_avg
    scaled, beta, eta, s = _combine(avg, diff, f_avg, avg * inv_m, diff * inv_m, eps, eta_convention)
    direction = from_eigenbasis(scaled, eig_a, eig_g)
    return FOPDirection(direction, beta, eta, s, inner(avg, avg), inner(diff, diff))


def fop_direction_factored(
    g1: Tensor,
    g2: Tensor,
    factored: Factored,
    eps: float = 1e-12,
    projection: bool = True,
    eta_convention: str = "mean",
) -> FOPDirection:
    """FOP's layer direction under factored damping, from :func:`factored_inverses`; see :func:`fop_direction`.

    Equal to :func:`fop_direction_eigen` with ``damping_mode="factored"``, without eigenbases:
    ``M⁻¹`` is applied to ``g_avg`` and ``g_diff`` as ``G_inv X A_inv`` (two products for both,
    :func:`_sandwich_pair`), ``F·g_avg = G g_avg A`` for the projection (two more), and
    ``n_perp = M⁻¹g_diff − s·n_avg`` by linearity; the direction needs no rotation back.
    """
    _check_eta_convention(eta_convention)
    if not projection:
        avg = 0.5 * (g1 + g2)
        n_avg = damped_inverse_factored(avg, factored)
        return _kfac_result(n_avg, inner(avg, n_avg))
    pair = _avg_diff(g1, g2)
    avg, diff = pair.unbind(-2)
    n_avg, n_diff = _sandwich_pair(factored.g_inv, pair, factored.a_inv).unbind(-2)
    f_avg = fisher_mv(avg, factored.a_factor, factored.g_factor)
    direction, beta, eta, s = _combine(avg, diff, f_avg, n_avg, n_diff, eps, eta_convention)
    return FOPDirection(direction, beta, eta, s, inner(avg, avg), inner(diff, diff))


def _check_eta_convention(eta_convention: str) -> None:
    if eta_convention not in ETA_CONVENTIONS:
        raise ValueError(f"eta convention must be one of {ETA_CONVENTIONS}, got {eta_convention!r}")


def _kfac_result(n_avg: Tensor, a_avg: Tensor) -> FOPDirection:
    """FOP with the projection off: K-FAC's ``M⁻¹ g_avg`` (β* = 0, η* = 1, s = 0)."""
    zero = torch.zeros_like(a_avg)
    return FOPDirection(n_avg, zero, torch.ones_like(a_avg), zero)


def _combine(
    avg: Tensor, diff: Tensor, f_avg: Tensor, n_avg: Tensor, n_diff: Tensor, eps: float, eta_convention: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """FOP's scalars and ``η*·n_comb`` from ``g_avg``, ``g_diff``, ``F g_avg``, ``M⁻¹g_avg``, ``M⁻¹g_diff``.

    Any one basis for all five (the inner products are those of an orthogonal basis); returns
    ``(η*·n_comb, β*, η*, s)`` in that basis.
    """
    a_avg = inner(avg, n_avg)  # ⟨g_avg, M⁻¹ g_avg⟩
    s = inner(diff, f_avg) / (inner(avg, f_avg) + eps)
    perp = diff - s[..., None, None] * avg  # Fisher-orthogonal to g_avg
    n_perp = n_diff - s[..., None, None] * n_avg  # M⁻¹ g_perp, by linearity
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
    return eta[..., None, None] * n_comb, beta, eta, s


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
    chooses ``M`` (:func:`damped_fisher_eigenvalues`; ``"factored"`` goes through Cholesky inverses,
    :func:`fop_direction_factored`); the projection always uses the undamped ``F = A ⊗ G``.

    A 1-D ``a_factor`` is the diagonal of a diagonal ``A`` (``nn.Embedding``; no batch dimensions then).

    Returns a :class:`FOPDirection` ``(direction, beta, eta, projection)``.
    """
    dtype = compute_dtype(g1.dtype)
    if damping_mode == "factored":
        factored = factored_inverses(a_factor, g_factor, damping)
        return fop_direction_factored(g1.to(dtype), g2.to(dtype), factored, eps, projection, eta_convention)
    return fop_direction_eigen(
        g1.to(dtype),
        g2.to(dtype),
        _eigen(a_factor),
        eigen_factor(g_factor),
        damping,
        eps,
        projection,
        damping_mode,
        eta_convention,
    )
