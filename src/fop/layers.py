"""Kronecker layer types, and the registry that says which module gets which.

:mod:`fop.curvature` is the engine every layer shares (hooks, halves, factor statistics, hand-over to the
optimizer: :class:`~fop.curvature.KroneckerLayer`). A layer type here supplies its algebra: the input
rows ``a`` (bias column of ones folded in) and output rows ``δ`` of its factors, its folded gradient
``[∂W | ∂b]``, and for K-FAC-reduce each sample's mean input row and summed output rows.

* ``nn.Linear`` (or a subclass keeping its forward): :class:`LinearLayer`; on sequence-first inputs
  (:func:`linear_layouts`) :class:`SequenceFirstLinearLayer`.
* ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` with ``groups=1``: :class:`ConvLayer`.
* ``nn.MultiheadAttention``: one :class:`AttentionProjectionLayer` per in-projection; the module is
  converted in place to :class:`fop.nn.MultiheadAttention` so the projections run where the hooks see
  them, and ``out_proj`` is an ordinary ``nn.Linear`` layer.
* GPT-2's ``Conv1D`` (``transformers.pytorch_utils.Conv1D``: weight ``(in, out)``, ``y = x W + b``),
  recognised by its structure (:func:`is_gpt2_conv1d`) without importing ``transformers``:
  :class:`TransposedLinearLayer`.
* ``nn.Embedding`` (dense gradients, ``scale_grad_by_freq=False``): :class:`EmbeddingLayer` (sequence-first
  indices: :class:`SequenceFirstEmbeddingLayer`), a Linear on one-hot inputs whose input factor is
  diagonal (token frequencies). It shares with GPT-2's layer only :class:`TransposedWeight`: a weight
  stored ``(in, out)``.
* an ``nn.Linear`` output head whose weight is an ``nn.Embedding``'s (a tied token embedding, and no
  third user): one :class:`TiedHeadLayer` for the pair, the head's factors on the summed gradient
  (:func:`is_tied_head`, :func:`make_tied_layer`; the optimizer's discovery finds the pairs, as it
  alone sees which modules share a parameter).

:data:`LAYER_TYPES` is this list, one :class:`LayerType` (how the module is recognised, which layers it
gets) per item: the one registry. :func:`supports` and :func:`make_layers` are what the optimizer asks;
:func:`unsupported_reason` names the weight-bearing modules that fall back to the first-order rule, for
its warning. A new layer type is a :class:`~fop.curvature.KroneckerLayer` subclass and an entry there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv1d_weight, conv2d_weight, conv3d_weight

from .curvature import CaptureMode, KroneckerLayer, fold_bias_moment
from .functional import compute_dtype
from .nn import MultiheadAttention as CapturedAttention
from .nn import register_projection_hook

__all__ = [
    "LAYER_TYPES",
    "AttentionProjectionLayer",
    "ConvLayer",
    "EmbeddingLayer",
    "LayerType",
    "LinearLayer",
    "SequenceFirstEmbeddingLayer",
    "SequenceFirstLinearLayer",
    "SequenceFirstTiedHeadLayer",
    "TiedHeadLayer",
    "TransposedLinearLayer",
    "TransposedWeight",
    "is_attention",
    "is_convolution",
    "is_dense_embedding",
    "is_gpt2_conv1d",
    "is_plain_linear",
    "is_tied_head",
    "layer_type",
    "linear_layouts",
    "lookup_grad",
    "make_layers",
    "make_tied_layer",
    "supports",
    "unsupported_reason",
]


class LinearLayer(KroneckerLayer):
    """``nn.Linear`` on inputs ``(batch, *, in)``: every leading position is a row of the factors."""

    def _input_second_moment(self, x: Tensor) -> tuple[Tensor, int]:
        rows = x.reshape(-1, x.shape[-1])
        return fold_bias_moment(rows, self.bias is not None, compute_dtype(self.weight.dtype)), rows.shape[0]

    def _output_rows(self, grad_out: Tensor) -> Tensor:
        return grad_out.reshape(-1, grad_out.shape[-1])

    def _folded_grad(self, x: Tensor, grad_out: Tensor) -> Tensor:
        a = x.reshape(-1, x.shape[-1])
        g = grad_out.reshape(-1, grad_out.shape[-1])
        w = g.T @ a
        if self.bias is None:
            return w
        return torch.cat([w, g.sum(0)[:, None].to(w.dtype)], dim=1)

    # (batch, *positions, features): the positions are the dims between the first and the last,
    # reduced in place (no reshape: a sequence-first input arrives as a transposed view)
    def _has_shared_positions(self, grad_out: Tensor) -> bool:
        return grad_out.dim() > 2

    def _mean_input_rows(self, x: Tensor) -> Tensor:
        return x.mean(dim=tuple(range(1, x.dim() - 1)), dtype=compute_dtype(self.weight.dtype))

    def _summed_output_rows(self, grad_out: Tensor, dtype: torch.dtype) -> Tensor:
        return grad_out.sum(dim=tuple(range(1, grad_out.dim() - 1)), dtype=dtype)


class ConvLayer(KroneckerLayer):
    """``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` with ``groups=1``: rows are the (sample, output position) patches.

    With ``d`` spatial dims, output position ``p`` of sample ``n`` is ``y_{n,p} = W_f a_{n,p}``, where the
    patch ``a_{n,p}`` is the receptive field of ``p`` in the padded input, arranged ``(C, k_1, …, k_d)`` like
    the weight (bias: a trailing 1). The input factor uses the patches (exact ``Σ a aᵀ``, unfolded in
    chunks of samples, :meth:`unfold_chunks`); the sub-batch gradients use
    ``torch.nn.grad.conv{1,2,3}d_weight`` (no unfolding). Non-zero padding modes and string paddings
    are applied to the input explicitly, so both see the padded input.
    """

    def __init__(self, name: str, module: nn.Conv1d | nn.Conv2d | nn.Conv3d, mode: CaptureMode) -> None:
        super().__init__(name, module, mode)
        self.spatial = self.weight.dim() - 2
        self._unbatched_dims = self.spatial + 1  # one sample: (C, *spatial)
        self.kernel_size = module.kernel_size
        self.stride = module.stride
        self.dilation = module.dilation
        self._explicit_pad: list[int] | None = None
        self._pad_mode = module.padding_mode if module.padding_mode != "zeros" else "constant"
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            self._explicit_pad = _explicit_padding(module)
            self.padding: tuple[int, ...] = (0,) * self.spatial
        else:
            self.padding = module.padding

    def _batched(self, t: Tensor) -> Tensor:
        """``t`` with a batch dim: an unbatched ``(C, *spatial)`` input or output gradient as one sample."""
        return t.unsqueeze(0) if t.dim() == self._unbatched_dims else t

    def _padded(self, x: Tensor) -> Tensor:
        x = self._batched(x)
        if self._explicit_pad is None:
            return x
        return F.pad(x, self._explicit_pad, mode=self._pad_mode)

    def _input_second_moment(self, x: Tensor) -> tuple[Tensor, int]:
        x = self._padded(x)
        dtype = compute_dtype(self.weight.dtype)
        total: Tensor | None = None
        count = 0
        for chunk in self.unfold_chunks(x):
            rows = self.patch_rows(chunk)
            moment = fold_bias_moment(rows, self.bias is not None, dtype)
            total = moment if total is None else total.add_(moment)
            count += rows.shape[0]
        assert total is not None
        return total, count

    def unfold_chunks(self, x: Tensor) -> tuple[Tensor, ...]:
        """The padded input split along samples so that no chunk's patches outgrow the input itself.

        A convolution's patches hold ``Π k`` times its input (nine times for 3x3), and the Gram
        product takes a transposed copy of them: unfolded all at once they held several times the
        activations the layer keeps for backward (the peak of a whole training step). Chunks whose
        patches hold at most as many elements as ``x`` bound these temporaries by twice the input;
        each chunk still makes one large product (its rows are samples × positions).
        """
        positions = math.prod(
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, k, s, d, p in zip(x.shape[2:], self.kernel_size, self.stride, self.dilation, self.padding)
        )
        per_sample = positions * x.shape[1] * math.prod(self.kernel_size)
        return x.split(max(1, x.numel() // max(1, per_sample)))

    def patch_rows(self, x: Tensor) -> Tensor:
        """The patches ``a_{n,p}`` of the padded batched input ``x``, ``(samples · positions, C · Π k)``."""
        if self.spatial == 2:
            # F.unfold (im2col) is one kernel for 2-D, the common case; it has no other dimensions
            patches = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
            return patches.transpose(1, 2).reshape(-1, patches.shape[1])
        windows = self.patch_windows(x)
        d = self.spatial
        order = (0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d))  # (N, *positions, C, *kernel)
        return windows.permute(order).reshape(-1, windows.shape[1] * math.prod(self.kernel_size))

    def patch_windows(self, x: Tensor) -> Tensor:
        """The receptive fields of the padded input ``x`` as a view, ``(N, C, *positions, *kernel)``.

        ``Tensor.unfold`` along each spatial dim (window ``d(k−1)+1``, step ``s``, every ``d``-th
        element: dilation); no copy is made. Indexed ``[n, c, *p, *k]`` like the weight ``[o, c, *k]``.
        """
        if any(self.padding):
            x = F.pad(x, [p for pad in reversed(self.padding) for p in (pad, pad)])
        for i, (k, s, d) in enumerate(zip(self.kernel_size, self.stride, self.dilation)):
            x = x.unfold(2 + i, d * (k - 1) + 1, s)
            if d > 1:
                x = x[..., ::d]
        return x

    def _output_rows(self, grad_out: Tensor) -> Tensor:
        grad_out = self._batched(grad_out)
        return grad_out.movedim(1, -1).reshape(-1, grad_out.shape[1])

    # The two reductions below work on the (N, C, positions) layout of the output gradient as it
    # comes (a view): the (rows, C) layout of _output_rows is a permuted copy of the whole tensor,
    # which cost more than the reductions themselves.
    def _output_sum(self, grad_out: Tensor) -> Tensor:
        grad_out = self._batched(grad_out)
        return grad_out.sum((0, *range(2, grad_out.dim())))

    def _output_second_moment(self, grad_out: Tensor, dtype: torch.dtype) -> Tensor:
        grad_out = self._batched(grad_out)
        n, c = grad_out.shape[:2]
        if n * c * c > grad_out.numel():  # the per-sample moments would outgrow the copy they avoid
            return super()._output_second_moment(grad_out, dtype)
        per_sample = grad_out.reshape(n, c, -1).to(dtype)
        return (per_sample @ per_sample.transpose(1, 2)).sum(0)  # Σ_n Σ_positions δ δᵀ

    # K-FAC-reduce (WEIGHT_SHARING): the positions are the output positions
    def _has_shared_positions(self, grad_out: Tensor) -> bool:
        return True

    def _mean_input_rows(self, x: Tensor) -> Tensor:
        # a reduction over the window view: reads the input Π k times, writes no unfolded patches
        windows = self.patch_windows(self._padded(x))
        means = windows.mean(dim=tuple(range(2, 2 + self.spatial)), dtype=compute_dtype(self.weight.dtype))
        return means.reshape(means.shape[0], -1)

    def _summed_output_rows(self, grad_out: Tensor, dtype: torch.dtype) -> Tensor:
        grad_out = self._batched(grad_out)
        return grad_out.sum(dim=tuple(range(2, grad_out.dim())), dtype=dtype)

    def _folded_grad(self, x: Tensor, grad_out: Tensor) -> Tensor:
        x = self._padded(x)
        grad_out = self._batched(grad_out).to(x.dtype)
        weight_grad = _WEIGHT_GRAD[self.spatial]
        w = weight_grad(x, self.weight.shape, grad_out, self.stride, self.padding, self.dilation, 1)
        w = w.reshape(self.out_features, -1)
        if self.bias is None:
            return w
        return torch.cat([w, grad_out.sum((0, *range(2, grad_out.dim())))[:, None].to(w.dtype)], dim=1)


_WEIGHT_GRAD = {1: conv1d_weight, 2: conv2d_weight, 3: conv3d_weight}  # ∂W of a convolution, by spatial dims


def _explicit_padding(module: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> list[int]:
    """``F.pad`` amounts (left, right, top, bottom) equivalent to the module's own padding."""
    if module.padding == "valid":
        return [0, 0, 0, 0]
    if module.padding == "same":
        pad: list[int] = []
        for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
            total = d * (k - 1)
            pad += [total // 2, total - total // 2]
        return pad
    padding = cast(tuple[int, ...], module.padding)  # a tuple once the string forms are handled above
    return [p for size in reversed(padding) for p in (size, size)]


class TransposedWeight(KroneckerLayer):
    """Mixin for a layer whose weight is stored ``(in, out)``, the transpose of ``nn.Linear``'s ``(out, in)``.

    The folded matrix is ``[Wᵀ | b]``, ``(out, in_f)`` as for every layer, so the factors and directions
    are those of the equivalent ``nn.Linear``; only the conversion to and from the parameter's layout
    (:meth:`as_matrix`, :meth:`from_matrix`) transposes.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.out_features = self.weight.shape[1]
        self.in_features = self.weight.shape[0] + (1 if self.bias is not None else 0)

    def as_matrix(self, weight_like: Tensor) -> Tensor:
        return weight_like.T

    def from_matrix(self, matrix: Tensor) -> Tensor:
        return matrix.T.contiguous()


class TransposedLinearLayer(TransposedWeight, LinearLayer):
    """GPT-2's ``Conv1D``: ``y = x W + b`` with ``W`` of shape ``(in, out)``, i.e. a Linear with ``Wᵀ``."""


class EmbeddingLayer(TransposedWeight):
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

    def __init__(self, name: str, module: nn.Embedding, mode: CaptureMode) -> None:
        # the weight given explicitly: nn.Embedding has no ``bias`` attribute for the base to read
        super().__init__(name, module, mode, weight=cast(nn.Parameter, module.weight))
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
        return lookup_grad(x, self._output_rows(grad_out), self.padding_idx, self.in_features).T


def lookup_grad(x: Tensor, rows: Tensor, padding_idx: int | None, num_embeddings: int) -> Tensor:
    """``Σ_r e_{x_r} δ_rᵀ``: the gradient of an embedding table ``(num_embeddings, dim)`` from its lookups.

    ``x``: the looked-up indices (any shape), ``rows``: their output gradients ``(x.numel(), dim)``; a
    position holding ``padding_idx`` adds nothing (torch gives the padding row no gradient).
    """
    index = x.reshape(-1)
    if padding_idx is not None:
        rows = rows * (index != padding_idx)[:, None].to(rows.dtype)
    return rows.new_zeros(num_embeddings, rows.shape[1]).index_add_(0, index, rows)


class _SequenceFirst(KroneckerLayer):
    """Mixin for layers whose batched inputs are ``(seq, batch, ...)``: the halves split dim 1.

    Every capture (halves, sample counts) sees the batch first; the factors do not depend on row order.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batch_dim = 1

    def _backward_hook(self, x: Tensor, grad_out: Tensor, mode: CaptureMode) -> None:
        super()._backward_hook(*_batch_major(x, grad_out, self._unbatched_dims), mode)

    def _use_backward_hook(self, x: Tensor, grad_out: Tensor, mode: CaptureMode) -> None:
        # the other uses of the weight (a tied embedding) are sequence-first too: discovery ties
        # only modules of one layout
        super()._use_backward_hook(*_batch_major(x, grad_out, self._use_unbatched_dims), mode)


def _batch_major(x: Tensor, grad_out: Tensor, unbatched_dims: int) -> tuple[Tensor, Tensor]:
    """A sequence-first forward's input and output gradient with the batch moved to dim 0."""
    if x.dim() > unbatched_dims + 1:  # an unbatched input has no batch dim to move
        return x.transpose(0, 1), grad_out.transpose(0, 1)
    return x, grad_out


class SequenceFirstEmbeddingLayer(_SequenceFirst, EmbeddingLayer):
    """``nn.Embedding`` on ``(seq, batch, ...)`` indices (a sequence-first model; see :func:`linear_layouts`)."""


class AttentionProjectionLayer(LinearLayer):
    """One in-projection of an ``nn.MultiheadAttention``: ``in_proj`` (packed, self-attention) or ``q/k/v_proj``.

    ``x Wᵀ + b`` on the batch-first query/key/value, captured through
    :func:`fop.nn.register_projection_hook`. Separate q/k/v weights share the packed
    ``in_proj_bias``, a parameter no single projection owns: their layers are bias-free and the
    bias takes the first-order rule.
    """

    def __init__(self, name: str, module: nn.MultiheadAttention, mode: CaptureMode, key: str) -> None:
        if key == "in_proj":
            weight, bias = module.in_proj_weight, module.in_proj_bias
        else:
            weight, bias = getattr(module, f"{key}_weight"), None
        super().__init__(f"{name}.{key}", module, mode, weight=weight, bias=bias)
        self.module: nn.MultiheadAttention = module
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


class TiedHeadLayer(LinearLayer):
    """An ``nn.Linear`` output head whose weight is also an ``nn.Embedding``'s table (GPT-2, nanoGPT).

    The weight ``W`` ``(V, D)`` is applied twice: by the head to its inputs ``h_r`` (logits
    ``W h_r + b``, output gradients ``δ_r``) and by the embedding to its indices ``x_s`` (rows
    ``W[x_s]``, output gradients ``ε_s``). ``p.grad`` holds the sum of both uses,

        ∇W = Σ_r δ_r h_rᵀ + Σ_s e_{x_s} ε_sᵀ          (the bias column, if any, from the head alone)

    and the layer preconditions that sum with **the head's Kronecker factors**:

        Δ = (A ⊗ G + λI)⁻¹ vec ∇W_f,     A = E[h hᵀ] (D×D, bias folded),  G = E[δ δᵀ] (V×V)

    (``A ⊗ G`` acting on the column-major ``vec`` of the folded ``(V, D[+1])`` matrix, as for every
    layer), i.e. the curvature ``G ⊗ A`` of the head alone and the gradient of the tied weight. Each use
    alone has a Kronecker factorisation in this layout, the lookup's ``diag(c)/R ⊗ G_emb`` and the
    head's; their sum is not one (``docs/layers.md``). The head's is kept because it is the dense one
    (the logits' curvature) and the lookup's gradient is kept because ``p.grad`` contains it: FOP's
    halves and K-FAC's gradient must be those of the parameter the step moves. So the factors are
    exactly those of the head's :class:`LinearLayer` (expand / reduce, ``factor_samples``, the
    Monte-Carlo Fisher), while the embedding's hooks (:attr:`~fop.curvature.KroneckerLayer.uses`) add
    its gradient to the halves, to the check that ``p.grad`` is all the hooks saw, and to the
    loss-scale reference of a bias-free model. Built by discovery for a Linear whose weight is shared
    with exactly one dense ``nn.Embedding`` (:func:`is_tied_head`); named after the head.
    """

    _use_unbatched_dims = 0  # the embedding's indices: any index tensor is a batch (as EmbeddingLayer)

    def __init__(self, name: str, head: nn.Linear, embedding: nn.Embedding, mode: CaptureMode) -> None:
        super().__init__(name, head, mode)
        self.uses = (embedding,)
        self.padding_idx: int | None = embedding.padding_idx

    def _use_folded_grad(self, x: Tensor, grad_out: Tensor) -> Tensor:
        # the table's gradient (V, D) is the head's layout already (the embedding's own is its transpose)
        w = lookup_grad(x, grad_out.reshape(-1, grad_out.shape[-1]), self.padding_idx, self.out_features)
        if self.bias is None:
            return w
        return torch.cat([w, w.new_zeros(w.shape[0], 1)], dim=1)


class SequenceFirstTiedHeadLayer(_SequenceFirst, TiedHeadLayer):
    """:class:`TiedHeadLayer` on sequence-first inputs: the head's ``(seq, batch, D)``, the embedding's ``(seq, batch)``."""


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
    linears = {id(m) for m in model.modules() if isinstance(m, nn.Linear) or is_dense_embedding(m)} - internal
    sequence_first = linears if batch_first is False else linears & scoped
    undetermined = linears - sequence_first if batch_first is None and sequence_first else set()
    return sequence_first, undetermined


# ----------------------------------------------------------------------------- the registry
def is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear``, or a subclass keeping its forward (e.g. ``NonDynamicallyQuantizableLinear``).

    A subclass that overrides ``forward`` may not pass its weight through the input the hooks capture.
    """
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def is_convolution(module: nn.Module) -> bool:
    """An ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` with ``groups=1`` (one Kronecker block)."""
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups == 1


def is_attention(module: nn.Module) -> bool:
    """An ``nn.MultiheadAttention`` of torch's own forward, or one already converted by :mod:`fop.nn`."""
    return type(module) in (nn.MultiheadAttention, CapturedAttention)


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


