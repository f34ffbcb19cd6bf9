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

# --- Packages (issue 6). Build tools come from packaging/setup-build-deps, not setup-host:
# `make check` does not need them. packaging/deb/README and README.md#install explain.
.PHONY: build-deps deb apt-repo rpm rpm-repo packages test-package

build-deps:
	./packaging/setup-build-deps

deb: build-deps
	./packaging/build-deb

apt-repo: deb
	./packaging/build-apt-repo

rpm: build-deps
	./packaging/build-rpm

rpm-repo: rpm
	./packaging/build-rpm-repo

packages: apt-repo rpm-repo

# Boots a Debian 12 systemd guest on kernel 6.1 and installs ipvslb from dist/apt by name
# (about 10 minutes under TCG; not part of `make check`).
test-package: apt-repo venv
	./packaging/vm-install-test --kernel 6.1
