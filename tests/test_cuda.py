"""The CUDA path: float64 oracles on device tensors, bf16 autocast + GradScaler, channels_last
capture, no host synchronisation in an ordinary or a curvature step, micro-batched accumulation.

Marked ``cuda`` and skipped without a GPU (``pytest -m cuda`` runs only these). Setting
``FOP_TEST_DEVICE=cpu`` runs the device-independent ones on the CPU, which is how they are checked
on machines without a GPU; the synchronisation test needs CUDA's sync debug mode and stays skipped.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fop import FOP, KFAC
from test_optimizer import check_fop_step_is_the_functional_direction, check_kfac_step_equals_dense

DEVICE = torch.device(os.environ.get("FOP_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
F64 = torch.float64
# the dense oracles of this file are those of exact damping (M = A ⊗ G + λI); factored damping, the
# default, has its own in tests/test_options.py
FAST = dict(curvature_update_interval=1, inverse_update_interval=1, damping_mode="exact")


def cnn(seed: int = 0, dtype: torch.dtype = F64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    ).to(dtype)


def images(n: int, seed: int = 1, dtype: torch.dtype = F64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=gen, dtype=dtype), torch.randint(0, 5, (n,), generator=gen)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data: list, device: torch.device) -> None:
    for x, y in data:
        optimizer.zero_grad()
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
        optimizer.step()


def params_cpu(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().cpu().clone() for p in model.parameters()]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor], **tol: float) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **tol)


def test_kfac_step_equals_dense_damped_natural_gradient_on_device() -> None:
    check_kfac_step_equals_dense(DEVICE)


def test_fop_step_is_the_functional_direction_of_separate_halves_on_device() -> None:
    check_fop_step_is_the_functional_direction(DEVICE)


@pytest.mark.parametrize("cls", [FOP, KFAC])
def test_cnn_training_on_device_equals_cpu_in_float64(cls: type) -> None:
    """Conv capture, BatchNorm, eigendecompositions and the trust region agree across devices."""
    data = [images(16, seed) for seed in range(5)]
    on_cpu, on_device = cnn(), cnn().to(DEVICE)
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, damping=1e-2, curvature_update_interval=2)
    train(on_cpu, cls(on_cpu, **kw), data, torch.device("cpu"))
    train(on_device, cls(on_device, **kw), data, DEVICE)
    assert_same(params_cpu(on_device), params_cpu(on_cpu), rtol=1e-7, atol=1e-10)


def test_channels_last_capture_equals_contiguous() -> None:
    data = [images(12, seed) for seed in range(3)]
    dense, nhwc = cnn().to(DEVICE), cnn().to(DEVICE).to(memory_format=torch.channels_last)
    o1, o2 = FOP(dense, lr=0.1, **FAST), FOP(nhwc, lr=0.1, **FAST)
    train(dense, o1, data, DEVICE)
    for x, y in data:
        o2.zero_grad()
        F.cross_entropy(nhwc(x.to(DEVICE).to(memory_format=torch.channels_last)), y.to(DEVICE)).backward()
        o2.step()
    assert_same(params_cpu(nhwc), params_cpu(dense), rtol=1e-9, atol=1e-12)
    for conv in (0, 3):
        for factor in ("A", "G"):
            torch.testing.assert_close(
                o2.state[nhwc[conv].weight][factor], o1.state[dense[conv].weight][factor], rtol=1e-9, atol=1e-12
            )


def test_micro_batched_accumulation_equals_one_batch() -> None:
    """Four micro-batches (loss/4 each) = one batch holding the same first and second halves."""
    x, y = images(32)
    chunks = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    # FOP splits each micro-batch in halves; the whole batch puts all first halves first
    order = torch.cat(
        [torch.arange(i, i + 4) for i in range(0, 32, 8)] + [torch.arange(i + 4, i + 8) for i in range(0, 32, 8)]
    )
    whole, micro = cnn().to(DEVICE), cnn().to(DEVICE)
    whole.eval(), micro.eval()  # BatchNorm statistics of one batch differ from a micro-batch's
    o1, o2 = FOP(whole, lr=0.1, **FAST), FOP(micro, lr=0.1, **FAST)
    for _ in range(2):
        o1.zero_grad()
        F.cross_entropy(whole(x[order].to(DEVICE)), y[order].to(DEVICE)).backward()
        o1.step()
        o2.zero_grad()
        for cx, cy in chunks:
            (F.cross_entropy(micro(cx.to(DEVICE)), cy.to(DEVICE)) / len(chunks)).backward()
        o2.step()
    assert_same(params_cpu(micro), params_cpu(whole), rtol=1e-9, atol=1e-12)


def test_bf16_autocast_with_grad_scaler_trains_with_float32_curvature() -> None:
    model = cnn(dtype=torch.float32).to(DEVICE)
    optimizer = FOP(model, lr=0.05, curvature_update_interval=2)
    scaler = torch.amp.GradScaler(DEVICE.type)
    x, y = (t.to(DEVICE) for t in images(64, dtype=torch.float32))
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    state = optimizer.state[model[0].weight]
    assert state["A"].dtype == torch.float32 and state["G"].dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert int(optimizer.skipped_steps) == 0


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA sync debug mode")
@pytest.mark.parametrize("cls", [FOP, KFAC])
@pytest.mark.parametrize("curvature", [False, True], ids=["ordinary", "curvature"])
def test_step_does_not_synchronise_with_the_host(cls: type, curvature: bool) -> None:
    """zero_grad + forward + backward + step never waits for the device: between curvature steps, and
    (issue #19) on a curvature step that captures the factors and updates the running averages. An
    inverse update still synchronises once, by design: functional.damped_factor_inverse reads whether
    every Cholesky factorisation succeeded before it repairs the ones that did not."""
    model = cnn(dtype=torch.float32).to(DEVICE).to(memory_format=torch.channels_last)
    optimizer = cls(model, lr=0.05, curvature_update_interval=10, inverse_update_interval=20)
    x, y = (t.to(DEVICE) for t in images(32, dtype=torch.float32))
    x = x.to(memory_format=torch.channels_last)

    def step() -> None:
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    # the first curvature cycle, one-time checks, step counters 1, 2, 4, 8; step 10 captures, 12 does not
    for _ in range(10 if curvature else 12):
        step()
    torch.cuda.synchronize()
    assert optimizer.curvature_step == curvature
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_input_factor_of_half_precision_rows_equals_the_float32_product(half: torch.dtype, bias: bool) -> None:
    """Autocast hands the hooks bf16/fp16 inputs; their factor (a half-precision GEMM accumulated in
    float32 on CUDA) equals the float32 product of the up-cast rows up to summation order."""
    from fop.curvature import fold_bias_moment

    gen = torch.Generator().manual_seed(3)
    for n_rows, n_cols in [(5000, 70), (40, 300)]:  # the block-assembled and the augmented-rows paths
        rows = torch.randn(n_rows, n_cols, generator=gen).to(DEVICE, half)
        got = fold_bias_moment(rows, bias, torch.float32)
        assert got.dtype == torch.float32
        up = rows.double()
        if bias:
            up = torch.cat([up, up.new_ones(n_rows, 1)], dim=1)
        exact = up.T @ up  # float64: the products of half values are exact, so is this sum here
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5 * n_rows**0.5)


def test_conv_input_factor_under_autocast_equals_float32_capture() -> None:
    """The whole capture path: a Conv2d under bf16 autocast gets the factor of its bf16 input."""
    if DEVICE.type != "cuda":
        pytest.skip("bf16 autocast of convolutions is a CUDA path")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1)).to(DEVICE)
    x = torch.randn(64, 3, 16, 16, device=DEVICE)
    optimizer = KFAC(model, **FAST)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        hidden = model[1](model[0](x))
        out = model[2](hidden)
    out.float().square().mean().backward()
    optimizer.step()
    a_factor = optimizer.state[model[2].weight]["A"].double()
    patches = F.unfold(hidden.detach().double(), 3, padding=1).transpose(1, 2).reshape(-1, 144)
    patches = torch.cat([patches, patches.new_ones(patches.shape[0], 1)], dim=1)
    torch.testing.assert_close(a_factor, patches.T @ patches / patches.shape[0], rtol=1e-4, atol=1e-6)
