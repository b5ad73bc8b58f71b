"""Optimizers by name, and the protocol's rules for learning rate, schedule and curvature interval.

Names: ``sgd`` (Nesterov momentum 0.9), ``adamw``, ``kfac`` and ``fop`` (this package), the
baselines of :mod:`fop.bench.baselines` (``muon``, ``soap``, ``lamb``, ``lars``, ``sfadamw``: each
with its authors' recipe, from the ``fop[baselines]`` extra), any other ``torch.optim`` class by
its name in any case (``rmsprop``, ``RAdam``, ...), and, when the ``pytorch-optimizer`` package is
installed, its other optimizers at their defaults.

Rules (documented in ``docs/benchmark.md``):

- :func:`scaled_lr`: base learning rate at the task's reference batch, scaled linearly with the
  batch size (SGD, K-FAC, FOP: the paper's rule) or by the square root (adaptive methods such as
  AdamW, whose updates do not grow with the gradient's size);
- :func:`warmup_decay`: linear warmup, then a decay to zero at the last epoch: cosine for every
  optimizer (so K-FAC and FOP share one schedule) except the baselines whose authors prescribe
  another (LAMB: linear; LARS: polynomial of power 2; Schedule-Free AdamW: none, constant);
- :func:`curvature_interval`: samples between curvature updates held fixed, so the interval in
  steps shrinks as the batch grows, down to every 5 steps.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fop.bench.errors import BenchError
from fop.optimizer import PAPER_PRESET

__all__ = [
    "CURVATURE_OPTIMIZERS",
    "Hyperparameters",
    "OptimizerSpec",
    "curvature_interval",
    "resolve_optimizer",
    "scaled_lr",
    "warmup_cosine",
    "warmup_decay",
]

LINEAR = "linear"
SQRT = "sqrt"
SCALING_RULES = (LINEAR, SQRT)
# decays after the warmup (warmup_decay)
COSINE, LINEAR_DECAY, POLY2, CONSTANT = "cosine", "linear", "poly2", "constant"
DECAYS = (COSINE, LINEAR_DECAY, POLY2, CONSTANT)
CURVATURE_OPTIMIZERS = ("kfac", "fop")
SGD_MOMENTUM = 0.9


@dataclass(frozen=True)
class Hyperparameters:
    """Everything an optimizer of one run is built with.

    The curvature fields are read by K-FAC and FOP only. ``fallback_lr`` is the learning rate of
    their first-order fallback group (``None``: the library's default for ``fallback``: the main
    ``lr`` for SGD, ``fallback_lr``'s default for AdamW and for the AdamW half of ``"auto"``).
    """

    lr: float
    weight_decay: float
    momentum: float = SGD_MOMENTUM
    damping: float = 1e-3
    factor_decay: float = 0.95
    curvature_interval: int = 10
    fallback: str = "sgd"
    fallback_lr: float | None = None
    options: tuple[tuple[str, Any], ...] = ()  # extra K-FAC/FOP keyword arguments (a variant's)


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one named optimizer.

    ``scaling`` is its default learning-rate scaling rule; ``default_lr`` its own default learning
    rate (used when the task has no base learning rate for it); ``uses_curvature`` marks K-FAC/FOP.
    """

    name: str
    build: Callable[[nn.Module, Hyperparameters], torch.optim.Optimizer]
    scaling: str
    default_lr: float | None = None
    uses_curvature: bool = False
    base: str = ""  # the name its base learning rate is looked up under (a variant's base optimizer)
    options: dict[str, Any] = field(default_factory=dict)
    # > 1: the model's BatchNorm statistics per part of the batch (fop.bench.models.split_batch_norm)
    batch_norm_parts: int = 1
    decay: str = COSINE  # the schedule after the warmup (warmup_decay)
    # Schedule-Free: the optimizer's eval()/train() around each evaluation (its averaged weights)
    schedule_free: bool = False

    @property
    def lr_name(self) -> str:
        return self.base or self.name


# ----------------------------------------------------------------------------------------------
# Rules


def scaled_lr(base_lr: float, batch_size: int, reference_batch: int, rule: str) -> float:
    """Learning rate at ``batch_size`` from ``base_lr`` at ``reference_batch``.

    ``"linear"``: ``base_lr · B / B_ref``; ``"sqrt"``: ``base_lr · sqrt(B / B_ref)``.
    """
    ratio = batch_size / reference_batch
    if rule == LINEAR:
        return base_lr * ratio
    if rule == SQRT:
        return base_lr * math.sqrt(ratio)
    raise BenchError(f"unknown learning-rate scaling rule {rule!r} (choose from {', '.join(SCALING_RULES)})")


def curvature_interval(batch_size: int, reference_batch: int, reference_interval: int, min_interval: int = 5) -> int:
    """Steps between curvature (and inverse) updates at ``batch_size``.

    The number of training samples between two updates is held at its value at the reference
    batch, ``reference_interval · reference_batch``, so the update frequency in steps grows with
    the batch size:  ``max(min_interval, round(reference_interval · reference_batch / batch_size))``.
    The paper's floor is every 5 steps.
    """
    return max(min_interval, round(reference_interval * reference_batch / batch_size))


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate factor for :class:`torch.optim.lr_scheduler.LambdaLR`.

    Step ``s`` (0-based) uses ``(s + 1) / warmup_steps`` during warmup, then
    ``½ (1 + cos(π · (s − warmup) / (total − warmup)))``, reaching 0 after the last step.
    """
    return warmup_decay(total_steps, warmup_steps, COSINE)


def warmup_decay(total_steps: int, warmup_steps: int, decay: str) -> Callable[[int], float]:
    """Learning-rate factor: linear warmup as :func:`warmup_cosine`, then with ``p`` the progress
    ``(s − warmup) / (total − warmup)``: ``"cosine"`` ``½ (1 + cos πp)``, ``"linear"`` ``1 − p``,
    ``"poly2"`` ``(1 − p)²``, ``"constant"`` 1 (no decay: Schedule-Free)."""
    if decay not in DECAYS:
        raise BenchError(f"unknown schedule {decay!r} (choose from {', '.join(DECAYS)})")
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    decay_steps = max(1, total_steps - warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        if decay == COSINE:
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if decay == LINEAR_DECAY:
            return 1.0 - progress
        if decay == POLY2:
            return (1.0 - progress) ** 2
        return 1.0

    return factor


# ----------------------------------------------------------------------------------------------
# Factory


def _sgd(model: nn.Module, hp: Hyperparameters) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(), lr=hp.lr, momentum=hp.momentum, nesterov=True, weight_decay=hp.weight_decay
    )


def _adamw(model: nn.Module, hp: Hyperparameters) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)


def _curvature_builder(class_name: str) -> Callable[[nn.Module, Hyperparameters], torch.optim.Optimizer]:
    def build(model: nn.Module, hp: Hyperparameters) -> torch.optim.Optimizer:
        import fop

        optimizer_class = getattr(fop, class_name)
        return optimizer_class(
            model,
            lr=hp.lr,
            momentum=hp.momentum,
            weight_decay=hp.weight_decay,
            damping=hp.damping,
            factor_decay=hp.factor_decay,
            curvature_update_interval=hp.curvature_interval,
            inverse_update_interval=hp.curvature_interval,
            fallback=hp.fallback,
            fallback_lr=hp.fallback_lr,
            **dict(hp.options),
        )

    build.__name__ = f"build_{class_name.lower()}"
    return build


def _muon(model: nn.Module, hp: Hyperparameters) -> torch.optim.Optimizer:
    from fop.bench import baselines

    return baselines.build_muon(model, hp.lr, hp.weight_decay)


def _soap(model: nn.Module, hp: Hyperparameters) -> torch.optim.Optimizer:
    from fop.bench import baselines

    return baselines.build_soap(model, hp.lr, hp.weight_decay)


def _lamb(model: nn.Module, hp: Hyperparameters) -> torch.optim.Optimizer:
    from fop.bench import baselines

    return baselines.build_lamb(model, hp.lr, hp.weight_decay)


def _lars(model: nn.Module, hp: Hyperparameters) -> torch.optim.Optimizer:
    from fop.bench import baselines

    return baselines.build_lars(model, hp.lr, hp.weight_decay, hp.momentum)


def _sfadamw(model: nn.Module, hp: Hyperparameters) -> torch.optim.Optimizer:
    from fop.bench import baselines

    return baselines.build_sfadamw(model, hp.lr, hp.weight_decay)


# LARS's learning rate multiplies a trust ratio of 1e-3 · |w| / |g| (a step of lr · 1e-3 of each
# layer's weight norm), so it has its own scale: 1 at the reference batch, linearly scaled.
LARS_BASE_LR = 1.0

_BUILTIN = {
    "sgd": OptimizerSpec("sgd", _sgd, LINEAR),
    "adamw": OptimizerSpec("adamw", _adamw, SQRT),
    "kfac": OptimizerSpec("kfac", _curvature_builder("KFAC"), LINEAR, uses_curvature=True),
    "fop": OptimizerSpec("fop", _curvature_builder("FOP"), LINEAR, uses_curvature=True),
}

# The baselines (docs/benchmark.md, "Baselines"): the package each needs, and its spec. Their base
# learning rate and weight decay are the task's AdamW ones (``base="adamw"``) unless the task or
# ``--base-lr`` names them, except LARS, whose learning rate has its own scale.
BASELINE_PACKAGES = {
    "muon": "torch",  # torch.optim.Muon: torch >= 2.9
    "soap": "pytorch_optimizer",
    "lamb": "pytorch_optimizer",
    "lars": "pytorch_optimizer",
    "sfadamw": "schedulefree",
}
_BASELINES = {
    "muon": OptimizerSpec("muon", _muon, SQRT, base="adamw"),
    "soap": OptimizerSpec("soap", _soap, SQRT, base="adamw"),
    "lamb": OptimizerSpec("lamb", _lamb, SQRT, base="adamw", decay=LINEAR_DECAY),
    "lars": OptimizerSpec("lars", _lars, LINEAR, default_lr=LARS_BASE_LR, decay=POLY2),
    "sfadamw": OptimizerSpec("sfadamw", _sfadamw, SQRT, base="adamw", decay=CONSTANT, schedule_free=True),
}


def _generic_builder(optimizer_class: type) -> Callable[[nn.Module, Hyperparameters], torch.optim.Optimizer]:
    accepted = inspect.signature(optimizer_class).parameters

    def build(model: nn.Module, hp: Hyperparameters) -> torch.optim.Optimizer:
        kwargs = {"lr": hp.lr}
        if "weight_decay" in accepted:
            kwargs["weight_decay"] = hp.weight_decay
        return optimizer_class(model.parameters(), **kwargs)

    return build


def _default_lr(optimizer_class: type) -> float | None:
    parameter = inspect.signature(optimizer_class).parameters.get("lr")
    default = None if parameter is None else parameter.default
    return float(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else None


def _torch_optim_class(name: str) -> type | None:
    for attribute in dir(torch.optim):
        candidate = getattr(torch.optim, attribute)
        if (
            attribute.lower() == name.lower()
            and isinstance(candidate, type)
            and issubclass(candidate, torch.optim.Optimizer)
            and candidate is not torch.optim.Optimizer
        ):
            return candidate
    return None


def _pytorch_optimizer_class(name: str) -> type | None:
    try:
        import pytorch_optimizer
    except ImportError:
        return None
    try:
        return pytorch_optimizer.load_optimizer(name.lower())
    except Exception:  # the package raises its own error types for unknown names
        return None


# Optimizers whose update is proportional to the gradient (scaled linearly); all others are
# treated as adaptive (square-root scaling).
_SGD_LIKE_TAGS = ("sgd", "lars")


# K-FAC/FOP variants, ``fop:mc:sum``: each token sets constructor arguments (docs/benchmark.md); besides
# these, ``klX`` sets ``kl_clip=X`` and ``fsN`` sets ``factor_samples=N`` (see _variant).
VARIANT_TOKENS: dict[str, dict[str, Any]] = {
    "mc": {"fisher": "mc"},
    "sum": {"eta": "sum"},
    "factored": {"damping_mode": "factored"},  # the default since 0.3
    "exact": {"damping_mode": "exact"},  # the default before 0.3
    "replace": {"factor_decay": 0.0},
    "noclip": {"kl_clip": None},
    # κ = 1 on the direction: the step lr·ν·d has Fisher norm at most lr (lr is the trust radius)
    "dirclip": {"trust_region": "direction", "kl_clip": 1.0},  # the default since 0.2
    "stepclip": {"trust_region": "step", "kl_clip": 1e-3},  # the default before 0.2 (kfac-pytorch's rule)
    "paper": PAPER_PRESET,
    # distributed (fop-bench --nproc): every process computes every layer, instead of one owner per layer
    "replicated": {"replicated": True},
    # K-FAC-reduce: one factor row per sample for convolutions and sequence layers (weight sharing)
    "reduce": {"weight_sharing": "reduce"},
    # the first-order rule of the parameters outside supported layers, at the library's default
    # learning rate for it (sgd: the main lr; adamw: 1e-3) instead of the task's rule; flX fixes it
    "fbsgd": {"fallback": "sgd"},
    "fbadamw": {"fallback": "adamw"},
}


# Variant tokens that change the model instead of the optimizer: ``halfbn`` normalises each half of
# the batch with its own BatchNorm statistics, what FOP's halves formed by two processes compute.
MODEL_TOKENS: dict[str, int] = {"halfbn": 2}


def _positive_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 < value < math.inf else None


def _positive_int(text: str) -> int | None:
    return int(text) if text.isdigit() and int(text) > 0 else None


# Variant tokens that carry a number after a two-letter prefix: the argument, its parser, what it takes.
_NUMBER_TOKENS: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "kl": ("kl_clip", _positive_float, "a positive number, e.g. kl0.1"),
    "fs": ("factor_samples", _positive_int, "a whole number of samples > 0, e.g. fs512"),
    "fl": ("fallback_lr", _positive_float, "a positive learning rate, e.g. fl4e-3"),
}


def _variant(key: str) -> OptimizerSpec:
    base, *tokens = key.split(":")
    if base not in CURVATURE_OPTIMIZERS:
        raise BenchError(f"variants ({key!r}) exist for kfac and fop only")
    options: dict[str, Any] = {}
    parts = 1
    for token in tokens:
        if token in MODEL_TOKENS:
            parts = MODEL_TOKENS[token]
            continue
        number = _NUMBER_TOKENS.get(token[:2]) if token not in VARIANT_TOKENS else None
        if number is not None:  # kl0.1: kl_clip=0.1; fs512: factor_samples=512; fl4e-3: fallback_lr=4e-3
            argument, parse, wanted = number
            value = parse(token[2:])
            if value is None:
                raise BenchError(f"variant {token!r} in {key!r}: {token[:2]} takes {wanted}")
            options[argument] = value
            continue
        if token not in VARIANT_TOKENS:
            known = ", ".join([*VARIANT_TOKENS, *MODEL_TOKENS])
            raise BenchError(f"unknown variant {token!r} in {key!r} (choose from {known})")
        options.update(VARIANT_TOKENS[token])
    spec = resolve_optimizer(base)
    return OptimizerSpec(
        key, spec.build, spec.scaling, spec.default_lr, True, base=base, options=options, batch_norm_parts=parts
    )


def resolve_optimizer(name: str) -> OptimizerSpec:
    """The :class:`OptimizerSpec` of ``name``, or :class:`BenchError` if unknown or unavailable.

    ``kfac:TOKEN[:TOKEN...]`` and ``fop:...`` name variants (:data:`VARIANT_TOKENS`).
    """
    key = name.strip().lower()
    if ":" in key:
        return _variant(key)
    if key in _BUILTIN:
        spec = _BUILTIN[key]
        if spec.uses_curvature:
            _require_fop(key)
        return spec
    if key in _BASELINES:
        from fop.bench.baselines import require, require_muon

        if key == "muon":
            require_muon()
        else:
            require(BASELINE_PACKAGES[key], key)
        return _BASELINES[key]
    optimizer_class = _torch_optim_class(key) or _pytorch_optimizer_class(key)
    if optimizer_class is None:
        raise BenchError(
            f"unknown optimizer {name!r} (choose from sgd, adamw, kfac, fop, muon, soap, lamb, lars, sfadamw, "
            "any torch.optim class such as rmsprop or radam, or a pytorch-optimizer name)"
        )
    scaling = LINEAR if any(tag in key for tag in _SGD_LIKE_TAGS) else SQRT
    return OptimizerSpec(key, _generic_builder(optimizer_class), scaling, default_lr=_default_lr(optimizer_class))


def _require_fop(name: str) -> None:
    try:
        import fop

        getattr(fop, name.upper())
    except (ImportError, AttributeError) as exc:
        raise BenchError(f"optimizer {name!r} is not available: {exc}") from None
