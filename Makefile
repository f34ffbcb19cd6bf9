# Entry points for developers and CI. `make check` is the one command that sets up a fresh
# Debian 12 machine and runs every test (the package install test included; its build tools
# come from packaging/setup-build-deps; ansible-lint on the Ansible role, not its Molecule
# VMs); .ci/run calls exactly that.
PYTHON_SYSTEM ?= /usr/bin/python3
VENV ?= .venv
PY := $(VENV)/bin/python
KERNELS ?= 6.1 6.12

.PHONY: check setup venv kernels lint test test-unit test-kernel demo smoke-demo clean

check: lint setup lint-ansible test-collection test check-monitoring test-package

setup: venv kernels

$(VENV)/.done: pyproject.toml
	./testbed/setup-host
	$(PYTHON_SYSTEM) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e . --no-deps
	$(PY) -m pip install -q pytest hypothesis virtme-ng jinja2 ruff mypy
	touch $@

venv: $(VENV)/.done

kernels: venv
	$(PY) testbed/kernels.py fetch $(KERNELS)

# Settings in pyproject.toml ([tool.ruff], [tool.mypy]); first in `make check`, it fails in
# seconds. Both run, so one call lists every finding.
lint: venv
	$(VENV)/bin/ruff check ipvslb tests bench testbed; ruff=$$?; $(VENV)/bin/mypy ipvslb && exit $$ruff

test: test-unit test-kernel

test-unit: venv
	$(PY) -m pytest tests/unit -q

test-kernel: venv kernels
	$(PY) testbed/run_vm.py --kernels "$(KERNELS)"

# The main job: a live failover demo in a VM on Debian's 6.12 kernel.
demo: venv
	$(PY) testbed/kernels.py fetch 6.12
	$(PY) testbed/demo.py --kernel 6.12

clean:
	rm -rf $(VENV) build *.egg-info

# --- Monitoring: the alert rules through promtool, taken from Debian's prometheus package
# unpacked into .cache (installing the package would also start a Prometheus server).
.PHONY: check-monitoring
PROMTOOL := .cache/prometheus/usr/bin/promtool

$(PROMTOOL):
	rm -rf .cache/prometheus && mkdir -p .cache/prometheus
	cd .cache/prometheus && { apt-get download prometheus 2>/dev/null || { apt-get update -q && apt-get download prometheus; }; } \
	  && dpkg-deb -x prometheus_*.deb . && rm prometheus_*.deb

check-monitoring: $(PROMTOOL)
	$(PROMTOOL) check rules monitoring/alerts.yml

# --- Packages. Build tools come from packaging/setup-build-deps (run by these targets), not
# from setup-host. packaging/deb/README and docs/install.md explain.
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

# Boots a Debian systemd guest per kernel (6.1: Debian 12, 6.12: Debian 13) and installs
# ipvslb from dist/apt by name. `make check` runs it on 6.1 only, for CI's time budget
# (wall times: docs/benchmarks.md#test-suites-and-ci).
PKGTEST_KERNELS ?= 6.1
test-package: apt-repo venv
	for k in $(PKGTEST_KERNELS); do ./packaging/vm-install-test --kernel $$k || exit 1; done

# --- Ansible role and Molecule. The tools live in their own venv
# (.cache/ansible-venv, pinned in molecule/requirements.txt), not in .venv: .venv is built
# on the distro's Python packages for the daemon's tests.
.PHONY: ansible-venv lint-ansible test-collection collection-install test-molecule
ANSIBLE_VENV ?= .cache/ansible-venv
ANSIBLE_BIN := $(abspath $(ANSIBLE_VENV))/bin
MOLECULE_SCENARIOS ?= kernel-6.1 kernel-6.12

# Order-only on .venv: its setup-host brings python3-venv on a fresh machine.
$(ANSIBLE_VENV)/.done: molecule/requirements.txt | $(VENV)/.done
	$(PYTHON_SYSTEM) -m venv $(ANSIBLE_VENV)
	$(ANSIBLE_BIN)/pip install -q --upgrade pip
	$(ANSIBLE_BIN)/pip install -q -r molecule/requirements.txt
	touch $@

ansible-venv: $(ANSIBLE_VENV)/.done

