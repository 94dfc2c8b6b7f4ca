# Every target creates .venv itself, so `make test` and `make reproduce` work on a fresh machine.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
QUICK_OUT ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup browser test test-slow lint format reproduce reproduce-quick figures bench mutants clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# PNG figures need Chrome/Chromium (kaleido). As root on Debian this installs Debian's chromium; elsewhere it
# says what to do. It never fails: without a browser the figures are written as HTML (MECHINTRO_BROWSER=none
# hides a browser on purpose).
browser: $(STAMP)
	$(PY) -m mechintro.browser --install

lint: $(STAMP)
	.venv/bin/ruff check mechintro tests analyses tools
	.venv/bin/ruff format --check mechintro tests analyses tools

format: $(STAMP)
	.venv/bin/ruff format mechintro tests analyses tools
	.venv/bin/ruff check --fix mechintro tests analyses tools

test: lint
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

reproduce: browser
	$(PY) -m mechintro.cli reproduce

# The whole pipeline on the organism with tiny settings, into a temporary folder (or QUICK_OUT): CI runs it.
reproduce-quick: browser
	$(PY) -m mechintro.cli reproduce --quick $(if $(QUICK_OUT),--out $(QUICK_OUT))

figures: $(STAMP)
	$(PY) -m mechintro.cli figures

bench: $(STAMP)
	$(PY) analyses/bench/trials.py

# Plant one named bug per exactness claim in a temporary copy; every one must make its tests fail (~10 min).
mutants: $(STAMP)
	$(PY) tools/mutants.py

clean:
	rm -rf .venv
