"""fop.profiling: a step's named phases appear in torch.profiler, and cost nothing without it."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from fop import FOP
from fop.profiling import PHASES, phase


def test_a_phase_is_a_no_op_without_a_profiler() -> None:
    assert isinstance(phase("eigh"), contextlib.nullcontext)


def test_every_phase_of_a_step_is_named_in_the_profile() -> None:
    """Both damping modes together name every phase (eigh: exact damping, cholesky: factored)."""
    names: set[str] = set()
    for damping_mode in ("exact", "factored"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        optimizer = FOP(model, curvature_update_interval=1, inverse_update_interval=1, damping_mode=damping_mode)
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        names |= {event.key for event in prof.key_averages()}
    assert {f"fop::{name}" for name in PHASES} <= names
