"""Convolutions, sequence Linear layers, nn.MultiheadAttention, GPT-2's Conv1D and nn.Embedding against float64
dense references (with ``weight_sharing`` "expand" and "reduce").

For every layer type: the hook-captured sub-batch gradients equal separate backward passes on
each half of the batch, the Kronecker factors equal second moments formed by hand (patches by
explicit indexing, attention projections by a textbook attention written here), and a K-FAC /
FOP step equals the dense damped solve / the functional FOP direction of those quantities.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _checkpoint import train_and_resume
from fop import FOP, KFAC
from fop.functional import fop_direction
from fop.nn import MultiheadAttention, convert_attention
from test_curvature import captured

DTYPE = torch.float64
# the dense oracles of this file are those of exact damping (M = A ⊗ G + λI); factored damping, the
# default, has its own in tests/test_options.py
FAST = dict(curvature_update_interval=1, inverse_update_interval=1, damping_mode="exact")


# ===================================================================================== models
class Conv1D(nn.Module):
    """The structure of ``transformers.pytorch_utils.Conv1D`` (GPT-2): weight (in, out), ``x W + b``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class Attn(nn.Module):
    """Attention over ``(batch, seq, 6)`` inputs, then mean over positions and a linear head.

    ``cross``: key/value are other tensors (``kdim=5``, ``vdim=4``: separate q/k/v weights).
    """

    def __init__(self, batch_first: bool = True, cross: bool = False, bias: bool = True) -> None:
        super().__init__()
        extra = dict(kdim=5, vdim=4) if cross else {}
        self.attn = nn.MultiheadAttention(6, 2, batch_first=batch_first, bias=bias, **extra)
        self.head = nn.Linear(6, 3)
        self.batch_first, self.cross = batch_first, cross

    def inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.cross:
            q, k, v = x, torch.tanh(x[..., :5]), torch.sin(x[..., 1:5])
        else:
            q = k = v = x
        if not self.batch_first:
            if self.cross:
                return q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
            q = k = v = x.transpose(0, 1)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.attn(*self.inputs(x), need_weights=False)[0]
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(out.mean(1))


class Encoder(nn.Module):
    """PyTorch's own TransformerEncoderLayer, sequence-first, as a user would write it."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(6, 2, dim_feedforward=8, dropout=0.0)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x.transpose(0, 1)).mean(0))


class GPT2Block(nn.Module):
    def __init__(self, linear: Callable[[int, int], nn.Module] = lambda n_in, n_out: Conv1D(n_out, n_in)) -> None:
        super().__init__()
        self.c_fc = linear(5, 7)
        self.c_proj = linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.tanh(self.c_fc(x))).mean(1)


def conv_net(conv: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    with torch.no_grad():
        probe = conv(torch.zeros(1, *shape))
    return nn.Sequential(conv, nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(probe.numel(), 3))


CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "conv1d": (lambda: conv_net(nn.Conv1d(3, 4, 3, padding=1), (3, 9)), (3, 9)),
    "conv1d-stride-dilation-nobias": (
        lambda: conv_net(nn.Conv1d(3, 4, 3, stride=2, dilation=2, bias=False), (3, 9)),
        (3, 9),
    ),
    "conv1d-same-reflect": (
        lambda: conv_net(nn.Conv1d(3, 4, 4, padding="same", padding_mode="reflect"), (3, 9)),
        (3, 9),
    ),
    "conv3d": (lambda: conv_net(nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=1), (2, 4, 5, 4)), (2, 4, 5, 4)),
    "conv3d-dilation-circular": (
        lambda: conv_net(nn.Conv3d(2, 3, 2, dilation=(1, 2, 1), padding=1, padding_mode="circular"), (2, 4, 5, 4)),
        (2, 4, 5, 4),
    ),
    "mha-batch-first": (lambda: Attn(batch_first=True), (4, 6)),
    "mha-seq-first": (lambda: Attn(batch_first=False), (4, 6)),
    "mha-separate-qkv": (lambda: Attn(batch_first=False, cross=True), (4, 6)),
    "mha-no-bias": (lambda: Attn(batch_first=True, bias=False), (4, 6)),
    "encoder-layer": (Encoder, (4, 6)),
    "gpt2-conv1d": (GPT2Block, (4, 5)),
    "linear-seq": (lambda: GPT2Block(nn.Linear), (4, 5)),  # nn.Linear on (batch, seq, features)
    "conv2d": (lambda: conv_net(nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 6, 5)), (3, 6, 5)),
}


def make(case: str, n: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    build, shape = CASES[case]
    model = build().to(DTYPE)
    x = torch.randn(n, *shape, dtype=DTYPE)
    y = torch.randint(0, 3, (n,))
    return model, x, y


# ===================================================================================== references
def folded_reference(model: nn.Module, layer_name: str) -> torch.Tensor:
    """``[W | b]`` of a captured layer from the model's ``.grad`` (layouts written out by hand)."""
    modules = dict(model.named_modules())
    owner, _, key = layer_name.rpartition(".")
    if key == "in_proj":
        m = modules[owner]
        parts = [m.in_proj_weight.grad] + ([] if m.in_proj_bias is None else [m.in_proj_bias.grad[:, None]])
        return torch.cat(parts, 1)
    if key in ("q_proj", "k_proj", "v_proj"):
        return getattr(modules[owner], f"{key}_weight").grad
    m = modules[layer_name]
    w = m.weight.grad.T if isinstance(m, (Conv1D, nn.Embedding)) else m.weight.grad.reshape(m.weight.shape[0], -1)
    bias = getattr(m, "bias", None)  # nn.Embedding has none
    return w if bias is None else torch.cat([w, bias.grad[:, None]], 1)


