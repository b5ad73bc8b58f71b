"""Step cost of FOP and K-FAC as ratios to SGD with momentum, measured side by side in one process.

    python benchmarks/step_cost.py [--model cnn|mlp|both] [--cycles 4] [--repeats 3] [--profile] [--memory]
                                   [--optimizers sgd,kfac,fop,fop-factored] [--clock wall|cpu]

For each model (issue #13's CNN: two 3x3 convs and Linear(2048, 10) on 32x32x3 inputs, batch 256;
the digits MLP: 64-256-256-10, batch 256) the optimizers run interleaved, ``repeats`` times, each
timing ``cycles`` whole curvature intervals step by step (defaults otherwise: curvature and
inverse every 10 steps). Reported per optimizer, median over repeats:

* amortized: mean time per training step (forward + backward + step) over whole intervals;
* ordinary: median time of a step that captures no curvature and computes no inverse;
* curvature: mean time of the steps that capture statistics and eigendecompose;
* peak (``--memory``): a fresh process's peak RSS, and its growth while the optimizer trains
  (CPU; a rough figure).

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


MODELS = {"cnn": (cnn, (3, 32, 32)), "mlp": (mlp, (64,))}
OPTIMIZERS = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
    "kfac": lambda m: KFAC(m, lr=0.01),
    "fop": lambda m: FOP(m, lr=0.01),
    # variants, by --optimizers: factored damping (ASDL's and the paper's), a longer inverse interval,
    # factors from a sample of the batch
    "kfac-factored": lambda m: KFAC(m, lr=0.01, damping_mode="factored"),
    "fop-factored": lambda m: FOP(m, lr=0.01, damping_mode="factored"),
    "fop-inv50": lambda m: FOP(m, lr=0.01, inverse_update_interval=50),
    # factors from 64 of the batch's 256 samples (factor_samples), with exact or factored damping
    "kfac-fs64": lambda m: KFAC(m, lr=0.01, factor_samples=64),
    "fop-fs64": lambda m: FOP(m, lr=0.01, factor_samples=64),
    "kfac-factored-fs64": lambda m: KFAC(m, lr=0.01, damping_mode="factored", factor_samples=64),
    "fop-factored-fs64": lambda m: FOP(m, lr=0.01, damping_mode="factored", factor_samples=64),
}
DEFAULT_OPTIMIZERS = ("sgd", "kfac", "fop")
# steps of one whole cycle of each optimizer's updates (curvature and inverse): what "amortized" spans
CYCLE = {"fop-inv50": 50}
# wall: time.perf_counter; cpu: this process's CPU time, which other processes on a shared machine
# inflate far less than wall time (the optimizers run single-threaded, so CPU time is step time)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def run(
    name: str,
    opt_name: str,
    cycles: int,
    interval: int = 10,
    batch: int = 256,
    profile: bool = False,
    clock: str = "wall",
):
    interval = CYCLE.get(opt_name, interval)
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build()
    opt = OPTIMIZERS[opt_name](model)
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(4 * batch, *shape, generator=gen)
    labels = torch.randint(0, 10, (4 * batch,), generator=gen)

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


def peak_rss_mb(name: str, opt_name: str) -> tuple[float, float]:
    """``(peak RSS, peak growth during training)`` in MB, of a fresh process training two intervals.

    CPU memory is per process, so each optimizer gets its own. The growth (peak RSS minus the RSS
    once torch, the model and the data are loaded, just before training) is the training's own
    memory: activations, gradients, the optimizer's state; the peak itself is mostly torch's.
    """
    import subprocess
    import sys

    code = (
        "import sys,torch;torch.set_num_threads(1);sys.path.insert(0,'benchmarks');import step_cost as s;"
        f"print(*s.measure_rss({name!r},{opt_name!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak, growth = out.stdout.split()[-2:]
    return float(peak), float(growth)


def measure_rss(name: str, opt_name: str) -> tuple[float, float]:
    """In this process: RSS sampled every millisecond by a thread while ``run`` trains two intervals.

    ``ru_maxrss`` would not do: importing torch peaks above what training adds for small models.
    """
    import resource
    import threading

    def rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    base, peak, done = rss(), [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.001):
            peak[0] = max(peak[0], rss())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        run(name, opt_name, 2)
    finally:
        done.set()
        sampler.join()
    return peak[0], peak[0] - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["cnn", "mlp", "both"], default="both")
    parser.add_argument("--cycles", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--memory", action="store_true", help="peak RSS of a fresh process per optimizer")
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
                results[opt_name].append(run(name, opt_name, args.cycles, clock=args.clock))
        print(f"\n{name}: median over {args.repeats} interleaved repeats of {args.cycles} intervals")
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
            peaks = {o: peak_rss_mb(name, o) for o in chosen}
            sgd_peak, sgd_growth = peaks["sgd"]
            print(
                "peak RSS MB (growth while training): "
                + ", ".join(
                    f"{o} {p:.0f} ({p / sgd_peak:.2f}x), {g:.0f} ({g / sgd_growth:.2f}x)" for o, (p, g) in peaks.items()
                )
            )
        if args.profile:
            for opt_name in chosen[1:]:
                phases = run(name, opt_name, args.cycles, profile=True)
                print(f"{opt_name} phases ms/step: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(phases.items())))


if __name__ == "__main__":
    main()
