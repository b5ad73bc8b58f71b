"""How far factors from a sample of the batch (``factor_samples``) are from the full-batch factors.

    python benchmarks/factor_sampling_error.py [--data ../shared/data/cifar10_jpeg.npz] [--batch 1024]
        [--width 16] [--samples 64,128,256,512] [--train-steps 10] [--damping 1e-3]

One CIFAR-10 training batch (the JPEG pack through :func:`fop.bench.data.load_cifar10`, a class-balanced
subset of the training set, shuffled, random crop and flip as in the benchmark) through the benchmark's
ResNet-18 (:func:`fop.bench.models.resnet18`, reduced width), after ``--train-steps`` steps of SGD so
the network is off its initialisation. The factors are captured by the optimizer's own hooks in one
forward/backward per setting, from the same weights and batch: every sample (``factor_samples=None``)
and each ``m`` of ``--samples``. Reported per ``m``:

* ``‖A_m − A‖_F / ‖A‖_F`` and the same for ``G``, per layer (median and max over the layers, and the
  first convolution, the widest input factor and the head by name);
* the cosine between the directions with sampled and with exact factors, K-FAC (``M⁻¹ g``) and FOP
  (:func:`fop.functional.fop_direction`, the same exact halves ``g1``, ``g2``), over all curvature
  layers concatenated and the lowest per layer. Damping ``λ`` as in the CIFAR tasks, exact damping.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from fop import FOP
from fop.bench.data import BatchPipeline, load_cifar10
from fop.bench.models import resnet18
from fop.curvature import LayerWork, loss_scale_ratio
from fop.functional import fop_direction


def captured(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, factor_samples: int | None) -> dict:
    """``{layer: LayerWork}`` of one forward/backward of a copy of ``model`` with this ``factor_samples``."""
    model = copy.deepcopy(model)
    optimizer = FOP(model, factor_samples=factor_samples)
    F.cross_entropy(model(x), y).backward()
    ratio = loss_scale_ratio(optimizer.layers)
    return {layer.name: LayerWork.from_capture(layer, ratio) for layer in optimizer.layers}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def directions(work: dict, damping: float) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {"kfac": {}, "fop": {}}
    for name, item in work.items():
        for key, projection in (("kfac", False), ("fop", True)):
            result = fop_direction(item.g1, item.g2, item.a_factor, item.g_factor, damping, projection=projection)
            out[key][name] = result.direction
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10_jpeg.npz")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--samples", default="64,128,256,512")
    parser.add_argument("--train-steps", type=int, default=10, help="SGD steps (batch 256) before measuring")
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sizes = [int(s) for s in args.samples.split(",")]
    start = time.process_time()
    torch.manual_seed(args.seed)
    dataset = load_cifar10(args.data, subset=2 * args.batch + 2 * 256 * args.train_steps)
    pipeline = BatchPipeline(dataset, "cpu", crop_padding=4)
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(pipeline.train_size, generator=generator)
    model = resnet18(dataset.num_classes, width=args.width)
    loss = torch.zeros(())
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for step in range(args.train_steps):
        x, y = pipeline.train_batch(order[args.batch + 256 * step : args.batch + 256 * (step + 1)], generator)
        sgd.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        sgd.step()
    x, y = pipeline.train_batch(order[: args.batch], generator)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; ResNet-18 width {args.width}, "
        f"batch {args.batch}, after {args.train_steps} SGD steps (last loss {float(loss.detach()):.3f}); "
        f"damping {args.damping}"
    )
    exact = captured(model, x, y, None)
    exact_dirs = directions(exact, args.damping)
    names = list(exact)
    widest = max(names, key=lambda n: exact[n].a_factor.shape[0])
    shown = [names[0], widest, names[-1]]
    print(
        "\n| factor_samples | A rel. err. median / max | G rel. err. median / max | "
        + " | ".join(f"A / G {n} ({exact[n].a_factor.shape[0]})" for n in shown)
        + " | K-FAC cos (all / lowest layer) | FOP cos (all / lowest layer) |"
    )
    print("| --- " * (5 + len(shown)) + "|")
    for m in sizes:
        work = captured(model, x, y, m)
        a_err = {n: relative(work[n].a_factor, exact[n].a_factor) for n in names}
        g_err = {n: relative(work[n].g_factor, exact[n].g_factor) for n in names}
        dirs = directions(work, args.damping)
        cells = []
        for key in ("kfac", "fop"):
            flat = torch.cat([dirs[key][n].flatten() for n in names])
            flat_exact = torch.cat([exact_dirs[key][n].flatten() for n in names])
            lowest = min(names, key=lambda n: cosine(dirs[key][n], exact_dirs[key][n]))
            cells.append(
                f"{cosine(flat, flat_exact):.4f} / {cosine(dirs[key][lowest], exact_dirs[key][lowest]):.4f} ({lowest})"
            )
        print(
            f"| {m} | {statistics.median(a_err.values()):.3f} / {max(a_err.values()):.3f} | "
            f"{statistics.median(g_err.values()):.3f} / {max(g_err.values()):.3f} | "
            + " | ".join(f"{a_err[n]:.3f} / {g_err[n]:.3f}" for n in shown)
            + f" | {cells[0]} | {cells[1]} |"
        )
    print(f"\n{len(names)} curvature layers; process CPU time {time.process_time() - start:.0f} s")


if __name__ == "__main__":
    main()
