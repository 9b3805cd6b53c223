# Two entry points on a fresh machine: `make demo` (whole pipeline on the synthetic city) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	@# Reuse an importable torch (e.g. a CUDA build on a GPU machine); otherwise install the CPU release.
	@if python3 -c "import torch" 2>/dev/null; then python3 -m venv --system-site-packages $(VENV); \
	else python3 -m venv $(VENV) && $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[dev]'
	@# LPIPS's linear layers ship in the lpips wheel; --no-deps as it requires torchvision, which does not install
	@# beside our torch. Only its weight files are read (mega_nerf/evaluation/lpips.py), never imported.
	$(PY) -m pip install -q --no-deps lpips==0.1.4
	@# The viewer's browser test drives Debian's Chromium (never a browser download); it fails without one.
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then \
		apt-get update -q && apt-get install -y -q chromium; fi
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py --output demo

test: $(STAMP)
	$(VENV)/bin/ruff check mega_nerf scripts tests bench
	$(PY) -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/ruff check mega_nerf scripts tests bench

clean:
	rm -rf $(VENV) demo
