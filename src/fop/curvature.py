"""Per-layer curvature capture: Kronecker factors and sub-batch gradients from module hooks.

One :class:`KroneckerLayer` wraps one supported module (``nn.Linear`` or ``nn.Conv2d``). During an
ordinary forward/backward pass its hooks record, for the pending optimizer step:

* the two sub-batch gradients: each forward batch is split into a first half (``ceil(n/2)``
  samples) and a second half, and the weight/bias gradient of each half is formed from the saved
  layer input and the output gradient (``g1``, ``g2``: mean-loss gradients of the halves);
* on curvature steps, the factor statistics ``Σ a aᵀ`` (layer inputs, bias folded in as a
  trailing column of ones; Conv2d: unfolded patches) and ``Σ δ δᵀ`` (output gradients).

Statistics are *pending* until :meth:`KroneckerLayer.collect` hands them to the optimizer, so a
skipped step (``GradScaler`` found inf, ``zero_grad()`` without ``step()``) leaves no trace.

Why the hooks sit on the output tensor (``output.register_hook``) and not on the module's full
backward hook: tensor hooks registered before an in-place operation (``ReLU(inplace=True)`` after
the layer) still receive the gradient w.r.t. the layer's own output, while module backward hooks
refuse in-place modifications of their outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import compute_dtype, inner

__all__ = [
    "CaptureMode", "KroneckerLayer", "LinearLayer", "Conv2dLayer", "LayerStats", "LayerWork", "make_layer", "supports",
]  # fmt: skip

# Large convolutions unfold their patches in chunks of this many samples to bound memory.
_UNFOLD_CHUNK = 256


@dataclass
class CaptureMode:
    """What the hooks record during the current forward/backward cycle (set by the optimizer)."""

    halves: bool = True  # FOP: record the two sub-batch gradients
    factors: bool = True  # a curvature step: record the factor statistics
    total: bool = False  # record the hook-side total gradient (for the loss-scale ratio)


@dataclass
class LayerStats:
    """What one layer captured over a cycle (one or more backward passes), in compute dtype.

    ``g1``/``g2`` are the sub-batch gradients and ``total`` the whole-batch gradient as the hooks
    saw it, all folded ``(out, in + 1)`` (bias column last) and in the units of the loss that was
    back-propagated (so still multiplied by a ``GradScaler`` scale, if any). ``a`` is
    ``Σ a aᵀ / rows`` and ``gg`` is ``Σ δ δᵀ · samples`` (δ the per-row output gradients of the
    back-propagated loss, i.e. ``1/n`` times the per-sample gradients of a mean loss).
    """

    g1: Tensor | None = None
    g2: Tensor | None = None
    total: Tensor | None = None
    a: Tensor | None = None
    gg: Tensor | None = None
    single_sample: bool = False  # some forward had one sample: the halves are not available


@dataclass
class LayerWork:
    """One layer's inputs to a step, in the units of ``p.grad`` (compute dtype, folded).

    ``grad`` is the averaged gradient, ``g1``/``g2`` the sub-batch gradients (None for K-FAC or
    when a batch could not be split), ``a``/``g`` this step's factor estimates (None when the step
    captured no curvature). ``direction`` is filled in by the layer's owner.
    """

    layer: KroneckerLayer
    grad: Tensor
    g1: Tensor | None = None
    g2: Tensor | None = None
    a: Tensor | None = None
    g: Tensor | None = None
    direction: Tensor | None = None

    @classmethod
    def from_capture(cls, layer: KroneckerLayer, halves: bool) -> LayerWork:
        """Collect the layer's captured statistics and rescale them to ``p.grad``'s loss.

        The hooks see the back-propagated loss, ``p.grad`` the gradient handed to the step
        (unscaled by ``GradScaler``, possibly clipped): ``p.grad = r·C`` with ``C`` the hooks'
        total, ``r = ⟨p.grad, C⟩/⟨C, C⟩``. Sub-batch gradients are scaled by ``r``, the
        output-gradient factor by ``r²``, so all refer to the loss whose gradient is ``p.grad``.
        """
        grad = layer.folded_param_grad()
        assert grad is not None
        stats = layer.collect()
        work = cls(layer, grad)
        if stats.total is None:
            return work
        cc = inner(stats.total, stats.total)
        ratio = torch.where(cc > 0, inner(grad, stats.total) / torch.where(cc > 0, cc, torch.ones_like(cc)), 1.0)
        if halves and stats.g1 is not None and stats.g2 is not None and not stats.single_sample:
            work.g1, work.g2 = stats.g1 * ratio, stats.g2 * ratio
        if stats.a is not None and stats.gg is not None:
            work.a, work.g = stats.a, stats.gg * (ratio * ratio)
        return work


@dataclass
class _Pending:
    g1: Tensor | None = None
    g2: Tensor | None = None
    total: Tensor | None = None
    a_sum: Tensor | None = None
    a_rows: int = 0
    gg_sum: Tensor | None = None
    samples: int = 0
    backward_calls: int = 0
    single_sample: bool = False
    open_forwards: list = field(default_factory=list)


def _add(acc: Tensor | None, value: Tensor) -> Tensor:
    return value if acc is None else acc.add_(value)


class KroneckerLayer:
    """Curvature capture for one module; subclasses know the layer type's algebra.

    The folded weight matrix is ``W_f = [W.reshape(out, -1) | b]`` of shape ``(out, in_f)`` with
    ``in_f = in + 1`` when the module has a bias.
    """

    def __init__(self, name: str, module: nn.Module, mode: CaptureMode) -> None:
        self.name = name
        self.module = module
        self.mode = mode
        self.weight: nn.Parameter = module.weight  # type: ignore[assignment]
        self.bias: nn.Parameter | None = module.bias  # type: ignore[assignment]
        self.out_features = self.weight.shape[0]
        self.in_features = self.weight[0].numel() + (1 if self.bias is not None else 0)
        self.last: dict[str, Tensor] = {}  # diagnostics of the last step
        self._pending = _Pending()
        self._handles: list = []

    # ----------------------------------------------------------------------------- hooks
    def attach(self) -> None:
        self._handles.append(self.module.register_forward_hook(self._forward_hook))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        """Drop everything captured since the last step."""
        self._pending = _Pending()

    def _forward_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not (module.training and torch.is_grad_enabled() and self.weight.requires_grad):
            return
        if not (isinstance(output, Tensor) and output.requires_grad):
            return
        if self.weight.grad is None and self._pending.backward_calls > 0:
            # gradients were cleared (model.zero_grad, a step skipped by GradScaler):
            # what is pending belongs to a cycle that will never be stepped
            self.reset()
        x = args[0].detach()
        mode = CaptureMode(self.mode.halves, self.mode.factors, self.mode.total)
        if mode.factors:
            self._accumulate_input_factor(x)
        output.register_hook(lambda grad_out: self._backward_hook(x, grad_out, mode))

    def _backward_hook(self, x: Tensor, grad_out: Tensor, mode: CaptureMode) -> None:
        pending = self._pending
        pending.backward_calls += 1
        n = x.shape[0] if x.dim() > self._unbatched_dims else 1
        dtype = compute_dtype(self.weight.dtype)
        grad_out = grad_out.detach()
        if mode.factors:
            rows = self._output_rows(grad_out).to(dtype)
            pending.gg_sum = _add(pending.gg_sum, rows.T @ rows)
            pending.samples += n
        if mode.halves and n >= 2:
            n1 = (n + 1) // 2
            c1 = self._folded_grad(x[:n1], grad_out[:n1]).to(dtype)
            c2 = self._folded_grad(x[n1:], grad_out[n1:]).to(dtype)
            pending.g1 = _add(pending.g1, c1 * (n / n1))
            pending.g2 = _add(pending.g2, c2 * (n / (n - n1)))
            pending.total = _add(pending.total, c1 + c2)
        else:
            if mode.halves:
                pending.single_sample = True
            if mode.total or mode.halves:
                pending.total = _add(pending.total, self._folded_grad(x, grad_out).to(dtype))

    def _accumulate_input_factor(self, x: Tensor) -> None:
        a_sum, rows = self._input_second_moment(x)
        self._pending.a_sum = _add(self._pending.a_sum, a_sum)
        self._pending.a_rows += rows

    # ----------------------------------------------------------------------------- readout
    def captured(self) -> bool:
        """Whether a backward pass went through the hooks since the last step."""
        return self._pending.backward_calls > 0

    def collect(self) -> LayerStats:
        """The cycle's statistics (normalised), then reset for the next cycle."""
        p = self._pending
        stats = LayerStats(g1=p.g1, g2=p.g2, total=p.total, single_sample=p.single_sample)
        if p.a_sum is not None and p.gg_sum is not None and p.a_rows > 0:
            stats.a = p.a_sum / p.a_rows
            stats.gg = p.gg_sum * p.samples
        self.reset()
        return stats

    def params(self) -> list[nn.Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def folded_param_grad(self) -> Tensor | None:
        """``[∂W | ∂b]`` from the parameters' ``.grad`` in compute dtype, or None if no grad."""
        if self.weight.grad is None:
            return None
        dtype = compute_dtype(self.weight.dtype)
        w = self.weight.grad.reshape(self.out_features, -1).to(dtype)
        if self.bias is None:
            return w
        b = self.bias.grad
        b = torch.zeros(self.out_features, dtype=dtype, device=w.device) if b is None else b.to(dtype)
        return torch.cat([w, b[:, None]], dim=1)

    def unfold_direction(self, direction: Tensor) -> list[Tensor]:
        """Split a folded ``(out, in_f)`` direction into per-parameter tensors (weight, bias)."""
        if self.bias is None:
            return [direction.reshape(self.weight.shape)]
        return [direction[:, :-1].reshape(self.weight.shape), direction[:, -1].contiguous()]

    # ----------------------------------------------------------------------------- per type
    _unbatched_dims = 1

    def _input_rows(self, x: Tensor) -> tuple[Tensor, int]:
        raise NotImplementedError

    def _input_second_moment(self, x: Tensor) -> tuple[Tensor, int]:
        """``(Σ_rows a aᵀ, rows)`` with the bias column of ones folded in."""
        raise NotImplementedError

    def _output_rows(self, grad_out: Tensor) -> Tensor:
        """Per-row output gradients, ``(rows, out)``."""
        raise NotImplementedError

    def _folded_grad(self, x: Tensor, grad_out: Tensor) -> Tensor:
        """``[∂W | ∂b]`` contributed by these samples, ``(out, in_f)``."""
        raise NotImplementedError


def _fold_bias_moment(rows: Tensor, with_bias: bool) -> Tensor:
    """``Σ a aᵀ`` over rows, with a trailing all-ones column appended to ``a`` when biased."""
    core = rows.T @ rows
    if not with_bias:
        return core
    col = rows.sum(0)
    count = rows.new_full((1,), float(rows.shape[0]))  # no host-to-device copy
    top = torch.cat([core, col[:, None]], dim=1)
    bottom = torch.cat([col, count])[None, :]
    return torch.cat([top, bottom], dim=0)


class LinearLayer(KroneckerLayer):
    """``nn.Linear`` on inputs ``(batch, *, in)``: every leading position is a row of the factors."""

    def _input_second_moment(self, x: Tensor) -> tuple[Tensor, int]:
        rows = x.reshape(-1, x.shape[-1]).to(compute_dtype(self.weight.dtype))
        return _fold_bias_moment(rows, self.bias is not None), rows.shape[0]

    def _output_rows(self, grad_out: Tensor) -> Tensor:
        return grad_out.reshape(-1, grad_out.shape[-1])

    def _folded_grad(self, x: Tensor, grad_out: Tensor) -> Tensor:
        a = x.reshape(-1, x.shape[-1])
        g = grad_out.reshape(-1, grad_out.shape[-1])
        w = g.T @ a
        if self.bias is None:
            return w
        return torch.cat([w, g.sum(0)[:, None].to(w.dtype)], dim=1)


class Conv2dLayer(KroneckerLayer):
    """``nn.Conv2d`` with ``groups=1``: rows are the (sample, output position) patches.

    The input factor uses the unfolded patches (exact ``Σ a aᵀ``, unfolded in chunks of samples);
    the sub-batch gradients use ``torch.nn.grad.conv2d_weight`` (no unfolding). Non-zero padding
    modes and string paddings are applied to the input explicitly, so both see the padded input.
    """

    _unbatched_dims = 3

    def __init__(self, name: str, module: nn.Conv2d, mode: CaptureMode) -> None:
        super().__init__(name, module, mode)
        self.kernel_size = module.kernel_size
        self.stride = module.stride
        self.dilation = module.dilation
        self._explicit_pad: list[int] | None = None
        self._pad_mode = module.padding_mode if module.padding_mode != "zeros" else "constant"
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            self._explicit_pad = _explicit_padding(module)
            self.padding: tuple[int, int] = (0, 0)
        else:
            self.padding = module.padding  # type: ignore[assignment]

    def _padded(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if self._explicit_pad is None:
            return x
        return F.pad(x, self._explicit_pad, mode=self._pad_mode)

    def _input_second_moment(self, x: Tensor) -> tuple[Tensor, int]:
        x = self._padded(x)
        dtype = compute_dtype(self.weight.dtype)
        total: Tensor | None = None
        count = 0
        for chunk in x.split(_UNFOLD_CHUNK):
            patches = F.unfold(chunk, self.kernel_size, self.dilation, self.padding, self.stride)
            rows = patches.transpose(1, 2).reshape(-1, patches.shape[1]).to(dtype)
            total = _add(total, _fold_bias_moment(rows, self.bias is not None))
            count += rows.shape[0]
        assert total is not None
        return total, count

    def _output_rows(self, grad_out: Tensor) -> Tensor:
        if grad_out.dim() == 3:
            grad_out = grad_out.unsqueeze(0)
        return grad_out.permute(0, 2, 3, 1).reshape(-1, grad_out.shape[1])

    def _folded_grad(self, x: Tensor, grad_out: Tensor) -> Tensor:
        x = self._padded(x)
        if grad_out.dim() == 3:
            grad_out = grad_out.unsqueeze(0)
        grad_out = grad_out.to(x.dtype)
        w = torch.nn.grad.conv2d_weight(
            x, self.weight.shape, grad_out, self.stride, self.padding, self.dilation, 1
        ).reshape(self.out_features, -1)
        if self.bias is None:
            return w
        return torch.cat([w, grad_out.sum((0, 2, 3))[:, None].to(w.dtype)], dim=1)


def _explicit_padding(module: nn.Conv2d) -> list[int]:
    """``F.pad`` amounts (left, right, top, bottom) equivalent to the module's own padding."""
    if module.padding == "valid":
        return [0, 0, 0, 0]
    if module.padding == "same":
        pad: list[int] = []
        for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
            total = d * (k - 1)
            pad += [total // 2, total - total // 2]
        return pad
    return list(module._reversed_padding_repeated_twice)


def supports(module: nn.Module) -> bool:
    """Whether ``module`` gets Kronecker curvature (else its parameters use the fallback rule)."""
    if type(module) is nn.Linear or (isinstance(module, nn.Linear) and _is_plain_linear(module)):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1


def _is_plain_linear(module: nn.Linear) -> bool:
    # subclasses that keep Linear's forward (e.g. NonDynamicallyQuantizableLinear) are fine;
    # ones that override forward may not pass their weight through the input we capture
    return type(module).forward is nn.Linear.forward


_LAYER_TYPES: dict[type, Callable[..., KroneckerLayer]] = {nn.Linear: LinearLayer, nn.Conv2d: Conv2dLayer}


def make_layer(name: str, module: nn.Module, mode: CaptureMode) -> KroneckerLayer:
    """The :class:`KroneckerLayer` for a supported module."""
    for base, cls in _LAYER_TYPES.items():
        if isinstance(module, base):
            return cls(name, module, mode)
    raise TypeError(f"{type(module).__name__} has no Kronecker curvature; supported: Linear, Conv2d")


