"""Distributed FOP / K-FAC on torch.distributed (gloo, CPU, real processes).

Every process group is started the way ``torchrun`` starts one (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``, ``env://``): this file is also the worker script
(``python tests/test_distributed.py --worker SCENARIOS OUT``). One launch per world size runs all
of that size's scenarios and saves each rank's results; the tests compare them with single-process
runs on the concatenated global batch (the even ranks' data first) in the pytest process.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fop import FOP, KFAC
from fop.distributed import (
    DistributedCommunicator,
    LocalCommunicator,
    Reduced,
    assign_owners,
    layer_cost,
    state_bytes,
)

DTYPE = torch.float64
GLOBAL_BATCH = 16
HYPER = dict(
    lr=0.1,
    momentum=0.9,
    weight_decay=1e-3,
    damping=1e-2,
    factor_decay=0.9,
    curvature_update_interval=2,
    inverse_update_interval=2,
)
LAUNCH_TIMEOUT = 60  # seconds per process group
TOL = dict(rtol=1e-9, atol=1e-11)


# ===================================================================================== shared setup
class Scaled(nn.Module):
    """A network times a bare scalar parameter (a fallback parameter outside Linear/Conv2d)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)).to(
        DTYPE
    )


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    )
    return Scaled(net).to(DTYPE)


def bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).to(DTYPE)


def norm_only(seed: int = 0) -> nn.Module:
    """No Linear or Conv2d: every parameter takes the fallback rule."""
    torch.manual_seed(seed)
    return Scaled(nn.Sequential(nn.LayerNorm(6), nn.Flatten())).to(DTYPE)


class AttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2)  # sequence-first
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(0, 1)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(0))


def attention_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return AttentionNet().to(DTYPE)


class EmbeddingNet(nn.Module):
    """Token indices (batch, 5) from a vocabulary of 13, padding index 0: diagonal input factor."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(13, 4, padding_idx=0)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(x)).mean(1))


def embedding_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return EmbeddingNet().to(DTYPE)


class TiedNet(nn.Module):
    """Token indices (batch, 5) and 13 classes from a head tied to the embedding: one TiedHeadLayer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, VOCAB)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(x))).mean(1))


def tied_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TiedNet().to(DTYPE)


VOCAB = 13
MODELS = {
    "mlp": (mlp, (6,), 4),
    "cnn": (cnn, (2, 6, 6), 3),
    "bn": (bn_net, (2, 6, 6), 3),
    "norm": (norm_only, (6,), 6),
    "attn": (attention_net, (4, 6), 3),
    "emb": (embedding_net, (5,), 3),
    "tied": (tied_net, (5,), VOCAB),
}


def global_batches(kind: str, steps: int, size: int = GLOBAL_BATCH, seed: int = 1) -> list:
    _, shape, classes = MODELS[kind]
    gen = torch.Generator().manual_seed(seed)

    def inputs() -> torch.Tensor:
        if kind in ("emb", "tied"):
            return torch.randint(0, VOCAB, (size, *shape), generator=gen)
        return torch.randn(size, *shape, generator=gen, dtype=DTYPE)

    return [(inputs(), torch.randint(0, classes, (size,), generator=gen)) for _ in range(steps)]


