"""FOP / K-FAC inside ``DistributedDataParallel``: a communication hook that keeps the two halves.

DDP averages every gradient in one bucketed, overlapped all-reduce, which erases the difference
between the two global sub-batches that FOP needs. :func:`dual_gradient_hook` replaces DDP's
all-reduce of each bucket by the dual-gradient reduction of the paper's Algorithm 1 (the one
:class:`fop.distributed.DistributedCommunicator` performs outside DDP): a process writes its local
bucket into slot ``rank % 2`` of a zeroed two-slot buffer, the buffer is SUM-reduced, and

    g1 = S_even / ⌈N/2⌉,   g2 = S_odd / ⌊N/2⌋,   p.grad = (S_even + S_odd) / N

so every parameter's ``.grad`` is what plain DDP gives, and the halves wait for ``step()``::

    ddp_model = DistributedDataParallel(model)
    optimizer = FOP(model)                                   # or FOP(ddp_model.module)
    ddp_model.register_comm_hook(optimizer, dual_gradient_hook)

On its first call the hook installs a :class:`DDPCommunicator` in the optimizer (no collective),
which then takes the halves from the hook, averages the factor statistics across processes on
curvature steps (one all-reduce of their upper triangles), and has every process compute every
layer's direction (replicated: parameters stay identical without a broadcast). Traffic per step:
twice DDP's gradient bytes for FOP (two slots), DDP's for K-FAC (one slot), plus the factor
triangles on curvature steps and one all-reduce of the layers' bias-sized loss-scale references.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .assignment import factor_entries
from .codec import FactorCodec
from .curvature import KroneckerLayer, LayerWork, loss_scale_ratio
from .distributed import LocalCommunicator, Reduced, StepContext
from .functional import compute_dtype

__all__ = ["DDPCommunicator", "bytes_per_step", "dual_gradient_hook"]


class DDPCommunicator(LocalCommunicator):
    """The optimizer's side of :func:`dual_gradient_hook` (installed by the hook; see the module doc).

    Every process owns every layer and shares nothing, as one local process does; DDP's hook has
    averaged the fallback parameters' gradients. ``optimizer``: the FOP or KFAC it serves (only its
    ``splits_batch`` is read); the hook installs it with ``optimizer.use_communicator``.
    """

    halves_from_processes = True  # the even and the odd ranks
    # p.grad is DDP's all-reduced gradient, which no local hook saw: the check that a layer's
    # gradient is all its own (tied weights) cannot be made on it
    local_gradients = False

    def __init__(self, optimizer: Any, group: Any = None) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.splits = bool(optimizer.splits_batch)
        self.n_even, self.n_odd = (self.world_size + 1) // 2, self.world_size // 2
        self._halves: dict[int, tuple[Tensor, Tensor]] = {}  # id(param) -> (g1, g2) of the last backward
        self._codec = FactorCodec()
        self.last_step_bytes: dict[str, int] = {"hook_all_reduce": 0, "all_reduce": 0}  # of the last step()
        self._hook_bytes = 0  # since the last step()
        if self.world_size < 2:
            raise ValueError("dual_gradient_hook needs a process group of two or more processes")

    # ----------------------------------------------------------------------------- DDP side
    def reduce_bucket(self, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        buffer = bucket.buffer()
        slots = buffer.new_zeros(2 if self.splits else 1, buffer.numel())
        slots[self.rank % 2 if self.splits else 0].copy_(buffer)
        self._hook_bytes += slots.numel() * slots.element_size()
        params = bucket.parameters()
        future = dist.all_reduce(slots, group=self.group, async_op=True).get_future()

        def finish(fut: torch.futures.Future) -> Tensor:
            total = fut.value()[0]
            if not self.splits:
                return total[0] / self.world_size
            g1, g2 = total[0] / self.n_even, total[1] / self.n_odd
            offset = 0
            for p in params:
                n = p.numel()
                self._halves[id(p)] = (g1[offset : offset + n].view_as(p), g2[offset : offset + n].view_as(p))
                offset += n
            return (total[0] + total[1]) / self.world_size

        return future.then(finish)

    # ----------------------------------------------------------------------------- engine side
    def loss_scale_ratio(self, layers: Sequence[KroneckerLayer]) -> Tensor | None:
        """As :func:`fop.curvature.loss_scale_ratio`, with the hooks' local references averaged first.

        ``p.grad`` is already DDP's mean over processes, so the ratio compares it with the mean of
        the processes' hook-side references (the same ``r`` on every process). The halves DDP's
        buckets carried are of the back-propagated loss too: :meth:`reduce` scales them by ``r``
        (``LayerWork.loss_scale``).
        """
        self.last_step_bytes = {"hook_all_reduce": self._hook_bytes, "all_reduce": 0}  # a step begins here
        self._hook_bytes = 0
        referenced = [(layer, ref) for layer in layers if (ref := layer.hook_reference()) is not None]
        if referenced:
            flat = torch.cat([ref.reshape(-1) for _, ref in referenced])
            self._all_reduce(flat)
            flat /= self.world_size
            offset = 0
            for layer, ref in referenced:
                layer.set_hook_reference(flat[offset : offset + ref.numel()].view_as(ref))
                offset += ref.numel()
        return loss_scale_ratio(list(layers))

    def reduce(self, work: Sequence[LayerWork], ok: Tensor, context: StepContext) -> Reduced:
        work = [self._with_halves(item) for item in work] if self.splits else list(work)
        self._halves = {}  # consumed: a step without a hooked backward must not reuse them
        return Reduced(self._mean_factors(work), ok)

    def _with_halves(self, item: LayerWork) -> LayerWork:
        """The record with the hook's halves ``g1``, ``g2`` and ``grad = (g1 + g2) / 2``."""
        # the bucket held the back-propagated loss's gradient; p.grad may since have been
        # unscaled (GradScaler) or clipped: the halves follow p.grad's units, as G does
        g1, g2 = (self._folded(item.layer, k, item.grad) for k in (0, 1))
        if item.loss_scale is not None:
            g1, g2 = item.loss_scale * g1, item.loss_scale * g2
        half_batch = item.samples * self.world_size / 2  # the halves: even and odd ranks' batches
        return replace(item, g1=g1, g2=g2, grad=0.5 * (g1 + g2), half_batch=half_batch)

    def _mean_factors(self, work: list[LayerWork]) -> list[LayerWork]:
        """The records with their factor statistics averaged over the processes (one all-reduce)."""
        factored = [
            (item, a, g) for item in work if (a := item.a_factor) is not None and (g := item.g_factor) is not None
        ]
        if factored:
            sizes = [self._codec.size(a, g) for _, a, g in factored]
            first = factored[0][1]
            flat = torch.zeros(sum(sizes), dtype=first.dtype, device=first.device)
            offsets = [0, *itertools.accumulate(sizes)][:-1]
            for (_, a, g), off, size in zip(factored, offsets, sizes):
                self._codec.pack(a, g, flat[off : off + size])
            self._all_reduce(flat)
            mean = {}
            for (item, a, g), off, size in zip(factored, offsets, sizes):
                a, g = self._codec.unpack(flat[off : off + size], a, g)
                mean[id(item)] = replace(item, a_factor=a / self.world_size, g_factor=g / self.world_size)
            work = [mean.get(id(item), item) for item in work]
        return work

    def _all_reduce(self, flat: Tensor) -> None:
        dist.all_reduce(flat, group=self.group)
        self.last_step_bytes["all_reduce"] += flat.numel() * flat.element_size()

    def _folded(self, layer: KroneckerLayer, half: int, like: Tensor) -> Tensor:
        """``[W | b]`` of one half, in the layout and dtype of the layer's folded gradient."""
        weight = self._halves.get(id(layer.weight))
        if weight is None:
            raise RuntimeError(
                f"{layer.name}: no sub-batch gradients from dual_gradient_hook for this step; register it with "
                "ddp_model.register_comm_hook(optimizer, dual_gradient_hook) and step after a backward through "
                "the DDP model (outside no_sync())"
            )
        w = layer.as_matrix(weight[half]).to(like.dtype)
        if layer.bias is None:
            return w
        bias = self._halves.get(id(layer.bias))
        b = torch.zeros(w.shape[0], dtype=like.dtype, device=like.device) if bias is None else bias[half].to(like.dtype)
        return torch.cat([w, b[:, None]], dim=1)


