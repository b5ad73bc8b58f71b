"""Which modules get Kronecker curvature, and the layer types beyond ``nn.Linear`` / ``nn.Conv2d``.

* ``nn.Conv1d`` / ``nn.Conv3d`` (``groups=1``): :class:`ConvNdLayer`, the algebra of
  :class:`fop.curvature.Conv2dLayer` over any number of spatial dims.
* ``nn.MultiheadAttention``: :class:`AttentionProjectionLayer` for its in-projection(s); the module
  is converted in place to :class:`fop.nn.MultiheadAttention` so the projections run where the
  hooks see them, and ``out_proj`` is an ordinary ``nn.Linear`` layer.
* GPT-2's ``Conv1D`` (``transformers.pytorch_utils.Conv1D``: weight ``(in, out)``, ``y = x W + b``),
  recognised by its structure: :class:`TransposedLinearLayer`.
* ``nn.Embedding`` (dense gradients, ``scale_grad_by_freq=False``): :class:`EmbeddingLayer`, a
  Linear on one-hot inputs whose input factor is diagonal (token frequencies).

:func:`supports` and :func:`make_layers` are what the optimizer asks; :func:`unsupported_reason`
names the weight-bearing modules that fall back to the first-order rule, for its warning.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv1d_weight, conv2d_weight, conv3d_weight

from . import curvature
from .curvature import CaptureMode, Conv2dLayer, KroneckerLayer, LinearLayer, _add, _fold_bias_moment
from .functional import compute_dtype
from .nn import MultiheadAttention as CapturedAttention
from .nn import register_projection_hook

__all__ = [
    "AttentionProjectionLayer",
    "ConvNdLayer",
    "EmbeddingLayer",
    "SequenceFirstEmbeddingLayer",
    "SequenceFirstLinearLayer",
    "TransposedLinearLayer",
    "linear_layouts",
    "make_layers",
    "supports",
    "unsupported_reason",
]

_WEIGHT_GRAD = {1: conv1d_weight, 2: conv2d_weight, 3: conv3d_weight}


class ConvNdLayer(Conv2dLayer):
    """``nn.Conv1d`` / ``nn.Conv3d`` with ``groups=1``: rows are the (sample, output position) patches.

    Patches come from the window view :meth:`~fop.curvature.Conv2dLayer.patch_windows`, arranged as
    ``(C, k_1, …, k_d)`` like the weight; the sub-batch gradients from ``torch.nn.grad.conv{1,3}d_weight``.
    K-FAC-reduce's mean patches are Conv2dLayer's, which serve any number of spatial dims.
    """

    def __init__(self, name: str, module: nn.Module, mode: CaptureMode) -> None:
        super().__init__(name, module, mode)
        self.spatial = module.weight.dim() - 2
        self._unbatched_dims = self.spatial + 1
        if self._explicit_pad is not None:
            self.padding = (0,) * self.spatial  # type: ignore[assignment]

    def _padded(self, x: Tensor) -> Tensor:
        if x.dim() == self.spatial + 1:
            x = x.unsqueeze(0)
        if self._explicit_pad is None:
            return x
        return F.pad(x, self._explicit_pad, mode=self._pad_mode)

    def _patch_rows(self, x: Tensor) -> Tensor:
        """``(samples · positions, C · Π k)`` receptive fields of the padded input ``x``."""
        x = self.patch_windows(x)
        order = (0, *range(2, 2 + self.spatial), 1, *range(2 + self.spatial, 2 + 2 * self.spatial))
        return x.permute(order).reshape(-1, x.shape[1] * math.prod(self.kernel_size))

    def _input_second_moment(self, x: Tensor) -> tuple[Tensor, int]:
        x = self._padded(x)
        dtype = compute_dtype(self.weight.dtype)
        total: Tensor | None = None
        count = 0
        for chunk in self.unfold_chunks(x):
            rows = self._patch_rows(chunk)
            total = _add(total, _fold_bias_moment(rows, self.bias is not None, dtype))
            count += rows.shape[0]
        assert total is not None
        return total, count

    def _output_rows(self, grad_out: Tensor) -> Tensor:
        if grad_out.dim() == self.spatial + 1:
            grad_out = grad_out.unsqueeze(0)
        return grad_out.movedim(1, -1).reshape(-1, grad_out.shape[1])

    def _folded_grad(self, x: Tensor, grad_out: Tensor) -> Tensor:
        x = self._padded(x)
        if grad_out.dim() == self.spatial + 1:
            grad_out = grad_out.unsqueeze(0)
        grad_out = grad_out.to(x.dtype)
        weight_grad = _WEIGHT_GRAD[self.spatial]
        w = weight_grad(x, self.weight.shape, grad_out, self.stride, self.padding, self.dilation, 1)
        w = w.reshape(self.out_features, -1)
        if self.bias is None:
            return w
        return torch.cat([w, grad_out.sum((0, *range(2, grad_out.dim())))[:, None].to(w.dtype)], dim=1)


class TransposedLinearLayer(LinearLayer):
    """GPT-2's ``Conv1D``: ``y = x W + b`` with ``W`` of shape ``(in, out)``, i.e. a Linear with ``Wᵀ``.

    The folded matrix is ``[Wᵀ | b]``, so factors and directions are those of the equivalent
    ``nn.Linear``; only the conversion to and from the parameter's layout transposes.
    """

    def __init__(self, name: str, module: nn.Module, mode: CaptureMode, weight: nn.Parameter | None = None) -> None:
        super().__init__(name, module, mode, weight=weight)  # weight given: no bias (EmbeddingLayer)
        self.out_features = self.weight.shape[1]
        self.in_features = self.weight.shape[0] + (1 if self.bias is not None else 0)

    def as_matrix(self, weight_like: Tensor) -> Tensor:
        return weight_like.T

    def from_matrix(self, matrix: Tensor) -> Tensor:
        return matrix.T.contiguous()


class EmbeddingLayer(TransposedLinearLayer):
    """``nn.Embedding``: ``y = W[x]`` is the Linear ``y = Wᵀ e_x`` on the one-hot input ``e_x`` (no bias).

    The folded matrix is ``Wᵀ`` (embedding_dim, num_embeddings). Over the ``R`` looked-up positions
    ``r`` (every index of every sample) the factors are

        A = (1/R) Σ_r e_{x_r} e_{x_r}ᵀ = diag(c) / R        (c_v: how often token v occurs)
        G = as for Linear, from the output gradients δ_r of every position

    (the diagonal input factor of K-FAC for embeddings, as in TF-KFAC's ``EmbeddingInputKroneckerFactor``,
    ASDL and kfac-jax). ``A`` is kept as its diagonal ``c / R``, so the damped inverse is elementwise in
    the vocabulary: ``M⁻¹X = Q_G [(Q_Gᵀ X) / (g cᵀ/R + λ)]``, no ``vocab × vocab`` matrix and no
    ``eigh`` of one. FOP's halves are those of the batch, as for any layer:
    ``g_h = Σ_{r ∈ half} δ_r e_{x_r}ᵀ`` rescaled as in :mod:`fop.curvature`.

    ``padding_idx``: torch gives the padding row no gradient, i.e. a position holding the padding
    token has input zero: it counts in ``R`` and ``G`` but not in ``c``; the padding row's gradient
    and direction are zero (weight decay, if any, still acts on it, as in ``torch.optim``).
    ``max_norm``: the forward renormalises the looked-up rows of ``W`` in place, outside autograd;
    the gradient is still the lookup's, so nothing changes here (the step applies to the
    renormalised weight). ``sparse=True`` is refused by the optimizer and ``scale_grad_by_freq=True``
    takes the first-order rule (see :func:`unsupported_reason`).

    ``weight_sharing="reduce"`` leaves embeddings on expand: a sample's mean one-hot row ``c_n/P`` (its
    token counts) would make ``A = (1/N) Σ_n c_n c_nᵀ / P²`` a dense ``vocab × vocab`` matrix, losing the
    diagonal that makes an embedding's curvature affordable, and the lookups of distinct positions
    share no input in the first place (their one-hot rows are orthogonal unless a token repeats).
    """

    diagonal_input = True
    _unbatched_dims = 0  # any index tensor is a batch: (batch,) or (batch, seq, ...)

    def __init__(self, name: str, module: nn.Module, mode: CaptureMode) -> None:
        super().__init__(name, module, mode, weight=module.weight)
        self.padding_idx: int | None = module.padding_idx

    def _input_second_moment(self, x: Tensor) -> tuple[Tensor, int]:
        index = x.reshape(-1)
        if self.padding_idx is not None:
            index = index[index != self.padding_idx]
        counts = torch.bincount(index, minlength=self.in_features).to(compute_dtype(self.weight.dtype))
        return counts, x.numel()

    def _output_rows(self, grad_out: Tensor) -> Tensor:
        return grad_out.reshape(-1, self.out_features)

    def _has_shared_positions(self, grad_out: Tensor) -> bool:
        return False  # expand under either weight_sharing (see the class docstring)

    def _folded_grad(self, x: Tensor, grad_out: Tensor) -> Tensor:
        index = x.reshape(-1)
        rows = self._output_rows(grad_out)
        if self.padding_idx is not None:
            rows = rows * (index != self.padding_idx)[:, None].to(rows.dtype)
        return rows.new_zeros(self.in_features, self.out_features).index_add_(0, index, rows).T


class _SequenceFirst(KroneckerLayer):
    """Mixin for layers whose batched inputs are ``(seq, batch, ...)``: the halves split dim 1.

    Every capture (halves, sample counts) sees the batch first; the factors do not depend on row order.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.batch_dim = 1

    def _backward_hook(self, x: Tensor, grad_out: Tensor, mode: CaptureMode) -> None:
        if x.dim() > self._unbatched_dims + 1:  # an unbatched input has no batch dim to move
            x, grad_out = x.transpose(0, 1), grad_out.transpose(0, 1)
        super()._backward_hook(x, grad_out, mode)


