# `make demo` and `make test` do all set-up themselves: each installs the package in place (`pip install -e`) with
# its dev extras at the exact versions of constraints.txt, once per version of setup.cfg, pyproject.toml and
# constraints.txt (the stamp makes later runs skip the install), and then runs.
PYTHON ?= python3
PIP := $(PYTHON) -m pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP := .cache/install-$(shell cat setup.cfg pyproject.toml constraints.txt | cksum | cut -d' ' -f1).stamp

.PHONY: install demo test test-all lint bench

# The build backend that pyproject.toml names goes in first, so the package builds without an isolated
# environment (which would download setuptools on every install).
$(STAMP): setup.cfg pyproject.toml constraints.txt
	@mkdir -p .cache
	$(PIP) "setuptools>=64" wheel
	$(PIP) --no-build-isolation -e ".[dev]"
	@touch $@

install: $(STAMP)

demo: install
	$(PYTHON) cli.py fit --config configs/mlm/quickstart.yaml
	$(PYTHON) cli.py test --config configs/mlm/quickstart.yaml --ckpt_path runs/mlm_quickstart/checkpoints/last.ckpt

test: install
	WANDB_MODE=disabled $(PYTHON) -m pytest -m "not slow" -q

test-all: install
	WANDB_MODE=disabled $(PYTHON) -m pytest -q

lint: install
	ruff check . && ruff format --check .

bench: install
	$(PYTHON) benchmarks/mlm_step.py