# The Molecule converge names the role ipvslb.ipvslb.ipvslb: the installed collection.
lint-ansible: ansible-venv collection-install
	PATH=$(ANSIBLE_BIN):$$PATH ANSIBLE_COLLECTIONS_PATH=$(abspath .cache/collections) \
	  ansible-lint --profile production ansible/roles/ipvslb ansible/playbooks \
	  ansible/galaxy.yml ansible/meta site.yml inventories molecule

# The collection (ansible/galaxy.yml): built, installed into an empty collections path and
# its playbook run from there (syntax, check mode on this host as a fresh one, key pinning).
# gpg and python3-apt come from build-deps.
test-collection: ansible-venv build-deps
	PATH=$(ANSIBLE_BIN):$$PATH ./ansible/tests/collection-test

# The whole Molecule suite: one scenario after the other, each VM holding the test bed's VM
# lock from create to destroy (about 21 minutes per kernel here under TCG). Not part of
# `make check`: it would add over half an hour of VMs to CI (docs/benchmarks.md).
# `MOLECULE_SCENARIOS=kernel-6.1` for one.
# The collection as `ansible-galaxy collection install` puts it, for Molecule's converge.
collection-install: ansible-venv
	rm -rf .cache/collection-build .cache/collections/ansible_collections/ipvslb/ipvslb
	$(ANSIBLE_BIN)/ansible-galaxy collection build ansible --output-path .cache/collection-build
	$(ANSIBLE_BIN)/ansible-galaxy collection install .cache/collection-build/ipvslb-ipvslb-*.tar.gz -p .cache/collections

test-molecule: ansible-venv venv apt-repo collection-install
	for s in $(MOLECULE_SCENARIOS); do \
	  start=$$(date +%s); \
	  PATH=$(ANSIBLE_BIN):$$PATH molecule/common/vm.py test $$s || { echo "molecule $$s: FAILED after $$(( $$(date +%s) - start )) s"; exit 1; }; \
	  echo "molecule $$s: passed in $$(( $$(date +%s) - start )) s"; \
	done

# --- Benchmarks (scripts that print tables, not tests; docs/benchmarks.md has their results).
.PHONY: bench-failover bench-tracer bench-ipvs bench-reload
BENCH_KERNEL ?= 6.12

bench-failover: venv
	command -v keepalived >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q keepalived)
	$(PY) testbed/kernels.py fetch $(BENCH_KERNEL)
	$(PY) testbed/run_vm.py --kernels $(BENCH_KERNEL) --exec "python3 bench/failover.py"

# Deterministic by default: one vCPU whose clock counts instructions (QEMU -icount), 1 ns each
# (a 1 GIPS CPU), so the host's load does not move the figures. shift=3 (8 ns each) is the
# slower model docs/benchmarks.md also quotes; BENCH_TRACER_QEMU= measures wall-clock time.
BENCH_TRACER_QEMU ?= -icount shift=0,sleep=off -smp 1
BENCH_TRACER_ARGS ?= --cycles 10
# Instructions, not seconds, set the figures, but the host sets how long they take: 7 minutes
# on a quiet host, more than the VM runner's default 30 on a busy one.
BENCH_TRACER_TIMEOUT ?= 5400
bench-tracer: venv
	command -v bpftool >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q bpftool)
	$(PY) testbed/kernels.py fetch $(BENCH_KERNEL)
	$(PY) testbed/run_vm.py --kernels $(BENCH_KERNEL) --qemu-opts "$(BENCH_TRACER_QEMU)" \
	  --timeout $(BENCH_TRACER_TIMEOUT) --exec "python3 bench/tracer_overhead.py $(BENCH_TRACER_ARGS)"

bench-ipvs: venv
	$(PY) testbed/kernels.py fetch $(BENCH_KERNEL)
	$(PY) testbed/run_vm.py --kernels $(BENCH_KERNEL) --exec "python3 bench/ipvs_apply.py"

bench-reload: venv
	$(PY) testbed/kernels.py fetch $(BENCH_KERNEL)
	$(PY) testbed/run_vm.py --kernels $(BENCH_KERNEL) --exec "python3 bench/reload_cost.py"