def half_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y).backward()
    return {name: folded_reference(ref, name) for name in names}


def conv_patches(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """Every receptive field of ``conv`` as a row, by explicit indexing over output positions."""
    d = x.dim() - 2
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode.replace("zeros", "constant"))
    else:
        x = F.pad(x, [p for pad in reversed(conv.padding) for p in (pad, pad)])
    k, s, dil = conv.kernel_size, conv.stride, conv.dilation
    outs = [(x.shape[2 + i] - dil[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(d)]
    rows = []
    for n in range(x.shape[0]):
        for pos in itertools.product(*(range(o) for o in outs)):
            index = tuple(slice(p * s[i], p * s[i] + dil[i] * (k[i] - 1) + 1, dil[i]) for i, p in enumerate(pos))
            rows.append(x[(n, slice(None), *index)].reshape(-1))
    return torch.stack(rows)


def textbook_attention(m: nn.MultiheadAttention, q_in, k_in, v_in, batch_first: bool) -> tuple[torch.Tensor, dict]:
    """softmax(Q Kᵀ/√d) V per head with explicit projections; returns output and the projections."""
    if not batch_first:
        q_in, k_in, v_in = (t.transpose(0, 1) for t in (q_in, k_in, v_in))
    n, length, e = q_in.shape
    h, d = m.num_heads, e // m.num_heads
    b = m.in_proj_bias if m.in_proj_bias is not None else torch.zeros(3 * e, dtype=DTYPE)
    if m._qkv_same_embed_dim:
        proj = {"in_proj": q_in @ m.in_proj_weight.T + b}
        q, k, v = proj["in_proj"].chunk(3, -1)
    else:
        proj = {
            "q_proj": q_in @ m.q_proj_weight.T,
            "k_proj": k_in @ m.k_proj_weight.T,
            "v_proj": v_in @ m.v_proj_weight.T,
        }
        q, k, v = proj["q_proj"] + b[:e], proj["k_proj"] + b[e : 2 * e], proj["v_proj"] + b[2 * e :]
    for t in proj.values():
        t.retain_grad()
    split = [t.reshape(n, -1, h, d).transpose(1, 2) for t in (q, k, v)]
    weights = torch.softmax(split[0] @ split[1].transpose(-1, -2) / math.sqrt(d), -1)
    out = m.out_proj((weights @ split[2]).transpose(1, 2).reshape(n, length, e))
    return (out if batch_first else out.transpose(0, 1)), proj


def factor_oracle(
    case: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight_sharing: str = "expand"
) -> dict[str, tuple]:
    """``(A, G)`` of every Kronecker layer of ``model`` from the rows of ``a`` and ``δ`` formed by hand.

    Expand: every (sample, position) row, ``A = Σ a aᵀ / rows``, ``G = (1/n) Σ (nδ)(nδ)ᵀ``. Reduce
    (K-FAC-reduce's definition): one row per sample, the mean of its ``a`` rows and the sum of its ``δ``
    rows (the rows below come sample by sample, positions within), then the same two formulas.
    """
    ref = copy.deepcopy(model)
    n = x.shape[0]
    found: dict[str, tuple] = {}
    outputs: dict[str, tuple] = {}

    def keep(name: str):
        def hook(module, args, out):
            out.retain_grad()
            outputs[name] = (args[0].detach(), out)

        return hook

    for name, module in ref.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D)) and not name.endswith("out_proj"):
            module.register_forward_hook(keep(name))
        if isinstance(module, nn.ReLU):
            module.inplace = False
    if isinstance(ref, Attn):
        q_in, k_in, v_in = ref.inputs(x)
        ref.attn.out_proj.register_forward_hook(keep("attn.out_proj"))
        out, proj = textbook_attention(ref.attn, q_in, k_in, v_in, ref.batch_first)
        torch.testing.assert_close(out, model.attn(q_in, k_in, v_in, need_weights=False)[0])  # the oracle is MHA
        if not ref.batch_first:
            out = out.transpose(0, 1)
        logits = ref.head(out.mean(1))
        F.cross_entropy(logits, y).backward()
        for key, t in proj.items():
            a = {"in_proj": q_in, "q_proj": q_in, "k_proj": k_in, "v_proj": v_in}[key]
            if not ref.batch_first:
                a = a.transpose(0, 1)
            found[f"attn.{key}"] = (a.reshape(-1, a.shape[-1]), t.grad.reshape(-1, t.shape[-1]))
    else:
        F.cross_entropy(ref(x), y).backward()
    modules = dict(ref.named_modules())
    for name, (inp, out) in outputs.items():
        module = modules[name]
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            found[name] = (conv_patches(inp, module), out.grad.movedim(1, -1).reshape(-1, out.shape[1]))
        else:
            found[name] = (inp.reshape(-1, inp.shape[-1]), out.grad.reshape(-1, out.shape[-1]))
    result = {}
    for name, (a, delta) in found.items():
        owner, _, key = name.rpartition(".")
        bias = (
            (modules[owner].in_proj_bias is not None)
            if key == "in_proj"
            else False
            if key in ("q_proj", "k_proj", "v_proj")
            else modules[name].bias is not None
        )
        if bias:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=DTYPE)], 1)
        if weight_sharing == "reduce":
            a = a.reshape(n, -1, a.shape[1]).mean(1)
            delta = delta.reshape(n, -1, delta.shape[1]).sum(1)
        result[name] = (a.T @ a / a.shape[0], (delta * n).T @ (delta * n) / n)
    return result


