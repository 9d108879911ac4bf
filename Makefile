# Two entry points for a fresh machine: `make train` (the main job) and `make test`.
# Each creates or reuses .venv and installs what it needs by itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/default
ARGS ?=
# pytest-xdist workers for `make test`: one per core of a 2-core machine.
TEST_WORKERS ?= 2

.PHONY: install bible train test lint format clean clean-runs

$(STAMP): requirements.txt pyproject.toml
	@echo "install: creating $(VENV) and installing the pinned packages (a few minutes the first time)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -r requirements.txt
	@$(PY) -m pip install -q --no-deps -e .
	@# The repository on sys.path as well: a regular package there outranks a clone folder named
	@# dynmoe_jax beside a script, which would otherwise be imported as an empty namespace package.
	@$(PY) -c 'import pathlib, site; pathlib.Path(site.getsitepackages()[0], "dynmoe_jax_repo.pth").write_text(str(pathlib.Path.cwd()) + "\n")'
	@touch $(STAMP)
	@echo "install: done"

install: $(STAMP)

# The default corpus is the King James Bible from Debian's bible-kjv package. Where apt is not
# available (or we are not root) the default config's fallback_dataset trains on Python's own
# pydoc text instead, says so at start-up and records it in the workdir's config.json.
bible:
	@if command -v bible >/dev/null 2>&1; then \
	  echo "bible: bible-kjv is installed"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "bible: installing bible-kjv with apt-get (about a minute)"; \
	  { apt-get install -y -qq bible-kjv >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bible-kjv >/dev/null 2>&1; }; } || \
	  echo "bible: apt-get could not install bible-kjv; training will use fallback_dataset=pydoc"; \
	else \
	  echo "bible: bible-kjv is not installed (that needs apt-get as root); training will use fallback_dataset=pydoc"; \
	fi

train: $(STAMP) bible
	$(PY) -m dynmoe_jax.main --config=dynmoe_jax/configs/default.py --workdir=$(WORKDIR) $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# `make clean` removes what `make install` and the tools made: the venv and the caches of
# pytest and ruff. Training runs (checkpoints, metrics) under runs/ are kept; `make clean-runs`
# deletes them, naming what it deletes. The corpus cache (~/.cache/dynmoe_jax or
# $DYNMOE_DATA_DIR) is left to the user: rebuilding it takes minutes.
clean:
	@echo "clean: deleting $(VENV)/ .pytest_cache/ .ruff_cache/ (runs/ is kept; see make clean-runs)"
	@rm -rf $(VENV) .pytest_cache .ruff_cache

clean-runs:
	@echo "clean-runs: deleting runs/ (every training run's checkpoints and metrics)"
	@rm -rf runs
