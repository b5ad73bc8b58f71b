"""The installed wheel as a user gets it (``make package-check``; not a pytest module).

Run with the Python of a virtual environment holding only torch and the fop wheel, from outside the
checkout's ``src``: the README's quick start trains, the package is typed, and ``fop-bench`` answers
``--help`` and names the extra it needs instead of a traceback.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fop
from fop import FOP, KFAC, PAPER_PRESET


def main() -> None:
    assert "site-packages" in fop.__file__, f"fop imported from {fop.__file__}, not the installed wheel"
    assert resources.files("fop").joinpath("py.typed").is_file(), "py.typed missing from the wheel"

    torch.manual_seed(0)
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    for build in (lambda m: FOP(m, lr=0.1), lambda m: KFAC(m, lr=0.1), lambda m: FOP(m, lr=0.01, **PAPER_PRESET)):
        model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
        optimizer = build(model)
        losses = []
        for _ in range(20):
            optimizer.zero_grad()
            output = model(x)
            if optimizer.fisher == "mc":
                optimizer.sample_fisher(output)
            loss = F.cross_entropy(output, y)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        assert losses[-1] < 0.5 * losses[0], f"quick start did not train: {losses[0]:.3f} -> {losses[-1]:.3f}"

    bench = Path(sys.executable).with_name("fop-bench")
    help_run = subprocess.run([bench, "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0 and "usage: fop-bench" in help_run.stdout, help_run.stderr
    bare = subprocess.run([bench], capture_output=True, text=True)
    last = bare.stderr.strip().splitlines()[-1]
    assert bare.returncode == 2 and "pip install 'fop[bench]'" in last, bare.stderr
    print(f"wheel check: quick start trains (FOP, KFAC, PAPER_PRESET), py.typed, fop-bench --help, '{last}'")


if __name__ == "__main__":
    main()
