# The README's two commands. Each sets up what it needs (idempotent, fast the second time):
#   make lab   - the main job: a HIL run on the simulated lab with an HTML report
#   make test  - the project's own tests
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# pyproject.toml has the version ranges, constraints.txt the exact versions installed here.
CONSTRAINTS := constraints.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(CONSTRAINTS) | sha256sum | cut -c1-12)
BOARD ?= esp32
REPORT := reports/lab-$(BOARD).html
# Debian packages: a real OpenSSH server and client for the simulated Linux boards (nss_wrapper
# gives each simulated board its own account and home without root), a C compiler for the
# firmware core's host tests.
DEB_PACKAGES := openssh-server openssh-client libnss-wrapper gcc g++ make
DEB_MISSING = $(shell for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done)

.PHONY: lab test setup system-packages constraints

# Shorter energy windows than MLPerf Tiny's 10 s x 5 keep the main job to minutes; run
# `pytest tests_hil --board esp32` without them for MLPerf-length windows.
LAB_ARGS ?= --window-s 3 --windows 3 --accuracy-samples 200

lab: setup
	@mkdir -p reports
	$(BIN)/pytest tests_hil --board $(BOARD) $(LAB_ARGS) --html=$(REPORT) --self-contained-html \
	  --junitxml=reports/lab-$(BOARD).xml; rc=$$?; \
	  $(BIN)/labbench report reports/journal.jsonl --out reports/index.html >/dev/null; \
	  echo; echo "HTML report:     $(abspath $(REPORT))"; \
	  echo "dashboard:       $(abspath reports/index.html)"; \
	  echo "results journal: $(abspath reports/journal.jsonl)"; \
	  exit $$rc

# Style and types first (seconds), then the tests.
test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy labbench
	$(BIN)/pytest tests -q

setup: system-packages $(STAMP)

system-packages:
	@missing="$(DEB_MISSING)"; [ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo"; else \
	  echo "missing Debian packages:$$missing; run: sudo apt-get update && sudo apt-get install -y$$missing" >&2; exit 1; fi; \
	echo "installing Debian packages:$$missing"; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) --upgrade pip
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) --build-constraint $(CONSTRAINTS) -e '.[fixtures,dev]'
	@rm -f $(VENV)/.installed-*; touch $@

# Rewrite constraints.txt with the newest versions pyproject.toml's ranges allow, resolved in a scratch
# virtualenv (then `make test` installs and tests them).
LOCK_VENV := build/lock-venv
constraints:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip setuptools
	$(LOCK_VENV)/bin/python -m pip install -q '.[fixtures,dev]'
	{ grep '^#' $(CONSTRAINTS); $(LOCK_VENV)/bin/python -m pip freeze --all --exclude labbench; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS) && rm -rf $(LOCK_VENV)
