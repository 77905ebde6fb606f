# `make demo` and `make test` do all set-up themselves: each installs what setup.cfg asks for (once per
# version of setup.cfg; the stamp makes later runs skip the install) and then runs.
PYTHON ?= python3
STAMP := .cache/install-$(shell cksum setup.cfg | cut -d' ' -f1).stamp

.PHONY: install demo test test-all lint bench

$(STAMP): setup.cfg
	@mkdir -p .cache
	$(PYTHON) -c "import configparser as c; p = c.ConfigParser(); p.read('setup.cfg'); \
	print(p['options']['install_requires']); print(p['options.extras_require']['dev'])" > .cache/requirements.txt
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r .cache/requirements.txt
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