# ===================================================================================== tests
ATTENTION_LAYERS = {
    "mha-batch-first": ["attn.in_proj", "attn.out_proj", "head"],
    "mha-seq-first": ["attn.in_proj", "attn.out_proj", "head"],
    "mha-separate-qkv": ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "head"],
    "mha-no-bias": ["attn.in_proj", "attn.out_proj", "head"],
    "encoder-layer": ["layer.self_attn.in_proj", "layer.self_attn.out_proj", "layer.linear1", "layer.linear2", "head"],
    "gpt2-conv1d": ["c_fc", "c_proj"],
}


@pytest.mark.parametrize("case", sorted(ATTENTION_LAYERS))
def test_every_projection_gets_curvature_without_warnings(case: str) -> None:
    model, x, y = make(case, 6)
    # a sequence-first encoder with a Linear head: the optimizer cannot know at construction that
    # the head sees (batch, features), and warns unless told with batch_first=True
    options = {"batch_first": True} if case == "encoder-layer" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer = FOP(model, **options, **FAST)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert [layer.name for layer in optimizer.layers] == ATTENTION_LAYERS[case]
    assert set(optimizer.diagnostics()) == set(ATTENTION_LAYERS[case])


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("n", [7])  # unequal halves (4 | 3)
def test_sub_batch_gradients_equal_separate_passes(case: str, n: int, weight_sharing: str) -> None:
    """Sequence-first attention too: the halves are halves of the batch, never of the sequence (and
    weight_sharing changes only the factors)."""
    model, x, y = make(case, n)
    reference = copy.deepcopy(model)
    optimizer = FOP(model, weight_sharing=weight_sharing)
    F.cross_entropy(model(x), y).backward()
    work = captured(optimizer)
    names = list(work)
    n1 = (n + 1) // 2
    g1 = half_grads(reference, x[:n1], y[:n1], names)
    g2 = half_grads(reference, x[n1:], y[n1:], names)
    full = half_grads(reference, x, y, names)
    for name in names:
        torch.testing.assert_close(work[name].g1, g1[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(work[name].g2, g2[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(work[name].grad, full[name], rtol=1e-10, atol=1e-12)


FACTOR_CASES = [c for c in sorted(CASES) if c != "encoder-layer"]


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
@pytest.mark.parametrize("case", FACTOR_CASES)
@pytest.mark.parametrize(("n", "factor_samples", "samples"), [(5, None, slice(None)), (7, 3, [0, 2, 4])])
def test_factors_equal_explicit_second_moments(
    case: str, n: int, factor_samples: int | None, samples: slice | list[int], weight_sharing: str
) -> None:
    """With factor_samples=3 of 7, the factors formed by hand from the samples S = {⌊i·7/3⌋} alone."""
    model, x, y = make(case, n)
    oracle = factor_oracle(case, model, x[samples], y[samples], weight_sharing)
    optimizer = FOP(model, factor_samples=factor_samples, weight_sharing=weight_sharing)
    F.cross_entropy(model(x), y).backward()
    work = captured(optimizer)
    assert set(oracle) == set(work)
    for name, (a, g) in oracle.items():
        torch.testing.assert_close(work[name].a_factor, a, msg=f"A of {name}")
        torch.testing.assert_close(work[name].g_factor, g, msg=f"G of {name}")


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
@pytest.mark.parametrize("case", FACTOR_CASES)
def test_kfac_step_equals_dense_damped_natural_gradient(case: str, weight_sharing: str) -> None:
    """Δθ_ℓ = −lr·(A ⊗ G + λI)⁻¹ g_ℓ per layer, with A, G and g formed by hand."""
    model, x, y = make(case, 6)
    oracle = factor_oracle(case, model, x, y, weight_sharing)
    reference = copy.deepcopy(model)
    grads = half_grads(reference, x, y, list(oracle))
    lr, damping = 0.3, 0.02
    optimizer = KFAC(model, lr=lr, momentum=0.0, damping=damping, kl_clip=None, weight_sharing=weight_sharing, **FAST)
    before = {layer.name: folded_param(layer) for layer in optimizer.layers}
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    for layer in optimizer.layers:
        a, g = oracle[layer.name]
        grad = grads[layer.name]
        m = torch.kron(a, g) + damping * torch.eye(a.shape[0] * g.shape[0], dtype=DTYPE)
        step = torch.linalg.solve(m, grad.T.reshape(-1)).reshape(a.shape[0], g.shape[0]).T
        torch.testing.assert_close(folded_param(layer), before[layer.name] - lr * step, msg=layer.name)


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
@pytest.mark.parametrize(
    "case", ["conv1d", "conv3d", "mha-seq-first", "mha-separate-qkv", "encoder-layer", "gpt2-conv1d"]
)
def test_fop_step_is_the_functional_direction(case: str, weight_sharing: str) -> None:
    """The update is −lr·fop_direction(g1, g2, A, G, λ) of halves from separate passes."""
    model, x, y = make(case, 8)
    check_fop_step(model, x, y, weight_sharing=weight_sharing)


def check_fop_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, dense_a: dict | None = None, **options: object
) -> tuple:
    """One FOP step (lr 0.5, λ 0.05) equals −lr·fop_direction(g1, g2, A, G, λ), the halves from separate passes.

    ``dense_a``: a layer's input factor formed by hand, used instead of the optimizer's. Returns
    ``(optimizer, parameters before the step)``.
    """
    reference = copy.deepcopy(model)
    mode = options.get("damping_mode", "exact")
    optimizer = FOP(model, lr=0.5, momentum=0.0, damping=0.05, kl_clip=None, **{**FAST, **options})
    names = [layer.name for layer in optimizer.layers]
    g1 = half_grads(reference, x[:4], y[:4], names)
    g2 = half_grads(reference, x[4:], y[4:], names)
    before = {layer.name: folded_param(layer) for layer in optimizer.layers}
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    for layer in optimizer.layers:
        state = optimizer.state[layer.weight]
        a = (dense_a or {}).get(layer.name, state["A"])
        expected = fop_direction(g1[layer.name], g2[layer.name], a, state["G"], 0.05, damping_mode=mode)
        torch.testing.assert_close(folded_param(layer), before[layer.name] - 0.5 * expected.direction, msg=layer.name)
    return optimizer, before


def folded_param(layer) -> torch.Tensor:
    """The layer's parameters in the ``[W | b]`` layout, written out per type (not via the layer)."""
    module, w = layer.module, layer.weight.detach()
    w = w.T if isinstance(module, (Conv1D, nn.Embedding)) else w.reshape(w.shape[0], -1)
    return (w if layer.bias is None else torch.cat([w, layer.bias.detach()[:, None]], 1)).clone()


# ------------------------------------------------------------------------ attention conversion
MHA_CONFIGS = {
    "packed": dict(),
    "seq-first": dict(batch_first=False),
    "bias-kv-zero-attn": dict(add_bias_kv=True, add_zero_attn=True),
    "no-bias": dict(bias=False),
    "separate": dict(kdim=5, vdim=7),
    "dropout": dict(dropout=0.3),
}


CALLS = [
    (config, call)
    for config in sorted(MHA_CONFIGS)
    for call in ("self", "masks", "causal", "cross", "unbatched")
    if call == "cross" or "kdim" not in MHA_CONFIGS[config]  # kdim/vdim ≠ embed_dim: no self-attention
]


@pytest.mark.parametrize(("config", "call"), CALLS)
@pytest.mark.parametrize("need_weights", [True, False])
def test_converted_attention_equals_torch(config: str, need_weights: bool, call: str) -> None:
    """Outputs, attention weights and every parameter's gradient agree with nn.MultiheadAttention."""
    kwargs = {"batch_first": True, **MHA_CONFIGS[config]}
    separate = "kdim" in kwargs
    torch.manual_seed(0)
    torch_mha = nn.MultiheadAttention(8, 2, **kwargs).to(DTYPE)
    ours = convert_attention(copy.deepcopy(torch_mha))
    assert type(ours) is MultiheadAttention
    ours.__dict__["_fop_projection_hooks"] = {"in_proj": {0: lambda *a: None}}  # take the captured path
    bf = kwargs["batch_first"]
    x = torch.randn(3, 5, 8, dtype=DTYPE)
    x = x if bf else x.transpose(0, 1)
    mem = torch.randn(3, 4, 8, dtype=DTYPE) if not separate else None
    args: tuple
    extra: dict = {"need_weights": need_weights}
    if call == "cross":
        if separate:
            k, v = torch.randn(3, 4, 5, dtype=DTYPE), torch.randn(3, 4, 7, dtype=DTYPE)
            args = (x, k if bf else k.transpose(0, 1), v if bf else v.transpose(0, 1))
        else:
            mem = mem if bf else mem.transpose(0, 1)
            args = (x, mem, mem)
    elif call == "unbatched":
        x0 = torch.randn(5, 8, dtype=DTYPE)
        args = (x0, x0, x0)
    else:
        args = (x, x, x)
    if call == "masks":
        padding = torch.zeros(3, 5, dtype=torch.bool)
        padding[0, -2:] = True
        extra.update(
            attn_mask=nn.Transformer.generate_square_subsequent_mask(5, dtype=DTYPE),
            key_padding_mask=padding.to(DTYPE) * -1e9,
        )
    if call == "causal":
        extra.update(attn_mask=nn.Transformer.generate_square_subsequent_mask(5, dtype=DTYPE), is_causal=True)
    results = []
    for module in (torch_mha, ours):
        torch.manual_seed(1)  # the same dropout masks
        out, weights = module(*args, **extra)
        (out.square().sum() + (0 if weights is None else weights.sum())).backward()
        results.append((out, weights, [p.grad for p in module.parameters()]))
    (o1, w1, g1), (o2, w2, g2) = results
    torch.testing.assert_close(o2, o1)
    assert (w1 is None) == (w2 is None)
    if w1 is not None:
        torch.testing.assert_close(w2, w1)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a)


def test_conversion_keeps_parameters_state_dict_and_eval_path() -> None:
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True).to(DTYPE)
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    original = copy.deepcopy(model)  # torch's own nn.MultiheadAttention: the reference outputs
    FOP(model)
    assert type(model.self_attn) is MultiheadAttention and isinstance(model.self_attn, nn.MultiheadAttention)
    assert type(original.self_attn) is nn.MultiheadAttention
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    x = torch.randn(2, 5, 8, dtype=DTYPE)
    # training with the hooks' path (grad enabled), then eval under no_grad (torch's fast path)
    torch.testing.assert_close(model(x), original(x), rtol=1e-12, atol=1e-12)
    model.eval(), original.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=1e-12, atol=1e-12)


