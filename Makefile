# `make demo` and `make test` each set up what they need on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench ui clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing into $(VENV) (log: $(VENV)/install.log) ..."
	@$(BIN)/python -m pip install --upgrade pip >$(VENV)/install.log 2>&1
	@$(BIN)/python -m pip install -e '.[test]' >>$(VENV)/install.log 2>&1 || { tail -30 $(VENV)/install.log; exit 1; }
	@touch $(STAMP)

demo: $(STAMP)
	@$(BIN)/python -m demo

# Three workers on a two-CPU machine: the end-to-end tests spend much of their time waiting on
# schedules, alerts and leases, and a third worker uses that time (937 s -> 775 s measured).
test: $(STAMP)
	@$(BIN)/python -m pytest -q -n 3 --dist loadfile

bench: $(STAMP)
	@$(BIN)/python benchmarks/backup_restore.py

ui: $(STAMP)
	@PREFECT_HOME=$(CURDIR)/.demo/prefect $(BIN)/prefect server start --host 127.0.0.1

clean:
	rm -rf $(VENV) .demo
