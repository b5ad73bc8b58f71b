"""Step cost of FOP and K-FAC as ratios to SGD with momentum, measured side by side in one process.

    python benchmarks/step_cost.py [--model cnn|mlp|stage|both] [--cycles 4] [--repeats 3] [--profile] [--memory]
                                   [--optimizers sgd,kfac,fop,fop-exact] [--clock wall|cpu] [--batch 256]

For each model (issue #13's CNN: two 3x3 convs and Linear(2048, 10) on 32x32x3 inputs, batch 256;
the digits MLP: 64-256-256-10, batch 256; on request ``stage``, three 3x3 convs of 64 channels at
32x32 like ResNet-18's first stage, whose patches have 576 columns and 1024 positions per image:
where K-FAC-reduce's one row per image counts, at a smaller ``--batch`` on a CPU) the optimizers
run interleaved, ``repeats`` times, each
timing ``cycles`` whole curvature intervals step by step (defaults otherwise: curvature and
inverse every 10 steps). Reported per optimizer, median over repeats:

* amortized: mean time per training step (forward + backward + step) over whole intervals;
* ordinary: median time of a step that captures no curvature and computes no inverse;
* curvature: mean time of the steps that capture statistics and eigendecompose;
* peak (``--memory``): the peak of the tensor memory allocated while the model is built and trains
  two intervals (parameters, gradients, activations, the optimizer's state and temporaries; the
  input data excluded), from the profiler's allocation events: CPU's counterpart of CUDA's
  ``max_memory_allocated``.

Ratios are to SGD within the same repeat, so machine load shared by all optimizers cancels out.
``--profile`` adds the fop:: phase breakdown (ms per step, amortized) from torch.profiler.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from fop import FOP, KFAC


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2048, 10),
    )


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def stage() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


MODELS = {"cnn": (cnn, (3, 32, 32)), "mlp": (mlp, (64,)), "stage": (stage, (3, 32, 32))}
OPTIMIZERS = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
    "kfac": lambda m: KFAC(m, lr=0.01),
    "fop": lambda m: FOP(m, lr=0.01),
    # variants, by --optimizers: exact damping (the default before 0.3), a longer inverse interval,
    # factors from 64 of the batch's 256 samples (factor_samples), K-FAC-reduce (weight_sharing)
    "kfac-exact": lambda m: KFAC(m, lr=0.01, damping_mode="exact"),
    "fop-exact": lambda m: FOP(m, lr=0.01, damping_mode="exact"),
    "fop-inv50": lambda m: FOP(m, lr=0.01, inverse_update_interval=50),
    "kfac-fs64": lambda m: KFAC(m, lr=0.01, factor_samples=64),
    "fop-fs64": lambda m: FOP(m, lr=0.01, factor_samples=64),
    "kfac-reduce": lambda m: KFAC(m, lr=0.01, weight_sharing="reduce"),
    "fop-reduce": lambda m: FOP(m, lr=0.01, weight_sharing="reduce"),
}
DEFAULT_OPTIMIZERS = ("sgd", "kfac", "fop")
# steps of one whole cycle of each optimizer's updates (curvature and inverse): what "amortized" spans
CYCLE = {"fop-inv50": 50}
# wall: time.perf_counter; cpu: this process's CPU time, which other processes on a shared machine
# inflate far less than wall time (the optimizers run single-threaded, so CPU time is step time)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def make_data(name: str, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Four batches of random inputs and uniform labels over 10 classes, cycled through by :func:`run`."""
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(4 * batch, *MODELS[name][1], generator=gen)
    return data, torch.randint(0, 10, (4 * batch,), generator=gen)


