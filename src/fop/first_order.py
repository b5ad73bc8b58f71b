"""First-order update rules, as plain functions over lists of tensors.

They serve twice: :func:`sgd_update` applies momentum and weight decay to the preconditioned
directions of the Kronecker layers, and both rules update the *fallback* parameters (BatchNorm,
LayerNorm, embeddings, bare parameters, unsupported or excluded modules) on the averaged gradient.

Every function takes ``ok``, a 0-dim boolean tensor (or ``None`` for "always"): where it is False
nothing changes, neither parameters nor state, without a host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

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
    """SGD with momentum on given directions (``torch.optim.SGD``'s rule), on all tensors at once::

        u = d + wd·θ;   buf ← μ·buf + u (buf = u at first);   θ ← θ − lr·(u + μ·buf if nesterov else buf)

    ``buffers[i]`` is the momentum buffer of ``params[i]`` (``None`` before the first step); the
    updated list is returned. Multi-tensor (``torch._foreach_*``) as ``torch.optim.SGD``'s foreach path.
    A skipped step (``ok`` False) is folded into the arithmetic with ``s = ok`` as 0 or 1 and no host
    synchronisation: ``u = s·(d + wd·θ)`` (its ``d`` zeroed first, since it may be NaN),
    ``buf ← (s·μ + 1 − s)·buf + u`` and ``θ ← θ − s·lr·(...)``, which leave everything as it was.
    """
    if not params:
        return []
    params = list(params)
    u: list[Tensor] = [d.to(p.dtype) for d, p in zip(directions, params)]
    scale = None if ok is None else ok.to(params[0].dtype)  # 1 on a good step, 0 on a skipped one
    if scale is not None:
        u = [torch.where(ok, d, 0.0) for d in u]  # type: ignore[arg-type]
    if weight_decay != 0:
        if scale is None:
            u = list(torch._foreach_add(u, params, alpha=weight_decay))
        else:
            u = list(torch._foreach_add(u, list(torch._foreach_mul(params, scale * weight_decay))))
    new_buffers: list[Tensor | None] = list(buffers)
    if momentum != 0:
        existing = [i for i, buf in enumerate(buffers) if buf is not None]
        for i, buf in enumerate(buffers):
            if buf is None:
                new_buffers[i] = u[i].clone()
        if existing:
            kept = [cast(Tensor, buffers[i]) for i in existing]
            torch._foreach_mul_(kept, momentum if scale is None else scale * momentum + (1 - scale))
            torch._foreach_add_(kept, [u[i] for i in existing])
        started = cast(list[Tensor], new_buffers)
        u = list(torch._foreach_add(u, started, alpha=momentum)) if nesterov else list(started)
    rate = lr if scale is None else scale * lr
    torch._foreach_sub_(params, list(torch._foreach_mul(u, rate)))
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
