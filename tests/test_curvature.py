"""Hook-captured sub-batch gradients and Kronecker factors against separate float64 passes."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fop import FOP, KFAC
from fop.curvature import LayerWork, loss_scale_ratio

DTYPE = torch.float64


class SeqModel(nn.Module):
    """Linear on (batch, seq, features) inputs: every position is a row of the factors."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(x)).mean(1))


class TwiceModel(nn.Module):
    """One Linear used twice in a forward: gradients of both uses add up."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.shared(torch.tanh(self.shared(x))))


def conv_model(**conv_kwargs) -> nn.Module:
    conv = nn.Conv2d(3, 4, **conv_kwargs)
    with torch.no_grad():
        probe = conv(torch.zeros(1, 3, 7, 7))
    return nn.Sequential(conv, nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(probe.numel(), 3))


CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "linear": (lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)), (4,)),
    "linear-no-bias": (lambda: nn.Sequential(nn.Linear(4, 6, bias=False), nn.Tanh(), nn.Linear(6, 3)), (4,)),
    "linear-3d": (SeqModel, (5, 4)),
    "linear-twice": (TwiceModel, (4,)),
    "conv-3x3-pad1": (lambda: conv_model(kernel_size=3, padding=1), (3, 7, 7)),
    "conv-stride2-nobias": (lambda: conv_model(kernel_size=3, stride=2, bias=False), (3, 7, 7)),
    "conv-dilation2": (lambda: conv_model(kernel_size=3, dilation=2, padding=2), (3, 7, 7)),
    "conv-rect-kernel": (lambda: conv_model(kernel_size=(2, 3), stride=(1, 2)), (3, 7, 7)),
    "conv-same": (lambda: conv_model(kernel_size=4, padding="same"), (3, 7, 7)),
    "conv-reflect": (lambda: conv_model(kernel_size=3, padding=1, padding_mode="reflect"), (3, 7, 7)),
    # one output position: G's moment takes the (rows, out) path instead of per-sample products
    "conv-one-position": (lambda: conv_model(kernel_size=7), (3, 7, 7)),
}


def make(case: str, n: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    build, shape = CASES[case]
    model = build().to(DTYPE)
    x = torch.randn(n, *shape, dtype=DTYPE)
    y = torch.randint(0, 3, (n,))
    return model, x, y


def folded_grads(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        m = modules[name]
        w = m.weight.grad.reshape(m.weight.shape[0], -1)
        out[name] = w if m.bias is None else torch.cat([w, m.bias.grad[:, None]], 1)
    return out


def reference_grad(model: nn.Module, chunks: list[tuple[torch.Tensor, torch.Tensor]], names: list[str]) -> dict:
    """Gradient of the mean loss over the union of ``chunks``, by a separate backward pass."""
    ref = copy.deepcopy(model)
    x = torch.cat([c[0] for c in chunks])
    y = torch.cat([c[1] for c in chunks])
    F.cross_entropy(ref(x), y).backward()
    return folded_grads(ref, names)


def captured(optimizer: FOP) -> dict[str, LayerWork]:
    ratio = loss_scale_ratio(optimizer.layers)
    return {layer.name: LayerWork.from_capture(layer, ratio) for layer in optimizer.layers}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("n", [6, 7])
def test_sub_batch_gradients_equal_separate_passes(case: str, n: int) -> None:
    model, x, y = make(case, n)
    reference = copy.deepcopy(model)
    optimizer = FOP(model)
    F.cross_entropy(model(x), y).backward()
    work = captured(optimizer)
    names = list(work)
    n1 = (n + 1) // 2
    g1 = reference_grad(reference, [(x[:n1], y[:n1])], names)
    g2 = reference_grad(reference, [(x[n1:], y[n1:])], names)
    for name in names:
        torch.testing.assert_close(work[name].g1, g1[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(work[name].g2, g2[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["linear", "linear-3d", "conv-3x3-pad1"])
def test_sub_batch_gradients_with_accumulation(case: str) -> None:
    """Two micro-batches, loss/2 each: g1 is the mean-loss gradient of both first halves."""
    model, x, y = make(case, 8)
    reference = copy.deepcopy(model)
    optimizer = FOP(model)
    for chunk in (slice(0, 4), slice(4, 8)):
        (F.cross_entropy(model(x[chunk]), y[chunk]) / 2).backward()
    work = captured(optimizer)
    names = list(work)
    g1 = reference_grad(reference, [(x[0:2], y[0:2]), (x[4:6], y[4:6])], names)
    g2 = reference_grad(reference, [(x[2:4], y[2:4]), (x[6:8], y[6:8])], names)
    full = reference_grad(reference, [(x, y)], names)
    for name in names:
        torch.testing.assert_close(work[name].g1, g1[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(work[name].g2, g2[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(work[name].grad, full[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["linear", "conv-stride2-nobias"])
def test_sub_batch_gradients_with_unequal_micro_batches(case: str) -> None:
    """Micro-batches of 6 and 3 samples (loss/2 each): each is split (3|3, 2|1) and weighted alike."""
    model, x, y = make(case, 9)
    reference = copy.deepcopy(model)
    optimizer = FOP(model)
    for chunk in (slice(0, 6), slice(6, 9)):
        (F.cross_entropy(model(x[chunk]), y[chunk]) / 2).backward()
    work = captured(optimizer)
    names = list(work)
    parts = [
        reference_grad(reference, [(x[s], y[s])], names) for s in (slice(0, 3), slice(6, 8), slice(3, 6), slice(8, 9))
    ]
    for name in names:
        torch.testing.assert_close(work[name].g1, (parts[0][name] + parts[1][name]) / 2, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(work[name].g2, (parts[2][name] + parts[3][name]) / 2, rtol=1e-10, atol=1e-12)


def patches_by_loops(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Every receptive field of ``conv`` as a row, by explicit indexing (independent of unfold)."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    # the module's own padding amounts ("same" included), in its padding mode
    xp = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode.replace("zeros", "constant"))
    rows = []
    for n in range(x.shape[0]):
        for i in range(0, xp.shape[2] - dh * (kh - 1), sh):
            for j in range(0, xp.shape[3] - dw * (kw - 1), sw):
                rows.append(xp[n, :, i : i + dh * (kh - 1) + 1 : dh, j : j + dw * (kw - 1) + 1 : dw].reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize(
    "case", ["linear", "linear-3d", "conv-3x3-pad1", "conv-stride2-nobias", "conv-dilation2", "conv-one-position"]
)
def test_factors_equal_explicit_second_moments(case: str) -> None:
    model, x, y = make(case, 6)
    for module in model.modules():  # retain_grad below must see the layer's own output
        if isinstance(module, nn.ReLU):
            module.inplace = False
    optimizer = FOP(model)
    layer = optimizer.layers[0]
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        inputs.append(args[0].detach())
        out.retain_grad()
        outputs.append(out)

    layer.module.register_forward_hook(keep)
    n = x.shape[0]
    F.cross_entropy(model(x), y).backward()
    work = captured(optimizer)[layer.name]
    module = layer.module
    if isinstance(module, nn.Conv2d):
        rows = patches_by_loops(inputs[0], module)
        deltas = outputs[0].grad.permute(0, 2, 3, 1).reshape(-1, module.out_channels)
    else:
        rows = inputs[0].reshape(-1, inputs[0].shape[-1])
        deltas = outputs[0].grad.reshape(-1, outputs[0].shape[-1])
    if module.bias is not None:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=DTYPE)], 1)
    per_sample = deltas * n  # δ of a mean loss: n·∂L/∂out
    torch.testing.assert_close(work.a_factor, rows.T @ rows / rows.shape[0])
    torch.testing.assert_close(work.g_factor, per_sample.T @ per_sample / n)


@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 1), (1, 1, 0), (3, 2, 0), (5, 1, 2)])
def test_conv_patches_are_unfolded_in_chunks_no_larger_than_the_input(kernel: int, stride: int, padding: int) -> None:
    conv = nn.Conv2d(4, 8, kernel, stride=stride, padding=padding)
    layer = FOP(nn.Sequential(conv, nn.Flatten())).layers[0]
    x = torch.randn(40, 4, 12, 12)
    chunks = layer.unfold_chunks(x)
    assert torch.equal(torch.cat(chunks), x)
    for chunk in chunks:
        patches = F.unfold(chunk, kernel, padding=padding, stride=stride)
        assert patches.numel() <= x.numel() or chunk.shape[0] == 1
    # split exactly when the whole batch's patches outgrow the input (not for a 1x1 kernel)
    whole = F.unfold(x, kernel, padding=padding, stride=stride).numel()
    assert (len(chunks) > 1) == (whole > x.numel())
    assert kernel == 1 or len(chunks) > 1


def test_forwards_without_backward_leave_statistics_alone() -> None:
    """no_grad forwards and forwards that no backward reaches record nothing, in either mode."""
    model, x, y = make("linear", 6)
    optimizer = FOP(model)
    for training in (False, True):
        model.train(training)
        with torch.no_grad():
            model(x)
        model(x)  # grad enabled, never backpropagated
    for layer in optimizer.layers:
        assert not layer.captured()
        assert layer._pending.a_rows == 0 and layer._pending.a_sum is None
    model.eval()  # eval mode trains like train mode (this model has no dropout or norm layer)
    F.cross_entropy(model(x), y).backward()
    assert all(layer.captured() for layer in optimizer.layers)


def test_zero_grad_drops_pending_statistics() -> None:
    """A step skipped by GradScaler is followed by zero_grad: nothing of it may leak into the next."""
    model, x, y = make("linear", 6)
    optimizer = KFAC(model)
    F.cross_entropy(model(x), y).backward()
    optimizer.zero_grad()
    assert not any(layer.captured() for layer in optimizer.layers)
    model2, *_ = make("linear", 6)
    model2.load_state_dict(model.state_dict())
    F.cross_entropy(model(x[:3]), y[:3]).backward()  # cleared by model.zero_grad(set_to_none) below
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    fresh = KFAC(model2)
    F.cross_entropy(model2(x), y).backward()
    for a, b in zip(captured(optimizer).values(), captured(fresh).values()):
        torch.testing.assert_close(a.a_factor, b.a_factor)
        torch.testing.assert_close(a.g_factor, b.g_factor)


def test_in_place_activation_after_layer_keeps_output_gradient() -> None:
    """ReLU(inplace=True) overwrites the layer output; the hook must still see ∂L/∂output."""
    model, x, y = make("linear", 8)
    reference = copy.deepcopy(model)
    reference[1] = nn.ReLU(inplace=False)
    optimizer = FOP(model)
    F.cross_entropy(model(x), y).backward()
    ref_opt = FOP(reference)
    F.cross_entropy(reference(x), y).backward()
    for a, b in zip(captured(optimizer).values(), captured(ref_opt).values()):
        torch.testing.assert_close(a.g1, b.g1)
        torch.testing.assert_close(a.g_factor, b.g_factor)


# ------------------------------------------------------------------------------ factor_samples
# (n, m, S): the evenly strided samples S = {⌊i·n/m⌋ : i < m}, written out
STRIDED = [(8, 4, [0, 2, 4, 6]), (7, 3, [0, 2, 4]), (9, 2, [0, 4])]


def dense_factors(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str, weight_sharing: str = "expand"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = Σ a aᵀ / rows`` and ``G = (1/n) Σ_i δ_i δ_iᵀ`` (δ_i: sample i's own output gradients, summed
    over its rows) of layer ``name`` on the batch ``x`` alone, by hand: patches by explicit indexing,
    per-sample output gradients from the summed loss (each sample's gradient is its own).

    ``weight_sharing="reduce"`` (K-FAC-reduce, by its definition): the rows of each sample i are replaced
    by their mean ``ā_i`` and its output gradients by their sum ``δ̂_i``: ``A = (1/n) Σ_i ā_i ā_iᵀ``,
    ``G = (1/n) Σ_i δ̂_i δ̂_iᵀ``."""
    ref = copy.deepcopy(model)
    for module in ref.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    module = dict(ref.named_modules())[name]
    kept: dict[str, torch.Tensor] = {}

    def keep(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        kept["in"] = args[0].detach()
        out.retain_grad()
        kept["out"] = out

    module.register_forward_hook(keep)
    F.cross_entropy(ref(x), y, reduction="sum").backward()
    n = x.shape[0]
    if isinstance(module, nn.Conv2d):
        rows = patches_by_loops(kept["in"], module)  # sample by sample, positions within
        per_sample = kept["out"].grad.flatten(2).transpose(1, 2)  # (n, positions, out)
    else:
        rows = kept["in"].reshape(-1, kept["in"].shape[-1])
        per_sample = kept["out"].grad.reshape(n, -1, kept["out"].shape[-1])  # (n, positions, out)
    if module.bias is not None:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=DTYPE)], 1)
    if weight_sharing == "reduce":
        rows = torch.stack([sample.mean(0) for sample in rows.reshape(n, -1, rows.shape[1])])
        per_sample = per_sample.sum(1, keepdim=True)  # each sample's one row: its summed output gradient
    g = sum(d.T @ d for d in per_sample)
    return rows.T @ rows / rows.shape[0], g / n


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
@pytest.mark.parametrize("case", ["linear", "linear-3d", "conv-3x3-pad1", "conv-stride2-nobias", "conv-dilation2"])
@pytest.mark.parametrize(("n", "m", "samples"), STRIDED)
def test_sampled_factors_are_the_dense_factors_of_the_strided_samples(
    case: str, n: int, m: int, samples: list[int], weight_sharing: str
) -> None:
    """factor_samples=m: A and G of every layer are those of the m samples S alone, computed by hand;
    the halves and the gradient stay those of the whole batch (bitwise as without sampling)."""
    model, x, y = make(case, n)
    exact_model = copy.deepcopy(model)
    optimizer = FOP(model, factor_samples=m, weight_sharing=weight_sharing)
    F.cross_entropy(model(x), y).backward()
    work = captured(optimizer)
    exact_optimizer = FOP(exact_model, weight_sharing=weight_sharing)
    F.cross_entropy(exact_model(x), y).backward()
    exact = captured(exact_optimizer)
    for name, item in work.items():
        a, g = dense_factors(model, x[samples], y[samples], name, weight_sharing)
        torch.testing.assert_close(item.a_factor, a, rtol=1e-10, atol=1e-12, msg=f"A of {name}")
        torch.testing.assert_close(item.g_factor, g, rtol=1e-10, atol=1e-12, msg=f"G of {name}")
        assert not torch.allclose(item.g_factor, exact[name].g_factor)  # a subset, not the batch
        for key in ("grad", "g1", "g2"):
            torch.testing.assert_close(getattr(item, key), getattr(exact[name], key), rtol=0, atol=0)


