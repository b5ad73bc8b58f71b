"""The baselines a user would pick instead of FOP or K-FAC (issue 20), each built by its own package.

- ``muon``: torch's own :class:`torch.optim.Muon` on the hidden layers' weight matrices, with
  :class:`torch.optim.AdamW` for everything else, stepped together as one :class:`OptimizerPair`;
- ``soap``, ``lamb``, ``lars``: ``pytorch-optimizer``'s ``SOAP``, ``Lamb`` and ``LARS``;
- ``sfadamw``: ``schedulefree``'s ``AdamWScheduleFree`` (its ``eval()`` around each evaluation).

The packages are the optional extra ``fop[baselines]``; asking for one that is not installed is a
:class:`~fop.bench.errors.BenchError` naming it. Their learning-rate rules and schedules are in
:mod:`fop.bench.optimizers` and ``docs/benchmark.md``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from fop.bench.errors import BenchError

__all__ = [
    "EXTRA",
    "OptimizerPair",
    "muon_split",
    "require",
    "require_muon",
]

EXTRA = "pip install 'fop[baselines]'"

# Muon: momentum and Nesterov as Keller Jordan's reference (torch's defaults); with Moonshot's
# "match_rms_adamw" adjustment the Muon group takes AdamW's learning rate and weight decay.
MUON_MOMENTUM = 0.95
MUON_ADJUST_LR = "match_rms_adamw"

_MATRIX_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_INPUT_MODULES = (*_MATRIX_MODULES, nn.Embedding, nn.EmbeddingBag)


def require(module: str, optimizer: str) -> Any:
    """Import ``module`` (a baseline's package) or raise a one-line error naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BenchError(f"optimizer {optimizer!r} needs the package {module!r}: {EXTRA}") from None


def require_muon() -> None:
    """torch's Muon exists from torch 2.9 on."""
    if not hasattr(torch.optim, "Muon"):
        raise BenchError(f"optimizer 'muon' is torch.optim.Muon, new in torch 2.9 (this is torch {torch.__version__})")


# ----------------------------------------------------------------------------------------------
# Muon


def muon_split(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the parameters Muon updates and of those AdamW updates, in ``named_parameters`` order.

    Muon takes the weight of every hidden ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (a convolution's
    weight as the matrix ``out × (in · kernel)``). AdamW takes the rest, as the Muon documentation
    recommends: the input layer (the first Linear, convolution or embedding in the model's module
    order: a stem convolution, a patch embedding, a token embedding), the output layer (the last
    Linear or convolution: the classifier), every embedding, bias, normalisation parameter and bare
    parameter (class token, position embedding). A weight shared with an AdamW module (a tied
    embedding) goes to AdamW.
    """
    candidates = [(name, module) for name, module in model.named_modules() if isinstance(module, _INPUT_MODULES)]
    matrices = [(name, module) for name, module in candidates if isinstance(module, _MATRIX_MODULES)]
    edges = {candidates[0][0], matrices[-1][0]} if matrices else set()
    hidden = {
        id(module.weight)
        for name, module in matrices
        if name not in edges and isinstance(module.weight, nn.Parameter) and module.weight.requires_grad
    }
    # a hidden weight also used by an AdamW module (tied) stays with AdamW
    for name, module in candidates:
        if name in edges or not isinstance(module, _MATRIX_MODULES):
            hidden.discard(id(getattr(module, "weight", None)))
    muon: list[str] = []
    adamw: list[str] = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (muon if id(parameter) in hidden else adamw).append(name)
    return muon, adamw


class _AsMatrix(nn.Module):
    """Parametrization storing a convolution's weight as the 2-D matrix ``out × (in · kernel)``."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.shape = tuple(weight.shape)
        # a channels_last kernel (fop-bench's CUDA runs) stays channels_last for the convolution
        self.channels_last = weight.ndim == 4 and weight.is_contiguous(memory_format=torch.channels_last)

    def forward(self, matrix: Tensor) -> Tensor:
        kernel = matrix.view(self.shape)
        return kernel.contiguous(memory_format=torch.channels_last) if self.channels_last else kernel

    def right_inverse(self, weight: Tensor) -> Tensor:
        return weight.reshape(weight.shape[0], -1)


def _muon_matrices(model: nn.Module, names: list[str]) -> list[nn.Parameter]:
    """The parameters named ``names`` as 2-D matrices: a convolution's weight is re-registered as a
    parametrization whose stored tensor is its ``out × (in · kernel)`` matrix (torch's Muon takes
    2-D parameters only), which the forward views back as the kernel (a copy only to keep a
    channels_last kernel channels_last)."""
    modules = dict(model.named_modules())
    matrices = []
    for name in names:
        owner, _, attribute = name.rpartition(".")
        module = modules[owner]
        weight = getattr(module, attribute)
        if weight.ndim != 2:
            parametrize.register_parametrization(module, attribute, _AsMatrix(weight))
            weight = module.parametrizations[attribute].original
        matrices.append(weight)
    return matrices


def build_muon(model: nn.Module, lr: float, weight_decay: float) -> OptimizerPair:
    """torch's Muon on the hidden weight matrices and AdamW on the rest (:func:`muon_split`), one
    learning rate and weight decay for both (Muon's ``match_rms_adamw`` adjustment)."""
    muon_names, adamw_names = muon_split(model)
    if not muon_names:
        raise BenchError("optimizer 'muon': the model has no hidden Linear or convolution weight for Muon")
    parameters = dict(model.named_parameters())
    adamw_parameters = [parameters[name] for name in adamw_names]
    muon = torch.optim.Muon(
        _muon_matrices(model, muon_names),
        lr=lr,
        weight_decay=weight_decay,
        momentum=MUON_MOMENTUM,
        nesterov=True,
        adjust_lr_fn=MUON_ADJUST_LR,
    )
    adamw = torch.optim.AdamW(adamw_parameters, lr=lr, weight_decay=weight_decay)
    return OptimizerPair(muon, adamw)


class OptimizerPair(torch.optim.Optimizer):
    """Several optimizers, each over its own parameters, stepped as one optimizer.

    ``param_groups`` are the inner optimizers' own group dictionaries, so a learning-rate scheduler
    (or ``zero_grad``) acting on this object acts on all of them; ``step()`` steps each in turn;
    ``state_dict()`` holds each one's state.
    """

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        if not optimizers:
            raise ValueError("OptimizerPair needs at least one optimizer")
        params = [p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]
        super().__init__(params, {})
        self.optimizers = optimizers
        self.param_groups = [group for optimizer in optimizers for group in optimizer.param_groups]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for optimizer, state in zip(self.optimizers, state_dict["optimizers"], strict=True):
            optimizer.load_state_dict(state)

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter(self.optimizers)


# ----------------------------------------------------------------------------------------------
# The packages' optimizers


def build_soap(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """SOAP (Vyas et al., 2024) with its authors' defaults (betas 0.95/0.95, eigenbasis every 10 steps)."""
    pytorch_optimizer = require("pytorch_optimizer", "soap")
    return pytorch_optimizer.SOAP(model.parameters(), lr=lr, weight_decay=weight_decay)


def build_lamb(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """LAMB (You et al., 2020), Algorithm 2: betas 0.9/0.999, eps 1e-6, the weight decay inside the
    layer-wise trust ratio (not decoupled)."""
    pytorch_optimizer = require("pytorch_optimizer", "lamb")
    return pytorch_optimizer.Lamb(model.parameters(), lr=lr, weight_decay=weight_decay, weight_decouple=False)


def build_lars(model: nn.Module, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    """LARS (You et al., 2017): trust coefficient 1e-3, momentum; biases and normalisation
    parameters (vectors) take plain momentum SGD without the trust ratio or weight decay."""
    pytorch_optimizer = require("pytorch_optimizer", "lars")
    return pytorch_optimizer.LARS(model.parameters(), lr=lr, weight_decay=weight_decay, momentum=momentum)


def build_sfadamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Schedule-Free AdamW (Defazio et al., 2024) with its defaults, put in training mode."""
    schedulefree = require("schedulefree", "sfadamw")
    optimizer = schedulefree.AdamWScheduleFree(model.parameters(), lr=lr, weight_decay=weight_decay)
    optimizer.train()  # the package starts in evaluation mode
    return optimizer