def is_dense_embedding(module: nn.Module) -> bool:
    """An ``nn.Embedding`` (or subclass keeping its forward) with a Kronecker-factored gradient."""
    return (
        isinstance(module, nn.Embedding)
        and type(module).forward is nn.Embedding.forward
        and not module.sparse
        and not module.scale_grad_by_freq
    )


# (name, module, capture mode, batch dim of its inputs) -> the module's layers
LayerFactory = Callable[[str, nn.Module, CaptureMode, int], list[KroneckerLayer]]


@dataclass(frozen=True)
class LayerType:
    """One kind of module with Kronecker curvature: how it is recognised, and the layers it gets."""

    name: str
    recognises: Callable[[nn.Module], bool]
    make: LayerFactory


def _embedding_layers(name: str, module: nn.Module, mode: CaptureMode, batch_dim: int) -> list[KroneckerLayer]:
    assert isinstance(module, nn.Embedding)
    return [(SequenceFirstEmbeddingLayer if batch_dim == 1 else EmbeddingLayer)(name, module, mode)]


def _attention_layers(name: str, module: nn.Module, mode: CaptureMode, batch_dim: int) -> list[KroneckerLayer]:
    # the projections are called batch first whatever the module's flag (fop.nn): batch_dim does not apply
    assert isinstance(module, nn.MultiheadAttention)
    keys = ["in_proj"] if module.in_proj_weight is not None else ["q_proj", "k_proj", "v_proj"]
    return [AttentionProjectionLayer(name, module, mode, key) for key in keys]