def local_part(batch: tuple, rank: int, world: int, split: str = "parity") -> tuple:
    """This rank's share of a global batch.

    ``parity``: the even ranks split the first half, the odd ranks the second half, so that
    single-process FOP's in-batch halves are the two process groups. ``equal``: rank r takes the
    r-th of ``world`` equal chunks (for K-FAC, which has no halves).
    """
    x, y = batch
    n = x.shape[0]
    if split == "equal":
        k = n // world
        return x[rank * k : (rank + 1) * k], y[rank * k : (rank + 1) * k]
    half = n // 2
    members = (world + 1) // 2 if rank % 2 == 0 else world // 2
    k = half // members
    start = (0 if rank % 2 == 0 else half) + (rank // 2) * k
    return x[start : start + k], y[start : start + k]


def train(model: nn.Module, optimizer: Any, batches: list, micro: int = 1) -> None:
    for x, y in batches:
        optimizer.zero_grad()
        for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
            (F.cross_entropy(model(xm), ym) / micro).backward()
        optimizer.step()


SCALED_KWARGS: dict[str, Any] = {"kl_clip": None}
LOSS_SCALE, MAX_NORM = 1024.0, 0.05


def train_scaled_and_clipped(model: nn.Module, forward: nn.Module, optimizer: Any, batches: list) -> None:
    """As a ``GradScaler`` + ``clip_grad_norm_`` loop: scaled loss, ``p.grad`` unscaled, then clipped."""
    for x, y in batches:
        optimizer.zero_grad()
        (F.cross_entropy(forward(x), y) * LOSS_SCALE).backward()
        for p in model.parameters():
            p.grad /= LOSS_SCALE
        norm = nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        assert norm > MAX_NORM  # the clipping scales the gradients
        optimizer.step()


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def make_optimizer(name: str, model: nn.Module, **kwargs: Any) -> Any:
    extra = {"fallback": "adamw", "fallback_lr": 1e-2} if isinstance(model, Scaled) else {}
    cls = FOP if name == "fop" else KFAC
    return cls(model, **{**HYPER, **extra, **kwargs})


# ===================================================================================== worker side
def _record(opt: Any) -> dict[str, Any]:
    comm = opt.communicator
    return {
        "assignment": dict(comm.assignment),
        "loads": list(comm.loads),
        "bytes_curvature": comm.bytes_per_step(True),
        "bytes_plain": comm.bytes_per_step(False),
        "last_step_bytes": dict(comm.last_step_bytes),
        "state_bytes": state_bytes(opt),
        "diagnostics": {k: {n: float(v) for n, v in d.items()} for k, d in opt.diagnostics().items()},
        "noise_scale": opt.gradient_noise_scale(),
    }


def _run(rank: int, world: int, opt_name: str, kind: str, steps: int = 4, split: str = "parity", **kwargs: Any) -> dict:
    model = MODELS[kind][0]()
    opt = make_optimizer(opt_name, model, **kwargs)
    size = GLOBAL_BATCH if split == "parity" else 4 * world
    data = [local_part(b, rank, world, split) for b in global_batches(kind, steps, size)]
    train(model, opt, data)
    out = _record(opt)
    out["params"] = params_of(model)
    out["buffers"] = [b.detach().clone() for b in model.buffers()]
    return out


def _expect_error(fn: Any) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def scenario_equivalence(rank: int, world: int, out: dict) -> None:
    for opt_name in ("fop", "kfac"):
        for kind in ("mlp", "cnn", "tied"):
            out[f"{opt_name}_{kind}"] = _run(rank, world, opt_name, kind)
    out["fop_mlp_replicated"] = _run(rank, world, "fop", "mlp", replicated=True)
    out["kfac_cnn_replicated"] = _run(rank, world, "kfac", "cnn", replicated=True)
    out["fop_cnn_sampled"] = _run(rank, world, "fop", "cnn", factor_samples=2)  # of 8 (world 2) or 4 local samples
    out["fop_cnn_reduce"] = _run(rank, world, "fop", "cnn", weight_sharing="reduce")
    # gradient accumulation: two micro-batches per step
    model = mlp()
    opt = make_optimizer("fop", model)
    train(model, opt, [local_part(b, rank, world) for b in global_batches("mlp", 3)], micro=2)
    out["fop_mlp_accum"] = {"params": params_of(model)}
    out["fop_bn"] = _run(rank, world, "fop", "bn", steps=3)
    out["fop_scaler"] = {"params": scaler_run(rank, world)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the model has no supported layer"
        out["fop_norm"] = _run(rank, world, "fop", "norm", steps=3)


def scaler_run(rank: int, world: int) -> list[torch.Tensor]:
    """Loss scaling where one process overflows at step 1: every process must skip that step.

    ``ShardedGradScaler`` all-reduces the found-inf flags (a plain ``GradScaler`` would skip
    ``step()`` on the overflowing process only, and the others would wait for it).
    """
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    model = mlp()
    opt = make_optimizer("fop", model)
    scaler = ShardedGradScaler(device="cpu", init_scale=2.0**10)
    for k, (x, y) in enumerate(local_part(b, rank, world) for b in global_batches("mlp", 3)):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if k == 1 and rank == world - 1:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return params_of(model)


class Misused(nn.Module):
    """An MLP whose middle layer's weight is also used outside the layer's forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.to(DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(h)) + 0.1 * F.linear(h, self.b.weight)
        return self.c(h)


def scenario_misuse(rank: int, world: int, out: dict) -> None:
    """The weight used outside its forward: the first-order rule for that layer, as on one process."""
    model = Misused()
    opt = make_optimizer("fop", model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, opt, [local_part(b, rank, world) for b in global_batches("mlp", 4)])
    out["fop_misused"] = {"params": params_of(model), "warnings": [str(w.message) for w in caught]}


def scenario_checkpoint(rank: int, world: int, out: dict, directory: Path, load_from: str | None) -> None:
    data = global_batches("mlp", 6)
    model = mlp()
    opt = make_optimizer("fop", model)
    if load_from is None:
        train(model, opt, [local_part(b, rank, world) for b in data[:3]])
        state = opt.state_dict()  # a collective: every process calls it
        if rank == 0:
            torch.save({"model": model.state_dict(), "optimizer": state}, directory / "checkpoint.pt")
        out["local_state_keys"] = {
            name: sorted(opt.state[layer.weight]) for name, layer in ((l.name, l) for l in opt.layers)
        }
    else:
        checkpoint = torch.load(load_from, weights_only=False)
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
        out["local_state_keys"] = {layer.name: sorted(opt.state[layer.weight]) for layer in opt.layers}
    train(model, opt, [local_part(b, rank, world) for b in data[3:]])
    out["resumed_params"] = params_of(model)


def scenario_odd(rank: int, world: int, out: dict) -> None:
    """Three processes out of four (a subgroup passed to the communicator)."""
    sub = dist.new_group([0, 1, 2], timeout=datetime.timedelta(seconds=30))
    if rank == 3:
        return
    for opt_name in ("kfac", "fop"):
        model = mlp()
        opt = make_optimizer(opt_name, model, distributed=DistributedCommunicator(group=sub))
        size = 12 if opt_name == "kfac" else 24
        data = [local_part(b, rank, 3, "equal") for b in global_batches("mlp", 4, size)]
        train(model, opt, data)
        out[f"odd_{opt_name}"] = {"params": params_of(model), "assignment": dict(opt.communicator.assignment)}


def hooked_ddp(
    kind: str, opt_name: str = "fop", optimizer_kwargs: dict | None = None, **ddp_kwargs: Any
) -> tuple[nn.Module, nn.Module, Any]:
    """(model, DDP wrapper, optimizer on the module with dual_gradient_hook registered)."""
    from fop import dual_gradient_hook

    model = MODELS[kind][0]()
    ddp = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    opt = make_optimizer(opt_name, ddp.module, **(optimizer_kwargs or {}))
    ddp.register_comm_hook(opt, dual_gradient_hook)
    return model, ddp, opt


def scenario_ddp(rank: int, world: int, out: dict) -> None:
    """DistributedDataParallel with FOP's communication hook, as a DDP user trains."""
    from fop import dual_gradient_hook
    from fop.ddp import bytes_per_step as ddp_bytes_per_step

    kinds = (("fop", "mlp"), ("fop", "cnn"), ("kfac", "mlp"), ("fop", "emb"), ("fop", "tied"), ("kfac", "tied"))
    for opt_name, kind in kinds:
        model, ddp, opt = hooked_ddp(kind, opt_name, bucket_cap_mb=1e-4)  # several buckets
        train(ddp, opt, [local_part(b, rank, world) for b in global_batches(kind, 4)])
        out[f"ddp_{opt_name}_{kind}"] = {
            "params": params_of(model),
            "bytes": dict(opt.communicator.last_step_bytes),
            "predicted": ddp_bytes_per_step(opt, curvature_step=False),  # the 4th step has no capture
            "diagnostics": {k: {n: float(v) for n, v in d.items()} for k, d in opt.diagnostics().items()},
        }
    # gradient accumulation under no_sync(): the hook runs once, on the last micro-batch
    model, ddp, opt = hooked_ddp("mlp")
    for x, y in [local_part(b, rank, world) for b in global_batches("mlp", 3)]:
        opt.zero_grad()
        (xa, xb), (ya, yb) = x.chunk(2), y.chunk(2)
        with ddp.no_sync():
            (F.cross_entropy(ddp(xa), ya) / 2).backward()
        (F.cross_entropy(ddp(xb), yb) / 2).backward()
        opt.step()
    out["ddp_fop_accum"] = {"params": params_of(model)}
    # K-FAC-reduce's factors travel as expand's do
    model, ddp, opt = hooked_ddp("cnn", optimizer_kwargs={"weight_sharing": "reduce"})
    train(ddp, opt, [local_part(b, rank, world) for b in global_batches("cnn", 4)])
    out["ddp_fop_cnn_reduce"] = {"params": params_of(model)}
    # attention (converted nn.MultiheadAttention) under DDP
    model, ddp, opt = hooked_ddp("attn")
    train(ddp, opt, [local_part(b, rank, world) for b in global_batches("attn", 3)])
    out["ddp_fop_attn"] = {"params": params_of(model), "layers": [layer.name for layer in opt.layers]}
    # loss scaling and clipping: the hooks (and DDP's buckets) see the scaled loss, p.grad the
    # unscaled, clipped one; no trust region, which would hide a wrongly scaled direction
    model, ddp, opt = hooked_ddp("mlp", optimizer_kwargs=SCALED_KWARGS)
    train_scaled_and_clipped(model, ddp, opt, [local_part(b, rank, world) for b in global_batches("mlp", 3)])
    out["ddp_fop_scaled"] = {"params": params_of(model)}
    # built "before init_process_group" (as the auto mode would then pick it), no hook: one loud warning
    model = mlp()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = make_optimizer("fop", model, distributed=LocalCommunicator(auto=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(ddp, opt, [local_part(b, rank, world) for b in global_batches("mlp", 2)])
    out["ddp_without_hook_warnings"] = [str(w.message) for w in caught]
    # built before init_process_group, the hook registered afterwards (a trainer that wraps the model
    # late): the hook's first bucket replaces the local communicator in the middle of the first
    # backward, the layers whose hooks ran before that recorded in-batch halves the step must not use
    model = mlp()
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1e-4)  # several buckets
    opt = make_optimizer("fop", model, distributed=LocalCommunicator(auto=True))
    ddp.register_comm_hook(opt, dual_gradient_hook)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(ddp, opt, [local_part(b, rank, world) for b in global_batches("mlp", 4)])
    out["ddp_hook_after_local"] = {
        "params": params_of(model),
        "communicator": type(opt.communicator).__name__,
        "warnings": [str(w.message) for w in caught],
    }


def scenario_errors(rank: int, world: int, out: dict) -> None:
    out["err_hyper"] = _expect_error(lambda: make_optimizer("fop", mlp(), lr=0.1 if rank == 0 else 0.2))
    out["err_layers"] = _expect_error(lambda: make_optimizer("fop", mlp() if rank == 0 else cnn()))
    out["err_kind"] = _expect_error(lambda: make_optimizer("fop" if rank == 0 else "kfac", mlp()))
    out["err_ddp"] = _expect_error(lambda: FOP(nn.parallel.DistributedDataParallel(mlp())))
    emb = embedding_net()
    opt = make_optimizer("fop", emb)
    out["err_embedding"] = _expect_error(
        lambda: train(emb, opt, [local_part(b, rank, world) for b in global_batches("emb", 1)])
    )

    class Skipper(nn.Module):  # rank 1 does not use its second layer
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.a(x))
            if rank == 0:
                h = torch.tanh(self.b(h))
            return self.c(h)

    model = Skipper().to(DTYPE)
    opt = make_optimizer("fop", model)
    data = [local_part(b, rank, world) for b in global_batches("mlp", 1)]
    out["err_unused"] = _expect_error(lambda: train(model, opt, data))

    scenario_out_of_step(rank, world, out)

    # frozen at construction, unfrozen later: distributed runs lay out their collectives at construction
    model = mlp()
    model[0].requires_grad_(False)
    opt = make_optimizer("fop", model)
    model[0].requires_grad_(True)
    out["err_unfrozen"] = _expect_error(
        lambda: train(model, opt, [local_part(b, rank, world) for b in global_batches("mlp", 1)])
    )

    # a process that stops taking part: the other one gets an error after the timeout
    model = mlp()
    opt = make_optimizer("fop", model, distributed=DistributedCommunicator(timeout=2))
    data = [local_part(b, rank, world) for b in global_batches("mlp", 1)]
    if rank == 0:
        start = time.perf_counter()
        out["err_timeout"] = _expect_error(lambda: train(model, opt, data))
        out["timeout_seconds"] = time.perf_counter() - start
    else:
        time.sleep(5)  # never calls step(); stays alive past rank 0's timeout


def scenario_out_of_step(rank: int, world: int, out: dict) -> None:
    """Processes that call step() / state_dict() a different number of times fail fast, everywhere."""
    data = [local_part(b, rank, world) for b in global_batches("mlp", 3)]

    def run(skip: bool = False, twice: bool = False, save_alone: bool = False) -> None:
        model = mlp()
        opt = make_optimizer("fop", model, distributed=DistributedCommunicator(timeout=5))
        for k, (x, y) in enumerate(data):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if skip and rank == 1 and k == 1:
                continue  # this process skips one step()
            opt.step()
            if twice and rank == 1 and k == 0:
                opt.step()
            if save_alone and rank == 0 and k == 0:
                opt.state_dict()

    out["err_skip"] = _expect_error(lambda: run(skip=True))
    out["err_twice"] = _expect_error(lambda: run(twice=True))
    start = time.perf_counter()
    out["err_save_alone"] = _expect_error(lambda: run(save_alone=True))
    out["save_alone_seconds"] = time.perf_counter() - start


def worker(scenarios: str, directory: str, load_from: str | None) -> None:
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=LAUNCH_TIMEOUT))
    out: dict[str, Any] = {}
    path = Path(directory)
    for name in scenarios.split(","):
        if name == "equivalence":
            scenario_equivalence(rank, world, out)
        elif name == "checkpoint":
            scenario_checkpoint(rank, world, out, path, load_from)
        elif name == "odd":
            scenario_odd(rank, world, out)
        elif name == "ddp":
            scenario_ddp(rank, world, out)
        elif name == "errors":
            scenario_errors(rank, world, out)
        elif name == "misuse":
            scenario_misuse(rank, world, out)
        torch.save(out, path / f"rank{rank}.pt")  # after each scenario: partial results survive
    if "errors" not in scenarios:
        dist.barrier()
        dist.destroy_process_group()


