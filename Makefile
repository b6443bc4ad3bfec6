# Two commands on a fresh machine: `make run` (creates .venv, installs what running needs, runs the
# offline default and prints every figure of README's Results table for it) and `make test` (adds the
# test tools, runs the whole suite). CI runs `bash .ci/run`, which calls `make test`.
#
# Each install happens once, recorded by a stamp file in the venv (.installed-run, .installed-dev),
# and again only when its requirements or the constraints change.
#   TORCH_INDEX  an extra pip index for torch/torchvision only, e.g. the CPU-only wheels on a machine
#                without a GPU (about 1.5 GB instead of 6 GB): rm -rf .venv, then
#                make run TORCH_INDEX=https://download.pytorch.org/whl/cpu
#                (an extra index, not the only one: the pinned torch==X matches X+cpu there, the
#                higher version, and torch's own dependencies still come from PyPI at their pins)
#   CONSTRAINTS  exact versions of every package (the tested set, Python 3.11); empty to resolve
#                freely (another Python): make run CONSTRAINTS=
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= outputs/local-digits
TORCH_INDEX ?=
CONSTRAINTS ?= constraints.txt
PIP_INSTALL := $(PY) -m pip install $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
TORCH_PINS := $(shell grep -E '^torch(vision)?==' requirements.txt)

.PHONY: install install-dev run test test-fast bench throughput done-when clean

$(VENV)/.installed-run: requirements.txt $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX),$(PIP_INSTALL) --extra-index-url $(TORCH_INDEX) $(TORCH_PINS))
	$(PIP_INSTALL) -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-run requirements-dev.txt
	$(PIP_INSTALL) -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed-run

install-dev: $(VENV)/.installed-dev

# The README's Results row for `make run` is this command's output: the linear probe, the fair
# probe of every representation and the wall time (also in $(OUT)/metrics.json).
run: install
	$(PY) model_def.py --config config/local-digits.yaml --checkpoint-dir $(OUT)/checkpoints --metrics-out $(OUT)/metrics.json

test: install-dev
	$(PY) -m pytest -q

test-fast: install-dev
	$(PY) -m pytest -q -m "not slow"

bench: install-dev
	for script in bench/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

# Ours beside byol-pytorch and lightly (bench/RESULTS.md); the peers never enter the product's
# requirements, and the constraints keep the pinned torch/torchvision.
throughput: install-dev
	$(PY) -m pip install -r requirements-bench.txt -c requirements.txt $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	$(PY) bench/throughput.py
	$(PY) bench/throughput.py --only augment,decode --image-size 224 --batch-size 32

# Issue 16's acceptance rows (op counts, synchronised batch norm, ratios to the peers), one run,
# about 5 minutes on 1 CPU thread (bench/RESULTS.md).
done-when: install
	$(PY) -m pip install -r requirements-bench.txt -c requirements.txt $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	$(PY) bench/throughput.py --done-when --repeats 7 --steps 1

clean:
	rm -rf outputs .pytest_cache
