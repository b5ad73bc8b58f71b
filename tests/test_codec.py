"""The factor codec shared by the distributed reductions: round trips and sums, dense and diagonal."""

from __future__ import annotations

import torch

from fop.assignment import LayerShape, factor_entries, tri
from fop.codec import FactorCodec


def _symmetric(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x + x.T  # exactly symmetric


def test_dense_and_diagonal_factors_round_trip_through_one_segment() -> None:
    codec = FactorCodec()
    g = _symmetric(3, 0)
    for a in (_symmetric(5, 1), torch.rand(5, dtype=torch.float64)):  # a dense and a diagonal input factor
        size = codec.size(a, g)
        assert size == factor_entries(5, diagonal=a.dim() == 1) + tri(3)
        flat = torch.zeros(size, dtype=torch.float64)
        codec.pack(a, g, flat)
        a2, g2 = codec.unpack(flat, a, g)
        assert torch.equal(a2, a) and torch.equal(g2, g)


def test_summed_segments_unpack_to_the_summed_factors() -> None:
    """The reductions SUM packed buffers: the codec is linear."""
    codec = FactorCodec()
    a1, a2, g1, g2 = _symmetric(4, 0), _symmetric(4, 1), _symmetric(2, 2), _symmetric(2, 3)
    flat1, flat2 = (
        torch.zeros(codec.size(a1, g1), dtype=torch.float64),
        torch.zeros(codec.size(a1, g1), dtype=torch.float64),
    )
    codec.pack(a1, g1, flat1)
    codec.pack(a2, g2, flat2)
    a, g = codec.unpack(flat1 + flat2, a1, g1)
    torch.testing.assert_close(a, a1 + a2)
    torch.testing.assert_close(g, g1 + g2)


def test_planned_segments_count_diagonal_input_factors_as_vectors() -> None:
    assert LayerShape("fc", 10, 4).triangles == tri(10) + tri(4)
    assert LayerShape("emb", 10, 4, diagonal_input=True).triangles == 10 + tri(4)