# ===================================================================================== launcher
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, scenarios: str, directory: Path, load_from: Path | None = None) -> list[dict]:
    """Start ``world`` processes as torchrun would, wait for them, return each rank's results."""
    directory.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
        )
        cmd = [sys.executable, __file__, "--worker", scenarios, str(directory)]
        if load_from is not None:
            cmd.append(str(load_from))
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"distributed run ({world} processes, {scenarios}) exceeded {LAUNCH_TIMEOUT} s")
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        if proc.returncode != 0:
            pytest.fail(f"rank {rank} of {world} failed (exit {proc.returncode}):\n{log[-4000:]}")
    return [torch.load(directory / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


@pytest.fixture(scope="module")
def world2(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    directory = tmp_path_factory.mktemp("world2")
    return launch(2, "equivalence,checkpoint,ddp,misuse,errors", directory), directory


@pytest.fixture(scope="module")
def world4(tmp_path_factory: pytest.TempPathFactory, world2: tuple[list[dict], Path]) -> list[dict]:
    checkpoint = world2[1] / "checkpoint.pt"
    return launch(4, "equivalence,checkpoint,odd,ddp", tmp_path_factory.mktemp("world4"), load_from=checkpoint)


def reference(opt_name: str, kind: str, steps: int = 4, size: int = GLOBAL_BATCH, micro: int = 1) -> list[torch.Tensor]:
    """Single-process run on the global batches."""
    model = MODELS[kind][0]()
    opt = make_optimizer(opt_name, model)
    train(model, opt, global_batches(kind, steps, size), micro=micro)
    return params_of(model)


def reference_on(opt_name: str, kind: str, batches: list) -> list[torch.Tensor]:
    model = MODELS[kind][0]()
    opt = make_optimizer(opt_name, model)
    train(model, opt, batches)
    return params_of(model)


def assert_params(actual: list[torch.Tensor], expected: list[torch.Tensor], **tol: Any) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **(tol or TOL))


def assert_ranks_agree(results: list[dict], key: str, field: str = "params") -> None:
    for rank, res in enumerate(results[1:], start=1):
        for a, b in zip(res[key][field], results[0][key][field]):
            assert torch.equal(a, b), f"{key}: rank {rank}'s {field} differ from rank 0's"


# ===================================================================================== tests
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "tied"])  # tied: a head tied to the embedding
@pytest.mark.parametrize("opt_name", ["fop", "kfac"])
def test_distributed_equals_single_process_on_global_batch(request, world, kind, opt_name) -> None:
    results = request.getfixturevalue(f"world{world}")
    results = results[0] if world == 2 else results
    key = f"{opt_name}_{kind}"
    assert_ranks_agree(results, key)
    assert_params(results[0][key]["params"], reference(opt_name, kind))