def _gpt2_conv1d_layers(name: str, module: nn.Module, mode: CaptureMode, batch_dim: int) -> list[KroneckerLayer]:
    return [TransposedLinearLayer(name, module, mode)]


def _convolution_layers(name: str, module: nn.Module, mode: CaptureMode, batch_dim: int) -> list[KroneckerLayer]:
    assert isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    return [ConvLayer(name, module, mode)]


def _linear_layers(name: str, module: nn.Module, mode: CaptureMode, batch_dim: int) -> list[KroneckerLayer]:
    return [(SequenceFirstLinearLayer if batch_dim == 1 else LinearLayer)(name, module, mode)]


# Every module kind with Kronecker curvature. A module gets the first entry that recognises it; the
# kinds are disjoint but for duck-typed look-alikes (a Conv1D-structured Linear subclass is GPT-2's).
LAYER_TYPES: tuple[LayerType, ...] = (
    LayerType("Embedding", is_dense_embedding, _embedding_layers),
    LayerType("MultiheadAttention", is_attention, _attention_layers),
    LayerType("GPT-2 Conv1D", is_gpt2_conv1d, _gpt2_conv1d_layers),
    LayerType("Conv1d/2d/3d with groups=1", is_convolution, _convolution_layers),
    LayerType("Linear", is_plain_linear, _linear_layers),
)


