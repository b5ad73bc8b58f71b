"""Checks of a checkpoint against the optimizer it is loaded into, before anything is loaded."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from .curvature import KroneckerLayer
from .state import LayerCurvature

__all__ = ["check_checkpoint_shapes"]


def check_checkpoint_shapes(
    state_dict: Mapping[str, Any],
    param_groups: Sequence[Mapping[str, Any]],
    layers: Sequence[KroneckerLayer],
    param_names: Mapping[int, str],
) -> None:
    """Every state tensor of the checkpoint fits its parameter here (else a matmul fails much later)."""
    saved_groups = state_dict.get("param_groups", [])
    if len(saved_groups) != len(param_groups):
        return  # torch's own check names this mismatch
    index: dict[Any, Tensor] = {}
    for saved, group in zip(saved_groups, param_groups):
        index.update(zip(saved["params"], group["params"]))
    layer_of = {id(layer.weight): layer for layer in layers}
    problems = []
    for idx, entry in state_dict.get("state", {}).items():
        p = index.get(idx)
        if p is None:
            continue
        layer = layer_of.get(id(p))
        shape = tuple(p.shape)
        expected: dict[str, tuple[int, ...]] = {"momentum_buffer": shape, "exp_avg": shape, "exp_avg_sq": shape}
        if layer is not None:
            expected.update(LayerCurvature.shapes(layer.in_features, layer.out_features, layer.diagonal_input))
        for key, value in entry.items():
            want = expected.get(key)
            if isinstance(value, Tensor) and want is not None and tuple(value.shape) != tuple(want):
                where = f"layer {layer.name}" if layer is not None else f"parameter {param_names.get(id(p), idx)}"
                problems.append(f"  {where}: {key} is {tuple(value.shape)} in the checkpoint, {tuple(want)} here")
    if problems:
        raise ValueError(
            "the checkpoint was saved for a model of another shape (nothing was loaded):\n"
            + "\n".join(problems[:12])
            + "\nload it into the model it was saved from, or start this model's optimizer afresh"
        )
