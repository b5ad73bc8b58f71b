"""A layer's Kronecker factors to and from the flat buffers of a collective: one codec for every path.

Both reductions of the factor statistics (:class:`fop.distributed.DistributedCommunicator`'s
buckets and :class:`fop.ddp.DDPCommunicator`'s all-reduce) SUM flat buffers in which each layer
takes one segment ``[A | G]``. A symmetric factor travels as its upper triangle, ``n(n+1)/2``
entries; a diagonal one (an ``nn.Embedding``'s input factor, kept as its diagonal ``n``-vector)
as its ``n`` entries. How many entries a factor takes is decided once, by
:func:`fop.assignment.factor_entries`, which also sizes the planned buffers and byte counts.
Packing is linear, so the sum of the packed segments is the packed sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .assignment import factor_entries

__all__ = ["FactorCodec"]


class FactorCodec:
    """``(A, G)`` to and from one flat segment (``torch.triu_indices`` cached per size and device)."""

    def __init__(self) -> None:
        self._indices: dict[tuple[int, str], Tensor] = {}

    @staticmethod
    def size(a: Tensor, g: Tensor) -> int:
        """Entries of the segment: :func:`fop.assignment.factor_entries` of ``A`` and of ``G``."""
        return _entries(a) + _entries(g)

    def pack(self, a: Tensor, g: Tensor, out: Tensor) -> None:
        """Write ``[A | G]`` into ``out`` (a segment of :meth:`size` entries)."""
        na = _entries(a)
        self._pack_one(a, out[:na])
        self._pack_one(g, out[na : na + _entries(g)])

    def unpack(self, values: Tensor, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """The two factors held by ``values``, in the shapes and dtypes of ``a`` and ``g`` (templates)."""
        na = _entries(a)
        return self._unpack_one(values[:na], a), self._unpack_one(values[na : na + _entries(g)], g)

    def _triu(self, n: int, device: torch.device) -> Tensor:
        key = (n, str(device))
        if key not in self._indices:
            self._indices[key] = torch.triu_indices(n, n, device=device)
        return self._indices[key]

    def _pack_one(self, factor: Tensor, out: Tensor) -> None:
        if factor.dim() == 1:
            out.copy_(factor)
        else:
            iu = self._triu(factor.shape[0], factor.device)
            out.copy_(factor[iu[0], iu[1]])

    def _unpack_one(self, values: Tensor, like: Tensor) -> Tensor:
        if like.dim() == 1:
            return values.to(like.dtype)
        n = like.shape[0]
        iu = self._triu(n, values.device)
        matrix = values.new_zeros(n, n, dtype=like.dtype)
        matrix[iu[0], iu[1]] = values.to(like.dtype)
        matrix[iu[1], iu[0]] = values.to(like.dtype)
        return matrix


def _entries(factor: Tensor) -> int:
    return factor_entries(factor.shape[0], diagonal=factor.dim() == 1)