@pytest.mark.parametrize("world", [2, 4])
def test_replicated_mode_equals_single_process(request, world) -> None:
    results = request.getfixturevalue(f"world{world}")
    results = results[0] if world == 2 else results
    for key, (opt_name, kind) in {"fop_mlp_replicated": ("fop", "mlp"), "kfac_cnn_replicated": ("kfac", "cnn")}.items():
        assert_ranks_agree(results, key)
        assert_params(results[0][key]["params"], reference(opt_name, kind))
        assert set(results[0][key]["assignment"].values()) == {0}  # every process computes every layer
        assert results[0][key]["bytes_curvature"]["calls"] == 1


@pytest.mark.parametrize("world", [2, 4])
def test_sampled_factors_per_process_equal_single_process(request, world) -> None:
    """factor_samples=2 of each process's local batch (stride 4 of 8, or 2 of 4), factors averaged over
    the processes: one process on the global batch of 16 with factor_samples=2·world (the same samples)."""
    results = request.getfixturevalue(f"world{world}")
    results = results[0] if world == 2 else results
    assert_ranks_agree(results, "fop_cnn_sampled")
    model = cnn()
    train(model, make_optimizer("fop", model, factor_samples=2 * world), global_batches("cnn", 4))
    assert_params(results[0]["fop_cnn_sampled"]["params"], params_of(model))
    assert not torch.allclose(params_of(model)[0], reference("fop", "cnn")[0])  # the sampling acted


