"""Per-layer curvature capture: Kronecker factors and sub-batch gradients from module hooks.

One :class:`KroneckerLayer` wraps one supported module. This module is the engine every layer type
shares: the hooks, the halves, the factor statistics and their hand-over to the optimizer. What differs
between layer types (their input rows ``a``, output rows ``δ`` and folded gradient ``[∂W | ∂b]``) is
supplied by the subclasses in :mod:`fop.layers`, which also says which module gets which type. During an
ordinary forward/backward pass a layer's hooks record, for the pending optimizer step:

* the two sub-batch gradients: each forward batch is split into a first half (``ceil(n/2)``
  samples) and a second half, and the weight/bias gradient of each half is formed from the saved
  layer input and the output gradient (``g1``, ``g2``: mean-loss gradients of the halves);
* on curvature steps, the factor statistics ``Σ a aᵀ`` (layer inputs, bias folded in as a
  trailing column of ones; convolutions: unfolded patches) and ``Σ δ δᵀ`` (output gradients), from every
  sample of the forward batch or, with ``factor_samples``, from an evenly strided subset of them
  (:func:`factor_subset`). For layers whose weight is applied at several positions of a sample
  (convolutions, sequence inputs) the rows are every (sample, position) pair ("expand") or, with
  ``weight_sharing="reduce"``, one row per sample (K-FAC-reduce, see :data:`WEIGHT_SHARING`).

A weight that other modules apply too (:attr:`KroneckerLayer.uses`: a token embedding tied to the
output head, :class:`fop.layers.TiedHeadLayer`) gets hooks on those modules as well, which add their
gradient to the halves (and nothing to the factors): the halves are then those of the summed gradient
that ``p.grad`` holds.

Statistics are *pending* until :meth:`KroneckerLayer.collect` hands them to the optimizer, so a
skipped step (``GradScaler`` found inf, ``zero_grad()`` without ``step()``) leaves no trace.

Why the hooks sit on the output tensor (``output.register_hook``) and not on the module's full
backward hook: tensor hooks registered before an in-place operation (``ReLU(inplace=True)`` after
the layer) still receive the gradient w.r.t. the layer's own output, while module backward hooks
refuse in-place modifications of their outputs.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from .functional import compute_dtype, safe_divide
from .profiling import phase

__all__ = [
    "FACTOR_KEYS",
    "WEIGHT_SHARING",
    "CaptureMode",
    "KroneckerLayer",
    "LayerWork",
    "as_computed",
    "factor_subset",
    "fold_bias_moment",
    "loss_scale_ratio",
]

# The curvature state the optimizer keeps per layer (in ``optimizer.state[layer.weight]``): the
# running factors; with exact damping their eigendecompositions; with factored damping the damped
# inverses and, while the running factors have moved on since those were formed, the factors they
# were formed from (FOP's projection uses the same factors as the inverse, as with eigenbases).
FACTOR_KEYS = (
    "A",
    "G",
    "A_values",
    "A_vectors",
    "G_values",
    "G_vectors",
    "A_inv",
    "G_inv",
    "A_at_inverse",
    "G_at_inverse",
)

# How the factors treat a layer whose weight is shared by the P positions of each of the N samples
# (convolution output positions; sequence positions of Linear layers, attention projections and GPT-2's
# Conv1D), a_{n,p} the input rows (bias column of ones folded in) and δ_{n,p} the output gradients of
# the back-propagated loss (a mean loss: ``N·δ`` is the sample's own loss gradient):
#
#   "expand": every (sample, position) is a row,
#       A = (1/(N·P)) Σ_n Σ_p a_{n,p} a_{n,p}ᵀ,          G = N · Σ_n Σ_p δ_{n,p} δ_{n,p}ᵀ
#   "reduce": one row per sample (Eschenhagen et al., NeurIPS 2023, "K-FAC-reduce"),
#       A = (1/N) Σ_n ā_n ā_nᵀ,  ā_n = (1/P) Σ_p a_{n,p}, G = N · Σ_n δ̂_n δ̂_nᵀ,  δ̂_n = Σ_p δ_{n,p}
#
# Both A are means over their rows and both G are sums over a sample's rows averaged over the samples
# (``G = (1/N) Σ_n ĝ_n ĝ_nᵀ`` with ĝ_n = N·δ̂_n the sample's summed loss gradient): curvlinops'
# ``KFACLinearOperator(kfac_approx=...)`` scaling, whose expand divides the input covariance by N·P and
# reduce by N. Reduce is exact (``δ̂_n ā_nᵀ = Σ_p δ_{n,p} a_{n,p}ᵀ``, the sample's gradient) when a
# sample's input rows, or its output gradients, are the same at every position. A layer without
# such positions (a Linear on (batch, features)) has the same factors either way; ``nn.Embedding``
# keeps expand (its per-position one-hot rows keep A diagonal; their means would make it dense).
WEIGHT_SHARING = ("expand", "reduce")


@dataclass
class CaptureMode:
    """What the hooks record during the current forward/backward cycle (set by the optimizer)."""

    halves: bool = True  # FOP: record the two sub-batch gradients
    factors: bool = True  # a curvature step: record the factor statistics
    total: bool = False  # record the reference gradient of bias-free models (for the loss-scale ratio)
    empirical: bool = True  # G from the loss's own output gradients (False: Monte-Carlo Fisher)
    sampling: bool = False  # live flag: the backward in progress is the Monte-Carlo Fisher pass
    factor_samples: int | None = None  # factors from at most this many samples per forward (None: all)
    weight_sharing: str = "expand"  # rows of the factors of layers with shared positions (WEIGHT_SHARING)
    # the capture-time values of the optimizer's param group, read at each forward (a weak reference to
    # a method returning {"factor_samples": ..., "weight_sharing": ...}), so an edit of param_groups
    # applies to the next forward
    settings: weakref.WeakMethod | None = None

    def for_forward(self) -> CaptureMode:
        """This forward's settings: the flags as they are now, the param group's values as they are now."""
        read = self.settings() if self.settings is not None else None
        return replace(self, **read()) if read is not None else replace(self)


def factor_subset(n: int, factor_samples: int | None, device: torch.device) -> slice | Tensor | None:
    """The samples of an ``n``-sample forward batch that the factor statistics are taken from.

    ``None`` (every sample) when ``factor_samples`` is ``None`` or ``>= n``; else the ``m =
    factor_samples`` indices ``S = {⌊i·n/m⌋ : i = 0, …, m−1}``: evenly strided over the batch and
    deterministic (a ``slice`` with step ``n/m`` when ``m`` divides ``n``, a view; else an index tensor
    made on ``device``). The input and output statistics of a forward use the same ``S``, and each of
    their sums over ``S`` is scaled by ``n/m``,

        Σ_batch a aᵀ ≈ (n/m) Σ_{i∈S} Σ_{rows of i} a aᵀ,     Σ_batch δ δᵀ ≈ (n/m) Σ_{i∈S} Σ_{rows of i} δ δᵀ,

    an unbiased estimate of the sum over the whole batch whenever the batch's order is random (a
    shuffled loader), while the row and sample counts stay those of the whole batch. With one forward
    that makes ``A = Σ_{i∈S} Σ_rows a aᵀ / rows(S)`` and ``G = (1/m) Σ_{i∈S} δ̃_i δ̃_iᵀ`` (``δ̃_i``: sample
    ``i``'s own output gradients, summed over its rows as for the full batch): the exact factors of the
    batch ``S`` alone.
    """
    if factor_samples is None or factor_samples >= n:
        return None
    if n % factor_samples == 0:
        return slice(0, n, n // factor_samples)
    return torch.arange(factor_samples, device=device) * n // factor_samples


@dataclass
class LayerWork:
    """One layer's inputs to a step, in the units of ``p.grad`` (compute dtype, folded).

    ``grad`` is the averaged gradient, ``g1``/``g2`` the sub-batch gradients (None for K-FAC or
    when a batch could not be split), ``a_factor = Σ a aᵀ / rows`` and ``g_factor = samples · Σ δ δᵀ`` this
    step's factor estimates (δ: per-row output gradients, i.e. ``1/n`` times the per-sample
    gradients of a mean loss; None when the step captured no curvature). The rows are every
    (sample, position) pair, or with ``weight_sharing="reduce"`` one per sample: its input row
    averaged and its output gradients summed over the positions (:data:`WEIGHT_SHARING`).
    ``direction`` is filled in by the layer's owner.

    Phases: :meth:`from_capture` makes this process's record; the communicator's ``reduce``
    returns new records (:class:`fop.distributed.Reduced`) whose ``grad``, ``g1``, ``g2``, ``a_factor``,
    ``g_factor`` are the reduced values on the layer's owner (``a_factor``, ``g_factor``, ``g1``, ``g2``
    None elsewhere); the owner fills in ``direction``; ``share`` returns records whose ``direction``
    and ``dg`` hold the owner's result on every process.
    """

    layer: KroneckerLayer
    grad: Tensor
    g1: Tensor | None = None
    g2: Tensor | None = None
    a_factor: Tensor | None = None
    g_factor: Tensor | None = None
    direction: Tensor | None = None
    dg: Tensor | None = None  # ⟨direction, grad⟩ from the layer's owner (distributed; else None)
    # the step's β*, η*, s and (FOP) noise terms tr Σ, |G|², from the owner's direction
    diagnostics: dict[str, Tensor] = field(default_factory=dict)
    samples: int = 0  # samples of this process's batch that reached the layer's backward
    half_batch: float = 0.0  # samples behind each of g1, g2 (for the gradient-noise scale)
    first_order: bool = False  # plain gradient, no halves or factors: the layer takes the first-order rule
    # r of loss_scale_ratio: p.grad's units over the back-propagated loss's, for halves formed later
    # from the latter (DDP's buckets), as collect() forms them here
    loss_scale: Tensor | None = None

    @classmethod
    def from_capture(cls, layer: KroneckerLayer, ratio: Tensor | None) -> LayerWork:
        """Collect the layer's statistics, rescaled by the loss-scale ratio (:func:`loss_scale_ratio`)."""
        grad = layer.folded_param_grad()
        assert grad is not None
        return layer.collect(cls(layer, grad, loss_scale=ratio), ratio)


