"""``fop-bench``: time-to-accuracy benchmark of FOP against SGD, AdamW and K-FAC.

With no arguments it runs the embedded default (``digits-mlp``: scikit-learn's digits, all four
optimizers, the whole training split as one batch) on the CPU in a few minutes and prints the table.
``fop-bench --help`` lists the options; ``docs/benchmark.md`` describes the protocol.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from fop.bench.errors import BenchError

if TYPE_CHECKING:  # the heavy imports happen inside _run, after argument parsing
    import torch

    from fop.bench.optimizers import OptimizerSpec
    from fop.bench.runner import RunSpec, SweepConfig
    from fop.bench.tasks import Task

__all__ = ["main"]

PROG = "fop-bench"
DATA_ENV = "FOP_CIFAR10"  # default of --data, shared with the test suite
T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors become :class:`BenchError` (one line, exit status 2)."""

    def error(self, message: str) -> NoReturn:
        raise BenchError(message)


def _list_of(convert: Callable[[str], T], what: str) -> Callable[[str], tuple[T, ...]]:
    def parse(text: str) -> tuple[T, ...]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"empty list of {what}")
        try:
            return tuple(convert(item) for item in items)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}") from None

    return parse


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


def _nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _nonneg_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(text)
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise ValueError(text)
    return value


def _name_value(text: str) -> tuple[str, float]:
    name, separator, value = text.partition("=")
    if not separator:
        raise ValueError(text)
    return name.strip().lower(), _positive_float(value)


