"""Moving tensors between the processes of one group: the collectives a distributed step uses.

A :class:`Transport` knows a process group, its ranks and its timeout, and nothing about layers or
optimizers: it reduces, broadcasts and gathers what it is given, counts the bytes it sent since
:meth:`Transport.new_step`, and turns a collective that does not complete into an error naming
what was being waited for.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Transport"]


class Transport:
    """The collectives of one process group (``group=None``: a new group over every process)."""

    def __init__(self, group: Any = None, timeout: datetime.timedelta | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistributedCommunicator needs torch.distributed.init_process_group(...) first")
        self.own_group = group is None
        if group is None:
            group = dist.new_group(timeout=timeout) if timeout is not None else dist.new_group()
        self.group = group
        self.timeout = timeout
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.global_ranks = [dist.get_global_rank(group, r) for r in range(self.world_size)]
        self.backend = str(dist.get_backend(group))
        self.sent: dict[str, int] = {}

    def new_step(self) -> None:
        """Start counting the bytes of a new step."""
        self.sent = {"all_reduce": 0, "reduce": 0, "broadcast": 0}

    def _count(self, kind: str, tensor: Tensor) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + tensor.numel() * tensor.element_size()

    # ----------------------------------------------------------------------------- non-blocking
    def all_reduce(self, flat: Tensor) -> Any:
        """SUM over the processes, in place; returns the handle to :meth:`wait` on."""
        self._count("all_reduce", flat)
        return dist.all_reduce(flat, group=self.group, async_op=True)

    def reduce(self, flat: Tensor, dst: int) -> Any:
        """SUM into group rank ``dst``'s ``flat``; returns the handle."""
        self._count("reduce", flat)
        return dist.reduce(flat, dst=self.global_ranks[dst], group=self.group, async_op=True)

    def broadcast(self, flat: Tensor, src: int) -> Any:
        """Group rank ``src``'s ``flat`` to every process; returns the handle."""
        self._count("broadcast", flat)
        return dist.broadcast(flat, src=self.global_ranks[src], group=self.group, async_op=True)

    def wait(self, handle: Any, what: str) -> None:
        """Wait for a collective; a process that left or the timeout becomes a RuntimeError naming ``what``."""
        try:
            handle.wait()
        except RuntimeError as exc:
            raise RuntimeError(
                f"fop: {what} did not complete on all {self.world_size} processes: a process stopped taking "
                "part (crashed, or did not call step() / state_dict() / load_state_dict() with the others) "
                f"or the group's timeout ({self.timeout}) ran out. Cause: {exc}"
            ) from exc

    def all_reduce_now(self, flat: Tensor, what: str) -> None:
        """:meth:`all_reduce` and :meth:`wait`."""
        self.wait(self.all_reduce(flat), what)

    # ----------------------------------------------------------------------------- objects and models
    def all_gather_object(self, obj: Any) -> list[Any]:
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, obj, group=self.group)
        return everyone

    def gather_object(self, obj: Any) -> list[Any] | None:
        """Every process's ``obj`` on group rank 0 (None elsewhere)."""
        everyone: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, everyone, dst=self.global_ranks[0], group=self.group)
        return everyone

    def broadcast_tensors(self, tensors: Sequence[Tensor]) -> None:
        """Rank 0's values of ``tensors`` to every process, one flat broadcast per dtype."""
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        seen: set[int] = set()
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                by_dtype.setdefault(t.dtype, []).append(t)
        with torch.no_grad():
            for group in by_dtype.values():
                flat = torch.cat([t.detach().reshape(-1) for t in group])
                dist.broadcast(flat, src=self.global_ranks[0], group=self.group)
                off = 0
                for t in group:
                    t.copy_(flat[off : off + t.numel()].view_as(t))
                    off += t.numel()

    def close(self) -> None:
        """Destroy the process group this transport created (optional; for long-lived processes)."""
        if self.own_group and self.group is not None and dist.is_initialized():
            dist.destroy_process_group(self.group)
        self.group = None
        self.own_group = False
