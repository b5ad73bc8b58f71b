"""How one optimizer step is shared between processes: FOP on ``torch.distributed``.

The engine (:class:`fop.optimizer.KroneckerOptimizer`) calls a :class:`Communicator` at fixed
points of every step, handing it an immutable :class:`StepContext` (step number, curvature step or
not, device, whether the batch is split, the parameters with a gradient); data flows one way, the
communicator keeps no reference to the optimizer:

1. ``reduce(work, ok, context)``: combine the processes' per-layer gradients, sub-batch gradients
   and factor statistics (each :class:`fop.curvature.LayerWork`) and the fallback parameters'
   gradients, and agree on the finite-gradient flag; returns a :class:`Reduced` (new records, the
   given ones are left as they were);
2. ``owns(layer)``: only the owner of a layer updates its curvature and computes its direction;
3. ``share(work)``: hand every process the directions computed by their owners; returns the
   records with every layer's direction;

and, outside the step, ``setup`` (construction; ``halves_from_processes`` then tells the engine
whether the two sub-batches are process groups), ``has_factors`` (whether a layer's curvature has
been captured yet, which drives the capture schedule), ``gather_state`` (``state_dict()``) and
``loaded`` (after ``load_state_dict()``).

:class:`LocalCommunicator` is the single-process case, where all of them are trivial.

:class:`DistributedCommunicator` is the paper's Algorithm 1 on ``torch.distributed`` (NCCL on GPUs,
gloo on CPUs; the processes are started by ``torchrun``). It is chosen automatically when the
optimizer is built inside an initialised process group of two or more processes:

* **Dual-gradient reduction.** The processes form two groups by rank parity. Every process feeds
  its own local batch; ``g1`` is the mean of the even ranks' local gradients, ``g2`` the mean of
  the odd ranks' (with an odd number ``N`` of processes the groups have ``⌈N/2⌉`` and ``⌊N/2⌋``
  members). The hooks capture no halves in this mode. A process writes its flattened local
  gradient into slot ``rank % 2`` of a zeroed two-slot buffer and the buffer is SUM-reduced: one
  flat buffer per destination, so the two sub-batch gradients need no collective of their own.
  The averaged gradient is ``(g1 + g2) / 2`` (K-FAC: the plain mean over the processes, one slot).
* **Layer specialists** (default). Each Kronecker layer has one owner process, assigned greedily
  (longest processing time first) to balance :func:`layer_cost` (the cubed factor sizes of the
  inverses or eigendecompositions plus the direction's matmuls). Per step, every process SUM-reduces to each
  owner one flat bucket with the owner's layers' slots and, on curvature steps, the upper triangles
  of the local factor statistics; the reductions are launched together as non-blocking
  collectives and an owner waits only for its own bucket. The owner alone keeps the layer's running
  factors and eigendecompositions, computes its direction, and broadcasts it (one flat bucket per
  owner, with the layer's ``β*``, ``η*``, ``s`` and ``⟨d, g⟩``, the KL trust region's term).
  Every process then applies the same momentum / weight-decay update, so parameters stay
  identical. Engine code that runs after ``share`` may use only shared quantities (``direction``,
  ``dg``, ``diagnostics``): ``grad``, ``g1``, ``g2``, ``a``, ``g`` are the reduced values on the
  owner only.
* **Replicated mode** (``replicated=True``): one all-reduce of everything (slots, factor
  triangles, fallback gradients); every process computes every layer and nothing is broadcast.
  Fewer collectives, more memory and compute per process: for small models.
* **Fallback parameters** (BatchNorm, LayerNorm, ...) are averaged in one all-reduce together with
  the finite-gradient flag, the BatchNorm running statistics (averaged, so every process holds the
  same buffers), and a presence count per layer that detects processes whose layers did not all
  receive gradients.

The checks that the processes agree (configuration, call sequence, presence of gradients) and
their messages are in :mod:`fop.agreement`; the flat buffers' offsets in :mod:`fop.assignment`,
the factors' packing in :mod:`fop.codec`, the collectives in :mod:`fop.transport`.

See ``docs/distributed.md`` for the recipe, the byte counts and the failure behaviour.
"""

from __future__ import annotations

import datetime
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .agreement import (
    DistributedConfigError,
    call_sequence,
    check_agreement,
    check_layout,
    ddp_wrapper_message,
    flatten,
    presence_message,
    raise_uncaptured,
    refuse_diagonal,
    same_call_message,
    sequence_message,
    signature,
)
from .assignment import SHARED_SCALARS, CommonLayout, LayerShape, WorkAssignment, assign_owners, layer_cost
from .codec import FactorCodec
from .curvature import KroneckerLayer, LayerWork, loss_scale_ratio
from .functional import compute_dtype, inner
from .intervals import Interval, mean_interval
from .state import LayerCurvature, merge_curvature, owned_curvature
from .transport import Transport