def _single(convert: Callable[[str], T], what: str) -> Callable[[str], T]:
    def parse(text: str) -> T:
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``fop-bench``."""
    parser = _Parser(
        prog=PROG,
        description="Time-to-accuracy benchmark of FOP against SGD, AdamW and K-FAC across batch sizes. "
        "Without arguments: the embedded digits-mlp task on the CPU (a few minutes, no download).",
        epilog="Protocol and examples: docs/benchmark.md. Rerunning a command resumes it: finished runs are skipped.",
    )
    what = parser.add_argument_group("what to run")
    what.add_argument(
        "--task", metavar="NAME", default="digits-mlp", help="benchmark task (default: digits-mlp; --list shows all)"
    )
    what.add_argument("--list", action="store_true", help="list the tasks with their defaults and exit")
    what.add_argument(
        "--optimizers",
        metavar="LIST",
        type=_list_of(str, "names"),
        help="comma-separated: sgd, adamw, kfac, fop, any torch.optim class, pytorch-optimizer names "
        "(default: sgd,adamw,kfac,fop)",
    )
    what.add_argument(
        "--batch-sizes",
        metavar="LIST",
        type=_list_of(_positive_int, "positive integers"),
        help="comma-separated batch sizes (default: the task's)",
    )
    what.add_argument(
        "--seeds",
        metavar="LIST",
        type=_list_of(int, "integers"),
        help="comma-separated seeds (default: the task's, e.g. 0)",
    )
    what.add_argument(
        "--lr-grid",
        metavar="LIST",
        type=_list_of(_positive_float, "finite positive numbers"),
        help="factors on the scaled learning rate, the same tuning budget for every optimizer; "
        "the best is reported (default: the task's)",
    )
    what.add_argument(
        "--max-epochs",
        metavar="N",
        type=_single(_positive_int, "a positive integer"),
        help="epoch budget; a run not reaching the target by then is a miss (default: the task's)",
    )
    what.add_argument(
        "--target",
        metavar="ACC",
        type=_single(_positive_float, "a number"),
        help="test-accuracy target, as a fraction (0.88) or percent (88) (default: the task's)",
    )
    what.add_argument(
        "--stop-at-target",
        action="store_true",
        help="end each run when it reaches the target (faster; final accuracy is then at that epoch)",
    )
    what.add_argument(
        "--baseline",
        metavar="NAME",
        help="optimizer the speedups are computed against (default: sgd if run, else the first)",
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        metavar="PATH",
        type=Path,
        help=f"CIFAR-10 JPEG pack (.npz) or CIFAR-10 folder (python pickles) for the CIFAR tasks "
        f"(default: ${DATA_ENV})",
    )
    data.add_argument(
        "--download", action="store_true", help="download the original CIFAR-10 into --data with torchvision if missing"
    )
    data.add_argument(
        "--imbalance",
        metavar="FACTOR",
        type=_single(_positive_float, "a number"),
        help="imbalance factor of cifar10-lt-resnet32 (default 100; the paper also uses 50)",
    )
    data.add_argument(
        "--subset",
        metavar="N",
        type=_single(_positive_int, "a positive integer"),
        help="use at most N training and N test images, class-balanced (quick runs, tests)",
    )
    data.add_argument(
        "--cache-dir",
        metavar="DIR",
        type=Path,
        help="where the decoded JPEG pack is cached (default: $FOP_CACHE_DIR or ~/.cache/fop)",
    )

    tuning = parser.add_argument_group("optimizer settings")
    tuning.add_argument(
        "--base-lr",
        metavar="NAME=LR,...",
        type=_list_of(_name_value, "NAME=VALUE pairs"),
        help="override base learning rates at the task's reference batch, e.g. fop=0.05,adamw=2e-3",
    )
    tuning.add_argument(
        "--lr-scaling",
        choices=("linear", "sqrt"),
        help="scaling rule for all optimizers (default: linear for SGD-like, K-FAC and FOP; sqrt for adaptive ones)",
    )
    tuning.add_argument(
        "--curvature-interval",
        metavar="STEPS",
        type=_single(_positive_int, "a positive integer"),
        help="fixed K-FAC/FOP curvature and inverse update interval in steps (default: the batch-size rule)",
    )
    tuning.add_argument(
        "--damping",
        metavar="LAMBDA",
        type=_single(_positive_float, "a positive number"),
        help="K-FAC/FOP damping (default: the task's; 1e-3 for the CIFAR tasks)",
    )
    tuning.add_argument(
        "--damping-grid",
        metavar="LIST",
        type=_list_of(_positive_float, "positive numbers"),
        help="tune K-FAC/FOP's damping too: every learning rate x every damping of LIST",
    )
    tuning.add_argument(
        "--wd-grid",
        metavar="LIST",
        type=_list_of(_nonneg_float, "numbers >= 0"),
        help="tune the weight decay of the other optimizers: every learning rate x every value of LIST "
        "(as long as --damping-grid, so that every optimizer gets the same number of trials)",
    )
    tuning.add_argument(
        "--extend-edges",
        metavar="N",
        type=_single(_nonneg_int, "an integer >= 0"),
        default=1,
        help="rounds of automatic grid extension: a cell whose best learning rate, damping or weight decay lies on "
        "the edge of what was tried gets one more value beyond that edge, per round (default: 1; 0 turns it off)",
    )
    tuning.add_argument(
        "--compare-to",
        metavar="NAME",
        help="reference of the paired per-seed comparison in the report (default: kfac if run, else the baseline)",
    )

    machine = parser.add_argument_group("machine and output")
    machine.add_argument(
        "--device",
        metavar="DEVICE",
        default="auto",
        help="auto (cuda if available), cpu, cuda, cuda:1, ... (default: auto)",
    )
    machine.add_argument(
        "--micro-batch",
        metavar="N",
        type=_single(_positive_int, "a positive integer"),
        help="accumulate gradients over micro-batches of this size (must divide each batch size; "
        "default: the task's memory limit)",
    )
    machine.add_argument(
        "--threads",
        metavar="N",
        type=_single(_positive_int, "a positive integer"),
        help="CPU threads of torch (default: the task's choice, 1 for digits-mlp, else torch's)",
    )
    machine.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    machine.add_argument(
        "--width",
        metavar="N",
        type=_single(_positive_int, "a positive integer"),
        help="model width (MLP hidden units, ResNet base channels, ViT dimension; default: the task's)",
    )
    machine.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        help="output folder for runs.jsonl, results.md and the plot (default: bench-runs/<task>)",
    )
    machine.add_argument(
        "--nproc",
        metavar="N",
        type=_single(_positive_int, "a positive integer"),
        help="instead of the sweep: distributed scaling benchmark, 1 and N processes under torchrun "
        "(time per step, scaling efficiency, optimizer-state memory per process, bytes per step; "
        "python -m fop.distributed_bench --help has its options)",
    )
    machine.add_argument(
        "--profile",
        action="store_true",
        help="instead of the sweep: amortized time per step, peak memory and the time of each phase of the "
        "step (forward+backward, capture, factors, eigh, direction, update) per optimizer and batch size; "
        "writes DIR/profile.md",
    )
    machine.add_argument(
        "--profile-steps",
        metavar="N",
        type=_single(_positive_int, "a positive integer"),
        help="steps per profiled window, rounded up to whole curvature intervals (default: max(interval, 10))",
    )
    machine.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars, one line per finished run instead (also the default when stderr is not a terminal)",
    )
    return parser


def _profile(
    args: argparse.Namespace, task: Task, dataset: Any, device: torch.device, plan: Sequence[Any],
    optimizers: dict[str, OptimizerSpec], baseline: str, out: Path, env: dict[str, Any], command: str,
) -> int:  # fmt: skip
    """``--profile``: one learning rate and seed per optimizer and batch size, measured side by side."""
    from fop.bench.data import BatchPipeline
    from fop.bench.profile import format_profile, profile_runs

    seen: set[tuple[str, int]] = set()
    specs = []
    for spec in plan:
        if (spec.optimizer, spec.batch_size) not in seen:
            seen.add((spec.optimizer, spec.batch_size))
            specs.append(spec)
    pipeline = BatchPipeline(dataset, device, crop_padding=task.crop_padding, channels_last=device.type == "cuda")
    header = f"{task.name} step profile: {env['hardware']}; torch {env['torch']}; command: {command}"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in specs:  # the table is rewritten after each row: an interrupted profile keeps its rows
        rows += profile_runs([spec], task, dataset, pipeline, optimizers, args.profile_steps)
        table = format_profile(rows, baseline, header)
        (out / "profile.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


def _list_tasks() -> str:
    from fop.bench.tasks import get_task, task_names

    lines = []
    for name in task_names():
        task = get_task(name)
        lines.append(f"{name}: {task.summary}")
        lines.append(
            f"    batch sizes {','.join(map(str, task.batch_sizes))}; max epochs {task.max_epochs}; "
            f"lr grid {','.join(f'{f:.3g}' for f in task.lr_grid)}; base lrs at batch {task.reference_batch}: "
            + ", ".join(f"{k}={v:g}" for k, v in task.base_lrs.items())
        )
    return "\n".join(lines)


def _resolve_device(text: str) -> torch.device:
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise BenchError(f"unknown device {text!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {text}: CUDA is not available on this machine (use --device cpu)")
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device {text}: only cpu and cuda are supported")
    return device


def _target_fraction(value: float) -> float:
    """``--target`` as a fraction: 0.88 stays, 88 (a percent) becomes 0.88."""
    fraction = value / 100 if value > 1 else value
    if not 0 < fraction <= 1:
        raise BenchError(f"--target {value:g} is not an accuracy (give a fraction like 0.88 or a percent like 88)")
    return fraction


def _check_task_options(args: argparse.Namespace, task: Task) -> None:
    """Reject data options the task does not read (``--data`` for digits, ``--imbalance`` off CIFAR-10-LT)."""
    for flag, field, value in (("--data", "path", args.data), ("--imbalance", "imbalance", args.imbalance)):
        if value is not None and field not in task.data_options:
            raise BenchError(f"{flag} does not apply to task {task.name}")


def _protocol_lines(task: Task, config: SweepConfig, plan: Sequence[RunSpec]) -> list[str]:
    """Protocol facts of this sweep for the report header."""
    from fop.bench.optimizers import CURVATURE_OPTIMIZERS

    lr_rules = sorted({(spec.optimizer, spec.lr_scaling) for spec in plan})
    intervals = sorted({(spec.batch_size, spec.hyperparameters.curvature_interval) for spec in plan})
    micro = sorted({(spec.batch_size, spec.micro_batch) for spec in plan if spec.micro_batch != spec.batch_size})
    lines = [
        f"protocol: learning rates scaled from the base at batch {task.reference_batch} "
        f"({', '.join(f'{name} {rule}' for name, rule in lr_rules)}), {task.warmup_epochs:g} warmup epochs, "
        f"cosine decay to 0 at epoch {config.max_epochs}; the last partial batch of each epoch is dropped",
        "device data path: dataset resident on the device as uint8, augmentation "
        + (f"(random crop, padding {task.crop_padding}, flip) on the device" if task.crop_padding else "none")
        + (", channels_last" if config.device.startswith("cuda") else "")
        + (", bf16 autocast" if config.device.startswith("cuda") and config.bf16 else ""),
    ]
    if any(spec.optimizer in CURVATURE_OPTIMIZERS for spec in plan):
        lines.append(
            f"K-FAC/FOP: damping {plan[0].hyperparameters.damping:g}, curvature and inverse update interval "
            + ", ".join(f"{interval} steps at batch {batch}" for batch, interval in intervals)
            + f", first-order fallback {task.curvature.fallback}"
        )
    if micro:
        lines.append("micro-batches (gradient accumulation): " + ", ".join(f"{m} at batch {b}" for b, m in micro))
    return lines


def _run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        print(_list_tasks())
        return 0

    from fop.bench.optimizers import resolve_optimizer
    from fop.bench.tasks import get_task

    if args.nproc:
        return _distributed(args)
    started = time.perf_counter()
    command = shlex.join([PROG, *argv])
    task = get_task(args.task)
    _check_task_options(args, task)
    optimizer_names = tuple(dict.fromkeys(name.lower() for name in (args.optimizers or task.optimizers)))
    optimizers = {spec.name: spec for spec in map(resolve_optimizer, optimizer_names)}
    baseline = (args.baseline or ("sgd" if "sgd" in optimizers else optimizer_names[0])).lower()
    if baseline not in optimizers:
        raise BenchError(f"--baseline {baseline} is not among the optimizers run ({', '.join(optimizers)})")
    _comparison_reference(args, optimizers, baseline)  # fail before training
    device = _resolve_device(args.device)
    threads = args.threads or (task.cpu_threads if device.type == "cpu" else None)
    with _torch_threads(threads):
        return _sweep(args, task, optimizers, baseline, device, command, started)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch CPU threads (``None``: unchanged), restoring the count after."""
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# what --nproc passes on to the distributed benchmark; every other option belongs to the sweep
_NPROC_OPTIONS = {"nproc", "optimizers", "threads", "out", "no_progress"}


