"""The optimizer's hyperparameters: one set of checks for the constructor and for every step.

Schedulers and users edit ``optimizer.param_groups`` after construction (``group["lr"] = ...``,
``group["damping"] = ...``). A value the constructor refuses must not be taken silently at a step:
``damping=-1`` would train undamped, ``kl_clip=-5`` writes NaN into every parameter. So the values
each param group carries are checked at every ``step()`` by the same code, with the same messages,
as the constructor's arguments, before anything is changed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .curvature import WEIGHT_SHARING
from .functional import DAMPING_MODES, ETA_CONVENTIONS
from .intervals import Interval, check_interval

__all__ = [
    "AUTO_FALLBACK_LR",
    "FALLBACKS",
    "FALLBACK_RULES",
    "FISHER_TYPES",
    "GROUP_KEYS",
    "TRUST_REGIONS",
    "capture_values_valid",
    "check_constructor_arguments",
    "check_group_values",
    "check_param_group",
]

FALLBACK_RULES = ("sgd", "adamw")  # the rules a param group can follow besides "kronecker"
# the constructor's choices: "auto" (the default since 0.4) gives BatchNorm parameters SGD at lr and
# every other fallback parameter AdamW at fallback_lr (default AUTO_FALLBACK_LR); docs/evidence.md §12
FALLBACKS = ("auto", *FALLBACK_RULES)
AUTO_FALLBACK_LR = 8e-3
FISHER_TYPES = ("empirical", "mc")
TRUST_REGIONS = ("step", "direction")

# The hyperparameters every param group carries (the constructor's values are the defaults).
GROUP_KEYS = (
    "lr",
    "momentum",
    "weight_decay",
    "nesterov",
    "damping",
    "factor_decay",
    "projection_eps",
    "kl_clip",
    "trust_region",
    "damping_mode",
    "eta",
    "factor_samples",
    "weight_sharing",
)


def check_group_values(
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    damping: float,
    factor_decay: float,
    projection_eps: float,
    kl_clip: float | None,
    trust_region: str,
    damping_mode: str,
    eta: str,
    factor_samples: int | None,
    weight_sharing: str,
    read_tensors: bool = True,
) -> None:
    """The values a param group carries, each checked with a message naming it.

    ``read_tensors=False`` leaves the value of a tensor ``lr`` on an accelerator unread (reading it
    would synchronise the device at every step); its size is still checked.
    """
    _check_nonneg("lr", lr, read_tensors)
    if not (_is_real(momentum) and 0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    _check_nonneg("weight_decay", weight_decay, read_tensors)
    if not isinstance(nesterov, bool):
        raise ValueError(f"nesterov must be True or False, got {nesterov!r}")
    if nesterov and momentum <= 0:
        raise ValueError("nesterov=True requires momentum > 0")
    if not (_is_real(damping) and 0 < damping < math.inf):
        raise ValueError(f"damping must be a finite float > 0, got {damping!r}")
    if not (_is_real(factor_decay) and 0.0 <= factor_decay < 1.0):
        raise ValueError(f"factor_decay must be in [0, 1), got {factor_decay!r}")
    if not (_is_real(projection_eps) and projection_eps >= 0):
        raise ValueError(f"projection_eps must be >= 0, got {projection_eps!r}")
    if kl_clip is not None and not (_is_real(kl_clip) and 0 < kl_clip < math.inf):
        raise ValueError(f"kl_clip must be > 0 or None (no clipping), got {kl_clip!r}")
    _check_choice("trust_region", trust_region, TRUST_REGIONS)
    _check_choice("damping_mode", damping_mode, DAMPING_MODES)
    _check_choice("eta", eta, ETA_CONVENTIONS)
    if not capture_values_valid(factor_samples, WEIGHT_SHARING[0]):
        raise ValueError(f"factor_samples must be an int >= 1 or None (every sample), got {factor_samples!r}")
    _check_choice("weight_sharing", weight_sharing, WEIGHT_SHARING)


def capture_values_valid(factor_samples: Any, weight_sharing: Any) -> bool:
    """Whether the values the hooks read at each forward are usable (cheap: no message built).

    The forward hooks call this for every layer of every forward; :func:`check_group_values` gives
    the message when it is False.
    """
    samples_ok = factor_samples is None or (type(factor_samples) is int and factor_samples >= 1)
    return samples_ok and weight_sharing in WEIGHT_SHARING


def check_adamw_values(betas: Any, eps: Any) -> None:
    """An AdamW fallback group's coefficients."""
    if not (
        isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_real(b) and 0.0 <= b < 1.0 for b in betas)
    ):
        raise ValueError(f"fallback_betas must be two floats in [0, 1), got {betas!r}")
    if not (_is_real(eps) and 0 < eps < math.inf):
        raise ValueError(f"fallback_eps must be > 0, got {eps!r}")


def check_constructor_arguments(
    *,
    curvature_update_interval: Interval,
    inverse_update_interval: Interval,
    fisher: str,
    fallback: str,
    fallback_lr: float | None,
    fallback_betas: tuple[float, float],
    fallback_eps: float,
    **group_values: Any,
) -> None:
    """The constructor's arguments: the param-group values (:func:`check_group_values`) and the rest."""
    check_group_values(**group_values)
    check_interval("curvature_update_interval", curvature_update_interval)
    check_interval("inverse_update_interval", inverse_update_interval)
    _check_choice("fisher", fisher, FISHER_TYPES)
    _check_choice("fallback", fallback, FALLBACKS)
    if fallback_lr is not None:
        _check_nonneg("fallback_lr", fallback_lr, True)
    check_adamw_values(fallback_betas, fallback_eps)


def check_param_group(index: int, group: Mapping[str, Any]) -> None:
    """A param group's values as the step finds them: one ``ValueError`` naming the group and the key.

    Raised before the step changes anything, so the step can be retried once the value is fixed.
    """
    try:
        missing = [key for key in GROUP_KEYS if key not in group]
        if missing:
            raise ValueError(f"the keys {missing} are missing (they were deleted from the group)")
        values = {key: group[key] for key in GROUP_KEYS}
        lr = values["lr"]
        check_group_values(**values, read_tensors=not (isinstance(lr, Tensor) and lr.device.type != "cpu"))
        if group.get("rule") == "adamw":
            check_adamw_values(group.get("betas"), group.get("eps"))
    except ValueError as error:
        rule = group.get("rule", "?")
        raise ValueError(
            f"optimizer.param_groups[{index}] ('{rule}' group) holds a value the optimizer cannot use: {error}. "
            "It was set after construction (by a scheduler or an edit of param_groups); set a valid value "
            "before the next step() (nothing was changed by this one)"
        ) from None


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _check_nonneg(name: str, value: float | Tensor, read_tensors: bool) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} as a Tensor must have one element")
        if not read_tensors:
            return
        value = float(value)
    if not (_is_real(value) and 0 <= value < math.inf):
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
