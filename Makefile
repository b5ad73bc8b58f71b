# Two entry points on a fresh clone:
#   make demo  -> creates .venv, installs fop with the benchmark extra, runs fop-bench's default
#   make test  -> creates .venv, installs fop with the test extra, runs ruff check, mypy and the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# A CPU build of torch; users with a GPU install their own torch (fop needs torch>=2.3).
TORCH_SPEC ?= torch==2.13.0
# the torchvision release built against that torch (examples/torchvision_recipe.py and its test)
TORCHVISION_VERSION ?= 0.28.0

.PHONY: venv demo test install-test lint package-check

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"

venv: $(PY)

demo: $(PY)
	$(PIP) install -q -e ".[bench]"
	$(VENV)/bin/fop-bench

install-test: $(PY)
	# the torch spec in the same command keeps the recipes' trainers from replacing the CPU torch
	$(PIP) install -q -e ".[test,recipes]" "$(TORCH_SPEC)"
	# independent K-FAC reference for tests/test_crosscheck.py; --no-deps keeps torchvision's CUDA torch out
	$(PIP) install -q --no-deps curvlinops-for-pytorch einconv linear_operator backpack-for-pytorch
	# examples/torchvision_recipe.py: the torchvision of torch 2.13 is a CUDA build whose import fails on
	# a CPU torch (README); kept out of site-packages, where Lightning would import it, in its own folder
	$(PIP) install -q --no-deps --upgrade --target $(VENV)/torchvision "torchvision==$(TORCHVISION_VERSION)"

# lint, formatting and types first: either failing fails the build before the (minutes-long) tests run
lint: install-test
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(VENV)/bin/mypy src/fop

# the package as a user gets it: wheel and sdist built, the wheel installed into a virtual environment
# with only torch, where the quick start runs and fop-bench says which extra it needs
package-check: install-test
	rm -rf dist $(VENV)-wheel
	$(PY) -m build --sdist --wheel --outdir dist . > /dev/null
	$(PYTHON) -m venv $(VENV)-wheel
	$(VENV)-wheel/bin/pip install -q "$(TORCH_SPEC)" dist/fop-*.whl
	cd dist && ../$(VENV)-wheel/bin/python ../tests/quickstart_check.py
	rm -rf $(VENV)-wheel

test: lint package-check
	$(PY) -m pytest -q
