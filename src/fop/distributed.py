"""How one optimizer step is shared between processes: FOP on ``torch.distributed``.

The engine (:class:`fop.optimizer.KroneckerOptimizer`) calls a :class:`Communicator` at fixed
points of every step:

1. ``reduce(work, ok)``: combine the processes' per-layer gradients, sub-batch gradients and factor
   statistics (each :class:`fop.curvature.LayerWork`), and agree on the finite-gradient flag;
2. ``owns(layer)``: only the owner of a layer updates its curvature and computes its direction;
3. ``share(work)``: hand every process the directions computed by their owners;
4. ``reduce_first_order(params, ok)``: average the fallback parameters' gradients.

and, outside the step, ``setup`` (construction), ``has_factors`` (whether a layer's curvature has
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
  eigendecompositions plus the direction's matmuls). Per step, every process SUM-reduces to each
  owner one flat bucket with the owner's layers' slots and, on curvature steps, the upper triangles
  of the local factor statistics; the reductions are launched together as non-blocking
  collectives and an owner waits only for its own bucket. The owner alone keeps the layer's running
  factors and eigendecompositions, computes its direction, and broadcasts it (one flat bucket per
  owner, with the layer's ``β*``, ``η*``, ``s`` and ``⟨d, g⟩``, the KL trust region's term).
  Every process then applies the same momentum / weight-decay update, so parameters stay
  identical. Engine code that runs after ``share`` may use only shared quantities (``direction``,
  ``dg``, ``layer.last``): ``grad``, ``g1``, ``g2``, ``a``, ``g`` are the reduced values on the
  owner only.
* **Replicated mode** (``replicated=True``): one all-reduce of everything (slots, factor
  triangles, fallback gradients); every process computes every layer and nothing is broadcast.
  Fewer collectives, more memory and compute per process: for small models.
* **Fallback parameters** (BatchNorm, LayerNorm, ...) are averaged in one all-reduce together with
  the finite-gradient flag, the BatchNorm running statistics (averaged, so every process holds the
  same buffers), and a presence count per layer that detects processes whose layers did not all
  receive gradients.

See ``docs/distributed.md`` for the recipe, the byte counts and the failure behaviour.
"""

from __future__ import annotations

import datetime
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .curvature import FACTOR_KEYS, KroneckerLayer, LayerWork, loss_scale_ratio
from .functional import compute_dtype, inner

if TYPE_CHECKING:  # pragma: no cover
    from .optimizer import KroneckerOptimizer

__all__ = [
    "Communicator",
    "DistributedCommunicator",
    "DistributedConfigError",
    "LocalCommunicator",
    "assign_owners",
    "layer_cost",
    "make_communicator",
    "plan",
    "state_bytes",
]

# shared with every layer's direction: β*, η*, s (diagnostics), ⟨d, g⟩ (the KL trust region) and,
# for FOP, the gradient-noise terms tr Σ, |G|² (diagnostics)
_SHARED_SCALARS = 6
_NOISE_KEYS = ("noise_trace", "noise_grad_sq")
_SEQ_MOD = 4096  # call counters travel modulo this (exact float32 sums for up to 4096 processes)
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)

_DDP_MESSAGE = (
    "{name} must own the gradient reduction in distributed training: pass the bare model, not a "
    "DistributedDataParallel wrapper. DDP's single averaged all-reduce erases the two sub-batch "
    "gradients (even ranks, odd ranks) that FOP needs; {name} reduces the gradients itself (and "
    "broadcasts the initial parameters from rank 0, as DDP does). Write: model = Net().to(device); "
    "optimizer = {name}(model, ...) inside an initialised process group, without DDP. "
    "Or keep DDP and let its communication hook keep the halves: optimizer = {name}(ddp_model.module, ...); "
    "ddp_model.register_comm_hook(optimizer, fop.dual_gradient_hook)."
)


class DistributedConfigError(ValueError):
    """The processes of a distributed optimizer disagree on its configuration or its data."""


