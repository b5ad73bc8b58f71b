"""Training-loop patterns a user writes: each one trains exactly as the method defines, or says why.

The references are float64 and explicit: the Kronecker factors and the two halves' gradients of a
one-layer model are written out (:func:`explicit_fop`), shared or tied weights are checked against
``θ − lr·p.grad``, and everything else against a run that is known to be right.
"""

from __future__ import annotations

import copy
import json
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fop import FOP, KFAC
from fop.curvature import KroneckerLayer
from fop.functional import fop_direction

DTYPE = torch.float64
EXACT = dict(
    momentum=0.0,
    kl_clip=None,
    damping=0.05,
    curvature_update_interval=1,
    inverse_update_interval=1,
    damping_mode="exact",
)


def linear(seed: int = 0, n_in: int = 6, n_out: int = 4) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out).to(DTYPE)


def batch(n: int = 8, n_in: int = 6, classes: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, n_in, generator=gen, dtype=DTYPE), torch.randint(0, classes, (n,), generator=gen)


def folded(layer: nn.Linear) -> torch.Tensor:
    return torch.cat([layer.weight, layer.bias[:, None]], 1).detach().clone()


def explicit_fop(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lr: float, damping: float) -> torch.Tensor:
    """One FOP step of a Linear layer ``w = [W | b]`` under the mean cross-entropy, from formulas.

    ``A = mean aaᵀ`` (a = [x, 1]), ``G = mean δδᵀ`` (δ = softmax − onehot, the per-sample logit
    gradient), halves ``g_h = mean over the half of δ aᵀ`` (first ``ceil(n/2)`` samples, the rest).
    """
    n = x.shape[0]
    rows = torch.cat([x, torch.ones(n, 1, dtype=DTYPE)], 1)
    delta = torch.softmax(rows @ w.T, 1) - F.one_hot(y, w.shape[0]).to(DTYPE)
    a, g = rows.T @ rows / n, delta.T @ delta / n
    n1 = (n + 1) // 2
    g1 = delta[:n1].T @ rows[:n1] / n1
    g2 = delta[n1:].T @ rows[n1:] / (n - n1)
    return w - lr * fop_direction(g1, g2, a, g, damping).direction


def step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


# ---------------------------------------------------------------------- 1. forward without backward
def test_forward_without_backward_leaves_no_trace() -> None:
    model = linear()
    w0 = folded(model)
    optimizer = FOP(model, lr=0.5, **EXACT)
    x, y = batch()
    other, _ = batch(n=5, seed=7)
    optimizer.zero_grad()
    model(other)  # a discarded forward with grad enabled (a logged prediction on another batch)
    F.cross_entropy(model(x), y).backward()
    model(other * 100)  # and one after the backward
    optimizer.step()
    torch.testing.assert_close(folded(model), explicit_fop(w0, x, y, 0.5, 0.05), rtol=1e-10, atol=1e-12)


