"""``fop-bench --nproc N``: the distributed scaling run of K-FAC / FOP, on 1 and N processes.

For every K-FAC/FOP optimizer (variants included, e.g. ``fop:replicated``) and batch size of the
command, the task's model trains for a window of steps under ``torchrun --standalone`` (NCCL on
CUDA, gloo on the CPU), once on one process and once on ``N``, with the sweep's training step
(:func:`fop.bench.runner.forward_backward`). Strong scaling: the batch size is global, each of the
``N`` processes trains on ``batch / N`` samples of its own. The report gives, against the
one-process run:

* seconds per training step (forward, backward, optimizer step), the optimizer step alone, and
  the scaling efficiency ``T1 / (N·TN)``;
* the optimizer state per process (the largest over the processes): layer specialists shard the
  curvature, a replicated optimizer holds all of it everywhere;
* the payload of each step's collectives and an estimate of the bytes each process sends,
  averaged over a curvature interval, against DistributedDataParallel's all-reduce.

On a CPU the processes share the machine's cores (the same ``--threads`` per process in every run),
so the numbers show the overheads, not GPU scaling. ``DIR/scaling.md`` and ``DIR/scaling.json``
keep the results.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["format_scaling", "run_scaling"]

_TIMEOUT = datetime.timedelta(minutes=5)


@dataclasses.dataclass(frozen=True)
class ScalingJob:
    """What every process of one launch needs (pickled to the workers)."""

    task: str
    data: Any  # fop.bench.tasks.DataOptions
    specs: tuple[Any, ...]  # fop.bench.runner.RunSpec, one per optimizer and batch size
    device: str
    threads: int
    steps: int | None


def run_scaling(job: ScalingJob, nproc: int) -> dict[int, dict[str, Any]]:
    """Launch ``job`` on 1 and on ``nproc`` processes; each launch's results by process count."""
    return {n: _launch(job, n) for n in sorted({1, nproc})}


