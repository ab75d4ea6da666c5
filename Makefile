# One entry point for people and CI. Every target installs what it needs first,
# so each works on a fresh Debian 12 machine as root.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# libsystemd-dev + pkg-config + gcc build systemd-python (the `systemd` extra);
# systemd + util-linux (+ dbus, for systemd-run --wait) boot the real systemd 252 sandbox
# of tests/systemd. postgresql (Debian 12: 15) is the server the PostgreSQL state backend's tests
# start themselves (tests/pg_server.py), libpq5 the library psycopg (the `fleet` extra) loads.
# jq runs the README's examples of `--json` (tests/test_cli_json.py); prometheus (Debian 12:
# 2.42) is the server and promtool the metrics tests run (issue 12); tmux is the real terminal
# `poolkeeper top` is tested in (tests/test_top.py).
APT_PACKAGES := libsystemd-dev pkg-config gcc python3-dev python3-venv systemd util-linux procps dbus \
  postgresql libpq5 jq prometheus tmux

.PHONY: help deps venv run test lint typecheck schema clean bench

help:
	@echo "make run    - run poolkeeper in the foreground on config/example.yaml (Ctrl-C drains)"
	@echo "make test   - install everything the tests need (apt included) and run every test"
	@echo "make lint   - ruff"
	@echo "make typecheck - mypy --strict on the package"
	@echo "make schema - regenerate config/poolkeeper.schema.json"
	@echo "make bench  - run the benchmarks in bench/"

deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstalled only when pyproject.toml changes (editable: code changes need no reinstall).
# editable_mode=compat puts the checkout on sys.path with a plain .pth line: setuptools' default
# editable finder costs ~25 ms in every interpreter start (the daemon and each helper process),
# which an installed poolkeeper does not pay and bench/ should not measure. setuptools calls
# compat "transitional": should a release drop it, the default mode still installs.
$(VENV)/.installed: pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q -e '.[systemd,test,fleet]' --config-settings editable_mode=compat \
	  || $(BIN)/pip install -q -e '.[systemd,test,fleet]'
	$(BIN)/python -c "import poolkeeper, systemd.journal, yaml, pydantic, croniter, sdnotify, psycopg, prometheus_client"
	touch $@

venv: deps $(VENV)/.installed

run: venv
	$(BIN)/poolkeeper run config/example.yaml

lint: venv
	$(BIN)/ruff check poolkeeper tests bench

typecheck: venv
	$(BIN)/mypy

test: venv lint typecheck
	$(BIN)/python -m pytest

schema: venv
	$(BIN)/poolkeeper schema > config/poolkeeper.schema.json

# matplotlib (the `bench` extra) only for bench/bench_scale.py's plot, bench/scale.png.
$(VENV)/.bench-installed: pyproject.toml Makefile | $(VENV)/.installed
	$(BIN)/pip install -q -e '.[systemd,test,fleet,bench]' --config-settings editable_mode=compat \
	  || $(BIN)/pip install -q -e '.[systemd,test,fleet,bench]'
	$(BIN)/python -c "import matplotlib"
	touch $@

bench: venv $(VENV)/.bench-installed
	$(BIN)/python bench/run_all.py
	$(BIN)/python bench/bench_scale.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache .hypothesis
