# Two commands on a fresh machine: `make run` (creates .venv, installs, runs the offline default)
# and `make test` (same environment, whole suite). CI runs `bash .ci/run`, which calls `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= outputs/local-digits

.PHONY: install run test test-fast bench throughput done-when clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) model_def.py --config config/local-digits.yaml --checkpoint-dir $(OUT)/checkpoints --metrics-out $(OUT)/metrics.json

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	for script in bench/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

# Ours beside byol-pytorch and lightly (bench/RESULTS.md); the peers never enter the product's
# requirements, and the constraint keeps the pinned torch/torchvision.
throughput: install
	$(PY) -m pip install -r requirements-bench.txt -c requirements.txt
	$(PY) bench/throughput.py
	$(PY) bench/throughput.py --only augment,decode --image-size 224 --batch-size 32

# Issue 16's acceptance rows (op counts, synchronised batch norm, ratios to the peers), one run,
# about 5 minutes on 1 CPU thread (bench/RESULTS.md).
done-when: install
	$(PY) -m pip install -r requirements-bench.txt -c requirements.txt
	$(PY) bench/throughput.py --done-when --repeats 7 --steps 1

clean:
	rm -rf outputs .pytest_cache
