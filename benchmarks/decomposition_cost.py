"""Time of one eigendecomposition and one Cholesky factorisation of a damped SPD factor, by size.

K-FAC/FOP's inverse work per curvature step is one eigh per Kronecker factor (exact damping) or one
Cholesky (factored damping). ResNet-18's conv input factors are C_in*k*k: 27 ... 4608.

    python benchmarks/decomposition_cost.py [--device cuda] [--sizes 576,1152,2304,4608]
"""

from __future__ import annotations

import argparse
import time

import torch


def seconds(fn, device: torch.device, repeats: int = 3) -> float:
    fn()  # warm-up: library initialisation, workspace
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="576,1152,2304,4608")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"| size | eigh ms | cholesky ms | eigh / cholesky |  ({device}, torch {torch.__version__})")
    print("| --- | --- | --- | --- |")
    for n in (int(s) for s in args.sizes.split(",")):
        x = torch.randn(n, 2 * n, device=device)
        factor = x @ x.T / (2 * n) + 1e-3 * torch.eye(n, device=device)
        eigh = seconds(lambda: torch.linalg.eigh(factor), device)
        chol = seconds(lambda: torch.linalg.cholesky(factor), device)
        print(f"| {n} | {1000 * eigh:.1f} | {1000 * chol:.2f} | {eigh / chol:.0f} |", flush=True)


if __name__ == "__main__":
    main()
