# The README's two commands: `make demo` and `make test`. Both set up .venv from requirements.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The lint tools (requirements-dev.txt), installed apart so `make demo` does not need them.
DEV_STAMP := $(VENV)/.installed-dev
SHARED ?= ../shared/comp5329
REAL_OUT ?= /tmp/captioned-multilabel-real

.PHONY: help venv demo demo-data test lint check-real bench bench-real bench-scale gpu-pack gpu-check clean

help:
	@echo "make demo        install, generate the demo dataset, run every stage, print the scores"
	@echo "make test        install, lint, and run the test suite (CPU, tiny generated data)"
	@echo "make lint        ruff and mypy on the code (configured in pyproject.toml)"
	@echo "make check-real  checks on the real competition data in $(SHARED)"
	@echo "make bench-real  the whole default recipe on the real data, timed (bench/real_pipeline.py),"
	@echo "                 then the throughput benchmark on its weights (python -m pipeline.tools.bench)"
	@echo "make bench       the throughput benchmark on the demo dataset (after make demo)"
	@echo "make bench-scale time and memory at 15k, 60k and 120k images linked from $(SHARED) (output/scale.json)"
	@echo "make gpu-pack    pack wheels, a real-data subset and the check script into .gpu/ (under 60 MB)"
	@echo "make gpu-check   run .gpu/check.sh on a CUDA machine: every GPU stage within --deadline (480 s), report in .gpu/out/gpu_check.json"
	@echo "make clean       remove generated data, weights and outputs (keeps .venv)"

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing requirements.txt into $(VENV): about 6.6 GB (PyTorch with its CUDA libraries) and 2-3 minutes; for a CPU-only install see README.md"
	$(PY) -m pip install --progress-bar on --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(PY) -m pip install --progress-bar on --disable-pip-version-check -r requirements-dev.txt
	touch $(DEV_STAMP)

venv: $(STAMP)

demo-data: $(STAMP)
	$(PY) -m pipeline.tools.demo --out data/demo

demo: demo-data
	$(PY) train_efficientnet.py --data data/demo
	$(PY) train_caption_rnn.py --data data/demo
	$(PY) inference.py --data data/demo --evaluate

# ruff and mypy read their settings from pyproject.toml.
lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q -n 2 --dist loadfile --max-worker-restart 0 tests

check-real: $(STAMP)
	@if [ -d $(SHARED) ]; then \
		$(PY) -m pytest -q bench/check_real.py --shared $(SHARED); \
	else echo "$(SHARED) not found: skipping the real-data checks"; fi

clean:
	rm -rf data/demo output/* weights/*.pt weights/*.csv weights/*.json weights/cache

bench-real: $(STAMP)
	@if [ -d $(SHARED) ]; then \
		$(PY) bench/real_pipeline.py --data $(SHARED) --work $(REAL_OUT) --output output && \
		$(PY) -m pipeline.tools.bench --data $(SHARED) --weights $(REAL_OUT)/weights --output output; \
	else echo "$(SHARED) not found: skipping the real-data benchmark"; fi

bench-scale: $(STAMP)
	@if [ -d $(SHARED) ]; then \
		$(PY) bench/scale.py --source $(SHARED) --output output; \
	else echo "$(SHARED) not found: skipping the scale benchmark"; fi

bench: $(STAMP)
	$(PY) -m pipeline.tools.bench --data data/demo --weights weights --output output

gpu-pack: $(STAMP)
	$(PY) bench/gpu_pack.py --data $(SHARED) --out .gpu

# On the GPU machine: the checkout plus .gpu/, with python3 holding torch (PYTHON=... to choose).
gpu-check:
	@test -f .gpu/check.sh || { echo "no .gpu/check.sh: run make gpu-pack first"; exit 1; }
	bash .gpu/check.sh