def bytes_per_step(optimizer: Any, curvature_step: bool = True) -> dict[str, int]:
    """Payload bytes of one step under :func:`dual_gradient_hook`, and plain DDP's for comparison.

    ``hook_all_reduce``: the buckets' all-reduces (two slots for FOP, one for K-FAC);
    ``all_reduce``: the factor triangles (curvature steps) and the loss-scale references;
    ``ddp_all_reduce``: what DDP's default hook sends (every trainable parameter's gradient once).
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    ddp = sum(p.numel() * p.element_size() for p in params)
    slots = 2 if optimizer.splits_batch else 1
    extra = 0
    for layer in optimizer.layers:
        size = torch.empty((), dtype=compute_dtype(layer.weight.dtype)).element_size()
        if curvature_step:
            extra += (
                factor_entries(layer.in_features, layer.diagonal_input) + factor_entries(layer.out_features)
            ) * size
        if layer.bias is not None and layer.bias.requires_grad:
            extra += layer.out_features * size
        elif layer.is_reference:
            extra += layer.out_features * layer.in_features * size
    return {"hook_all_reduce": slots * ddp, "all_reduce": extra, "ddp_all_reduce": ddp}


def dual_gradient_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook keeping the even and odd processes' gradients apart for FOP / K-FAC.

    ``state``: the :class:`fop.FOP` or :class:`fop.KFAC` optimizer built on ``ddp_model.module``
    (``ddp_model.register_comm_hook(optimizer, dual_gradient_hook)``). Gradients come out as with
    plain DDP; the two sub-batch gradients are kept for the optimizer's next ``step()``.
    """
    if not callable(getattr(state, "use_communicator", None)):  # FOP / KFAC (fop.optimizer is not imported here)
        raise TypeError(
            f"dual_gradient_hook's state must be the FOP / KFAC optimizer, got {type(state).__name__}: "
            "ddp_model.register_comm_hook(optimizer, dual_gradient_hook)"
        )
    communicator = state.communicator
    if not isinstance(communicator, DDPCommunicator):
        communicator = DDPCommunicator(state)
        state.use_communicator(communicator)
    return communicator.reduce_bucket(bucket)


# DDP checks the hook's annotations as objects; postponed (string) annotations would be refused
dual_gradient_hook.__annotations__.update(bucket=dist.GradBucket, state=Any, **{"return": torch.futures.Future[Tensor]})
