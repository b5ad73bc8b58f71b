"""``python -m fop.bench``: same as the ``fop-bench`` console script."""

from fop.bench.cli import main

raise SystemExit(main())
