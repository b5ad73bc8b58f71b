"""What a task measures on its held-out split, and which way is better.

Three metrics, named by :attr:`fop.bench.tasks.Task.metric`:

- ``"accuracy"``: test accuracy, a fraction, higher is better, shown in percent;
- ``"error"``: the same accuracy shown as Top-1 error (100 − accuracy, in percent);
- ``"loss"``: held-out cross-entropy in nats per token, lower is better; also shown in bits
  (nats / ln 2: bits per character for a character-level model).

Records store the measured value under :attr:`Metric.field` in each curve point and as
``best_<field>`` / ``final_<field>``; ``"accuracy"`` and ``"error"`` share the field ``accuracy``,
so the records of the image tasks keep their layout.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from fop.bench.errors import BenchError

__all__ = ["METRICS", "Metric", "get_metric"]


@dataclass(frozen=True)
class Metric:
    """One held-out metric: its record field, its direction and how it is shown."""

    name: str
    field: str  # key of a curve point; records hold best_<field> and final_<field>
    higher_is_better: bool
    title: str  # axis and section title, with its unit
    short: str  # column heading ("acc", "error", "val loss")
    difference_unit: str  # unit of a paired difference ("points", "nats")

    @property
    def best_field(self) -> str:
        return f"best_{self.field}"

    @property
    def final_field(self) -> str:
        return f"final_{self.field}"

    def reached(self, value: float, target: float) -> bool:
        """Whether ``value`` meets ``target`` (at least it, or at most it for a loss)."""
        return value >= target if self.higher_is_better else value <= target

    def best(self, values: Iterable[float]) -> float:
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return math.nan
        return max(finite) if self.higher_is_better else min(finite)

    def rank(self, value: float) -> float:
        """A sort key: smaller is better (NaN, a diverged run, last)."""
        if math.isnan(value):
            return math.inf
        return -value if self.higher_is_better else value

    def shown(self, value: float) -> float:
        """The value as reported: percent accuracy, percent error, or nats."""
        if self.name == "error":
            return 100 * (1 - value)
        if self.name == "accuracy":
            return 100 * value
        return value

    def text(self, value: float) -> str:
        return f"{self.shown(value):.2f}" if self.name != "loss" else f"{value:.4f}"

    def difference(self, a: float, b: float) -> float:
        """``a − b`` as reported (accuracy or error points, nats): in the metric's own direction."""
        return self.shown(a) - self.shown(b)

    def favours(self, difference: float) -> bool:
        """Whether a :meth:`difference` favours its first term (more accuracy, less error or loss)."""
        return difference > 0 if self.name == "accuracy" else difference < 0

    def target_text(self, target: float) -> str:
        if self.name == "loss":
            return f"validation loss {target:g} nats ({target / math.log(2):.3g} bits) per token"
        text = f"{100 * target:g}% test accuracy"
        return text + (f" (Top-1 error {100 * (1 - target):g}%)" if self.name == "error" else "")

    @property
    def plot_file(self) -> str:
        return "val_loss_vs_time.png" if self.name == "loss" else "accuracy_vs_time.png"


METRICS = {
    "accuracy": Metric("accuracy", "accuracy", True, "test accuracy (%)", "acc", "points"),
    "error": Metric("error", "accuracy", True, "Top-1 error (%)", "error", "points"),
    "loss": Metric("loss", "val_loss", False, "validation loss (nats per token)", "val loss", "nats"),
}


def get_metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise BenchError(f"unknown metric {name!r} (choose from {', '.join(METRICS)})") from None
