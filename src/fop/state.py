"""A layer's curvature state in ``optimizer.state[layer.weight]``, and its checkpoint gather / shard.

The running factors ``A``, ``G`` and their eigendecompositions live under :data:`FACTOR_KEYS` in
the optimizer's ordinary state (so that ``state_dict()`` saves them). Distributed layer
specialists keep a layer's curvature on its owner only: :func:`owned_curvature` takes a process's
share for a checkpoint, :func:`merge_curvature` puts every process's share into rank 0's
``state_dict()``, and :func:`drop_curvature` shards a loaded full checkpoint again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from .curvature import FACTOR_KEYS

__all__ = ["FACTOR_KEYS", "drop_curvature", "has_curvature", "merge_curvature", "owned_curvature"]


def has_curvature(state: Mapping[Tensor, dict], weight: Tensor) -> bool:
    """Whether the layer of ``weight`` has running factors in ``state``."""
    return "A" in state.get(weight, {})


def owned_curvature(state: Mapping[Tensor, dict], weights: Mapping[int, Tensor]) -> dict[int, dict[str, Tensor]]:
    """CPU copies of the curvature of the layers ``{index: weight}`` that have any."""
    out = {}
    for i, weight in weights.items():
        st = state.get(weight, {})
        tensors = {k: st[k].detach().cpu() for k in FACTOR_KEYS if k in st}
        if tensors:
            out[i] = tensors
    return out


def merge_curvature(
    state_dict: dict[str, Any], param_groups: Sequence[dict], parts: Sequence[dict[int, dict[str, Tensor]]],
    weights: Sequence[Tensor],
) -> dict[str, Any]:  # fmt: skip
    """``state_dict`` (of ``param_groups``) with the curvature ``parts`` of layer ``i`` (weight ``weights[i]``) added."""
    index: dict[int, int] = {}
    for packed, group in zip(state_dict["param_groups"], param_groups):
        for idx, p in zip(packed["params"], group["params"]):
            index.setdefault(id(p), idx)
    states = dict(state_dict["state"])
    for part in parts:
        for i, tensors in part.items():
            idx = index[id(weights[i])]
            states[idx] = {**states.get(idx, {}), **tensors}
    return {**state_dict, "state": states}


def drop_curvature(state: dict[Tensor, dict], weight: Tensor) -> None:
    """Forget the curvature of ``weight``'s layer (another process owns it)."""
    for key in FACTOR_KEYS:
        state.get(weight, {}).pop(key, None)
