"""``nn.MultiheadAttention`` with its projections visible to FOP's curvature capture.

``torch.nn.MultiheadAttention`` applies ``in_proj_weight`` (or ``q/k/v_proj_weight``) and
``out_proj`` inside ``F.multi_head_attention_forward``: no module hook sees the projections' inputs
and output gradients, so K-FAC / FOP cannot form their Kronecker factors. :func:`convert_attention`
changes the class of every ``nn.MultiheadAttention`` in a model to :class:`MultiheadAttention`, a
subclass that only overrides ``forward``: same parameters, buffers, ``state_dict`` keys and
``isinstance``; in training mode with gradients enabled it computes

    q, k, v = x W_inᵀ + b_in  (split in three)         (or one projection per q/k/v weight)
    out = out_proj(softmax(q kᵀ/√d + mask) v)          (per head; dropout, bias_k/v, zero_attn as torch)

with the projections applied on batch-first ``(batch, seq, embed)`` inputs, where FOP's hooks split
the batch along dim 0 whatever ``batch_first`` is; everywhere else (eval, ``no_grad``, before any
optimizer hooks it) it is ``nn.MultiheadAttention.forward`` itself. The result equals torch's to
rounding: the same operations in the same order, on transposed views.

``FOP(model)`` / ``KFAC(model)`` convert their model's attention modules themselves, so the
conversion is needed by hand only to inspect it. Subclasses of ``nn.MultiheadAttention`` are left
alone (their ``forward`` may differ); their in-projections fall back to the first-order rule with
a warning.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["MultiheadAttention", "convert_attention", "register_projection_hook"]

# hook(module, (input,), output): output None means the projection ran but could not be captured
ProjectionHook = Callable[[nn.Module, tuple, "Tensor | None"], None]


class MultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose projections run where FOP's hooks see them (see module doc)."""

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        hooks = self.__dict__.get("_fop_projection_hooks", {})
        if not (any(hooks.values()) and self.training and torch.is_grad_enabled()) or query.is_nested:
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        return _attention(
            self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )


def convert_attention(model: nn.Module) -> nn.Module:
    """Turn every plain ``nn.MultiheadAttention`` in ``model`` into :class:`MultiheadAttention`, in place.

    Only the class changes (parameters, buffers and ``state_dict`` stay as they are), and the
    forward is numerically the same; returns ``model``.
    """
    for module in model.modules():
        if type(module) is nn.MultiheadAttention:
            module.__class__ = MultiheadAttention
    return model


def register_projection_hook(module: nn.MultiheadAttention, key: str, hook: ProjectionHook) -> RemovableHandle:
    """Call ``hook(module, (x,), x Wᵀ + b)`` whenever projection ``key`` runs in a captured forward.

    ``key``: ``"in_proj"`` (packed weights, self-attention), ``"q_proj"``, ``"k_proj"`` or
    ``"v_proj"``. ``x`` is batch-first. A packed projection of distinct query/key/value tensors
    (cross-attention) calls the hook with output ``None``. Converts ``module`` if needed.
    """
    convert_attention(module)
    if not isinstance(module, MultiheadAttention):
        raise TypeError(f"{type(module).__name__} is not convertible to fop.nn.MultiheadAttention")
    table = module.__dict__.setdefault("_fop_projection_hooks", {})
    hooks = table.setdefault(key, OrderedDict())
    handle = RemovableHandle(hooks)
    hooks[handle.id] = hook
    return handle


def _project(module: nn.Module, key: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    out = F.linear(x, weight, bias)
    for hook in list(module.__dict__.get("_fop_projection_hooks", {}).get(key, {}).values()):
        hook(module, (x,), out)
    return out


def _attention(
    m: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None,
    need_weights: bool,
    attn_mask: Tensor | None,
    average_attn_weights: bool,
    is_causal: bool,
) -> tuple[Tensor, Tensor | None]:
    """``F.multi_head_attention_forward`` (torch 2.x, training path) on batch-first inputs."""
    is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, m.num_heads)
    self_attention = query is key and key is value
    if not is_batched:
        query, key, value = (t.unsqueeze(0) for t in (query, key, value))
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not m.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    bsz, tgt_len, embed_dim = query.shape
    heads = m.num_heads
    head_dim = embed_dim // heads
    if embed_dim != m.embed_dim:
        raise AssertionError(f"was expecting embedding dimension of {m.embed_dim}, but got {embed_dim}")

    key_padding_mask, attn_mask, is_causal = _canonical_masks(
        query, key_padding_mask, attn_mask, need_weights, is_causal
    )
    q, k, v = _in_projections(m, query, key, value, self_attention)
    attn_mask = _checked_attn_mask(attn_mask, bsz * heads, tgt_len, k.shape[1])
    masks = (attn_mask, key_padding_mask)
    if m.bias_k is not None and m.bias_v is not None:
        k, v, masks = _one_more_key(k, v, m.bias_k.repeat(bsz, 1, 1), m.bias_v.repeat(bsz, 1, 1), masks)
    # (batch·heads, seq, head_dim), batch-major as in torch
    q, k, v = (
        t.reshape(bsz, -1, heads, head_dim).transpose(1, 2).reshape(bsz * heads, -1, head_dim) for t in (q, k, v)
    )
    if m.add_zero_attn:
        zeros = torch.zeros((bsz * heads, 1, head_dim), dtype=k.dtype, device=k.device)
        k, v, masks = _one_more_key(k, v, zeros, zeros.to(v.dtype), masks)
    attn_mask = _with_padding_mask(*masks, bsz, heads, k.shape[1])
    dropout_p = m.dropout if m.training else 0.0

    weights: Tensor | None = None
    if need_weights:
        context, weights = _attend_with_weights(q, k, v, attn_mask, dropout_p, is_causal, bsz, average_attn_weights)
    else:
        context = _attend(q, k, v, attn_mask, dropout_p, is_causal, bsz)
    out = m.out_proj(context.transpose(1, 2).reshape(bsz, tgt_len, embed_dim))
    if not is_batched:
        return out.squeeze(0), None if weights is None else weights.squeeze(0)
    if not m.batch_first:
        out = out.transpose(0, 1)
    return out, weights


