"""``FOP`` and ``KFAC``: one Kronecker-factored engine, with and without the Fisher-orthogonal projection.

A drop-in ``torch.optim.Optimizer`` built from the *model*::

    optimizer = FOP(model, lr=0.1)
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()

Module hooks capture each supported layer's inputs and output gradients during the ordinary
backward pass (see :mod:`fop.curvature`); ``step()`` turns them into Kronecker factors, the two
sub-batch gradients and the update. Parameters outside supported layers follow a first-order rule
(SGD with momentum or AdamW) on the averaged gradient, in their own parameter group.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from . import functional as Fn
from . import notices
from .arguments import (
    FALLBACK_RULES,
    GROUP_KEYS,
    capture_values_valid,
    check_constructor_arguments,
    check_param_group,
)
from .checkpoint import check_checkpoint_shapes
from .curvature import CaptureMode, KroneckerLayer, LayerWork
from .discovery import SPARSE_MESSAGE, ExcludeSpec, check_model, discover_layers, param_groups, warn_discovery
from .distributed import Communicator, StepContext, make_communicator
from .first_order import adamw_update, sgd_update
from .intervals import Interval, interval_at
from .layers import linear_layouts
from .profiling import phase
from .state import LayerCurvature

__all__ = ["FOP", "KFAC", "KroneckerOptimizer", "PAPER_PRESET"]


# The closest reading of the paper's setup (its K-FAC and FOP "rely on ASDL", whose defaults these
# are, and it names neither a trust region nor a factor average): FOP(model, lr=..., **PAPER_PRESET).
PAPER_PRESET: dict[str, Any] = {
    "fisher": "mc",
    "damping_mode": "factored",
    "factor_decay": 0.0,
    "kl_clip": None,
    "eta": "sum",
}
# Per-parameter state kept in the parameter's own dtype and device (see _follow_parameters).
_PARAMETER_SHAPED = ("momentum_buffer", "exp_avg", "exp_avg_sq")
# How many per-step trust-region factors ν are kept for trust_region_stats().
_NU_HISTORY = 100_000


class KroneckerOptimizer(Optimizer):
    """Shared engine of :class:`FOP` and :class:`KFAC`: the class attributes ``projection`` and
    ``splits_batch`` tell them apart; the arguments are those of ``__init__``.

    Public methods besides ``torch.optim.Optimizer``'s (``step``, ``zero_grad``, ``state_dict``,
    ``load_state_dict``, ``add_param_group``): :meth:`sample_fisher`, :meth:`diagnostics`,
    :meth:`gradient_noise_scale`, :meth:`trust_region_stats`, :meth:`remove_hooks`,
    :meth:`use_communicator`; properties :attr:`curvature_step`, :attr:`skipped_steps`.
    """

    projection: bool = True  # FOP's projection on (the direction uses β*, η*)
    splits_batch: bool = True  # the hooks form the two sub-batch gradients

    def __init__(
        self,
        model: nn.Module,
        lr: float | Tensor = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        damping: float = 1e-3,
        factor_decay: float = 0.95,
        curvature_update_interval: Interval = 10,
        inverse_update_interval: Interval = 10,
        projection_eps: float = 1e-12,
        kl_clip: float | None = 1.0,
        trust_region: str = "direction",
        fisher: str = "empirical",
        damping_mode: str = "factored",
        eta: str = "mean",
        factor_samples: int | None = None,
        weight_sharing: str = "expand",
        fallback: str = "auto",
        fallback_lr: float | None = None,
        fallback_betas: tuple[float, float] = (0.9, 0.999),
        fallback_eps: float = 1e-8,
        exclude: ExcludeSpec = (),
        batch_first: bool | None = None,
        distributed: bool | Communicator | None = None,
        replicated: bool = False,
    ) -> None:
        """Build the optimizer on ``model``: hooks on its supported layers, and the param groups.

        Args:
                model: the module to train. Its ``nn.Linear``, ``nn.Conv1d/2d/3d`` (``groups=1``) and
                    ``nn.MultiheadAttention`` and ``nn.Embedding`` layers get Kronecker curvature (see :mod:`fop.layers`);
                    every other trainable parameter goes to the fallback group.
                lr: base learning rate ``η0`` of the curvature group.
                momentum: momentum of the update ``θ ← θ − lr·buf``, ``buf ← μ·buf + d`` (as torch SGD).
                weight_decay: L2 term ``wd·θ`` added to the preconditioned direction (and, for the
                    fallback group, as SGD's coupled or AdamW's decoupled decay).
                nesterov: Nesterov momentum.
                damping: ``λ``, the Tikhonov damping of the curvature (how, see ``damping_mode``).
                factor_decay: running-average decay of the factors, ``A ← ρA + (1−ρ)A_batch``.
                curvature_update_interval: capture factor statistics every this many steps (an ``int``
                    or a callable ``step -> int``).
                inverse_update_interval: recompute the damped inverses (``damping_mode="factored"``) or
                    the eigendecompositions (``"exact"``) every this many steps (an ``int`` or a callable).
                projection_eps: ``ε`` in the projection scalar ``s = ⟨g_diff, F g_avg⟩/(⟨g_avg, F g_avg⟩+ε)``.
                kl_clip: trust region ``κ`` (K-FAC's KL clipping); ``None`` disables it. With the default
                    ``trust_region="direction"`` the curvature layers' directions are scaled by
                    ``ν = min(1, √(κ / Σ⟨d, g⟩))``: the direction has Fisher norm at most ``√κ`` and the step
                    ``lr·ν·d`` at most ``lr·√κ`` (``κ = 1``: the learning rate is the trust radius).
                trust_region: ``"direction"`` (above: the learning rate and its schedule always act) or
                    ``"step"`` (``ν = min(1, √(κ / (lr² Σ⟨d, g⟩)))``, kfac-pytorch's rule and this library's
                    default before 0.2 with ``κ = 1e-3``: the clip bounds the step ``lr·d``, so while it binds
                    the step is ``√(κ/Σ⟨d,g⟩)·d`` whatever ``lr``).
                fisher: ``"empirical"`` (``G`` from the output gradients of the training loss, no extra
                    cost) or ``"mc"`` (Monte-Carlo Fisher: ``G`` from the output gradients of labels
                    sampled from the model's predictive distribution; the loop calls
                    :meth:`sample_fisher` on the output before ``backward()``, one extra backward pass on
                    curvature steps).
                damping_mode: ``"factored"`` (the default since 0.3, as ASDL on which the paper built:
                    ``M = (A + π√λI) ⊗ (G + √λ/π I)``, through the two damped inverses, formed
                    by Cholesky factorisations: several times cheaper than the eigendecompositions of large
                    factors, and an ordinary step needs no rotation back) or ``"exact"`` (``M = A ⊗ G + λI``,
                    through the factors' eigendecompositions; the default up to 0.2); see
                    :func:`fop.functional.damped_fisher_eigenvalues` and :func:`fop.functional.factored_inverses`.
                    Either way each step uses the factors as of the last inverse update, with the current ``λ``.
                factor_samples: on curvature steps, the factors ``A`` and ``G`` of every layer come from at most
                    this many samples of each forward batch (micro-batch) instead of all ``n``: the evenly strided
                    ``S = {⌊i·n/m⌋ : i < m}``, the same samples for ``A`` and ``G``, with the sums over ``S`` scaled by
                    ``n/m`` so that each factor estimates the full-batch one without bias (with one forward,
                    ``A = Σ_{S} a aᵀ / rows(S)`` and ``G = (1/m) Σ_{i∈S} δ_i δ_iᵀ``: the factors of those ``m``
                    samples; see :func:`fop.curvature.factor_subset`). The sub-batch gradients ``g1``, ``g2`` and
                    ``p.grad`` stay exact. It cuts the cost of the factors, which grows with the rows (a
                    convolution's input factor has one row per sample and output position). ``None`` (default):
                    every sample. Kept in the param groups (and so in ``state_dict()``); read at every step.
                weight_sharing: the rows of the factors of a layer whose weight is applied at ``P`` positions of
                    each of the ``N`` samples (convolution output positions; the positions of a Linear's input of
                    3+ dims, of attention projections and of GPT-2's ``Conv1D``), with input rows ``a_{n,p}``
                    (bias folded in) and output gradients ``δ_{n,p}`` (of the mean loss): ``"expand"`` (default)
                    makes every (sample, position) a row, ``A = (1/(NP)) Σ_{n,p} a aᵀ``, ``G = N Σ_{n,p} δ δᵀ``;
                    ``"reduce"`` (K-FAC-reduce, Eschenhagen et al., NeurIPS 2023; curvlinops' ``kfac_approx``)
                    makes each sample one row, its mean input ``ā_n = (1/P) Σ_p a_{n,p}`` and its summed output
                    gradient ``δ̂_n = Σ_p δ_{n,p}``: ``A = (1/N) Σ_n ā_n ā_nᵀ``, ``G = N Σ_n δ̂_n δ̂_nᵀ`` (the same
                    units: A a mean over rows, G a per-sample sum averaged over samples). The factor products then
                    have ``N`` rows instead of ``N·P`` (no unfolded convolution patches); the halves ``g1``, ``g2``
                    and ``p.grad`` are unchanged. ``nn.Embedding`` keeps expand (its diagonal ``A``); layers
                    without positions have the same factors either way. See :data:`fop.curvature.WEIGHT_SHARING`.
                    Kept in the param groups (and so in ``state_dict()``); read at each forward.
                eta: FOP's step-scale convention: ``"mean"`` (``g_tot = (g1+g2)/2``, η* ∈ [½, 1]) or
                    ``"sum"`` (the paper's literal ``g_tot = g1 + g2``, η* ∈ [1, 2]). K-FAC ignores it.
                fallback: the rule for parameters outside supported layers: ``"auto"`` (BatchNorm
                    parameters by SGD at ``lr``, every other one, such as layer norms, position tables
                    and shared weights, by AdamW at ``fallback_lr``; the default since 0.4), ``"sgd"`` or
                    ``"adamw"`` (all of them by that rule).
                fallback_lr: learning rate of the fallback group: for ``"auto"`` its AdamW group's
                    (default 8e-3), ``"sgd"``'s (default ``lr``), ``"adamw"``'s (default 1e-3).
                fallback_betas: AdamW's ``(β1, β2)`` for the fallback group.
                fallback_eps: AdamW's ``ε`` for the fallback group.
                exclude: a list of modules (instances, names as in ``model.named_modules()`` or types) kept
                    out of curvature, with every layer inside them; their parameters use the fallback rule
                    (e.g. ``exclude=[model.fc]``, ``exclude=["layer4"]``).
                    Layers whose parameters are shared with another module (tied weights) are kept out
                    automatically, with a warning; except an ``nn.Linear`` head tied to an ``nn.Embedding``
                    (GPT-2's ``lm_head`` / ``wte``), which is one layer with the head's factors on the
                    summed gradient (:class:`fop.layers.TiedHeadLayer`; ``exclude=[head]`` keeps it out).
                batch_first: whether ``nn.Linear`` inputs of three or more dimensions are ``(batch, seq, ...)``
                    (``True``) or ``(seq, batch, ...)`` (``False``); the halves are split along the batch.
                    Linear layers inside a module built with ``batch_first=False`` (``nn.Transformer``, its
                    encoder and decoder layers, ``nn.MultiheadAttention``) are sequence-first whatever this
                    says. ``None`` (default): batch first, with a warning naming the Linear layers outside
                    such modules when the model has any (their layout cannot be told from the model).
                distributed: ``None`` (auto): run on ``torch.distributed`` when a process group of two or more
                    processes is initialised (dual-gradient reduction by rank parity, layer specialists; see
                    :mod:`fop.distributed` and ``docs/distributed.md``); ``False``: train locally; ``True``:
                    require a process group; or a configured :class:`fop.distributed.DistributedCommunicator`.
                replicated: distributed only: every process computes every layer's curvature (one
                    all-reduce per step) instead of one owner process per layer.

            Raises:
                TypeError: ``model`` is not an ``nn.Module``.
                ValueError: an argument out of its range (the message names it and the range).
        """
        check_model(model, type(self).__name__)
        group_values: dict[str, Any] = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            damping=damping,
            factor_decay=factor_decay,
            projection_eps=projection_eps,
            kl_clip=kl_clip,
            trust_region=trust_region,
            damping_mode=damping_mode,
            eta=eta,
            factor_samples=factor_samples,
            weight_sharing=weight_sharing,
        )
        check_constructor_arguments(
            curvature_update_interval=curvature_update_interval,
            inverse_update_interval=inverse_update_interval,
            fisher=fisher,
            fallback=fallback,
            fallback_lr=fallback_lr,
            fallback_betas=fallback_betas,
            fallback_eps=fallback_eps,
            **group_values,
        )
        self.curvature_update_interval = curvature_update_interval
        self.inverse_update_interval = inverse_update_interval
        self.fisher = fisher
        self._mode = CaptureMode(
            halves=self.splits_batch, factors=True, total=not self.splits_batch, empirical=fisher == "empirical"
        )
        self._sampled = False  # sample_fisher() ran in this cycle
        self._due = True  # the next cycle is on the curvature interval (see _set_capture_mode)
        self._factorless: list[KroneckerLayer] = []  # layers without running factors yet
        self._placed: list[tuple[torch.dtype, torch.device]] = []  # parameters' (dtype, device) the state follows
        self._nu_history: list[Tensor] = []  # the trust region's ν per step (device tensors)
        self._noise_total: Tensor | None = None  # Σ over steps and layers of (tr Σ, |G|²) estimates
        self._diagnostics: dict[str, dict[str, Tensor]] = {}  # per layer: β*, η*, s, noise terms of its last step
        sequence_first, undetermined = linear_layouts(model, batch_first)
        self.layers, tied = discover_layers(model, exclude, self._mode, sequence_first)
        warn_discovery(self.layers, undetermined, tied, fallback, type(self).__name__)
        trainable = [layer for layer in self.layers if layer.weight.requires_grad] or self.layers
        if trainable and all(layer.bias is None or not layer.bias.requires_grad for layer in trainable):
            min(trainable, key=lambda layer: layer.weight.numel()).is_reference = True  # see loss_scale_ratio
        self.communicator: Communicator = make_communicator(model, distributed, replicated, type(self).__name__)
        self._steps = 0  # step() calls: drives the update intervals
        self._zero_grads = 0  # zero_grad() calls: distributed processes compare them (skipped steps)
        self._notices = notices.OnceWarner()
        self._foreign: set[int] = set()  # layers found to get gradient from outside their forward

        # No 'betas' in the defaults: torch's momentum-cycling schedulers (OneCycleLR, CyclicLR)
        # cycle betas[0] instead of 'momentum' as soon as the defaults hold 'betas'. The optimizer
        # behaves as SGD with momentum, so only AdamW groups carry their own betas and eps.
        defaults = group_values | {"rule": "sgd" if fallback == "auto" else fallback}  # of add_param_group
        self._adamw_defaults = {"betas": tuple(fallback_betas), "eps": fallback_eps}
        super().__init__(param_groups(model, self.layers, fallback, lr, fallback_lr), defaults)
        self._mode.settings = weakref.WeakMethod(self._capture_settings)
        self._set_capture_mode()
        for layer in self.layers:
            layer.attach()
        self._skipped = torch.zeros((), dtype=torch.int64, device=_device_of(model))
        self.communicator.setup(self, model)  # distributed: checks agreement, assigns owners
        self.use_communicator(self.communicator)
        self._param_names = {id(p): name for name, p in model.named_parameters()}

    def use_communicator(self, communicator: Communicator) -> None:
        """Share steps through ``communicator`` from now on (how ``fop.dual_gradient_hook`` installs DDP's).

        The communicator says whether the two sub-batches are process groups (then the hooks record
        no halves) and whether ``p.grad`` is this process's own gradient (else the check that a
        layer's gradient all comes through its forward cannot be made).
        """
        self.communicator = communicator
        self._mode.halves = self.splits_batch and not communicator.halves_from_processes
        if not communicator.local_gradients:
            for layer in self.layers:
                layer.verify = False
        self._set_capture_mode()

    # ------------------------------------------------------------------------------ copies
    def _not_copyable(self, how: str) -> TypeError:
        name = type(self).__name__
        return TypeError(
            f"a {name} cannot be {how}: it is bound to the model's modules by hooks, and a copy would "
            f"capture nothing. To duplicate or save a run, copy the model, build a new {name}(model_copy, ...) "
            "and load_state_dict(optimizer.state_dict()) into it; torch.save(optimizer.state_dict()) saves it"
        )

    def __deepcopy__(self, memo: dict) -> Any:
        raise self._not_copyable("deep-copied")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise self._not_copyable("pickled")

    # ------------------------------------------------------------------------------ torch.optim API
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of parameters; user-added groups follow the fallback rule (``rule`` key; with
        ``fallback="auto"``, ``"sgd"`` at the group's or the optimizer's ``lr``)."""
        rule = param_group.setdefault("rule", self.defaults["rule"])
        if rule == "kronecker" and any(group["rule"] == "kronecker" for group in self.param_groups):
            raise ValueError(
                "the 'kronecker' group is made by the constructor; added groups take rule 'sgd' or 'adamw'"
            )
        if rule not in FALLBACK_RULES + ("kronecker",):
            raise ValueError(f"param group rule must be one of {FALLBACK_RULES}, got {rule!r}")
        if rule == "adamw":
            for key, value in self._adamw_defaults.items():
                param_group.setdefault(key, value)
        super().add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``Optimizer.zero_grad``, and drops the statistics captured since the last step."""
        super().zero_grad(set_to_none=set_to_none)
        self._sampled = False
        self._zero_grads += 1
        for layer in self.layers:
            layer.reset()

    # ------------------------------------------------------------------------------ Monte-Carlo Fisher
    @property
    def curvature_step(self) -> bool:
        """Whether the forward/backward cycle now in progress captures factor statistics."""
        return self._captures_factors()

    def sample_fisher(self, output: Tensor, generator: torch.Generator | None = None) -> None:
        """Monte-Carlo Fisher (``fisher="mc"``): call on the model's output, before ``backward()``.

        On curvature steps, draws labels ``ŷ ~ softmax(output)`` (classes on the last dimension)
        and backpropagates ``Σ_i CE(output_i, ŷ_i)`` through the graph (``retain_graph``, nothing
        written to ``.grad``), so that ``G = (1/n) Σ_i δ_i δ_iᵀ`` holds the output gradients of
        the sampled labels: an unbiased estimate of the true Fisher's factor, where the empirical
        Fisher uses the training labels. On other steps it returns at once, so the loop may call
        it on every step::

            output = model(x)
            optimizer.sample_fisher(output)
            loss_fn(output, y).backward()

        Cost: one extra backward pass on curvature steps. With gradient accumulation, call it once
        per micro-batch.
        """
        if self.fisher != "mc":
            raise RuntimeError(
                f"sample_fisher() is for fisher='mc'; this optimizer uses fisher={self.fisher!r} "
                "(its G factor comes from the training loss itself: no call needed)"
            )
        if not self.layers or not self._captures_factors():
            return
        if output.dim() < 1 or output.shape[-1] < 2:
            raise ValueError(
                f"sample_fisher() needs classification logits with the classes on the last dimension, "
                f"got shape {tuple(output.shape)}"
            )
        if not output.requires_grad:
            raise ValueError(
                "sample_fisher() needs the output of a forward with gradients enabled (call it before backward)"
            )
        logits = output.reshape(-1, output.shape[-1])
        logits = logits.to(Fn.compute_dtype(logits.dtype))  # bf16 logits: sample and differentiate in float32
        with torch.no_grad():
            probs = torch.softmax(logits.detach(), dim=-1)
            # a non-finite output (a diverging model) makes the step a skipped one anyway: sample
            # uniformly there rather than fail, without a host synchronisation
            finite = torch.isfinite(probs).all(-1, keepdim=True)
            probs = torch.where(finite, probs, torch.full_like(probs, 1.0 / probs.shape[-1]))
            labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        loss = F.cross_entropy(logits, labels, reduction="sum")
        weights = [layer.weight for layer in self.layers if layer.weight.requires_grad]
        self._mode.sampling = True
        try:
            torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True)
        finally:
            self._mode.sampling = False
        self._sampled = True

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["fop"] = {"steps": self._steps, "skipped_steps": self._skipped.clone()}
        return self.communicator.gather_state(self, state)  # distributed: a collective

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("fop", None)
        if extra is None:
            raise ValueError(
                f"not a {type(self).__name__} checkpoint: the 'fop' entry (step counters) is missing; "
                "load a state_dict() saved from FOP or KFAC"
            )
        check_checkpoint_shapes(state_dict, self.param_groups, self.layers, self._param_names)
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # a checkpoint from before an option existed: the constructor's value
            for key in GROUP_KEYS:
                group.setdefault(key, self.defaults[key])
        self._follow_parameters()
        self._steps = int(extra["steps"])
        self._skipped = extra["skipped_steps"].to(self._skipped.device).clone()
        # what the hooks captured since the last step stays: a checkpoint loaded between backward()
        # and step() is followed by a normal step on that backward's statistics, as in torch.optim
        self.communicator.loaded(self, self._steps)  # distributed: shards the curvature, checks agreement
        self._set_capture_mode()

    def _placement(self) -> list[tuple[torch.dtype, torch.device]]:
        return [(p.dtype, p.device) for group in self.param_groups for p in group["params"]]

    def _follow_parameters(self) -> None:
        """State tensors in the dtype and on the device of their parameters, as they are now.

        ``model.double()``, ``model.to(device)`` or ``model.half()`` after the optimizer was built (or
        a checkpoint saved elsewhere): the curvature moves to the layer's compute dtype and device,
        momentum and AdamW buffers to their parameter's, as ``Optimizer.load_state_dict`` casts them.
        """
        for layer in self.layers:
            LayerCurvature.of(self.state, layer.weight).follow(layer.weight)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                for key, value in state.items():
                    if not isinstance(value, Tensor):
                        continue
                    if key in _PARAMETER_SHAPED and (value.dtype != p.dtype or value.device != p.device):
                        state[key] = value.to(device=p.device, dtype=p.dtype)
                    elif key == "step" and value.device != p.device:  # AdamW's count: float32 everywhere
                        state[key] = value.to(p.device)
        device = _device_of_layers(self.layers, self._skipped.device)
        if self._skipped.device != device:
            self._skipped = self._skipped.to(device)
            self._nu_history = [nu.to(device) for nu in self._nu_history]
            if self._noise_total is not None:
                self._noise_total = self._noise_total.to(device)
        self._placed = self._placement()

    # ------------------------------------------------------------------------------ diagnostics
    @property
    def skipped_steps(self) -> Tensor:
        """Number of steps skipped because of non-finite gradients (a device tensor)."""
        return self._skipped

    def diagnostics(self) -> dict[str, dict[str, Tensor]]:
        """Per-layer ``beta`` (β*), ``eta`` (η*) and ``projection`` (s) of the last step.

        FOP also reports the layer's gradient-noise terms of the step, ``noise_trace`` (tr Σ) and
        ``noise_grad_sq`` (|G|²), from its two halves (:func:`fop.functional.gradient_noise_terms`).
        Values are device tensors (reading them synchronises); K-FAC reports β* = 0, η* = 1.
        """
        return {name: dict(values) for name, values in self._diagnostics.items()}

    def gradient_noise_scale(self, reset: bool = False) -> float | None:
        """The model's simple gradient-noise scale ``B_noise = tr Σ / |G|²`` (McCandlish et al. 2018).

        Both terms are summed over the curvature layers and over the steps since the last
        ``reset`` before the ratio is taken (each step's estimate alone is noisy). A batch much
        larger than ``B_noise`` is past the critical batch size: larger batches then barely
        reduce the number of steps. FOP only (K-FAC does not form the halves): ``None`` for K-FAC
        or before the first step; ``inf`` when the gradient estimate ``|G|²`` is not positive
        (pure noise). Synchronises with the device.
        """
        if self._noise_total is None:
            return None
        trace, grad_sq = self._noise_total.tolist()
        if reset:
            self._noise_total = None
        return trace / grad_sq if grad_sq > 0 else float("inf")

    def trust_region_stats(self, reset: bool = False) -> dict[str, float] | None:
        """How the ``kl_clip`` trust region acted on the steps since the last ``reset``.

        ``{"steps": k, "clipped_fraction": share of steps with ν < 1, "nu_median": median ν}``;
        ``None`` when no step was clipped-checked (``kl_clip=None`` or no step yet). A fraction
        near 1 with ``trust_region="step"`` means the learning rate had no effect on those steps.
        Synchronises with the device.
        """
        if not self._nu_history:
            return None
        nu = torch.stack(self._nu_history).float()
        if reset:
            self._nu_history.clear()
        return {
            "steps": int(nu.numel()),
            "clipped_fraction": float((nu < 1).float().mean()),
            "nu_median": float(nu.median()),
        }

    def remove_hooks(self) -> None:
        """Detach the module hooks (the optimizer then no longer sees curvature)."""
        for layer in self.layers:
            layer.detach()

    # ------------------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimization step (``closure`` is supported but not needed)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            check_param_group(index, group)
        placement = self._placement()
        if placement != self._placed:  # the model was cast or moved since the last step
            self._follow_parameters()
        if self.fisher == "mc" and self._captures_factors() and not self._sampled:
            if any(layer.captured() for layer in self.layers):
                raise RuntimeError(
                    f"{type(self).__name__}(fisher='mc') on a curvature step without a Monte-Carlo sample: "
                    "call optimizer.sample_fisher(output) after the forward and before loss.backward() "
                    "(it returns at once on other steps)"
                )
        ok = self._finite_gradients()
        inverse_step = self._steps % interval_at(self.inverse_update_interval, self._steps) == 0
        kronecker = next((group for group in self.param_groups if group["rule"] == "kronecker"), None)
        work, loose = self._gather_work() if kronecker is not None else ([], [])
        reduced = self.communicator.reduce(work, ok, self._context())  # distributed: the fallback gradients too
        # the local records are replaced by the reduced ones: their factor statistics (the size of
        # the factors) are released here, not kept alive through the inverses' temporaries
        del work
        ok = reduced.ok
        if kronecker is not None:
            self._kronecker_step(kronecker, reduced.work, loose, ok, inverse_step)
        for group in self.param_groups:
            if group["rule"] == "adamw" and "base_momentum" in group:
                self._notices.warn("cycled-betas", notices.CYCLED_BETAS)
            if group["rule"] != "kronecker":
                self._first_order_step(group, [p for p in group["params"] if p.grad is not None], ok)
        self._skipped.add_((~ok).to(self._skipped.dtype))
        self._report_skipped(ok)
        self._steps += 1
        self._sampled = False
        self._set_capture_mode()
        return loss

    def _context(self) -> StepContext:
        """What the communicator is told about this step."""
        params = tuple(p for group in self.param_groups for p in group["params"] if p.grad is not None)
        device = self._skipped.device
        return StepContext(self._steps, self._zero_grads, self._captures_factors(), device, self.splits_batch, params)

    def _grads(self) -> list[Tensor]:
        return [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]

    def _finite_gradients(self) -> Tensor:
        grads = self._grads()
        if not grads:
            return torch.ones((), dtype=torch.bool, device=self._skipped.device)
        if any(g.is_sparse for g in grads):
            names = [
                self._param_names.get(id(p), "?")
                for g in self.param_groups
                for p in g["params"]
                if p.grad is not None and p.grad.is_sparse
            ]
            raise TypeError(f"{SPARSE_MESSAGE.format(name=type(self).__name__)} (sparse gradients: {names})")
        norms = torch._foreach_norm(grads)
        # amax, not a sum: finite norms must not add up to an overflow (NaN propagates through amax)
        return torch.isfinite(torch.stack([n.to(norms[0].device, torch.float32) for n in norms]).amax())

    def _report_skipped(self, ok: Tensor) -> None:
        """Warn once about skipped steps, reading the device counter at steps 1, 2, 4, 8, ... only."""
        k = self._steps + 1
        if "skipped" in self._notices or k & (k - 1):
            return
        skipped = int(self._skipped)
        if skipped == 0:
            return
        overflow = not bool(ok) and all(bool(torch.isfinite(g).all()) for g in self._grads())
        self._notices.warn("skipped", notices.skipped_steps(type(self).__name__, skipped, k, overflow))

    def _set_capture_mode(self) -> None:
        """After a step or a load: whether the next cycle is on the curvature interval, which layers lack factors."""
        k = self._steps
        self._due = k % interval_at(self.curvature_update_interval, k) == 0
        self._factorless = [layer for layer in self.layers if not self.communicator.has_factors(self.state, layer)]

    def _captures_factors(self) -> bool:
        """Whether a forward now records factor statistics: on the interval, or while a trainable layer has none.

        Read at each forward, not fixed at the last step: a layer unfrozen since then (or a checkpoint
        loaded) counts at once. A frozen layer never gets factors: it must not force a capture at every step.
        """
        return self._due or any(layer.weight.requires_grad for layer in self._factorless)

    def _capture_settings(self) -> dict[str, Any]:
        """This forward's capture settings (see ``CaptureMode.for_forward``): the curvature flags, and the
        Kronecker group's ``factor_samples`` and ``weight_sharing`` as the group holds them now."""
        factors = self._captures_factors()
        settings: dict[str, Any] = {"factors": factors, "total": factors and not self._mode.halves}
        for index, group in enumerate(self.param_groups):
            if group["rule"] == "kronecker":
                factor_samples = group.get("factor_samples")
                weight_sharing = group.get("weight_sharing")
                if not capture_values_valid(factor_samples, weight_sharing):
                    check_param_group(index, group)  # raises, naming the group and the value
                settings["factor_samples"] = factor_samples
                settings["weight_sharing"] = weight_sharing
        return settings

    def _gather_work(self) -> tuple[list[LayerWork], list[tuple[Tensor, Tensor]]]:
        """This step's :class:`LayerWork`, and the trained biases of frozen weights with their gradients.

        A captured layer brings its statistics; a layer whose gradient did not all come through its
        forward (a weight also used outside the module, tied, or a second step() without a new
        backward) brings its plain gradient and takes the first-order rule (``first_order``), on one
        process and on many alike.
        """
        trained = [layer for layer in self.layers if layer.weight.grad is not None and layer.weight.requires_grad]
        trained_ids = {id(layer) for layer in trained}
        self._verify_own_gradients([layer for layer in trained if layer.verify and layer.captured()])
        captured: list[KroneckerLayer] = []
        plain: list[KroneckerLayer] = []
        loose: list[tuple[Tensor, Tensor]] = []
        for layer in self.layers:
            if id(layer) not in trained_ids:  # frozen (a stale p.grad of a frozen weight included) or unused this step
                layer.reset()
                bias = layer.bias
                if bias is not None and bias.requires_grad and bias.grad is not None:  # a trained bias, frozen weight
                    loose.append((bias, bias.grad))
                continue
            if id(layer) in self._foreign or not layer.captured():
                if id(layer) not in self._foreign:
                    self._warn_uncaptured(layer)
                layer.reset()
                plain.append(layer)
                continue
            captured.append(layer)
        ratio = self.communicator.loss_scale_ratio(captured)
        work = [LayerWork.from_capture(layer, ratio) for layer in captured]
        for layer in plain:
            grad = layer.folded_param_grad()
            assert grad is not None
            work.append(LayerWork(layer, grad, first_order=True, loss_scale=ratio))
        return work, loose

    def _warn_uncaptured(self, layer: KroneckerLayer) -> None:
        """A layer with gradients and no statistics: every cause the optimizer cannot tell apart, named."""
        self._notices.warn(layer.name, getattr(layer, "uncaptured_reason", None) or notices.uncaptured(layer.name))

    def _kronecker_step(
        self,
        group: dict[str, Any],
        work: list[LayerWork],
        loose: list[tuple[Tensor, Tensor]],
        ok: Tensor,
        inverse_step: bool,
    ) -> None:
        """Curvature layers, after the reduction: owners compute, directions are shared, all apply."""
        self._owner_directions([item for item in work if self.communicator.owns(item.layer)], group, ok, inverse_step)
        work = self.communicator.share(work)
        curvature = [item for item in work if not item.first_order]
        self._diagnostics.update((item.layer.name, item.diagnostics) for item in curvature if item.diagnostics)
        self._record_noise(curvature, ok)
        if group["kl_clip"] is not None and curvature:
            lr = group["lr"] if group["trust_region"] == "step" else 1.0
            nu = _trust_region_scale(curvature, lr, group["kl_clip"])
            work = [
                item if item.first_order else replace(item, direction=cast(Tensor, item.direction) * nu)
                for item in work
            ]
            self._nu_history.append(nu)
            del self._nu_history[:-_NU_HISTORY]
        params, directions = [p for p, _ in loose], [d for _, d in loose]
        for item in work:
            assert item.direction is not None
            for param, direction in zip(item.layer.params(), item.layer.unfold_direction(item.direction)):
                if param.requires_grad:  # a frozen bias of a trained weight stays put
                    params.append(param)
                    directions.append(direction)
        self._apply_sgd(group, params, directions, ok)

    def _verify_own_gradients(self, layers: list[KroneckerLayer]) -> None:
        """At a layer's first captured step: is ``p.grad`` all the gradient its hooks saw?

        One host synchronisation, once per layer. A layer whose weight also gets gradient from
        elsewhere (tied to another module's parameter, or used functionally as well) has wrong
        halves and factors: it takes the first-order rule from then on, with a warning.
        """
        checked = [(layer, share) for layer in layers if (share := layer.foreign_share()) is not None]
        if not checked:
            return
        values = torch.stack([share.float().cpu() for _, share in checked]).tolist()
        for (layer, _), value in zip(checked, values):
            if math.isnan(value):  # non-finite gradients: this step is skipped, decide at the next
                continue
            layer.verify = False
            if value > layer.foreign_tolerance():
                self._foreign.add(id(layer))
                layer.detach()
                self._notices.warn(layer.name, notices.foreign_gradient(layer.name, value))

    def _owner_directions(self, owned: list[LayerWork], group: dict[str, Any], ok: Tensor, inverse_step: bool) -> None:
        """Factor updates, eigendecompositions and FOP/K-FAC directions of the layers owned here."""
        curvature = [item for item in owned if not item.first_order]
        views = [LayerCurvature(self.state[item.layer.weight]) for item in curvature]
        factored = group["damping_mode"] == "factored"
        with phase("factors"):
            for item, view in zip(curvature, views):
                if item.a_factor is not None and item.g_factor is not None:
                    # factored damping keeps the factors its inverses came from until the next inverse update
                    keep = factored and not inverse_step and view.has_inverses
                    view.update_factors(item.a_factor, item.g_factor, group["factor_decay"], ok, keep)
                    # folded into the running factors: released before the inverses make their temporaries
                    # (the batch's sums are the size of the factors; a step's memory peak otherwise)
                    item.a_factor = item.g_factor = None
        if factored:
            with phase("cholesky"):
                due = [v for v in views if v.has_factors and (inverse_step or not v.has_inverses)]
                LayerCurvature.form_factored_inverses(due, group["damping"], fresh=True)
                # λ is part of the inverses: a new λ (a schedule, a checkpoint without the inverses'
                # λ) re-forms them from the same factors, as the eigenbasis route applies it at once
                stale = [v for v in views if v.has_inverses and v.inverse_damping != group["damping"]]
                LayerCurvature.form_factored_inverses(stale, group["damping"], fresh=False)
        else:
            with phase("eigh"):
                LayerCurvature.decompose([v for v in views if v.has_factors and (inverse_step or not v.has_eigen)])
        with phase("direction"):
            for item in owned:
                item.direction = item.grad  # the first-order rule; or no factors yet (first seen without capture)
            for item, view in zip(curvature, views):
                if view.has_factors:
                    item.direction, item.diagnostics = view.direction(item, group, self.projection, self.splits_batch)
                    if self.splits_batch and (item.g1 is None or item.g2 is None):
                        self._notices.warn(f"single:{item.layer.name}", notices.single_sample(item.layer.name))

    def _record_noise(self, work: Sequence[LayerWork], ok: Tensor) -> None:
        """Sum this step's gradient-noise terms over the layers (shared by their owners when distributed)."""
        noise = [
            torch.stack([item.diagnostics["noise_trace"], item.diagnostics["noise_grad_sq"]])
            for item in work
            if "noise_trace" in item.diagnostics
        ]
        if noise:
            # a skipped step (non-finite gradients) must not enter the noise estimate
            total = torch.where(ok, torch.stack([n.to(noise[0]) for n in noise]).sum(0), 0.0)
            self._noise_total = total if self._noise_total is None else self._noise_total + total

    def _apply_sgd(
        self, group: dict[str, Any], params: Sequence[Tensor], directions: Sequence[Tensor], ok: Tensor
    ) -> None:
        with phase("update"):
            self._momentum_update(group, params, directions, ok)

    def _momentum_update(
        self, group: dict[str, Any], params: Sequence[Tensor], directions: Sequence[Tensor], ok: Tensor
    ) -> None:
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        new_buffers = sgd_update(
            params,
            directions,
            buffers,
            lr=group["lr"],
            momentum=group["momentum"],
            weight_decay=group["weight_decay"],
            nesterov=group["nesterov"],
            ok=ok,
        )
        for p, buf in zip(params, new_buffers):
            if buf is not None:
                self.state[p]["momentum_buffer"] = buf

    def _first_order_step(self, group: dict[str, Any], params: list[Tensor], ok: Tensor) -> None:
        grads = [cast(Tensor, p.grad) for p in params]
        if group["rule"] == "sgd":
            self._apply_sgd(group, params, grads, ok)
        else:
            with phase("update"):
                adamw_update(
                    params,
                    grads,
                    [self.state[p] for p in params],
                    lr=group["lr"],
                    betas=group["betas"],
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    ok=ok,
                )


class FOP(KroneckerOptimizer):
    """Fisher-Orthogonal Projection (Lu & Armour, AAAI 2026) for Linear, convolution and attention layers.

    Each forward batch is split into two halves; per layer, the Fisher-orthogonal component of
    the halves' gradient difference is mixed into K-FAC's natural gradient with the layer-wise
    coefficients ``β*`` and ``η*`` of :func:`fop.functional.fop_direction`. The arguments are
    :class:`KroneckerOptimizer`'s (``help(FOP.__init__)``). For an ablation without the projection
    (``β* = 0``, ``η* = 1``: K-FAC on ``g_avg = (g1 + g2)/2``, halves still formed), subclass with
    ``projection = False``.
    """


class KFAC(KroneckerOptimizer):
    """K-FAC (Martens & Grosse 2015): the FOP engine without the halves, ``β* = 0`` and ``η* = 1``.

    Damped as ``damping_mode`` says (factored by default). The arguments are
    :class:`KroneckerOptimizer`'s (``help(KFAC.__init__)``); ``eta`` has no effect.
    """

    projection = False
    splits_batch = False


# ---------------------------------------------------------------------------------- helpers
def _trust_region_scale(work: Sequence[LayerWork], lr: float | Tensor, kl_clip: float) -> Tensor:
    """``ν = min(1, √(κ / (lr² Σ_ℓ ⟨d_ℓ, g_ℓ⟩)))``, the factor on all directions of K-FAC's KL clipping.

    ``trust_region="direction"`` passes ``lr = 1``: the clip then bounds the direction, not the step.

    ``lr² Σ⟨d, g⟩`` is the second-order estimate of the step's change in the model's output
    distribution (KL divergence under the damped Fisher); capping it at ``κ`` keeps tiny
    gradients, amplified up to ``1/λ`` by the inverse, from throwing the model away when the loss
    approaches zero (Ba et al. 2017; the default of kfac-pytorch).
    """
    # item.dg: the owner's ⟨d, g⟩, identical on every process (distributed: g lives on the owner only)
    inners = [
        Fn.inner(item.direction, item.grad) if item.dg is None else item.dg
        for item in work
        if item.direction is not None
    ]
    total = torch.stack(inners).sum()
    estimate = (total * (lr * lr)).abs()
    return Fn.safe_divide(torch.full_like(estimate, kl_clip), estimate, estimate > kl_clip, 1.0).sqrt()


def _device_of_layers(layers: Sequence[KroneckerLayer], default: torch.device) -> torch.device:
    return layers[0].weight.device if layers else default


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