WEIGHT_SHARING_CASES = [c for c in sorted(CASES) if c != "linear-twice"]  # the oracle hooks one call


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
@pytest.mark.parametrize("case", WEIGHT_SHARING_CASES)
def test_dense_factors_oracle_is_the_full_batch_factor(case: str, weight_sharing: str) -> None:
    """The oracle above, on the whole batch, is the optimizer's factor (the same normalisation), for
    both weight_sharing modes; reduce's halves and gradient are expand's, bit for bit."""
    model, x, y = make(case, 7)
    trained, expanded = copy.deepcopy(model), copy.deepcopy(model)
    optimizer = FOP(trained, weight_sharing=weight_sharing)
    F.cross_entropy(trained(x), y).backward()
    expand_optimizer = FOP(expanded)
    F.cross_entropy(expanded(x), y).backward()
    expand_work = captured(expand_optimizer)
    for name, item in captured(optimizer).items():
        for key in ("grad", "g1", "g2"):
            torch.testing.assert_close(getattr(item, key), getattr(expand_work[name], key), rtol=0, atol=0)
        a, g = dense_factors(model, x, y, name, weight_sharing)
        torch.testing.assert_close(item.a_factor, a, rtol=1e-10, atol=1e-12, msg=f"A of {name}")
        torch.testing.assert_close(item.g_factor, g, rtol=1e-10, atol=1e-12, msg=f"G of {name}")