def loss_scale_ratio(layers: list[KroneckerLayer]) -> Tensor | None:
    """``r = ⟨p.grad, C⟩ / ⟨C, C⟩``: the gradient handed to ``step()`` relative to what the hooks saw.

    The hooks see the back-propagated loss; ``p.grad`` has been unscaled by ``GradScaler``,
    averaged over accumulation steps by the user's loss, possibly clipped: ``p.grad = r·C``, with
    one ``r`` for the whole model. ``C`` is each layer's hook-side *reference* gradient (its bias
    gradient ``Σ δ``, cheap; or, in a model without biases, the full gradient of one small layer).
    Sub-batch gradients are scaled by ``r`` and the output-gradient factor by ``r²``, so everything
    refers to the loss whose gradient is ``p.grad``, without being told the scale.
    """
    num: Tensor | None = None
    den: Tensor | None = None
    for layer in layers:
        pair = layer.reference_pair()
        if pair is None:
            continue
        param_grad, hooked = pair
        num = _add(num, (param_grad * hooked).sum())
        den = _add(den, (hooked * hooked).sum())
    if num is None or den is None:
        return None
    return safe_divide(num, den, den > 0, 1.0)


@dataclass
class _Pending:
    g1: Tensor | None = None  # Σ (n/n1)·C1 over forwards
    c1: Tensor | None = None  # Σ C1: the raw first-half contributions
    split: tuple[int, int] | None = None  # (n, n1) of the first split forward
    g2_other: Tensor | None = None  # Σ (n/n2)·C2 of forwards split differently from the first
    c2_other: Tensor | None = None  # Σ C2 of those
    reference: Tensor | None = None  # hook-side bias gradient Σ δ, or full gradient (no bias)
    a_sum: Tensor | None = None
    a_rows: int = 0
    gg_sum: Tensor | None = None
    samples: int = 0
    mc_gg_sum: Tensor | None = None  # Σ δδᵀ of the Monte-Carlo pass (per-sample, sum-loss δ)
    mc_samples: int = 0
    batch_samples: int = 0  # all samples of the cycle's backward passes
    backward_calls: int = 0
    single_sample: bool = False
    hooked: Tensor | None = None  # Σ C over forwards, while the layer is verified (see foreign_share)
    frozen_bias: Tensor | None = None  # Σ δ of a layer whose bias is frozen: the column p.grad lacks

    def in_dtype(self, dtype: torch.dtype) -> _Pending:
        """The statistics in ``dtype``: captured before the model was cast (``model.double()`` before ``step()``)."""
        changes: dict[str, Any] = {
            f.name: value.to(dtype)
            for f in fields(self)
            if isinstance(value := getattr(self, f.name), Tensor) and value.dtype != dtype
        }
        return replace(self, **changes) if changes else self

    low_precision: bool = False