# ================================================================================ interface
class Communicator:
    """Interface between the optimizer engine and the processes that share a step."""

    world_size: int = 1
    rank: int = 0

    def setup(self, optimizer: KroneckerOptimizer, model: nn.Module) -> None:
        """Called once at the end of the optimizer's constructor."""
        return None

    def loss_scale_ratio(self, layers: Sequence[KroneckerLayer]) -> Tensor | None:
        """The loss-scale ratio of :func:`fop.curvature.loss_scale_ratio` (DDP's hook averages first)."""
        return loss_scale_ratio(list(layers))

    def reduce(self, work: Sequence[LayerWork], ok: Tensor) -> Tensor:
        raise NotImplementedError

    def owns(self, layer: KroneckerLayer) -> bool:
        raise NotImplementedError

    def share(self, work: Sequence[LayerWork]) -> None:
        raise NotImplementedError

    def reduce_first_order(self, params: Sequence[Tensor], ok: Tensor) -> Tensor:
        raise NotImplementedError

    def has_factors(self, state: dict, layer: KroneckerLayer) -> bool:
        """Whether the layer's running factors exist (on whichever process owns them)."""
        return "A" in state.get(layer.weight, {})

    def gather_state(self, optimizer: KroneckerOptimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Complete ``optimizer.state_dict()``'s output (the curvature of other processes' layers)."""
        return state_dict

    def loaded(self, optimizer: KroneckerOptimizer) -> None:
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

    def reduce(self, work: Sequence[LayerWork], ok: Tensor) -> Tensor:
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
        return ok

    def owns(self, layer: KroneckerLayer) -> bool:
        return True

    def share(self, work: Sequence[LayerWork]) -> None:
        return None

    def reduce_first_order(self, params: Sequence[Tensor], ok: Tensor) -> Tensor:
        return ok


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
        raise TypeError(_DDP_MESSAGE.format(name=name))
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


# ================================================================================ layer owners
def layer_cost(layer: KroneckerLayer, projection: bool = True, inverse_interval: int = 1) -> float:
    """Relative per-step cost of a layer's curvature work, the quantity owners are balanced on.

    ``9 (n_in³ + n_out³) / T_inv`` for the two symmetric eigendecompositions (about ``9 n³`` flops
    each, once every ``T_inv`` steps) plus ``c · n_out n_in (n_in + n_out)`` for the rotations into
    and out of the eigenbasis (``c = 6`` for FOP: ``g_avg``, ``g_diff`` in and ``n_comb`` out;
    ``c = 4`` for K-FAC).
    """
    n_in, n_out = layer.in_features, layer.out_features
    rotations = 6.0 if projection else 4.0
    return 9.0 * (n_in**3 + n_out**3) / max(1, inverse_interval) + rotations * n_out * n_in * (n_in + n_out)


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each layer: longest-processing-time-first greedy on ``costs``.

    Layers are taken from the most to the least expensive (ties: lower index first) and each goes
    to the currently least loaded rank (ties: lower rank). The heaviest load is at most
    ``sum/N + max(costs)`` (and at most 4/3 of the optimum).
    """
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


def plan(
    optimizer: KroneckerOptimizer, model: nn.Module, world_size: int, replicated: bool = False,
    cost: Callable[[KroneckerLayer], float] | None = None,
) -> DistributedCommunicator:
    """What a run on ``world_size`` processes would do, computed here without any process group.

    ``optimizer`` is an ordinary (local) FOP or KFAC of ``model``. The result has the owner
    ``assignment`` and ``loads``, :meth:`DistributedCommunicator.describe`,
    :meth:`~DistributedCommunicator.bytes_per_step` and
    :meth:`~DistributedCommunicator.curvature_bytes` (per-process curvature memory).
    """
    comm = DistributedCommunicator(replicated=replicated, cost=cost)
    comm.backend = "planned"
    comm._plan(optimizer, model, world_size, 0)
    return comm


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
def _tri(n: int) -> int:
    return n * (n + 1) // 2