__all__ = [
    "Communicator",
    "DistributedCommunicator",
    "DistributedConfigError",
    "LocalCommunicator",
    "Reduced",
    "StepContext",
    "WorkAssignment",
    "assign_owners",
    "layer_cost",
    "make_communicator",
    "plan",
    "state_bytes",
]

_NOISE_KEYS = ("noise_trace", "noise_grad_sq")
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


# ================================================================================ interface
class Engine(Protocol):
    """What a communicator reads of the optimizer, at construction and checkpoints only (public API)."""

    layers: list[KroneckerLayer]
    param_groups: list[dict[str, Any]]
    state: Any
    projection: bool
    splits_batch: bool
    curvature_update_interval: Interval
    inverse_update_interval: Interval


@dataclass(frozen=True)
class StepContext:
    """What the optimizer tells its communicator about the step in progress."""

    step: int  # step() calls before this one
    zero_grads: int  # zero_grad() calls so far (processes compare them with the step count)
    curvature: bool  # the step captured factor statistics
    device: torch.device
    splits_batch: bool  # FOP: the step needs the two sub-batch gradients
    params: tuple[Tensor, ...] = ()  # every parameter with a gradient this step


@dataclass(frozen=True)
class Reduced:
    """What ``reduce`` hands the engine: the step's layer records over the processes, and the agreed flag.

    ``work`` holds one new :class:`fop.curvature.LayerWork` per given record, in the same order: on
    a layer's owner ``grad``, ``g1``, ``g2``, ``a_factor``, ``g_factor`` are the reduced values; on
    the other processes the record keeps its local ``grad`` and has no halves or factors (its
    owner computes the direction). ``ok``: every process's gradients are finite (0-dim bool).
    """

    work: list[LayerWork]
    ok: Tensor


class Communicator:
    """Interface between the optimizer engine and the processes that share a step."""

    world_size: int = 1
    rank: int = 0
    # the two sub-batches are process groups (not halves of each forward batch): the hooks record no halves
    halves_from_processes: bool = False
    # p.grad is what this process's hooks saw (DDP's hook: the mean over processes, so no check is possible)
    local_gradients: bool = True

    def setup(self, optimizer: Engine, model: nn.Module) -> None:
        """Called once at the end of the optimizer's constructor."""
        return None

    def loss_scale_ratio(self, layers: Sequence[KroneckerLayer]) -> Tensor | None:
        """The loss-scale ratio of :func:`fop.curvature.loss_scale_ratio` (DDP's hook averages first)."""
        return loss_scale_ratio(list(layers))

    def reduce(self, work: Sequence[LayerWork], ok: Tensor, context: StepContext) -> Reduced:
        """Combine this step's gradients and statistics over the processes (see :class:`Reduced`)."""
        raise NotImplementedError

    def owns(self, layer: KroneckerLayer) -> bool:
        raise NotImplementedError

    def share(self, work: Sequence[LayerWork]) -> list[LayerWork]:
        """The records with every layer's ``direction`` (and ``dg``, ``diagnostics``) from its owner.

        ``work``: :attr:`Reduced.work` with the directions of the layers owned here filled in.
        """
        raise NotImplementedError

    def has_factors(self, state: dict, layer: KroneckerLayer) -> bool:
        """Whether the layer's running factors exist (on whichever process owns them)."""
        return LayerCurvature.of(state, layer.weight).has_factors

    def gather_state(self, optimizer: Engine, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Complete ``optimizer.state_dict()``'s output (the curvature of other processes' layers)."""
        return state_dict

    def loaded(self, optimizer: Engine, steps: int) -> None:
        """Called by ``load_state_dict`` once the (full) state is in ``optimizer.state``."""
        return None


class LocalCommunicator(Communicator):
    """One process: nothing to reduce or share, every layer is owned locally.

    ``auto``: chosen because no process group existed at construction; the first step warns if
    one exists by then (an optimizer built before ``init_process_group``, e.g. before a trainer
    wrapped the model in DDP, would silently train every process on its own halves).
    """

    _auto = False

    def __init__(self, auto: bool = False) -> None:
        self._auto = auto

    def reduce(self, work: Sequence[LayerWork], ok: Tensor, context: StepContext) -> Reduced:
        if self._auto:
            self._auto = False
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                warnings.warn(
                    f"fop: torch.distributed now runs {dist.get_world_size()} processes, but the optimizer was "
                    "built before init_process_group and steps on this process's data alone. Build it after "
                    "init_process_group (fop reduces the gradients itself), or, when the model is trained "
                    "through DistributedDataParallel, register fop.dual_gradient_hook: "
                    "ddp_model.register_comm_hook(optimizer, dual_gradient_hook)",
                    stacklevel=4,
                )
        return Reduced(list(work), ok)

    def owns(self, layer: KroneckerLayer) -> bool:
        return True

    def share(self, work: Sequence[LayerWork]) -> list[LayerWork]:
        return list(work)


def make_communicator(
    model: nn.Module, distributed: bool | Communicator | None = None, replicated: bool = False, name: str = "FOP"
) -> Communicator:
    """The communicator an optimizer uses (called by its constructor).

    ``distributed=None`` (the default) means *auto*: a :class:`DistributedCommunicator` when
    ``torch.distributed`` is initialised with two or more processes, else a
    :class:`LocalCommunicator`. ``True`` requires an initialised process group (one process then
    falls back to the local communicator and its in-batch halves); ``False`` always trains locally
    (every process on its own); a :class:`Communicator` instance is used as given (e.g.
    ``DistributedCommunicator(group=..., timeout=...)``). ``replicated=True`` selects the
    replicated mode of the distributed communicator (no effect on one process).
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        raise TypeError(ddp_wrapper_message(name))
    if isinstance(distributed, Communicator):
        if replicated and isinstance(distributed, DistributedCommunicator):
            distributed.replicated = True
        return distributed
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be None (auto), a bool or a Communicator, got {distributed!r}")
    initialised = dist.is_available() and dist.is_initialized()
    if distributed is True and not initialised:
        raise RuntimeError(
            f"{name}(distributed=True) needs torch.distributed.init_process_group(...) to be called first "
            "(start the script with torchrun)"
        )
    if distributed is False or not initialised or dist.get_world_size() < 2:
        return LocalCommunicator(auto=distributed is None and not initialised)
    return DistributedCommunicator(replicated=replicated)