def test_several_forwards_then_one_backward_of_the_summed_losses() -> None:
    """Equals two accumulated backward passes (exact against separate passes in test_curvature)."""
    x, y = batch(n=12)
    parts = [(x[:6], y[:6]), (x[6:], y[6:])]
    summed, accumulated = linear(), linear()
    opt_s = FOP(summed, lr=0.5, **EXACT)
    opt_a = FOP(accumulated, lr=0.5, **EXACT)
    sum(F.cross_entropy(summed(xi), yi) / 2 for xi, yi in parts).backward()
    opt_s.step()
    for xi, yi in parts:
        (F.cross_entropy(accumulated(xi), yi) / 2).backward()
    opt_a.step()
    torch.testing.assert_close(folded(summed), folded(accumulated), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------- 2. eval mode
def test_eval_mode_trains_with_curvature() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Dropout(0.5)).to(DTYPE)
    w0 = folded(model[0])
    optimizer = FOP(model, lr=0.5, **EXACT)
    model.eval()  # e.g. fine-tuning with frozen BatchNorm statistics and no dropout
    x, y = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(model, optimizer, x, y)
    torch.testing.assert_close(folded(model[0]), explicit_fop(w0, x, y, 0.5, 0.05), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------- 3. tied weights
class TiedLM(nn.Module):
    """An embedding tied to the output layer (the usual language-model setup)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 6)
        self.mix = nn.Linear(6, 6)
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.emb(tokens))))


def test_tied_embedding_and_output_layer_are_one_layer_named_after_the_output_layer() -> None:
    """The tied pair gets the head's curvature on the summed gradient (tests/test_tied.py), no warning."""
    model = TiedLM().to(DTYPE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer = FOP(model, lr=0.3, **EXACT)
    assert [layer.name for layer in optimizer.layers] == ["mix", "out"]
    assert optimizer.layers[1].uses == (model.emb,)


def test_tied_embedding_excluded_gets_one_first_order_update() -> None:
    """exclude=[the embedding] (or the head): the old behaviour, the shared weight on the fallback rule."""
    model = TiedLM().to(DTYPE)
    with pytest.warns(UserWarning, match=r"tied weights.*out shares emb\.weight.*'sgd' fallback rule"):
        optimizer = FOP(model, lr=0.3, fallback="sgd", exclude=[model.emb], **EXACT)
    assert [layer.name for layer in optimizer.layers] == ["mix"]
    tokens, targets = torch.randint(0, 10, (8,)), torch.randint(0, 10, (8,))
    F.cross_entropy(model(tokens), targets).backward()
    expected = (model.emb.weight - 0.3 * model.emb.weight.grad).detach()
    optimizer.step()
    torch.testing.assert_close(model.emb.weight.detach(), expected, rtol=0, atol=0)


class Autoencoder(nn.Module):
    """The encoder's weight also decodes, through ``F.linear(h, enc.weight.T)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(self.enc(x)), self.enc.weight.T)


def test_weight_also_used_functionally_is_detected_and_gets_the_first_order_rule() -> None:
    model = Autoencoder().to(DTYPE)
    optimizer = FOP(model, lr=0.1, **EXACT)
    x, _ = batch()
    for i in range(2):
        optimizer.zero_grad()
        F.mse_loss(model(x), x).backward()
        expected = [(p - 0.1 * p.grad).detach() for p in (model.enc.weight, model.enc.bias)]
        if i == 0:
            with pytest.warns(UserWarning, match=r"enc: \d+\.\d% of its parameters' gradient does not come from"):
                optimizer.step()
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # said once
                optimizer.step()
        torch.testing.assert_close(model.enc.weight.detach(), expected[0], rtol=0, atol=0)
        torch.testing.assert_close(model.enc.bias.detach(), expected[1], rtol=0, atol=0)


def test_gradient_scale_and_clipping_are_not_mistaken_for_foreign_gradient() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(DTYPE)
    optimizer = FOP(model, lr=0.1)
    x, y = batch()
    (F.cross_entropy(model(x), y) * 1024).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()
    assert not optimizer._foreign and not any(layer.verify for layer in optimizer.layers)


def test_gradient_edited_per_element_is_detected_and_gets_the_first_order_rule() -> None:
    model = linear()
    optimizer = FOP(model, lr=0.1, **EXACT)
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    torch.nn.utils.clip_grad_value_(model.parameters(), 0.01)
    expected = [(p - 0.1 * p.grad).detach() for p in model.parameters()]
    with pytest.warns(UserWarning, match=r"p.grad was edited per element or per tensor, e.g. clip_grad_value_"):
        optimizer.step()
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=0)


# ---------------------------------------------------------------------- 4. one Parameter, two modules
def test_parameter_shared_by_two_layers_is_updated_once() -> None:
    torch.manual_seed(0)
    first, second, third = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
    third.weight = second.weight = nn.Parameter(torch.randn(6, 6))
    model = nn.Sequential(first, nn.Tanh(), second, nn.Tanh(), third, nn.Linear(6, 4)).to(DTYPE)
    with pytest.warns(UserWarning, match=r"2 shares 4\.weight.*4 shares 2\.weight"):
        optimizer = FOP(model, lr=0.2, fallback="sgd", **EXACT)
    assert [layer.name for layer in optimizer.layers] == ["0", "5"]
    ids = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    shared = model[2].weight
    expected = (shared - 0.2 * shared.grad).detach()
    optimizer.step()
    torch.testing.assert_close(shared.detach(), expected, rtol=0, atol=0)


# ---------------------------------------------------------------------- 5. frozen, then unfrozen
def test_layer_frozen_at_construction_trains_once_unfrozen() -> None:
    model = linear()
    model.requires_grad_(False)
    optimizer = FOP(model, lr=0.5, **EXACT)
    x, y = batch()
    model.weight.requires_grad_(False)
    model.bias.requires_grad_(True)  # bias-only fine-tuning: the bias gets the first-order rule
    F.cross_entropy(model(x), y).backward()
    expected_bias = (model.bias - 0.5 * model.bias.grad).detach()
    w_before = model.weight.detach().clone()
    optimizer.step()
    torch.testing.assert_close(model.bias.detach(), expected_bias, rtol=0, atol=0)
    torch.testing.assert_close(model.weight.detach(), w_before, rtol=0, atol=0)
    model.requires_grad_(True)
    w0 = folded(model)
    step(model, optimizer, x, y)
    torch.testing.assert_close(folded(model), explicit_fop(w0, x, y, 0.5, 0.05), rtol=1e-10, atol=1e-12)


def test_frozen_layers_cost_no_curvature_capture_and_no_distributed_traffic() -> None:
    from fop.distributed import plan

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 4)).to(DTYPE)
    model[0].requires_grad_(False)
    model[2].requires_grad_(False)
    optimizer = FOP(model, curvature_update_interval=10)
    for seed in range(2):
        step(model, optimizer, *batch(seed=seed))
    assert not optimizer.curvature_step  # the frozen layer, without factors, does not force a capture
    spec = plan(optimizer, model, 2)
    assert [layer.name for layer in spec.layers] == ["3"]
    sizes = spec.bytes_per_step(False)
    assert sizes["reduce"] == 2 * (8 * 4 + 4) * 8  # the two halves of the trained layer only
    assert sizes["all_reduce"] == (2 * 1 + 2 + 1) * 8  # presence counts, call counters, flag


# ---------------------------------------------------------------------- 6. NaN at the first step
@pytest.mark.parametrize("fallback", ["sgd", "adamw"])
def test_non_finite_first_step_leaves_no_trace(fallback: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4)).to(DTYPE)
    reference = copy.deepcopy(model)
    kw = dict(EXACT, momentum=0.9, factor_decay=0.95, fallback=fallback)
    optimizer = FOP(model, lr=0.5, **kw)
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="1 of the first 1 steps were skipped"):
        optimizer.step()
    assert int(optimizer.skipped_steps) == 1
    assert "A" not in optimizer.state[model[0].weight]
    x, y = batch(seed=2)
    step(model, optimizer, x, y)
    ref_opt = FOP(reference, lr=0.5, **kw)
    step(reference, ref_opt, x, y)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    mine, theirs = optimizer.state_dict()["state"], ref_opt.state_dict()["state"]
    assert mine.keys() == theirs.keys() and "A" in mine[0]
    for index, entry in theirs.items():  # factors, eigenbases, momentum buffers, Adam moments
        assert mine[index].keys() == entry.keys()
        for name, value in entry.items():
            torch.testing.assert_close(mine[index][name], value, rtol=0, atol=0)


def test_non_finite_first_step_then_explicit_step() -> None:
    model = linear()
    w0 = folded(model)
    optimizer = FOP(model, lr=0.5, **dict(EXACT, factor_decay=0.95))
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    model.bias.grad[0] = float("inf")
    with pytest.warns(UserWarning, match="1 of the first 1 steps were skipped"):
        optimizer.step()
    step(model, optimizer, x, y)
    torch.testing.assert_close(folded(model), explicit_fop(w0, x, y, 0.5, 0.05), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------- 7. momentum-cycling schedulers
def test_one_cycle_lr_cycles_the_kronecker_groups_momentum() -> None:
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 4)).to(DTYPE)  # noqa: E731
    model, manual = make(), make()
    manual.load_state_dict(model.state_dict())
    optimizer = KFAC(model, lr=0.1, momentum=0.9, curvature_update_interval=1, fallback="sgd")
    twin = KFAC(manual, lr=0.1, momentum=0.9, curvature_update_interval=1, fallback="sgd")
    sgd = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1, momentum=0.9)
    kw = dict(max_lr=0.1, total_steps=6, cycle_momentum=True, base_momentum=0.5, max_momentum=0.95)
    schedulers = [torch.optim.lr_scheduler.OneCycleLR(opt, **kw) for opt in (optimizer, sgd)]
    assert all("betas" not in group for group in optimizer.param_groups)
    momenta = []
    for i in range(5):
        x, y = batch(seed=10 + i)
        for group in twin.param_groups:  # what the schedule should set, by hand
            group["lr"], group["momentum"] = sgd.param_groups[0]["lr"], sgd.param_groups[0]["momentum"]
        momenta.append(sgd.param_groups[0]["momentum"])
        assert [g["momentum"] for g in optimizer.param_groups] == [momenta[-1]] * 2
        step(model, optimizer, x, y)
        step(manual, twin, x, y)
        sgd.step()
        for scheduler in schedulers:
            scheduler.step()
    assert len(set(momenta)) == 5  # the momentum did cycle
    for p, q in zip(model.parameters(), manual.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_momentum_cycling_with_an_adamw_fallback_says_what_it_does() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 4)).to(DTYPE)
    optimizer = FOP(model, lr=0.1, fallback="adamw", fallback_betas=(0.8, 0.99))
    assert optimizer.param_groups[1]["betas"] == (0.8, 0.99) and "betas" not in optimizer.param_groups[0]
    torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=4)
    with pytest.warns(UserWarning, match="the AdamW fallback group keeps its betas"):
        step(model, optimizer, *batch())
    assert optimizer.param_groups[1]["betas"] == (0.8, 0.99)


# ---------------------------------------------------------------------- 8. sequence-first inputs
def test_sequence_first_linear_inputs_are_split_along_the_batch() -> None:
    """(T, B, in) with batch_first=False trains exactly as (B, T, in) with the default."""
    torch.manual_seed(0)
    seq_first, batch_first = nn.Linear(6, 4).to(DTYPE), nn.Linear(6, 4).to(DTYPE)
    batch_first.load_state_dict(seq_first.state_dict())
    opt_s = FOP(seq_first, lr=0.5, batch_first=False, **EXACT)
    opt_b = FOP(batch_first, lr=0.5, **EXACT)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 5, 6, generator=gen, dtype=DTYPE)  # (B, T, in)
    y = torch.randint(0, 4, (8, 5), generator=gen)
    for model, opt, inputs in ((seq_first, opt_s, x.transpose(0, 1)), (batch_first, opt_b, x)):
        out = model(inputs)
        out = out.transpose(0, 1) if model is seq_first else out
        F.cross_entropy(out.reshape(-1, 4), y.reshape(-1)).backward()
        opt.step()
    torch.testing.assert_close(folded(seq_first), folded(batch_first), rtol=1e-10, atol=1e-12)


def test_transformer_layer_with_batch_first_false_is_detected() -> None:
    def encoder(batch_first: bool) -> nn.Module:
        torch.manual_seed(0)
        return nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first).to(DTYPE)

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, 8, generator=gen, dtype=DTYPE)  # (B, S, E)
    models = {}
    for batch_first in (False, True):
        model = encoder(batch_first)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # out_proj is used through F.multi_head_attention_forward
            optimizer = FOP(model, lr=0.3, **EXACT)
            assert {layer.name: layer.batch_dim for layer in optimizer.layers if "linear" in layer.name} == {
                "linear1": 0 if batch_first else 1,
                "linear2": 0 if batch_first else 1,
            }
            out = model(x if batch_first else x.transpose(0, 1))
            out = out if batch_first else out.transpose(0, 1)
            (out**2).mean().backward()
            optimizer.step()
        models[batch_first] = model
    for p, q in zip(models[False].parameters(), models[True].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_linear_layers_outside_a_sequence_first_transformer_are_named() -> None:
    """The tutorial layout: a Linear head on the (S, N, E) output of a batch_first=False encoder."""

    class Tutorial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(x))

    with pytest.warns(
        UserWarning, match=r"the Linear and Embedding layers outside them \(head\) are taken as batch first"
    ):
        FOP(Tutorial())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # out_proj
        layers = {layer.name: layer.batch_dim for layer in FOP(Tutorial(), batch_first=False).layers}
    assert layers["head"] == layers["encoder.linear1"] == 1


# ---------------------------------------------------------------------- 9. copies and pickles
def test_optimizer_copy_and_pickle_say_how_to_duplicate_a_run() -> None:
    model = linear()
    optimizer = FOP(model)
    with pytest.raises(TypeError, match=r"cannot be deep-copied.*load_state_dict\(optimizer.state_dict\(\)\)"):
        copy.deepcopy(optimizer)
    with pytest.raises(TypeError, match=r"cannot be pickled.*torch.save\(optimizer.state_dict\(\)\)"):
        pickle.dumps(optimizer)


def test_copied_or_pickled_model_carries_no_live_hooks() -> None:
    model = linear()
    optimizer = FOP(model, lr=0.5, **EXACT)
    x, y = batch()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        F.cross_entropy(clone(x), y).backward()
        assert not optimizer.layers[0].captured()
        hooked = [getattr(hook, "__self__", None) for hook in clone._forward_hooks.values()]
        assert not any(isinstance(owner, KroneckerLayer) and owner.captured() for owner in hooked)
        w0 = folded(clone)
        clone.zero_grad()
        step(clone, FOP(clone, lr=0.5, **EXACT), x, y)
        torch.testing.assert_close(folded(clone), explicit_fop(w0, x, y, 0.5, 0.05), rtol=1e-10, atol=1e-12)
    w0 = folded(model)
    step(model, optimizer, x, y)
    torch.testing.assert_close(folded(model), explicit_fop(w0, x, y, 0.5, 0.05), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------- 10. checkpoint of another shape
def test_checkpoint_of_another_shape_is_refused_at_load_naming_the_layer() -> None:
    def mlp(hidden: int) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.LayerNorm(hidden), nn.Linear(hidden, 4)).to(DTYPE)

    small = mlp(8)
    saved = FOP(small, lr=0.1, curvature_update_interval=1)
    step(small, saved, *batch())
    big = mlp(9)
    optimizer = FOP(big, lr=0.1)
    with pytest.raises(ValueError) as info:
        optimizer.load_state_dict(saved.state_dict())
    message = str(info.value)
    assert "saved for a model of another shape (nothing was loaded)" in message
    assert "layer 0: G is (8, 8) in the checkpoint, (9, 9) here" in message
    assert "layer 3: A is (9, 9) in the checkpoint, (10, 10) here" in message
    assert "parameter 2.weight: exp_avg is (8,) in the checkpoint, (9,) here" in message  # AdamW (auto)
    assert not optimizer.state


# ---------------------------------------------------------------------- unclear errors and edge cases
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=float("inf")), "lr must be a finite float >= 0, got inf"),
        (dict(damping=float("inf")), "damping must be a finite float > 0, got inf"),
        (dict(fallback_lr=float("inf")), "fallback_lr must be a finite float >= 0, got inf"),
    ],
)
def test_infinite_hyperparameters_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FOP(linear(), **kwargs)


def test_exclude_mistakes_say_what_to_write() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    with pytest.raises(TypeError, match=r"exclude takes a list .*: write exclude=\['2'\]"):
        FOP(model, exclude="2")
    with pytest.raises(TypeError, match=r"exclude takes a list .*: write exclude=\[Linear\(in_features=8"):
        FOP(model, exclude=model[2])
    stranger = nn.Linear(8, 4)
    with pytest.raises(ValueError, match=r"exclude modules are not part of the model: \[Linear\(in_features=8"):
        FOP(model, exclude=[stranger])
    assert [layer.name for layer in FOP(model, exclude=["2"]).layers] == ["0"]
    nested = nn.Sequential(nn.Sequential(nn.Linear(6, 8), nn.Tanh()), nn.ModuleList([nn.Linear(8, 4)]))
    for excluded in ([nested[0]], ["0"], [nested[1]]):  # a container excludes the layers inside it
        kept = [layer.name for layer in FOP(nested, exclude=excluded).layers]
        assert kept == (["1.0"] if excluded != [nested[1]] else ["0.0"])


def test_huge_finite_gradients_skip_the_step_and_say_why() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4))  # float32: the norm of 1e20 overflows
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = FOP(model)
    x, y = batch()
    F.cross_entropy(model(x.float()), y).backward()
    for p in model.parameters():
        p.grad.fill_(1e20)
    with pytest.warns(
        UserWarning,
        match=r"FOP: 1 of the first 1 steps were skipped.*finite but so large that their norm overflows float32",
    ):
        optimizer.step()
    assert int(optimizer.skipped_steps) == 1
    for p, q in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)


def test_nan_steps_are_warned_once_with_their_reason() -> None:
    model = linear()
    optimizer = FOP(model)
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    model.weight.grad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match=r"1 of the first 1 steps were skipped.*contained NaN or Inf"):
        optimizer.step()
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model.weight.grad[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()  # once
    assert int(optimizer.skipped_steps) == 2


def test_sparse_embedding_is_refused_with_the_fix() -> None:
    model = nn.Sequential(nn.Embedding(10, 6, sparse=True), nn.Linear(6, 4))
    with pytest.raises(ValueError, match=r"needs dense gradients: build nn.Embedding .* sparse=False .*\['0'\]"):
        FOP(model)


# ---------------------------------------------------------------------- fop-bench
def _bench_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    from fop.bench.cli import main

    assert main([*argv, "--no-progress", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_bench_unwritable_out_is_refused_before_training(tmp_path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    err = _bench_error(capsys, ["--out", str(afile / "sub")])
    assert err == f"fop-bench: error: --out {afile / 'sub'}: {afile} is a file, not a folder; choose another --out"
    err = _bench_error(capsys, ["--out", str(afile)])
    assert err == f"fop-bench: error: --out {afile}: {afile} is a file, not a folder; choose another --out"
    (tmp_path / "out" / "runs.jsonl").mkdir(parents=True)
    err = _bench_error(capsys, ["--out", str(tmp_path / "out")])
    assert "runs.jsonl exists and is not a file; remove it or choose another --out" in err
    assert not list((tmp_path / "out").glob("*.md"))


def test_bench_damaged_runs_file_skips_bad_records_naming_their_lines(tmp_path) -> None:
    import io
    import json

    from fop.bench.runner import ResultStore, _record_problem, _spec_key

    def record(**change: object) -> dict:
        spec = {"optimizer": "fop", "seed": 0}
        base = {
            "key": _spec_key(spec),
            "spec": spec,
            "status": "ok",
            "epochs_to_target": 3,
            "seconds_to_target": 1.5,
            "best_accuracy": 0.9,
            "final_accuracy": 0.8,
            "median_step_seconds": 0.01,
            "optimizer_share": 0.5,
            "peak_memory_bytes": 1024,
            "curve": [{"seconds": 1.0, "accuracy": 0.5}],
        }
        base.update(change)
        return {k: v for k, v in base.items() if v is not ...}

    lines = [
        b"\xff\xfe garbage",
        json.dumps(record(curve=...)).encode(),
        json.dumps(record(best_accuracy="high")).encode(),
        json.dumps(record(spec={"optimizer": "sgd", "seed": 0})).encode(),
        json.dumps(record(curve=[{"seconds": 1.0}])).encode(),
        b"[1, 2]",
        json.dumps(record()).encode(),
        b'{"key": "partial',  # the unterminated last line of a killed sweep
    ]
    path = tmp_path / "runs.jsonl"
    path.write_bytes(b"\n".join(lines))
    log = io.StringIO()
    records = ResultStore(path).load(log, _record_problem)
    assert list(records) == [record()["key"]]
    assert log.getvalue().splitlines() == [
        f"warning: {path}:1: not UTF-8; line skipped",
        f"warning: {path}:2: field 'curve' is missing; record skipped",
        f"warning: {path}:3: field 'best_accuracy' is a str; record skipped",
        f"warning: {path}:4: its 'key' is not the hash of its 'spec' (edited or truncated); record skipped",
        f"warning: {path}:5: a point of 'curve' lacks numeric 'seconds' and 'accuracy'; record skipped",
        f"warning: {path}:6: not a JSON object; record skipped",
    ]


def test_bench_subset_is_at_most_n_or_says_why() -> None:
    from fop.bench.data import load_digits
    from fop.bench.errors import BenchError

    with pytest.raises(
        BenchError, match=r"--subset 5 is smaller than the number of classes \(10\).*--subset 10 or more"
    ):
        load_digits(subset=5)
    dataset = load_digits(subset=25)
    assert len(dataset.train_labels) <= 25 and len(dataset.test_labels) <= 25


@pytest.mark.parametrize("value", ["inf", "nan", "0"])
def test_bench_lr_grid_must_be_finite_and_positive(capsys, value: str) -> None:
    err = _bench_error(capsys, ["--lr-grid", value])
    assert (
        err
        == f"fop-bench: error: argument --lr-grid: {value!r} is not a comma-separated list of finite positive numbers"
    )


def test_bench_nproc_honours_the_task_optimizers_threads_and_output(tmp_path, capsys, monkeypatch) -> None:
    import fop.bench.scaling as scaling

    err = _bench_error(capsys, ["--nproc", "2", "--optimizers", "fop,sgd"])
    assert err == "fop-bench: error: --nproc measures K-FAC and FOP (and their variants) only, not sgd"
    err = _bench_error(capsys, ["--nproc", "2", "--profile"])
    assert err == "fop-bench: error: --nproc and --profile are two modes of fop-bench; choose one"
    err = _bench_error(capsys, ["--nproc", "3", "--batch-sizes", "64", "--out", str(tmp_path / "x")])
    assert err == "fop-bench: error: --nproc 3 does not divide batch size 64 (the global batch)"

    jobs: list = []

    def launch(job, n):  # noqa: ANN001, ANN202 - stands in for torchrun
        jobs.append((job, n))
        run = {
            "step_seconds": 0.5 / n,
            "optimizer_seconds": 0.1,
            "interval": 2,
            "local_batch": 64 // n,
            "state_bytes_all": [2**20] * n,
        }
        if n > 1:
            sizes = {"total": 2048, "wire_estimate": 1024, "ddp_wire_estimate": 4096}
            run.update(bytes_curvature=sizes, bytes_plain=sizes)
        return {"world": n, "threads": job.threads, "device": "cpu", "runs": {"kfac b=64": run}}

    monkeypatch.setattr(scaling, "_launch", launch)
    from fop.bench.cli import main

    out = tmp_path / "d"
    argv = [
        "--nproc",
        "2",
        "--task",
        "digits-mlp",
        "--optimizers",
        "kfac",
        "--batch-sizes",
        "64",
        "--width",
        "16",
        "--subset",
        "200",
        "--threads",
        "1",
        "--out",
        str(out),
        "--curvature-interval",
        "2",
    ]
    assert main(argv) == 0
    assert [n for _, n in jobs] == [1, 2]
    job = jobs[0][0]
    assert job.task == "digits-mlp" and job.threads == 1 and job.data.subset == 200
    assert [(s.optimizer, s.batch_size, s.width, s.hyperparameters.curvature_interval) for s in job.specs] == [
        ("kfac", 64, 16, 2)
    ]
    table = (out / "scaling.md").read_text()
    assert table.strip() in capsys.readouterr().out
    assert "| kfac b=64 | 2 | 32 | 0.2500 | 0.1000 | 2.00 | 1.00 | 1.00 | 2.0 | 1.0 | 4.0 |" in table
    assert set(json.loads((out / "scaling.json").read_text())) == {"1", "2"}


def test_bench_nproc_runs_every_process_count_with_the_same_threads(monkeypatch) -> None:
    import fop.bench.scaling as scaling
    from fop.bench.cli import main

    threads: dict[int, int] = {}

    def launch(job, n):  # noqa: ANN001, ANN202
        threads[n] = job.threads
        raise SystemExit(0)

    monkeypatch.setattr(scaling, "_launch", launch)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    with pytest.raises(SystemExit):
        main(["--nproc", "4", "--subset", "200", "--batch-sizes", "64", "--no-progress"])
    assert threads == {1: 2}
