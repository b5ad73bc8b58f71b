"""FOP on torchvision's own models: ``resnet18`` and a small ``VisionTransformer``, unchanged.

A plain training loop, the one line that differs being ``FOP(model, ...)`` in place of
``torch.optim.SGD(model.parameters(), ...)``; a few steps on a fixed batch of CIFAR-sized images::

    python examples/torchvision_recipe.py                 # both models, 10 steps each
    python examples/torchvision_recipe.py --model vit --steps 20

The ResNet's convolutions and classifier get Kronecker curvature (its BatchNorm layers the
first-order rule); the ViT's patch embedding (a ``Conv2d``), every attention block's
``nn.MultiheadAttention`` projections, its MLPs and the head do too. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fop import FOP

_DECLARATIONS: list[torch.library.Library] = []


def import_torchvision() -> ModuleType:
    """``import torchvision``, also where its C extension cannot load.

    torchvision 0.28's wheels are CUDA builds: on a CPU-only torch their C extension (the detection
    ops: ``nms``, ``roi_align``, ...) does not load, which torchvision tolerates, except that its
    import then registers a kernel for the undeclared ``torchvision::nms`` and fails. Declaring the
    two ops it registers unconditionally lets the pure-Python models import; nothing here calls them.
    """
    try:
        import torchvision
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
        for name in [name for name in sys.modules if name.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        library = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _DECLARATIONS.append(library)  # a Library's definitions last as long as the object
        import torchvision
    return torchvision


def build(name: str) -> nn.Module:
    models = import_torchvision().models
    if name == "resnet18":
        return models.resnet18(num_classes=10)
    # vit_b_16's architecture at a size that trains in seconds on a CPU
    return models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )


def train(name: str, steps: int, lr: float) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build(name)
    gen = torch.Generator().manual_seed(1)
    images, labels = torch.randn(32, 3, 32, 32, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    losses = []
    with warnings.catch_warnings(record=True) as caught:  # fop warns once per layer it cannot serve
        warnings.simplefilter("always")
        optimizer = FOP(model, lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    return {
        "losses": losses,
        "curvature_layers": sorted(optimizer.diagnostics()),
        "warnings": [str(w.message) for w in caught],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["resnet18", "vit", "both"], default="both")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args(argv)
    names = ["resnet18", "vit"] if args.model == "both" else [args.model]
    report: dict[str, Any] = {name: train(name, args.steps, args.lr) for name in names}
    report["torchvision"] = import_torchvision().__version__
    return report


if __name__ == "__main__":
    print(json.dumps(main()))
