"""``fop-bench``: time-to-accuracy benchmark of FOP against SGD, AdamW and K-FAC.

The command line lives in :mod:`fop.bench.cli` (``fop-bench`` or ``python -m fop.bench``); the
protocol is described in ``docs/benchmark.md``. The package needs the ``bench`` extra
(``pip install 'fop[bench]'``: numpy, pillow, matplotlib, scikit-learn, tqdm); none of it is
imported by ``import fop``.

Layout: :mod:`~fop.bench.data` (datasets and the on-device batch pipeline),
:mod:`~fop.bench.models`, :mod:`~fop.bench.tasks` (one module per task, and the registry),
:mod:`~fop.bench.optimizers` (factory, learning-rate and curvature-interval rules),
:mod:`~fop.bench.runner` (timed training loop, JSON lines, resume) and
:mod:`~fop.bench.report` (Table 1, Figure 2, environment header).
"""

from fop.bench.errors import BenchError

__all__ = ["BenchError"]