# ================================================================================ what travels
@dataclass
class _Trainables:
    """What a distributed step moves: the trained Kronecker layers, fallback parameters, synced buffers."""

    layers: list[KroneckerLayer]
    fallback: list[Tensor]
    buffers: list[Tensor]
    buffer_names: list[str]
    device: torch.device

    @property
    def params(self) -> list[Tensor]:
        return [p for layer in self.layers for p in layer.params()] + list(self.fallback)

    @property
    def dtype(self) -> torch.dtype:
        """The collectives' dtype: float64 if any parameter or buffer is, else float32."""
        wide = any(t.dtype == torch.float64 for t in self.params + self.buffers)
        return torch.float64 if wide else torch.float32


def _trainables(optimizer: Engine, model: nn.Module, sync_buffers: bool) -> _Trainables:
    # Parameters frozen now get no slot in the collectives (a frozen backbone would otherwise be
    # sent as zeros at every step); the communicator refuses them if they train later.
    layers = [layer for layer in optimizer.layers if any(p.requires_grad for p in layer.params())]
    kron_ids = {id(p) for layer in optimizer.layers for p in layer.params()}
    fallback = [
        p
        for group in optimizer.param_groups
        if group["rule"] != "kronecker"
        for p in group["params"]
        if id(p) not in kron_ids and p.requires_grad
    ]
    buffers, names = [], []
    if sync_buffers:
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._NormBase):
                for key in ("running_mean", "running_var"):
                    buf = getattr(module, key, None)
                    if isinstance(buf, Tensor) and buf.is_floating_point():
                        buffers.append(buf)
                        names.append(f"{name}.{key}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return _Trainables(layers, fallback, buffers, names, device)


def _work_assignment(
    optimizer: Engine,
    found: _Trainables,
    world_size: int,
    replicated: bool,
    cost: Callable[[KroneckerLayer], float] | None,
) -> WorkAssignment:
    projection = bool(optimizer.projection)
    interval = mean_interval(optimizer.inverse_update_interval)
    mode = next((g["damping_mode"] for g in optimizer.param_groups if "damping_mode" in g), "exact")
    costs = [float(cost(layer)) if cost else layer_cost(layer, projection, interval, mode) for layer in found.layers]
    shapes = [
        LayerShape(
            layer.name,
            layer.in_features,
            layer.out_features,
            _itemsize(compute_dtype(layer.weight.dtype)),
            layer.diagonal_input,
        )
        for layer in found.layers
    ]
    return WorkAssignment(
        layers=tuple(shapes),
        world_size=world_size,
        costs=tuple(costs),
        replicated=replicated,
        splits=bool(optimizer.splits_batch),
        fallback_sizes=tuple(p.numel() for p in found.fallback),
        buffer_sizes=tuple(b.numel() for b in found.buffers),
        itemsize=_itemsize(found.dtype),
        gradient_bytes=sum(p.numel() * p.element_size() for p in found.params),
    )


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def plan(
    optimizer: Engine,
    model: nn.Module,
    world_size: int,
    replicated: bool = False,
    cost: Callable[[KroneckerLayer], float] | None = None,
) -> WorkAssignment:
    """What a run on ``world_size`` processes would do, computed here without any process group.

    ``optimizer`` is an ordinary (local) FOP or KFAC of ``model``. The result
    (:class:`fop.assignment.WorkAssignment`) has the owner ``assignment`` and ``loads``,
    ``describe()``, ``bytes_per_step()`` and ``curvature_bytes()`` (per-process curvature memory).
    """
    return _work_assignment(optimizer, _trainables(optimizer, model, True), world_size, replicated, cost)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors of ``optimizer.state`` on this process (each storage once)."""
    seen: set[int] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor) and value.untyped_storage().data_ptr() not in seen:
                seen.add(value.untyped_storage().data_ptr())
                total += value.untyped_storage().nbytes()
    return total


# ================================================================================ helpers
# ================================================================================ distributed
class DistributedCommunicator(Communicator):
    """FOP / K-FAC across ``torch.distributed`` processes (the paper's Algorithm 1).

    Args:
        replicated: every process computes every layer's curvature (one all-reduce per step,
            nothing broadcast, no sharding) instead of layer specialists.
        group: the process group to run on (default: a new group over all processes, created with
            ``timeout``; all processes must build the optimizer). A given group is used as is,
            with its own timeout; only its members build the optimizer.
        timeout: timeout of the collectives of the group this communicator creates. A process
            that stops taking part (a crash, a skipped ``step()``) makes the others raise after
            this long instead of hanging.
        sync_buffers: average the BatchNorm running statistics across processes at every step
            (in the same all-reduce as the fallback gradients), so that every process holds the
            same buffers. Other buffers are left alone.
        broadcast_parameters: copy rank 0's parameters and buffers to every process at
            construction (as DDP does), so that training starts from one model.
        cost: ``layer -> float``, the load the owner assignment balances (default
            :func:`fop.assignment.layer_cost`).

    After construction ``work`` is the :class:`fop.assignment.WorkAssignment` (owners, loads,
    buffer offsets); ``assignment`` (layer name -> owner rank), ``loads``, :meth:`describe` and
    :meth:`bytes_per_step` read it, and ``last_step_bytes`` is what the last step sent. The
    collectives go through ``transport`` (:class:`fop.transport.Transport`).
    """

    def __init__(
        self,
        replicated: bool = False,
        group: Any = None,
        timeout: datetime.timedelta | float | None = DEFAULT_TIMEOUT,
        sync_buffers: bool = True,
        broadcast_parameters: bool = True,
        cost: Callable[[KroneckerLayer], float] | None = None,
    ) -> None:
        if isinstance(timeout, (int, float)):
            timeout = datetime.timedelta(seconds=float(timeout))
        self.replicated = replicated
        self.group = group
        self.timeout = timeout
        self.sync_buffers = sync_buffers
        self.broadcast_parameters = broadcast_parameters
        self.cost = cost
        self._codec = FactorCodec()
        # the group and what the collectives carry (setup)
        self.transport: Transport | None = None
        self.world_size, self.rank = 1, 0  # the group's
        self.backend = ""
        self.work: WorkAssignment | None = None
        self.layers: list[KroneckerLayer] = []
        self.device = torch.device("cpu")
        self.dtype = torch.float32  # of the collectives
        self.splits = False  # FOP: two gradient slots, the even and the odd ranks
        self._fallback: list[Tensor] = []
        self._buffers: list[Tensor] = []
        self._buffer_names: list[str] = []
        self._index: dict[int, int] = {}  # id(layer) -> its index in the assignment
        self._laid_out: set[int] = set()  # ids of the parameters with a place in the collectives
        self._names: dict[int, str] = {}  # id(parameter) -> its name, for messages
        self._optimizer_name = ""
        # the assignment's offsets in the step's buffers, at hand for packing (_adopt)
        self._numel: list[int] = []
        self._factor_len: list[int] = []
        self._n_even = self._n_odd = 0
        self._grad_off: dict[int, int] = {}
        self._bucket_grad_len: list[int] = []
        self._fac_off: dict[int, int] = {}
        self._share_off: dict[int, int] = {}
        self._share_len: list[int] = []
        self._members: list[list[int]] = []
        self._common = CommonLayout((), (), 0, 0, 0, 0)
        # the run
        self._factored: set[int] = set()  # layers whose owner holds running factors
        self._context = StepContext(0, 0, False, self.device, False)  # of the step in progress
        self._pending: list[Any] = []  # reductions to other owners still in flight
        self._last_pattern: Any = None  # which layers had gradients and factors at the last step
        self._presence_cache: dict[Any, Tensor] = {}
        self._check_now = True  # raise on disagreement at this step (a host synchronisation)
        self._force_check = True  # ... and at the next one
        self._checked_identical = True  # the warning on identical halves was considered

    # ----------------------------------------------------------------------------- the assignment
    @property
    def assignment(self) -> dict[str, int]:
        """Layer name -> owner rank."""
        return self.work.assignment if self.work is not None else {}

    @property
    def loads(self) -> list[float]:
        return list(self.work.loads) if self.work is not None else []

    @property
    def last_step_bytes(self) -> dict[str, int]:
        """Payload bytes the last step sent, per kind of collective."""
        return dict(self.transport.sent) if self.transport is not None else {}

    def describe(self) -> str:
        """A table of the layers, their cost, owner and factor sizes."""
        return self._work.describe(self.backend)

    def curvature_bytes(self) -> list[int]:
        """Bytes of curvature state each rank holds (:meth:`fop.assignment.WorkAssignment.curvature_bytes`)."""
        return self._work.curvature_bytes()

    def bytes_per_step(self, curvature_step: bool = True) -> dict[str, Any]:
        """Payload of each collective of one step (:meth:`fop.assignment.WorkAssignment.bytes_per_step`)."""
        return self._work.bytes_per_step(curvature_step)

    @property
    def _work(self) -> WorkAssignment:
        if self.work is None:
            raise RuntimeError("the communicator has no work assignment before the optimizer's construction")
        return self.work

    @property
    def _link(self) -> Transport:
        assert self.transport is not None
        return self.transport

    # ----------------------------------------------------------------------------- setup
    halves_from_processes = True  # the even and the odd ranks

    def setup(self, optimizer: Engine, model: nn.Module) -> None:
        self.transport = Transport(self.group, self.timeout)
        self.group = self.transport.group
        self.world_size, self.rank = self.transport.world_size, self.transport.rank
        if self.world_size < 2:
            raise ValueError(
                "DistributedCommunicator needs a group of two or more processes; with one process leave "
                "distributed=None (the optimizer then splits each batch in two halves itself)"
            )
        self.backend = self.transport.backend
        found = _trainables(optimizer, model, self.sync_buffers)
        if self.backend == "nccl" and found.device.type != "cuda":
            raise RuntimeError("the NCCL backend needs the model on a CUDA device (use gloo for CPU training)")
        self._adopt(found, _work_assignment(optimizer, found, self.world_size, self.replicated, self.cost))
        self._names = {id(p): name for name, p in model.named_parameters()}
        self._optimizer_name = type(optimizer).__name__
        self._check_agreement(optimizer, "construction", 0)
        if self.broadcast_parameters:
            self._link.broadcast_tensors(list(model.parameters()) + list(model.buffers()))
        self._context = StepContext(0, 0, False, found.device, self.splits)
        self._checked_identical = not self.splits

    def _adopt(self, found: _Trainables, work: WorkAssignment) -> None:
        """Keep the trained tensors and the assignment's offsets at hand for packing."""
        self.work = work
        self.layers, self._fallback, self._buffers = found.layers, found.fallback, found.buffers
        self._buffer_names, self.device, self.dtype = found.buffer_names, found.device, found.dtype
        self._index = {id(layer): i for i, layer in enumerate(self.layers)}
        self._laid_out = {id(p) for p in found.params}
        self.splits = work.splits
        self._numel = [layer.numel for layer in work.layers]
        self._factor_len = [layer.triangles for layer in work.layers]
        self._n_even, self._n_odd = work.group_sizes
        self._grad_off, self._bucket_grad_len = work.grad_offsets
        self._fac_off = work.factor_offsets[0]
        self._share_off, self._share_len = work.share_offsets
        self._members = work.buckets
        self._common = work.common

    def close(self) -> None:
        """Destroy the process group this communicator created (optional; for long-lived processes)."""
        if self.transport is not None:
            self.transport.close()
        self.group = None

    # ----------------------------------------------------------------------------- agreement
    def _check_agreement(self, optimizer: Engine, when: str, steps: int) -> None:
        """All processes compare their configuration; every one raises on a mismatch (no hang)."""
        mine = signature(
            optimizer,
            mode="replicated" if self.replicated else "specialists",
            world_size=self.world_size,
            layers=self.layers,
            synced_buffers=list(zip(self._buffer_names, self._buffers)),
            device_type=self.device.type,
            steps=steps,
            factored=self._factored,
        )
        mine = flatten(mine)
        check_agreement(mine, self._link.all_gather_object(mine), type(optimizer).__name__, when)

    # ----------------------------------------------------------------------------- the step
    def owns(self, layer: KroneckerLayer) -> bool:
        return self._work.owns(self.rank, self._index[id(layer)])

    def has_factors(self, state: dict, layer: KroneckerLayer) -> bool:
        return self._index.get(id(layer), -1) in self._factored  # tracked here: owners hold the factors

    def reduce(self, work: Sequence[LayerWork], ok: Tensor, context: StepContext) -> Reduced:
        self._context = context
        # at the first step, not at construction: under DDP, dual_gradient_hook replaces this
        # communicator (which supports them) before any step; the layers agree across processes
        refuse_diagonal(self.layers)
        check_layout(context.params, self._laid_out, self._names, self._optimizer_name)
        items = {self._index[id(item.layer)]: item for item in work}
        # raised after the first collective, whose sequence and presence checks name the cause on
        # every process when the processes disagree (e.g. a second step() without a new backward)
        uncaptured = [
            layer
            for i, layer in enumerate(self.layers)
            if i not in items and any(p.grad is not None for p in layer.params())
        ]
        curvature = context.curvature
        self._link.new_step()
        common = self._pack_common(items, ok, curvature)
        if self.replicated:
            ok, reduced = self._reduce_replicated(items, common, curvature, uncaptured)
        else:
            ok, reduced = self._reduce_to_owners(items, common, curvature, uncaptured)
        fresh = [
            i
            for i, it in items.items()
            if curvature and it.a_factor is not None and it.g_factor is not None and i not in self._factored
        ]
        # a skipped step (non-finite gradients) creates no factors on the owner, so a layer counts
        # as factored only after a good step (one host synchronisation, until every layer is)
        if fresh and bool(ok):
            self._factored.update(fresh)
        self._warn_if_identical(reduced)
        # the owner's reduced record; elsewhere the local one without what only the owner computes with
        records = [
            reduced[i] if i in reduced else replace(item, a_factor=None, g_factor=None, g1=None, g2=None)
            for i, item in items.items()
        ]
        return Reduced(records, ok)

    def _reduce_replicated(
        self, items: dict[int, LayerWork], common: Tensor, curvature: bool, uncaptured: list[KroneckerLayer]
    ) -> tuple[Tensor, dict[int, LayerWork]]:
        """One all-reduce of everything: [slots | factor triangles | common]; the flag and every reduced record."""
        length = self._work.bucket_len(0, curvature)
        flat = torch.zeros(length + self._common.length, dtype=self.dtype, device=self.device)
        self._pack_bucket(flat, 0, items, curvature)
        flat[length:].copy_(common)
        self._link.all_reduce_now(flat, "the gradient all-reduce")
        ok = self._unpack_common(flat[length:], items)
        raise_uncaptured(uncaptured)
        return ok, self._unpack_bucket(flat, 0, items, curvature)

    def _reduce_to_owners(
        self, items: dict[int, LayerWork], common: Tensor, curvature: bool, uncaptured: list[KroneckerLayer]
    ) -> tuple[Tensor, dict[int, LayerWork]]:
        """The common all-reduce and one reduce per owner, launched together; wait for the own bucket only.

        Returns the flag and the reduced records of the layers owned here.
        """
        common_handle = self._link.all_reduce(common)
        mine = None
        self._pending = []
        for r in range(self.world_size):
            length = self._work.bucket_len(r, curvature)
            if length == 0:
                continue
            bucket = torch.zeros(length, dtype=self.dtype, device=self.device)
            self._pack_bucket(bucket, r, items, curvature)
            handle = self._link.reduce(bucket, r)
            self._pending.append(handle)
            if r == self.rank:
                mine = (handle, bucket)
        self._link.wait(common_handle, "the gradient all-reduce")
        ok = self._unpack_common(common, items)
        raise_uncaptured(uncaptured)
        if mine is None:
            return ok, {}
        self._link.wait(mine[0], "the reduction to this layer owner")
        return ok, self._unpack_bucket(mine[1], self.rank, items, curvature)

    def share(self, work: Sequence[LayerWork]) -> list[LayerWork]:
        for handle in self._pending:
            self._link.wait(handle, "the reduction to the layer owners")
        self._pending = []
        if self.replicated:
            return list(work)
        items = {self._index[id(item.layer)]: item for item in work}
        shared: dict[int, LayerWork] = {}
        received = []
        for r in range(self.world_size):
            if self._share_len[r] == 0:
                continue
            bucket = torch.zeros(self._share_len[r], dtype=self.dtype, device=self.device)
            if r == self.rank:
                shared.update(self._pack_share(bucket, items))
            received.append((r, self._link.broadcast(bucket, r), bucket))
        for r, handle, bucket in received:
            self._link.wait(handle, "the broadcast of the owners' directions")
            if r != self.rank:
                shared.update(self._unpack_share(bucket, r, items))
        return [shared[i] for i in items]

    def _pack_share(self, bucket: Tensor, items: dict[int, LayerWork]) -> dict[int, LayerWork]:
        """This owner's directions and their scalars: ``[d | β*, η*, s, ⟨d, g⟩, tr Σ, |G|²]`` per layer.

        Returns the owned records with ``dg`` (and the diagnostics) as every other process reads them.
        """
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        shared = {}
        for i in self._members[self.rank]:
            item = items.get(i)
            if item is None:
                continue
            assert item.direction is not None
            off = self._share_off[i]
            bucket[off : off + self._numel[i]].copy_(item.direction.reshape(-1))
            diagnostics = dict(item.diagnostics)
            values = [
                diagnostics.get("beta", zero),
                diagnostics.get("eta", zero + 1),
                diagnostics.get("projection", zero),
            ]
            values.append(inner(item.direction, item.grad))
            if self.splits and not item.first_order:  # a step without halves (one sample): NaN noise terms
                for key in _NOISE_KEYS:
                    diagnostics.setdefault(key, zero + float("nan"))
            values += [diagnostics.get(key, zero) for key in _NOISE_KEYS]
            scalars = bucket[off + self._numel[i] : off + self._numel[i] + SHARED_SCALARS]
            scalars.copy_(torch.stack([v.to(self.dtype).reshape(()) for v in values]))
            # ⟨d, g⟩ as every other process will read it
            shared[i] = replace(item, dg=scalars[3].to(item.grad.dtype), diagnostics=diagnostics)
        return shared

    def _unpack_share(self, bucket: Tensor, r: int, items: dict[int, LayerWork]) -> dict[int, LayerWork]:
        """Owner ``r``'s layers' records with the direction, ``dg`` and diagnostics it broadcast."""
        shared = {}
        for i in self._members[r]:
            item = items.get(i)
            if item is None:
                continue
            off = self._share_off[i]
            layer = item.layer
            dtype = compute_dtype(layer.weight.dtype)
            direction = bucket[off : off + self._numel[i]].view(layer.out_features, layer.in_features).to(dtype)
            scalars = bucket[off + self._numel[i] : off + self._numel[i] + SHARED_SCALARS].to(dtype)
            diagnostics = {}
            if not item.first_order:  # no curvature: no diagnostics
                diagnostics = {"beta": scalars[0], "eta": scalars[1], "projection": scalars[2]}
                if self.splits:
                    diagnostics.update(zip(_NOISE_KEYS, scalars[4:6]))
            shared[i] = replace(item, direction=direction, dg=scalars[3], diagnostics=diagnostics)
        return shared

    # ----------------------------------------------------------------------------- packing
    def _pattern(self, items: dict[int, LayerWork], curvature: bool) -> tuple:
        grads = tuple(sorted(items))
        factors = tuple(
            sorted(i for i, it in items.items() if curvature and it.a_factor is not None and it.g_factor is not None)
        )
        fallback = tuple(j for j, p in enumerate(self._fallback) if p.grad is not None)
        return grads, factors, fallback

    def _presence(self, pattern: tuple) -> Tensor:
        if pattern not in self._presence_cache:
            grads, factors, fallback = pattern
            n = len(self.layers)
            values = torch.zeros(self._common.presence_len, dtype=self.dtype)
            values[list(grads)] = 1
            values[[n + i for i in factors]] = 1
            values[[2 * n + j for j in fallback]] = 1
            if len(self._presence_cache) > 64:
                self._presence_cache.clear()
            self._presence_cache[pattern] = values.to(self.device)
        return self._presence_cache[pattern]

    def _pack_common(self, items: dict[int, LayerWork], ok: Tensor, curvature: bool) -> Tensor:
        common = torch.zeros(self._common.length, dtype=self.dtype, device=self.device)
        for p, off in zip(self._fallback, self._common.fallback):
            if p.grad is not None:
                common[off : off + p.numel()].copy_(p.grad.reshape(-1))
        for b, off in zip(self._buffers, self._common.buffers):
            common[off : off + b.numel()].copy_(b.reshape(-1))
        pattern = self._pattern(items, curvature)
        self._check_now = self._force_check or pattern != self._last_pattern or self.device.type == "cpu"
        self._last_pattern = pattern
        common[self._common.presence : self._common.presence + self._common.presence_len].copy_(self._presence(pattern))
        common[self._common.sequence : self._common.sequence + 2] = torch.tensor(self._sequence(), dtype=self.dtype)
        common[self._common.flag :].copy_((~ok).reshape(1))
        return common

    def _sequence(self) -> tuple[float, float]:
        """This process's :func:`fop.agreement.call_sequence` in the step in progress."""
        return call_sequence(self._context.step, self._context.zero_grads)

    def _unpack_common(self, common: Tensor, items: dict[int, LayerWork]) -> Tensor:
        n = self.world_size
        for p, off in zip(self._fallback, self._common.fallback):
            if p.grad is not None:
                p.grad.copy_(common[off : off + p.numel()].view_as(p.grad) / n)
        for b, off in zip(self._buffers, self._common.buffers):
            b.copy_(common[off : off + b.numel()].view_as(b) / n)
        presence = common[self._common.presence : self._common.presence + self._common.presence_len]
        sequence = common[self._common.sequence : self._common.sequence + 2]
        in_step = (sequence == torch.tensor(self._sequence(), dtype=self.dtype, device=self.device) * n).all()
        consistent = ((presence == 0) | (presence == n)).all() & in_step
        steps = self._context.step + 1
        if self._check_now or steps & (steps - 1) == 0:  # and at steps 1, 2, 4, ... on GPUs
            self._force_check = False
            if not bool(in_step):
                summed = sequence.tolist()
                raise DistributedConfigError(sequence_message(self._sequence(), summed, self.world_size, self.rank))
            if not bool(consistent):
                counts = [int(c) for c in presence.round().tolist()]
                names, shapes = [layer.name for layer in self.layers], [tuple(p.shape) for p in self._fallback]
                raise DistributedConfigError(presence_message(counts, names, shapes, self.world_size))
        return (common[self._common.flag] == 0) & consistent

    def _pack_bucket(self, bucket: Tensor, r: int, items: dict[int, LayerWork], curvature: bool) -> None:
        members = self._members[r]
        slot = self.rank % 2 if self.splits else 0
        grad_len = self._bucket_grad_len[r]
        for i in members:
            item = items.get(i)
            if item is None:
                continue
            off = self._grad_off[i] + slot * self._numel[i]
            bucket[off : off + self._numel[i]].copy_(item.grad.reshape(-1))
            if curvature and item.a_factor is not None and item.g_factor is not None:
                foff = grad_len + self._fac_off[i]
                self._codec.pack(item.a_factor, item.g_factor, bucket[foff : foff + self._factor_len[i]])

    def _unpack_bucket(
        self, bucket: Tensor, r: int, items: dict[int, LayerWork], curvature: bool
    ) -> dict[int, LayerWork]:
        """Owner ``r``'s layers' records with the summed values turned into means over the processes.

        ``g1 = S_even / ⌈N/2⌉``, ``g2 = S_odd / ⌊N/2⌋``, ``grad = (g1 + g2) / 2`` (FOP; K-FAC:
        ``grad = S / N``), the factors ``S_A / N``, ``S_G / N``.
        """
        grad_len = self._bucket_grad_len[r]
        n = self.world_size
        reduced = {}
        for i in self._members[r]:
            item = items.get(i)
            if item is None:
                continue
            layer = self.layers[i]
            shape = (layer.out_features, layer.in_features)
            dtype = item.grad.dtype
            off, numel = self._grad_off[i], self._numel[i]
            a_factor = g_factor = None
            if curvature and item.a_factor is not None and item.g_factor is not None:
                foff = grad_len + self._fac_off[i]
                a, g = self._codec.unpack(bucket[foff : foff + self._factor_len[i]], item.a_factor, item.g_factor)
                a_factor, g_factor = a / n, g / n
            if self.splits:
                g1 = (bucket[off : off + numel].view(shape) / self._n_even).to(dtype)
                g2 = (bucket[off + numel : off + 2 * numel].view(shape) / self._n_odd).to(dtype)
                reduced[i] = replace(
                    item,
                    grad=0.5 * (g1 + g2),
                    g1=g1,
                    g2=g2,
                    a_factor=a_factor,
                    g_factor=g_factor,
                    half_batch=item.samples * n / 2,  # the halves: even and odd ranks' local batches
                )
            else:
                grad = (bucket[off : off + numel].view(shape) / n).to(dtype)
                reduced[i] = replace(item, grad=grad, a_factor=a_factor, g_factor=g_factor)
        return reduced

    def _warn_if_identical(self, items: dict[int, LayerWork]) -> None:
        """Once: warn when the two groups' gradients are bitwise equal (DDP-averaged gradients?)."""
        if self._checked_identical:
            return
        self._checked_identical = True
        pairs = [(it.g1, it.g2) for it in items.values() if it.g1 is not None and it.g2 is not None]
        if pairs and all(torch.equal(a, b) for a, b in pairs):
            warnings.warn(
                "FOP: the even and the odd processes' gradients are identical, so FOP reduces to K-FAC. "
                "Is the model trained through a DistributedDataParallel wrapper (which averages the "
                "gradients before FOP sees them), or does every process load the same batch?",
                stacklevel=4,
            )

    # ----------------------------------------------------------------------------- checkpoints
    def gather_state(self, optimizer: Engine, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Rank 0's ``state_dict()`` gets every layer's curvature; a collective (all processes call it).

        Other ranks return their own view (their owned layers' curvature only). The gathered
        tensors are on the CPU; ``load_state_dict`` moves them to the parameters' device.
        """
        if self.replicated:
            return state_dict
        self._same_call("state_dict()")
        weights = [layer.weight for layer in self.layers]
        mine = owned_curvature(optimizer.state, {i: weights[i] for i in self._members[self.rank]})
        everyone = self._link.gather_object(mine)
        if everyone is None:
            return state_dict
        return merge_curvature(state_dict, optimizer.param_groups, everyone, weights)

    def _same_call(self, what: str) -> None:
        """Fail fast, on every process, unless all of them are in this checkpoint collective.

        Sends zeros where ``step()`` sends its call sequence, in a collective of the same size as
        a step's first one: a process still training pairs with it and both see the mismatch,
        instead of meeting in different collectives and waiting for the timeout.
        """
        probe = torch.zeros(self._common.length, dtype=self.dtype, device=self.device)
        self._link.all_reduce_now(probe, f"the {what} collective")
        sequence = probe[self._common.sequence : self._common.sequence + 2]
        if bool((sequence != 0).any()):
            raise DistributedConfigError(same_call_message(what, self.rank, self.world_size))

    def loaded(self, optimizer: Engine, steps: int) -> None:
        """After every process loaded the same (full) checkpoint: shard it and check agreement."""
        self._same_call("load_state_dict()")
        self._factored = {
            i for i, layer in enumerate(self.layers) if LayerCurvature.of(optimizer.state, layer.weight).has_factors
        }
        for i, layer in enumerate(self.layers):
            if not self._work.owns(self.rank, i):
                LayerCurvature.of(optimizer.state, layer.weight).drop()
        self._check_agreement(optimizer, "load_state_dict", steps)
        self._force_check = True
