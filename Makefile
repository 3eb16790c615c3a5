# caa: the two commands of the README are `make demo` and `make test`; both set the machine up first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
TRIAL_JOBS ?= 2
TESTS ?= tests

.PHONY: setup test demo demo-pool demo-vm lint typecheck protos podvm bench clean

setup:
	scripts/setup.sh

test: setup
	scripts/build-kube.sh >/dev/null  # the real kube-apiserver + etcd of the Kubernetes tests (cached)
	set -o pipefail; $(VENV)/bin/trial -j$(TRIAL_JOBS) $(TESTS) 2>&1 | tee .trial.log

demo: setup
	$(PY) -m caa.devtools.demo

demo-pool: setup
	$(PY) -m caa.devtools.demo --pool

demo-vm: setup
	$(PY) -m caa.devtools.demo --provider libvirt

lint:
	$(VENV)/bin/ruff check caa tests bench
	$(VENV)/bin/mypy

protos:
	$(PY) scripts/genprotos.py

podvm: setup
	podvm/build.sh

bench: setup
	for b in bench/*_bench.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf build dist *.egg-info _trial_temp* .trial.log

.PHONY: image
image: setup  # the daemons' container image, offline: dist/caa-image.oci.tar (docs/install.md)
	scripts/build-image.sh
