"""Which of a model's modules the optimizer hooks, and the parameter groups it builds from them.

:func:`discover_layers` walks ``model.named_modules()`` once, at construction: supported modules
(:func:`fop.layers.supports`) become :class:`~fop.curvature.KroneckerLayer` objects, unless excluded
or sharing a parameter with another module (tied weights). The one sharing with curvature is an
``nn.Linear`` head tied to an ``nn.Embedding`` (GPT-2's ``lm_head`` / ``wte``): the pair becomes one
:class:`~fop.layers.TiedHeadLayer` named after the head. :func:`param_groups` puts their parameters
in the ``kronecker`` group and every other parameter in the fallback group. The constructor's
warnings about what was found live here too.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .arguments import AUTO_FALLBACK_LR
from .curvature import CaptureMode, KroneckerLayer
from .layers import LAYER_TYPES, is_tied_head, make_layers, make_tied_layer, supports, unsupported_reason

__all__ = ["ExcludeSpec", "SPARSE_MESSAGE", "check_model", "discover_layers", "param_groups", "warn_discovery"]

ExcludeSpec = Iterable[nn.Module | str | type]
SPARSE_MESSAGE = "{name} needs dense gradients: build nn.Embedding / nn.EmbeddingBag with sparse=False (the default)"


def discover_layers(
    model: nn.Module, exclude: ExcludeSpec, mode: CaptureMode, sequence_first: set[int]
) -> tuple[list[KroneckerLayer], dict[str, list[str]]]:
    """The Kronecker layers, and the supported layers left out because a parameter is shared.

    An output head tied to a token embedding (:func:`_tied_heads`) is one layer, hooking both modules;
    ``exclude`` of either module leaves both out of curvature, as any other shared parameter.
    """
    if isinstance(exclude, (str, nn.Module, type)):
        raise TypeError(f"exclude takes a list of modules, module names or module types: write exclude=[{exclude!r}]")
    exclude = list(exclude)
    excluded_modules: set[int] = set()
    excluded_names: set[str] = set()
    excluded_types: tuple[type, ...] = ()
    for item in exclude:
        if isinstance(item, nn.Module):
            excluded_modules.add(id(item))
        elif isinstance(item, str):
            excluded_names.add(item)
        elif isinstance(item, type):
            excluded_types += (item,)
        else:
            raise TypeError(f"exclude takes modules, module names or module types, got {item!r}")
    names = {name for name, _ in model.named_modules()}
    unknown = excluded_names - names
    if unknown:
        raise ValueError(f"exclude names not found in the model: {sorted(unknown)}")
    strangers = excluded_modules - {id(m) for m in model.modules()}
    if strangers:
        found = [item for item in exclude if id(item) in strangers]
        raise ValueError(f"exclude modules are not part of the model: {found}")
    # an excluded container (a block, a ModuleList, a name like "layer4") excludes what it contains
    for name, module in model.named_modules():
        if id(module) in excluded_modules or name in excluded_names:
            excluded_modules.update(id(m) for m in module.modules())
    owners: dict[int, dict[int, str]] = {}  # parameter -> {module: qualified name}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), {}).setdefault(id(module), f"{name}.{pname}" if name else pname)

    def excluded(module: nn.Module) -> bool:
        return id(module) in excluded_modules or isinstance(module, excluded_types)

    heads = _tied_heads(model, owners, excluded, sequence_first)
    embeddings = {id(embedding) for embedding in heads.values()}
    layers: list[KroneckerLayer] = []
    tied: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if not supports(module) or excluded(module) or id(module) in embeddings:  # a tied embedding: its head's layer
            continue
        name = name or type(module).__name__
        batch_dim = 1 if id(module) in sequence_first else 0
        if id(module) in heads:
            layers.append(make_tied_layer(name, module, heads[id(module)], mode, batch_dim))
            continue
        shared = [n for p in module.parameters(recurse=False) for m, n in owners[id(p)].items() if m != id(module)]
        if shared:
            tied[name] = shared
            continue
        layers += make_layers(name, module, mode, batch_dim)
    _warn_unsupported(model, exclude_ids=excluded_modules, exclude_names=excluded_names, exclude_types=excluded_types)
    return layers, tied


def _tied_heads(
    model: nn.Module,
    owners: dict[int, dict[int, str]],
    excluded: Callable[[nn.Module], bool],
    sequence_first: set[int],
) -> dict[int, nn.Module]:
    """``{id(head): embedding}``: the output heads tied to a token embedding that get one layer together.

    A plain ``nn.Linear`` whose weight is a dense ``nn.Embedding``'s table and no other module's, whose
    bias is its own, neither module excluded, both of one layout (:func:`fop.layers.is_tied_head`,
    :class:`fop.layers.TiedHeadLayer`). Any other sharing is left to the tied-weights warning.
    """
    modules = {id(module): module for module in model.modules()}
    heads: dict[int, nn.Module] = {}
    for head in modules.values():
        weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
        if not isinstance(weight, nn.Parameter) or excluded(head):
            continue
        users = [modules[m] for m in owners.get(id(weight), {}) if m != id(head)]
        if len(users) != 1 or not is_tied_head(head, users[0]) or excluded(users[0]):
            continue
        if isinstance(bias, nn.Parameter) and set(owners[id(bias)]) != {id(head)}:
            continue
        if (id(head) in sequence_first) != (id(users[0]) in sequence_first):
            continue
        heads[id(head)] = users[0]
    return heads


def _warn_unsupported(model: nn.Module, exclude_ids: set[int], exclude_names: set[str], exclude_types: tuple) -> None:
    """One warning naming the weight-bearing modules that fall back to the first-order rule, and why."""
    lines = []
    for name, module in model.named_modules():
        if id(module) in exclude_ids or name in exclude_names or isinstance(module, exclude_types):
            continue
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        reason = unsupported_reason(module)
        if reason is not None:
            lines.append(f"  {name or type(module).__name__} ({type(module).__name__}): {reason}")
    if lines:
        warnings.warn(
            "these modules get no Kronecker curvature; their parameters use the fallback rule "
            "(exclude=[...] them to silence this):\n" + "\n".join(lines),
            stacklevel=4,
        )


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    # frozen parameters too, as torch's optimizers given model.parameters(): skipped while their
    # grad is None, trained once unfrozen
    return list(model.parameters())


def warn_discovery(
    layers: Sequence[KroneckerLayer], undetermined: set[int], tied: dict[str, list[str]], fallback: str, name: str
) -> None:
    """The constructor's warnings about the layers found: none, undetermined Linear layouts, tied weights."""
    if not layers:
        warnings.warn(
            f"{name}: the model has no supported layer ({', '.join(kind.name for kind in reversed(LAYER_TYPES))}; "
            "docs/layers.md); "
            f"every parameter uses the '{fallback}' fallback rule",
            stacklevel=4,
        )
    unsure = [layer.name for layer in layers if id(layer.module) in undetermined]
    if unsure:
        warnings.warn(
            f"the model has sequence-first modules (batch_first=False), whose Linear layers are split along "
            f"dimension 1; the Linear and Embedding layers outside them ({', '.join(unsure)}) are taken as batch "
            "first. Pass batch_first=False if their inputs of 3 or more dimensions (Embedding: indices of 2 "
            "or more) are (seq, batch, ...) too, "
            "batch_first=True if they are (batch, seq, ...)",
            stacklevel=4,
        )
    if tied:
        warnings.warn(
            "parameters shared between modules (tied weights) get gradient from more than one forward, "
            "so a Kronecker factorisation of one module would be wrong: "
            + "; ".join(f"{layer} shares {', '.join(names)}" for layer, names in tied.items())
            + f". These layers use the '{fallback}' fallback rule{' (AdamW)' if fallback == 'auto' else ''} "
            "(one update per step for a shared "
            "parameter); pass exclude=[...] for them to silence this warning",
            stacklevel=4,
        )


