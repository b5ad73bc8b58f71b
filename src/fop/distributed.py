"""How one optimizer step is shared between processes.

The engine (:class:`fop.optimizer.KroneckerOptimizer`) calls a :class:`Communicator` at fixed
points of every step:

1. ``reduce(work, ok)``: combine the processes' per-layer gradients, sub-batch gradients and factor
   statistics (each :class:`fop.curvature.LayerWork`), and agree on the finite-gradient flag;
2. ``owns(layer)``: only the owner of a layer updates its curvature and computes its direction;
3. ``share(work)``: hand every process the directions computed by their owners;
4. ``reduce_first_order(params, ok)``: average the fallback parameters' gradients.

:class:`LocalCommunicator` is the single-process case, where all four are trivial.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from .curvature import KroneckerLayer, LayerWork

__all__ = ["Communicator", "LocalCommunicator"]


class Communicator:
    """Interface between the optimizer engine and the processes that share a step."""

    def reduce(self, work: Sequence[LayerWork], ok: Tensor) -> Tensor:
        raise NotImplementedError

    def owns(self, layer: KroneckerLayer) -> bool:
        raise NotImplementedError

    def share(self, work: Sequence[LayerWork]) -> None:
        raise NotImplementedError

    def reduce_first_order(self, params: Sequence[Tensor], ok: Tensor) -> Tensor:
        raise NotImplementedError


class LocalCommunicator(Communicator):
    """One process: nothing to reduce or share, every layer is owned locally."""

    def reduce(self, work: Sequence[LayerWork], ok: Tensor) -> Tensor:
        return ok

    def owns(self, layer: KroneckerLayer) -> bool:
        return True

    def share(self, work: Sequence[LayerWork]) -> None:
        return None

    def reduce_first_order(self, params: Sequence[Tensor], ok: Tensor) -> Tensor:
        return ok
