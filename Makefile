# make setup : Debian packages (if apt is there), .venv with torch==2.13.0 first, the rest, the package
# make demo  : set-up, then the main job on the embedded default (Fashion-MNIST)
# make test  : set-up, then the test suite (make test-fast: without the end-to-end tests)
# make device-bundle : cp312 wheels for the GPU box in device_bundle/ (bench/device_bundle.sh)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# libjpeg62-turbo-dev: the libjpeg API headers for ffcv_bias/data/_fastjpeg.c (augment.decode=fast)
DEBIAN_PACKAGES := pkg-config libopencv-dev libturbojpeg0-dev libjpeg62-turbo-dev \
                   dataset-fashion-mnist
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast debian clean-venv device-bundle

setup: debian $(STAMP)

# Installs only the Debian packages that are missing, and only where apt exists.
debian:
	@if command -v apt-get >/dev/null 2>&1; then \
	  missing=""; for p in $(DEBIAN_PACKAGES); do \
	    dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	  fi; \
	else echo "no apt-get: make sure pkg-config, OpenCV, libturbojpeg and libjpeg(-turbo) headers are installed"; fi

# torch goes in first, pinned by constraints.txt: ffcv's dependencies ask for plain `torch`,
# which on an empty environment would pull a CUDA build and several GB of packages.
# The C extension's source too: editing it must rebuild it (pip install -e compiles it).
$(STAMP): setup.py constraints.txt ffcv_bias/data/_fastjpeg.c
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt numpy numba opencv-python pillow pyyaml
	$(PIP) install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: setup
	$(PY) -m ffcv_bias.demo

# --durations: the 25 slowest tests in every CI log, so a slow new test shows at once.
# -n: pytest-xdist workers (a test file stays on one worker: its module fixtures are built
# once); much of the suite waits on child processes, so 2 help even on 2 cores.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25 tests

# The suite without the end-to-end process tests (marker e2e).
test-fast: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=10 -m "not e2e" tests

clean-venv:
	rm -rf $(VENV)

# The device bundle (issue 30): ffcv, fastargs, terminaltables, pyyaml and this project as
# cp312 wheels with their shared libraries inside, for a GPU box without network
# (bench/device_bundle.sh; its proof: bash bench/device_bundle_check.sh, as root).
device-bundle: debian
	bash bench/device_bundle.sh
