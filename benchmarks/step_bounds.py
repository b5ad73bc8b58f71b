"""Arithmetic floors under FOP's and K-FAC's step cost and memory, for step_cost.py's two models.

    python benchmarks/step_bounds.py [--batch 256]

Counts multiply-adds (MACs) of the dense products every exact implementation has to do, per fop
layer with folded weight ``(m, n)`` (``n`` includes the bias column; a convolution's ``n`` is
``C_in·k·k + 1`` and it has ``P`` output positions per sample), at batch ``B``; the direction's
products come from the owners' cost model, :func:`fop.assignment.layer_cost`:

* SGD (forward + backward): ``B·P·m·(n−1)`` (the weight's own size) for the forward, as much for the weight gradient and
  for the input gradient (not for the first layer, whose input needs none);
* K-FAC's direction under factored damping, ``G_inv X A_inv``: one "unit" ``m²n + mn²``;
* FOP's direction: ``M⁻¹`` of ``g_avg`` and ``g1 − g2`` and ``F g_avg = G g_avg A``: three units
  (the eigenbasis route under exact damping also needs three: two rotations in, one out); plus the
  first half's weight gradient formed in the hooks, ``½·B·P·m·(n−1)``.

The ratio ``(SGD + extra) / SGD`` is the ordinary step's cost as a multiple of SGD's if every
multiply-add cost the same and nothing else cost anything: a floor where the step is products (the
MLP), not where SGD's own time is mostly other work (pooling, activations and the convolution
kernels' overheads make the CNN's SGD step slower per multiply-add than the GEMMs FOP adds).
Memory, a strict floor: the float32 state every K-FAC-type method holds (``A``, ``G`` and their damped inverses:
``2·(n² + m²)`` numbers per layer) and, on curvature steps, the batch's factor sums held from the
backward pass to the step (``n² + m²`` more).
"""

from __future__ import annotations

import argparse
import math

import torch
from step_cost import MODELS
from torch import nn

from fop import KFAC
from fop.assignment import layer_cost
from fop.curvature import KroneckerLayer


def curvature_layers(name: str) -> list[tuple[KroneckerLayer, int]]:
    """fop's Kronecker layers of the model (folded ``(m, n)`` shapes) and each one's output positions."""
    model = MODELS[name][0]()
    layers = KFAC(model).layers
    positions: dict[int, int] = {}

    def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        positions[id(module)] = out[0, 0].numel() if out.dim() > 2 else 1

    for layer in layers:
        layer.module.register_forward_hook(record)
    model(torch.zeros(2, *MODELS[name][1]))
    return [(layer, positions[id(layer.module)]) for layer in layers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    b = args.batch
    for name in MODELS:
        sgd = half = state = 0
        kfac_products = fop_products = 0.0
        for i, (layer, p) in enumerate(curvature_layers(name)):
            m, n = layer.out_features, layer.in_features
            forward = b * p * m * layer.weight[0].numel()
            sgd += forward * (2 if i == 0 else 3)
            half += forward // 2
            state += n * n + m * m
            # the owners' cost model, without the inverses (inverse_interval=inf), in flops: 2 per multiply-add
            kfac_products += layer_cost(layer, projection=False, inverse_interval=math.inf) / 2
            fop_products += layer_cost(layer, projection=True, inverse_interval=math.inf) / 2
        kfac = (sgd + kfac_products) / sgd
        fop = (sgd + fop_products + half) / sgd
        mib = 4 / 2**20
        print(
            f"{name}, batch {b}: SGD {sgd / 1e6:.1f} M MACs; one unit (m²n + mn² over layers) "
            f"{kfac_products / 1e6:.1f} M; ordinary step at least K-FAC {kfac:.2f}x, FOP {fop:.2f}x SGD; "
            f"state (A, G and inverses) {2 * state * mib:.1f} MiB, + {state * mib:.1f} MiB held on curvature steps"
        )


if __name__ == "__main__":
    main()
