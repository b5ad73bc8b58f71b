"""Scaling benchmark of distributed FOP: ``python -m fop.distributed_bench --nproc 1,2``.

For every process count it starts ``torchrun --standalone --nproc-per-node N`` on this module (NCCL
when CUDA is available, else gloo), trains a synthetic-data model for a few timed steps and reports,
against the one-process run:

* seconds per training step (forward, backward, optimizer step) and the scaling efficiency
  (strong scaling, fixed global batch: ``T1 / (N·TN)``; weak scaling, fixed local batch:
  ``T1 / TN``);
* the per-process optimizer-state memory (the largest over the processes) of FOP with layer
  specialists, against a replicated K-FAC (every process holding every layer's curvature);
* the payload of each step's collectives and an estimate of the bytes each process sends, against
  DistributedDataParallel's one all-reduce of the gradients.

The same ``torchrun`` recipe trains a real model; see ``docs/distributed.md``. On a CPU the processes
share the machine's cores (``--threads`` per process, default ``cores // largest N`` in every run), so the numbers show
the overheads, not GPU scaling.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fop.distributed_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", default="1,2", help="comma-separated process counts (default 1,2); 1 is always run")
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--width", type=int, default=512, help="hidden width (MLP) or channels (CNN)")
    p.add_argument("--depth", type=int, default=3, help="hidden layers (MLP) or conv layers (CNN)")
    p.add_argument("--batch", type=int, default=512, help="global batch (strong scaling) or local batch (weak)")
    p.add_argument("--scaling", choices=["strong", "weak"], default="strong")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--interval", type=int, default=1, help="curvature and inverse update interval")
    p.add_argument("--optimizers", default="fop,kfac", help="any of fop, kfac")
    p.add_argument("--modes", default="specialists,replicated", help="any of specialists, replicated")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process, every run (0: cores // largest N)")
    p.add_argument("--json", default="", help="also write the results to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    return p


# ----------------------------------------------------------------------------------- worker
def _model(args: argparse.Namespace):  # noqa: ANN202
    from torch import nn

    if args.model == "mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        features = 3 * 16 * 16
        for _ in range(args.depth):
            layers += [nn.Linear(features, args.width), nn.ReLU()]
            features = args.width
        layers.append(nn.Linear(features, 10))
        return nn.Sequential(*layers)
    channels = max(4, args.width // 8)
    layers = [nn.Conv2d(3, channels, 3, padding=1), nn.ReLU()]
    for _ in range(args.depth - 1):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(channels * 16, 10)]
    return nn.Sequential(*layers)


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from fop import FOP, KFAC
    from fop.distributed import DistributedCommunicator, state_bytes

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    threads = args.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    torch.set_num_threads(threads)
    timeout = datetime.timedelta(minutes=5)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()
        if world > 1:
            dist.barrier()

    local = args.batch // world if args.scaling == "strong" else args.batch
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(local, 3, 16, 16, generator=gen).to(device)
    y = torch.randint(0, 10, (local,), generator=gen).to(device)
    results: dict[str, Any] = {"world": world, "threads": threads, "local_batch": local, "device": str(device), "runs": {}}
    for opt_name in args.optimizers.split(","):
        for mode in args.modes.split(","):
            if world == 1 and mode == "replicated":
                continue  # the same as specialists on one process
            torch.manual_seed(0)
            model = _model(args).to(device)
            cls = FOP if opt_name == "fop" else KFAC
            kwargs: dict[str, Any] = dict(lr=0.01, curvature_update_interval=args.interval, inverse_update_interval=args.interval)
            if world > 1:
                kwargs["distributed"] = DistributedCommunicator(replicated=mode == "replicated", timeout=timeout)
            opt = cls(model, **kwargs)
            times, opt_times = [], []
            for k in range(args.warmup + args.steps):
                sync()
                start = time.perf_counter()
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                if cuda:
                    torch.cuda.synchronize()
                middle = time.perf_counter()
                opt.step()
                sync()
                if k >= args.warmup:
                    times.append(time.perf_counter() - start)
                    opt_times.append(time.perf_counter() - middle)
            mine = state_bytes(opt)
            memory = [mine]
            run: dict[str, Any] = {
                "step_seconds": sum(times) / len(times), "optimizer_seconds": sum(opt_times) / len(opt_times),
                "state_bytes": mine,
            }  # fmt: skip
            comm = opt.communicator
            if world > 1:
                memory = [None] * world  # type: ignore[list-item]
                dist.all_gather_object(memory, mine)
                assert isinstance(comm, DistributedCommunicator)
                run["bytes_curvature"] = comm.bytes_per_step(True)
                run["bytes_plain"] = comm.bytes_per_step(False)
                run["assignment"] = comm.assignment
                run["loads"] = comm.loads
            run["state_bytes_max"] = max(memory)
            run["state_bytes_all"] = memory
            results["runs"][f"{opt_name}/{mode}"] = run
            if isinstance(comm, DistributedCommunicator):
                sync()
                comm.close()  # the optimizer's own process group
            del opt, model
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump(results, f)
    if world > 1:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------- launcher
def _forwarded(args: argparse.Namespace) -> list[str]:
    keep = ["model", "width", "depth", "batch", "scaling", "steps", "warmup", "interval", "optimizers", "modes", "threads"]
    out: list[str] = []
    for key in keep:
        out += [f"--{key}", str(getattr(args, key))]
    return out


def _launch(n: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               "-m", "fop.distributed_bench", "--worker", "--out", path, *_forwarded(args)]  # fmt: skip
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(args.threads or max(1, (os.cpu_count() or 1) // n)))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(path):
            raise RuntimeError(f"torchrun with {n} processes failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        with open(path) as f:
            return json.load(f)


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def _report(results: dict[int, dict[str, Any]], args: argparse.Namespace) -> str:
    base = results[1]
    lines = [
        f"distributed FOP benchmark: {args.model} width {args.width} depth {args.depth}, {args.scaling} scaling, "
        f"batch {args.batch} ({'global' if args.scaling == 'strong' else 'per process'}), "
        f"curvature/inverse interval {args.interval}, {args.steps} timed steps, device {base['device']}",
        "s/step: forward + backward + step; s/opt: optimizer.step() alone (with its communication); "
        "efficiency: strong T1/(N·TN), weak T1/TN, against the one-process run of the same optimizer",
        "",
        f"{'run':<22} {'N':>2} {'thr':>3} {'s/step':>8} {'s/opt':>7} {'speedup':>7} {'eff':>5} {'state MiB/proc':>14} "
        f"{'payload KiB/step':>16} {'wire KiB/proc':>13} {'DDP wire KiB':>12}",
    ]
    for n, res in sorted(results.items()):
        for key, run in res["runs"].items():
            opt_name = key.split("/")[0]
            t1 = base["runs"].get(f"{opt_name}/specialists", {}).get("step_seconds")
            speed = t1 / run["step_seconds"] if t1 else float("nan")
            eff = speed / n if args.scaling == "strong" else speed
            if n > 1:
                avg = {
                    k: (run["bytes_curvature"][k] + (args.interval - 1) * run["bytes_plain"][k]) / args.interval
                    for k in ("total", "wire_estimate", "ddp_wire_estimate")
                }
                payload = f"{avg['total'] / 1024:.1f}"
                wire, ddp = f"{avg['wire_estimate'] / 1024:.1f}", f"{avg['ddp_wire_estimate'] / 1024:.1f}"
            else:
                payload = wire = ddp = "-"
            lines.append(
                f"{key:<22} {n:>2} {res['threads']:>3} {run['step_seconds']:>8.4f} {run['optimizer_seconds']:>7.4f} "
                f"{speed:>7.2f} {eff:>5.2f} "
                f"{_mib(run['state_bytes_max']):>14} {payload:>16} {wire:>13} {ddp:>12}"
            )
    kfac_rep = [res["runs"].get("kfac/replicated") for n, res in sorted(results.items()) if n > 1]
    if kfac_rep and kfac_rep[0]:
        lines.append("")
        lines.append(
            "optimizer state per process, largest process: FOP specialists "
            + ", ".join(f"N={n}: {_mib(res['runs']['fop/specialists']['state_bytes_max'])} MiB"
                        for n, res in sorted(results.items()) if 'fop/specialists' in res['runs'])  # fmt: skip
            + f"; replicated K-FAC: {_mib(kfac_rep[0]['state_bytes_max'])} MiB"
        )
    if base["device"] == "cpu":
        lines.append("CPU run: the processes share this machine's cores; GPU scaling needs GPUs (NCCL).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    counts = sorted({1} | {int(n) for n in args.nproc.split(",") if n.strip()})
    # one thread count for every run: a one-process baseline with N times the threads of each of
    # the N processes would make the scaling efficiencies meaningless (above 1)
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // counts[-1])
    results: dict[int, dict[str, Any]] = {}
    for n in counts:
        results[n] = _launch(n, args)
    print(_report(results, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({str(n): r for n, r in results.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