def _one_more_key(
    k: Tensor, v: Tensor, extra_k: Tensor, extra_v: Tensor, masks: tuple[Tensor | None, Tensor | None]
) -> tuple[Tensor, Tensor, tuple[Tensor | None, Tensor | None]]:
    """Keys and values with one more position (``bias_k``/``bias_v`` or ``add_zero_attn``), masks padded."""
    padded = tuple(None if mask is None else F.pad(mask, (0, 1)) for mask in masks)
    return torch.cat([k, extra_k], dim=1), torch.cat([v, extra_v], dim=1), (padded[0], padded[1])


def _with_padding_mask(
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, bsz: int, heads: int, src_len: int
) -> Tensor | None:
    """The attention mask with the key padding mask added, per (batch·head) as torch does."""
    if key_padding_mask is None:
        return attn_mask
    if key_padding_mask.shape != (bsz, src_len):
        raise AssertionError(f"expecting key_padding_mask shape of {(bsz, src_len)}, but got {key_padding_mask.shape}")
    per_head = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1).reshape(bsz * heads, 1, src_len)
    return per_head if attn_mask is None else attn_mask + per_head


def _canonical_masks(
    query: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None, need_weights: bool, is_causal: bool
) -> tuple[Tensor | None, Tensor | None, bool]:
    """torch's mask canonicalisation: float masks of the query's dtype; a causal hint without other masks."""
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=query.dtype,
    )
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    if is_causal and key_padding_mask is None and not need_weights:
        return key_padding_mask, None, is_causal  # scaled_dot_product_attention builds the causal mask itself
    attn_mask = F._canonical_mask(
        mask=attn_mask,
        mask_name="attn_mask",
        other_type=None,
        other_name="",
        target_type=query.dtype,
        check_other=False,
    )
    return key_padding_mask, attn_mask, is_causal and key_padding_mask is None


def _in_projections(
    m: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor, self_attention: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``q, k, v``: through the hooked projections where one Kronecker block fits, else plain ``F.linear``."""
    if m.in_proj_weight is None:  # separate q/k/v weights (kdim/vdim differ from embed_dim)
        b_q, b_k, b_v = (None, None, None) if m.in_proj_bias is None else m.in_proj_bias.chunk(3)
        q = _project(m, "q_proj", query, m.q_proj_weight, b_q)
        k = _project(m, "k_proj", key, m.k_proj_weight, b_k)
        return q, k, _project(m, "v_proj", value, m.v_proj_weight, b_v)
    if self_attention:
        q, k, v = _project(m, "in_proj", query, m.in_proj_weight, m.in_proj_bias).chunk(3, dim=-1)
        return q, k, v
    # rows of the packed weight see different inputs: no single Kronecker block
    for hook in list(m.__dict__.get("_fop_projection_hooks", {}).get("in_proj", {}).values()):
        hook(m, (query,), None)
    w_q, w_k, w_v = m.in_proj_weight.chunk(3)
    b_q, b_k, b_v = (None, None, None) if m.in_proj_bias is None else m.in_proj_bias.chunk(3)
    return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)


def _checked_attn_mask(attn_mask: Tensor | None, batch_heads: int, tgt_len: int, src_len: int) -> Tensor | None:
    """A 2-D mask of shape ``(tgt, src)`` or a 3-D one of ``(batch·heads, tgt, src)``, as 3-D."""
    if attn_mask is None:
        return None
    if attn_mask.dim() == 2:
        if attn_mask.shape != (tgt_len, src_len):
            raise RuntimeError(
                f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, src_len)}."
            )
        return attn_mask.unsqueeze(0)
    if attn_mask.dim() == 3:
        if attn_mask.shape != (batch_heads, tgt_len, src_len):
            raise RuntimeError(
                f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be {(batch_heads, tgt_len, src_len)}."
            )
        return attn_mask
    raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")


def _attend_with_weights(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    bsz: int,
    average_attn_weights: bool,
) -> tuple[Tensor, Tensor]:
    """Attention with explicit weights on ``(batch·heads, seq, head_dim)`` tensors: context and weights."""
    if is_causal and attn_mask is None:
        raise AssertionError("FIXME: is_causal not implemented for need_weights")
    batch_heads, tgt_len, head_dim = q.shape
    heads = batch_heads // bsz
    q_scaled = q * math.sqrt(1.0 / float(head_dim))
    if attn_mask is not None:
        scores = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
    else:
        scores = torch.bmm(q_scaled, k.transpose(-2, -1))
    weights = F.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    context = torch.bmm(weights, v).view(bsz, heads, tgt_len, head_dim)
    weights = weights.view(bsz, heads, tgt_len, k.shape[1])
    return context, weights.mean(dim=1) if average_attn_weights else weights


def _attend(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float, is_causal: bool, bsz: int
) -> Tensor:
    """``scaled_dot_product_attention`` on ``(batch·heads, seq, head_dim)`` tensors: the context, per head."""
    batch_heads, tgt_len, head_dim = q.shape
    heads, src_len = batch_heads // bsz, k.shape[1]
    if attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, heads, -1, src_len)
    return F.scaled_dot_product_attention(
        q.view(bsz, heads, tgt_len, head_dim),
        k.view(bsz, heads, src_len, head_dim),
        v.view(bsz, heads, src_len, head_dim),
        attn_mask,
        dropout_p,
        is_causal,
    )