def _distributed(args: argparse.Namespace) -> int:
    """``--nproc N``: the synthetic scaling benchmark of :mod:`fop.distributed_bench`, 1 and N processes."""
    from fop.distributed_bench import main as distributed_main

    parser = build_parser()
    ignored = sorted(
        f"--{name.replace('_', '-')}" for name, value in vars(args).items()
        if name not in _NPROC_OPTIONS and value != parser.get_default(name)
    )  # fmt: skip
    if ignored:
        raise BenchError(
            f"--nproc runs the distributed scaling benchmark on a synthetic model (python -m fop.distributed_bench "
            f"--help lists its options), which does not take {', '.join(ignored)}; drop them or run it directly"
        )
    optimizers = args.optimizers or ("fop", "kfac")
    unknown = sorted(set(optimizers) - {"fop", "kfac"})
    if unknown:
        raise BenchError(f"--nproc measures fop and kfac only, not {', '.join(unknown)}")
    argv = ["--nproc", f"1,{args.nproc}", "--width", "256", "--steps", "5", "--optimizers", ",".join(optimizers)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.out:
        _check_output_folder(args.out)
        argv += ["--json", str(args.out / "distributed.json")]
    return distributed_main(argv)


def _check_output_folder(out: Path) -> None:
    """Fail before any data loading or training when the results could not be written to ``out``."""
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise BenchError(f"--out {out}: {folder} is a file, not a folder; choose another --out")
            break
    runs = out / "runs.jsonl"
    if runs.exists() and not runs.is_file():
        raise BenchError(f"--out {out}: {runs} exists and is not a file; remove it or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".{PROG}-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        if runs.exists():
            with open(runs, "a", encoding="utf-8"):
                pass
    except OSError as exc:
        raise BenchError(f"--out {out} is not writable ({exc.strerror or exc}); choose another --out") from None


def _sweep(
    args: argparse.Namespace,
    task: Task,
    optimizers: dict[str, OptimizerSpec],
    baseline: str,
    device: torch.device,
    command: str,
    started: float,
) -> int:
    """Load the data, train every run not yet finished, write and print the reports."""
    from fop.bench.data import BatchPipeline
    from fop.bench.report import (
        environment,
        format_paired_table,
        format_final_table,
        format_report,
        format_table1,
        plot_curves,
        summarize,
    )
    from fop.bench.runner import ResultStore, SweepConfig, plan_runs, run_sweep
    from fop.bench.tasks import DataOptions

    out = args.out or Path("bench-runs") / task.name
    _check_output_folder(out)
    data_path = args.data or (
        Path(os.environ[DATA_ENV]) if "path" in task.data_options and os.environ.get(DATA_ENV) else None
    )
    dataset = task.load_data(
        DataOptions(
            path=data_path,
            subset=args.subset,
            imbalance=args.imbalance,
            cache_dir=args.cache_dir,
            download=args.download,
        )
    )
    config = SweepConfig(
        optimizers=tuple(optimizers),
        batch_sizes=args.batch_sizes or task.batch_sizes,
        lr_grid=args.lr_grid or task.lr_grid,
        seeds=args.seeds or task.seeds,
        max_epochs=args.max_epochs or task.max_epochs,
        target=task.default_target(dataset) if args.target is None else _target_fraction(args.target),
        device=str(device),
        micro_batch=args.micro_batch,
        width=args.width,
        lr_scaling=args.lr_scaling,
        base_lrs=tuple(args.base_lr or ()),
        curvature_interval=args.curvature_interval,
        damping=args.damping,
        bf16=not args.fp32,
        stop_at_target=args.stop_at_target,
        damping_grid=args.damping_grid,
        weight_decay_grid=args.wd_grid,
    )
    _check_budget(config, optimizers)
    plan = plan_runs(config, task, dataset, list(optimizers.values()))

    env = environment(device)
    if args.profile:
        return _profile(args, task, dataset, device, plan, optimizers, baseline, out, env, command)
    print(f"{PROG}: {task.name} on {env['hardware']}, torch {env['torch']}: {len(plan)} runs -> {out}", file=sys.stderr)
    pipeline = BatchPipeline(dataset, device, crop_padding=task.crop_padding, channels_last=device.type == "cuda")
    store = ResultStore(out / "runs.jsonl")
    progress = not args.no_progress and sys.stderr.isatty()
    context = {"environment": env, "command": command}
    records = run_sweep(plan, task, dataset, pipeline, optimizers, store, context=context, progress=progress)
    for _ in range(args.extend_edges):
        extra = _edge_extension(records, config, task, dataset, optimizers)
        if not extra:
            break
        print(f"grid edge: {len(extra)} more runs beyond the edges of the grid", file=sys.stderr)
        records += run_sweep(extra, task, dataset, pipeline, optimizers, store, context=context, progress=progress)

    plot_file = "accuracy_vs_time.png"
    title = f"{task.name}: {env['hardware']}, torch {env['torch']}\n{command}"
    plot_curves(records, out / plot_file, config.batch_sizes, config.optimizers, config.target, task.metric, title)
    report = format_report(
        task=task.name,
        summary_line=task.summary,
        records=records,
        batch_sizes=config.batch_sizes,
        optimizers=config.optimizers,
        baseline=baseline,
        metric=task.metric,
        target=config.target,
        protocol=_protocol_lines(task, config, plan),
        env=env,
        command=command,
        dataset=dataset.summary(),
        plot_file=plot_file,
        reference=_comparison_reference(args, optimizers, baseline),
    )
    (out / "results.md").write_text(report, encoding="utf-8")

    seeds = len(config.seeds)
    print(
        f"\n{task.name}: epochs / seconds to {100 * config.target:g}% test accuracy "
        f"(median of {seeds} seed{'s' * (seeds > 1)}, best of {len(config.lr_grid)} lr; (×) speedup vs {baseline}; "
        f"— not reached in {config.max_epochs} epochs)"
    )
    print(f"{env['hardware']}; torch {env['torch']}; command: {command}\n")
    cells = summarize(records)
    print(format_table1(cells, config.batch_sizes, config.optimizers, baseline))
    print(
        f"\nfinal {'Top-1 error' if task.metric == 'error' else 'test accuracy'} % (best in run), median over seeds:\n"
    )
    print(format_final_table(cells, config.batch_sizes, config.optimizers, task.metric))
    reference = _comparison_reference(args, optimizers, baseline)
    if len(config.seeds) >= 2 and len(config.optimizers) > 1:
        print(f"\npaired per-seed comparison against {reference} (final accuracy points, median [95% bootstrap CI]):\n")
        print(format_paired_table(cells, config.batch_sizes, config.optimizers, reference, task.metric))
    print(f"\nfull report: {out / 'results.md'}; plot: {out / plot_file}; runs: {out / 'runs.jsonl'}")
    print(f"total wall time {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def _check_budget(config: SweepConfig, optimizers: dict[str, OptimizerSpec]) -> None:
    """The same number of trials for every optimizer: both second axes, or neither, equally long."""
    from fop.bench.runner import second_axis

    sizes = {name: len(second_axis(config, spec)) for name, spec in optimizers.items()}
    if len(set(sizes.values())) > 1:
        detail = ", ".join(f"{name} {size}" for name, size in sizes.items())
        raise BenchError(
            f"unequal tuning budgets ({detail} values on the second axis): give --damping-grid and --wd-grid "
            "lists of the same length, or neither"
        )


def _beyond(values: Sequence[float], chosen: float) -> float:
    """One geometric grid step past the edge value ``chosen`` of the sorted ``values``."""
    if chosen == values[0]:
        value = values[0] * values[0] / values[1] if values[0] > 0 else 0.0
    else:
        value = values[-1] * values[-1] / values[-2] if values[-2] > 0 else 10 * values[-1]
    return float(f"{value:.10g}")  # 0.01, not 0.010000000000000002: records and reports stay readable


def _edge_extension(
    records: Sequence[dict[str, Any]], config: SweepConfig, task: Task, dataset: Any,
    optimizers: dict[str, OptimizerSpec],
) -> list[RunSpec]:  # fmt: skip
    """Runs one geometric grid step beyond every edge a cell's best configuration lies on.

    A learning-rate edge adds the new factor with every value of the second axis; a damping or
    weight-decay edge adds the new value at the cell's chosen learning-rate factor.
    """
    from fop.bench.report import summarize
    from fop.bench.runner import plan_runs

    extra: list[RunSpec] = []
    tried: dict[tuple[int, str], list[set[float]]] = {}
    for record in records:
        spec, hp = record["spec"], record["spec"]["hyperparameters"]
        sets = tried.setdefault((spec["batch_size"], spec["optimizer"]), [set(), set(), set()])
        for axis, value in enumerate((spec["lr_factor"], hp.get("damping"), hp.get("weight_decay"))):
            if value is not None:
                sets[axis].add(value)
    for (batch_size, name), cell in summarize(records).items():
        factors, dampings, decays = (sorted(values) for values in tried[(batch_size, name)])
        one = dataclasses.replace(config, optimizers=(name,), batch_sizes=(batch_size,))
        if "lr" in cell.edges:
            new_lr = _beyond(factors, cell.lr_factor)
            extra += plan_runs(dataclasses.replace(one, lr_grid=(new_lr,)), task, dataset, [optimizers[name]])
        if "damping" in cell.edges and cell.damping is not None:
            new = _beyond(dampings, cell.damping)
            single = dataclasses.replace(one, lr_grid=(cell.lr_factor,), damping_grid=(new,))
            extra += plan_runs(single, task, dataset, [optimizers[name]])
        if "weight decay" in cell.edges and cell.weight_decay is not None:
            new = _beyond(decays, cell.weight_decay)
            single = dataclasses.replace(one, lr_grid=(cell.lr_factor,), weight_decay_grid=(new,))
            extra += plan_runs(single, task, dataset, [optimizers[name]])
    return extra


def _comparison_reference(args: argparse.Namespace, optimizers: dict[str, OptimizerSpec], baseline: str) -> str:
    reference = (args.compare_to or ("kfac" if "kfac" in optimizers else baseline)).lower()
    if reference not in optimizers:
        raise BenchError(f"--compare-to {reference} is not among the optimizers run ({', '.join(optimizers)})")
    return reference


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fop-bench`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Bad input prints one line ``fop-bench: error: ...`` on stderr and returns 2.
    """
    try:
        return _run(list(sys.argv[1:] if argv is None else argv))
    except BenchError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished runs are saved, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