@pytest.mark.parametrize("world", [2, 4])
def test_reduced_factors_per_process_equal_single_process(request, world) -> None:
    """weight_sharing="reduce": each process's factors of its local samples, averaged over the processes
    (fop's communicator and DDP's hook alike), are those of one process on the global batch."""
    results = request.getfixturevalue(f"world{world}")
    results = results[0] if world == 2 else results
    model = cnn()
    train(model, make_optimizer("fop", model, weight_sharing="reduce"), global_batches("cnn", 4))
    assert not torch.allclose(params_of(model)[0], reference("fop", "cnn")[0])  # reduce acted
    for key in ("fop_cnn_reduce", "ddp_fop_cnn_reduce"):
        assert_ranks_agree(results, key)
        assert_params(results[0][key]["params"], params_of(model))


@pytest.mark.parametrize("world", [2, 4])
def test_gradient_accumulation_equals_single_process(request, world) -> None:
    results = request.getfixturevalue(f"world{world}")
    results = results[0] if world == 2 else results
    assert_ranks_agree(results, "fop_mlp_accum")
    # the global m-th micro-batch is the union of the processes' m-th micro-batches, even ranks first
    model = mlp()
    opt = make_optimizer("fop", model)
    ranks = list(range(0, world, 2)) + list(range(1, world, 2))
    for batch in global_batches("mlp", 3):
        opt.zero_grad()
        parts = [[t.chunk(2) for t in local_part(batch, r, world)] for r in ranks]
        for m in range(2):
            x = torch.cat([p[0][m] for p in parts])
            y = torch.cat([p[1][m] for p in parts])
            (F.cross_entropy(model(x), y) / 2).backward()
        opt.step()
    assert_params(results[0]["fop_mlp_accum"]["params"], params_of(model))


def test_loss_scaling_overflow_on_one_process_skips_the_step_everywhere(world2) -> None:
    results, _ = world2
    assert_ranks_agree(results, "fop_scaler")
    batches = global_batches("mlp", 3)
    assert_params(results[0]["fop_scaler"]["params"], reference_on("fop", "mlp", [batches[0], batches[2]]))


