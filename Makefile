# Two commands on a fresh machine:  make run  |  make test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A CPU build of torch lies in /opt/wheels on our machines; pip would otherwise pull a CUDA build.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PYTEST_ARGS ?=

.PHONY: install run test test-unit lint-imports bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(FIND_LINKS) -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/cxr-triage serve

# Installs the Debian tools the tests run against when missing (as root), reuses PostgreSQL and
# Redis when they answer and starts them when it can; Orthanc and the dcmtk peers are started by
# the tests that use them. pytest's exit 5 (no tests) fails.
test: install
	bash scripts/install-test-tools.sh
	bash scripts/ensure-services.sh
	set +e; CXR_TRIAGE_REQUIRE_SERVICES=$${CXR_TRIAGE_REQUIRE_SERVICES:-1} $(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test-unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

bench: install
	$(PY) bench/model_bench.py

clean:
	rm -rf $(VENV) var .pytest_cache