def test_packed_cross_attention_falls_back_loudly() -> None:
    """Packed in_proj applied to query ≠ key: one warning naming it; its parameters take the plain gradient."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(6, 2, batch_first=True).to(DTYPE)
    optimizer = FOP(mha, lr=0.1, momentum=0.0, **FAST)
    x, mem = torch.randn(4, 3, 6, dtype=DTYPE), torch.randn(4, 5, 6, dtype=DTYPE)
    before = mha.in_proj_weight.detach().clone()
    mha(x, mem, mem)[0].square().sum().backward()
    grad = mha.in_proj_weight.grad.clone()
    with pytest.warns(UserWarning, match=r"in_proj.*cross-attention.*first-order"):
        optimizer.step()
    torch.testing.assert_close(mha.in_proj_weight.detach(), before - 0.1 * grad)
    assert "out_proj" in optimizer.diagnostics()


def test_unsupported_weight_layers_are_named_in_one_warning() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(10, 4, scale_grad_by_freq=True),
        nn.Conv1d(4, 4, 3, groups=2),
        nn.ConvTranspose1d(4, 4, 2),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    with pytest.warns(UserWarning) as record:
        optimizer = FOP(model)
    messages = [str(w.message) for w in record if "no Kronecker curvature" in str(w.message)]
    assert len(messages) == 1
    for name in ("0 (Embedding): scale_grad_by_freq=True", "1 (Conv1d): grouped", "2 (ConvTranspose1d)"):
        assert name in messages[0]
    assert [layer.name for layer in optimizer.layers] == ["4"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FOP(model, exclude=[nn.Embedding, nn.ConvTranspose1d, model[1]])


def test_checkpoint_of_an_attention_model_resumes_exactly() -> None:
    """state_dict() of a converted model and of its optimizer: torch's keys, bitwise resume."""
    import io

    data = [make("encoder-layer", 6, seed=s)[1:] for s in range(4)]
    kw = dict(lr=0.1, fallback="adamw", curvature_update_interval=2, inverse_update_interval=1)

    def train(model: nn.Module, optimizer: FOP, batches: list) -> None:
        for x, y in batches:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    model = make("encoder-layer", 6)[0]
    optimizer = FOP(model, **kw)
    train(model, optimizer, data[:2])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, buffer)
    train(model, optimizer, data[2:])
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = make("encoder-layer", 6, seed=9)[0]  # plain torch modules: the keys are torch's
    resumed.load_state_dict(checkpoint["model"])
    optimizer2 = FOP(resumed, **kw)
    optimizer2.load_state_dict(checkpoint["optim"])
    train(resumed, optimizer2, data[2:])
    for a, b in zip(resumed.parameters(), model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_sequence_first_transformer_layer_equals_batch_first(fisher: str, weight_sharing: str) -> None:
    """The same TransformerEncoderLayer, sequence-first or batch-first: identical factors and halves."""
    seq_first, x, y = make("encoder-layer", 6)
    batch_first = copy.deepcopy(seq_first)
    batch_first.layer.self_attn.batch_first = True  # the layer reads its layout from self_attn
    batch_first.forward = lambda x: batch_first.head(batch_first.layer(x).mean(1))  # type: ignore[method-assign]
    works = []
    for model in (seq_first, batch_first):
        optimizer = FOP(model, fisher=fisher, weight_sharing=weight_sharing, **FAST)
        output = model(x)
        if fisher == "mc":
            optimizer.sample_fisher(output, generator=torch.Generator().manual_seed(3))
        F.cross_entropy(output, y).backward()
        works.append(captured(optimizer))
    for name in works[0]:
        for key in ("a_factor", "g_factor", "g1", "g2"):
            torch.testing.assert_close(
                getattr(works[0][name], key), getattr(works[1][name], key), msg=f"{key} of {name}"
            )


# ------------------------------------------------------------------------ nn.Embedding
VOCAB, SEQ = 11, 5


class TokenNet(nn.Module):
    """Embedding → tanh → mean over positions → Linear; ``seq_first``: indices are (seq, batch)."""

    def __init__(self, seq_first: bool = False, **embedding: object) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 4, **embedding)  # type: ignore[arg-type]
        self.head = nn.Linear(4, 3)
        self.seq_first = seq_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.emb(x.T if self.seq_first else x))
        return self.head(h.mean(0 if self.seq_first else 1))


