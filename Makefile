# Entry points for developers and CI. `make check` is the one command that sets up a fresh
# Debian 12 machine and runs every test; .ci/run calls exactly that.
PYTHON_SYSTEM ?= /usr/bin/python3
VENV ?= .venv
PY := $(VENV)/bin/python
KERNELS ?= 6.1 6.12 newest

.PHONY: check setup venv kernels test test-unit test-kernel demo smoke-demo clean

check: setup test

setup: venv kernels

$(VENV)/.done: pyproject.toml
	./testbed/setup-host
	$(PYTHON_SYSTEM) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e . --no-deps
	$(PY) -m pip install -q pytest hypothesis virtme-ng
	touch $@

venv: $(VENV)/.done

kernels: venv
	$(PY) testbed/kernels.py fetch $(KERNELS)

test: test-unit test-kernel

test-unit: venv
	$(PY) -m pytest tests/unit -q

test-kernel: venv kernels
	$(PY) testbed/run_vm.py --kernels "$(KERNELS)"

clean:
	rm -rf $(VENV) build *.egg-info