class _TriCache:
    """``torch.triu_indices`` per (size, device): pack / unpack symmetric matrices."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, str], Tensor] = {}

    def indices(self, n: int, device: torch.device) -> Tensor:
        key = (n, str(device))
        if key not in self._cache:
            self._cache[key] = torch.triu_indices(n, n, device=device)
        return self._cache[key]

    def pack(self, matrix: Tensor, out: Tensor) -> None:
        iu = self.indices(matrix.shape[0], matrix.device)
        out.copy_(matrix[iu[0], iu[1]])

    def unpack(self, values: Tensor, n: int, dtype: torch.dtype) -> Tensor:
        iu = self.indices(n, values.device)
        matrix = values.new_zeros(n, n, dtype=dtype)
        matrix[iu[0], iu[1]] = values.to(dtype)
        matrix[iu[1], iu[0]] = values.to(dtype)
        return matrix


def _plain(value: Any) -> Any:
    """A picklable, comparable description of a hyperparameter."""
    if isinstance(value, Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(value):
        return f"<callable {getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}>"
    return value


def _flatten(signature: dict[str, Any]) -> dict[str, Any]:
    """``{"param_groups": [{"lr": 0.1}]}`` -> ``{"param_groups[0].lr": 0.1}`` (for precise messages)."""
    flat: dict[str, Any] = {}
    for key, value in signature.items():
        if key == "param_groups":
            flat["param_groups"] = len(value)
            for g, group in enumerate(value):
                for name, entry in group.items():
                    flat[f"param_groups[{g}].{name}"] = entry
        else:
            flat[key] = value
    return flat


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _refuse_diagonal(layers: Sequence[KroneckerLayer]) -> None:
    """The specialist layout packs every input factor as a dense triangle: no diagonal (Embedding) ones.

    Raised by every process alike (their layers agree) before the step's first collective.
    """
    diagonal = [f"{layer.name} ({type(layer.module).__name__})" for layer in layers if layer.diagonal_input]
    if diagonal:
        raise NotImplementedError(
            "DistributedCommunicator does not support layers with a diagonal input factor: "
            + ", ".join(diagonal)
            + ". Pass exclude=[...] for them (their parameters then take the fallback rule), or train through "
            "DistributedDataParallel with fop.dual_gradient_hook, which supports them"
        )


def _raise_uncaptured(layers: Sequence[KroneckerLayer]) -> None:
    if layers:
        name = layers[0].name
        raise RuntimeError(
            f"{name}: its parameters got gradients that its captured forward does not account for (used outside "
            "the module's forward, tied to another module, or a frozen weight with a trained bias); distributed "
            f"training cannot reduce them: exclude the module (exclude=[{name!r}]) so that its parameters use "
            "the fallback rule"
        )


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
            :func:`layer_cost`).

    After construction ``assignment`` (layer name -> owner rank), ``loads`` (cost per rank) and
    :meth:`describe` show who owns what; :meth:`bytes_per_step` gives the payload of every
    collective of a step and ``last_step_bytes`` what the last step sent.
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
        self.assignment: dict[str, int] = {}
        self.loads: list[float] = []
        self.last_step_bytes: dict[str, int] = {}
        self._opt_ref: Callable[[], KroneckerOptimizer | None] = lambda: None
        self._own_group = False
        self._tri = _TriCache()
        self._index: dict[int, int] = {}
        self._factored: set[int] = set()

    # ----------------------------------------------------------------------------- setup
    def setup(self, optimizer: KroneckerOptimizer, model: nn.Module) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistributedCommunicator needs torch.distributed.init_process_group(...) first")
        if self.group is None:
            self.group = dist.new_group(timeout=self.timeout) if self.timeout is not None else dist.new_group()
            self._own_group = True
        self._opt_ref = weakref.ref(optimizer)  # no cycle: the optimizer owns the communicator
        self.world_size = dist.get_world_size(self.group)
        if self.world_size < 2:
            raise ValueError(
                "DistributedCommunicator needs a group of two or more processes; with one process leave "
                "distributed=None (the optimizer then splits each batch in two halves itself)"
            )
        self.rank = dist.get_rank(self.group)
        self._global_ranks = [dist.get_global_rank(self.group, r) for r in range(self.world_size)]
        self.backend = str(dist.get_backend(self.group))
        if self.backend == "nccl" and optimizer._skipped.device.type != "cuda":
            raise RuntimeError("the NCCL backend needs the model on a CUDA device (use gloo for CPU training)")
        self._plan(optimizer, model, self.world_size, self.rank)

        self._check_agreement(optimizer, "construction")
        if self.broadcast_parameters:
            self._broadcast_model(model)

        self._factored = set()
        self._step_seen = -1  # optimizer._steps of the step whose common all-reduce has run
        self._ok: Tensor | None = None
        self._pending: list = []
        self._last_pattern: Any = None
        self._presence_cache: dict[Any, Tensor] = {}
        self._force_check = True
        self._checked_identical = not self.splits
        optimizer._mode.halves = False  # the halves are the two process groups
        optimizer._set_capture_mode()

    def _plan(self, optimizer: KroneckerOptimizer, model: nn.Module, world_size: int, rank: int) -> None:
        """Everything that needs no collective: layers, owners, dtypes and buffer layouts."""
        self.world_size, self.rank = world_size, rank
        self.device = optimizer._skipped.device
        self.projection = bool(optimizer.projection)  # FOP's β*, η* (diagnostics, cost model)
        self.splits = bool(getattr(optimizer, "splits_batch", optimizer.projection))  # needs g1, g2
        # Parameters frozen now get no slot in the collectives (a frozen backbone would otherwise be
        # sent as zeros at every step); _check_layout refuses them if they train later.
        self.layers: list[KroneckerLayer] = [
            layer for layer in optimizer.layers if any(p.requires_grad for p in layer.params())
        ]
        self._index = {id(layer): i for i, layer in enumerate(self.layers)}
        kron_ids = {id(p) for layer in optimizer.layers for p in layer.params()}
        self._fallback: list[Tensor] = []
        for group in optimizer.param_groups:
            if group["rule"] != "kronecker":
                self._fallback += [p for p in group["params"] if id(p) not in kron_ids and p.requires_grad]
        self._laid_out = {id(p) for p in self._all_params()}
        self._buffers: list[Tensor] = []
        self._buffer_names: list[str] = []
        if self.sync_buffers:
            for name, module in model.named_modules():
                if isinstance(module, nn.modules.batchnorm._NormBase):
                    for key in ("running_mean", "running_var"):
                        buf = getattr(module, key, None)
                        if isinstance(buf, Tensor) and buf.is_floating_point():
                            self._buffers.append(buf)
                            self._buffer_names.append(f"{name}.{key}")
        wide = any(p.dtype == torch.float64 for p in self._all_params()) or any(
            b.dtype == torch.float64 for b in self._buffers
        )
        self.dtype = torch.float64 if wide else torch.float32

        interval = optimizer.inverse_update_interval
        inverse_interval = interval(0) if callable(interval) else interval
        costs = [
            float(self.cost(layer)) if self.cost is not None else layer_cost(layer, self.projection, inverse_interval)
            for layer in self.layers
        ]
        self._costs = costs
        if self.replicated:
            self._owner = [self.rank] * len(self.layers)
            self.loads = [sum(costs)] * self.world_size
        else:
            self._owner = assign_owners(costs, self.world_size)
            self.loads = [0.0] * self.world_size
            for i, r in enumerate(self._owner):
                self.loads[r] += costs[i]
        self.assignment = {layer.name: self._owner[i] for i, layer in enumerate(self.layers)}
        self._build_layout()

    def _all_params(self) -> list[Tensor]:
        return [p for layer in self.layers for p in layer.params()] + list(self._fallback)

    def _build_layout(self) -> None:
        """Static offsets of every flat buffer (identical on every process)."""
        n = len(self.layers)
        self._numel = [layer.out_features * layer.in_features for layer in self.layers]
        self._slots = 2 if self.splits else 1
        self._owned: list[list[int]] = [[i for i in range(n) if self._owner[i] == r] for r in range(self.world_size)]
        if self.replicated:
            self._owned = [list(range(n)) for _ in range(self.world_size)]
        self._n_even = (self.world_size + 1) // 2
        self._n_odd = self.world_size // 2

        # reduce buckets: per owner [slots of its layers | factor triangles (curvature steps)]
        self._grad_off: dict[int, int] = {}
        self._fac_off: dict[int, int] = {}
        self._bucket_grad_len: list[int] = []
        self._bucket_fac_len: list[int] = []
        buckets = [list(range(n))] if self.replicated else self._owned
        for members in buckets:
            off = 0
            for i in members:
                self._grad_off[i] = off
                off += self._slots * self._numel[i]
            self._bucket_grad_len.append(off)
            foff = 0
            for i in members:
                self._fac_off[i] = foff
                foff += _tri(self.layers[i].in_features) + _tri(self.layers[i].out_features)
            self._bucket_fac_len.append(foff)
        # share buckets: per owner [direction | β*, η*, s, ⟨d, g⟩] of its layers
        self._share_off: dict[int, int] = {}
        self._share_len: list[int] = []
        for members in self._owned if not self.replicated else []:
            off = 0
            for i in members:
                self._share_off[i] = off
                off += self._numel[i] + _SHARED_SCALARS
            self._share_len.append(off)
        # the common all-reduce: [fallback grads | BN buffers | presence (grads, factors, fallback) |
        # call sequence (step() calls, zero_grad() calls) | not-ok]
        off = 0
        self._fb_off = []
        for p in self._fallback:
            self._fb_off.append(off)
            off += p.numel()
        self._buf_off = []
        for b in self._buffers:
            self._buf_off.append(off)
            off += b.numel()
        self._presence_off = off
        self._presence_len = 2 * n + len(self._fallback)
        off += self._presence_len
        self._seq_off = off
        off += 2
        self._flag_off = off
        self._common_len = off + 1

    def close(self) -> None:
        """Destroy the process group this communicator created (optional; for long-lived processes)."""
        if self._own_group and self.group is not None and dist.is_initialized():
            dist.destroy_process_group(self.group)
        self.group = None
        self._own_group = False

    # ----------------------------------------------------------------------------- inspection
    def describe(self) -> str:
        """A table of the layers, their cost, owner and factor sizes."""
        mode = "replicated" if self.replicated else "layer specialists"
        lines = [f"{mode} on {self.world_size} processes ({self.backend}); owner loads: "
                 + ", ".join(f"rank {r}: {load:.3g}" for r, load in enumerate(self.loads))]  # fmt: skip
        for i, layer in enumerate(self.layers):
            owner = "all" if self.replicated else str(self._owner[i])
            lines.append(
                f"  {layer.name:<32} A {layer.in_features:>5}  G {layer.out_features:>5}  "
                f"cost {self._costs[i]:>10.3g}  owner {owner}"
            )
        return "\n".join(lines)

    def curvature_bytes(self) -> list[int]:
        """Bytes of curvature state (running factors and their eigendecompositions) each rank holds.

        Per layer ``2n² + n`` elements for each factor (``A`` or ``G``, its eigenvectors and
        eigenvalues) in the compute dtype. Momentum buffers and the fallback rule's state come on
        top, the same on every process.
        """
        out = [0] * self.world_size
        for i, layer in enumerate(self.layers):
            size = torch.empty((), dtype=compute_dtype(layer.weight.dtype)).element_size()
            n_in, n_out = layer.in_features, layer.out_features
            nbytes = (2 * n_in * n_in + n_in + 2 * n_out * n_out + n_out) * size
            for r in range(self.world_size):
                if self.replicated or self._owner[i] == r:
                    out[r] += nbytes
        return out

    def bytes_per_step(self, curvature_step: bool = True) -> dict[str, Any]:
        """Payload bytes of each collective of one step, and DDP's all-reduce for comparison.

        ``all_reduce``, ``reduce``, ``broadcast``: summed payload of the step's collectives of that
        kind; ``calls``: how many collectives; ``ddp_all_reduce``: the payload of DDP's all-reduce
        of the same trainable parameters' gradients (in their dtype). ``wire_estimate`` and
        ``ddp_wire_estimate`` are the average bytes each process sends with bandwidth-optimal
        ring algorithms: ``2(N−1)/N·S`` for an all-reduce, ``(N−1)/N·S`` for a reduce or a
        broadcast.
        """
        size = torch.empty((), dtype=self.dtype).element_size()
        grads = sum(self._bucket_grad_len)
        factors = sum(self._bucket_fac_len) if curvature_step else 0
        n = self.world_size
        out: dict[str, Any] = {"all_reduce": 0, "reduce": 0, "broadcast": 0, "calls": 0}
        if self.replicated:
            out["all_reduce"] = (grads + factors + self._common_len) * size
            out["calls"] = 1
        else:
            out["all_reduce"] = self._common_len * size
            out["reduce"] = (grads + factors) * size
            out["broadcast"] = sum(self._share_len) * size
            busy = sum(1 for r in range(n) if self._bucket_grad_len[r] > 0)
            out["calls"] = 1 + 2 * busy
        out["total"] = out["all_reduce"] + out["reduce"] + out["broadcast"]
        out["ddp_all_reduce"] = sum(p.numel() * p.element_size() for p in self._all_params())
        share = (n - 1) / n
        out["wire_estimate"] = int(2 * share * out["all_reduce"] + share * (out["reduce"] + out["broadcast"]))
        out["ddp_wire_estimate"] = int(2 * share * out["ddp_all_reduce"])
        return out

    # ----------------------------------------------------------------------------- agreement
    def _signature(self, optimizer: KroneckerOptimizer) -> dict[str, Any]:
        groups = []
        for group in optimizer.param_groups:
            entry = {k: _plain(v) for k, v in sorted(group.items()) if k != "params"}
            entry["params"] = [(tuple(p.shape), str(p.dtype)) for p in group["params"]]
            groups.append(entry)
        return {
            "optimizer": type(optimizer).__name__,
            "mode": "replicated" if self.replicated else "specialists",
            "world_size": self.world_size,
            "layers": [
                (layer.name, type(layer.module).__name__, layer.out_features, layer.in_features, str(layer.weight.dtype))
                for layer in self.layers
            ],
            "param_groups": groups,
            "curvature_update_interval": _plain(optimizer.curvature_update_interval),
            "inverse_update_interval": _plain(optimizer.inverse_update_interval),
            "synced_buffers": [(name, tuple(b.shape)) for name, b in zip(self._buffer_names, self._buffers)],
            "device_type": self.device.type,
            "steps": int(optimizer._steps),
            "factored": sorted(getattr(self, "_factored", set())),
        }

    def _check_agreement(self, optimizer: KroneckerOptimizer, when: str) -> None:
        """All processes compare their configuration; every one raises on a mismatch (no hang)."""
        mine = _flatten(self._signature(optimizer))
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.group)
        problems = []
        for key in sorted(set().union(*everyone), key=lambda k: (k not in mine, list(mine).index(k) if k in mine else 0)):
            values = [sig.get(key, "<missing>") for sig in everyone]
            if any(v != values[0] for v in values[1:]):
                per_rank = "; ".join(f"rank {r}: {_short(v)}" for r, v in enumerate(values))
                problems.append(f"  {key}: {per_rank}")
            if len(problems) >= 12:
                problems.append("  ...")
                break
        if problems:
            raise DistributedConfigError(
                f"{type(optimizer).__name__}: the {self.world_size} processes disagree at {when} "
                "(every process must build the same model and optimizer, and load the same checkpoint):\n"
                + "\n".join(problems)
            )

    def _broadcast_model(self, model: nn.Module) -> None:
        """Rank 0's parameters and buffers to every process, one flat broadcast per dtype."""
        tensors = [t for t in list(model.parameters()) + list(model.buffers())]
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        seen: set[int] = set()
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                by_dtype.setdefault(t.dtype, []).append(t)
        with torch.no_grad():
            for group in by_dtype.values():
                flat = torch.cat([t.detach().reshape(-1) for t in group])
                dist.broadcast(flat, src=self._global_ranks[0], group=self.group)
                off = 0
                for t in group:
                    t.copy_(flat[off : off + t.numel()].view_as(t))
                    off += t.numel()

    # ----------------------------------------------------------------------------- the step
    def owns(self, layer: KroneckerLayer) -> bool:
        return self.replicated or self._owner[self._index[id(layer)]] == self.rank

    def has_factors(self, state: dict, layer: KroneckerLayer) -> bool:
        return self._index.get(id(layer), -1) in self._factored  # tracked here: owners hold the factors

    def _check_layout(self, optimizer: KroneckerOptimizer) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and id(p) not in self._laid_out:
                    name = optimizer._param_names.get(id(p), f"a parameter of shape {tuple(p.shape)}")
                    raise DistributedConfigError(
                        f"{name} was frozen (requires_grad=False) when the optimizer was built and now has a "
                        f"gradient: distributed {type(optimizer).__name__} lays out its collectives at construction, "
                        "for the parameters that train then. Build the optimizer after unfreezing (load the old "
                        "one's state_dict() into it to keep its state)"
                    )

    def reduce(self, work: Sequence[LayerWork], ok: Tensor) -> Tensor:
        opt = self._opt_ref()
        assert opt is not None
        # at the first step, not at construction: under DDP, dual_gradient_hook replaces this
        # communicator (which supports them) before any step; the layers agree across processes
        _refuse_diagonal(self.layers)
        self._check_layout(opt)
        items = {self._index[id(item.layer)]: item for item in work}
        # raised after the first collective, whose sequence and presence checks name the cause on
        # every process when the processes disagree (e.g. a second step() without a new backward)
        uncaptured = [layer for i, layer in enumerate(self.layers) if i not in items and any(p.grad is not None for p in layer.params())]  # fmt: skip
        curvature = bool(opt._mode.factors)
        self.last_step_bytes = {"all_reduce": 0, "reduce": 0, "broadcast": 0}
        size = torch.empty((), dtype=self.dtype).element_size()

        common = self._pack_common(items, ok, curvature)
        if self.replicated:
            flat = torch.zeros(self._bucket_grad_len[0] + (self._bucket_fac_len[0] if curvature else 0) + self._common_len,
                               dtype=self.dtype, device=self.device)  # fmt: skip
            self._pack_bucket(flat, 0, items, curvature)
            flat[flat.numel() - self._common_len :].copy_(common)
            handle = dist.all_reduce(flat, group=self.group, async_op=True)
            self._wait(handle, "the gradient all-reduce")
            self.last_step_bytes["all_reduce"] += flat.numel() * size
            ok = self._unpack_common(flat[flat.numel() - self._common_len :], items)
            _raise_uncaptured(uncaptured)
            self._unpack_bucket(flat, 0, items, curvature)
        else:
            common_handle = dist.all_reduce(common, group=self.group, async_op=True)
            self.last_step_bytes["all_reduce"] += common.numel() * size
            mine = None
            self._pending = [common_handle]
            for r in range(self.world_size):
                length = self._bucket_grad_len[r] + (self._bucket_fac_len[r] if curvature else 0)
                if length == 0:
                    continue
                bucket = torch.zeros(length, dtype=self.dtype, device=self.device)
                self._pack_bucket(bucket, r, items, curvature)
                handle = dist.reduce(bucket, dst=self._global_ranks[r], group=self.group, async_op=True)
                self.last_step_bytes["reduce"] += length * size
                self._pending.append((handle, bucket))
                if r == self.rank:
                    mine = (handle, bucket)
            self._wait(common_handle, "the gradient all-reduce")
            ok = self._unpack_common(common, items)
            _raise_uncaptured(uncaptured)
            if mine is not None:
                self._wait(mine[0], "the reduction to this layer owner")
                self._unpack_bucket(mine[1], self.rank, items, curvature)
        fresh = [i for i, it in items.items() if curvature and it.a is not None and it.g is not None and i not in self._factored]
        # a skipped step (non-finite gradients) creates no factors on the owner, so a layer counts
        # as factored only after a good step (one host synchronisation, until every layer is)
        if fresh and bool(ok):
            self._factored.update(fresh)
        for i, item in items.items():
            if not (self.replicated or self._owner[i] == self.rank):
                item.a = item.g = item.g1 = item.g2 = None  # computed by the owner only
        self._warn_if_identical(items)
        self._ok = ok
        self._step_seen = opt._steps
        return ok

    def share(self, work: Sequence[LayerWork]) -> None:
        for pending in self._pending[1:]:
            self._wait(pending[0], "the reduction to the layer owners")
        self._pending = []
        if self.replicated:
            return
        items = {self._index[id(item.layer)]: item for item in work}
        size = torch.empty((), dtype=self.dtype).element_size()
        received = []
        for r in range(self.world_size):
            if self._share_len[r] == 0:
                continue
            bucket = torch.zeros(self._share_len[r], dtype=self.dtype, device=self.device)
            if r == self.rank:
                for i in self._owned[r]:
                    item = items.get(i)
                    if item is None:
                        continue
                    assert item.direction is not None
                    off = self._share_off[i]
                    bucket[off : off + self._numel[i]].copy_(item.direction.reshape(-1))
                    last = item.layer.last
                    zero = torch.zeros((), dtype=self.dtype, device=self.device)
                    values = [last.get("beta", zero), last.get("eta", zero + 1), last.get("projection", zero)]
                    values.append(inner(item.direction, item.grad))
                    if self.splits:  # a step without halves (one sample) has no noise terms: NaN on every process
                        for key in _NOISE_KEYS:
                            last.setdefault(key, zero + float("nan"))
                    values += [last.get(key, zero) for key in _NOISE_KEYS]
                    scalars = bucket[off + self._numel[i] : off + self._numel[i] + _SHARED_SCALARS]
                    scalars.copy_(torch.stack([v.to(self.dtype).reshape(()) for v in values]))
                    item.dg = scalars[3].to(item.grad.dtype)  # as every other process will read it
            handle = dist.broadcast(bucket, src=self._global_ranks[r], group=self.group, async_op=True)
            self.last_step_bytes["broadcast"] = self.last_step_bytes.get("broadcast", 0) + bucket.numel() * size
            received.append((r, handle, bucket))
        for r, handle, bucket in received:
            self._wait(handle, "the broadcast of the owners' directions")
            if r == self.rank:
                continue
            for i in self._owned[r]:
                item = items.get(i)
                if item is None:
                    continue
                off = self._share_off[i]
                layer = item.layer
                dtype = compute_dtype(layer.weight.dtype)
                item.direction = bucket[off : off + self._numel[i]].view(layer.out_features, layer.in_features).to(dtype)
                scalars = bucket[off + self._numel[i] : off + self._numel[i] + _SHARED_SCALARS].to(dtype)
                layer.last = {"beta": scalars[0], "eta": scalars[1], "projection": scalars[2]}
                if self.splits:
                    layer.last.update(zip(_NOISE_KEYS, scalars[4:6]))
                item.dg = scalars[3]

    def reduce_first_order(self, params: Sequence[Tensor], ok: Tensor) -> Tensor:
        opt = self._opt_ref()
        assert opt is not None
        if self._step_seen != opt._steps:  # no Kronecker layer: the common all-reduce runs here
            self._check_layout(opt)
            common = self._pack_common({}, ok, False)
            self._wait(dist.all_reduce(common, group=self.group, async_op=True), "the gradient all-reduce")
            size = torch.empty((), dtype=self.dtype).element_size()
            self.last_step_bytes = {"all_reduce": common.numel() * size, "reduce": 0, "broadcast": 0}
            self._ok = self._unpack_common(common, {})
            self._step_seen = opt._steps
        assert self._ok is not None
        return self._ok

    def _wait(self, handle: Any, what: str) -> None:
        try:
            handle.wait()
        except RuntimeError as exc:
            raise RuntimeError(
                f"fop: {what} did not complete on all {self.world_size} processes: a process stopped taking "
                "part (crashed, or did not call step() / state_dict() / load_state_dict() with the others) "
                f"or the group's timeout ({self.timeout}) ran out. Cause: {exc}"
            ) from exc

    # ----------------------------------------------------------------------------- packing
    def _pattern(self, items: dict[int, LayerWork], curvature: bool) -> tuple:
        grads = tuple(sorted(items))
        factors = tuple(sorted(i for i, it in items.items() if curvature and it.a is not None and it.g is not None))
        fallback = tuple(j for j, p in enumerate(self._fallback) if p.grad is not None)
        return grads, factors, fallback

    def _presence(self, pattern: tuple) -> Tensor:
        if pattern not in self._presence_cache:
            grads, factors, fallback = pattern
            n = len(self.layers)
            values = torch.zeros(self._presence_len, dtype=self.dtype)
            values[list(grads)] = 1
            values[[n + i for i in factors]] = 1
            values[[2 * n + j for j in fallback]] = 1
            if len(self._presence_cache) > 64:
                self._presence_cache.clear()
            self._presence_cache[pattern] = values.to(self.device)
        return self._presence_cache[pattern]

    def _pack_common(self, items: dict[int, LayerWork], ok: Tensor, curvature: bool) -> Tensor:
        common = torch.zeros(self._common_len, dtype=self.dtype, device=self.device)
        for p, off in zip(self._fallback, self._fb_off):
            if p.grad is not None:
                common[off : off + p.numel()].copy_(p.grad.reshape(-1))
        for b, off in zip(self._buffers, self._buf_off):
            common[off : off + b.numel()].copy_(b.reshape(-1))
        pattern = self._pattern(items, curvature)
        self._check_now = self._force_check or pattern != self._last_pattern or self.device.type == "cpu"
        self._last_pattern = pattern
        common[self._presence_off : self._presence_off + self._presence_len].copy_(self._presence(pattern))
        common[self._seq_off : self._seq_off + 2] = torch.tensor(self._sequence(), dtype=self.dtype)
        common[self._flag_off :].copy_((~ok).reshape(1))
        return common

    def _sequence(self) -> tuple[float, float]:
        """Where this process is in the run: ``(step() calls + 1, zero_grad() calls)``, modulo 4096.

        Summed over the processes in the step's first collective: every process must find
        ``world_size`` times its own values. A process that skipped ``step()`` (and cleared its
        gradients for the next batch), called it twice, or called ``state_dict()`` alone (which
        sends zeros in the same collective) is caught at once, on every process. The modulus keeps
        the sums exact in float32 for up to 4096 processes.
        """
        opt = self._opt_ref()
        assert opt is not None
        return float(opt._steps % _SEQ_MOD + 1), float(opt._zero_grads % _SEQ_MOD)

    def _sequence_message(self, summed: list[float]) -> str:
        own = self._sequence()
        lines = [
            f"fop: the {self.world_size} processes are out of step: this process (rank {self.rank}) is at step() call "
            f"{int(own[0])} after {int(own[1])} zero_grad() calls (modulo {_SEQ_MOD})"
        ]
        if self.world_size == 2:
            other = (summed[0] - own[0], summed[1] - own[1])
            if other[0] == 0:
                lines.append("; the other process called state_dict() or load_state_dict() meanwhile")
            else:
                lines.append(f"; the other one at step() call {int(other[0])} after {int(other[1])} zero_grad() calls")
        lines.append(
            ". Every process must call zero_grad() and step() the same number of times, and state_dict() / "
            "load_state_dict() together: one process skipped step() (a `continue` on some ranks only), called "
            "it twice, or saved a checkpoint alone (state_dict() is a collective: call it on every process, "
            "save rank 0's)"
        )
        return "".join(lines)

    def _unpack_common(self, common: Tensor, items: dict[int, LayerWork]) -> Tensor:
        n = self.world_size
        for p, off in zip(self._fallback, self._fb_off):
            if p.grad is not None:
                p.grad.copy_(common[off : off + p.numel()].view_as(p.grad) / n)
        for b, off in zip(self._buffers, self._buf_off):
            b.copy_(common[off : off + b.numel()].view_as(b) / n)
        presence = common[self._presence_off : self._presence_off + self._presence_len]
        sequence = common[self._seq_off : self._seq_off + 2]
        in_step = (sequence == torch.tensor(self._sequence(), dtype=self.dtype, device=self.device) * n).all()
        consistent = ((presence == 0) | (presence == n)).all() & in_step
        opt = self._opt_ref()
        steps = opt._steps + 1 if opt is not None else 1
        if self._check_now or steps & (steps - 1) == 0:  # and at steps 1, 2, 4, ... on GPUs
            self._force_check = False
            if not bool(in_step):
                raise DistributedConfigError(self._sequence_message(sequence.tolist()))
            if not bool(consistent):
                raise DistributedConfigError(self._presence_message(presence))
        return (common[self._flag_off] == 0) & consistent

    def _presence_message(self, presence: Tensor) -> str:
        counts = [int(c) for c in presence.round().tolist()]
        n, n_layers = self.world_size, len(self.layers)
        lines = []
        for i, layer in enumerate(self.layers):
            if counts[i] not in (0, n):
                lines.append(f"  {layer.name}: gradients on {counts[i]} of {n} processes")
            if counts[n_layers + i] not in (0, n):
                lines.append(f"  {layer.name}: factor statistics on {counts[n_layers + i]} of {n} processes")
        for j, p in enumerate(self._fallback):
            if counts[2 * n_layers + j] not in (0, n):
                lines.append(f"  fallback parameter #{j} {tuple(p.shape)}: gradients on {counts[2 * n_layers + j]} of {n} processes")
        return (
            "the processes did not all produce gradients for the same parameters this step "
            "(every process must run the same layers forward and backward before each step(), "
            "as with DDP's find_unused_parameters=False):\n" + "\n".join(lines)
        )

    def _pack_bucket(self, bucket: Tensor, r: int, items: dict[int, LayerWork], curvature: bool) -> None:
        members = list(range(len(self.layers))) if self.replicated else self._owned[r]
        slot = self.rank % 2 if self.splits else 0
        grad_len = self._bucket_grad_len[0 if self.replicated else r]
        for i in members:
            item = items.get(i)
            if item is None:
                continue
            off = self._grad_off[i] + slot * self._numel[i]
            bucket[off : off + self._numel[i]].copy_(item.grad.reshape(-1))
            if curvature and item.a is not None and item.g is not None:
                foff = grad_len + self._fac_off[i]
                n_in, n_out = self.layers[i].in_features, self.layers[i].out_features
                self._tri.pack(item.a, bucket[foff : foff + _tri(n_in)])
                self._tri.pack(item.g, bucket[foff + _tri(n_in) : foff + _tri(n_in) + _tri(n_out)])

    def _unpack_bucket(self, bucket: Tensor, r: int, items: dict[int, LayerWork], curvature: bool) -> None:
        members = list(range(len(self.layers))) if self.replicated else self._owned[r]
        grad_len = self._bucket_grad_len[0 if self.replicated else r]
        n = self.world_size
        for i in members:
            item = items.get(i)
            if item is None:
                continue
            layer = self.layers[i]
            shape = (layer.out_features, layer.in_features)
            dtype = item.grad.dtype
            off, numel = self._grad_off[i], self._numel[i]
            if self.splits:
                item.g1 = (bucket[off : off + numel].view(shape) / self._n_even).to(dtype)
                item.g2 = (bucket[off + numel : off + 2 * numel].view(shape) / self._n_odd).to(dtype)
                item.grad = 0.5 * (item.g1 + item.g2)
                item.half_batch = item.samples * n / 2  # the halves: even and odd ranks' local batches
            else:
                item.grad = (bucket[off : off + numel].view(shape) / n).to(dtype)
            if curvature and item.a is not None and item.g is not None:
                foff = grad_len + self._fac_off[i]
                n_in, n_out = layer.in_features, layer.out_features
                item.a = self._tri.unpack(bucket[foff : foff + _tri(n_in)], n_in, item.a.dtype) / n
                item.g = self._tri.unpack(bucket[foff + _tri(n_in) : foff + _tri(n_in) + _tri(n_out)], n_out, item.g.dtype) / n
            else:
                item.a = item.g = None

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
    def gather_state(self, optimizer: KroneckerOptimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Rank 0's ``state_dict()`` gets every layer's curvature; a collective (all processes call it).

        Other ranks return their own view (their owned layers' curvature only). The gathered
        tensors are on the CPU; ``load_state_dict`` moves them to the parameters' device.
        """
        if self.replicated:
            return state_dict
        self._same_call("state_dict()")
        mine = {}
        for i in self._owned[self.rank]:
            st = optimizer.state.get(self.layers[i].weight, {})
            tensors = {k: st[k].detach().cpu() for k in FACTOR_KEYS if k in st}
            if tensors:
                mine[i] = tensors
        everyone: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(mine, everyone, dst=self._global_ranks[0], group=self.group)
        if self.rank != 0:
            return state_dict
        assert everyone is not None
        index: dict[int, int] = {}
        for packed, group in zip(state_dict["param_groups"], optimizer.param_groups):
            for idx, p in zip(packed["params"], group["params"]):
                index.setdefault(id(p), idx)
        states = dict(state_dict["state"])
        for part in everyone:
            for i, tensors in part.items():
                idx = index[id(self.layers[i].weight)]
                states[idx] = {**states.get(idx, {}), **tensors}
        state_dict = dict(state_dict)
        state_dict["state"] = states
        return state_dict

    def _same_call(self, what: str) -> None:
        """Fail fast, on every process, unless all of them are in this checkpoint collective.

        Sends zeros where ``step()`` sends its call sequence, in a collective of the same size as
        a step's first one: a process still training pairs with it and both see the mismatch,
        instead of meeting in different collectives and waiting for the timeout.
        """
        probe = torch.zeros(self._common_len, dtype=self.dtype, device=self.device)
        self._wait(dist.all_reduce(probe, group=self.group, async_op=True), f"the {what} collective")
        sequence = probe[self._seq_off : self._seq_off + 2]
        if bool((sequence != 0).any()):
            raise DistributedConfigError(
                f"fop: {what} is a collective and this process (rank {self.rank}) called it while "
                f"{'another process' if self.world_size == 2 else 'other processes'} called step(): "
                "call it on every process at the same point of the loop (and save rank 0's state)"
            )

    def loaded(self, optimizer: KroneckerOptimizer) -> None:
        """After every process loaded the same (full) checkpoint: shard it and check agreement."""
        self._same_call("load_state_dict()")
        self._factored = {i for i, layer in enumerate(self.layers) if "A" in optimizer.state.get(layer.weight, {})}
        if not self.replicated:
            for i, layer in enumerate(self.layers):
                if self._owner[i] != self.rank and layer.weight in optimizer.state:
                    for key in FACTOR_KEYS:
                        optimizer.state[layer.weight].pop(key, None)
        self._check_agreement(optimizer, "load_state_dict")
        self._force_check = True
        self._step_seen = -1