def _launch(job: ScalingJob, n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        config, result = Path(tmp) / "job.pkl", Path(tmp) / "result.json"
        config.write_bytes(pickle.dumps(job))
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={n}",
            "-m",
            "fop.bench.scaling",
            str(config),
            str(result),
        ]
        env = dict(os.environ, OMP_NUM_THREADS=str(job.threads))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not result.exists():
            from fop.bench.errors import BenchError

            raise BenchError(
                f"torchrun with {n} processes failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        return json.loads(result.read_text())


# ----------------------------------------------------------------------------------- worker
def _worker(job: ScalingJob, out: Path) -> None:
    import torch
    import torch.distributed as dist

    from fop.bench.tasks import get_task

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = torch.device(job.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    torch.set_num_threads(job.threads)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=_TIMEOUT)
    task = get_task(job.task)
    dataset = task.load_data(job.data)
    pipeline = task.pipeline(dataset, device)
    runs = {
        spec.label.rsplit(" lr=", 1)[0]: _measure(spec, task, dataset, pipeline, job.steps, world, rank)
        for spec in job.specs
    }
    if rank == 0:
        results = {"world": world, "threads": job.threads, "device": str(device), "runs": runs}
        out.write_text(json.dumps(results))
    if world > 1:
        dist.destroy_process_group()


def _measure(
    spec: Any, task: Any, dataset: Any, pipeline: Any, steps: int | None, world: int, rank: int
) -> dict[str, Any]:
    """One optimizer at one global batch size: the timed window on this process group."""
    import torch
    import torch.distributed as dist

    from fop.bench.optimizers import resolve_optimizer
    from fop.bench.profile import window_steps
    from fop.bench.runner import build_model_and_optimizer, forward_backward
    from fop.distributed import DistributedCommunicator, state_bytes

    local = dataclasses.replace(
        spec, batch_size=spec.batch_size // world, micro_batch=min(spec.micro_batch, spec.batch_size // world)
    )
    model, optimizer = build_model_and_optimizer(
        spec, task, dataset, pipeline.device, resolve_optimizer(spec.optimizer)
    )
    generator = torch.Generator(device=pipeline.device).manual_seed(1000 * spec.seed + rank)
    warmup, window = window_steps(spec.hyperparameters.curvature_interval, steps)

    def sync() -> None:
        if pipeline.device.type == "cuda":
            torch.cuda.synchronize(pipeline.device)
        if world > 1:
            dist.barrier()

    step_seconds, optimizer_seconds = 0.0, 0.0
    for k in range(warmup + window):
        batch = torch.randint(0, pipeline.train_size, (local.batch_size,), generator=generator, device=pipeline.device)
        sync()
        start = time.perf_counter()
        forward_backward(model, optimizer, pipeline, batch, local, generator)
        sync()
        middle = time.perf_counter()
        optimizer.step()
        sync()
        if k >= warmup:
            step_seconds += time.perf_counter() - start
            optimizer_seconds += time.perf_counter() - middle
    run: dict[str, Any] = {
        "step_seconds": step_seconds / window,
        "optimizer_seconds": optimizer_seconds / window,
        "interval": spec.hyperparameters.curvature_interval,
        "local_batch": local.batch_size,
        "state_bytes_all": [state_bytes(optimizer)],
    }
    comm = getattr(optimizer, "communicator", None)
    if isinstance(comm, DistributedCommunicator):
        run["state_bytes_all"] = [None] * world
        dist.all_gather_object(run["state_bytes_all"], state_bytes(optimizer))
        run.update(
            bytes_curvature=comm.bytes_per_step(True),
            bytes_plain=comm.bytes_per_step(False),
            assignment=comm.assignment,
            loads=comm.loads,
        )
        sync()
        comm.close()  # the optimizer's own process group
    return run


# ----------------------------------------------------------------------------------- report
def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def _traffic(run: dict[str, Any]) -> tuple[str, str, str]:
    """Payload, ring-wire estimate per process and DDP's, KiB per step averaged over an interval."""
    if "bytes_plain" not in run:
        return "-", "-", "-"
    k = run["interval"]
    avg = [
        (run["bytes_curvature"][key] + (k - 1) * run["bytes_plain"][key]) / k / 1024
        for key in ("total", "wire_estimate", "ddp_wire_estimate")
    ]
    return tuple(f"{value:.1f}" for value in avg)  # type: ignore[return-value]


def format_scaling(results: dict[int, dict[str, Any]], header: str) -> str:
    """Markdown table of the runs against the one-process run of the same optimizer and batch."""
    base = results[min(results)]
    lines = [
        header,
        "",
        "| run | N | local batch | s/step | s/opt | speedup | efficiency | state MiB/proc | payload KiB/step | "
        "wire KiB/proc | DDP wire KiB |",
        "| " + " | ".join(["---"] * 11) + " |",
    ]
    for n, res in sorted(results.items()):
        for key, run in res["runs"].items():
            t1 = base["runs"][key]["step_seconds"]
            speed = t1 / run["step_seconds"]
            payload, wire, ddp = _traffic(run)
            lines.append(
                f"| {key} | {n} | {run['local_batch']} | {run['step_seconds']:.4f} | {run['optimizer_seconds']:.4f} | "
                f"{speed:.2f} | {speed / n:.2f} | {_mib(max(run['state_bytes_all']))} | {payload} | {wire} | {ddp} |"
            )
    lines += [
        "",
        "s/step: forward + backward + optimizer step; s/opt: optimizer.step() alone, with its communication; "
        "efficiency: T1 / (N·TN) at a fixed global batch (strong scaling). Traffic: averaged over a curvature interval.",
    ]
    if base["device"] == "cpu":
        lines.append("CPU run: the processes share this machine's cores; GPU scaling needs GPUs (NCCL).")
    return "\n".join(lines)


def write_scaling(results: dict[int, dict[str, Any]], header: str, out: Path) -> str:
    """Write ``scaling.md`` and ``scaling.json`` into ``out``; return the table."""
    table = format_scaling(results, header)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.md").write_text(table + "\n", encoding="utf-8")
    (out / "scaling.json").write_text(json.dumps({str(n): r for n, r in results.items()}, indent=1), encoding="utf-8")
    return table


def main(argv: Sequence[str]) -> int:
    """Worker entry point (``torchrun -m fop.bench.scaling JOB RESULT``), started by :func:`run_scaling`."""
    job = pickle.loads(Path(argv[0]).read_bytes())
    _worker(job, Path(argv[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
