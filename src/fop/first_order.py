"""First-order update rules, as plain functions over lists of tensors.

They serve twice: :func:`sgd_update` applies momentum and weight decay to the preconditioned
directions of the Kronecker layers, and both rules update the *fallback* parameters (BatchNorm,
LayerNorm, embeddings, bare parameters, unsupported or excluded modules) on the averaged gradient.

Every function takes ``ok``, a 0-dim boolean tensor (or ``None`` for "always"): where it is False
nothing changes, neither parameters nor state, without a host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["sgd_update", "adamw_update", "masked_copy_"]


def masked_copy_(dst: Tensor, src: Tensor, ok: Tensor | None) -> None:
    """``dst ← src`` where ``ok``, else unchanged (NaN in ``src`` cannot leak through)."""
    if ok is None:
        dst.copy_(src)
    else:
        dst.copy_(torch.where(ok, src, dst))


def sgd_update(
    params: Sequence[Tensor],
    directions: Sequence[Tensor],
    buffers: list[Tensor | None],
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    ok: Tensor | None = None,
) -> list[Tensor | None]:
    """SGD with momentum on given directions (``torch.optim.SGD``'s rule)::

        u = d + wd·θ;   buf ← μ·buf + u (buf = u at first);   θ ← θ − lr·(u + μ·buf if nesterov else buf)

    ``buffers[i]`` is the momentum buffer of ``params[i]`` (``None`` before the first step); the
    updated list is returned.
    """
    new_buffers: list[Tensor | None] = []
    for param, direction, buf in zip(params, directions, buffers):
        u = direction.to(param.dtype)
        if weight_decay != 0:
            u = u.add(param, alpha=weight_decay)
        if momentum != 0:
            if buf is None:
                buf = torch.where(ok, u, 0.0) if ok is not None else u.clone()
            else:
                masked_copy_(buf, buf * momentum + u, ok)
            u = u.add(buf, alpha=momentum) if nesterov else buf
        _masked_sub_(param, u, lr, ok)
        new_buffers.append(buf)
    return new_buffers


def adamw_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[dict],
    *,
    lr: float | Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    ok: Tensor | None = None,
) -> None:
    """AdamW (decoupled weight decay, bias-corrected moments; ``torch.optim.AdamW``'s rule)::

        θ ← θ(1 − lr·wd);  m ← β1 m + (1−β1) g;  v ← β2 v + (1−β2) g²;  t ← t + 1
        θ ← θ − lr · (m / (1 − β1ᵗ)) / (√(v / (1 − β2ᵗ)) + ε)

    ``states[i]`` is the (mutable) state dict of ``params[i]``: ``step``, ``exp_avg``, ``exp_avg_sq``.
    """
    beta1, beta2 = betas
    for param, grad, state in zip(params, grads, states):
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        grad = grad.to(param.dtype)
        step = state["step"] + 1
        exp_avg = state["exp_avg"].lerp(grad, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"] * beta2 + (1 - beta2) * grad * grad
        t = step.to(torch.float64 if param.dtype == torch.float64 else torch.float32)
        bias1 = 1 - beta1**t
        bias2 = 1 - beta2**t
        update = (exp_avg / bias1) / ((exp_avg_sq / bias2).sqrt() + eps)
        if weight_decay != 0:
            update = update + weight_decay * param
        masked_copy_(state["step"], step, ok)
        masked_copy_(state["exp_avg"], exp_avg, ok)
        masked_copy_(state["exp_avg_sq"], exp_avg_sq, ok)
        _masked_sub_(param, update, lr, ok)


def _masked_sub_(param: Tensor, update: Tensor, lr: float | Tensor, ok: Tensor | None) -> None:
    """``θ ← θ − lr·u`` where ``ok``."""
    if ok is None:
        param.sub_(update * lr)
    else:
        param.sub_(torch.where(ok, update * lr, 0.0))
