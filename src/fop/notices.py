"""The warnings a step can raise: their texts, and a once-per-cause filter that points at the user's line.

The optimizer decides *when* something is wrong; this module says *what to tell the user* and makes
sure each cause is told once. Every message names what happened, its consequence for the step, and what
to change.
"""

from __future__ import annotations

import os
import sys
import types
import warnings

import torch


class OnceWarner:
    """Issues each warning once per key (a layer name, or a cause such as ``"skipped"``)."""

    def __init__(self) -> None:
        self._keys: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def warn(self, key: str, message: str) -> None:
        if key not in self._keys:
            self._keys.add(key)
            warnings.warn(message, stacklevel=caller_level())


def caller_level() -> int:
    """``stacklevel`` of the first frame outside fop and torch (step() is wrapped by torch twice)."""
    inside = (os.path.dirname(__file__), os.path.dirname(torch.__file__))
    frame: types.FrameType | None = sys._getframe(2)  # the caller of warnings.warn's caller
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


CYCLED_BETAS = (
    "a scheduler cycles 'momentum' (OneCycleLR/CyclicLR with cycle_momentum=True): it applies to "
    "the Kronecker and SGD groups; the AdamW fallback group keeps its betas (torch's schedulers "
    "cycle one of the two for a whole optimizer)"
)


def skipped_steps(optimizer: str, skipped: int, steps: int, overflow: bool) -> str:
    """Steps skipped for non-finite gradients; ``overflow``: every entry finite, only the norm overflowed."""
    if overflow:
        reason = (
            "the gradients are finite but so large that their norm overflows float32 (entries above "
            "about 1e19): lower the learning rate or the loss scale, or clip the gradients "
            "(torch.nn.utils.clip_grad_norm_)"
        )
    else:
        reason = "the gradients contained NaN or Inf (check the loss, the inputs and the learning rate)"
    return (
        f"{optimizer}: {skipped} of the first {steps} steps were skipped, changing no parameter and "
        f"no state: {reason}. optimizer.skipped_steps counts them"
    )


def uncaptured(layer: str) -> str:
    """A layer with gradients and no statistics: every cause the optimizer cannot tell apart, named."""
    return (
        f"{layer}: its parameters have gradients that no backward through the module's forward made "
        "since the last zero_grad() or step(): either no backward reached it (step() called again, or the "
        "gradients zeroed by zero_grad(set_to_none=False) and not recomputed), or its weight is used outside "
        "the module (e.g. F.linear(x, module.weight)); they get the first-order rule this step"
    )


def foreign_gradient(layer: str, share: float) -> str:
    """``share`` of a layer's gradient did not come from its module's forward: it leaves curvature for good."""
    return (
        f"{layer}: {share:.1%} of its parameters' gradient does not come from the module's own "
        "forward (the weight is tied to another module's, or also used outside the module, e.g. "
        f"F.linear(h, {layer}.weight.T), or p.grad was edited per element or per tensor, e.g. "
        "clip_grad_value_), so its sub-batch gradients and Kronecker factors would be wrong; it gets "
        f"the first-order rule on p.grad from now on. Pass exclude=[{layer!r}] to say so explicitly"
    )


def single_sample(layer: str) -> str:
    """FOP on a forward batch of one sample: no halves, so the layer's step is K-FAC's."""
    return (
        f"{layer}: a forward batch of one sample cannot be split in two halves; "
        "this step is a K-FAC step (beta = 0, eta = 1) for the layer"
    )