EMBEDDINGS = {
    "plain": dict(),
    "padding": dict(padding_idx=2),
    "max-norm": dict(max_norm=0.8),
    "seq-first": dict(seq_first=True, padding_idx=0),
}


def make_tokens(case: str, n: int, seed: int = 0) -> tuple[TokenNet, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = TokenNet(**EMBEDDINGS[case]).to(DTYPE)  # type: ignore[arg-type]
    x = torch.randint(0, VOCAB, (n, SEQ))
    x[0, :2] = 2  # the padding index of "padding" occurs, and so do repeated tokens
    x[1, 1] = 0
    return model, x, torch.randint(0, 3, (n,))


def token_options(case: str) -> dict:
    return {"batch_first": False} if EMBEDDINGS[case].get("seq_first") else {}


def embedding_oracle(model: TokenNet, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``A = E[e eᵀ]`` of one-hot rows (zero at the padding index), ``G`` from the output gradients."""
    ref = copy.deepcopy(model)
    keep: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        out.retain_grad()
        keep["out"] = out

    ref.emb.register_forward_hook(hook)
    F.cross_entropy(ref(x), y).backward()
    out = keep["out"]
    rows = F.one_hot(x.reshape(-1), VOCAB).to(DTYPE)  # positions in any order: A, G do not depend on it
    if ref.emb.padding_idx is not None:
        rows[:, ref.emb.padding_idx] = 0.0
    n = x.shape[0]
    delta = out.grad.reshape(-1, out.shape[-1]) * n
    return rows.T @ rows / rows.shape[0], delta.T @ delta / n


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
@pytest.mark.parametrize("case", sorted(EMBEDDINGS))
def test_embedding_factors_and_halves_equal_dense_references(case: str, weight_sharing: str) -> None:
    """A = diag(token counts)/positions (the explicit one-hot second moment), G, g1, g2 from separate passes.

    weight_sharing="reduce" leaves embeddings on expand (their diagonal A), as documented."""
    model, x, y = make_tokens(case, 7)  # unequal halves (4 | 3)
    a, g = embedding_oracle(model, x, y)
    reference = copy.deepcopy(model)
    optimizer = FOP(model, weight_sharing=weight_sharing, **token_options(case))
    F.cross_entropy(model(x), y).backward()
    work = captured(optimizer)["emb"]
    assert work.a_factor.shape == (VOCAB,)  # kept as its diagonal
    torch.testing.assert_close(torch.diag(work.a_factor), a)
    torch.testing.assert_close(work.g_factor, g)
    halves = [half_grads(reference, x[:4], y[:4], ["emb"]), half_grads(reference, x[4:], y[4:], ["emb"])]
    torch.testing.assert_close(work.g1, halves[0]["emb"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(work.g2, halves[1]["emb"], rtol=1e-10, atol=1e-12)
    if "padding_idx" in EMBEDDINGS[case]:
        assert (
            work.a_factor[EMBEDDINGS[case]["padding_idx"]] == 0
            and work.g1[:, EMBEDDINGS[case]["padding_idx"]].abs().max() == 0
        )


@pytest.mark.parametrize("case", sorted(EMBEDDINGS))
def test_embedding_kfac_step_equals_dense_damped_natural_gradient(case: str) -> None:
    """Δθ = −lr·(A ⊗ G + λI)⁻¹ g with the explicit (vocab·dim)² Kronecker product of the dense diagonal A."""
    model, x, y = make_tokens(case, 6)
    a, g = embedding_oracle(model, x, y)
    grad = half_grads(copy.deepcopy(model), x, y, ["emb"])["emb"]
    lr, damping = 0.3, 0.02
    optimizer = KFAC(model, lr=lr, momentum=0.0, damping=damping, kl_clip=None, **token_options(case), **FAST)
    layer = optimizer.layers[0]
    F.cross_entropy(model(x), y).backward()
    before = folded_param(layer)  # after the forward: max_norm renormalises the looked-up rows in place
    optimizer.step()
    m = torch.kron(a, g) + damping * torch.eye(a.shape[0] * g.shape[0], dtype=DTYPE)
    step = torch.linalg.solve(m, grad.T.reshape(-1)).reshape(a.shape[0], g.shape[0]).T
    torch.testing.assert_close(folded_param(layer), before - lr * step)
    assert "A_vectors" not in optimizer.state[layer.weight]  # no eigendecomposition of the vocabulary factor


@pytest.mark.parametrize("case", ["plain", "padding", "seq-first"])
def test_embedding_fop_step_is_the_functional_direction_of_the_dense_factor(case: str) -> None:
    """The update is −lr·fop_direction(g1, g2, A, G, λ) with the dense diag(A) (an eigh path) and separate passes."""
    model, x, y = make_tokens(case, 8)
    a, _ = embedding_oracle(model, x, y)
    optimizer, before = check_fop_step(model, x, y, dense_a={"emb": a}, **token_options(case))
    assert set(optimizer.diagnostics()) == {"emb", "head"}
    if case == "padding":  # the padding row has no gradient, hence no direction
        torch.testing.assert_close(folded_param(optimizer.layers[0])[:, 2], before["emb"][:, 2], rtol=0, atol=0)


@pytest.mark.parametrize("case", ["plain", "padding"])
def test_embedding_fop_step_with_factored_damping_inverts_the_diagonal_factor(case: str) -> None:
    """Factored damping keeps the diagonal A 1-D (its inverse too) and equals the dense factor's Cholesky route."""
    model, x, y = make_tokens(case, 8)
    a, _ = embedding_oracle(model, x, y)
    optimizer, _ = check_fop_step(model, x, y, dense_a={"emb": a}, damping_mode="factored", **token_options(case))
    state = optimizer.state[optimizer.layers[0].weight]
    assert state["A_inv"].dim() == 1 and "A_vectors" not in state


def test_embedding_with_a_large_vocabulary_keeps_a_diagonal_factor() -> None:
    """A 50 000-token vocabulary: the input factor and its decomposition are vectors, never 50 000²."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50_000, 8), nn.Flatten(), nn.Linear(8 * 3, 2))
    optimizer = FOP(model, **FAST)
    x, y = torch.randint(0, 50_000, (16, 3)), torch.randint(0, 2, (16,))
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    state = optimizer.state[model[0].weight]
    assert state["A"].shape == state["A_values"].shape == (50_000,) and "A_vectors" not in state
    assert state["G_vectors"].shape == (8, 8)
    assert set(optimizer.diagnostics()) == {"0", "2"}


def test_sequence_first_embedding_needs_batch_first_false_and_is_named_otherwise() -> None:
    """(seq, batch) indices next to a sequence-first encoder: the embedding is named in the layout warning."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(VOCAB, 6), "enc": nn.TransformerEncoderLayer(6, 2, dim_feedforward=8)})
    with pytest.warns(UserWarning, match=r"outside them \(emb\) are taken as batch first"):
        FOP(model)
    optimizer = FOP(nn.ModuleDict({"emb": nn.Embedding(VOCAB, 6)}), batch_first=False)
    assert optimizer.layers[0].batch_dim == 1


def test_embedding_checkpoint_resumes_exactly() -> None:
    """The 1-D factor through state_dict(): the shape check knows it, the resumed run is bitwise the same."""
    model, x, y = make_tokens("padding", 6)
    resumed = make_tokens("padding", 6, seed=3)[0]
    kw = dict(lr=0.1, curvature_update_interval=1, inverse_update_interval=2)
    train_and_resume(model, resumed, FOP, lambda m: F.cross_entropy(m(x), y), **kw)
    for a, b in zip(resumed.parameters(), model.parameters()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------ factor_samples
SAMPLES = [0, 2, 4]  # factor_samples=3 of a batch of 7: S = {⌊i·7/3⌋ : i < 3}


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_sampled_factors_of_a_sequence_first_transformer_layer(fisher: str) -> None:
    """nn.TransformerEncoderLayer sequence-first (its Linear inputs have the batch on dim 1) samples the
    same batch entries as batch-first, and the empirical factors are the exact factors of the batch S."""
    seq_first, x, y = make("encoder-layer", 7)
    batch_first = copy.deepcopy(seq_first)
    batch_first.layer.self_attn.batch_first = True
    batch_first.forward = lambda x: batch_first.head(batch_first.layer(x).mean(1))  # type: ignore[method-assign]
    subset = copy.deepcopy(seq_first)
    runs = [(seq_first, x, y, 3), (batch_first, x, y, 3)]
    if fisher == "empirical":
        runs.append((subset, x[SAMPLES], y[SAMPLES], None))
    works = []
    for model, inputs, labels, factor_samples in runs:
        optimizer = FOP(model, fisher=fisher, factor_samples=factor_samples, **FAST)
        output = model(inputs)
        if fisher == "mc":
            optimizer.sample_fisher(output, generator=torch.Generator().manual_seed(3))
        F.cross_entropy(output, labels).backward()
        works.append(captured(optimizer))
    for work in works[1:]:
        for name in works[0]:
            for key in ("a_factor", "g_factor"):
                torch.testing.assert_close(
                    getattr(works[0][name], key), getattr(work[name], key), msg=f"{key} of {name}"
                )


@pytest.mark.parametrize("case", sorted(EMBEDDINGS))
def test_sampled_embedding_factors_are_those_of_the_strided_samples(case: str) -> None:
    """The diagonal A = diag(counts in S)/positions(S) and G of the samples S, by hand; halves exact."""
    model, x, y = make_tokens(case, 7)
    a, g = embedding_oracle(model, x[SAMPLES], y[SAMPLES])
    exact_model = copy.deepcopy(model)
    optimizer = FOP(model, factor_samples=3, **token_options(case))
    F.cross_entropy(model(x), y).backward()
    work = captured(optimizer)["emb"]
    exact_optimizer = FOP(exact_model, **token_options(case))
    F.cross_entropy(exact_model(x), y).backward()
    exact = captured(exact_optimizer)["emb"]
    assert work.a_factor.shape == (VOCAB,)
    torch.testing.assert_close(torch.diag(work.a_factor), a)
    torch.testing.assert_close(work.g_factor, g)
    torch.testing.assert_close(work.g1, exact.g1, rtol=0, atol=0)
    torch.testing.assert_close(work.g2, exact.g2, rtol=0, atol=0)