class SequenceFirstEmbeddingLayer(_SequenceFirst, EmbeddingLayer):
    """``nn.Embedding`` on ``(seq, batch, ...)`` indices (a sequence-first model; see :func:`linear_layouts`)."""


class AttentionProjectionLayer(LinearLayer):
    """One in-projection of an ``nn.MultiheadAttention``: ``in_proj`` (packed, self-attention) or ``q/k/v_proj``.

    ``x Wᵀ + b`` on the batch-first query/key/value, captured through
    :func:`fop.nn.register_projection_hook`. Separate q/k/v weights share the packed
    ``in_proj_bias``, a parameter no single projection owns: their layers are bias-free and the
    bias takes the first-order rule.
    """

    def __init__(self, name: str, module: nn.Module, mode: CaptureMode, key: str) -> None:
        if key == "in_proj":
            weight, bias = module.in_proj_weight, module.in_proj_bias
        else:
            weight, bias = getattr(module, f"{key}_weight"), None
        super().__init__(f"{name}.{key}", module, mode, weight=weight, bias=bias)
        self.key = key
        self.uncaptured_reason: str | None = None

    def attach(self) -> None:
        self._handles.append(register_projection_hook(self.module, self.key, self._projection_hook))

    def _projection_hook(self, module: nn.Module, args: tuple, output: Tensor | None) -> None:
        if output is None:
            self.uncaptured_reason = (
                f"{self.name}: the packed in_proj_weight was applied to distinct query/key/value tensors "
                "(cross-attention), whose rows see different inputs and form no single Kronecker block; "
                "it gets the first-order rule on such steps"
            )
            return
        self._forward_hook(module, args, output)


