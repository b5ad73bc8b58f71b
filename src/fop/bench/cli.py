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
        help="comma-separated: sgd, adamw, kfac, fop; the baselines muon, soap, lamb, lars, sfadamw "
        "(pip install 'fop[baselines]'); any torch.optim class, pytorch-optimizer names (default: sgd,adamw,kfac,fop)",
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
        "--lr-factor",
        metavar="NAME=F,...",
        type=_list_of(_name_value, "NAME=VALUE pairs"),
        help="one learning-rate factor for a named optimizer instead of --lr-grid, e.g. adamw=2,kfac=0.5: "
        "the seeds at each one's chosen configuration (no edge extension for it)",
    )
    what.add_argument(
        "--max-epochs",
        metavar="N",
        type=_single(_positive_int, "a positive integer"),
        help="epoch budget; a run not reaching the target by then is a miss (default: the task's)",
    )
    what.add_argument(
        "--target",
        metavar="VALUE",
        type=_single(_positive_float, "a number"),
        help="target of the task's metric: test accuracy as a fraction (0.88) or percent (88); for charlm-linux "
        "a validation loss in nats per character (default: the task's)",
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
        help="the task's data: CIFAR-10 JPEG pack (.npz) or CIFAR-10 folder (python pickles) for the CIFAR "
        "tasks (default: $FOP_CIFAR10); the linux-kernel-char folder (train.txt, valid.txt) for charlm-linux "
        "(default: $FOP_LINUX_KERNEL_CHAR)",
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
        help="use at most N training and N test images, class-balanced (quick runs, tests); for charlm-linux "
        "the first N characters of each split",
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
        help="reference(s) of the paired per-seed comparison in the report, e.g. kfac,fop: one table each "
        "(default: kfac if run, else the baseline)",
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
        help="model width (MLP hidden units, ResNet base channels, ViT and GPT dimension; default: the task's)",
    )
    machine.add_argument(
        "--layers",
        metavar="N",
        type=_single(_positive_int, "a positive integer"),
        help="model depth, for tasks with a depth option (charlm-linux: transformer blocks; default: the task's)",
    )
    machine.add_argument(
        "--tied-head",
        action="store_true",
        help="share the output head's weight with the token embedding (charlm-linux; GPT-2, nanoGPT); "
        "K-FAC and FOP give the pair one layer, the head's factors on the summed gradient",
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
        help="instead of the sweep: distributed scaling run of the K-FAC/FOP optimizers (default kfac,fop; "
        "fop:replicated for the replicated mode) on 1 and N processes under torchrun, at each batch size "
        "(global): time per step, scaling efficiency, optimizer state per process, bytes per step; "
        "writes DIR/scaling.md",
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
        help="steps per measured window of --profile and --nproc, rounded up to whole curvature intervals "
        "(default: max(interval, 10))",
    )
    machine.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars, one line per finished run instead (also the default when stderr is not a terminal)",
    )
    return parser


def _first_per_cell(plan: Sequence[RunSpec]) -> list[RunSpec]:
    """One learning rate and seed per optimizer and batch size: the first planned."""
    seen: set[tuple[str, int]] = set()
    specs = []
    for spec in plan:
        if (spec.optimizer, spec.batch_size) not in seen:
            seen.add((spec.optimizer, spec.batch_size))
            specs.append(spec)
    return specs


