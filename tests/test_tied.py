"""An output head tied to the token embedding (GPT-2, nanoGPT) against float64 definitions.

The tied weight ``W`` ``(V, D)`` is one :class:`fop.layers.TiedHeadLayer`: the head's Kronecker factors
(``A = E[h hᵀ]`` of the head's inputs, ``G = E[δ δᵀ]`` of its output gradients) applied to the tied
weight's gradient, the sum of the head's and the embedding's. Every reference here is formed with plain
autograd on a copy of the model (no fop hook involved): the halves ``g1``, ``g2`` by separate backward
passes on each half of the batch, the factors from the head's inputs and output gradients kept by a
torch forward hook, the step by a dense solve with the explicit Kronecker product.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _checkpoint import train_and_resume
from fop import FOP, KFAC
from fop.functional import fop_direction
from fop.layers import TiedHeadLayer
from test_curvature import captured

DTYPE = torch.float64
VOCAB, DIM, SEQ = 9, 6, 4
# the dense oracles are those of exact damping (M = A ⊗ G + λI) and no trust region, as in tests/test_layers.py
FAST = dict(curvature_update_interval=1, inverse_update_interval=1, damping_mode="exact")


class TinyGPT(nn.Module):
    """Embedding → residual (Linear, LayerNorm, tanh, Linear) → Linear head tied to the embedding.

    ``bias=False``: no Linear has a bias, and the tied head (V·D = 54 weights, the smallest layer) is
    the loss-scale reference layer, whose reference is then its full gradient (both uses).
    ``seq_first``: tokens ``(T, N)`` and logits ``(T, N, V)``.
    """

    def __init__(self, bias: bool = True, padding_idx: int | None = None, seq_first: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM, padding_idx=padding_idx)
        self.up = nn.Linear(DIM, 2 * DIM, bias=bias)
        self.norm = nn.LayerNorm(2 * DIM)
        self.down = nn.Linear(2 * DIM, DIM, bias=bias)
        self.head = nn.Linear(DIM, VOCAB, bias=bias)
        self.head.weight = self.embed.weight
        self.seq_first = seq_first

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.down(torch.tanh(self.norm(self.up(h))))
        return self.head(h)


CASES = {
    "bias": dict(),
    "no-bias": dict(bias=False),
    "padding": dict(padding_idx=2),
    "seq-first": dict(seq_first=True),
}


def make(case: str, n: int, seed: int = 0) -> tuple[TinyGPT, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = TinyGPT(**CASES[case]).to(DTYPE)  # type: ignore[arg-type]
    x = torch.randint(0, VOCAB, (n, SEQ))
    x[0, :2] = 2  # the padding index of "padding" occurs, and tokens repeat
    y = torch.randint(0, VOCAB, (n, SEQ))
    if model.seq_first:
        return model, x.T.contiguous(), y.T.contiguous()
    return model, x, y


def options(model: TinyGPT) -> dict:
    return {"batch_first": False} if model.seq_first else {}


def samples(model: TinyGPT, t: torch.Tensor, index: slice) -> torch.Tensor:
    """The samples ``index`` of a batch (dim 1 of a sequence-first batch)."""
    return t[:, index] if model.seq_first else t[index]


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position of every sample."""
    return F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))


def tied_grad(model: TinyGPT) -> torch.Tensor:
    """``[∂W | ∂b]`` of the tied weight in the head's layout: ``W.grad`` holds both uses (one Parameter)."""
    w = model.head.weight.grad
    return w.clone() if model.head.bias is None else torch.cat([w, model.head.bias.grad[:, None]], 1)


