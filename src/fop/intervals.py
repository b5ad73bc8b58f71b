"""Update intervals (``int`` or ``step -> int``): one validation, read by the engine and the cost model."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Interval", "check_interval", "interval_at", "mean_interval"]

Interval = int | Callable[[int], int]

# steps over which the cost model averages a callable interval
_HORIZON = 1000


def _valid(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_interval(name: str, value: Interval) -> None:
    """Refuse anything but an int >= 1 or a callable (whose values :func:`interval_at` checks)."""
    if not (callable(value) or _valid(value)):
        raise ValueError(f"{name} must be an int >= 1 or a callable step -> int, got {value!r}")


def interval_at(interval: Interval, step: int) -> int:
    """The interval in force at ``step``; a callable's value is checked here."""
    value = interval(step) if callable(interval) else interval
    if not _valid(value):
        raise ValueError(f"update interval callable returned {value!r} at step {step}; it must return an int >= 1")
    return value


def mean_interval(interval: Interval, horizon: int = _HORIZON) -> float:
    """Steps per update on average: ``T`` for an int, ``horizon / (due steps in [0, horizon))`` for a callable.

    A schedule that refreshes often early and rarely later is weighed by what it does over the
    whole horizon, not by its value at step 0.
    """
    if not callable(interval):
        return float(interval_at(interval, 0))
    due = sum(1 for k in range(horizon) if k % interval_at(interval, k) == 0)
    return horizon / max(1, due)
