"""Whether the processes of a distributed optimizer agree, and the errors that say where they do not.

Pure functions over plain values: :class:`fop.distributed.DistributedCommunicator` gathers or
reduces what the processes hold and hands it here. Every process runs the same check on the same
gathered values, so every one raises the same :class:`DistributedConfigError` (none waits for a
collective the others left).

* :func:`signature` / :func:`check_agreement`: the configuration (optimizer, layers, param
  groups, intervals, synced buffers, step count) at construction and at ``load_state_dict``;
* :func:`call_sequence` / :func:`sequence_message`: where each process is in the run, summed in
  the step's first collective; :func:`presence_message`: which layers got gradients where;
* :func:`check_layout`, :func:`refuse_diagonal`, :func:`raise_uncaptured`: what the collectives'
  layout, fixed at construction, cannot carry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .curvature import KroneckerLayer

if TYPE_CHECKING:
    from .distributed import Engine

__all__ = [
    "SEQ_MOD",
    "DistributedConfigError",
    "call_sequence",
    "check_agreement",
    "check_layout",
    "ddp_wrapper_message",
    "presence_message",
    "raise_uncaptured",
    "refuse_diagonal",
    "same_call_message",
    "sequence_message",
    "signature",
]

SEQ_MOD = 4096  # call counters travel modulo this (exact float32 sums for up to 4096 processes)


class DistributedConfigError(ValueError):
    """The processes of a distributed optimizer disagree on its configuration or its data."""


def ddp_wrapper_message(name: str) -> str:
    """Why ``name`` refuses a ``DistributedDataParallel`` wrapper, and the two ways to train instead."""
    return (
        f"{name} must own the gradient reduction in distributed training: pass the bare model, not a "
        "DistributedDataParallel wrapper. DDP's single averaged all-reduce erases the two sub-batch "
        f"gradients (even ranks, odd ranks) that FOP needs; {name} reduces the gradients itself (and "
        "broadcasts the initial parameters from rank 0, as DDP does). Write: model = Net().to(device); "
        f"optimizer = {name}(model, ...) inside an initialised process group, without DDP. "
        f"Or keep DDP and let its communication hook keep the halves: optimizer = {name}(ddp_model.module, ...); "
        "ddp_model.register_comm_hook(optimizer, fop.dual_gradient_hook)."
    )


# ================================================================================ configuration
def signature(
    optimizer: Engine,
    *,
    mode: str,
    world_size: int,
    layers: Sequence[KroneckerLayer],
    synced_buffers: Sequence[tuple[str, Tensor]],
    device_type: str,
    steps: int,
    factored: set[int],
) -> dict[str, Any]:
    """What every process must hold alike: a picklable, comparable description of its optimizer."""
    groups = []
    for group in optimizer.param_groups:
        entry = {k: _plain(v) for k, v in sorted(group.items()) if k != "params"}
        entry["params"] = [(tuple(p.shape), str(p.dtype)) for p in group["params"]]
        groups.append(entry)
    return {
        "optimizer": type(optimizer).__name__,
        "mode": mode,
        "world_size": world_size,
        "layers": [
            (layer.name, type(layer.module).__name__, layer.out_features, layer.in_features, str(layer.weight.dtype))
            for layer in layers
        ],
        "param_groups": groups,
        "curvature_update_interval": _plain(optimizer.curvature_update_interval),
        "inverse_update_interval": _plain(optimizer.inverse_update_interval),
        "synced_buffers": [(name, tuple(b.shape)) for name, b in synced_buffers],
        "device_type": device_type,
        "steps": int(steps),
        "factored": sorted(factored),
    }


def check_agreement(mine: dict[str, Any], everyone: list[dict[str, Any]], optimizer_name: str, when: str) -> None:
    """Raise, naming each differing entry per rank, unless every process's :func:`signature` is ``mine``.

    ``mine`` and ``everyone`` are flattened (:func:`flatten`); ``everyone`` is in rank order.
    """
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
            f"{optimizer_name}: the {len(everyone)} processes disagree at {when} "
            "(every process must build the same model and optimizer, and load the same checkpoint):\n"
            + "\n".join(problems)
        )


def flatten(signature: dict[str, Any]) -> dict[str, Any]:
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


def _plain(value: Any) -> Any:
    """A picklable, comparable description of a hyperparameter."""
    if isinstance(value, Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(value):
        return f"<callable {getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}>"
    return value


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ================================================================================ the step
def call_sequence(step: int, zero_grads: int) -> tuple[float, float]:
    """Where a process is in the run: ``(step() calls + 1, zero_grad() calls)``, modulo :data:`SEQ_MOD`.

    Summed over the processes in the step's first collective: every process must find
    ``world_size`` times its own values. A process that skipped ``step()`` (and cleared its
    gradients for the next batch), called it twice, or called ``state_dict()`` alone (which
    sends zeros in the same collective) is caught at once, on every process. The modulus keeps
    the sums exact in float32 for up to 4096 processes.
    """
    return float(step % SEQ_MOD + 1), float(zero_grads % SEQ_MOD)


def sequence_message(own: tuple[float, float], summed: list[float], world_size: int, rank: int) -> str:
    """The processes are out of step: this one's :func:`call_sequence`, and (two processes) the other's."""
    lines = [
        f"fop: the {world_size} processes are out of step: this process (rank {rank}) is at step() call "
        f"{int(own[0])} after {int(own[1])} zero_grad() calls (modulo {SEQ_MOD})"
    ]
    if world_size == 2:
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


def presence_message(
    counts: list[int], layer_names: Sequence[str], fallback_shapes: Sequence[tuple[int, ...]], world_size: int
) -> str:
    """Which layers (gradients, factor statistics) and fallback tensors only some processes had.

    ``counts``: per layer the processes with its gradient, then per layer those with its factor
    statistics, then per fallback tensor those with its gradient (the common all-reduce's presence).
    """
    n, n_layers = world_size, len(layer_names)
    lines = []
    for i, name in enumerate(layer_names):
        if counts[i] not in (0, n):
            lines.append(f"  {name}: gradients on {counts[i]} of {n} processes")
        if counts[n_layers + i] not in (0, n):
            lines.append(f"  {name}: factor statistics on {counts[n_layers + i]} of {n} processes")
    for j, shape in enumerate(fallback_shapes):
        if counts[2 * n_layers + j] not in (0, n):
            lines.append(f"  fallback parameter #{j} {shape}: gradients on {counts[2 * n_layers + j]} of {n} processes")
    return (
        "the processes did not all produce gradients for the same parameters this step "
        "(every process must run the same layers forward and backward before each step(), "
        "as with DDP's find_unused_parameters=False):\n" + "\n".join(lines)
    )


def same_call_message(what: str, rank: int, world_size: int) -> str:
    """A checkpoint collective met a ``step()`` on another process."""
    return (
        f"fop: {what} is a collective and this process (rank {rank}) called it while "
        f"{'another process' if world_size == 2 else 'other processes'} called step(): "
        "call it on every process at the same point of the loop (and save rank 0's state)"
    )


# ================================================================================ the layout
def check_layout(params: Sequence[Tensor], laid_out: set[int], names: dict[int, str], optimizer_name: str) -> None:
    """Every parameter with a gradient has a place in the collectives (``laid_out``: their ids)."""
    for p in params:
        if id(p) not in laid_out:
            name = names.get(id(p), f"a parameter of shape {tuple(p.shape)}")
            raise DistributedConfigError(
                f"{name} was frozen (requires_grad=False) when the optimizer was built and now has a "
                f"gradient: distributed {optimizer_name} lays out its collectives at construction, "
                "for the parameters that train then. Build the optimizer after unfreezing (load the old "
                "one's state_dict() into it to keep its state)"
            )


def refuse_diagonal(layers: Sequence[KroneckerLayer]) -> None:
    """The layer specialists take no diagonal (Embedding) input factor (DDP's hook, replicated, does).

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


def raise_uncaptured(layers: Sequence[KroneckerLayer]) -> None:
    """A trained bias of a frozen weight has no place in the layout: name the module to exclude."""
    if layers:
        name = layers[0].name
        raise RuntimeError(
            f"{name}: its bias has a gradient but its weight has none (a frozen weight with a trained bias); "
            f"distributed training cannot reduce it: exclude the module (exclude=[{name!r}]) so that its "
            "parameters use the fallback rule"
        )
