# Every target creates .venv itself, so `make test` and `make reproduce` work on a fresh machine.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test lint format reproduce figures bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	.venv/bin/ruff check mechintro tests analyses
	.venv/bin/ruff format --check mechintro tests analyses

format: $(STAMP)
	.venv/bin/ruff format mechintro tests analyses
	.venv/bin/ruff check --fix mechintro tests analyses

test: lint
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

reproduce: $(STAMP)
	$(PY) -m mechintro.cli reproduce

figures: $(STAMP)
	$(PY) -m mechintro.cli figures

bench: $(STAMP)
	$(PY) analyses/bench/trials.py

clean:
	rm -rf .venv
