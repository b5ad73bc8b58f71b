"""fop.first_order: the momentum and AdamW rules against torch.optim, and the skipped-step mask."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from fop.first_order import adamw_update, masked_copy_, sgd_update

DTYPE = torch.float64


def _params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, generator=gen, dtype=DTYPE), torch.randn(5, generator=gen, dtype=DTYPE)]


def _grads(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(3, 4, generator=gen, dtype=DTYPE), torch.randn(5, generator=gen, dtype=DTYPE)]


def _three_steps_like(reference: type, hyper: dict, update: Callable[..., Any], state: list) -> None:
    """Three steps of ``update`` (with its ``state``) and of ``reference`` on the same gradients: same parameters."""
    mine = _params()
    theirs = [p.clone().requires_grad_() for p in mine]
    optimizer = reference(theirs, **hyper)
    for step in range(3):
        grads = _grads(step)
        state[:] = update(mine, grads, state) or state
        for p, g in zip(theirs, grads):
            p.grad = g
        optimizer.step()
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_update_is_torch_sgd(nesterov: bool) -> None:
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=nesterov)
    _three_steps_like(torch.optim.SGD, hyper, lambda p, g, buffers: sgd_update(p, g, buffers, **hyper), [None, None])


def test_adamw_update_is_torch_adamw() -> None:
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=1e-2)
    _three_steps_like(torch.optim.AdamW, hyper, lambda p, g, states: adamw_update(p, g, states, **hyper), [{}, {}])


def test_a_skipped_step_changes_no_parameter_and_no_state() -> None:
    params = _params()
    before = [p.clone() for p in params]
    bad = torch.zeros((), dtype=torch.bool)
    buffers = sgd_update(
        params, _grads(0), [None, None], lr=0.1, momentum=0.9, weight_decay=0.0, nesterov=False, ok=bad
    )
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert all(buf is not None and not buf.any() for buf in buffers)  # a zero buffer, as if never started
    states: list[dict] = [{}, {}]
    adamw_update(params, _grads(0), states, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, ok=bad)
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert all(float(state["step"]) == 0 and not state["exp_avg"].any() for state in states)


def test_masked_copy_keeps_nan_out() -> None:
    dst = torch.ones(3)
    masked_copy_(dst, torch.full((3,), float("nan")), torch.zeros((), dtype=torch.bool))
    assert torch.equal(dst, torch.ones(3))
    masked_copy_(dst, torch.zeros(3), torch.ones((), dtype=torch.bool))
    assert torch.equal(dst, torch.zeros(3))
    masked_copy_(dst, torch.full((3,), 2.0), None)
    assert torch.equal(dst, torch.full((3,), 2.0))


@pytest.mark.parametrize("nesterov", [False, True])
def test_a_skipped_step_with_nan_directions_changes_nothing(nesterov: bool) -> None:
    """The multi-tensor update folds ``ok`` into its arithmetic: NaN directions of a skipped step must not leak."""
    params = _params()
    buffers = sgd_update(params, _grads(0), [None, None], lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=nesterov)
    before = [p.clone() for p in params]
    kept = [buf.clone() for buf in buffers if buf is not None]
    nan = [torch.full_like(p, float("nan")) for p in params]
    bad = torch.zeros((), dtype=torch.bool)
    after = sgd_update(params, nan, buffers, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=nesterov, ok=bad)
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert all(buf is not None and torch.equal(buf, k) for buf, k in zip(after, kept))
    good = torch.ones((), dtype=torch.bool)  # and a good step with ok given equals one without it
    twin = [p.clone() for p in params]
    twin_buffers = [buf.clone() for buf in kept]
    sgd_update(params, _grads(1), after, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=nesterov, ok=good)
    sgd_update(twin, _grads(1), list(twin_buffers), lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=nesterov)
    for a, b in zip(params, twin):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=1e-15)