def _add(acc: Tensor | None, value: Tensor) -> Tensor:
    return value if acc is None else acc.add_(value)


class KroneckerLayer:
    """Curvature capture for one module; subclasses (:mod:`fop.layers`) know the layer type's algebra.

    The folded weight matrix is ``W_f = [W.reshape(out, -1) | b]`` of shape ``(out, in_f)`` with
    ``in_f = in + 1`` when the module has a bias. A layer type supplies the methods under "per type"
    below: its input rows' moment ``Σ a aᵀ`` and output rows ``δ``, its folded gradient ``δᵀ a`` of some
    samples, and for K-FAC-reduce each sample's mean input row and summed output rows; a type whose
    weight is stored otherwise than ``(out, …)`` also overrides :meth:`as_matrix` / :meth:`from_matrix`.
    """

    def __init__(
        self,
        name: str,
        module: nn.Module,
        mode: CaptureMode,
        weight: nn.Parameter | None = None,
        bias: nn.Parameter | None = None,
    ) -> None:
        self.name = name
        self.module = module
        self.mode = mode
        # ``weight``/``bias`` given: parameters the module applies itself (attention projections)
        self.weight: nn.Parameter = module.weight if weight is None else weight  # type: ignore[assignment]
        self.bias: nn.Parameter | None = module.bias if weight is None else bias  # type: ignore[assignment]
        self.out_features = self.weight.shape[0]
        self.in_features = self.weight[0].numel() + (1 if self.bias is not None else 0)
        # other modules that apply this same weight (a tied weight: fop.layers.TiedHeadLayer's embedding).
        # Their backward adds gradient only (the halves, the verified and reference sums), never factor
        # statistics: the factors stay this module's (see _capture_use)
        self.uses: tuple[nn.Module, ...] = ()
        self.is_reference = False  # records its full gradient for the loss-scale ratio (no biases)
        self.batch_dim = 0  # the inputs' batch dimension (1: fop.layers.SequenceFirstLinearLayer)
        self.verify = True  # until the first step: check that p.grad is all the hooks' own gradient
        self._pending = _Pending()
        self._handles: list = []

    def __reduce_ex__(self, protocol: object) -> tuple:
        # A copied or pickled model carries its modules' hooks: in the copy they must capture
        # nothing, since no optimizer would ever collect (or reset) what they record.
        return (_InertLayer, ())

    # ----------------------------------------------------------------------------- hooks
    def attach(self) -> None:
        self._handles.append(self.module.register_forward_hook(self._forward_hook))
        for use in self.uses:
            self._handles.append(use.register_forward_hook(self._use_forward_hook))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        """Drop everything captured since the last step."""
        self._pending = _Pending()

    def _forward_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not self._handles:  # the hook of a copied model (see _InertLayer), which has no _hook_output
            return
        self._hook_output(args, output, self._backward_hook)

    def _use_forward_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        """The forward of another module applying the weight (:attr:`uses`): its backward adds gradient only."""
        if not self._handles:  # as in _forward_hook
            return
        self._hook_output(args, output, self._use_backward_hook)

    def _hook_output(
        self, args: tuple, output: Tensor, backward: Callable[[Tensor, Tensor, CaptureMode], None]
    ) -> None:
        """Register ``backward(x, grad_out, mode)`` on the output of a forward that applied the weight to ``args[0]``."""
        # module.training is not consulted: eval mode (frozen BatchNorm statistics, no dropout) is a
        # legitimate way to train, and an evaluation forward that no backward reaches records nothing
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return
        if not (isinstance(output, Tensor) and output.requires_grad):
            return
        if self.weight.grad is None and self._pending.backward_calls > 0:
            # gradients were cleared (model.zero_grad, a step skipped by GradScaler):
            # what is pending belongs to a cycle that will never be stepped
            self.reset()
        x = args[0].detach()
        mode = self.mode.for_forward()  # this forward's settings, whatever step() changes before backward
        output.register_hook(lambda grad_out: backward(x, grad_out, mode))

    def _backward_hook(self, x: Tensor, grad_out: Tensor, mode: CaptureMode) -> None:
        x = as_computed(x, grad_out)
        # a backward() called inside the autocast region runs the hooks under it: their products would
        # round to 16 bits; the factors and halves are formed in the compute dtype either way
        with phase("capture"), torch.autocast(x.device.type, enabled=False):
            if self.mode.sampling:  # read live: the Monte-Carlo pass runs after this forward
                self._capture_sampled(x, grad_out, mode)
            else:
                self._capture_backward(x, grad_out, mode)

    def _use_backward_hook(self, x: Tensor, grad_out: Tensor, mode: CaptureMode) -> None:
        if self.mode.sampling:  # the Monte-Carlo pass feeds G, which is the main module's alone
            return
        x = as_computed(x, grad_out)
        with phase("capture"), torch.autocast(x.device.type, enabled=False):
            self._capture_use(x, grad_out, mode)

    def _capture_sampled(self, x: Tensor, grad_out: Tensor, mode: CaptureMode) -> None:
        """Monte-Carlo Fisher pass: only ``Σ δδᵀ`` of the sampled labels' summed loss (same samples as ``A``)."""
        pending = self._pending
        batched = x.dim() > self._unbatched_dims
        n = x.shape[0] if batched else 1
        subset = factor_subset(n, mode.factor_samples, x.device) if batched else None
        grad_out = grad_out.detach()
        reduce = self._reduces(grad_out, mode)
        moment = self._sampled_output_moment(grad_out, subset, compute_dtype(self.weight.dtype), reduce)
        pending.mc_gg_sum = _add(pending.mc_gg_sum, moment)
        pending.mc_samples += n

    def _capture_backward(self, x: Tensor, grad_out: Tensor, mode: CaptureMode) -> None:
        """Record this forward's share: first-half gradient, reference gradient, factor statistics.

        Only the first half's gradient ``C1`` is formed here (half the FLOPs of a weight gradient);
        the second half's is recovered at the step as ``p.grad/r − ΣC1``, exactly, whenever all
        forwards of the cycle were split alike (the usual case). A forward split differently (say a
        smaller last micro-batch) forms its ``C2`` explicitly too.
        """
        pending = self._pending
        pending.backward_calls += 1
        n = x.shape[0] if x.dim() > self._unbatched_dims else 1
        dtype = compute_dtype(self.weight.dtype)
        grad_out = grad_out.detach()
        pending.batch_samples += n
        if mode.factors:
            # the input statistics are taken here, not in the forward hook: a forward that no
            # backward reaches (an unused output, a logged prediction) must leave no trace
            subset = factor_subset(n, mode.factor_samples, x.device)
            reduce = self._reduces(grad_out, mode)
            self._accumulate_input_factor(x, subset, reduce)
            if mode.empirical:
                pending.gg_sum = _add(pending.gg_sum, self._sampled_output_moment(grad_out, subset, dtype, reduce))
                pending.samples += n
        if self.bias is not None and not self.bias.requires_grad:
            pending.frozen_bias = _add(pending.frozen_bias, self._output_sum(grad_out).to(dtype))
        halves = self._record_gradient(x, grad_out, mode, n, self._folded_grad)
        if self.bias is not None and self.bias.requires_grad:  # the bias gradient Σδ is the reference
            if halves is None:
                pending.reference = _add(pending.reference, self._output_sum(grad_out).to(dtype))
            else:
                # Σδ of the whole batch = the first half's bias column (already summed) + the second half's
                n1, c1 = halves
                pending.reference = _add(pending.reference, c1[:, -1] + self._output_sum(grad_out[n1:]).to(dtype))

    def _capture_use(self, x: Tensor, grad_out: Tensor, mode: CaptureMode) -> None:
        """Record the share of another module applying the weight (:attr:`uses`, a tied weight): gradient only.

        ``p.grad`` holds the sum of every use's gradient, and the second half's gradient is recovered
        from it as ``p.grad/r − ΣC1`` (:meth:`collect`): so each use adds its own first-half ``C1``
        (and ``C2`` when split unlike the cycle's first forward) to the same sums, as it adds to the
        verified gradient and, for a bias-free reference layer, to the loss-scale reference. A
        bias reference (``Σδ``) is the main module's alone: the other use has no bias. The factor
        statistics, sample counts and backward calls stay the main module's. The use's layout is
        given by :meth:`_use_folded_grad` and :attr:`_use_unbatched_dims`.
        """
        n = x.shape[0] if x.dim() > self._use_unbatched_dims else 1
        self._record_gradient(x, grad_out.detach(), mode, n, self._use_folded_grad)

    def _record_gradient(
        self, x: Tensor, grad_out: Tensor, mode: CaptureMode, n: int, folded: Callable[[Tensor, Tensor], Tensor]
    ) -> tuple[int, Tensor] | None:
        """Add one use's gradient ``folded(x, grad_out)`` of ``n`` samples to the gradient sums.

        The verified sum (while :attr:`verify`), the loss-scale reference of a layer without a trained
        bias, and the halves: the first half's ``C1`` (of ``n1 = ⌈n/2⌉`` samples) and, for a forward
        split unlike the cycle's first, its ``C2``. Returns ``(n1, C1)``, or None when this forward
        records no halves (K-FAC, or a single sample).
        """
        pending = self._pending
        dtype = compute_dtype(self.weight.dtype)
        if self.verify:
            pending.hooked = _add(pending.hooked, folded(x, grad_out).to(dtype))
            pending.low_precision |= grad_out.dtype in _HALF_DTYPES or x.dtype in _HALF_DTYPES or _tf32(x)
        bias_reference = self.bias is not None and self.bias.requires_grad
        if not bias_reference and self.is_reference and (mode.total or mode.halves):
            pending.reference = _add(pending.reference, folded(x, grad_out).to(dtype))
        if mode.halves and n < 2:
            pending.single_sample = True
        if not mode.halves or n < 2:
            return None
        n1 = (n + 1) // 2
        c1 = folded(x[:n1], grad_out[:n1]).to(dtype)
        pending.g1 = _add(pending.g1, c1 * (n / n1))
        pending.c1 = _add(pending.c1, c1)
        if pending.split is None:
            pending.split = (n, n1)
        elif pending.split != (n, n1):
            c2 = folded(x[n1:], grad_out[n1:]).to(dtype)
            pending.g2_other = _add(pending.g2_other, c2 * (n / (n - n1)))
            pending.c2_other = _add(pending.c2_other, c2)
        return n1, c1

    def _reduces(self, grad_out: Tensor, mode: CaptureMode) -> bool:
        """Whether this forward's factors take one row per sample (K-FAC-reduce, :data:`WEIGHT_SHARING`)."""
        return mode.weight_sharing == "reduce" and self._has_shared_positions(grad_out)

    def _accumulate_input_factor(self, x: Tensor, subset: slice | Tensor | None = None, reduce: bool = False) -> None:
        """Add ``Σ a aᵀ`` of the forward (or ``(n/m) Σ_S a aᵀ``, see :func:`factor_subset`) and its rows.

        ``reduce``: the rows are the samples' mean input rows ``ā_n`` (:meth:`_reduced_input_moment`).
        """
        moment = self._reduced_input_moment if reduce else self._input_second_moment
        if subset is None:
            a_sum, rows = moment(x)
        else:
            n = x.shape[0]
            x = x[subset]
            m = x.shape[0]
            a_sum, rows = moment(x)
            a_sum.mul_(n / m)
            rows = rows * n // m  # every sample has the same rows: rows(S) = m·rows per sample
        self._pending.a_sum = _add(self._pending.a_sum, a_sum)
        self._pending.a_rows += rows

    def _sampled_output_moment(
        self, grad_out: Tensor, subset: slice | Tensor | None, dtype: torch.dtype, reduce: bool = False
    ) -> Tensor:
        """``Σ δδᵀ`` of the forward, or ``(n/m) Σ_S δδᵀ`` over the samples ``subset`` (:func:`factor_subset`).

        ``reduce``: the rows are the samples' summed output gradients ``δ̂_n`` (:meth:`_reduced_output_moment`).
        """
        moment = self._reduced_output_moment if reduce else self._output_second_moment
        if subset is None:
            return moment(grad_out, dtype)
        n = grad_out.shape[0]
        grad_out = grad_out[subset]
        return moment(grad_out, dtype).mul_(n / grad_out.shape[0])

    def _reduced_input_moment(self, x: Tensor) -> tuple[Tensor, int]:
        """``(Σ_n ā_n ā_nᵀ, samples)``: each sample's input row averaged over its positions, bias folded in."""
        means = self._mean_input_rows(x)
        return fold_bias_moment(means, self.bias is not None, means.dtype), means.shape[0]

    def _reduced_output_moment(self, grad_out: Tensor, dtype: torch.dtype) -> Tensor:
        """``Σ_n δ̂_n δ̂_nᵀ`` in ``dtype``: each sample's output gradients summed over its positions."""
        sums = self._summed_output_rows(grad_out, dtype)
        return sums.T @ sums

    # ----------------------------------------------------------------------------- readout
    def captured(self) -> bool:
        """Whether a backward pass went through the hooks since the last step."""
        return self._pending.backward_calls > 0

    def foreign_share(self) -> Tensor | None:
        """``‖p.grad − rC‖ / ‖p.grad‖`` with the best scalar ``r``, for the gradient the hooks saw (C).

        Zero up to round-off when every gradient of the layer's parameters came through its
        captured forwards (any loss scale, clipping or accumulation average is one scalar). A
        weight tied to another module, or also used functionally, gets gradient the hooks never
        saw: the split into halves and the factors would then be wrong. None if nothing recorded.
        """
        hooked = self._pending.hooked
        grad = self.folded_param_grad()
        if hooked is None or grad is None:
            return None
        grad = grad.to(hooked.dtype)
        if self.bias is not None and self.bias.grad is None:  # a frozen bias: p.grad has no column to compare
            grad, hooked = grad[:, :-1], hooked[:, :-1]
        hh = (hooked * hooked).sum()
        r = safe_divide((grad * hooked).sum(), hh, hh > 0, 0.0)
        norm = grad.norm()
        return safe_divide((grad - r * hooked).norm(), norm, norm > 0, 0.0)

    def foreign_tolerance(self) -> float:
        """The :meth:`foreign_share` that round-off can produce (16-bit autocast and TF32 round more)."""
        return 3e-2 if self._pending.low_precision else 1e-3

    def hook_reference(self) -> Tensor | None:
        """The loss-scale reference the hooks recorded this cycle (see :func:`loss_scale_ratio`), or None."""
        return self._pending.reference

    def set_hook_reference(self, reference: Tensor) -> None:
        """Replace the recorded reference (DDP: by its mean over the processes, as ``p.grad`` is)."""
        self._pending.reference = reference

    def reference_pair(self) -> tuple[Tensor, Tensor] | None:
        """``(p.grad, C)`` of this layer's loss-scale reference, if it recorded one."""
        reference = self._pending.reference
        if reference is None:
            return None
        if reference.dim() == 1:
            assert self.bias is not None
            if self.bias.grad is None:
                return None
            return self.bias.grad.to(reference.dtype), reference
        grad = self.folded_param_grad()
        return None if grad is None else (grad, reference)

    def collect(self, work: LayerWork, ratio: Tensor | None) -> LayerWork:
        """Fill ``work`` with the cycle's statistics in ``p.grad``'s units (``work.grad``), then reset.

        ``g1 = r·Σ(n/n1)C1``; ``g2 = (n/n2)(p.grad − r·ΣC1 − r·ΣC2') + r·Σ(n'/n2')C2'`` where the
        primed sums run over forwards split differently from the first; ``G = r²·samples·Σδδᵀ``
        (empirical Fisher), or ``G = Σδδᵀ / samples`` over the Monte-Carlo pass, whose summed loss
        makes δ the per-sample output gradients (no loss scale involved).
        """
        grad = work.grad
        p = self._pending.in_dtype(grad.dtype)
        work.samples = p.batch_samples
        r = ratio if ratio is not None else torch.ones((), dtype=grad.dtype, device=grad.device)
        if p.frozen_bias is not None and self.bias is not None and self.bias.grad is None:
            # a frozen bias keeps its value, but the layer's folded direction is formed from the whole
            # gradient [∂W | ∂b] the hooks saw: W moves exactly as it would beside a trained bias
            grad = torch.cat([grad[:, :-1], (r * p.frozen_bias)[:, None]], dim=1)
            work.grad = grad
        if p.g1 is not None and p.c1 is not None and p.split is not None and not p.single_sample:
            n, n1 = p.split
            rest = grad - r * p.c1
            work.g1 = r * p.g1
            if p.c2_other is not None and p.g2_other is not None:
                work.g2 = (rest - r * p.c2_other) * (n / (n - n1)) + r * p.g2_other
            else:
                work.g2 = rest * (n / (n - n1))
            work.half_batch = p.batch_samples / 2
        # in place: the sums are this cycle's own (reset below), and A can be large
        g_factor = None
        if p.gg_sum is not None:
            g_factor = p.gg_sum.mul_(p.samples * r * r)
        elif p.mc_gg_sum is not None and p.mc_samples > 0:
            g_factor = p.mc_gg_sum.div_(p.mc_samples)
        if p.a_sum is not None and p.a_rows > 0 and g_factor is not None:
            work.a_factor, work.g_factor = p.a_sum.div_(p.a_rows), g_factor
        self.reset()
        return work

    def params(self) -> list[nn.Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def folded_param_grad(self) -> Tensor | None:
        """``[∂W | ∂b]`` from the parameters' ``.grad`` in compute dtype, or None if no grad."""
        if self.weight.grad is None:
            return None
        dtype = compute_dtype(self.weight.dtype)
        w = self.as_matrix(self.weight.grad).to(dtype)
        if self.bias is None:
            return w
        b = self.bias.grad
        b = torch.zeros(self.out_features, dtype=dtype, device=w.device) if b is None else b.to(dtype)
        return torch.cat([w, b[:, None]], dim=1)

    def unfold_direction(self, direction: Tensor) -> list[Tensor]:
        """Split a folded ``(out, in_f)`` direction into per-parameter tensors (weight, bias)."""
        if self.bias is None:
            return [self.from_matrix(direction)]
        return [self.from_matrix(direction[:, :-1]), direction[:, -1].contiguous()]

    def as_matrix(self, weight_like: Tensor) -> Tensor:
        """A weight-shaped tensor (the weight, its gradient or a direction) as the ``(out, in)`` matrix of the
        folded layout."""
        return weight_like.reshape(self.out_features, -1)

    def from_matrix(self, matrix: Tensor) -> Tensor:
        """The inverse of :meth:`as_matrix`: an ``(out, in)`` matrix in the weight's shape."""
        return matrix.reshape(self.weight.shape)

    # ----------------------------------------------------------------------------- per type
    _unbatched_dims = 1  # dims of one sample's input without a batch dim (an input with more is batched)
    # the input factor is diagonal and kept as its 1-D diagonal (fop.layers.EmbeddingLayer)
    diagonal_input = False

    def _input_second_moment(self, x: Tensor) -> tuple[Tensor, int]:
        """``(Σ_rows a aᵀ, rows)`` with the bias column of ones folded in."""
        raise NotImplementedError

    def _output_rows(self, grad_out: Tensor) -> Tensor:
        """Per-row output gradients, ``(rows, out)``."""
        raise NotImplementedError

    def _output_sum(self, grad_out: Tensor) -> Tensor:
        """``Σ_rows δ`` (the bias gradient), ``(out,)``."""
        return self._output_rows(grad_out).sum(0)

    def _output_second_moment(self, grad_out: Tensor, dtype: torch.dtype) -> Tensor:
        """``Σ_rows δ δᵀ`` in ``dtype``, ``(out, out)``."""
        rows = self._output_rows(grad_out).to(dtype)
        return rows.T @ rows

    def _folded_grad(self, x: Tensor, grad_out: Tensor) -> Tensor:
        """``[∂W | ∂b]`` contributed by these samples, ``(out, in_f)``."""
        raise NotImplementedError

    _use_unbatched_dims = 1  # as _unbatched_dims, for the inputs of the other uses (:attr:`uses`)

    def _use_folded_grad(self, x: Tensor, grad_out: Tensor) -> Tensor:
        """``[∂W | ∂b]`` contributed by these samples through another use of the weight (:attr:`uses`), ``(out, in_f)``."""
        raise NotImplementedError

    def _has_shared_positions(self, grad_out: Tensor) -> bool:
        """Whether the weight is applied at several positions of each sample (what ``reduce`` reduces)."""
        return False

    def _mean_input_rows(self, x: Tensor) -> Tensor:
        """``ā_n``: each sample's input row averaged over its positions, ``(samples, in)`` in compute dtype."""
        raise NotImplementedError

    def _summed_output_rows(self, grad_out: Tensor, dtype: torch.dtype) -> Tensor:
        """``δ̂_n``: each sample's output gradients summed over its positions, ``(samples, out)`` in ``dtype``."""
        raise NotImplementedError


class _InertLayer:
    """What a :class:`KroneckerLayer` becomes in a copy of its model: hooks that record nothing.

    ``deepcopy`` rebinds the copied hook's function to this object, pickle looks the method up on
    it: either way the hook finds no handle and returns.
    """

    _handles: tuple = ()

    def _forward_hook(self, module: nn.Module, args: tuple, output: object) -> None:
        return None

    def _use_forward_hook(self, module: nn.Module, args: tuple, output: object) -> None:
        return None


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def as_computed(x: Tensor, grad_out: Tensor) -> Tensor:
    """The layer's input in the dtype its forward computed in: the dtype of its output gradient.

    Under autocast a layer casts its input before the product (a model's first ``Linear`` receives
    float32 data and computes in bf16/fp16, so its output and output gradient are 16-bit while the
    captured input is not). The factors and sub-batch gradients are then those of the input the layer
    actually used, and every product of the capture sees one dtype. Integer inputs (embedding indices)
    are returned as they are.
    """
    if x.dtype == grad_out.dtype or not (x.is_floating_point() and grad_out.is_floating_point()):
        return x
    return x.to(grad_out.dtype)


def _tf32(x: Tensor) -> bool:
    """Whether float32 products on ``x``'s device may run in TF32 (cuDNN convolutions do by default)."""
    return x.is_cuda and (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)


def fold_bias_moment(rows: Tensor, with_bias: bool, dtype: torch.dtype) -> Tensor:
    """``Σ a aᵀ`` over rows, in ``dtype``, with a trailing all-ones column appended to ``a`` when biased."""
    if not with_bias:
        return _gram(rows, dtype)
    if rows.shape[0] < 2 * (rows.shape[1] + 1):
        # few rows, many columns (a wide Linear): one product of the augmented rows makes the folded
        # matrix directly, where assembling it from blocks would copy the large moment twice
        ones = rows.new_ones(rows.shape[0], 1)
        augmented = torch.cat([rows, ones], dim=1)
        return _gram(augmented, dtype)
    core = _gram(rows, dtype)
    col = rows.sum(0, dtype=dtype)
    count = col.new_full((1,), float(rows.shape[0]))  # no host-to-device copy
    top = torch.cat([core, col[:, None]], dim=1)
    bottom = torch.cat([col, count])[None, :]
    return torch.cat([top, bottom], dim=0)


_half_gram_on_device = True  # torch.mm(..., out_dtype=float32) on half inputs; off after its first failure


def _gram(rows: Tensor, dtype: torch.dtype) -> Tensor:
    """``rowsᵀ rows`` in ``dtype``.

    Rows captured under autocast are bf16/fp16. On CUDA their product is formed on the half-precision
    inputs with float32 accumulation and output (``torch.mm(..., out_dtype=torch.float32)``): a product
    of two bf16 (fp16) values is exact in float32, so the result equals the float32 product of the
    up-cast rows up to summation order, at the speed of a half-precision GEMM instead of a float32 one
    (TF32 is off by default) — the largest cost of a convolution's input factor. Elsewhere, and where
    this torch has no ``out_dtype``, the rows are cast to ``dtype`` first.
    """
    global _half_gram_on_device
    if _half_gram_on_device and rows.is_cuda and rows.dtype in _HALF_DTYPES and dtype == torch.float32:
        try:
            return torch.mm(rows.T, rows, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _half_gram_on_device = False
    rows = rows.to(dtype)
    return rows.T @ rows