@pytest.mark.parametrize("case", ["linear", "linear-3d", "conv-3x3-pad1"])
@pytest.mark.parametrize("cls", [FOP, KFAC])
def test_factor_samples_of_the_whole_batch_or_more_is_exact(case: str, cls: type) -> None:
    """factor_samples >= n takes every sample: the statistics equal the default's bit for bit."""
    model, x, y = make(case, 6)
    works = []
    for factor_samples in (None, 6, 50):
        copy_ = copy.deepcopy(model)
        optimizer = cls(copy_, factor_samples=factor_samples)
        F.cross_entropy(copy_(x), y).backward()
        works.append(captured(optimizer))
    for work in works[1:]:
        for name, item in work.items():
            for key in ("a_factor", "g_factor", "grad", "g1", "g2"):
                value, exact = getattr(item, key), getattr(works[0][name], key)
                assert (value is None) == (exact is None), key
                if value is not None:
                    torch.testing.assert_close(value, exact, rtol=0, atol=0, msg=f"{key} of {name}")


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
@pytest.mark.parametrize("case", ["linear", "linear-3d", "conv-stride2-nobias"])
def test_sampled_factors_with_accumulation_subsample_each_micro_batch(case: str, weight_sharing: str) -> None:
    """Micro-batches of 4 (loss/2 each), factor_samples=2: samples {0, 2} and {4, 6}, each micro-batch's
    sums scaled by 4/2, i.e. the factors of one batch of 8 with factor_samples=4 (the same samples)."""
    model, x, y = make(case, 8)
    whole = copy.deepcopy(model)
    optimizer = FOP(model, factor_samples=2, weight_sharing=weight_sharing)
    for chunk in (slice(0, 4), slice(4, 8)):
        (F.cross_entropy(model(x[chunk]), y[chunk]) / 2).backward()
    work = captured(optimizer)
    whole_optimizer = FOP(whole, factor_samples=4, weight_sharing=weight_sharing)
    F.cross_entropy(whole(x), y).backward()
    for name, item in captured(whole_optimizer).items():
        torch.testing.assert_close(work[name].a_factor, item.a_factor, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(work[name].g_factor, item.g_factor, rtol=1e-10, atol=1e-12)
        a, g = dense_factors(model, x[[0, 2, 4, 6]], y[[0, 2, 4, 6]], name, weight_sharing)
        torch.testing.assert_close(item.g_factor, g, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(item.a_factor, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
@pytest.mark.parametrize("case", ["linear-3d", "conv-3x3-pad1"])
def test_sampled_monte_carlo_fisher_uses_the_same_samples(case: str, weight_sharing: str) -> None:
    """fisher="mc", factor_samples=3 of 7: G is (1/3) Σ_{i∈S} δ_i δ_iᵀ of the sampled labels' loss
    on the samples S = {0, 2, 4}, A the input factor of the same samples."""
    model, x, y = make(case, 7)
    samples = [0, 2, 4]
    reference = copy.deepcopy(model)
    optimizer = FOP(model, fisher="mc", factor_samples=3, weight_sharing=weight_sharing)
    output = model(x)
    optimizer.sample_fisher(output, generator=torch.Generator().manual_seed(5))
    F.cross_entropy(output, y).backward()
    work = captured(optimizer)
    with torch.no_grad():  # the labels sample_fisher drew: the same generator on the same probabilities
        probs = torch.softmax(reference(x), -1)
    drawn = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(5)).squeeze(-1)
    for name, item in work.items():
        a, g = dense_factors(reference, x[samples], drawn[samples], name, weight_sharing)
        torch.testing.assert_close(item.a_factor, a, rtol=1e-10, atol=1e-12, msg=f"A of {name}")
        torch.testing.assert_close(item.g_factor, g, rtol=1e-10, atol=1e-12, msg=f"G of {name}")


# ------------------------------------------------------------------------------ weight_sharing
@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
@pytest.mark.parametrize("case", ["linear-3d", "conv-3x3-pad1", "conv-stride2-nobias"])
def test_factors_with_accumulation_are_those_of_the_union(case: str, weight_sharing: str) -> None:
    """Micro-batches of 3 and 5 samples (loss weighted 3/8 and 5/8, the mean over the union): the factors
    of the 8 samples by hand (per sample one mean row and one summed gradient with reduce); the halves
    are expand's, bit for bit."""
    model, x, y = make(case, 8)
    expanded = copy.deepcopy(model)
    works = []
    for net, mode in ((model, weight_sharing), (expanded, "expand")):
        optimizer = FOP(net, weight_sharing=mode)
        for chunk in (slice(0, 3), slice(3, 8)):
            (F.cross_entropy(net(x[chunk]), y[chunk]) * (chunk.stop - chunk.start) / 8).backward()
        works.append(captured(optimizer))
    for name, item in works[0].items():
        a, g = dense_factors(model, x, y, name, weight_sharing)
        torch.testing.assert_close(item.a_factor, a, rtol=1e-10, atol=1e-12, msg=f"A of {name}")
        torch.testing.assert_close(item.g_factor, g, rtol=1e-10, atol=1e-12, msg=f"G of {name}")
        for key in ("grad", "g1", "g2"):
            torch.testing.assert_close(getattr(item, key), getattr(works[1][name], key), rtol=0, atol=0)


class SeqFirstModel(SeqModel):
    """:class:`SeqModel` whose inner Linear sees (seq, batch, features): built with ``batch_first=False``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(x.transpose(0, 1))).mean(0))


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
def test_sequence_first_linear_factors_are_those_of_its_batch_first_twin(weight_sharing: str, fisher: str) -> None:
    """A sequence-first Linear reduces over the sequence, not the batch: its factors are the batch-first
    model's, formed by hand (per sample: mean input row, summed output gradient), its halves split the batch."""
    model, x, y = make("linear-3d", 7)
    twin = SeqFirstModel().to(DTYPE)
    twin.load_state_dict(model.state_dict())
    optimizer = FOP(twin, batch_first=False, weight_sharing=weight_sharing, fisher=fisher)
    output = twin(x)
    labels = y
    if fisher == "mc":
        optimizer.sample_fisher(output, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():  # the labels sample_fisher drew
            labels = torch.multinomial(torch.softmax(model(x), -1), 1, generator=torch.Generator().manual_seed(3))
        labels = labels.squeeze(-1)
    F.cross_entropy(output, y).backward()
    work = captured(optimizer)
    a, g = dense_factors(model, x, labels, "inner", weight_sharing)
    torch.testing.assert_close(work["inner"].a_factor, a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(work["inner"].g_factor, g, rtol=1e-10, atol=1e-12)
    g1 = reference_grad(model, [(x[:4], y[:4])], ["inner"])["inner"]
    torch.testing.assert_close(work["inner"].g1, g1, rtol=1e-10, atol=1e-12)


def run_steps(model: nn.Module, optimizer: FOP, x: torch.Tensor, y: torch.Tensor, steps: int = 4) -> list:
    """``steps`` steps of two accumulated micro-batches; the parameters and every state tensor after them."""
    for _ in range(steps):
        optimizer.zero_grad()
        for chunk in (slice(0, 4), slice(4, 8)):
            (F.cross_entropy(model(x[chunk]), y[chunk]) / 2).backward()
        optimizer.step()
        x = x.roll(1, 0)
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return [p.detach() for p in model.parameters()] + state


@pytest.mark.parametrize("cls", [FOP, KFAC])
@pytest.mark.parametrize("case", ["linear", "linear-3d", "conv-3x3-pad1"])
def test_expand_is_the_default_and_reduce_without_positions_is_expand(case: str, cls: type) -> None:
    """weight_sharing="expand" trains bit for bit as the default; so does "reduce" on a model whose layers
    have no shared positions ("linear"); on the others it trains differently. (Against the code before
    the option existed, the same runs were compared once, bit for bit: the expand path is unchanged.)"""
    model, x, y = make(case, 8)
    options = dict(curvature_update_interval=2, inverse_update_interval=2)
    runs = {}
    for mode in (None, "expand", "reduce"):
        net = copy.deepcopy(model)
        optimizer = cls(net, **options) if mode is None else cls(net, weight_sharing=mode, **options)
        runs[mode] = run_steps(net, optimizer, x, y)
    for default, expand in zip(runs[None], runs["expand"], strict=True):
        assert torch.equal(default, expand)
    identical = all(torch.equal(a, b) for a, b in zip(runs[None], runs["reduce"], strict=True))
    assert identical == (case == "linear")


def test_weight_sharing_edit_of_the_param_group_applies_from_the_next_forward() -> None:
    """``group["weight_sharing"] = "reduce"`` after construction: from the next forward on, the factors are
    those of an optimizer built with it; a forward taken before the edit keeps the mode it started with."""
    model, x, y = make("conv-3x3-pad1", 8)
    works = {}
    for mode in ("expand", "reduce"):
        net = copy.deepcopy(model)
        optimizer = FOP(net, weight_sharing=mode)
        F.cross_entropy(net(x), y).backward()
        works[mode] = captured(optimizer)
    edited = copy.deepcopy(model)
    optimizer = FOP(edited)
    output = edited(x)
    for group in optimizer.param_groups:
        group["weight_sharing"] = "reduce"
    F.cross_entropy(output, y).backward()  # this forward started with expand
    works["forward before the edit"] = captured(optimizer)
    optimizer.zero_grad()
    F.cross_entropy(edited(x), y).backward()
    works["forward after the edit"] = captured(optimizer)
    for name in works["expand"]:
        for key in ("a_factor", "g_factor"):
            before, after = works["forward before the edit"][name], works["forward after the edit"][name]
            assert torch.equal(getattr(before, key), getattr(works["expand"][name], key)), f"{key} of {name}"
            assert torch.equal(getattr(after, key), getattr(works["reduce"][name], key)), f"{key} of {name}"


@pytest.mark.parametrize("case", ["conv-3x3-pad1", "linear-3d"])
def test_reduce_under_cpu_bf16_autocast_takes_the_rounded_input_in_float32(case: str) -> None:
    """bf16 autocast, weight_sharing="reduce": A is the float64 reduce factor of the bf16-rounded input
    (the per-sample means accumulated in float32), G that of the float64 model to bf16's precision."""
    model, x, y = make(case, 6)
    trained = copy.deepcopy(model).float()
    optimizer = FOP(trained, weight_sharing="reduce")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(trained(x.float()), y)
    loss.backward()
    work = captured(optimizer)
    name = optimizer.layers[0].name
    rounded = x.to(torch.bfloat16).to(DTYPE)
    a, g = dense_factors(model, rounded, y, name, "reduce")
    assert work[name].a_factor.dtype == torch.float32
    torch.testing.assert_close(work[name].a_factor.to(DTYPE), a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(work[name].g_factor.to(DTYPE), g, rtol=5e-2, atol=5e-2 * float(g.abs().max()))