def reference_grad(model: TinyGPT, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The tied weight's gradient of the mean loss over the union of ``parts``, by plain autograd on a copy."""
    ref = copy.deepcopy(model)
    dim = 1 if model.seq_first else 0
    x = torch.cat([p[0] for p in parts], dim)
    y = torch.cat([p[1] for p in parts], dim)
    loss_of(ref, x, y).backward()
    return tied_grad(ref)


def head_oracle(model: TinyGPT, x: torch.Tensor, y: torch.Tensor, weight_sharing: str = "expand") -> tuple:
    """``A`` and ``G`` of the head by their definitions, from its inputs and output gradients (a torch hook on a copy).

    Expand: ``A = Σ_r a_r a_rᵀ / rows`` (``a = [h, 1]``), ``G = N Σ_r δ_r δ_rᵀ`` (δ: output gradients of
    the mean loss); reduce: each sample's mean input row and summed output gradient, ``A = (1/N) Σ ā āᵀ``,
    ``G = N Σ δ̂ δ̂ᵀ``.
    """
    ref = copy.deepcopy(model)
    kept: dict[str, torch.Tensor] = {}

    def keep(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        kept["in"] = args[0].detach()
        out.retain_grad()
        kept["out"] = out

    ref.head.register_forward_hook(keep)
    loss_of(ref, x, y).backward()
    h, delta = kept["in"], kept["out"].grad
    if model.seq_first:  # (T, N, ·) -> (N, T, ·)
        h, delta = h.transpose(0, 1), delta.transpose(0, 1)
    n = h.shape[0]
    if model.head.bias is not None:
        h = torch.cat([h, torch.ones(*h.shape[:-1], 1, dtype=DTYPE)], -1)
    if weight_sharing == "reduce":
        a_rows, g_rows = h.mean(1), delta.sum(1)
    else:
        a_rows, g_rows = h.reshape(-1, h.shape[-1]), delta.reshape(-1, VOCAB)
    return a_rows.T @ a_rows / a_rows.shape[0], n * g_rows.T @ g_rows


def folded_tied(model: TinyGPT) -> torch.Tensor:
    w = model.head.weight.detach()
    return (w if model.head.bias is None else torch.cat([w, model.head.bias.detach()[:, None]], 1)).clone()


def quiet(build, *args, **kwargs):
    """Construct / step with every warning an error: the tied pair must raise none."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return build(*args, **kwargs)


# ============================================================================ discovery
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("cls", [FOP, KFAC])
def test_the_tied_pair_is_one_layer_named_after_the_head_without_a_warning(case: str, cls: type) -> None:
    model, _, _ = make(case, 4)
    optimizer = quiet(cls, model, **options(model))
    layers = {layer.name: layer for layer in optimizer.layers}
    assert set(layers) == {"up", "down", "head"}
    tied = layers["head"]
    assert isinstance(tied, TiedHeadLayer) and tied.module is model.head and tied.uses == (model.embed,)
    assert tied.weight is model.embed.weight and tied.batch_dim == (1 if model.seq_first else 0)
    assert (tied.out_features, tied.in_features) == (VOCAB, DIM + (model.head.bias is not None))
    kronecker = next(group for group in optimizer.param_groups if group["rule"] == "kronecker")
    assert sum(p is model.embed.weight for p in kronecker["params"]) == 1
    assert all(
        p is not model.embed.weight for g in optimizer.param_groups if g["rule"] != "kronecker" for p in g["params"]
    )
    assert tied.is_reference == (case == "no-bias")


# ============================================================================ halves
@pytest.mark.parametrize("fisher", ["empirical", "mc"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("n", [6, 7])
def test_halves_are_the_tied_weight_gradients_of_each_half(case: str, n: int, fisher: str) -> None:
    """g1, g2: autograd gradients of the tied weight (both uses) on the first ceil(n/2) samples and on the
    rest; grad: on the whole batch. With fisher="mc" the sampled pass adds nothing to them."""
    model, x, y = make(case, n)
    reference = copy.deepcopy(model)
    optimizer = quiet(FOP, model, fisher=fisher, **options(model))
    output = model(x)
    if fisher == "mc":
        optimizer.sample_fisher(output, generator=torch.Generator().manual_seed(1))
    F.cross_entropy(output.reshape(-1, VOCAB), y.reshape(-1)).backward()
    tied = optimizer.layers[-1]
    assert float(tied.foreign_share()) < 1e-12  # p.grad is all the hooks saw, through both modules
    work = captured(optimizer)["head"]
    n1 = (n + 1) // 2
    first, rest = slice(0, n1), slice(n1, n)
    g1 = reference_grad(reference, [(samples(model, x, first), samples(model, y, first))])
    g2 = reference_grad(reference, [(samples(model, x, rest), samples(model, y, rest))])
    torch.testing.assert_close(work.g1, g1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(work.g2, g2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(work.grad, reference_grad(reference, [(x, y)]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["bias", "no-bias", "seq-first"])
@pytest.mark.parametrize("sizes", [(4, 4), (6, 3)])
def test_halves_with_gradient_accumulation(case: str, sizes: tuple[int, int]) -> None:
    """Two micro-batches (loss/2 each): g1 is the mean-loss gradient of both first halves, g2 of both
    second halves, each half weighted as its samples are (6 | 3: split 3|3 and 2|1, the second
    micro-batch split unlike the first, its second half formed explicitly)."""
    model, x, y = make(case, sum(sizes))
    reference = copy.deepcopy(model)
    optimizer = quiet(FOP, model, **options(model))
    a, b = sizes
    chunks = [slice(0, a), slice(a, a + b)]
    for chunk in chunks:
        (loss_of(model, samples(model, x, chunk), samples(model, y, chunk)) / 2).backward()
    assert float(optimizer.layers[-1].foreign_share()) < 1e-12
    work = captured(optimizer)["head"]

    def grad_of(index: slice) -> torch.Tensor:
        return reference_grad(reference, [(samples(model, x, index), samples(model, y, index))])

    a1, b1 = (a + 1) // 2, (b + 1) // 2
    if a == b:  # equal micro-batches: the halves are the mean losses over the unions
        parts1 = [(samples(model, x, s), samples(model, y, s)) for s in (slice(0, a1), slice(a, a + b1))]
        parts2 = [(samples(model, x, s), samples(model, y, s)) for s in (slice(a1, a), slice(a + b1, a + b))]
        g1, g2 = reference_grad(reference, parts1), reference_grad(reference, parts2)
    else:  # each micro-batch's half weighted 1/2, as its loss
        g1 = (grad_of(slice(0, a1)) + grad_of(slice(a, a + b1))) / 2
        g2 = (grad_of(slice(a1, a)) + grad_of(slice(a + b1, a + b))) / 2
    torch.testing.assert_close(work.g1, g1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(work.g2, g2, rtol=1e-10, atol=1e-12)
    full = (grad_of(chunks[0]) + grad_of(chunks[1])) / 2
    torch.testing.assert_close(work.grad, full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["bias", "no-bias"])
def test_halves_follow_p_grad_rescaled_after_backward(case: str) -> None:
    """p.grad unscaled after backward (as GradScaler does): the halves follow it. The loss-scale ratio
    compares p.grad with the hooks' reference, which for the bias-free reference layer is the tied
    weight's full gradient: both uses, or the ratio would be off."""
    model, x, y = make(case, 6)
    reference = copy.deepcopy(model)
    optimizer = quiet(FOP, model)
    (loss_of(model, x, y) * 64).backward()
    for p in model.parameters():
        p.grad /= 64
    work = captured(optimizer)["head"]
    g1 = reference_grad(reference, [(x[:3], y[:3])])
    torch.testing.assert_close(work.g1, g1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(work.g2, reference_grad(reference, [(x[3:], y[3:])]), rtol=1e-10, atol=1e-12)


# ============================================================================ factors
@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("cls", [FOP, KFAC])
def test_factors_are_the_heads_by_their_definition(case: str, cls: type, weight_sharing: str) -> None:
    model, x, y = make(case, 7)
    a, g = head_oracle(model, x, y, weight_sharing)
    optimizer = quiet(cls, model, weight_sharing=weight_sharing, **options(model))
    loss_of(model, x, y).backward()
    work = captured(optimizer)["head"]
    torch.testing.assert_close(work.a_factor, a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(work.g_factor, g, rtol=1e-10, atol=1e-12)
    assert work.samples == 7  # the head's samples, not counted again for the embedding


def untied(model: TinyGPT) -> TinyGPT:
    """A copy whose head has its own weight, equal to the shared one."""
    twin = copy.deepcopy(model)
    twin.head.weight = nn.Parameter(twin.embed.weight.detach().clone())
    return twin


@pytest.mark.parametrize(
    "settings", [dict(factor_samples=3), dict(fisher="mc"), dict(fisher="mc", weight_sharing="reduce")]
)
def test_factors_are_those_of_the_untied_head_under_every_capture_option(settings: dict) -> None:
    """factor_samples and the Monte-Carlo Fisher (the sampled pass goes through both modules): the tied
    layer's factors are exactly those of the same head with a weight of its own."""
    model, x, y = make("bias", 7)
    twin = untied(model)
    factors = []
    for net in (model, twin):
        optimizer = FOP(net, **settings)
        output = net(x)
        if settings.get("fisher") == "mc":
            optimizer.sample_fisher(output, generator=torch.Generator().manual_seed(3))
        F.cross_entropy(output.reshape(-1, VOCAB), y.reshape(-1)).backward()
        work = captured(optimizer)["head"]
        factors.append((work.a_factor, work.g_factor))
    torch.testing.assert_close(factors[0][0], factors[1][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(factors[0][1], factors[1][1], rtol=1e-12, atol=0)


# ============================================================================ one step
@pytest.mark.parametrize("case", sorted(CASES))
def test_kfac_step_is_the_damped_solve_of_the_summed_gradient(case: str) -> None:
    """Δ vec W_f = −lr·(A ⊗ G + λI)⁻¹ vec ∇W_f: the head's factors by hand, the tied gradient by autograd,
    the Kronecker product written out."""
    model, x, y = make(case, 6)
    a, g = head_oracle(model, x, y)
    grad = reference_grad(model, [(x, y)])
    lr, damping = 0.3, 0.02
    optimizer = quiet(KFAC, model, lr=lr, momentum=0.0, damping=damping, kl_clip=None, **FAST, **options(model))
    before = folded_tied(model)
    loss_of(model, x, y).backward()
    quiet(optimizer.step)
    m = torch.kron(a, g) + damping * torch.eye(a.shape[0] * g.shape[0], dtype=DTYPE)
    step = torch.linalg.solve(m, grad.T.reshape(-1)).reshape(a.shape[0], g.shape[0]).T
    torch.testing.assert_close(folded_tied(model), before - lr * step, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("damping_mode", ["exact", "factored"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fop_step_is_the_functional_direction_of_the_tied_halves(case: str, damping_mode: str) -> None:
    """Δ = −lr·fop_direction(g1, g2, A, G, λ) with the halves of the tied weight by separate autograd
    passes and the head's factors by hand (an odd batch: halves of 4 and 3)."""
    model, x, y = make(case, 7)
    a, g = head_oracle(model, x, y)
    first, rest = slice(0, 4), slice(4, 7)
    g1 = reference_grad(model, [(samples(model, x, first), samples(model, y, first))])
    g2 = reference_grad(model, [(samples(model, x, rest), samples(model, y, rest))])
    lr, damping = 0.5, 0.05
    fast = {**FAST, "damping_mode": damping_mode}
    optimizer = quiet(FOP, model, lr=lr, momentum=0.0, damping=damping, kl_clip=None, **fast, **options(model))
    before = folded_tied(model)
    loss_of(model, x, y).backward()
    quiet(optimizer.step)
    expected = fop_direction(g1, g2, a, g, damping, damping_mode=damping_mode).direction
    torch.testing.assert_close(folded_tied(model), before - lr * expected, rtol=1e-9, atol=1e-12)
    assert float(optimizer.diagnostics()["head"]["beta"]) != 0.0


def test_fop_with_the_default_trust_region_trains_without_warnings() -> None:
    model, x, y = make("bias", 8)
    optimizer = quiet(FOP, model, lr=0.05)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        quiet(optimizer.step)
        losses.append(loss.item())
    assert not optimizer._foreign and losses[-1] < losses[0]


# ============================================================================ old behaviour
@pytest.mark.parametrize(
    ("excluded", "message"), [("head", r"embed shares head\.weight"), ("embed", r"head shares embed\.weight")]
)
def test_excluding_either_module_gives_the_old_fallback_and_warning(excluded: str, message: str) -> None:
    model, x, y = make("bias", 6)
    with pytest.warns(UserWarning, match=rf"tied weights.*{message}.*'sgd' fallback rule"):
        optimizer = FOP(model, lr=0.3, fallback="sgd", exclude=[getattr(model, excluded)], **FAST)
    assert [layer.name for layer in optimizer.layers] == ["up", "down"]
    loss_of(model, x, y).backward()
    expected = (model.embed.weight - 0.3 * model.embed.weight.grad).detach()
    optimizer.step()
    torch.testing.assert_close(model.embed.weight.detach(), expected, rtol=0, atol=0)


class ThreeUses(nn.Module):
    """The embedding's table used by two heads: not the tied-head pattern."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.other = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.other.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(tokens))
        return self.head(h) + self.other(h)


class LinearTiedToLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(DIM, DIM)
        self.b = nn.Linear(DIM, DIM)
        self.b.weight = self.a.weight


@pytest.mark.parametrize("build", [ThreeUses, LinearTiedToLinear])
def test_other_sharing_keeps_the_tied_weights_warning(build: type) -> None:
    with pytest.warns(UserWarning) as caught:
        optimizer = FOP(build())
    assert any("tied weights" in str(w.message) for w in caught)
    assert optimizer.layers == []


# ============================================================================ checkpoint
@pytest.mark.parametrize("cls", [FOP, KFAC])
def test_checkpoint_of_the_tied_model_resumes_exactly(cls: type) -> None:
    model, x, y = make("bias", 6)
    resumed = make("bias", 6, seed=3)[0]
    kw = dict(lr=0.1, curvature_update_interval=1, inverse_update_interval=2)
    optimizer = train_and_resume(model, resumed, cls, lambda m: loss_of(m, x, y), **kw)
    assert resumed.head.weight is resumed.embed.weight
    assert optimizer.state[resumed.head.weight]["G"].shape == (VOCAB, VOCAB)
    for a, b in zip(resumed.parameters(), model.parameters()):
        assert torch.equal(a, b)


# ============================================================================ the benchmark's GPT
def test_char_gpt_tied_trains_its_tied_weight_with_curvature() -> None:
    from fop.bench.models import CharGPT

    torch.manual_seed(0)
    model = CharGPT(vocab_size=20, context=16, dim=32, depth=1, tied=True)
    optimizer = quiet(FOP, model, lr=0.01)
    layers = {layer.name: layer for layer in optimizer.layers}
    assert isinstance(layers["head"], TiedHeadLayer) and "token_embed" not in layers
    tokens = torch.randint(0, 20, (8, 17), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(tokens[:, :-1]).reshape(-1, 20), tokens[:, 1:].reshape(-1))
        loss.backward()
        quiet(optimizer.step)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert "G" in optimizer.state[model.head.weight] and not optimizer._foreign