def layer_type(module: nn.Module) -> LayerType | None:
    """The entry of :data:`LAYER_TYPES` that recognises ``module``, or None (no Kronecker curvature)."""
    return next((kind for kind in LAYER_TYPES if kind.recognises(module)), None)


def supports(module: nn.Module) -> bool:
    """Whether ``module`` gets Kronecker curvature (else its parameters use the fallback rule)."""
    return layer_type(module) is not None


def is_tied_head(head: nn.Module, embedding: nn.Module) -> bool:
    """Whether ``head`` is an output head tied to ``embedding``: a plain ``nn.Linear`` ``(D → V)`` whose
    weight is the very ``(V, D)`` table of a dense ``nn.Embedding`` (one :class:`TiedHeadLayer`).

    That the weight has no third user, and that the head's bias is its own, is for the caller to check.
    """
    if not (is_plain_linear(head) and is_dense_embedding(embedding)):
        return False
    linear, table = cast(nn.Linear, head), cast(nn.Embedding, embedding)
    return (
        linear.weight is table.weight
        and linear.in_features == table.embedding_dim
        and linear.out_features == table.num_embeddings
    )


def make_tied_layer(
    name: str, head: nn.Module, embedding: nn.Module, mode: CaptureMode, batch_dim: int = 0
) -> KroneckerLayer:
    """The one layer of an output head tied to a token embedding (:func:`is_tied_head`); named ``name`` (the head's).

    ``batch_dim``: 1 when both modules see sequence-first inputs (from :func:`linear_layouts`).
    """
    if not is_tied_head(head, embedding):
        raise TypeError(f"{name}: not an nn.Linear head tied to an nn.Embedding's weight")
    kind = SequenceFirstTiedHeadLayer if batch_dim == 1 else TiedHeadLayer
    return kind(name, cast(nn.Linear, head), cast(nn.Embedding, embedding), mode)


def make_layers(name: str, module: nn.Module, mode: CaptureMode, batch_dim: int = 0) -> list[KroneckerLayer]:
    """The :class:`~fop.curvature.KroneckerLayer` objects of a supported module (an attention module has several).

    ``batch_dim``: 1 for a Linear or Embedding that sees sequence-first inputs (from :func:`linear_layouts`).
    """
    kind = layer_type(module)
    if kind is None:
        supported = ", ".join(entry.name for entry in LAYER_TYPES)
        raise TypeError(f"{type(module).__name__} has no Kronecker curvature; supported: {supported}")
    return kind.make(name, module, mode, batch_dim)


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
