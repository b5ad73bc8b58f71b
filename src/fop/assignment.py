"""Who computes what in a distributed step, and where each value sits in the flat buffers: plain data.

A :class:`WorkAssignment` is built from layer shapes and tensor sizes alone (no process group, no
tensor): the owner of every Kronecker layer (greedy on :func:`layer_cost`), the load of every rank,
the offsets of every layer in the step's flat buffers, and the bytes each collective carries.
Every process builds the same one; :class:`fop.distributed.DistributedCommunicator` packs and
unpacks its buffers at these offsets, and :func:`fop.distributed.plan` reports one for a world
size that is not running.

Buffers of one step (``N`` processes, ``S = 2`` gradient slots for FOP, 1 for K-FAC):

* **reduce bucket of owner r** (specialists; one bucket for all layers when replicated):
  ``[S slots of each owned layer's folded gradient | factor triangles of each owned layer]``,
  the triangles (``n(n+1)/2`` entries of ``A`` then of ``G``) on curvature steps only;
* **share bucket of owner r** (specialists only): ``[direction | β*, η*, s, ⟨d, g⟩, tr Σ, |G|²]``
  per owned layer;
* **common all-reduce**: ``[fallback gradients | synced buffers | presence counts (gradients and
  factors per layer, fallback tensors) | call sequence (step(), zero_grad()) | not-ok flag]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

__all__ = ["SHARED_SCALARS", "LayerShape", "WorkAssignment", "assign_owners", "factor_entries", "layer_cost", "tri"]

# shared with every layer's direction: β*, η*, s (diagnostics), ⟨d, g⟩ (the KL trust region) and,
# for FOP, the gradient-noise terms tr Σ, |G|² (diagnostics)
SHARED_SCALARS = 6


class _Shaped(Protocol):
    @property
    def in_features(self) -> int: ...

    @property
    def out_features(self) -> int: ...


def tri(n: int) -> int:
    """Entries of the upper triangle of an ``n × n`` symmetric matrix."""
    return n * (n + 1) // 2


def factor_entries(n: int, diagonal: bool = False) -> int:
    """Entries an ``n × n`` Kronecker factor takes in a collective's buffer.

    A dense (symmetric) factor travels as its upper triangle, ``n(n+1)/2``; a diagonal one (the
    input factor of an ``nn.Embedding``, kept as its diagonal) as its ``n`` entries. The one place
    that decides it: :class:`fop.codec.FactorCodec` packs by it, the byte counts count by it.
    """
    return n if diagonal else tri(n)


def layer_cost(
    layer: _Shaped, projection: bool = True, inverse_interval: float = 1, damping_mode: str = "factored"
) -> float:
    """Relative per-step cost of a layer's curvature work, the quantity owners are balanced on.

    Factored damping (the default): ``(n_in³ + n_out³) / T_inv`` for the two damped inverses (a
    Cholesky factorisation and its inverse, about ``n³`` flops per factor, once every ``T_inv`` steps
    on average: see :func:`fop.intervals.mean_interval`) plus ``c · n_out n_in (n_in + n_out)`` for the
    products with them (``G_inv X A_inv``: ``c = 2`` for K-FAC; ``c = 6`` for FOP, which applies them to
    ``g_avg`` and ``g_diff`` and forms ``F g_avg``). Exact damping: ``9 (n_in³ + n_out³) / T_inv`` for
    the two symmetric eigendecompositions (about ``9 n³`` flops each) plus the rotations into and out of
    the eigenbasis (``c = 6`` for FOP: ``g_avg``, ``g_diff`` in and ``n_comb`` out; ``c = 4`` for K-FAC).
    """
    n_in, n_out = layer.in_features, layer.out_features
    if damping_mode == "factored":
        decomposition, products = 1.0, (6.0 if projection else 2.0)
    else:
        decomposition, products = 9.0, (6.0 if projection else 4.0)
    cubes = decomposition * (n_in**3 + n_out**3) / max(1.0, inverse_interval)
    return cubes + products * n_out * n_in * (n_in + n_out)


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


@dataclass(frozen=True)
class LayerShape:
    """A Kronecker layer as the assignment sees it: its folded ``(out, in)`` shape.

    ``itemsize``: bytes per element of the layer's compute dtype (its curvature state).
    """

    name: str
    in_features: int
    out_features: int
    itemsize: int = 4
    diagonal_input: bool = False  # the input factor is diagonal (nn.Embedding)

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features

    @property
    def triangles(self) -> int:
        """Entries of the packed factor statistics ``[A | G]`` (:func:`factor_entries` of each)."""
        return factor_entries(self.in_features, self.diagonal_input) + factor_entries(self.out_features)


@dataclass(frozen=True)
class CommonLayout:
    """Offsets of the common all-reduce (see the module doc)."""

    fallback: tuple[int, ...]
    buffers: tuple[int, ...]
    presence: int
    presence_len: int
    sequence: int
    flag: int

    @property
    def length(self) -> int:
        return self.flag + 1


def _common_layout(n_layers: int, fallback_sizes: Sequence[int], buffer_sizes: Sequence[int]) -> CommonLayout:
    offsets, off = [], 0
    for size in (*fallback_sizes, *buffer_sizes):
        offsets.append(off)
        off += size
    presence_len = 2 * n_layers + len(fallback_sizes)
    k = len(fallback_sizes)
    return CommonLayout(
        tuple(offsets[:k]), tuple(offsets[k:]), off, presence_len, off + presence_len, off + presence_len + 2
    )


@dataclass(frozen=True)
class WorkAssignment:
    """Owners, loads and buffer offsets of a distributed step (see the module doc).

    Args:
        layers: the Kronecker layers that train, in the optimizer's order.
        world_size: the number of processes.
        costs: each layer's load (default :func:`layer_cost` with ``projection``, interval 1).
        replicated: every rank computes every layer (one all-reduce, nothing shared); the
            reported owner is then rank 0.
        splits: the reduce buckets carry two gradient slots (FOP's even and odd ranks).
        fallback_sizes, buffer_sizes: elements of the fallback gradients and synced buffers.
        itemsize: bytes per element of the collectives' dtype.
        gradient_bytes: bytes of every trainable parameter's gradient in its own dtype, what
            DistributedDataParallel's all-reduce would carry (for comparison).
    """

    layers: tuple[LayerShape, ...]
    world_size: int
    costs: tuple[float, ...] = ()
    replicated: bool = False
    splits: bool = True
    fallback_sizes: tuple[int, ...] = ()
    buffer_sizes: tuple[int, ...] = ()
    itemsize: int = 4
    gradient_bytes: int = 0
    owners: tuple[int, ...] = field(init=False)
    loads: tuple[float, ...] = field(init=False)
    common: CommonLayout = field(init=False)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        costs = self.costs or tuple(layer_cost(layer) for layer in self.layers)
        if len(costs) != len(self.layers):
            raise ValueError(f"{len(costs)} costs for {len(self.layers)} layers")
        if self.replicated:
            owners, loads = [0] * len(costs), [float(sum(costs))] * self.world_size
        else:
            owners = assign_owners(costs, self.world_size)
            loads = [0.0] * self.world_size
            for cost, rank in zip(costs, owners):
                loads[rank] += cost
        setter = object.__setattr__  # frozen: the derived fields are set once, here
        setter(self, "costs", tuple(float(c) for c in costs))
        setter(self, "owners", tuple(owners))
        setter(self, "loads", tuple(loads))
        setter(self, "common", _common_layout(len(self.layers), self.fallback_sizes, self.buffer_sizes))

    # ----------------------------------------------------------------------------- owners
    @property
    def assignment(self) -> dict[str, int]:
        """Layer name -> owner rank."""
        return {layer.name: owner for layer, owner in zip(self.layers, self.owners)}

    def owns(self, rank: int, i: int) -> bool:
        """Whether ``rank`` computes layer ``i`` (every rank does when replicated)."""
        return self.replicated or self.owners[i] == rank

    def owned(self, rank: int) -> list[int]:
        """Indices of the layers ``rank`` computes."""
        return [i for i in range(len(self.layers)) if self.owns(rank, i)]

    @property
    def slots(self) -> int:
        return 2 if self.splits else 1

    @property
    def group_sizes(self) -> tuple[int, int]:
        """Members of the even and of the odd group (``⌈N/2⌉``, ``⌊N/2⌋``)."""
        return (self.world_size + 1) // 2, self.world_size // 2

    # ----------------------------------------------------------------------------- reduce buckets
    @cached_property
    def buckets(self) -> list[list[int]]:
        """Layer indices of each reduce bucket: one per owner, or one for all layers (replicated)."""
        if self.replicated:
            return [list(range(len(self.layers)))]
        return [self.owned(r) for r in range(self.world_size)]

    def _offsets(self, size: Any) -> tuple[dict[int, int], list[int]]:
        offsets: dict[int, int] = {}
        lengths = []
        for members in self.buckets:
            off = 0
            for i in members:
                offsets[i] = off
                off += size(self.layers[i])
            lengths.append(off)
        return offsets, lengths

    @cached_property
    def grad_offsets(self) -> tuple[dict[int, int], list[int]]:
        """Offset of each layer's slots within its bucket, and each bucket's slot length."""
        return self._offsets(lambda layer: self.slots * layer.numel)

    @cached_property
    def factor_offsets(self) -> tuple[dict[int, int], list[int]]:
        """Offset of each layer's triangles after its bucket's slots, and each bucket's triangle length."""
        return self._offsets(lambda layer: layer.triangles)

    def bucket_len(self, bucket: int, curvature: bool) -> int:
        grads = self.grad_offsets[1][bucket]
        return grads + (self.factor_offsets[1][bucket] if curvature else 0)

    # ----------------------------------------------------------------------------- share buckets
    @cached_property
    def share_offsets(self) -> tuple[dict[int, int], list[int]]:
        """Offset of each layer's direction and scalars in its owner's share bucket, and their lengths."""
        if self.replicated:
            return {}, [0] * self.world_size
        return self._offsets(lambda layer: layer.numel + SHARED_SCALARS)

    # ----------------------------------------------------------------------------- reporting
    def curvature_bytes(self) -> list[int]:
        """Bytes of curvature state (running factors and their eigendecompositions) each rank holds.

        Per layer ``2n² + n`` elements for each factor (``A`` or ``G``, its eigenvectors and
        eigenvalues) in the layer's compute dtype. Momentum buffers and the fallback rule's state
        come on top, the same on every process.
        """
        out = [0] * self.world_size
        for i, layer in enumerate(self.layers):
            n_in, n_out = layer.in_features, layer.out_features
            nbytes = (2 * n_in * n_in + n_in + 2 * n_out * n_out + n_out) * layer.itemsize
            for r in range(self.world_size):
                if self.owns(r, i):
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
        size, n = self.itemsize, self.world_size
        buckets = sum(self.bucket_len(b, curvature_step) for b in range(len(self.buckets)))
        out: dict[str, Any] = {"all_reduce": 0, "reduce": 0, "broadcast": 0, "calls": 0}
        if self.replicated:
            out["all_reduce"] = (buckets + self.common.length) * size
            out["calls"] = 1
        else:
            out["all_reduce"] = self.common.length * size
            out["reduce"] = buckets * size
            out["broadcast"] = sum(self.share_offsets[1]) * size
            busy = sum(1 for length in self.grad_offsets[1] if length > 0)
            out["calls"] = 1 + 2 * busy
        out["total"] = out["all_reduce"] + out["reduce"] + out["broadcast"]
        out["ddp_all_reduce"] = self.gradient_bytes
        share = (n - 1) / n
        out["wire_estimate"] = int(2 * share * out["all_reduce"] + share * (out["reduce"] + out["broadcast"]))
        out["ddp_wire_estimate"] = int(2 * share * out["ddp_all_reduce"])
        return out

    def describe(self, backend: str = "planned") -> str:
        """A table of the layers, their cost, owner and factor sizes."""
        mode = "replicated" if self.replicated else "layer specialists"
        loads = ", ".join(f"rank {r}: {load:.3g}" for r, load in enumerate(self.loads))
        lines = [f"{mode} on {self.world_size} processes ({backend}); owner loads: {loads}"]
        for layer, cost, owner in zip(self.layers, self.costs, self.owners):
            lines.append(
                f"  {layer.name:<32} A {layer.in_features:>5}  G {layer.out_features:>5}  "
                f"cost {cost:>10.3g}  owner {'all' if self.replicated else owner}"
            )
        return "\n".join(lines)
