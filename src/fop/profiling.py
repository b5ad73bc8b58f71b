"""Named phases of a FOP/K-FAC step, visible in ``torch.profiler`` traces.

The optimizer marks its work with :func:`phase` (``fop::capture``, ``fop::factors``, ``fop::eigh``
or, with factored damping, ``fop::cholesky``, ``fop::direction``, ``fop::update``); ``fop-bench --profile`` adds ``fop::forward_backward`` and
``fop::step`` and sums the profiler's time per phase. When no profiler is running a phase costs one
flag check.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import torch

__all__ = ["PHASES", "phase"]

PHASES = ("capture", "factors", "eigh", "cholesky", "direction", "update")
_NULL = contextlib.nullcontext()


def phase(name: str) -> AbstractContextManager[object]:
    """A ``record_function("fop::<name>")`` range while a profiler runs, else a no-op."""
    if torch._C._autograd._profiler_enabled():
        return torch.profiler.record_function(f"fop::{name}")
    return _NULL