def run(
    name: str,
    opt_name: str,
    cycles: int,
    interval: int = 10,
    batch: int = 256,
    profile: bool = False,
    clock: str = "wall",
    inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    interval = CYCLE.get(opt_name, interval)
    data, labels = make_data(name, batch) if inputs is None else inputs
    torch.manual_seed(0)
    model = MODELS[name][0]()
    opt = OPTIMIZERS[opt_name](model)

    now = CLOCKS[clock]

    def step(k: int) -> float:
        i = (k % 4) * batch
        x, y = data[i : i + batch], labels[i : i + batch]
        t = now()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return now() - t

    for k in range(interval + 2):
        step(k)
    # align to the start of a curvature interval (fop's step counter)
    k = interval + 2
    while k % interval:
        step(k)
        k += 1
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for j in range(cycles * interval):
                step(k + j)
        phases: dict[str, float] = {}
        for ev in prof.key_averages():
            if ev.key.startswith("fop::"):
                phases[ev.key[5:]] = ev.cpu_time_total / 1000.0 / (cycles * interval)
        return phases
    times = [step(k + j) for j in range(cycles * interval)]
    curvature = [t for j, t in enumerate(times) if j % interval == 0]
    ordinary = [t for j, t in enumerate(times) if j % interval != 0]
    return sum(times) / len(times), statistics.median(ordinary), sum(curvature) / len(curvature)


def peak_tensor_mb(name: str, opt_name: str, batch: int = 256) -> float:
    """Peak MB of tensors allocated while ``opt_name`` builds ``name`` and trains it two intervals.

    From the profiler's allocation events (``profile_memory``): their running sum from the start of
    the window is the memory held by the model, its gradients and activations, the optimizer's
    state and every temporary, exactly (unlike RSS, which keeps what the allocator does not return
    and is dominated by torch's own footprint). The input data is allocated before the window.
    """
    inputs = make_data(name, batch)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run(name, opt_name, 2, batch=batch, inputs=inputs)
    assert prof.profiler is not None
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["cnn", "mlp", "stage", "both"], default="both", help="both: cnn and mlp")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--cycles", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--memory", action="store_true", help="peak tensor memory per optimizer (profiler)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: no oversubscription on a shared machine)"
    )
    parser.add_argument(
        "--optimizers",
        default=",".join(DEFAULT_OPTIMIZERS),
        help=f"comma-separated, sgd first; from {', '.join(OPTIMIZERS)}",
    )
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="cpu: process CPU time (shared machines)"
    )
    args = parser.parse_args()
    chosen = args.optimizers.split(",")
    if chosen[0] != "sgd" or any(o not in OPTIMIZERS for o in chosen):
        parser.error(f"--optimizers must start with sgd and name only {', '.join(OPTIMIZERS)}")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock")
    for name in ["cnn", "mlp"] if args.model == "both" else [args.model]:
        results: dict[str, list[tuple[float, float, float]]] = {o: [] for o in chosen}
        for _ in range(args.repeats):
            for opt_name in chosen:
                results[opt_name].append(run(name, opt_name, args.cycles, batch=args.batch, clock=args.clock))
        print(
            f"\n{name}, batch {args.batch}: median over {args.repeats} interleaved repeats of {args.cycles} intervals"
        )
        print("| optimizer | amortized ms | x SGD | ordinary ms | x SGD | curvature-step ms |")
        print("| --- | --- | --- | --- | --- | --- |")
        for opt_name, rows in results.items():
            ratios_a = [r[0] / s[0] for r, s in zip(rows, results["sgd"])]
            ratios_o = [r[1] / s[1] for r, s in zip(rows, results["sgd"])]
            med = [statistics.median(r[i] for r in rows) * 1000 for i in range(3)]
            print(
                f"| {opt_name} | {med[0]:.1f} | {statistics.median(ratios_a):.2f} | {med[1]:.1f} | "
                f"{statistics.median(ratios_o):.2f} | {med[2]:.1f} |"
            )
        if args.memory:
            peaks = {o: peak_tensor_mb(name, o, args.batch) for o in chosen}
            print("peak tensor MB: " + ", ".join(f"{o} {p:.1f} ({p / peaks['sgd']:.2f}x)" for o, p in peaks.items()))
        if args.profile:
            for opt_name in chosen[1:]:
                phases = run(name, opt_name, args.cycles, batch=args.batch, profile=True)
                print(f"{opt_name} phases ms/step: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(phases.items())))


if __name__ == "__main__":
    main()