def check_model(model: Any, name: str) -> None:
    """A module, without sparse gradients."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{name} takes the model (an nn.Module), not {type(model).__name__}: "
            f"it hooks the model's layers; write {name}(model, lr=...)"
        )
    sparse = [module_name for module_name, m in model.named_modules() if getattr(m, "sparse", False) is True]
    if sparse:
        raise ValueError(f"{SPARSE_MESSAGE.format(name=name)}; sparse=True in: {sparse}")


def param_groups(
    model: nn.Module,
    layers: Sequence[KroneckerLayer],
    fallback: str,
    lr: float | Tensor,
    fallback_lr: float | None,
) -> list[dict[str, Any]]:
    """The Kronecker group (the layers' parameters) and the fallback group (every other parameter).

    ``fallback="sgd"``: SGD at ``fallback_lr`` (default ``lr``); ``"adamw"``: AdamW at ``fallback_lr``
    (default 1e-3). ``"auto"``: two fallback groups, BatchNorm parameters by SGD at ``lr`` and every
    other one (layer norms, position tables, tied weights, bare parameters) by AdamW at
    ``fallback_lr`` (default :data:`~fop.arguments.AUTO_FALLBACK_LR`).
    """
    curvature_ids = {id(p) for layer in layers for p in layer.params()}
    rest = [p for p in _unique_params(model) if id(p) not in curvature_ids]
    groups: list[dict[str, Any]] = []
    if layers:
        groups.append({"params": [p for layer in layers for p in layer.params()], "rule": "kronecker"})
    if fallback == "auto":
        batch_norm = {id(p) for m in model.modules() if isinstance(m, _BatchNorm) for p in m.parameters(False)}
        sgd = [p for p in rest if id(p) in batch_norm]
        adamw = [p for p in rest if id(p) not in batch_norm]
        if sgd:
            groups.append({"params": sgd, "rule": "sgd", "lr": lr})
        if adamw:
            groups.append(
                {"params": adamw, "rule": "adamw", "lr": AUTO_FALLBACK_LR if fallback_lr is None else fallback_lr}
            )
    elif rest:
        default_lr = lr if fallback == "sgd" else 1e-3
        groups.append({"params": rest, "rule": fallback, "lr": default_lr if fallback_lr is None else fallback_lr})
    return groups
