# aimass: the two commands a newcomer types are `make demo` and `make test`.
# Everything installs itself into .venv (Python 3.11) and node_modules.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
BUF := node_modules/.bin/buf
PROTO_FILES := $(shell find protos/aimass -name '*.proto')
PROTO_STAMP := gen/python/.stamp
INSTALL_STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help demo test bench lint audit format protos buf-lint clients up down status clean

help:
	@echo "make demo    start the embedded stack, run the pipeline, print what happened"
	@echo "make test    run the whole test suite (real NATS, PostgreSQL, S3 server, Triton)"
	@echo "make bench   run every benchmark: tables, JSON and PNG plots into docs/benchmarks/"
	@echo "make lint    ruff, buf lint and the dependency audit (make audit, pip-audit)"
	@echo "make protos  regenerate the Python code of protos/ into gen/python"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# grpcio-tools comes first: the package maps gen/python into aimass.*, so the
# code must be generated before the package is installed.
$(PROTO_STAMP): $(PROTO_FILES) $(VENV)/bin/python
	$(PIP) install --quiet "grpcio-tools>=1.66" "googleapis-common-protos>=1.65"
	rm -rf gen/python && mkdir -p gen/python
	$(PY) -m grpc_tools.protoc -I protos -I protos/third_party \
		--python_out=gen/python --pyi_out=gen/python --grpc_python_out=gen/python \
		$(PROTO_FILES)
	find gen/python/aimass -type d -exec touch {}/__init__.py \;
	touch $@

protos: $(PROTO_STAMP)

$(INSTALL_STAMP): pyproject.toml setup.py $(PROTO_STAMP)
	$(PIP) install --quiet -e ".[test,triton]"
	$(PY) -m aimass.core.triton_setup
	touch $@

$(BUF): package.json package-lock.json
	npm ci --no-audit --no-fund --silent
	touch $@

demo: $(INSTALL_STAMP)
	$(VENV)/bin/aimass demo

# pytest exits 5 when it collected no test: that must fail, never pass silently.
test: $(INSTALL_STAMP) $(BUF)
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# Every tests/bench/bench_*.py writes its markdown table (some also JSON) into
# docs/benchmarks/; report.py draws the PNG plots and writes docs/benchmarks.md.
# BENCH_ARGS (for example --quick) is passed to each script.
BENCH_ARGS ?=
bench: $(INSTALL_STAMP)
	@mkdir -p docs/benchmarks
	@set -e; for script in tests/bench/bench_*.py; do \
		name=$$(basename $$script .py); name=$${name#bench_}; \
		echo "== $$name"; \
		$(PY) $$script --out docs/benchmarks/$$name.md $(BENCH_ARGS); \
	done
	$(PY) tests/bench/report.py

buf-lint: $(BUF)
	$(BUF) lint
	$(BUF) build -o /dev/null

# Every client of buf.gen.yaml (TypeScript, Go, Java, C++) into clients/*/gen;
# the local plugins it needs are listed in docs/clients.md.
clients: $(BUF)
	$(BUF) generate --template buf.gen.yaml

lint: $(INSTALL_STAMP) buf-lint audit
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Dependency audit (docs/testing.md): pip-audit, in its own venv so its dependencies are
# not audited as ours, over the pinned freeze of .venv. Needs the network (PyPI / OSV);
# offline it says so and passes. Not part of `make test`. Fails on any known vulnerability.
AUDIT_VENV := build/audit-venv
AUDIT_OUT := build/audit

audit: $(INSTALL_STAMP)
	@mkdir -p $(AUDIT_OUT)
	@test -x $(AUDIT_VENV)/bin/pip-audit || { $(PYTHON) -m venv $(AUDIT_VENV) && \
	  $(AUDIT_VENV)/bin/pip install --quiet "pip-audit==2.10.1"; } || \
	  { echo "audit: pip-audit cannot be installed (offline?): skipped"; exit 0; }
	@$(PIP) freeze --exclude-editable > $(AUDIT_OUT)/requirements.txt
	@rm -f $(AUDIT_OUT)/report.json; \
	$(AUDIT_VENV)/bin/pip-audit -r $(AUDIT_OUT)/requirements.txt --no-deps --disable-pip \
	  --progress-spinner off -f json -o $(AUDIT_OUT)/report.json 2>$(AUDIT_OUT)/log.txt; \
	rc=$$?; \
	if [ ! -s $(AUDIT_OUT)/report.json ]; then \
	  echo "audit: the vulnerability service cannot be reached (offline?): skipped," \
	    "see $(AUDIT_OUT)/log.txt"; exit 0; fi; \
	$(PY) -c 'import json, sys; deps = json.load(open(sys.argv[1]))["dependencies"]; \
	skipped = [d for d in deps if "skip_reason" in d]; \
	found = [(d["name"], d["version"], v["id"]) for d in deps for v in d.get("vulns", [])]; \
	[print("audit: VULNERABLE", *f) for f in found]; \
	print(f"audit: {len(deps) - len(skipped)} of {len(deps)} packages audited," \
	      f" {len(found)} known vulnerabilities, {len(skipped)} not found in the index")' \
	  $(AUDIT_OUT)/report.json; \
	exit $$rc

format: $(INSTALL_STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

up: $(INSTALL_STAMP)
	$(VENV)/bin/aimass up --detach

status: $(INSTALL_STAMP)
	$(VENV)/bin/aimass status

down: $(INSTALL_STAMP)
	$(VENV)/bin/aimass down

clean:
	rm -rf $(VENV) gen/python node_modules .aimass
