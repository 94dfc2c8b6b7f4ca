# Every target creates its environment itself, so `make test` and `make reproduce` work on a fresh machine.
# The development environment (.venv) installs exactly requirements/lock.txt (versions and hashes, resolved by
# `make lock`); test-newest and test-oldest resolve the two ends of pyproject.toml's ranges afresh.
PYTHON  ?= python3
PY      := .venv/bin/python
STAMP   := .venv/.installed
UV      := .uv/bin/uv
LOCK    := requirements/lock.txt
TORCH   := requirements/torch.txt
# Where the CPU build of torch named in requirements/torch.txt lies (on this workplace's machines: /opt/wheels).
FIND_LINKS ?= /opt/wheels
QUICK_OUT ?=
# The organism reproduce-quick runs on (empty: organism, the Gemma 3 one; organism-olmo: the OLMo 3 one).
MODEL ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# One resolution, for Python 3.11 on x86-64 Linux (the machines CI and the lock are for).
COMPILE := $(UV) pip compile pyproject.toml --extra dev --python-version 3.11 \
	--python-platform x86_64-unknown-linux-gnu --find-links $(FIND_LINKS) --quiet
# The lock also holds the docs extra (mkdocs and its plugins), so `make docs` builds from the same .venv;
# test-newest and test-oldest do not install it (they run the suite only).
LOCK_EXTRAS := --extra docs

.PHONY: setup browser test test-newest test-oldest lock wheel wheel-smoke test-slow lint format reproduce \
	reproduce-quick figures bench mutants docs clean

$(UV): requirements/uv.txt
	rm -rf .uv && $(PYTHON) -m venv .uv
	.uv/bin/pip install -q --require-hashes -r requirements/uv.txt
	touch $(UV)

# env DIR REQUIREMENTS [FLAGS]: a fresh venv at DIR holding exactly REQUIREMENTS, plus mechintro (editable).
define env
	rm -rf $(1) && $(PYTHON) -m venv $(1)
	$(UV) pip sync -q --python $(1)/bin/python --find-links $(FIND_LINKS) $(3) $(2)
	$(UV) pip install -q --python $(1)/bin/python --no-deps -e .
endef

$(STAMP): $(LOCK) pyproject.toml | $(UV)
	$(call env,.venv,$(LOCK),--require-hashes)
	touch $(STAMP)

setup: $(STAMP)

# PNG figures need Chrome/Chromium (kaleido). As root on Debian this installs Debian's chromium; elsewhere it
# says what to do. It never fails: without a browser the figures are written as HTML (MECHINTRO_BROWSER=none
# hides a browser on purpose).
browser: $(STAMP)
	$(PY) -m mechintro.plots.browser --install

lint: $(STAMP)
	.venv/bin/ruff check mechintro tests analyses tools
	.venv/bin/ruff format --check mechintro tests analyses tools

format: $(STAMP)
	.venv/bin/ruff format mechintro tests analyses tools
	.venv/bin/ruff check --fix mechintro tests analyses tools

test: lint browser
	$(PY) -m pytest -q

# Refresh the lock: today's newest versions the ranges allow, torch held at its CPU build.
lock: | $(UV)
	$(COMPILE) $(LOCK_EXTRAS) --upgrade --generate-hashes --override $(TORCH) -o $(LOCK)

# The suite on the newest versions pyproject.toml allows (resolved now, not from the lock), torch held at the
# lock's CPU build: torch's upper end is tested only there.
test-newest: | $(UV)
	mkdir -p .venv-newest.d
	$(COMPILE) --upgrade --override $(TORCH) -o .venv-newest.d/requirements.txt
	$(call env,.venv-newest,.venv-newest.d/requirements.txt,)
	.venv-newest/bin/python -m pytest -q

# The suite on the lowest versions of the direct dependencies (torch included: its floor's PyPI build).
test-oldest: | $(UV)
	mkdir -p .venv-oldest.d
	$(COMPILE) --upgrade --resolution lowest-direct -o .venv-oldest.d/requirements.txt
	$(call env,.venv-oldest,.venv-oldest.d/requirements.txt,)
	.venv-oldest/bin/python -m pytest -q

# The sdist, and the wheel built from it, into dist/.
wheel: | $(UV)
	rm -rf dist && $(UV) build -q --out-dir dist

# Install the wheel into a fresh venv outside the checkout (newest dependencies), make the installed package
# read-only, and use it from another folder.
wheel-smoke: wheel
	bash tools/wheel_smoke.sh dist $(UV) $(FIND_LINKS) $(TORCH)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

reproduce: browser
	$(PY) -m mechintro.cli reproduce

# The whole pipeline on the organism with tiny settings, into a temporary folder (or QUICK_OUT): CI runs it,
# on the Gemma 3 organism and (MODEL=organism-olmo) on the OLMo 3 one.
reproduce-quick: browser
	$(PY) -m mechintro.cli reproduce --quick $(if $(MODEL),--model $(MODEL)) $(if $(QUICK_OUT),--out $(QUICK_OUT))

figures: $(STAMP)
	$(PY) -m mechintro.cli figures

bench: $(STAMP)
	$(PY) analyses/bench/trials.py

# Plant one named bug per exactness claim in a temporary copy; every one must make its tests fail (~10 min).
mutants: $(STAMP)
	$(PY) tools/mutants.py

# The documentation site into site/: mkdocs.yml, the pages in docs/, and the API reference that
# docs/gen_reference.py generates at build time by walking the package. --strict: a broken reference or
# link fails the build. The two variables silence the theme's and a plugin's notices about MkDocs 2.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf site .venv .venv-newest .venv-newest.d .venv-oldest .venv-oldest.d .uv dist