@pytest.mark.parametrize("world", [2, 4])
def test_model_without_kronecker_layers(request, world) -> None:
    results = request.getfixturevalue(f"world{world}")
    results = results[0] if world == 2 else results
    assert_ranks_agree(results, "fop_norm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = reference("fop", "norm", steps=3)
    assert_params(results[0]["fop_norm"]["params"], expected)


@pytest.mark.parametrize("world", [2, 4])
def test_batchnorm_parameters_and_buffers_agree(request, world) -> None:
    results = request.getfixturevalue(f"world{world}")
    results = results[0] if world == 2 else results
    assert_ranks_agree(results, "fop_bn")
    assert_ranks_agree(results, "fop_bn", field="buffers")
    assert all(torch.isfinite(p).all() for p in results[0]["fop_bn"]["params"])


@pytest.mark.parametrize("world", [2, 4])
def test_batchnorm_per_process_equals_one_process_with_partwise_statistics(request, world) -> None:
    """The paper's halves-by-processes with BatchNorm = one process normalising each part on its own.

    fop-bench's ``halfbn`` variant (fop.bench.models.split_batch_norm) rests on this: with the parity
    split, process parts in rank order 0, 2, ..., 1, 3, ... are the batch's consecutive parts.
    """
    from fop.bench.models import split_batch_norm

    results = request.getfixturevalue(f"world{world}")
    results = results[0] if world == 2 else results
    model = split_batch_norm(bn_net(), parts=world)
    train(model, make_optimizer("fop", model), global_batches("bn", 3))
    assert_params(results[0]["fop_bn"]["params"], params_of(model))
    expected_buffers = [b.detach().clone() for b in model.buffers()]
    assert_params(results[0]["fop_bn"]["buffers"], expected_buffers)


@pytest.mark.parametrize("world", [2, 4])
def test_every_layer_has_one_owner_and_owners_balance_cost(request, world) -> None:
    results = request.getfixturevalue(f"world{world}")
    results = results[0] if world == 2 else results
    for key in ("fop_mlp", "fop_cnn", "kfac_cnn"):
        assignments = [res[key]["assignment"] for res in results]
        assert all(a == assignments[0] for a in assignments)  # every process agrees
        owners = assignments[0]
        assert all(0 <= r < world for r in owners.values())
        loads = results[0][key]["loads"]
        assert len(loads) == world
        # the greedy bound: no rank exceeds the mean load by more than one layer
        model = (mlp if "mlp" in key else cnn)()
        opt = make_optimizer(key.split("_")[0], model, distributed=False)
        costs = [layer_cost(layer, opt.projection, HYPER["inverse_update_interval"]) for layer in opt.layers]
        assert sorted(owners) == sorted(layer.name for layer in opt.layers)
        assert max(loads) <= sum(costs) / world + max(costs) + 1e-6
        assert sum(loads) == pytest.approx(sum(costs))


def test_assign_owners_is_greedy_and_balanced() -> None:
    costs = [100.0, 1.0, 50.0, 50.0, 1.0, 1.0]
    owners = assign_owners(costs, 2)
    assert owners == [0, 0, 1, 1, 1, 0]  # 100 + 1 + 1 against 50 + 50 + 1
    loads = [sum(c for c, r in zip(costs, owners) if r == k) for k in range(2)]
    assert max(loads) - min(loads) <= max(costs)
    assert assign_owners([5.0], 4) == [0]
    assert assign_owners([1.0, 1.0, 1.0], 3) == [0, 1, 2]


def test_specialists_shard_the_curvature_state(world2) -> None:
    results, _ = world2
    owned = {r: {name for name, o in results[0]["fop_mlp"]["assignment"].items() if o == r} for r in range(2)}
    assert owned[0] and owned[1]
    for rank in range(2):
        keys = results[rank]["local_state_keys"]
        for name, stored in keys.items():
            assert ("A" in stored) == (name in owned[rank]), (rank, name, stored)
    # per-process optimizer state: less than a replicated K-FAC's
    fop_state = [res["fop_mlp"]["state_bytes"] for res in results]
    replicated = results[0]["fop_mlp_replicated"]["state_bytes"]
    assert max(fop_state) < replicated


def test_communication_volume_is_reported(world2) -> None:
    results, _ = world2
    rec = results[0]["fop_mlp"]
    model = mlp()
    n_params = sum(p.numel() for p in model.parameters())
    assert rec["bytes_plain"]["ddp_all_reduce"] == n_params * 8
    # FOP sends two gradient slots to the owners and one direction back
    kron = sum(p.numel() for m in model if isinstance(m, nn.Linear) for p in m.parameters())
    assert rec["bytes_plain"]["reduce"] == 2 * kron * 8
    assert rec["bytes_plain"]["broadcast"] == (kron + 6 * 3) * 8  # + β*, η*, s, ⟨d, g⟩, tr Σ, |G|² per layer
    assert rec["bytes_curvature"]["reduce"] > rec["bytes_plain"]["reduce"]  # + factor triangles
    assert rec["last_step_bytes"]["reduce"] == rec["bytes_plain"]["reduce"]  # step 3: no curvature
    kfac = results[0]["kfac_mlp"]["bytes_plain"]
    assert kfac["reduce"] == kron * 8


def test_diagnostics_are_shared(world2) -> None:
    results, _ = world2
    d0, d1 = (res["fop_mlp"]["diagnostics"] for res in results)
    assert d0 == d1 and set(d0) == {"0", "3", "5"}
    # the model's noise scale sums every layer's terms on every process, not only the owned ones
    n0, n1 = (res["fop_mlp"]["noise_scale"] for res in results)
    assert n0 is not None and n0 == n1


def test_checkpoint_from_rank0_holds_full_state_and_resumes_anywhere(world2, world4) -> None:
    results2, directory = world2
    checkpoint = torch.load(directory / "checkpoint.pt", weights_only=False)
    # rank 0's state_dict holds every layer's curvature, equal to a single process's
    model = mlp()
    single = make_optimizer("fop", model)
    data = global_batches("mlp", 6)
    train(model, single, data[:3])
    expected = single.state_dict()
    for idx, state in expected["state"].items():
        for key, value in state.items():
            saved = checkpoint["optimizer"]["state"][idx][key]
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(saved.to(value.device), value, **TOL)
            else:  # the λ of the factored inverses (the default damping mode)
                assert saved == value, key
    train(model, single, data[3:])
    continuous = params_of(model)
    # resumed on 2 processes (the same run), on 4 processes, and on one process
    assert_params(results2[0]["resumed_params"], continuous)
    for res in world4:
        assert_params(res["resumed_params"], continuous)
    model = mlp()
    model.load_state_dict(checkpoint["model"])
    resumed = make_optimizer("fop", model)
    resumed.load_state_dict(checkpoint["optimizer"])
    train(model, resumed, data[3:])
    assert_params(params_of(model), continuous)
    # after loading on 4 processes, each keeps only its own layers' curvature
    for rank, res in enumerate(world4):
        for name, keys in res["local_state_keys"].items():
            assert ("A" in keys) == (res["fop_mlp"]["assignment"][name] == rank)


class GivenHalves(LocalCommunicator):
    """One process whose two sub-batch gradients are given, as two process groups would give them."""

    halves_from_processes = True  # the hooks record no in-batch halves

    def __init__(self) -> None:
        super().__init__()
        self.halves: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # layer name -> folded (g1, g2)

    def reduce(self, work: Any, ok: torch.Tensor, context: Any) -> Reduced:
        given = [(item, *self.halves[item.layer.name]) for item in work]
        return Reduced([replace(item, g1=g1, g2=g2, grad=0.5 * (g1 + g2)) for item, g1, g2 in given], ok)


def odd_fop_reference(batches: list, world: int = 3) -> list[torch.Tensor]:
    """FOP on ``world`` processes with equal local batches (rank r: the r-th chunk), on one process.

    The factors are the global batch's (equal local batches); the halves are the groups' means of
    their processes' gradients, ``g1`` over the ``⌈N/2⌉`` even ranks and ``g2`` over the ``⌊N/2⌋``
    odd ones, computed here by autograd on a hook-free copy of the model; ``grad = (g1 + g2) / 2``
    (not the global batch's mean gradient when the groups differ in size).
    """
    model = mlp()
    halves = GivenHalves()
    opt = make_optimizer("fop", model, distributed=halves)
    for x, y in batches:
        parts = [local_part((x, y), r, world, "equal") for r in range(world)]
        copy = mlp()
        copy.load_state_dict(model.state_dict())
        folded = []
        for parity in (0, 1):
            members = parts[parity::2]
            copy.zero_grad()
            (sum(F.cross_entropy(copy(xr), yr) for xr, yr in members) / len(members)).backward()
            folded.append(
                {
                    name: torch.cat([m.weight.grad, m.bias.grad[:, None]], dim=1)
                    for name, m in copy.named_modules()
                    if isinstance(m, nn.Linear)
                }
            )
        halves.halves = {name: (folded[0][name], folded[1][name]) for name in folded[0]}
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return params_of(model)


def test_odd_number_of_processes(world4) -> None:
    members = world4[:3]
    # K-FAC has no halves: equal local batches give the single-process result
    for res in members:
        assert_params(res["odd_kfac"]["params"], reference("kfac", "mlp", size=12))
    # FOP: groups of 2 (ranks 0, 2) and 1 (rank 1), 8 samples each: g1 the mean of two processes'
    # gradients, g2 one process's
    assert_ranks_agree(members, "odd_fop")
    expected = odd_fop_reference(global_batches("mlp", 4, 24))
    assert_params(members[0]["odd_fop"]["params"], expected)
    # the groups' sizes acted: the in-batch halves of the global batch (12 and 12 samples) differ
    assert not torch.allclose(expected[0], reference("fop", "mlp", size=24)[0])
    assert set(members[0]["odd_fop"]["assignment"].values()) <= {0, 1, 2}


def test_mismatches_raise_clear_errors_on_every_process(world2) -> None:
    results, _ = world2
    for res in results:
        assert res["err_hyper"].startswith("DistributedConfigError")
        assert "param_groups[0].lr: rank 0: 0.1; rank 1: 0.2" in res["err_hyper"]
        assert res["err_layers"].startswith("DistributedConfigError") and "layers" in res["err_layers"]
        assert res["err_kind"].startswith("DistributedConfigError") and "optimizer" in res["err_kind"]
        assert res["err_ddp"].startswith("TypeError") and "DistributedDataParallel" in res["err_ddp"]
        assert res["err_unused"].startswith("DistributedConfigError")
        assert "b: gradients on 1 of 2 processes" in res["err_unused"]


def test_layer_specialists_refuse_embeddings_by_name(world2) -> None:
    """The specialist layout has no diagonal input factor: refused at the first step, naming the module."""
    for res in world2[0]:
        assert res["err_embedding"].startswith("NotImplementedError: DistributedCommunicator does not support"), res
        assert "emb (Embedding)" in res["err_embedding"] and "dual_gradient_hook" in res["err_embedding"]


def test_processes_out_of_step_fail_fast_on_every_process(world2) -> None:
    results, _ = world2
    for rank, res in enumerate(results):
        for key in ("err_skip", "err_twice"):
            assert res[key].startswith("DistributedConfigError: fop: the 2 processes are out of step"), res[key]
            assert f"this process (rank {rank})" in res[key] and "skipped step()" in res[key]
    # rank 1 skipped its second step(): at the pairing of the second calls it has cleared its gradients once more
    assert "at step() call 2 after 3 zero_grad() calls" in results[1]["err_skip"]
    assert "the other one at step() call 2 after 2 zero_grad() calls" in results[1]["err_skip"]
    assert "at step() call 2 after 1 zero_grad() calls" in results[1]["err_twice"]
    # rank 0 saved alone while rank 1 went on training: both are told, well before the 5 s timeout
    assert results[0]["err_save_alone"].startswith(
        "DistributedConfigError: fop: state_dict() is a collective and this process (rank 0) called it while"
    ), results[0]["err_save_alone"]
    assert "the other process called state_dict() or load_state_dict()" in results[1]["err_save_alone"]
    assert all(res["save_alone_seconds"] < 4 for res in results)


def test_parameters_unfrozen_after_construction_are_refused_clearly(world2) -> None:
    for res in world2[0]:
        assert res["err_unfrozen"].startswith(
            "DistributedConfigError: 0.weight was frozen (requires_grad=False) when the optimizer was built"
        ), res["err_unfrozen"]
        assert "Build the optimizer after unfreezing" in res["err_unfrozen"]


def test_a_missing_process_times_out_instead_of_hanging(world2) -> None:
    results, _ = world2
    message = results[0]["err_timeout"]
    assert message.startswith("RuntimeError: fop: the gradient all-reduce did not complete"), message
    assert "timeout (0:00:02) ran out" in message  # gloo's own wording of the cause varies
    assert results[0]["timeout_seconds"] < 4.5


def test_plan_without_processes_counts_bytes_and_shards_memory() -> None:
    from fop.distributed import plan

    model = cnn()
    opt = make_optimizer("fop", model, distributed=False)
    kron = sum(p.numel() for layer in opt.layers for p in layer.params())
    fallback = sum(p.numel() for p in model.parameters()) - kron
    fallback_tensors = len(list(model.parameters())) - sum(len(layer.params()) for layer in opt.layers)
    for world in (2, 3, 8):
        spec, rep = plan(opt, model, world), plan(opt, model, world, replicated=True)
        b, r = spec.bytes_per_step(False), rep.bytes_per_step(False)
        assert b["reduce"] == 2 * kron * 8 and b["broadcast"] == (kron + 6 * len(opt.layers)) * 8
        # fallback gradients, presence counts (gradients and factors per layer, fallback tensors),
        # call sequence (step() and zero_grad() counts), flag
        assert b["all_reduce"] == (fallback + 2 * len(opt.layers) + fallback_tensors + 2 + 1) * 8
        assert r["all_reduce"] == 2 * kron * 8 + b["all_reduce"] and r["calls"] == 1
        assert b["ddp_all_reduce"] == (kron + fallback) * 8
        assert sum(spec.curvature_bytes()) == rep.curvature_bytes()[0]
        assert set(spec.assignment.values()) <= set(range(world))
        assert "owner" in spec.describe()


def test_a_weight_used_outside_its_forward_gets_the_first_order_rule_as_on_one_process(world2) -> None:
    results, _ = world2
    assert_ranks_agree(results, "fop_misused")
    model = Misused()
    opt = make_optimizer("fop", model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, opt, global_batches("mlp", 4))
    assert_params(results[0]["fop_misused"]["params"], params_of(model))
    for messages in ([str(w.message) for w in caught], results[0]["fop_misused"]["warnings"]):
        assert any("does not come from the module's own forward" in m for m in messages), messages


def test_one_process_falls_back_to_local_split() -> None:
    from fop.distributed import LocalCommunicator

    opt = FOP(mlp())
    assert isinstance(opt.communicator, LocalCommunicator) and opt._mode.halves
    with pytest.raises(RuntimeError, match="init_process_group"):
        FOP(mlp(), distributed=True)


if __name__ == "__main__" and len(sys.argv) >= 4 and sys.argv[1] == "--worker":
    worker(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", ["fop_mlp", "fop_cnn", "kfac_mlp", "fop_emb", "fop_tied", "kfac_tied"])
def test_ddp_comm_hook_equals_single_process_on_global_batch(request, world, case) -> None:
    """FOP(ddp.module) + ddp.register_comm_hook(optimizer, dual_gradient_hook) = one process on the global batch."""
    results = request.getfixturevalue(f"world{world}")
    results = results[0] if world == 2 else results
    opt_name, kind = case.split("_")
    key = f"ddp_{case}"
    expected = reference(opt_name, kind)
    for res in results:
        assert_params(res[key]["params"], expected)
    assert_ranks_agree(results, key)
    if opt_name == "fop":
        assert all(d["beta"] != 0.0 for d in results[0][key]["diagnostics"].values())
    slots = 2 if opt_name == "fop" else 1
    gradient_bytes = sum(p.numel() * p.element_size() for p in MODELS[kind][0]().parameters())
    measured, predicted = results[0][key]["bytes"], results[0][key]["predicted"]
    assert measured["hook_all_reduce"] == slots * gradient_bytes == slots * predicted["ddp_all_reduce"]
    assert measured["all_reduce"] == predicted["all_reduce"] > 0  # the loss-scale references


def test_ddp_comm_hook_with_loss_scaling_and_clipping(request) -> None:
    """The halves from DDP's buckets are of the scaled, unclipped loss: scaled to p.grad's units at the step."""
    results = request.getfixturevalue("world2")[0]
    model = mlp()
    train_scaled_and_clipped(model, model, make_optimizer("fop", model, **SCALED_KWARGS), global_batches("mlp", 3))
    for res in results:
        assert_params(res["ddp_fop_scaled"]["params"], params_of(model))


def test_ddp_comm_hook_trains_attention_like_one_process(request) -> None:
    results = request.getfixturevalue("world2")[0]
    assert results[0]["ddp_fop_attn"]["layers"] == ["attn.in_proj", "attn.out_proj", "head"]
    for res in results:
        assert_params(res["ddp_fop_attn"]["params"], reference("fop", "attn", steps=3))


def test_optimizer_built_before_the_process_group_warns_under_ddp(request) -> None:
    results = request.getfixturevalue("world2")[0]
    for res in results:
        messages = [m for m in res["ddp_without_hook_warnings"] if "before init_process_group" in m]
        assert len(messages) == 1 and "dual_gradient_hook" in messages[0]


def test_ddp_comm_hook_registered_after_a_local_optimizer(request) -> None:
    """FOP built before init_process_group, the hook registered later: one process on the global batch."""
    results = request.getfixturevalue("world2")[0]
    expected = reference("fop", "mlp")
    for res in results:
        assert res["ddp_hook_after_local"]["communicator"] == "DDPCommunicator"
        assert not [m for m in res["ddp_hook_after_local"]["warnings"] if "before init_process_group" in m]
        assert_params(res["ddp_hook_after_local"]["params"], expected)


def test_ddp_comm_hook_with_no_sync_accumulation(request) -> None:
    """Two micro-batches per step, the first under no_sync(): the halves are the micro-batches' halves."""
    results = request.getfixturevalue("world2")[0]
    model = mlp()
    optimizer = make_optimizer("fop", model)
    for x, y in global_batches("mlp", 3):
        optimizer.zero_grad()
        # the global batch as the processes see it: each local batch split in two micro-batches
        parts = [local_part((x, y), r, 2) for r in range(2)]
        for k in range(2):
            xm = torch.cat([p[0].chunk(2)[k] for p in parts])
            ym = torch.cat([p[1].chunk(2)[k] for p in parts])
            (F.cross_entropy(model(xm), ym) / 2).backward()
        optimizer.step()
    for res in results:
        assert_params(res["ddp_fop_accum"]["params"], params_of(model))