class SequenceFirstLinearLayer(_SequenceFirst, LinearLayer):
    """``nn.Linear`` on sequence-first ``(seq, batch, *, in)`` inputs: the halves split dim 1.

    Used for the feed-forward layers of ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``
    with ``batch_first=False`` (see :func:`linear_layouts`); the factors do not depend on row order.
    """


def linear_layouts(model: nn.Module, batch_first: bool | None) -> tuple[set[int], set[int]]:
    """``(sequence_first, undetermined)``: ids of the ``nn.Linear`` modules whose inputs of three or
    more dimensions (``nn.Embedding``: indices of two or more) are ``(seq, batch, ...)``, and of
    those whose layout the model does not tell.

    Sequence first: every Linear under a scope that declares ``batch_first=False`` (torch's
    transformer modules; ``nn.TransformerEncoderLayer`` holds the flag on its ``self_attn`` child
    only, so a module's scope is also set by a ``MultiheadAttention`` among its direct children),
    or every Linear when ``batch_first=False``. Never the Linear layers inside an attention module:
    :mod:`fop.nn`'s attention calls them batch first whatever its flag says. Undetermined: the
    other Linear layers, when ``batch_first`` is ``None`` and the model has sequence-first ones.
    """
    scoped: set[int] = set()
    internal: set[int] = set()

    def visit(module: nn.Module, inherited: bool | None) -> None:
        flag = getattr(module, "batch_first", None)
        if not isinstance(flag, bool):
            flags = [c.batch_first for c in module.children() if isinstance(c, nn.MultiheadAttention)]
            flag = flags[0] if flags else inherited
        if isinstance(module, nn.MultiheadAttention):
            internal.update(id(inner) for inner in module.modules() if inner is not module)
            return
        if flag is False:
            scoped.add(id(module))
        for child in module.children():
            visit(child, flag)

    visit(model, None)
    linears = {id(m) for m in model.modules() if isinstance(m, nn.Linear) or _is_embedding(m)} - internal
    sequence_first = linears if batch_first is False else linears & scoped
    undetermined = linears - sequence_first if batch_first is None and sequence_first else set()
    return sequence_first, undetermined


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """Structure of ``transformers``' ``Conv1D``: attribute ``nf``, weight ``(nx, nf)``, bias ``(nf,)``."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    nf = getattr(module, "nf", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 2
        and nf == weight.shape[1]
        and (bias is None or (isinstance(bias, nn.Parameter) and tuple(bias.shape) == (nf,)))
    )


def _is_attention(module: nn.Module) -> bool:
    return type(module) in (nn.MultiheadAttention, CapturedAttention)


def _is_embedding(module: nn.Module) -> bool:
    """An ``nn.Embedding`` (or subclass keeping its forward) with a Kronecker-factored gradient."""
    return (
        isinstance(module, nn.Embedding)
        and type(module).forward is nn.Embedding.forward
        and not module.sparse
        and not module.scale_grad_by_freq
    )


def supports(module: nn.Module) -> bool:
    """Whether ``module`` gets Kronecker curvature (else its parameters use the fallback rule)."""
    if curvature.supports(module) or _is_attention(module) or is_gpt2_conv1d(module) or _is_embedding(module):
        return True
    return isinstance(module, (nn.Conv1d, nn.Conv3d)) and module.groups == 1


def make_layers(name: str, module: nn.Module, mode: CaptureMode, batch_dim: int = 0) -> list[KroneckerLayer]:
    """The :class:`KroneckerLayer` objects of a supported module (an attention module has several).

    ``batch_dim``: 1 for a Linear or Embedding that sees sequence-first inputs (from :func:`linear_layouts`).
    """
    if isinstance(module, nn.Embedding):
        return [(SequenceFirstEmbeddingLayer if batch_dim == 1 else EmbeddingLayer)(name, module, mode)]
    if _is_attention(module):
        assert isinstance(module, nn.MultiheadAttention)
        keys = ["in_proj"] if module.in_proj_weight is not None else ["q_proj", "k_proj", "v_proj"]
        return [AttentionProjectionLayer(name, module, mode, key) for key in keys]
    if is_gpt2_conv1d(module):
        return [TransposedLinearLayer(name, module, mode)]
    if isinstance(module, (nn.Conv1d, nn.Conv3d)):
        return [ConvNdLayer(name, module, mode)]
    if batch_dim == 1 and isinstance(module, nn.Linear):
        return [SequenceFirstLinearLayer(name, module, mode)]
    return [curvature.make_layer(name, module, mode)]


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a weight-bearing module of a known kind gets no curvature (None: supported, or not such a kind)."""
    if supports(module):
        return None
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "transposed convolutions have no Kronecker factorisation here"
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups != 1:
        return f"grouped convolution (groups={module.groups}): one Kronecker block per group is not implemented"
    if isinstance(module, nn.EmbeddingBag):
        return "nn.EmbeddingBag reduces its lookups per bag (sum/mean/max): no per-position Kronecker factors here"
    if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
        return (
            "scale_grad_by_freq=True divides each row's gradient by the token's count in the whole batch, "
            "which is neither Kronecker-factored nor separable into the two halves"
        )
    if isinstance(module, nn.Embedding) and type(module).forward is not nn.Embedding.forward:
        return f"{type(module).__name__} overrides nn.Embedding.forward; the captured indices may not be what selects its rows"
    if isinstance(module, nn.MultiheadAttention):
        return f"{type(module).__name__} subclasses nn.MultiheadAttention with its own forward; its projections cannot be captured"
    if isinstance(module, nn.Linear):
        return f"{type(module).__name__} overrides nn.Linear.forward; the captured input may not be what multiplies its weight"
    if isinstance(module, nn.Bilinear):
        return "bilinear layers have no Kronecker factorisation here"
    return None