def _profile(run: _Run, plan: Sequence[RunSpec]) -> int:
    """``--profile``: one learning rate and seed per optimizer and batch size, measured side by side."""
    from fop.bench.profile import format_profile, profile_runs

    task, device = run.task, run.device
    pipeline = task.pipeline(run.dataset, device)
    run.out.mkdir(parents=True, exist_ok=True)
    rows: list[Any] = []
    table = ""
    for spec in _first_per_cell(plan):  # the table is rewritten after each row: an interrupted profile keeps its rows
        rows += profile_runs([spec], task, run.dataset, pipeline, run.optimizers, run.args.profile_steps)
        table = format_profile(rows, run.baseline, f"{task.name} step profile: {run.header}")
        (run.out / "profile.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


def _scaling(run: _Run, plan: Sequence[RunSpec]) -> int:
    """``--nproc N``: the distributed scaling run of every K-FAC/FOP optimizer and batch size, 1 and N processes."""
    from fop.bench.scaling import ScalingJob, run_scaling, write_scaling

    nproc = run.args.nproc
    for spec in plan:
        if spec.batch_size % nproc:
            raise BenchError(f"--nproc {nproc} does not divide batch size {spec.batch_size} (the global batch)")
    job = ScalingJob(
        run.task.name, run.data, tuple(_first_per_cell(plan)), str(run.device), torch_threads(), run.args.profile_steps
    )
    results = run_scaling(job, nproc)
    header = f"{run.task.name} distributed scaling, 1 and {nproc} processes, {job.threads} threads each: {run.header}"
    print(write_scaling(results, header, run.out))
    return 0


def _list_tasks() -> str:
    from fop.bench.optimizers import LARS_BASE_LR
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
    lines.append(
        "baselines (pip install 'fop[baselines]'): muon, soap, lamb, sfadamw start from a task's adamw base lr "
        f"unless it names them, lars from {LARS_BASE_LR:g} (docs/benchmark.md)"
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


def _target(value: float, metric: str) -> float:
    """``--target`` in the metric's unit: an accuracy as a fraction (0.88 stays, 88, a percent,
    becomes 0.88); a loss as given."""
    if metric == "loss":
        return value
    fraction = value / 100 if value > 1 else value
    if not 0 < fraction <= 1:
        raise BenchError(f"--target {value:g} is not an accuracy (give a fraction like 0.88 or a percent like 88)")
    return fraction


def _check_task_options(args: argparse.Namespace, task: Task) -> None:
    """Reject data and model options the task does not read (``--data`` for digits, ``--imbalance``
    off CIFAR-10-LT, ``--layers`` for a model without a depth option, ``--tied-head`` for one
    without a token embedding)."""
    for flag, field, value in (("--data", "path", args.data), ("--imbalance", "imbalance", args.imbalance)):
        if value is not None and field not in task.data_options:
            raise BenchError(f"{flag} does not apply to task {task.name}")
    if args.layers is not None and "layers" not in task.model_options:
        raise BenchError(f"--layers does not apply to task {task.name}")
    if args.tied_head and "tied_head" not in task.model_options:
        raise BenchError(f"--tied-head does not apply to task {task.name} (it has no token embedding)")


def _protocol_lines(
    task: Task, config: SweepConfig, plan: Sequence[RunSpec], optimizers: dict[str, OptimizerSpec]
) -> list[str]:
    """Protocol facts of this sweep for the report header."""
    from fop.bench.optimizers import COSINE, CURVATURE_OPTIMIZERS

    others = sorted((name, spec.decay) for name, spec in optimizers.items() if spec.decay != COSINE)
    decay = "cosine decay to 0" + (
        f" (except {', '.join(f'{name}: {rule}' for name, rule in others)})" if others else ""
    )

    lr_rules = sorted({(spec.optimizer, spec.lr_scaling) for spec in plan})
    intervals = sorted({(spec.batch_size, spec.hyperparameters.curvature_interval) for spec in plan})
    micro = sorted({(spec.batch_size, spec.micro_batch) for spec in plan if spec.micro_batch != spec.batch_size})
    lines = [
        f"protocol: learning rates scaled from the base at batch {task.reference_batch} "
        f"({', '.join(f'{name} {rule}' for name, rule in lr_rules)}), {task.warmup_epochs:g} warmup epochs, "
        f"{decay} at epoch {config.max_epochs}; the last partial batch of each epoch is dropped",
    ]
    if task.make_pipeline is None:
        lines.append(
            "device data path: dataset resident on the device as uint8, augmentation "
            + (f"(random crop, padding {task.crop_padding}, flip) on the device" if task.crop_padding else "none")
            + (", channels_last" if config.device.startswith("cuda") else "")
            + (", bf16 autocast" if config.device.startswith("cuda") and config.bf16 else "")
        )
    else:
        lines.append(
            "device data path: token ids resident on the device; each training window starts at a random "
            "offset within its block of the context length"
            + (", bf16 autocast" if config.device.startswith("cuda") and config.bf16 else "")
        )
    if task.evaluations_per_epoch > 1:
        lines.append(
            f"evaluation (untimed) {task.evaluations_per_epoch} times per epoch, after equal shares of its steps: "
            "epochs to target are fractional"
        )
    if any(spec.optimizer in CURVATURE_OPTIMIZERS for spec in plan):
        lines.append(
            f"K-FAC/FOP: damping {plan[0].hyperparameters.damping:g}, curvature and inverse update interval "
            + ", ".join(f"{interval} steps at batch {batch}" for batch, interval in intervals)
            + f", first-order fallback {task.curvature.fallback}"
        )
    if micro:
        lines.append("micro-batches (gradient accumulation): " + ", ".join(f"{m} at batch {b}" for b, m in micro))
    return lines


@dataclasses.dataclass
class _Run:
    """One ``fop-bench`` command after parsing: what every mode (sweep, profile, scaling) reads."""

    args: argparse.Namespace
    task: Task
    optimizers: dict[str, OptimizerSpec]
    baseline: str
    device: torch.device
    out: Path
    command: str
    started: float
    data: Any = None  # the DataOptions the dataset was loaded with
    dataset: Any = None
    env: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def header(self) -> str:
        return f"{self.env['hardware']}; torch {self.env['torch']}; command: {self.command}"


def _run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        print(_list_tasks())
        return 0
    _require_extra("bench")
    run = _prepare(args, argv)
    threads = args.threads or (run.task.cpu_threads if run.device.type == "cpu" else None)
    if args.nproc:  # one thread count for every process of every launch (comparable step times)
        threads = args.threads or max(1, (os.cpu_count() or 1) // args.nproc)
    with _torch_threads(threads):
        plan = _load_and_plan(run)
        if args.profile:
            return _profile(run, plan)
        if args.nproc:
            return _scaling(run, plan)
        return _sweep(run, plan)


def _prepare(args: argparse.Namespace, argv: Sequence[str]) -> _Run:
    """Check the command before any data is loaded: task, optimizers, device, output folder."""
    from fop.bench.optimizers import resolve_optimizer
    from fop.bench.tasks import get_task

    started = time.perf_counter()
    task = get_task(args.task)
    _check_task_options(args, task)
    if args.nproc and args.profile:
        raise BenchError("--nproc and --profile are two modes of fop-bench; choose one")
    names = args.optimizers or (("kfac", "fop") if args.nproc else task.optimizers)
    optimizer_names = tuple(dict.fromkeys(name.lower() for name in names))
    optimizers = {spec.name: spec for spec in map(resolve_optimizer, optimizer_names)}
    if args.nproc:
        first_order = [name for name, spec in optimizers.items() if not spec.uses_curvature]
        if first_order:
            raise BenchError(f"--nproc measures K-FAC and FOP (and their variants) only, not {', '.join(first_order)}")
    baseline = (args.baseline or ("sgd" if "sgd" in optimizers else optimizer_names[0])).lower()
    if baseline not in optimizers:
        raise BenchError(f"--baseline {baseline} is not among the optimizers run ({', '.join(optimizers)})")
    _comparison_references(args, optimizers, baseline)  # fail before training
    device = _resolve_device(args.device)
    out = args.out or Path("bench-runs") / task.name
    _check_output_folder(out)
    return _Run(args, task, optimizers, baseline, device, out, shlex.join([PROG, *argv]), started)


def _load_and_plan(run: _Run) -> list[RunSpec]:
    """Load the task's data into ``run`` and plan the runs the command asks for."""
    from fop.bench.report import environment
    from fop.bench.runner import plan_runs
    from fop.bench.tasks import DataOptions

    args, task = run.args, run.task
    data_path = args.data or (
        Path(os.environ[task.data_env]) if "path" in task.data_options and os.environ.get(task.data_env) else None
    )
    run.data = DataOptions(
        path=data_path, subset=args.subset, imbalance=args.imbalance, cache_dir=args.cache_dir, download=args.download
    )
    run.dataset = task.load_data(run.data)
    run.env = environment(run.device)
    config = _sweep_config(run)
    _check_budget(config, run.optimizers)
    return plan_runs(config, task, run.dataset, list(run.optimizers.values()))


def _sweep_config(run: _Run) -> SweepConfig:
    from fop.bench.runner import SweepConfig

    args, task = run.args, run.task
    return SweepConfig(
        optimizers=tuple(run.optimizers),
        batch_sizes=args.batch_sizes or task.batch_sizes,
        lr_grid=args.lr_grid or task.lr_grid,
        seeds=args.seeds or task.seeds,
        max_epochs=args.max_epochs or task.max_epochs,
        target=task.default_target(run.dataset) if args.target is None else _target(args.target, task.metric),
        device=str(run.device),
        micro_batch=args.micro_batch,
        width=args.width,
        layers=args.layers,
        tied_head=args.tied_head,
        lr_scaling=args.lr_scaling,
        base_lrs=tuple(args.base_lr or ()),
        lr_factors=_lr_factors(args.lr_factor, run.optimizers),
        curvature_interval=args.curvature_interval,
        damping=args.damping,
        bf16=not args.fp32,
        stop_at_target=args.stop_at_target,
        damping_grid=args.damping_grid,
        weight_decay_grid=args.wd_grid,
    )


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


def torch_threads() -> int:
    """Torch's CPU threads in this process."""
    import torch

    return torch.get_num_threads()


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


def _sweep(run: _Run, plan: list[RunSpec]) -> int:
    """Train every run not yet finished (and the grid's edge extensions), write and print the reports."""
    from fop.bench.runner import ResultStore, run_sweep

    task, dataset, out, args = run.task, run.dataset, run.out, run.args
    print(
        f"{PROG}: {task.name} on {run.env['hardware']}, torch {run.env['torch']}: {len(plan)} runs -> {out}",
        file=sys.stderr,
    )
    pipeline = task.pipeline(dataset, run.device)
    store = ResultStore(out / "runs.jsonl")
    progress = not args.no_progress and sys.stderr.isatty()
    context = {"environment": run.env, "command": run.command}
    records = run_sweep(plan, task, dataset, pipeline, run.optimizers, store, context=context, progress=progress)
    config = _sweep_config(run)
    for _ in range(args.extend_edges):
        extra = _edge_extension(records, config, task, dataset, run.optimizers)
        if not extra:
            break
        print(f"grid edge: {len(extra)} more runs beyond the edges of the grid", file=sys.stderr)
        records += run_sweep(extra, task, dataset, pipeline, run.optimizers, store, context=context, progress=progress)
    _write_report(run, config, plan, records)
    _print_summary(run, config, records)
    print(f"total wall time {time.perf_counter() - run.started:.1f} s", file=sys.stderr)
    return 0


def _write_report(run: _Run, config: SweepConfig, plan: Sequence[RunSpec], records: list[dict[str, Any]]) -> None:
    """``results.md`` and the metric-versus-time plot in the output folder."""
    from fop.bench.metrics import get_metric
    from fop.bench.report import format_report, plot_curves

    task, env = run.task, run.env
    plot_file = get_metric(task.metric).plot_file
    title = f"{task.name}: {env['hardware']}, torch {env['torch']}\n{run.command}"
    plot_curves(records, run.out / plot_file, config.batch_sizes, config.optimizers, config.target, task.metric, title)
    report = format_report(
        task=task.name,
        summary_line=task.summary,
        records=records,
        batch_sizes=config.batch_sizes,
        optimizers=config.optimizers,
        baseline=run.baseline,
        metric=task.metric,
        target=config.target,
        protocol=_protocol_lines(task, config, plan, run.optimizers),
        env=env,
        command=run.command,
        dataset=run.dataset.summary(),
        plot_file=plot_file,
        references=_comparison_references(run.args, run.optimizers, run.baseline),
    )
    (run.out / "results.md").write_text(report, encoding="utf-8")


def _print_summary(run: _Run, config: SweepConfig, records: list[dict[str, Any]]) -> None:
    """The paper's Table 1 layout, the final metric and the paired comparison, on stdout."""
    from fop.bench.metrics import get_metric
    from fop.bench.report import format_final_table, format_paired_table, format_table1, summarize

    task, out, seeds = run.task, run.out, len(config.seeds)
    metric = get_metric(task.metric)
    print(
        f"\n{task.name}: epochs / seconds to {metric.target_text(config.target)} "
        f"(median of {seeds} seed{'s' * (seeds > 1)}, best of {len(config.lr_grid)} lr; (×) speedup vs {run.baseline}; "
        f"— not reached in {config.max_epochs} epochs)"
    )
    print(f"{run.header}\n")
    cells = summarize(records)
    print(format_table1(cells, config.batch_sizes, config.optimizers, run.baseline))
    print(f"\nfinal {metric.title} (best in run), median over seeds:\n")
    print(format_final_table(cells, config.batch_sizes, config.optimizers, task.metric))
    for reference in _comparison_references(run.args, run.optimizers, run.baseline):
        if seeds >= 2 and len(config.optimizers) > 1:
            print(
                f"\npaired per-seed comparison against {reference} (final {metric.short}, {metric.difference_unit}, "
                "median [95% bootstrap CI]):\n"
            )
            print(format_paired_table(cells, config.batch_sizes, config.optimizers, reference, task.metric))
    print(f"\nfull report: {out / 'results.md'}; plot: {out / metric.plot_file}; runs: {out / 'runs.jsonl'}")


def _lr_factors(pairs: Sequence[tuple[str, float]] | None, optimizers: dict[str, OptimizerSpec]) -> tuple:
    """``--lr-factor``'s pairs, each naming an optimizer of the run."""
    unknown = [name for name, _ in pairs or () if name not in optimizers]
    if unknown:
        raise BenchError(f"--lr-factor names optimizers not in --optimizers: {', '.join(unknown)}")
    return tuple(pairs or ())


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
    records: Sequence[dict[str, Any]],
    config: SweepConfig,
    task: Task,
    dataset: Any,
    optimizers: dict[str, OptimizerSpec],
) -> list[RunSpec]:
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
    pinned = dict(config.lr_factors)
    for (batch_size, name), cell in summarize(records).items():
        if name in pinned:  # --lr-factor: one chosen configuration, not a grid
            continue
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


def _comparison_references(
    args: argparse.Namespace, optimizers: dict[str, OptimizerSpec], baseline: str
) -> tuple[str, ...]:
    given = args.compare_to or ("kfac" if "kfac" in optimizers else baseline)
    references = tuple(dict.fromkeys(name.strip().lower() for name in given.split(",") if name.strip()))
    for reference in references:
        if reference not in optimizers:
            raise BenchError(f"--compare-to {reference} is not among the optimizers run ({', '.join(optimizers)})")
    return references


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
    except ModuleNotFoundError as exc:
        extra = _EXTRA_OF_MODULE.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(
            f"{PROG}: error: {exc.name} is not installed; the benchmark needs pip install 'fop[{extra}]'",
            file=sys.stderr,
        )
        return 2


# The optional extras of fop-bench by the top-level modules they install (pyproject.toml).
_EXTRA_OF_MODULE = {"numpy": "bench", "PIL": "bench", "matplotlib": "bench", "sklearn": "bench", "tqdm": "bench"}


def _require_extra(extra: str) -> None:
    """One line naming the extra when a module it installs is missing (before torch warns about NumPy)."""
    import importlib.util

    missing = [name for name, of in _EXTRA_OF_MODULE.items() if of == extra and importlib.util.find_spec(name) is None]
    if missing:
        raise BenchError(f"{', '.join(missing)} not installed; the benchmark needs pip install 'fop[{extra}]'")


if __name__ == "__main__":
    sys.exit(main())
